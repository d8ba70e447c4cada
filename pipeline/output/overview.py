"""The overview: a small copy of the input stored as the root image of an output that has no
probabilities, so that napari (or any NGFF reader) opening ``OUTPUT.zarr`` finds an image
with its labels over it, not an empty group.

It is every ``factor``-th pixel of the input along each spatial axis (``ngff.overview_factor``:
at most ~4 Mpx per channel; small images are copied whole), in the input's dtype, with
``factor`` times the input's pixel size, so it lies exactly under the labels in a viewer. It is
read from the coarsest input pyramid level that is still as fine as the overview (an SVS or
pyramidal OME-TIFF gives it for a few tiles); an input without a pyramid is read once more,
subsampled, by tasks that each own chunks of the overview.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import zarr

from pipeline.io.readers import ImageSpec, LazyImage, cached_image
from pipeline.output import chunk_writer
from pipeline.output.ngff import OutputLayout, level_regions, open_array, set_overview_display
from pipeline.preprocess.normalize import percentiles_of

__all__ = [
    "OverviewSource",
    "finish_overview",
    "overview_regions",
    "overview_source",
    "read_overview",
    "write_overview_block",
]

READ_PIXELS = 1 << 22  # per read of the source level: bounded memory, whatever the factor


@dataclass(frozen=True)
class OverviewSource:
    """Where an overview is read from: one pyramid level of the input and its shape against the
    image that was segmented (the overview's pixel ``i`` is the level's ``i * factor / d``)."""

    image: ImageSpec  # the input at ``level``
    level: int
    level_shape: tuple[int, ...]
    image_shape: tuple[int, ...]  # the segmented image's spatial shape
    factor: int

    def indices(self, axis: int, start: int, stop: int) -> np.ndarray:
        """Source-level indices of overview pixels ``start:stop`` along spatial ``axis``."""
        n, n0 = self.level_shape[axis], self.image_shape[axis]
        i = np.arange(start, stop, dtype=np.int64)
        return np.minimum(i * self.factor * n // n0, n - 1)


def overview_source(image: LazyImage, *, factor: int) -> OverviewSource:
    """The coarsest pyramid level of ``image`` (the level it was opened at, or a coarser one)
    whose pixels are at most ``factor`` of the image's own along every axis (1 % slack:
    scanners round their level sizes)."""
    shape0 = image.spatial_shape
    level = image.level
    for k in range(image.level, image.n_levels):
        shape = image.level_shapes[k]
        if all(n0 <= 1.01 * factor * n for n0, n in zip(shape0, shape, strict=True)):
            level = k
    if level == image.level:
        return OverviewSource(image.spec, level, shape0, shape0, factor)
    with image.at_level(level) as source:  # its spec, for the tasks: they open it themselves
        return OverviewSource(source.spec, level, source.spatial_shape, shape0, factor)


def overview_regions(layout: OutputLayout) -> list[tuple[slice, ...]]:
    """Chunk-aligned regions of the overview (spatial axes), one task each."""
    shape, chunks = layout.overview_shape[1:], layout.overview_chunks[1:]
    spatial = OutputLayout(spatial_shape=shape, chunks=chunks, classes=0, label_dtype="|u1")
    return level_regions(spatial, 0, chunks_per_region=2)


def read_overview(source: OverviewSource, region: Sequence[slice]) -> np.ndarray:
    """The overview's (C, *region) pixels, read in blocks of at most ``READ_PIXELS`` source
    pixels per channel."""
    image = cached_image(source.image)
    index = [source.indices(a, s.start, s.stop) for a, s in enumerate(region)]
    # Split each axis into runs of overview pixels whose source span is at most `side`.
    side = max(1, int(READ_PIXELS ** (1 / len(index))))
    runs = [_runs(ix, side) for ix in index]
    out = np.empty((image.n_channels, *(len(ix) for ix in index)), image.dtype)
    for block in np.ndindex(*(len(r) for r in runs)):
        picks = [runs[a][b] for a, b in enumerate(block)]
        sources = [ix[p] for ix, p in zip(index, picks, strict=True)]
        box = tuple(slice(int(ix[0]), int(ix[-1]) + 1) for ix in sources)
        data = image.read(box)
        local = np.ix_(*(ix - s.start for ix, s in zip(sources, box, strict=True)))
        out[(slice(None), *picks)] = data[(slice(None), *local)]
    return out


def _runs(index: np.ndarray, side: int) -> list[slice]:
    runs, start = [], 0
    for j in range(1, len(index) + 1):
        if j == len(index) or index[j] - index[start] >= side:
            runs.append(slice(start, j))
            start = j
    return runs


def write_overview_block(output: str, source: OverviewSource, region: tuple[slice, ...]) -> None:
    """Read and write one chunk-aligned region of the overview."""
    chunk_writer.write(
        open_array(output, "0"), (slice(None), *region), read_overview(source, region)
    )


def finish_overview(path: str | os.PathLike[str], *, rgb: bool) -> None:
    """The overview's upper levels and contrast windows for viewers, from the written level 0
    (a few megapixels): level ``k`` is every ``2**k``-th pixel in y and x of level 0, as the
    label levels are; windows are an RGB image's colours as they are, else 1-99.8 % per
    channel (the normalisation's default)."""
    array = open_array(path, "0")
    data = chunk_writer.read(array, tuple(slice(0, n) for n in array.shape))
    _write_upper_levels(path, data)
    windows = []
    for channel in data:
        if rgb and data.dtype.kind == "u":
            lo, hi = 0.0, float(np.iinfo(data.dtype).max)
        else:
            values = channel[np.isfinite(channel)] if data.dtype.kind == "f" else channel
            lo, hi = 0.0, 1.0  # nothing finite (all NaN): any window is as good
            if values.size:
                lo, hi = (float(v) for v in percentiles_of(values, (1, 99.8)))
        windows.append((lo, hi if hi > lo else lo + 1.0))
    set_overview_display(path, windows, rgb=rgb)


def _write_upper_levels(path: str | os.PathLike[str], data: np.ndarray) -> None:
    """Levels 1+ of the overview, those its multiscales lists (an output begun by a version
    with a one-level overview has none)."""
    root = zarr.open_group(path, mode="r", zarr_format=2)
    datasets = root.attrs.get("multiscales", [{}])[0].get("datasets", [])
    for level, dataset in enumerate(datasets[1:], start=1):
        step = 2**level
        array = open_array(path, dataset["path"])
        chunk_writer.write(
            array, tuple(slice(0, n) for n in array.shape), data[..., ::step, ::step]
        )
