"""Training data for ``tileseg train``: image/mask pairs, synthetic data, crops, augmentation,
and the held-out score on generated images.

Images are only ever read window by window (a :class:`~pipeline.io.readers.LazyImage`, or an
in-memory :class:`ArrayImage` for generated data), so a gigapixel training slide is never loaded
whole. Each image is normalised exactly as inference normalises it: per-channel percentiles of the
whole image (or of the bounded sample :func:`~pipeline.preprocess.normalize.compute_normalization`
takes),
never of a crop, so a crop seen in training has the intensities the same pixels get at inference.
Crop windows reaching outside an image are mirrored, as inference windows are.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import TilesegError
from pipeline.geometry import apply_window, window_read
from pipeline.io.channels import select_channels
from pipeline.io.readers import LazyImage, find_images, image_stem, open_image
from pipeline.preprocess.normalize import Normalization, compute_normalization
from pipeline.preprocess.stain import slide_stain
from pipeline.synthetic.render import SyntheticConfig, render_block

if TYPE_CHECKING:
    import torch

    from pipeline.models import UNet

__all__ = [
    "ArrayImage",
    "CropGeometry",
    "TrainPair",
    "augment",
    "contact_lines",
    "draw_crops",
    "file_pairs",
    "heldout_dice",
    "read_crop",
    "split_pairs",
    "synthetic_pairs",
    "varied_config",
]


class ArrayImage:
    """An in-memory ``(C, *spatial)`` array with the part of the LazyImage interface that
    training and :func:`~pipeline.preprocess.normalize.compute_normalization` use."""

    level = 0
    n_levels = 1

    def __init__(self, array: np.ndarray, path: str) -> None:
        self.array = array
        self.path = path

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[1:])

    @property
    def n_channels(self) -> int:
        return int(self.array.shape[0])

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def read(self, spatial_region: tuple[slice, ...]) -> np.ndarray:
        return self.array[(slice(None), *spatial_region)]


@dataclass(frozen=True)
class TrainPair:
    """One image with its label mask; ``rows`` restricts the labelled outputs used from it along
    the first spatial axis (a single image is split into training and validation rows)."""

    name: str
    image: LazyImage | ArrayImage
    mask: LazyImage | ArrayImage
    normalization: Normalization
    rows: tuple[int, int]

    @property
    def area(self) -> int:
        return (self.rows[1] - self.rows[0]) * math.prod(self.image.spatial_shape[1:])


def _pair(
    name: str, image, mask, percentiles: tuple[float, float], stain: str = "none"
) -> TrainPair:
    """A pair normalised as ``tileseg segment --stain stain`` normalises its image: the stain
    step fitted on the whole image, as it is on a whole slide."""
    fitted = None if stain == "none" else slide_stain(image, stain, None)
    norm = compute_normalization(image, mode="percentile", percentiles=percentiles, stain=fitted)
    return TrainPair(name, image, mask, norm, (0, image.spatial_shape[0]))


def file_pairs(
    images: str | os.PathLike[str],
    masks: str | os.PathLike[str],
    *,
    percentiles: tuple[float, float] = (1.0, 99.8),
    axes: str | None = None,
    level: int = 0,
    allow_missing_chunks: bool = False,
    stain: str = "none",
    channels: str | None = None,
) -> list[TrainPair]:
    """Pairs of images in ``images`` with the masks of the same :func:`image_stem` in ``masks``.

    Masks are class label images (0 = background) or instance label images (any positive id is
    foreground in a two-class model); they must have the image's spatial shape and one channel.
    ``allow_missing_chunks`` reads chunks missing from a Zarr *image* as fill instead of failing;
    masks always do, since zarr-python 3 omits all-background chunks of label arrays by default.
    ``channels``: the images' channels the model is given, by name or index, as
    ``tileseg segment --channels`` reads them (default: all).
    """
    found = find_images(images)
    if not found:
        raise TilesegError(images, "no images found in this directory")
    by_stem = {image_stem(p): p for p in find_images(masks)}
    pairs = []
    for path in found:
        mask_path = by_stem.get(image_stem(path))
        if mask_path is None:
            raise TilesegError(path, f"no mask named {image_stem(path)}.* in {masks}")
        image = open_image(path, level=level, axes=axes, allow_missing_chunks=allow_missing_chunks)
        image = select_channels(image, channels)
        mask = open_image(mask_path, level=level, axes=axes, allow_missing_chunks=True)
        if mask.spatial_shape != image.spatial_shape:
            raise TilesegError(
                mask_path,
                f"mask shape {mask.spatial_shape} differs from image {image.spatial_shape}",
            )
        if mask.n_channels != 1:
            raise TilesegError(mask_path, f"a mask must have one channel, not {mask.n_channels}")
        if mask.dtype.kind not in "biu":
            raise TilesegError(
                mask_path, f"a mask must be an integer label image, not {mask.dtype}"
            )
        pairs.append(_pair(image_stem(path), image, mask, percentiles, stain))
    return pairs


def varied_config(
    seed: int,
    *,
    kind: str = "fluorescence",
    textures: bool = False,
    zoom: tuple[float, float] = (1.0, 1.0),
) -> SyntheticConfig:
    """A synthetic slide configuration drawn around the defaults, for generalisation: signal,
    background, noise, camera offset/gain, blur, nucleus size/shape/density, texture, uneven
    illumination, bit depth and tissue coverage all vary (ranges include the defaults).

    Parameters
    ----------
    seed
        Slide seed; the draws are a pure function of it.
    kind
        ``fluorescence`` or ``he``.
    textures
        Also draw what real nuclei show: bright chromocentres, dark nucleoli, dim and bright
        nuclei in one image, a few very bright mitotic ones, clumps, out-of-focus nuclei and
        background ramps.
    zoom
        Scale augmentation around the trained size: nucleus radii, their placement cell and
        the chromatin texture are multiplied by one factor per image, log-uniform in this range.
    """
    rng = np.random.default_rng([seed, 7])
    u = rng.uniform
    lo = u(3.0, 6.0)
    base = SyntheticConfig(
        kind=kind,
        seed=seed,
        density=u(3.0, 12.0),
        radius=(lo, u(max(lo + 3.0, 9.0), 16.0)),
        dtype="uint8" if rng.random() < 0.3 else "uint16",
        tissue=bool(rng.random() < 0.7),
        tissue_fraction=u(0.5, 0.9),
        cluster_scale=u(150.0, 500.0),
        aspect=u(1.2, 2.3),
        irregularity=u(0.02, 0.12),
        separation=u(0.7, 0.95),
        doublets=u(0.05, 0.3),
        texture=u(0.2, 0.8),
        psf_sigma=u(0.6, 2.2),
        illumination=u(0.0, 0.4),
        photons=float(np.exp(u(np.log(60.0), np.log(3000.0)))),
        background=u(5.0, 120.0),
        read_noise=u(1.0, 8.0),
        offset=u(20.0, 500.0),
        gain=float(np.exp(u(np.log(0.5), np.log(4.0)))),
    )
    # drawn after the original knobs, so those keep their values for a given seed
    if zoom != (1.0, 1.0):
        f = float(np.exp(u(np.log(zoom[0]), np.log(zoom[1]))))
        base = replace(
            base,
            radius=(base.radius[0] * f, base.radius[1] * f),
            cell=max(64, math.ceil(64 * f)),
            texture_scale=f,
        )
    if textures:
        base = replace(base, **_texture_knobs(rng, base))
    if kind == "he":
        base = replace(base, **_he_knobs(rng))
    return base


# unit stain OD vectors between which H&E slides are drawn: Ruifrok and Johnston's and the
# reference of Macenko's normalisation (pipeline.preprocess.stain.MACENKO_REFERENCE)
_H_RANGE = ((0.650, 0.704, 0.286), (0.5626, 0.7201, 0.4062))
_E_RANGE = ((0.072, 0.990, 0.105), (0.2159, 0.8012, 0.5581))


def _he_knobs(rng: np.random.Generator) -> dict[str, Any]:
    """Stain vectors, stain amounts, glass brightness and JPEG compression of an H&E slide, and
    its tissue that is not nuclei: collagen, red cells, cytoplasm, vacuoles, patchy eosin."""
    u = rng.uniform

    def vector(pair: tuple[tuple[float, ...], ...]) -> tuple[float, float, float]:
        t = u(-0.3, 1.3)  # a little beyond either end
        v = (1 - t) * np.array(pair[0]) + t * np.array(pair[1]) + rng.normal(0, 0.05, 3)
        v = np.maximum(v, 0.01)
        return tuple(float(c) for c in v / np.linalg.norm(v))

    knobs = {
        "stain_vectors": (vector(_H_RANGE), vector(_E_RANGE)),
        "stain_amounts": (float(np.exp(u(-0.6, 0.4))), float(np.exp(u(-0.7, 0.5)))),
        "white": u(215.0, 250.0),
        "jpeg": int(rng.integers(60, 96)) if rng.random() < 0.6 else 0,
    }
    # tissue that is not nuclei, drawn after the knobs above so that those keep their values
    return knobs | {
        "collagen": u(0.2, 0.8) if rng.random() < 0.7 else 0.0,
        "red_cells": u(0.3, 1.5) if rng.random() < 0.6 else 0.0,
        "cytoplasm": u(0.0, 0.9),
        "vacuoles": u(0.0, 1.0) if rng.random() < 0.4 else 0.0,
        "eosin_spread": u(0.0, 0.5),
    }


def _texture_knobs(rng: np.random.Generator, base: SyntheticConfig) -> dict[str, float]:
    u = rng.uniform
    return {
        "brightness_spread": u(0.2, 0.55),
        "condensed": u(0.0, 0.08),
        "condensed_brightness": u(2.5, 5.0),
        "defocus": u(0.0, 0.15),
        "spots": u(0.0, 4.0) if rng.random() < 0.6 else 0.0,
        "nucleoli": u(0.0, 0.7),
        "texture_scale": base.texture_scale * u(0.8, 1.6),
        "gradient": u(0.0, 0.6) if rng.random() < 0.5 else 0.0,
        "separation": base.separation * u(0.9, 1.0),  # clumps: nuclei pressed together
    }


def _synthetic_image(config: SyntheticConfig, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(C, Y, X) image and (1, Y, X) instance labels of a ``size`` square at the origin."""
    image, labels = render_block(config, origin=(0, 0), shape=(size, size))
    image = np.moveaxis(image, -1, 0) if image.ndim == 3 else image[None]
    return image, labels[None]


def synthetic_pairs(
    *,
    images: int,
    size: int,
    seed: int,
    vary: bool,
    kind: str,
    percentiles: tuple[float, float],
    textures: bool | float = False,
    zoom: tuple[float, float] = (1.0, 1.0),
    stain: str = "none",
) -> list[TrainPair]:
    """``images`` generated pairs; image ``i`` uses slide seed ``seed + i`` (varied around the
    defaults when ``vary``, see :func:`varied_config`; every fourth image keeps the defaults,
    the demo's distribution). ``textures``: on every varied image, or on this share of them
    (drawn per slide seed)."""
    pairs = []
    for i in range(images):
        s = seed + i
        textured = bool(np.random.default_rng([s, 11]).random() < float(textures))
        config = (
            varied_config(s, kind=kind, textures=textured, zoom=zoom)
            if vary and i % 4
            else SyntheticConfig(kind=kind, seed=s)
        )
        image, labels = _synthetic_image(config, size)
        name = f"synthetic-{kind}-{s}"
        image, labels = ArrayImage(image, name), ArrayImage(labels, name)
        pairs.append(_pair(name, image, labels, percentiles, stain))
    return pairs


def split_pairs(
    pairs: list[TrainPair], *, fraction: float, seed: int
) -> tuple[list[TrainPair], list[TrainPair]]:
    """Hold out whole images for validation (at least one), or the last rows of a single image."""
    if len(pairs) == 1:
        (pair,) = pairs
        n = pair.image.spatial_shape[0]
        cut = min(max(1, round(n * (1 - fraction))), n - 1)
        return [replace(pair, rows=(0, cut))], [replace(pair, rows=(cut, n))]
    order = np.random.default_rng([seed, 11]).permutation(len(pairs))
    n_val = min(max(1, round(len(pairs) * fraction)), len(pairs) - 1)
    val = sorted(order[:n_val].tolist())
    return [p for i, p in enumerate(pairs) if i not in val], [pairs[i] for i in val]


@dataclass(frozen=True)
class CropGeometry:
    """Model input window ``size`` and the centred ``out`` pixels its output covers."""

    size: int
    out: int

    @property
    def margin(self) -> int:
        return (self.size - self.out) // 2


def contact_lines(labels: np.ndarray) -> np.ndarray:
    """Where instances touch: the pixels of an instance with a face neighbour of a larger id.

    A one-pixel line on one side of every contact between two objects (none between an object
    and the background, none inside a binary mask). Pixels on the array's edge are judged by
    their neighbours inside it only.
    """
    lines = np.zeros(labels.shape, bool)
    for axis in range(labels.ndim):
        lo = [slice(None)] * labels.ndim
        hi = [slice(None)] * labels.ndim
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        a, b = labels[tuple(lo)], labels[tuple(hi)]
        lines[tuple(lo)] |= (b > a) & (a > 0)
        lines[tuple(hi)] |= (a > b) & (b > 0)
    return lines


def read_crop(
    pair: TrainPair,
    origin: tuple[int, ...],
    crop: CropGeometry,
    *,
    classes: int,
    gaps: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised input window (C, *size) and class targets (*out) for the output at ``origin``.

    With valid padding the target is the centre of the window matching the model's output.
    With ``gaps`` (two classes), :func:`contact_lines` between touching instances are
    background, so the model learns to leave a line between touching objects that the
    watershed of ``--instances watershed`` can split at."""
    ndim = len(origin)
    start = [o - crop.margin for o in origin]
    plan = window_read(start, [s + crop.size for s in start], pair.image.spatial_shape)
    x = pair.normalization.apply(
        apply_window(pair.image.read(plan.source), plan, first_spatial_axis=1)
    )
    rim = 1 if gaps and classes == 2 else 0  # a contact is judged with the neighbours outside
    stop = [o + crop.out + rim for o in origin]
    plan = window_read([o - rim for o in origin], stop, pair.mask.spatial_shape)
    mask = apply_window(pair.mask.read(plan.source), plan, first_spatial_axis=1)[0]
    if rim:
        inner = (slice(rim, -rim),) * ndim
        mask = np.where(contact_lines(mask)[inner], 0, mask[inner])
    if classes == 2:
        y = (mask > 0).astype(np.int64)  # instance ids and binary masks alike: foreground
    else:
        y = mask.astype(np.int64)
        if y.size and (y.min() < 0 or y.max() >= classes):
            raise TilesegError(
                pair.mask.path,
                f"mask values must be class ids 0..{classes - 1}, found {y.min()}..{y.max()}",
            )
    assert x.shape[1:] == (crop.size,) * ndim and y.shape == (crop.out,) * ndim
    return x, y


def _random_origin(
    pair: TrainPair, crop: CropGeometry, rng: np.random.Generator
) -> tuple[int, ...]:
    """A uniformly drawn output origin whose output lies inside the pair's rows when it fits."""
    bounds = [pair.rows, *((0, n) for n in pair.image.spatial_shape[1:])]
    return tuple(int(rng.integers(a, max(a, b - crop.out) + 1)) for a, b in bounds)


def draw_crops(
    pairs: list[TrainPair], n: int, crop: CropGeometry, rng: np.random.Generator
) -> list[tuple[int, tuple[int, ...]]]:
    """``n`` (pair index, origin) draws, pairs weighted by their labelled area."""
    weights = np.array([p.area for p in pairs], np.float64)
    chosen = rng.choice(len(pairs), size=n, p=weights / weights.sum())
    return [(int(i), _random_origin(pairs[i], crop, rng)) for i in chosen]


def augment(
    x: np.ndarray,
    y: np.ndarray,
    rng: np.random.Generator,
    *,
    flip: bool,
    rotate: bool,
    gain: float,
    offset: float,
    noise: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Random flips and 90° rotations (together: the 8 symmetries of the square) of image and
    target, then intensity jitter of the image: a log-uniform gain in exp(±gain), an offset in
    ±offset and Gaussian noise of a standard deviation up to ``noise`` (normalised units)."""
    spatial = range(1, x.ndim)
    if rotate and x.ndim >= 3:
        k = int(rng.integers(4))
        x, y = np.rot90(x, k, axes=(-2, -1)), np.rot90(y, k, axes=(-2, -1))
    if flip:
        for axis in spatial:
            if rng.random() < 0.5:
                x, y = np.flip(x, axis), np.flip(y, axis - 1)
    x = x * np.float32(np.exp(rng.uniform(-gain, gain))) + np.float32(rng.uniform(-offset, offset))
    if noise > 0:
        sd = rng.uniform(0, noise)
        x = x + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(sd)
    return np.ascontiguousarray(x, np.float32), np.ascontiguousarray(y)


def heldout_dice(
    model: UNet,
    *,
    kind: str,
    images: int,
    size: int,
    seed: int,
    percentiles: tuple[float, float],
    device: torch.device,
    stain: str = "none",
) -> dict[str, Any]:
    """Foreground Dice on generated default-parameter images (slide seeds ``seed`` ...), each
    predicted in one whole-image pass normalised as ``tileseg segment`` normalises it (with the
    ``stain`` step fitted on the image). Tiling is exact, so ``tileseg segment`` on the same
    image gives the same labels (see the tests)."""
    import torch

    from pipeline.models import LoadedModel
    from pipeline.models.inference import Predictor, predict_whole
    from pipeline.runtime.heap import keep_freed_memory

    loaded = LoadedModel(model.eval(), model.config.geometry, None, None, "", "training")
    # create(): fp32 and the layout of `tileseg segment --precision fp32` (IEEE, not cuDNN's
    # TF32 default)
    if torch.device(device).type == "cpu":
        keep_freed_memory()  # else each forward page-faults its activations in again
    predictor = Predictor.create(loaded, device=str(device), precision="fp32", channels_last="on")
    per_image, fg, predicted, inter, total = [], [], [], 0, 0
    for i in range(images):
        image, labels = _synthetic_image(SyntheticConfig(kind=kind, seed=seed + i), size)
        norm = _pair("", ArrayImage(image, ""), None, percentiles, stain).normalization
        probs = predict_whole(predictor, norm.apply(image), geometry=loaded.geometry)
        pred, truth = probs.argmax(0) > 0, labels[0] > 0
        a, t = int((pred & truth).sum()), int(pred.sum()) + int(truth.sum())
        per_image.append(round(1.0 if t == 0 else 2 * a / t, 5))
        fg.append(round(float(truth.mean()), 4))
        predicted.append(round(float(pred.mean()), 4))
        inter, total = inter + a, total + t
    return {
        "generator": "pipeline.synthetic.slides.SyntheticConfig defaults",
        "kind": kind,
        "seeds": [seed + i for i in range(images)],
        "shape": [size, size],
        "origin": [0, 0],
        "inference": "whole image, percentile normalisation, argmax",
        "stain": stain,
        "foreground_fraction": fg,
        "predicted_fraction": predicted,  # an image without nuclei scores 0 for any false positive
        "dice": per_image,
        "pooled_dice": round(1.0 if total == 0 else 2 * inter / total, 5),
    }
