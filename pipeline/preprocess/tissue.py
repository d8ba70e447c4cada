"""A low-resolution tissue (foreground) mask, so output chunks without tissue can be skipped.

:func:`tissue_mask` reads a small version of the image — a pyramid level of at most ``max_side``
px per side when the file has one, else the image itself mean-pooled tile by tile (memory stays
bounded) — turns it into a one-channel "tissue-ness" feature and thresholds it (Otsu by default):

- brightfield / H&E (RGB uint8; ``kind="auto"`` detects it): the colour saturation, since the
  empty glass is bright and grey-white whatever the illumination, and stained tissue is coloured;
- fluorescence (anything else): per channel, the log of the intensity above the background
  (1st percentile), scaled to 0..1, the maximum over channels (tissue autofluorescence and nuclei
  are brighter than the empty background; the log keeps bright nuclei from dominating).

Safety first, since a skipped chunk is written as background: a feature that is not clearly
two-class (Otsu's between-class share of the variance below ``min_separation``, e.g. a slide
that is all tissue) gives an all-tissue mask; :meth:`TissueMask.covers` keeps a margin of one
mask pixel; specks smaller than ``min_fraction`` of the slide are dropped (dust, debris).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import ndimage

from pipeline.io.readers import LazyImage

__all__ = ["TissueMask", "tissue_mask"]


@dataclass(frozen=True)
class TissueMask:
    """A 2D (y, x) tissue mask at low resolution over an image of ``image_shape`` pixels.

    Small (bit-packed) and picklable; in 3D the same (y, x) mask holds for every z.
    """

    image_shape: tuple[int, ...]  # spatial shape ([z,] y, x) of the image it describes
    shape: tuple[int, int]  # mask shape (y, x)
    bits: bytes  # np.packbits of the mask, row-major
    fraction: float  # share of the image covered by tissue
    method: str  # "otsu", "triangle", "fixed" or "none"
    kind: str  # "brightfield", "fluorescence" or "none"
    threshold: float | None = None
    level: int | None = None  # pyramid level read (then mean-pooled to at most max_side)
    note: str = ""  # why the mask is all tissue, when it is so by caution

    @classmethod
    def everywhere(cls, image_shape: tuple[int, ...], *, note: str = "") -> TissueMask:
        """The mask that skips nothing (masking off)."""
        return cls(tuple(image_shape), (1, 1), np.packbits([True]).tobytes(), 1.0, "none",
                   "none", note=note)  # fmt: skip

    @property
    def mask(self) -> np.ndarray:
        return _unpack(self.bits, self.shape)

    def covers(self, region: tuple[slice, ...], *, margin: int = 0) -> bool:
        """True when any tissue pixel of the mask, grown by one mask pixel and by ``margin``
        image pixels, falls in ``region`` (slices in the image's pixels, ``([z,] y, x)``; the z
        slice is ignored)."""
        mask = self.mask
        index = []
        for s, n, m in zip(region[-2:], self.image_shape[-2:], self.shape, strict=True):
            start = 0 if s.start is None else s.start
            stop = n if s.stop is None else s.stop
            if stop <= start:
                return False
            start, stop = max(0, start - margin), min(n, stop + margin)
            scale = n / m
            index.append(
                slice(max(0, math.floor(start / scale) - 1), min(m, math.ceil(stop / scale) + 1))
            )
        return bool(mask[tuple(index)].any())

    def to_dict(self) -> dict[str, Any]:
        """For the provenance record (without the mask itself)."""
        out = {k: v for k, v in self.__dict__.items() if k != "bits"}
        out["image_shape"] = list(self.image_shape)
        out["shape"] = list(self.shape)
        return out


@lru_cache(maxsize=8)
def _unpack(bits: bytes, shape: tuple[int, int]) -> np.ndarray:
    count = shape[0] * shape[1]
    mask = np.unpackbits(np.frombuffer(bits, np.uint8), count=count).astype(bool)
    mask = mask.reshape(shape)
    mask.flags.writeable = False
    return mask


def tissue_mask(
    image: LazyImage,
    *,
    method: str = "otsu",
    kind: str = "auto",
    level: int | None = None,
    threshold: float | None = None,
    max_side: int = 1024,
    min_fraction: float = 1e-4,
    min_separation: float = 0.75,
    smooth: float = 1.0,
) -> TissueMask:
    """Compute the tissue mask of ``image`` (at the level it was opened at).

    Parameters
    ----------
    method
        ``"otsu"``, ``"triangle"``, ``"fixed"`` (use ``threshold``, on the 0..1 feature) or
        ``"none"`` (all tissue: masking off).
    kind
        ``"auto"`` (RGB uint8 is brightfield, anything else fluorescence), ``"brightfield"``
        or ``"fluorescence"``.
    level
        Pyramid level to read (>= the image's level); default: the finest level with at most
        ``max_side`` px per side, else the image itself, mean-pooled down to ``max_side``.
    min_fraction
        Tissue pieces smaller than this share of the slide are dropped.
    min_separation
        Below this Otsu separability (between-class / total variance, measured after smoothing
        by 1/64 of the mask side) the feature is not two-class and the whole image counts as
        tissue. Heuristic: on the synthetic slides tissue/glass gives 0.83-0.89, all-tissue
        0.57-0.66.
    smooth
        Gaussian sigma (mask pixels) applied to the feature before thresholding.
    """
    if method not in ("otsu", "triangle", "fixed", "none"):
        raise ValueError(f"method must be otsu, triangle, fixed or none, not {method!r}")
    if method == "none":
        return TissueMask.everywhere(image.spatial_shape)
    if method == "fixed" and threshold is None:
        raise ValueError("method 'fixed' needs a threshold")
    if kind == "auto":
        rgb = image.n_channels == 3 and image.dtype == np.uint8
        kind = "brightfield" if rgb else "fluorescence"
    if kind not in ("brightfield", "fluorescence"):
        raise ValueError(f"kind must be auto, brightfield or fluorescence, not {kind!r}")
    small, used = _small_image(image, level=level, max_side=max_side)
    feature = _feature(small, kind)
    if smooth > 0:
        feature = ndimage.gaussian_filter(feature, smooth, mode="nearest")
    shape = (int(feature.shape[0]), int(feature.shape[1]))
    if method == "fixed":
        t = float(threshold)  # type: ignore[arg-type]
    else:
        t, _ = _threshold(feature, method)
        # Separability is judged at a fixed relative scale (1/64 of the mask side), so that it
        # does not depend on how many pixels the mask has: nuclear texture at fine masks would
        # otherwise lower it.
        coarse = ndimage.gaussian_filter(feature, max(shape) / 64, mode="nearest")
        separation = _threshold(coarse, "otsu")[1]
        if separation < min_separation:
            note = f"feature not two-class (separation {separation:.2f} < {min_separation})"
            return TissueMask.everywhere(image.spatial_shape, note=note)
    mask = feature > t
    labels, n = ndimage.label(mask)
    if n:
        sizes = np.bincount(labels.ravel())
        keep = sizes >= max(1.0, min_fraction * mask.size)
        keep[0] = False
        mask = keep[labels]
    return TissueMask(
        image_shape=tuple(image.spatial_shape),
        shape=shape,
        bits=np.packbits(mask.ravel()).tobytes(),
        fraction=float(mask.mean()),
        method=method,
        kind=kind,
        threshold=float(t),
        level=used,
    )


def _threshold(feature: np.ndarray, method: str) -> tuple[float, float]:
    from skimage.filters import threshold_otsu, threshold_triangle

    values = feature.ravel()
    if float(values.max() - values.min()) < 1e-6:
        return float(values.max()), 0.0
    t = float(threshold_otsu(values) if method == "otsu" else threshold_triangle(values))
    low, high = values[values <= t], values[values > t]
    total = float(values.var()) * len(values)
    between = len(low) * (low.mean() - values.mean()) ** 2 if len(low) else 0.0
    between += len(high) * (high.mean() - values.mean()) ** 2 if len(high) else 0.0
    return t, float(between / total) if total > 0 else 0.0


def _feature(small: np.ndarray, kind: str) -> np.ndarray:
    """(C, y, x) float image -> (y, x) tissue-ness in about 0..1."""
    if kind == "brightfield":
        rgb = small[:3] if small.shape[0] >= 3 else np.repeat(small[:1], 3, axis=0)
        top, bottom = rgb.max(axis=0), rgb.min(axis=0)
        return np.where(top > 0, (top - bottom) / np.maximum(top, 1e-6), 0.0).astype(np.float32)
    # Log intensity above the (1st percentile) background: bright nuclei would otherwise pull
    # Otsu's threshold up to "dense nuclei vs the rest" instead of "tissue vs empty".
    out = np.zeros(small.shape[1:], np.float32)
    for channel in small:
        lo = float(np.percentile(channel, 1))
        top = math.log1p(max(float(channel.max()) - lo, 1e-6))
        out = np.maximum(out, np.log1p(np.maximum(channel - lo, 0)) / top)
    return out


def _small_image(image: LazyImage, *, level: int | None, max_side: int) -> tuple[np.ndarray, int]:
    """(C, y, x) float32 image of at most ``max_side`` px per side, and the level it was read
    (and, if still larger, mean-pooled) from."""
    levels = range(image.level, image.n_levels)
    if level is None:
        fits = [k for k in levels if max(image.level_shapes[k][-2:]) <= max_side]
        level = fits[0] if fits else image.level
    elif level not in levels:
        raise ValueError(f"level {level} not in {image.level}..{image.n_levels - 1}")
    source = image if level == image.level else image.at_level(level)
    shape = source.spatial_shape
    factor = max(1, math.ceil(max(shape[-2:]) / max_side))
    out_shape = tuple(-(-n // factor) for n in shape[-2:])
    sums = np.zeros((image.n_channels, *out_shape), np.float64)
    counts = np.zeros(out_shape, np.float64)
    step = factor * max(1, 2048 // factor)  # tiles of about 2048 px, whole pooling cells
    for y in range(0, shape[-2], step):
        for x in range(0, shape[-1], step):
            region = (*(slice(0, n) for n in shape[:-2]), slice(y, min(y + step, shape[-2])),
                      slice(x, min(x + step, shape[-1])))  # fmt: skip
            data = source.read(region).astype(np.float32)
            if data.ndim == 4:  # (C, z, y, x): the brightest plane shows the tissue
                data = data.max(axis=1)
            s, c = _pool(data, factor)
            oy, ox = y // factor, x // factor
            sums[:, oy : oy + s.shape[1], ox : ox + s.shape[2]] += s
            counts[oy : oy + c.shape[0], ox : ox + c.shape[1]] += c
    return (sums / np.maximum(counts, 1)).astype(np.float32), level


def _pool(data: np.ndarray, f: int) -> tuple[np.ndarray, np.ndarray]:
    """Sums and pixel counts of f x f cells over the last two axes (edge cells partial)."""
    c, h, w = data.shape
    ph, pw = -h % f, -w % f
    padded = np.pad(data, ((0, 0), (0, ph), (0, pw)))
    ones = np.pad(np.ones((h, w), np.float32), ((0, ph), (0, pw)))
    sums = padded.reshape(c, (h + ph) // f, f, (w + pw) // f, f).sum(axis=(2, 4))
    counts = ones.reshape((h + ph) // f, f, (w + pw) // f, f).sum(axis=(1, 3))
    return sums, counts
