"""Images read at a chosen pixel size (``--mpp``): a pyramid level resampled window by window.

:func:`at_pixel_size` picks the coarsest pyramid level whose pixels are at least as fine as the
target (the nearest finer level) and presents it resampled to the target by the rule of
:mod:`pipeline.resample`: a :class:`ResampledImage` is a lazy image like any other (one
level,
the target pixel size), whose window reads the level's pixels under the window plus the
kernel's support and resamples them. Every pixel of it depends only on its own position, so the
engine's tiles over it equal one whole-image pass over the whole image resampled at once.
Integer images are rounded back to their type (the model sees what a resampled file would hold).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from pipeline.errors import TilesegError
from pipeline.io.readers import ImageSpec, LazyImage
from pipeline.resample import Resampling, resample_axis

__all__ = ["ResampledImage", "at_pixel_size", "pick_level"]

# A level this close to the target is used as it is: scanners round their MPP, and resampling
# by 1.001 would only blur.
_SAME = 1e-3


class ResampledImage(LazyImage):
    """One level of an image at another pixel size; made by :func:`at_pixel_size`."""

    @property
    def level(self) -> int:
        return 0  # its only level: the stored level it reads is ``spec.level``

    def at_level(self, level: int) -> LazyImage:
        if level != 0:
            raise ValueError(f"a resampled image has one level, not level {level}")
        return self

    @property
    def rules(self) -> tuple[Resampling, ...]:
        spec = self.spec
        assert spec.resample is not None
        return tuple(
            Resampling(f, n) for f, n in zip(spec.resample, spec.source_shape, strict=True)
        )

    @property
    def chunk_shape(self) -> tuple[int, ...] | None:
        stored = super().chunk_shape
        if stored is None:
            return None
        return tuple(
            max(1, math.ceil(c / r.factor)) for c, r in zip(stored, self.rules, strict=True)
        )

    def read(self, spatial_region: tuple[slice, ...]) -> np.ndarray:
        """The window at the target pixel size, in the image's dtype (see :class:`LazyImage`)."""
        region = self._check_region(spatial_region)
        rules = self.rules
        spans = [r.source_span(s.start, s.stop) for r, s in zip(rules, region, strict=True)]
        if any(s.stop <= s.start for s in region):
            return np.zeros((self.n_channels, *(s.stop - s.start for s in region)), self.dtype)
        data = self._read_stored(tuple(slice(lo, hi) for lo, hi in spans))
        for axis, (rule, s, (lo, _)) in enumerate(zip(rules, region, spans, strict=True)):
            data = resample_axis(data, axis + 1, rule, s.start, s.stop, offset=lo)
        if self.dtype.kind in "ui":
            info = np.iinfo(self.dtype)
            data = np.clip(np.rint(data), info.min, info.max)
        return np.ascontiguousarray(data, dtype=self.dtype)


def pick_level(level_sizes: list[float], target: float) -> int:
    """The coarsest level whose pixel size is at most ``target`` (within :data:`_SAME`), or
    level 0 when even that is coarser (the target is then reached by enlarging)."""
    finer = [k for k, size in enumerate(level_sizes) if size <= target * (1 + _SAME)]
    return max(finer, key=lambda k: level_sizes[k]) if finer else 0


def at_pixel_size(image: LazyImage, mpp: float) -> tuple[LazyImage, dict[str, Any]]:
    """``image`` at ``mpp`` µm per pixel, and a record of what was done.

    Raises
    ------
    TilesegError
        When the image does not say its pixel size, or is not 2D.
    """
    if image.pixel_size is None:
        raise TilesegError(image.path, f"--mpp {mpp}: the image does not say its pixel size")
    if image.spatial_axes != "YX":
        raise TilesegError(image.path, "--mpp: only 2D images are resampled")
    levels = [image if k == image.level else image.at_level(k) for k in range(image.n_levels)]
    sizes = [max(lv.pixel_size or image.pixel_size) for lv in levels]
    source = levels[pick_level(sizes, mpp)]
    for other in levels:
        if other is not source and other is not image:
            other.close()
    factors = tuple(mpp / p for p in source.pixel_size or image.pixel_size)
    record: dict[str, Any] = {
        "mpp": mpp,
        "level": source.level,
        "level_pixel_size": list(source.pixel_size or ()),
        "factor": list(factors),
        "kernel": "triangle, support max(1, factor) input px, mirrored borders",
    }
    if all(abs(f - 1) <= _SAME for f in factors):
        record["factor"] = [1.0, 1.0]
        return source, record
    rules = [Resampling(f, n) for f, n in zip(factors, source.spatial_shape, strict=True)]
    shape = tuple(r.out_size for r in rules)
    spec = source.spec
    native = list(spec.shape)
    for ax, n in zip("YX", shape, strict=True):
        native[spec.axes.index(ax)] = n
    resampled: ImageSpec = dataclasses.replace(
        spec, shape=tuple(native), level_shapes=(shape,), pixel_size=(mpp, mpp),
        resample=factors, source_shape=source.spatial_shape,
    )  # fmt: skip
    record["shape"] = list(shape)
    return LazyImage.from_spec(resampled), record
