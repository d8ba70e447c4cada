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

Models that take RGB (the shipped H&E model) get stain *normalisation* instead (Macenko et al.
2009): with the slide's fitted stain matrix ``S`` (haematoxylin and eosin OD vectors) and the
99th percentiles ``c_max`` of its tissue's stain concentrations, each pixel's concentrations
``pinv(S) @ OD`` are rescaled to a reference's (``MACENKO_REFERENCE``: the reference matrix and
maximum concentrations of Macenko's normalisation as commonly shipped) and recombined with the
reference vectors. The whole map is one 3 x 3 matrix ``A`` fitted per slide,
``I' = (I0 + 1) exp(-A @ OD) - 1`` per pixel, so tiles again equal one whole-image pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pipeline.io.readers import LazyImage

__all__ = [
    "MACENKO_REFERENCE",
    "StainMap",
    "StainNormalizer",
    "fit_normalizer",
    "fit_stain",
    "is_brightfield",
    "slide_stain",
    "stain_identity",
    "stain_step",
    "wants_stain",
]

TISSUE_OD = 0.15  # Macenko's beta: OD below it in any channel is glass or too faint to fit
ANGLE_PERCENTILE = 1.0  # Macenko's alpha: robust extremes of the stain angles
MIN_TISSUE_PIXELS = 500  # fewer tissue pixels than this: fixed vectors instead of a fit
_LUT_MAX_BITS = 16
CONCENTRATION_PERCENTILE = 99.0  # Macenko's robust maximum of a stain's concentration
# Reference of the normalisation: unit OD vectors of haematoxylin and eosin and their maximum
# concentrations (the values Macenko's normalisation is usually shipped with)
MACENKO_REFERENCE = {
    "vectors": ((0.5626, 0.7201, 0.4062), (0.2159, 0.8012, 0.5581)),
    "max_concentrations": (1.9705, 1.0308),
}
BRIGHT_BACKGROUND = 128  # brightfield: the median pixel's brightest channel at least this


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
    channels = 1  # channels of the mapped array

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
            "step": "hematoxylin",
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


@dataclass(frozen=True)
class StainNormalizer:
    """RGB to RGB with the stains of ``MACENKO_REFERENCE``: ``(I0 + 1) exp(-A @ OD) - 1``.

    ``matrix`` is ``A`` (rows: output channels); ``vectors`` and ``max_concentrations`` are what
    was fitted on the slide (haematoxylin, eosin), ``white`` the per-channel ``I0``.
    """

    matrix: tuple[tuple[float, float, float], ...]
    white: tuple[float, float, float]
    vectors: tuple[tuple[float, float, float], ...]
    max_concentrations: tuple[float, float]
    method: str  # "macenko" | "ruifrok-johnston" (the fitted or the fixed stain vectors)
    channels = 3

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Normalised ``(3, *spatial)`` float32 of a ``(3, *spatial)`` RGB array."""
        if x.shape[0] != 3:
            raise ValueError(f"stain normalisation needs 3 channels, got {x.shape[0]}")
        if x.dtype.kind == "u" and x.dtype.itemsize * 8 <= _LUT_MAX_BITS:
            luts = _od_tables(self.white, x.dtype.str)
            od = [luts[c][x[c]] for c in range(3)]
        else:
            od = [_od(x[c], self.white[c]).astype(np.float32) for c in range(3)]
        out = np.empty(x.shape, np.float32)
        for c, row in enumerate(self.matrix):
            # a fixed order of float32 operations on contiguous arrays: the same bits per
            # pixel whatever the window
            acc = od[0] * np.float32(row[0])
            acc += od[1] * np.float32(row[1])
            acc += od[2] * np.float32(row[2])
            np.negative(acc, out=acc)
            np.exp(acc, out=acc)
            out[c] = acc * np.float32(self.white[c] + 1.0) - np.float32(1.0)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": "normalize",
            "method": self.method,
            "vectors": [list(v) for v in self.vectors],
            "max_concentrations": list(self.max_concentrations),
            "reference": {
                "vectors": [list(v) for v in MACENKO_REFERENCE["vectors"]],
                "max_concentrations": list(MACENKO_REFERENCE["max_concentrations"]),
            },
            "matrix": [list(r) for r in self.matrix],
            "white": list(self.white),
        }


@lru_cache(maxsize=8)
def _od_tables(white: tuple[float, ...], dtype: str) -> tuple[np.ndarray, ...]:
    """Per channel, the OD of every value of an unsigned integer ``dtype`` (float32)."""
    values = np.arange(np.iinfo(dtype).max + 1, dtype=np.float64)
    return tuple(_od(values, white[c]).astype(np.float32) for c in range(3))


def is_brightfield(image: LazyImage) -> bool:
    """RGB brightfield: 3 channels of 8 bits on a bright background (the median pixel of the
    bounded sample the normalisation takes has a channel of at least ``BRIGHT_BACKGROUND``),
    unlike an RGB fluorescence composite's dark one."""
    from pipeline.preprocess.normalize import sample_pixels

    if image.n_channels != 3 or image.dtype != np.uint8:
        return False
    sample, _ = sample_pixels(image)
    return float(np.median(sample.max(axis=0))) >= BRIGHT_BACKGROUND


def stain_step(setting: str, image: LazyImage, model_channels: int | None) -> str | None:
    """What ``--stain setting`` does for this image and model: ``hematoxylin``, ``normalize``
    or ``None``. ``auto`` takes RGB brightfield (:func:`is_brightfield`) only: haematoxylin
    into a one-channel model, normalised into a three-channel one. An RGB fluorescence
    composite (dark background) is left to the choice of its channels
    (:mod:`pipeline.io.channels`): colour deconvolution has no meaning for it."""
    if setting in ("hematoxylin", "normalize"):
        return setting
    if setting == "none" or model_channels not in (1, 3) or not is_brightfield(image):
        return None
    return "hematoxylin" if model_channels == 1 else "normalize"


def stain_identity(step: str | None) -> dict[str, Any] | None:
    """What of a stain step decides results beyond the slide's own pixels (its fingerprint)."""
    if step is None:
        return None
    if step == "normalize":
        return {"step": step, "reference": MACENKO_REFERENCE}
    return {"step": step}


def wants_stain(setting: str, image: LazyImage, model_channels: int | None) -> bool:
    """Whether ``--stain setting`` maps this image's stains for this model at all."""
    return stain_step(setting, image, model_channels) is not None


def slide_stain(
    image: LazyImage, setting: str, model_channels: int | None
) -> StainMap | StainNormalizer | None:
    """The stain map or normaliser ``--stain setting`` asks for on this image and model,
    fitted on the bounded sample the normalisation takes (a low-resolution level), or ``None``.

    Raises
    ------
    TilesegError
        For ``hematoxylin`` or ``normalize`` on an image without 3 channels.
    """
    from pipeline.errors import TilesegError
    from pipeline.preprocess.normalize import sample_pixels

    step = stain_step(setting, image, model_channels)
    if step is None:
        return None
    if image.n_channels != 3:
        problem = f"--stain {step} needs an RGB image, this one has {image.n_channels} channel(s)"
        raise TilesegError(image.path, problem)
    sample, _ = sample_pixels(image)
    if step == "normalize":
        return fit_normalizer(sample, dtype=image.dtype)
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


def fit_normalizer(sample: np.ndarray, *, dtype: np.dtype) -> StainNormalizer:
    """Macenko's normalisation of a slide to ``MACENKO_REFERENCE``, fitted on a ``(3, N)``
    sample of its pixels: its stain vectors as :func:`fit_stain` finds them, and the
    ``CONCENTRATION_PERCENTILE`` of each stain's concentration over its tissue pixels (the
    reference's own maxima where there is too little tissue to measure them)."""
    stain = fit_stain(sample, dtype=dtype)
    white = np.asarray(stain.white)
    od = np.stack([_od(sample[c], white[c]) for c in range(3)])  # (3, N)
    tissue = od[:, (od > TISSUE_OD).all(axis=0)]
    he = np.asarray(stain.vectors[:2], np.float64).T  # (3, 2): columns H, E
    unmix = np.linalg.pinv(he)  # (2, 3): least-squares concentrations of H and E
    ref_max = np.asarray(MACENKO_REFERENCE["max_concentrations"], np.float64)
    if tissue.shape[1] >= MIN_TISSUE_PIXELS:
        fitted = np.percentile(unmix @ tissue, CONCENTRATION_PERCENTILE, axis=1)
        fitted = np.where(fitted > 1e-6, fitted, ref_max)
    else:
        fitted = ref_max
    ref = np.asarray(MACENKO_REFERENCE["vectors"], np.float64).T  # (3, 2)
    matrix = ref @ np.diag(ref_max / fitted) @ unmix
    return StainNormalizer(
        matrix=tuple(tuple(float(v) for v in row) for row in matrix),
        white=stain.white,
        vectors=stain.vectors[:2],
        max_concentrations=(float(fitted[0]), float(fitted[1])),
        method=stain.method,
    )
