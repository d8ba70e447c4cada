"""Decoded tiles and chunks kept for the next windows of a run: each is decoded about once.

A window is its output tile plus a halo on every side, so it rarely starts on a tile of the
file: with 512² TIFF tiles, tile 1024 and halo 44, each window touches 4 x 4 file tiles for
the area of 2 x 2, and every file tile is decoded by the four windows around it (over 1024²
Zarr chunks, 3 x 3 chunks for the area of one). Decoding (deflate, LZW, JPEG, blosc) is most
of the cost of a read, which is what a GPU waits on. So decoded tiles go into one
least-recently-used cache per process, :data:`CHUNKS`, shared by every reader thread and
bounded in bytes: the tiles of a one-page TIFF level and Zarr chunks through
:func:`read_chunks` (zarr keeps none; see :mod:`pipeline.io.tiff_tiles`), other TIFF levels' tiles
through :class:`CachedStore` under tifffile's Zarr store. Windows are read in raster order, so a
band of tiles one window high and the image wide is what gets reused; :func:`reserve` makes
room for it (within :data:`MAX_BYTES`)."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np
from zarr.storage import WrapperStore

__all__ = [
    "CHUNKS",
    "MAX_BYTES",
    "MIN_BYTES",
    "CachedStore",
    "DecodedChunks",
    "read_chunks",
    "reserve",
]

MIN_BYTES = 32 << 20  # enough for the windows of a batch on any sensible tile size
MAX_BYTES = 1 << 30  # a band wider than this is cached in part: reuse along the row remains
MAX_CHUNKS_PER_READ = 64  # Zarr reads touching more chunks than this bypass the cache


class DecodedChunks:
    """A byte-bounded LRU of decoded chunks, safe to use from any thread.

    ``capacity`` only grows (by :meth:`reserve`): a process may segment several images at once
    and each needs its band.
    """

    def __init__(self, capacity: int = MIN_BYTES) -> None:
        self.capacity = capacity
        self.nbytes = 0
        self.hits = 0
        self.decodes = 0  # counted where a decode starts
        self._chunks: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> np.ndarray | None:
        with self._lock:
            chunk = self._chunks.get(key)
            if chunk is None:
                return None
            self._chunks.move_to_end(key)
            self.hits += 1
            return chunk

    def put(self, key: Hashable, chunk: np.ndarray) -> None:
        if chunk.nbytes > self.capacity:
            return
        chunk.flags.writeable = False  # handed out to every later reader of the tile
        with self._lock:
            old = self._chunks.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self._chunks[key] = chunk
            self.nbytes += chunk.nbytes
            self._evict()

    def reserve(self, nbytes: int) -> None:
        """Grow the capacity to ``nbytes``, within [:data:`MIN_BYTES`, :data:`MAX_BYTES`]."""
        with self._lock:
            self.capacity = max(self.capacity, min(int(nbytes), MAX_BYTES))

    def clear(self) -> None:
        with self._lock:
            self._chunks.clear()
            self.nbytes = self.hits = self.decodes = 0

    def _evict(self) -> None:
        while self.nbytes > self.capacity and self._chunks:
            _, chunk = self._chunks.popitem(last=False)
            self.nbytes -= chunk.nbytes


CHUNKS = DecodedChunks()


def reserve(*, window: tuple[int, ...], spatial_shape: tuple[int, ...], bytes_per_pixel: int,
            tile_rows: int) -> None:  # fmt: skip
    """Make room for the band of file tiles that a row of ``window``s reads, so that the next
    row's windows find their upper tiles still there: the rows of tiles a window can touch
    (``tile_rows``: the file's tile height), across the whole width, through every leading
    axis of the window (z)."""
    *lead, rows, _ = window
    touched = (-(-rows // tile_rows) + 1) * tile_rows  # a window rarely starts on a tile row
    band = int(np.prod(lead, dtype=np.int64)) * touched * spatial_shape[-1]
    CHUNKS.reserve(band * bytes_per_pixel)


def _is_chunk(key: str) -> bool:
    """Chunk keys are dot- or slash-separated integers; metadata keys are not."""
    last = key.rsplit("/", 1)[-1]
    return bool(last) and all(part.isdigit() for part in last.split("."))


class CachedStore(WrapperStore[Any]):
    """tifffile's Zarr store, with the decoded chunks of ``namespace`` (the file, its version
    and the level) kept in :data:`CHUNKS`. Two readers that want the same tile at once wait
    for one decode. Failed reads are not kept: they fail again, as they should."""

    def __init__(self, store: Any, *, namespace: Hashable) -> None:
        super().__init__(store)
        self._namespace = namespace

    def _with_store(self, store: Any) -> CachedStore:
        return type(self)(store, namespace=self._namespace)

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        if byte_range is not None or not _is_chunk(key):
            return await self._store.get(key, prototype, byte_range)
        name = (self._namespace, key)
        chunk = CHUNKS.get(name)
        if chunk is None:
            chunk = await _decode_once(name, self._store, key, prototype)
            if chunk is None:
                return None
        return prototype.buffer.from_array_like(chunk)


# Decodes in progress, per event loop (zarr runs every chunk read of a process on one loop).
_pending: dict[tuple[int, Hashable], asyncio.Future] = {}


async def _decode_once(name: Hashable, store: Any, key: str, prototype: Any) -> np.ndarray | None:
    loop = asyncio.get_running_loop()
    slot = (id(loop), name)
    pending = _pending.get(slot)
    if pending is not None:
        return await asyncio.shield(pending)
    _pending[slot] = future = loop.create_future()
    CHUNKS.decodes += 1  # (on the loop's thread only)
    try:
        buffer = await store.get(key, prototype)
        # A fresh array from tifffile's decoder: kept as it is, read-only from now on.
        chunk = None if buffer is None else buffer.as_numpy_array()
    except asyncio.CancelledError:
        future.cancel()
        raise
    except Exception as exc:
        future.set_exception(exc)
        future.exception()  # retrieved: a failure nobody else waited for is not "unhandled"
        raise
    finally:
        del _pending[slot]
    if chunk is not None:
        CHUNKS.put(name, chunk)
    future.set_result(chunk)
    return chunk


# ------------------------------------------------------------------------------ Zarr inputs

_loading: dict[Hashable, threading.Event] = {}
_loading_lock = threading.Lock()


def read_chunks(
    array: Any,
    index: tuple[Any, ...],
    *,
    namespace: Hashable,
    decode: Callable[[tuple[int, ...]], np.ndarray] | None = None,
) -> np.ndarray:
    """``array[index]`` (one slice without step or one int per axis) assembled from whole
    chunks kept in :data:`CHUNKS`: a window of a Zarr input decodes each chunk it touches
    once per run, not once per window. zarr itself keeps no decoded chunks.

    ``decode`` gives the whole chunk (cut at the array's end) at grid coordinates; without it
    a chunk is read as ``array[region]``, and a read of many tiny chunks is left to zarr."""
    grid, shape = tuple(array.chunks), tuple(array.shape)
    spans, keep = [], []
    for sel, n in zip(index, shape, strict=True):
        if isinstance(sel, slice):
            start, stop, _ = sel.indices(n)
            spans.append((start, max(start, stop)))
            keep.append(slice(None))
        else:
            spans.append((int(sel), int(sel) + 1))
            keep.append(0)
    ranges = [range(a // c, (b - 1) // c + 1) for (a, b), c in zip(spans, grid, strict=True)]
    if decode is None and np.prod([len(r) for r in ranges]) > MAX_CHUNKS_PER_READ:
        # Tiny chunks (or tiny inner chunks of shards): one call per chunk would cost more
        # than decoding them again; zarr reads them concurrently.
        return np.asarray(array[index])
    out = np.empty([b - a for a, b in spans], array.dtype)
    if out.size:
        for coords in itertools.product(*ranges):
            chunk = _chunk(array, coords, grid, shape, (namespace, coords), decode)
            dst, src = [], []
            for (a, b), i, c in zip(spans, coords, grid, strict=True):
                lo, hi = max(a, i * c), min(b, (i + 1) * c)
                dst.append(slice(lo - a, hi - a))
                src.append(slice(lo - i * c, hi - i * c))
            out[tuple(dst)] = chunk[tuple(src)]
    return out[tuple(keep)]


def _chunk(
    array: Any,
    coords: tuple[int, ...],
    grid,
    shape,
    name: Hashable,
    decode: Callable[[tuple[int, ...]], np.ndarray] | None = None,
) -> np.ndarray:
    """One whole chunk (cut at the array's end), decoded once however many threads want it."""
    while True:
        chunk = CHUNKS.get(name)
        if chunk is not None:
            return chunk
        with _loading_lock:
            loading = _loading.get(name)
            if loading is None:
                _loading[name] = loading = threading.Event()
                CHUNKS.decodes += 1
                break
        loading.wait()  # then from the cache, or (it failed, or was evicted) decoded here
    try:
        if decode is not None:
            chunk = decode(coords)
        else:
            region = tuple(
                slice(i * c, min((i + 1) * c, n))
                for i, c, n in zip(coords, grid, shape, strict=True)
            )
            chunk = np.asarray(array[region])
        CHUNKS.put(name, chunk)
        return chunk
    finally:
        with _loading_lock:
            del _loading[name]
        loading.set()
