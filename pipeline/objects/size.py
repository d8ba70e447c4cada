"""Object size: the typical object diameter of an image, and of the data a model was trained on.

A U-Net sees a fixed context (89 px for the default model): nuclei far larger than the ones it
was trained on are segmented as their texture (chromocentres), far smaller ones vanish. The
scale that maps an image's objects onto the size a model segments at is ``target /
observed`` (:func:`scale_factor`), the target being the upper quartile of the model's training
objects' diameters (:func:`target_object_size`). :func:`estimate_object_size` finds the
observed size the way Cellpose does, from the model itself: it segments a window of the image
resized by a ladder of factors and keeps the factor at which the objects found are closest to
the trained size, where the model is reliable; the objects' median diameter there, divided by
the factor, is the estimate.
It is then measured twice more, each time at exactly the scale the last measurement implies,
with touching objects split apart (:func:`~pipeline.objects.instances.watershed_split`, peaks
half a trained diameter apart): nuclei pressed into clumps would otherwise count as one large
object. The ladder itself measures connected components, since at a scale far from the
trained one a split cuts large objects into pieces of about the trained size.

Diameters are equivalent diameters (that of the disc of the object's area), in pixels of the
image given; objects touching the analysed window's border are not counted (they are cut).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from pipeline.objects.instances import watershed_split

if TYPE_CHECKING:
    from pipeline.io.readers import LazyImage
    from pipeline.models import LoadedModel
    from pipeline.models.inference import Predictor
    from pipeline.preprocess.normalize import Normalization

__all__ = [
    "SizeEstimate",
    "estimate_object_size",
    "middle_plane",
    "object_diameters",
    "on_one_plane",
    "scale_factor",
    "size_warning",
    "target_object_size",
    "trained_object_size",
    "training_object_size",
    "warn_object_size",
    "with_object_size",
]

# resize factors tried, from 4x enlarged (4 px objects) to 1/16 (256 px objects); octaves are
# enough, since the size is measured again at the exact factor the best of them implies
_LADDER = tuple(2.0**k for k in range(2, -5, -1))
_MIN_OBJECTS = 3  # fewer objects than this at a factor say nothing about the size
# measurements at the exact scale after the ladder's: the second corrects the first where
# clumps measured as one made the ladder's scale too small
_REMEASURE = 2
# two factors' objects are the same objects when their sizes in the image differ less than this
_SAME_SIZE = math.log(1.5)


@dataclass(frozen=True)
class SizeEstimate:
    """An estimated typical object diameter (px of the image) and how it was found."""

    diameter: float
    factor: float  # the resize factor of the final measurement
    objects: int  # objects measured at that factor
    trained: float  # the model's trained diameter

    def to_dict(self) -> dict[str, Any]:
        return {
            "diameter_px": round(self.diameter, 2),
            "factor": round(self.factor, 4),
            "objects": self.objects,
            "trained_diameter_px": round(self.trained, 2),
        }


def scale_factor(object_size: float, target_size: float) -> float:
    """The resize factor that brings objects of ``object_size`` px to ``target_size`` px.

    Parameters
    ----------
    object_size, target_size
        Typical object diameters in pixels: the image's and the one wanted, both > 0.

    Returns
    -------
    float
        ``target_size / object_size``: < 1 shrinks the image (large objects), > 1 enlarges it.
    """
    if not (object_size > 0 and target_size > 0) or math.isinf(object_size * target_size):
        raise ValueError(f"object sizes must be finite and > 0, not {object_size}, {target_size}")
    return target_size / object_size


def object_diameters(labels: np.ndarray, *, min_area: int = 4) -> np.ndarray:
    """Equivalent diameters of the objects in a 2D label image not touching its border.

    ``labels`` holds instance ids or a mask (a mask, or a label image with a single id, is
    split into connected components). Objects smaller than ``min_area`` pixels are noise.
    """
    labels = np.asarray(labels)
    ids = np.unique(labels[labels > 0])
    if len(ids) <= 1:
        labels = ndimage.label(labels > 0)[0]
    else:  # dense ids for bincount: the sparse ids of generated truth can be huge
        labels = np.where(labels > 0, np.searchsorted(ids, labels) + 1, 0)
    area = np.bincount(labels.ravel())
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    area[border] = 0
    area[0] = 0
    area = area[area >= min_area]
    return np.sqrt(4 * area / np.pi)


def trained_object_size(model: LoadedModel) -> float | None:
    """The object diameter (px) a model was trained at, if recorded: in its training record,
    else in its metadata (``object_size_px``, for TorchScript, ONNX and other models)."""
    size = _object_size_record(model).get("diameter_px")
    return float(size) if size else model.metadata.object_size_px


def target_object_size(model: LoadedModel) -> float | None:
    """The object diameter (px) a model segments at: the upper quartile of its training
    objects' diameters (their median where only that is recorded), if recorded.

    A quarter of the objects the model learned from were larger, so the size is well inside
    its training; the extra pixels per object over the median let the watershed split
    touching objects that the median's scale merges.
    """
    quartiles = _object_size_record(model).get("diameter_quartiles_px")
    return float(quartiles[1]) if quartiles else trained_object_size(model)


def with_object_size(model: LoadedModel, diameter: float) -> LoadedModel:
    """``model`` recording ``diameter`` (px) as the object size it was trained at, in place
    of any recorded one (``--model-object-size``); it is also the size it segments at, since
    nothing is known of the spread of its training objects."""
    given = {"diameter_px": float(diameter), "measure": "given"}
    training = {**model.training, "object_size": given}
    return replace(model, info={**(model.info or {}), "training": training})


def _object_size_record(model: LoadedModel) -> dict[str, Any]:
    return model.training.get("object_size") or {}


def training_object_size(masks, *, window: int = 1024) -> dict[str, Any]:
    """The object size of training data, for the model's record: the median equivalent
    diameter of the objects in the central ``window`` square of each mask (read lazily).

    ``masks`` are 2D label images (instance ids, or masks split into connected components)
    with ``read`` and ``spatial_shape``; 3D masks are not measured (``diameter_px`` None).
    """
    found = [
        object_diameters(_read_window(m, window)[0]) for m in masks if len(m.spatial_shape) == 2
    ]
    d = np.concatenate(found) if found else np.zeros(0)
    return {
        "diameter_px": round(float(np.median(d)), 2) if len(d) else None,
        "diameter_quartiles_px": [round(float(q), 2) for q in np.percentile(d, [25, 75])]
        if len(d)
        else None,
        "objects": len(d),
        "measure": "median equivalent diameter of the training masks' objects",
    }


def _read_window(image: LazyImage, side: int) -> np.ndarray:
    """The central ``side``-px square of a 2D image (clipped to it), (C, Y, X)."""
    region = []
    for n in image.spatial_shape:
        start = max(0, (n - side) // 2)
        region.append(slice(start, min(n, start + side)))
    return image.read(tuple(region))


def _coarser(image: LazyImage, factor: float) -> tuple[LazyImage, float]:
    """The coarsest pyramid level of ``image`` that a shrink by ``factor`` does not
    undersample, and the factor left to apply to it: a 1/16 shrink of a 256 px window then
    reads a few hundred pixels of a low level, not 4096² of the full resolution."""
    best, left = image, factor
    for level in range(getattr(image, "level", 0) + 1, getattr(image, "n_levels", 1)):
        lazy = image.at_level(level)
        down = image.spatial_shape[-1] / lazy.spatial_shape[-1]
        if factor * down > 1 + 1e-6:
            break
        best, left = lazy, factor * down
    return best, left


def _measure(
    predictor, norm, image: LazyImage, factor: float, window: int, *, split: int | None = None
) -> np.ndarray:
    """Diameters (px of ``image``) of the objects the model finds in a window resized by
    ``factor`` so that it is about ``window`` px per side: its connected components, or with
    ``split`` its touching objects split at peaks at least ``split`` px apart."""
    from pipeline.models.inference import predict_whole

    source, left = _coarser(image, factor) if factor < 1 else (image, factor)
    x = norm.apply(_read_window(source, math.ceil(window / left)))
    if left != 1:  # antialiased when shrinking, as any downsampling of the image should be
        from skimage.transform import rescale  # imported only where needed: ~0.2 s

        x = rescale(x, (1, left, left), order=1, anti_aliasing=left < 1, mode="reflect")
    if min(x.shape[1:]) < 16:
        return np.zeros(0)
    probs = predict_whole(predictor, x.astype(np.float32), geometry=predictor.model.geometry)
    mask = probs.argmax(0) > 0
    return (
        object_diameters(mask if split is None else watershed_split(mask, min_distance=split))
        / factor
    )


def estimate_object_size(
    image: LazyImage,
    model: LoadedModel,
    *,
    trained_size: float | None = None,
    window: int = 256,
    device: str = "cpu",
    predictor: Predictor | None = None,
    normalization: Normalization | None = None,
) -> SizeEstimate:
    """Estimate the typical object diameter of a 2D image, in its pixels, with the model.

    Parameters
    ----------
    image
        A lazy image (or anything with ``spatial_shape``, ``read`` and ``n_channels``); only
        central windows of it are read.
    model
        The segmentation model; its recorded trained diameter is the target scale.
    trained_size
        The trained diameter, for models that do not record it.
    window
        Side of the analysed window after resizing (px): the cost of one factor's forward.
    device
        Where the model runs.
    predictor
        The model as a run already prepared it (``device`` is then its own), instead of a
        predictor made for this estimate.
    normalization
        The image's percentile normalisation (1-99.8 %), when the caller has it already.

    Returns
    -------
    SizeEstimate
        The median diameter of the objects found at the factor closest to the trained size
        (among the factors whose objects a neighbouring factor finds at about the same size in
        the image, when any does), measured again at the factor it implies. Raises
        ``ValueError`` when no factor finds objects or the model records no trained size.
    """
    from pipeline.preprocess.normalize import compute_normalization

    trained = trained_size or trained_object_size(model)
    if not trained:
        raise ValueError("the model records no trained object size: give trained_size")
    if len(image.spatial_shape) != 2:
        raise ValueError("object sizes are estimated on 2D images")
    norm = normalization or compute_normalization(image, mode="percentile")
    predictor = predictor or _predictor(model, device)
    ladder = [(f, _measure(predictor, norm, image, f, window)) for f in _LADDER]
    factor, d = _closest_confirmed(ladder, trained)
    for _ in range(_REMEASURE):
        exact = scale_factor(float(np.median(d)), trained)
        found = _measure(predictor, norm, image, exact, window, split=max(1, round(trained / 2)))
        if len(found) < _MIN_OBJECTS:  # the exact factor lost them: keep the last measurement
            break
        factor, d = exact, found
    return SizeEstimate(float(np.median(d)), factor, len(d), trained)


def _medians(ladder: list[tuple[float, np.ndarray]]) -> list[float | None]:
    """Each factor's median diameter (px of the image), None where too few objects."""
    return [float(np.median(d)) if len(d) >= _MIN_OBJECTS else None for _, d in ladder]


def _confirmed(medians: list[float | None], i: int) -> bool:
    """Whether a neighbouring factor of the ladder finds objects of about factor ``i``'s size
    in the image: texture inside large objects (chromocentres, nucleoli, specks) can look like
    objects at one factor, while the objects themselves keep their size from one to the next."""
    own = medians[i]
    near = [medians[j] for j in (i - 1, i + 1) if 0 <= j < len(medians)]
    return own is not None and any(
        m is not None and abs(math.log(m / own)) < _SAME_SIZE for m in near
    )


def _closest_confirmed(
    ladder: list[tuple[float, np.ndarray]], trained: float
) -> tuple[float, np.ndarray]:
    """The ladder's factor whose objects look closest to the trained size, among the
    :func:`_confirmed` ones; without any, every factor with objects competes."""
    medians = _medians(ladder)
    found = [i for i, m in enumerate(medians) if m is not None]
    if not found:
        raise ValueError("no objects found at any scale")
    pool = [i for i in found if _confirmed(medians, i)] or found
    best = min(pool, key=lambda i: abs(math.log(medians[i] * ladder[i][0] / trained)))
    return ladder[best]


def _predictor(model: LoadedModel, device: str) -> Predictor:
    from pipeline.models.inference import Predictor

    return Predictor.create(model, device=device, precision="fp32", channels_last="on")


class _Plane:
    """One Z plane of a volume as a 2D image, read lazily: what the size is found on."""

    level, n_levels, spatial_axes = 0, 1, "YX"

    def __init__(self, volume: LazyImage, z: int) -> None:
        self.volume, self.z = volume, z
        self.path = f"{volume.path} (plane {z})"
        self.spatial_shape = tuple(volume.spatial_shape[1:])
        self.level_shapes = (self.spatial_shape,)
        self.n_channels, self.dtype = volume.n_channels, volume.dtype
        self.pixel_size = volume.pixel_size[1:] if volume.pixel_size else None

    def read(self, spatial_region: tuple[slice, ...]) -> np.ndarray:
        return self.volume.read((slice(self.z, self.z + 1), *spatial_region))[:, 0]

    def at_level(self, level: int) -> _Plane:
        return self

    def close(self) -> None:
        pass  # the volume stays open: the run reads it


def on_one_plane(image: LazyImage, model: LoadedModel) -> tuple[LazyImage, LoadedModel]:
    """A volume that a 2D model segments plane by plane, as its middle plane (read lazily;
    ``path`` names the plane) and the 2D model: where its objects are sized. Any other image
    and model as they are."""
    from pipeline.models.planes import module_ndim, one_plane_model

    if len(image.spatial_shape) != 3 or module_ndim(model) != 2:
        return image, model
    return _Plane(image, middle_plane(image)), one_plane_model(model)


def middle_plane(volume: LazyImage) -> int:
    """The Z index of a volume's middle plane, the one :func:`on_one_plane` looks at."""
    return volume.spatial_shape[0] // 2


def size_warning(
    image: LazyImage,
    model: LoadedModel,
    *,
    tolerance: float = 2.0,
    device: str = "cpu",
    predictor: Predictor | None = None,
    normalization: Normalization | None = None,
) -> str | None:
    """One line for ``tileseg segment`` when the image's objects look far from the model's
    trained size (beyond a factor ``tolerance`` either way), else None.

    Three forwards of a central window settle the usual case: objects found near the trained
    size at the image's own scale, and at about the same size at half or twice that scale
    (:func:`_confirmed`); only otherwise is the size estimated. A volume that a 2D
    model segments plane by plane is looked at on its middle plane (:func:`on_one_plane`).
    Models without a recorded trained size, other 3D images, and images where no objects are
    found give None: the check is advice, never a reason to stop a run. ``predictor``: the
    model as the run prepared it (shared, so the check costs three small forwards, not a copy
    of the model); ``normalization``: the image's 1-99.8 % percentile normalisation, when the run
    has it.
    """
    from pipeline.preprocess.normalize import compute_normalization

    plane, flat = on_one_plane(image, model)
    if flat is not model:  # a volume: the 2D model on its middle plane, not the run's predictor
        image, model, predictor = plane, flat, None
    trained = trained_object_size(model)
    if trained is None or len(image.spatial_shape) != 2:
        return None
    norm = normalization or compute_normalization(image, mode="percentile")
    predictor = predictor or _predictor(model, device)
    medians = _medians([(f, _measure(predictor, norm, image, f, 256)) for f in (2.0, 1.0, 0.5)])
    if _confirmed(medians, 1) and 1 / tolerance <= medians[1] / trained <= tolerance:
        return None
    try:
        found = estimate_object_size(
            image, model, device=device, predictor=predictor, normalization=norm
        )
    except ValueError:
        return None
    if 1 / tolerance <= found.diameter / found.trained <= tolerance:
        return None
    return (
        f"{image.path}: objects look about {found.diameter:.0f} px across, the model was trained "
        f"at {found.trained:.0f} px; segmenting at that scale may find parts of objects or "
        f"miss them (give --object-size {found.diameter:.0f}, or --object-size auto)"
    )


def warn_object_size(
    image: LazyImage,
    model: LoadedModel,
    *,
    device: str = "cpu",
    predictor: Predictor | None = None,
    normalization: Normalization | None = None,
) -> None:
    """Log :func:`size_warning`'s line, if any, as a warning (stderr when logging is not set
    up): the hook ``tileseg segment`` calls once per image, when no object size is given."""
    line = size_warning(
        image, model, device=device, predictor=predictor, normalization=normalization
    )
    if line is not None:
        logging.getLogger("tileseg").warning("tileseg: warning: %s", line)
