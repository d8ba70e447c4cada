"""The tiles of a TIFF page read straight from the file, each decoded once, in the caller's thread.

tifffile's Zarr store reads a window through zarr-python, whose every read waits on zarr's
one event-loop thread even when the window's tiles are all decoded already: a cap on the
windows per second whatever the number of reader threads (what a GPU waits on). A level that
is one tiled (or stripped) page, as SVS, NDPI and most OME-TIFF pyramids are, needs none of it:
a window is the page's tiles that it touches,
read with ``os.pread`` (no shared file position, no lock) and decoded by the page's own decoder
(as tifffile's store does it: the same function, arguments and bytes), which releases the GIL.
The decoded tiles go into :data:`pipeline.io.chunk_cache.CHUNKS` like every other reader's.

Levels of several pages (a Z stack or channels stored page by page) go through the Zarr store.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Hashable
from typing import Any

import numpy as np

from pipeline.io.chunk_cache import read_chunks

__all__ = ["TiffTiles"]


class TiffTiles:
    """An array-like over the tiles of one TIFF page: ``shape``, ``dtype``, ``chunks`` (the
    tile, with a leading 1 per plane when the samples are stored plane by plane) and
    ``tiles[index]`` for an index of slices without step or ints. Missing tiles (offset or
    byte count 0, or past the end of the offset table) read as 0, as in tifffile's store."""

    def __init__(self, path: str, page: Any, *, namespace: Hashable) -> None:
        self.shape = tuple(int(n) for n in page.shape)
        self.chunks = _tile_shape(page)
        self.chunked = tuple(int(n) for n in page.chunked)
        self.dtype = np.dtype(page.dtype)
        self.namespace = namespace
        self._offsets = np.asarray(page.dataoffsets, np.int64)
        self._counts = np.asarray(page.databytecounts, np.int64)
        self._decode = page.decode  # built once here: tifffile builds it on first use
        self._decode_args: dict[str, Any] = {"_fullsize": True}
        if page.jpegtables is not None:
            self._decode_args["jpegtables"] = page.jpegtables
        if page.keyframe.jpegheader is not None:
            self._decode_args["jpegheader"] = page.keyframe.jpegheader
        self._fd: int | None = os.open(path, os.O_RDONLY)
        # Closed by close() or, at the latest, when the tiles are garbage-collected.
        self._closer = weakref.finalize(self, os.close, self._fd)

    @classmethod
    def of(cls, path: str, level: Any, *, namespace: Hashable) -> TiffTiles | None:
        """The tiles of ``level`` (a tifffile series level) when it is one page read so
        exactly as tifffile's store reads it, else ``None``."""
        pages = level.pages
        if len(pages) != 1 or pages[0] is None or getattr(level, "transform", None) is not None:
            return None
        page = pages[0]
        shape, chunked = tuple(page.shape), tuple(page.chunked)
        if tuple(level.shape) != shape or page.dtype is None or len(chunked) != len(shape):
            return None
        if len(page.chunks) > len(shape):
            return None
        tile = _tile_shape(page)
        if any(math.ceil(n / c) != k for n, c, k in zip(shape, tile, chunked, strict=True)):
            return None  # not a plain grid of tiles over the page
        return cls(path, page, namespace=namespace)

    def close(self) -> None:
        self._fd = None
        self._closer()

    def __getitem__(self, index: tuple[Any, ...]) -> np.ndarray:
        return read_chunks(self, index, namespace=self.namespace, decode=self.tile)

    def tile(self, coords: tuple[int, ...]) -> np.ndarray:
        """The tile at grid position ``coords``, cut at the page's end."""
        cut = tuple(
            slice(0, min(c, n - i * c))
            for i, c, n in zip(coords, self.chunks, self.shape, strict=True)
        )
        k = int(np.ravel_multi_index(coords, self.chunked))
        if k >= len(self._offsets) or not self._offsets[k] or not self._counts[k]:
            return np.zeros([s.stop for s in cut], self.dtype)
        if self._fd is None:
            raise ValueError("read from a closed TIFF")
        count = int(self._counts[k])
        data = os.pread(self._fd, count, int(self._offsets[k]))
        if len(data) != count:
            raise OSError(f"short read: tile {k} has {count} bytes, read {len(data)}")
        decoded = self._decode(data, k, **self._decode_args)[0]
        if decoded is None or decoded.size != math.prod(self.chunks):
            raise ValueError(f"tile {k} decoded to {getattr(decoded, 'shape', None)}")
        tile = decoded.reshape(self.chunks)
        # An edge tile is cut to a copy: the cache counts (and keeps) only what it holds.
        whole = all(s.stop == c for s, c in zip(cut, self.chunks, strict=True))
        return tile if whole else tile[cut].copy()


def _tile_shape(page: Any) -> tuple[int, ...]:
    """The page's tile along each axis of its shape: samples stored plane by plane are left
    out of the page's chunks, and have 1 here."""
    chunks = tuple(int(n) for n in page.chunks)
    return (1,) * (len(page.shape) - len(chunks)) + chunks
