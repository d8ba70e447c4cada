"""Images read at a chosen pixel size (``--mpp``) or scale (``--object-size``): a pyramid level
resampled window by window.

:func:`at_scale` (and :func:`at_pixel_size`, its ``--mpp`` form) picks the coarsest pyramid
level whose pixels are at least as fine as the target (the nearest finer level) and presents it
resampled to the target by the rule of :mod:`pipeline.resample`: a :class:`ResampledImage` is a
lazy image like any other (one level, the target pixel size), whose window reads the level's
pixels under the window plus the kernel's support and resamples them. Every pixel of it depends
only on its own position, so the engine's tiles over it equal one whole-image pass over the
whole image resampled at once. Integer images are rounded back to their type (the model sees
what a resampled file would hold).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from pipeline.errors import TilesegError
from pipeline.io.readers import ImageSpec, LazyImage
from pipeline.resample import Resampling, resample_axis

__all__ = ["ResampledImage", "at_pixel_size", "at_scale", "pick_level"]

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
        # an axis kept as it is (a volume's Z) is read as asked, not with the kernel's margin
        spans = [
            (s.start, s.stop) if r.factor == 1 else r.source_span(s.start, s.stop)
            for r, s in zip(rules, region, strict=True)
        ]
        if any(s.stop <= s.start for s in region):
            return np.zeros((self.n_channels, *(s.stop - s.start for s in region)), self.dtype)
        data = self._read_stored(tuple(slice(lo, hi) for lo, hi in spans))
        for axis, (rule, s, (lo, _)) in enumerate(zip(rules, region, spans, strict=True)):
            if rule.factor != 1:
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
    """``image`` at ``mpp`` µm per pixel, and a record of what was done (:func:`at_scale`)."""
    return at_scale(image, mpp=mpp)


def at_scale(
    image: LazyImage, *, mpp: float | None = None, factor: float = 1.0
) -> tuple[LazyImage, dict[str, Any]]:
    """``image`` resampled so that one pixel is ``factor`` pixels of the image at ``mpp`` µm
    per pixel (of the image itself without ``mpp``), and a record of what was done.

    The pixels are read from the coarsest pyramid level at least as fine as the target
    (:func:`pick_level`; by pixel size where the image states one, else by level shape) and
    resampled by the one rule of :mod:`pipeline.resample`. ``--mpp`` and ``--object-size``
    both come here, so a factor given with a pixel size multiplies it. A volume (``ZYX``) is
    resampled in Y and X only, its planes kept: a 2D model segments it plane by plane. The
    record's ``input_factor`` is the result's pixel in pixels of ``image`` (per axis).

    Raises
    ------
    TilesegError
        When ``mpp`` is given and the image does not say its pixel size, or the image is
        neither 2D nor a ``ZYX`` volume.
    """
    what = "--mpp" if mpp is not None else "--object-size"
    if mpp is not None and image.pixel_size is None:
        raise TilesegError(image.path, f"--mpp {mpp}: the image does not say its pixel size")
    if image.spatial_axes not in ("YX", "ZYX"):
        raise TilesegError(image.path, f"{what}: only 2D images and ZYX volumes are resampled")
    keep = (1.0,) * (len(image.spatial_shape) - 2)  # a volume's planes
    levels = _plane_levels(image)
    if image.pixel_size is not None:
        base = image.pixel_size[-2:] if mpp is None else (mpp, mpp)
        target = tuple(b * factor for b in base)
        sizes = [max((lv.pixel_size or image.pixel_size)[-2:]) for lv in levels]
        source = levels[pick_level(sizes, max(target))]
        source_size = source.pixel_size or image.pixel_size
        factors = keep + tuple(t / p for t, p in zip(target, source_size[-2:], strict=True))
        input_factor = keep + tuple(
            t / p for t, p in zip(target, image.pixel_size[-2:], strict=True)
        )
        target = (*source_size[: len(keep)], *target)
    else:
        ratios = [max(_ratios(image, lv)[-2:]) for lv in levels]
        source = levels[pick_level(ratios, factor)]
        factors = keep + tuple(factor / r for r in _ratios(image, source)[-2:])
        target, input_factor = None, (*keep, factor, factor)
    for other in levels:
        if other is not source and other is not image:
            other.close()
    record: dict[str, Any] = {
        "mpp": mpp,
        "level": source.level,
        "level_pixel_size": list(source.pixel_size or ()),
        "factor": list(factors),
        "input_factor": list(input_factor),
        "kernel": "triangle, support max(1, factor) input px, mirrored borders",
    }
    if all(abs(f - 1) <= _SAME for f in factors):
        record["factor"] = [1.0] * len(factors)
        return source, record
    resampled = _resampled(source, factors, target)
    record["shape"] = list(resampled.spatial_shape)
    return resampled, record


def _plane_levels(image: LazyImage) -> list[LazyImage]:
    """The pyramid levels of ``image`` (itself at its own level) that keep its planes: all of
    a 2D image's; a volume's with as many Z planes."""
    levels = [image if k == image.level else image.at_level(k) for k in range(image.n_levels)]
    planes = image.spatial_shape[:-2]
    kept = [lv for lv in levels if lv.spatial_shape[:-2] == planes]
    for other in levels:
        if all(other is not k for k in kept):
            other.close()
    return kept


def _ratios(image: LazyImage, level: LazyImage) -> tuple[float, ...]:
    """How many pixels of ``image`` one pixel of ``level`` spans, per spatial axis."""
    return tuple(n / m for n, m in zip(image.spatial_shape, level.spatial_shape, strict=True))


def _resampled(
    source: LazyImage, factors: tuple[float, ...], pixel_size: tuple[float, ...] | None
) -> LazyImage:
    """``source`` read through the rule: a :class:`ResampledImage` of its one level."""
    rules = [Resampling(f, n) for f, n in zip(factors, source.spatial_shape, strict=True)]
    shape = tuple(r.out_size for r in rules)
    spec = source.spec
    native = list(spec.shape)
    for ax, n in zip(source.spatial_axes, shape, strict=True):
        native[spec.axes.index(ax)] = n
    resampled: ImageSpec = dataclasses.replace(
        spec, shape=tuple(native), level_shapes=(shape,), pixel_size=pixel_size,
        resample=factors, source_shape=source.spatial_shape,
    )  # fmt: skip
    return LazyImage.from_spec(resampled)
