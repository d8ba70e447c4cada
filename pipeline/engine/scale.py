"""The scale an image is segmented at: given, estimated, or the model's pixel size.

A U-Net segments objects near the size it was trained on. :func:`choose_scale` decides, once
per image and before any work starts, the grid the model sees:

- ``--object-size PX``: objects of ``PX`` input pixels are brought to the size the model
  segments at, the upper quartile of its training objects' diameters (a resampling factor
  ``PX / target``; > 1 shrinks the image;
  :func:`~pipeline.objects.size.target_object_size`);
- ``--object-size auto``: the same, with ``PX`` estimated by the model on the image
  (:func:`~pipeline.objects.size.estimate_object_size`), on a coarse pyramid level
  when the file has one and its objects are still well resolved there;
- ``--mpp UM``: the image at that pixel size; with ``--object-size`` too, the object size is in
  pixels of the image at ``UM`` and the factors multiply;
- neither, with a model that records the pixel size it was trained at and an image that states
  its own: the image at the model's pixel size.

All of them read the image through :func:`pipeline.io.resolution.at_scale`, the one resampling
rule, so tiles stay exact. The labels are written on the model's grid or, on request (and by
default for ``--object-size``), on the input's grid (:class:`Scale`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipeline.config import SegmentOptions
from pipeline.errors import TilesegError
from pipeline.io.readers import LazyImage
from pipeline.io.resolution import at_scale
from pipeline.models import LoadedModel
from pipeline.models.planes import module_ndim
from pipeline.objects.size import (
    estimate_object_size,
    middle_plane,
    on_one_plane,
    target_object_size,
    trained_object_size,
)
from pipeline.preprocess.normalize import compute_normalization
from pipeline.preprocess.stain import slide_stain

__all__ = ["Scale", "choose_scale", "scale_note"]

# Levels coarser than this (per side) are not used for the estimate: their objects are blurred
# into each other even when they are large.
_ESTIMATE_MAX_DOWNSAMPLE = 8.0


@dataclass(frozen=True)
class Scale:
    """The grid an image is segmented on, and the grid its labels are written on.

    Attributes
    ----------
    image
        What the model segments: ``input`` itself, another level of it, or a resampled view.
    input
        The image as opened (``--level``): the labels' grid with ``labels_at == "input"``.
    labels_at
        ``"model"`` (the labels have ``image``'s shape) or ``"input"`` (``input``'s shape).
    input_factor
        One pixel of ``image`` in pixels of ``input``, per spatial axis.
    record
        What was done and why, for the output's record (None when nothing was resampled).
    """

    image: LazyImage
    input: LazyImage
    labels_at: str = "model"
    input_factor: tuple[float, ...] = ()
    record: dict[str, Any] | None = None

    @property
    def upsampled(self) -> bool:
        """Whether the labels are brought from the model's grid to another (the input's)."""
        return self.labels_at == "input" and self.image.spatial_shape != self.input.spatial_shape

    @property
    def labels_image(self) -> LazyImage:
        """The image on whose grid the labels are written (measurements read it)."""
        return self.input if self.labels_at == "input" else self.image


def choose_scale(
    image: LazyImage, model: LoadedModel, options: SegmentOptions, *, device: str = "cpu"
) -> Scale:
    """The scale ``image`` is segmented at with ``model`` under ``options`` (module docstring).

    Raises
    ------
    TilesegError
        ``--object-size`` with a model that records no trained object size, ``--object-size
        auto`` where no objects are found, ``--mpp`` on an image without a pixel size.
    """
    mpp, chosen = options.mpp, "given pixel size"
    if mpp is None and options.object_size is None and _model_pixel_size(image, model):
        mpp, chosen = model.pixel_size_um, "model pixel size"
    factor, sizes = 1.0, None
    if options.object_size is not None:
        if module_ndim(model) == 3:
            raise TilesegError(
                "--object-size",
                "sizes are for 2D models (on images, or volumes plane by plane); a 3D model "
                "takes --mpp",
            )
        trained = trained_object_size(model)
        if trained is None:
            raise TilesegError(
                "--object-size",
                f"the model ({model.source}) records no trained object size: give it with "
                "--model-object-size, or resample the image with --mpp",
            )
        if options.object_size == "auto":
            diameter, sizes = _estimate(image, model, trained, mpp=mpp, options=options)
            chosen = "auto"
        else:
            diameter, chosen = float(options.object_size), "given object size"
            sizes = {"object_size_px": diameter}
        target = target_object_size(model) or trained
        sizes.update(trained_object_size_px=trained, target_object_size_px=target)
        factor = diameter / target
    if mpp is None and options.object_size is None:
        return Scale(image, image, input_factor=(1.0,) * len(image.spatial_shape))
    resampled, record = at_scale(image, mpp=mpp, factor=factor)
    labels_at = options.labels_at or ("input" if options.object_size is not None else "model")
    record.update(chosen_by=chosen, scale_factor=factor, labels_at=labels_at, **(sizes or {}))
    return Scale(resampled, image, labels_at, tuple(record["input_factor"]), record)


def _model_pixel_size(image: LazyImage, model: LoadedModel) -> bool:
    """Whether the model's recorded pixel size applies: both it and the image's are known."""
    return bool(model.pixel_size_um and image.pixel_size and image.spatial_axes == "YX")


def _estimate(
    image: LazyImage,
    model: LoadedModel,
    trained: float,
    *,
    mpp: float | None,
    options: SegmentOptions,
) -> tuple[float, dict[str, Any]]:
    """The typical object diameter in pixels of ``image`` at ``mpp`` (of ``image`` without),
    estimated on the coarsest level where objects still look at least the trained size; a
    volume's on its middle plane."""
    flat, model = on_one_plane(image, model)
    plane = None if flat is image else middle_plane(image)
    image = flat
    if image.spatial_axes != "YX":
        raise TilesegError(image.path, "--object-size auto: sizes are estimated on 2D images")
    # H&E: the model sees the slide's stains mapped as the run maps them, fitted once here
    stain = slide_stain(image, options.stain, model.in_channels)
    kept = None  # the finest level's estimate so far: (estimate, level, its downsample)
    for level in _estimate_levels(image):
        ratio = math.sqrt(math.prod(_ratios(image, level)))
        norm = (
            None if stain is None else compute_normalization(level, mode="percentile", stain=stain)
        )
        try:
            found = estimate_object_size(
                level, model, trained_size=trained, device=options.device, normalization=norm
            )
            kept = (found, level.level, ratio)
        except ValueError:
            found = None
        finally:
            if level is not image:
                level.close()
        if found is not None and found.diameter >= trained:
            break  # well resolved at this level: finer ones would only cost more
    if kept is None:
        raise TilesegError(
            image.path, "--object-size auto: no objects found at any scale; give the size in px"
        )
    found, level_no, ratio = kept
    diameter = found.diameter * ratio  # in pixels of the image as opened
    if mpp is not None:
        assert image.pixel_size is not None
        diameter *= math.sqrt(math.prod(image.pixel_size)) / mpp
    estimate = {**found.to_dict(), "level": level_no, "level_downsample": round(ratio, 4)}
    if plane is not None:
        estimate["plane"] = plane
    return diameter, {"object_size_px": round(diameter, 2), "estimate": estimate}


def _estimate_levels(image: LazyImage) -> list[LazyImage]:
    """Levels to estimate on, coarsest first, ending with ``image`` itself."""
    levels = []
    for k in range(image.level + 1, image.n_levels):
        shape = image.level_shapes[k]
        if max(n / m for n, m in zip(image.spatial_shape, shape, strict=True)) > (
            _ESTIMATE_MAX_DOWNSAMPLE
        ):
            break
        levels.append(k)
    coarse = [image.at_level(k) for k in reversed(levels)]
    return [*coarse, image]


def _ratios(image: LazyImage, level: LazyImage) -> tuple[float, ...]:
    return tuple(n / m for n, m in zip(image.spatial_shape, level.spatial_shape, strict=True))


def scale_note(record: dict[str, Any] | None) -> str:
    """A few words for the command line's summary of a run: the scale it segmented at and how
    that was chosen (empty when the input was not resampled)."""
    if not record:
        return ""
    how = record.get("chosen_by", "")
    if record.get("object_size_px") is not None:
        how = f"{how}, objects {record['object_size_px']:.3g} px"
    factor = max(record.get("input_factor") or [1.0])
    return f", segmented at {factor:.3g} input px per pixel ({how})"
