"""Intensity normalisation, decided once per image and applied identically to every tile.

Per-tile statistics would make a pixel's value depend on which tile it was read in, and tiled
inference would no longer match a whole-image pass; so every mode reduces to a fixed
per-channel ``x * scale + offset`` computed before any tile runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pipeline.readers import LazyImage

MODES = ("none", "percentile", "fixed")
# Percentiles are estimated from at most this many pixels per channel: a low-resolution pyramid
# level when the image has one, else a grid of windows spread over the image.
SAMPLE_PIXELS = 1 << 22
SAMPLE_WINDOW = 256


@dataclass(frozen=True)
class Normalization:
    """Per-channel affine map applied to raw pixel values (as float32)."""

    scale: tuple[float, ...]
    offset: tuple[float, ...]
    mode: str = "none"
    source: str = ""

    def apply(self, x: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
        """Normalise a (C, *spatial) array, returning float32 (written into ``out`` when given,
        e.g. a slot of a pinned batch, with the same arithmetic)."""
        if out is None:
            out = x.astype(np.float32, copy=True)
        else:
            out[...] = x
        if self.mode == "none":
            return out
        shape = (-1,) + (1,) * (x.ndim - 1)
        out *= np.asarray(self.scale, np.float32).reshape(shape)
        out += np.asarray(self.offset, np.float32).reshape(shape)
        return out

    def to_dict(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "scale": list(self.scale),
            "offset": list(self.offset),
            "source": self.source,
        }


def compute_normalization(
    image: LazyImage,
    *,
    mode: str,
    percentiles: tuple[float, float] = (1.0, 99.8),
    scale: float | None = None,
    offset: float | None = None,
) -> Normalization:
    """Decide the normalisation of one image.

    ``none`` casts to float32; ``fixed`` uses ``scale``/``offset``; ``percentile`` maps the
    per-channel low/high percentiles to 0/1, estimated from a bounded sample of the image.
    """
    if mode not in MODES:
        raise ValueError(f"normalize must be one of {MODES}, not {mode!r}")
    c = image.n_channels
    if mode == "none":
        return Normalization((1.0,) * c, (0.0,) * c, "none")
    if mode == "fixed":
        if scale is None:
            raise ValueError("fixed normalisation needs a scale")
        return Normalization((float(scale),) * c, (float(offset or 0.0),) * c, "fixed")
    sample, source = _sample(image)
    lo_p, hi_p = percentiles
    lo, hi = percentiles_of(sample.reshape(c, -1), (lo_p, hi_p), axis=1)
    span = np.where(hi - lo > 0, hi - lo, 1.0)  # a flat channel maps to 0, not to inf
    return Normalization(
        tuple(float(s) for s in 1.0 / span),
        tuple(float(o) for o in -lo / span),
        "percentile",
        f"{source}; percentiles {lo_p}-{hi_p}: low {lo.tolist()}, high {hi.tolist()}",
    )


def percentiles_of(
    values: np.ndarray, q: tuple[float, ...], *, axis: int | None = None
) -> np.ndarray:
    """``np.percentile(values.astype(np.float64), q, axis=axis)``, bit for bit, in a third of
    the time for unsigned integers: numpy interpolates their order statistics in float64 all
    the same (``b - a`` of two sorted values cannot wrap), and partitions them as they are
    instead of as a float64 copy. Other dtypes go through float64, as before (signed integers'
    ``b - a`` could wrap, float32 would interpolate in float32)."""
    values = np.asarray(values)
    if values.dtype.kind != "u":
        values = values.astype(np.float64)
    return np.percentile(values, q, axis=axis)


def sample_pixels(image: LazyImage) -> tuple[np.ndarray, str]:
    """(C, N) pixels representative of the whole image, and where they came from: what every
    per-image statistic is computed from."""
    return _sample(image)


def _sample(image: LazyImage) -> tuple[np.ndarray, str]:
    """A bounded set of pixels representative of the whole image, as (C, N)."""
    for level in range(image.n_levels):
        lazy = image.at_level(level) if level != image.level else image
        if math.prod(lazy.spatial_shape) <= SAMPLE_PIXELS:
            full = lazy.read(tuple(slice(0, n) for n in lazy.spatial_shape))
            return full.reshape(full.shape[0], -1), f"pyramid level {level}"
    shape = image.spatial_shape
    windows_per_axis = [
        max(1, min(8, n // SAMPLE_WINDOW)) if i >= len(shape) - 2 else min(4, n)
        for i, n in enumerate(shape)
    ]
    blocks = []
    for index in np.ndindex(*windows_per_axis):
        region = []
        for i, k, n in zip(index, windows_per_axis, shape, strict=True):
            w = min(n, SAMPLE_WINDOW) if len(region) >= len(shape) - 2 else 1
            start = round((i + 0.5) * n / k - w / 2)
            start = min(max(start, 0), n - w)
            region.append(slice(start, start + w))
        block = image.read(tuple(region))
        blocks.append(block.reshape(block.shape[0], -1))
    return np.concatenate(blocks, axis=1), f"{len(blocks)} sampled windows"
