"""Brightfield H&E to one haematoxylin channel, fitted once per slide, the same map for every tile.

A fluorescence nuclei model wants one channel with bright nuclei on a dark background. In a
brightfield H&E image the nuclei are where haematoxylin absorbs: colour deconvolution (Ruifrok
and Johnston) turns each pixel's optical density ``OD = -log((I + 1) / (I0 + 1))`` into stain
amounts by the inverse of the stain matrix, and the haematoxylin amount is bright exactly where
the nuclei are. The stain vectors are estimated per slide by Macenko's method (the two principal
directions of tissue OD, their extreme angles at the 1st and 99th percentile) on a low-resolution
sample of the tissue (pixels with OD above 0.15 in every channel, as in Macenko et al. 2009),
falling back to the fixed Ruifrok-Johnston vectors (scikit-image's ``hed_from_rgb``) when the
slide has too little tissue to estimate them.

Per pixel the map is a fixed function of the pixel's own value (a log, then a fixed weighted
sum): tiles stay identical to one whole-image pass. For 8- and 16-bit input the per-channel
log and weight are one lookup table per channel, so the same value always gives the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pipeline.io.readers import LazyImage

__all__ = ["StainMap", "fit_stain", "slide_stain", "wants_stain"]

TISSUE_OD = 0.15  # Macenko's beta: OD below it in any channel is glass or too faint to fit
ANGLE_PERCENTILE = 1.0  # Macenko's alpha: robust extremes of the stain angles
MIN_TISSUE_PIXELS = 500  # fewer tissue pixels than this: fixed vectors instead of a fit
_LUT_MAX_BITS = 16


@dataclass(frozen=True)
class StainMap:
    """Haematoxylin amount of each pixel: ``sum_c weights[c] * OD_c`` over the RGB channels.

    ``vectors`` are the unit OD vectors of haematoxylin, eosin and the residual direction (the
    rows of the stain matrix); ``weights`` the haematoxylin column of its inverse; ``white``
    the per-channel intensity of glass (``I0``).
    """

    weights: tuple[float, float, float]
    white: tuple[float, float, float]
    vectors: tuple[tuple[float, float, float], ...]
    method: str  # "macenko" | "ruifrok-johnston"

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Haematoxylin of a ``(3, *spatial)`` RGB array, as ``(1, *spatial)`` float32."""
        if x.shape[0] != 3:
            raise ValueError(f"stain separation needs 3 channels, got {x.shape[0]}")
        if x.dtype.kind == "u" and x.dtype.itemsize * 8 <= _LUT_MAX_BITS:
            luts = _tables(self.weights, self.white, x.dtype.str)
            out = luts[0][x[0]]
            out += luts[1][x[1]]
            out += luts[2][x[2]]
        else:
            out = np.zeros(x.shape[1:], np.float32)
            for c in range(3):
                out += _od(x[c], self.white[c]).astype(np.float32) * np.float32(self.weights[c])
        return out[np.newaxis]

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "vectors": [list(v) for v in self.vectors],
            "weights": list(self.weights),
            "white": list(self.white),
        }


@lru_cache(maxsize=8)
def _tables(
    weights: tuple[float, ...], white: tuple[float, ...], dtype: str
) -> tuple[np.ndarray, ...]:
    """Per channel, ``weight * OD`` of every value of an unsigned integer ``dtype``."""
    values = np.arange(np.iinfo(dtype).max + 1, dtype=np.float64)
    return tuple((_od(values, white[c]) * weights[c]).astype(np.float32) for c in range(3))


def _od(values: np.ndarray, white: float) -> np.ndarray:
    """Optical density; +1 keeps black pixels finite (and glass at 0)."""
    return -np.log((np.asarray(values, np.float64) + 1.0) / (white + 1.0))


def wants_stain(setting: str, image: LazyImage, model_channels: int | None) -> bool:
    """Whether ``--stain setting`` separates haematoxylin for this image and model: ``auto``
    does for RGB brightfield (3 channels of 8 bits) into a one-channel model."""
    if setting == "hematoxylin":
        return True
    if setting == "none":
        return False
    rgb = image.n_channels == 3 and image.dtype == np.uint8
    return rgb and model_channels == 1


def slide_stain(image: LazyImage, setting: str, model_channels: int | None) -> StainMap | None:
    """The stain map ``--stain setting`` asks for on this image and model, fitted on the
    bounded sample the normalisation takes (a low-resolution level), or ``None``.

    Raises
    ------
    TilesegError
        For ``hematoxylin`` on an image without 3 channels.
    """
    from pipeline.errors import TilesegError
    from pipeline.preprocess.normalize import sample_pixels

    if not wants_stain(setting, image, model_channels):
        return None
    if image.n_channels != 3:
        problem = (
            f"--stain hematoxylin needs an RGB image, this one has {image.n_channels} channel(s)"
        )
        raise TilesegError(image.path, problem)
    sample, _ = sample_pixels(image)
    return fit_stain(sample, dtype=image.dtype)


def fit_stain(sample: np.ndarray, *, dtype: np.dtype) -> StainMap:
    """The stain map of a slide from a ``(3, N)`` sample of its pixels (a low-resolution
    level); Macenko's estimate, or the fixed vectors where tissue is too scarce for it."""
    white = _white(sample, dtype)
    od = np.stack([_od(sample[c], white[c]) for c in range(3)], axis=1)  # (N, 3)
    tissue = od[(od > TISSUE_OD).all(axis=1)]
    vectors, method = None, "ruifrok-johnston"
    if len(tissue) >= MIN_TISSUE_PIXELS:
        vectors = _macenko(tissue)
        method = "macenko"
    if vectors is None:
        from skimage.color import rgb_from_hed

        vectors, method = np.asarray(rgb_from_hed, np.float64), "ruifrok-johnston"
    weights = np.linalg.inv(vectors)[:, 0]
    return StainMap(
        weights=tuple(float(w) for w in weights),
        white=tuple(float(w) for w in white),
        vectors=tuple(tuple(float(v) for v in row) for row in vectors),
        method=method,
    )


def _white(sample: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Glass intensity per channel: full scale for integers, the brightest sample for floats."""
    if np.dtype(dtype).kind in "ui":
        return np.full(3, float(np.iinfo(dtype).max))
    return np.maximum(sample.reshape(3, -1).max(axis=1).astype(np.float64), 1e-6)


def _macenko(od: np.ndarray) -> np.ndarray | None:
    """Rows H, E, residual of unit OD vectors estimated from tissue OD ``(N, 3)``, or None."""
    _, eigvecs = np.linalg.eigh(np.cov(od, rowvar=False))
    plane = eigvecs[:, 1:3]  # the two largest eigenvalues' directions
    plane = plane * np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # point into positive OD
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [ANGLE_PERCENTILE, 100 - ANGLE_PERCENTILE])
    a = plane @ np.array([np.cos(lo), np.sin(lo)])
    b = plane @ np.array([np.cos(hi), np.sin(hi)])
    # Haematoxylin absorbs red more than eosin does.
    h, e = (a, b) if a[0] > b[0] else (b, a)
    h, e = np.abs(h) / np.linalg.norm(h), np.abs(e) / np.linalg.norm(e)
    residual = np.cross(h, e)
    if np.linalg.norm(residual) < 1e-3:  # one stain only: no basis to separate them
        return None
    residual = np.abs(residual) / np.linalg.norm(residual)
    return np.stack([h, e, residual])
