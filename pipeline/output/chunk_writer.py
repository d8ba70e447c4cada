"""Writing whole chunks of the output's Zarr v2 arrays straight to their files, and reading
them back.

Every writer of the output owns chunk-aligned regions and writes each chunk once, so a chunk is
always written whole: nothing of it needs reading first. zarr-python's write path adds a fixed
cost per call on top of that (event-loop round trips, two thread hops, checks), several times
what compressing a 512² label chunk and storing it takes. All of zarr's writes go through its
one event-loop thread, which parallel writer threads (a GPU run's) would queue on.

The bytes are zarr's own, at the same keys: each chunk in the array's dtype and C order, padded
at the array's end with the fill value to the full chunk shape, encoded by the array's
compressor, stored by an atomic rename; a chunk that is all fill value is not stored (a file
already there is removed), as zarr does with ``write_empty_chunks`` off. A test compares the
files with zarr's for random arrays and regions. Arrays this would not write exactly so (zarr
v3, filters, F order, a fill value other than 0, another store) are written by zarr.

Reading is the same in reverse: a region's chunk files decoded by the array's compressor, a
missing file read as the fill value. What follows the tasks (the pyramid's upper levels, the
overview's contrast window) reads whole levels so: through zarr, such a read spends nearly all
of its time waiting on zarr's event-loop thread.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.metadata import ArrayV2Metadata
from zarr.storage import LocalStore

__all__ = ["ChunkWriter", "read", "remove_leftovers", "write"]

PARTIAL = ".partial"  # a chunk file being written: renamed into place when whole
_LEFTOVER = re.compile(r".+\.[0-9a-f]{32}" + re.escape(PARTIAL))  # KEY.UUID.partial


@dataclass(frozen=True)
class ChunkWriter:
    """Writes chunk-aligned regions of one local Zarr v2 array, chunk by chunk."""

    root: Path
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    separator: str
    compressor: Any

    @classmethod
    def of(cls, array: zarr.Array) -> ChunkWriter | None:
        """The writer of ``array``, or None where zarr must write it (see the module)."""
        md = array.metadata
        config = getattr(array._async_array, "config", None)
        if (
            not isinstance(md, ArrayV2Metadata)
            or not isinstance(array.store, LocalStore)
            or md.filters
            or md.order != "C"
            or config is None
            or config.write_empty_chunks
        ):
            return None
        dtype = np.dtype(md.dtype.to_native_dtype())
        fill = md.fill_value
        if dtype.kind not in "biuf" or fill is None or np.asarray(fill).tobytes().strip(b"\0"):
            return None  # a fill value of 0 (its bytes all zero) is what `_is_fill` checks
        root = Path(array.store.root) / array.path
        return cls(root, md.shape, md.chunks, dtype, md.dimension_separator, md.compressor)

    def write(self, region: tuple[slice, ...], data: np.ndarray) -> None:
        """Write ``data`` at ``region``, which starts on chunk boundaries and ends on them or
        at the array's end (a :class:`ValueError` otherwise: that would need the chunk's
        other values)."""
        region = tuple(slice(*s.indices(n)) for s, n in zip(region, self.shape, strict=True))
        for s, c, n in zip(region, self.chunks, self.shape, strict=True):
            if s.step != 1 or s.start % c or (s.stop % c and s.stop != n):
                raise ValueError(f"region {region} is not chunk-aligned in {self.root}")
        data = np.asarray(data)
        if data.shape != tuple(s.stop - s.start for s in region):
            raise ValueError(f"data of shape {data.shape} for region {region} of {self.root}")
        for key, _, at in self._overlaps(region):
            self._write_chunk(key, data[at])

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        """The values in ``region`` (slices without step, any alignment), chunk by chunk."""
        region = tuple(slice(*s.indices(n)) for s, n in zip(region, self.shape, strict=True))
        if any(s.step != 1 for s in region):
            raise ValueError(f"region {region} of {self.root} has a step")
        out = np.zeros([max(s.stop - s.start, 0) for s in region], self.dtype)
        if not out.size:
            return out
        for key, inside, at in self._overlaps(region):
            try:
                encoded = self._path(key).read_bytes()
            except FileNotFoundError:
                continue  # not stored: all fill value, as ``out`` already is
            raw = self.compressor.decode(encoded) if self.compressor else encoded
            out[at] = np.frombuffer(raw, self.dtype).reshape(self.chunks)[inside]
        return out

    def _overlaps(
        self, region: tuple[slice, ...]
    ) -> Iterator[tuple[list[int], tuple[slice, ...], tuple[slice, ...]]]:
        """``(key, inside, at)`` for every chunk a (normalised, non-empty) ``region`` touches:
        its key, the part of it in the region, and where that part lies in the region."""
        grid = [
            range(s.start // c, -(-s.stop // c)) for s, c in zip(region, self.chunks, strict=True)
        ]
        for index in np.ndindex(*(len(g) for g in grid)):
            key = [g[i] for g, i in zip(grid, index, strict=True)]
            inside, at = [], []
            for k, c, s in zip(key, self.chunks, region, strict=True):
                lo, hi = max(k * c, s.start), min((k + 1) * c, s.stop)
                inside.append(slice(lo - k * c, hi - k * c))
                at.append(slice(lo - s.start, hi - s.start))
            yield key, tuple(inside), tuple(at)

    def _path(self, key: list[int]) -> Path:
        return self.root / self.separator.join(map(str, key))

    def _write_chunk(self, key: list[int], block: np.ndarray) -> None:
        if block.shape != self.chunks:  # at the array's end: zarr pads with the fill value
            full = np.zeros(self.chunks, self.dtype)
            full[tuple(slice(0, n) for n in block.shape)] = block
            block = full
        block = np.ascontiguousarray(block, dtype=self.dtype)
        path = self._path(key)
        if _is_fill(block):
            path.unlink(missing_ok=True)
            return
        encoded = self.compressor.encode(block) if self.compressor else block.tobytes()
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{uuid.uuid4().hex}{PARTIAL}")
        try:
            partial.write_bytes(encoded)
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise


def remove_leftovers(root: str | os.PathLike[str]) -> int:
    """Delete the chunk files that writers killed mid-write (SIGKILL, a lost worker) left
    under ``root`` before their rename: their chunks were written again by the tasks that were
    redone. Only while no writer is at work (a run's tasks all done). Returns how many. The
    walk is cheap next to the run, even over the 40 000 chunk files of a 100k² slide's labels."""
    removed = 0
    for folder, _, names in os.walk(root):
        for name in names:
            if name.endswith(PARTIAL) and _LEFTOVER.fullmatch(name):
                Path(folder, name).unlink(missing_ok=True)
                removed += 1
    return removed


def _is_fill(block: np.ndarray) -> bool:
    """Whether a C-contiguous block is all 0, bit for bit (zarr compares floats so: -0.0 is
    stored, a chunk of 0.0 is not)."""
    return not block.view(np.uint8).any()


def write(array: zarr.Array, region: tuple[slice, ...], data: np.ndarray) -> None:
    """``array[region] = data`` for a chunk-aligned ``region``: chunk by chunk where
    :class:`ChunkWriter` can, by zarr otherwise."""
    writer = ChunkWriter.of(array)  # a few attribute checks: not worth a cache to invalidate
    if writer is None:
        array[region] = data
    else:
        writer.write(region, data)


def read(array: zarr.Array, region: tuple[slice, ...]) -> np.ndarray:
    """``array[region]`` (slices without step): from the chunk files where :class:`ChunkWriter`
    writes them, by zarr otherwise."""
    reader = ChunkWriter.of(array)
    return np.asarray(array[region]) if reader is None else reader.read(region)
