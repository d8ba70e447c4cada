"""Intensity normalisation, decided once per image and applied identically to every tile.

Per-tile statistics would make a pixel's value depend on which tile it was read in, and tiled
inference would no longer match a whole-image pass; so every mode reduces to a fixed
per-channel ``x * scale + offset`` computed before any tile runs.

Non-finite pixels (NaN, ±Inf) of a float image follow one rule: statistics are computed over
the finite pixels only, and a pixel whose normalised value is not finite becomes 0 (the low
percentile: background, for the default normalisation). Every tile applies the same rule, so
tiles stay exact; the segmentation counts such pixels and warns about them.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pipeline.io.readers import LazyImage
    from pipeline.preprocess.stain import StainMap, StainNormalizer

__all__ = [
    "MODES",
    "SAMPLE_PIXELS",
    "SAMPLE_WINDOW",
    "Normalization",
    "compute_normalization",
    "count_nonfinite",
    "finite_percentiles",
    "percentiles_of",
    "sample_pixels",
]

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
    # RGB to haematoxylin, or to reference stains, first (pipeline/preprocess/stain.py)
    stain: StainMap | StainNormalizer | None = None

    def channels(self, image_channels: int) -> int:
        """Channels of the normalised array for an image of ``image_channels``."""
        return image_channels if self.stain is None else self.stain.channels

    def apply(self, x: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
        """Normalise a (C, *spatial) array, returning float32 (written into ``out`` when given,
        e.g. a slot of a pinned batch, with the same arithmetic)."""
        if self.stain is not None:
            x = self.stain.apply(x)
        if out is None:
            out = x.astype(np.float32, copy=True)
        else:
            out[...] = x
        if self.mode != "none":
            shape = (-1,) + (1,) * (x.ndim - 1)
            out *= np.asarray(self.scale, np.float32).reshape(shape)
            out += np.asarray(self.offset, np.float32).reshape(shape)
        if x.dtype.kind == "f":  # integers stay finite under a finite scale and offset
            np.copyto(out, 0.0, where=~np.isfinite(out))
        return out

    def to_dict(self) -> dict[str, object]:
        data: dict[str, object] = {
            "mode": self.mode,
            "scale": list(self.scale),
            "offset": list(self.offset),
            "source": self.source,
        }
        if self.stain is not None:
            data["stain"] = self.stain.to_dict()
        return data


def compute_normalization(
    image: LazyImage,
    *,
    mode: str,
    percentiles: tuple[float, float] = (1.0, 99.8),
    scale: float | None = None,
    offset: float | None = None,
    stain: StainMap | StainNormalizer | None = None,
) -> Normalization:
    """Decide the normalisation of one image.

    ``none`` casts to float32; ``fixed`` uses ``scale``/``offset``; ``percentile`` maps the
    per-channel low/high percentiles to 0/1, estimated from a bounded sample of the image.
    With ``stain`` the image is first mapped to its haematoxylin channel (or normalised to the
    reference stains), and the percentiles are those of the mapped channels.
    """
    if mode not in MODES:
        raise ValueError(f"normalize must be one of {MODES}, not {mode!r}")
    c = image.n_channels if stain is None else stain.channels
    if mode == "none":
        return Normalization((1.0,) * c, (0.0,) * c, "none", stain=stain)
    if mode == "fixed":
        if scale is None:
            raise ValueError("fixed normalisation needs a scale")
        return Normalization((float(scale),) * c, (float(offset or 0.0),) * c, "fixed", stain=stain)
    sample, source = sample_pixels(image)
    if stain is not None:
        what = "haematoxylin" if stain.channels == 1 else "stain-normalised"
        sample, source = stain.apply(sample), f"{source}, {what} ({stain.method})"
    lo_p, hi_p = percentiles
    lo, hi = finite_percentiles(sample.reshape(c, -1), (lo_p, hi_p))
    span = np.where(hi - lo > 0, hi - lo, 1.0)  # a flat channel maps to 0, not to inf
    return Normalization(
        tuple(float(s) for s in 1.0 / span),
        tuple(float(o) for o in -lo / span),
        "percentile",
        f"{source}; percentiles {lo_p}-{hi_p}: low {lo.tolist()}, high {hi.tolist()}",
        stain=stain,
    )


def percentiles_of(
    values: np.ndarray, q: tuple[float, ...], *, axis: int | None = None
) -> np.ndarray:
    """``np.percentile(values.astype(np.float64), q, axis=axis)``, bit for bit, in a fraction
    of the time for unsigned integers: numpy interpolates their order statistics in float64
    all the same (``b - a`` of two sorted values cannot wrap), so they are partitioned as
    they are instead of as a float64 copy, and 8- and 16-bit ones are counted instead of
    partitioned. Other dtypes go through float64, as before (signed integers' ``b - a`` could
    wrap, float32 would interpolate in float32)."""
    values = np.asarray(values)
    if values.dtype.kind == "u" and values.dtype.itemsize <= 2 and values.size:
        return _counted_percentiles(values, q, axis=axis)
    if values.dtype.kind != "u":
        values = values.astype(np.float64)
    return np.percentile(values, q, axis=axis)


def _counted_percentiles(
    values: np.ndarray, q: tuple[float, ...], *, axis: int | None
) -> np.ndarray:
    """``np.percentile`` of 8- and 16-bit unsigned integers, bit for bit, from each row's
    counts of values (one pass, no partition): the order statistics either side of each
    percentile's position, interpolated with numpy's own arithmetic (its ``_lerp``)."""
    rows = values.reshape(1, -1) if axis is None else np.moveaxis(values, axis, -1)
    lead = rows.shape[:-1]
    rows = rows.reshape(-1, rows.shape[-1])
    n = rows.shape[-1]
    virtual = (n - 1) * np.true_divide(np.asarray(q, dtype=np.float64), 100)
    before = np.floor(virtual)
    gamma = virtual - before
    # numpy's: at or past the last position both neighbours are the largest value
    last = virtual >= n - 1
    below = np.where(last, n - 1, before).astype(np.intp)
    above = np.where(last, n - 1, before + 1).astype(np.intp)
    out = np.empty((len(virtual), len(rows)), np.float64)
    for k, row in enumerate(rows):
        ranks = np.cumsum(np.bincount(row))
        a = np.searchsorted(ranks, below, side="right").astype(values.dtype)
        b = np.searchsorted(ranks, above, side="right").astype(values.dtype)
        diff = b - a
        lerp = np.add(a, diff * gamma)
        np.subtract(b, diff * (1 - gamma), out=lerp, where=gamma >= 0.5, casting="unsafe")
        out[:, k] = lerp
    return out.reshape(len(virtual)) if axis is None else out.reshape(len(virtual), *lead)


def finite_percentiles(values: np.ndarray, q: tuple[float, float]) -> np.ndarray:
    """Per-row percentiles of a (C, N) array over its finite values only, as (2, C); a row
    without any finite value gets 0 and 1."""
    if values.dtype.kind != "f":
        return percentiles_of(values, q, axis=1)
    rows = []
    for row in values:
        finite = row[np.isfinite(row)]
        rows.append(percentiles_of(finite, q) if finite.size else np.array([0.0, 1.0]))
    return np.stack(rows, axis=1)


def count_nonfinite(x: np.ndarray) -> int:
    """How many values of ``x`` are NaN or infinite (0 for integer arrays, without a pass)."""
    return int(x.size - np.count_nonzero(np.isfinite(x))) if x.dtype.kind == "f" else 0


def sample_pixels(image: LazyImage) -> tuple[np.ndarray, str]:
    """A bounded set of pixels representative of the whole image, as (C, N), read-only.

    The sample of the image last sampled is kept (one, as long as that image object lives):
    a run's brightfield check, stain fit, normalisation and object-size check take the same
    one, read once. An image opened again is sampled again."""
    global _last_sample
    with _sample_lock:
        if _last_sample is not None and _last_sample[0]() is image:
            return _last_sample[1], _last_sample[2]
    sample, source = _read_sample(image)
    sample.setflags(write=False)
    with _sample_lock:
        _last_sample = (weakref.ref(image), sample, source)
    return sample, source


_last_sample: tuple[weakref.ref[LazyImage], np.ndarray, str] | None = None
_sample_lock = threading.Lock()


def _read_sample(image: LazyImage) -> tuple[np.ndarray, str]:
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
