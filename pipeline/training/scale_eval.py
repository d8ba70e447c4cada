"""How well a model segments objects of any size once the image is brought to its scale.

Held-out generated images with nuclei of a known typical diameter (bins of 8, 16, 32, 64 and
128 px) are resized as a whole by a scale factor (skimage ``rescale``, antialiased when
shrinking), segmented in one whole-image pass, split into objects by the watershed
``tileseg segment --instances watershed`` uses, and the labels brought back to the input's
pixels by nearest-neighbour resizing. That measures the model's quality at a scale,
independent of how the engine resamples its windows. The factor is the one
``--object-size auto`` uses (the size :func:`~pipeline.objects.size.estimate_object_size`
finds, brought to :func:`~pipeline.objects.size.target_object_size`), or given.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.objects.size import (
    estimate_object_size,
    object_diameters,
    scale_factor,
    target_object_size,
)
from pipeline.synthetic.render import SyntheticConfig, synthetic_pair

if TYPE_CHECKING:
    from pipeline.models import LoadedModel

__all__ = [
    "BINS",
    "SCALE_SEEDS",
    "evaluate_bin",
    "evaluate_scales",
    "segment_at_scale",
    "sized_config",
]

BINS = (8, 16, 32, 64, 128)
# four images per bin: an image of the large bins holds only about 20 nuclei, so over one
# image a single merged clump moves a bin's object F1 by about 0.03, over four by about 0.01
SCALE_SEEDS = (0, 1, 2, 3)


def sized_config(diameter: float, *, seed: int, textured: bool = False) -> SyntheticConfig:
    """Default-looking generated nuclei of about ``diameter`` px across (radii 0.4..0.6 of it),
    their placement, chromatin texture and blur scaled with them.

    With ``textured``, they look like cultured cells' nuclei under a widefield microscope:
    dim, with bright chromocentres (1.5-4x the nucleus signal) and dark nucleoli, a few very
    bright mitotic ones, some out of focus, on a background ramp (drawn from ``seed``).
    """
    f = diameter / 16.0  # the default slides' typical nucleus (median equivalent diameter)
    r = (0.4 * diameter, 0.6 * diameter)
    config = SyntheticConfig(
        seed=seed,
        tissue=False,
        radius=r,
        cell=max(16, math.ceil(64 * f)),
        cluster_scale=300.0 * f,
        texture_scale=f,
        psf_sigma=max(0.7, f),
        density=8.0,
    )
    if not textured:
        return config
    u = np.random.default_rng([seed, 26]).uniform
    return replace(
        config,
        spots=u(1.5, 4.0),
        nucleoli=u(0.0, 0.5),
        texture=u(0.4, 0.8),
        brightness_spread=0.45,
        condensed=0.04,
        condensed_brightness=u(3.0, 6.0),
        defocus=0.1,
        gradient=u(0.0, 0.5),
    )


def segment_at_scale(
    image: np.ndarray, model: LoadedModel, factor: float, *, device: str = "cpu"
) -> np.ndarray:
    """Instance labels of a (C, Y, X) image segmented after resizing it by ``factor``.

    Normalisation is the image's own (percentiles of the whole input, as ``tileseg segment``),
    the resized image is predicted in one pass, objects are split by the watershed, and labels
    are resized back to the input's shape by nearest neighbour.
    """
    from skimage.transform import rescale, resize

    from pipeline.models.inference import Predictor, predict_whole
    from pipeline.objects.instances import watershed_split
    from pipeline.preprocess.normalize import compute_normalization
    from pipeline.training.data import ArrayImage

    norm = compute_normalization(ArrayImage(image, ""), mode="percentile")
    x = norm.apply(image)
    if factor != 1:
        x = rescale(x, (1, factor, factor), order=1, anti_aliasing=factor < 1, mode="reflect")
    predictor = Predictor.create(model, device=device, precision="fp32", channels_last="on")
    probs = predict_whole(predictor, x.astype(np.float32), geometry=model.geometry)
    labels = watershed_split(probs.argmax(0) > 0)
    return resize(labels, image.shape[1:], order=0, preserve_range=True, anti_aliasing=False)


def evaluate_bin(
    model: LoadedModel,
    diameter: int,
    *,
    seeds: tuple[int, ...] = (0, 1),
    factor: float | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Foreground Dice and object F1 (IoU 0.5) on generated images of one diameter bin.

    Images are ``8 * diameter`` px square (at least 256): a few dozen nuclei each. Without a
    ``factor``, each image's is estimated with the model (``--object-size auto``).
    """
    from pipeline.output.qc import instance_f1
    from pipeline.training.data import ArrayImage

    side = max(256, 8 * diameter)
    inter = total = matched = n_pred = n_true = 0
    sizes, estimates, factors = [], [], []
    for seed in seeds:
        image, truth = synthetic_pair((side, side), config=sized_config(diameter, seed=seed))
        image = image[None]
        sizes.append(float(np.median(object_diameters(truth))))
        f = factor
        if f is None:
            found = estimate_object_size(ArrayImage(image, f"bin {diameter}"), model, device=device)
            estimates.append(round(found.diameter, 2))
            f = scale_factor(found.diameter, target_object_size(model) or found.trained)
        factors.append(round(f, 4))
        pred = segment_at_scale(image, model, f, device=device)
        a, b = pred > 0, truth > 0
        inter, total = inter + int((a & b).sum()), total + int(a.sum() + b.sum())
        score = instance_f1(pred, truth)
        matched += score["matched"]
        n_pred, n_true = n_pred + score["predicted"], n_true + score["true"]
    return {
        "diameter_bin_px": diameter,
        "true_diameter_px": [round(s, 2) for s in sizes],
        "estimated_diameter_px": estimates or None,
        "factor": factors,
        "foreground_dice": round(2 * inter / max(total, 1), 4),
        "object_f1": round(2 * matched / max(n_pred + n_true, 1), 4),
        "objects": n_pred,
        "true_objects": n_true,
    }


def evaluate_scales(
    model: LoadedModel,
    *,
    bins: tuple[int, ...] = BINS,
    seeds: tuple[int, ...] = SCALE_SEEDS,
    device: str = "cpu",
) -> dict[str, Any]:
    """:func:`evaluate_bin` for every diameter bin, with estimated scale factors: the model's
    quality at any object size, for its training record."""
    return {
        "generator": "pipeline.training.scale_eval.sized_config",
        "seeds": list(seeds),
        "inference": "whole image resized by the estimated factor, watershed, nearest back",
        "bins": [evaluate_bin(model, d, seeds=seeds, device=device) for d in bins],
    }
