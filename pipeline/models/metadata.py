"""What a model says about itself beyond its geometry: class names, and the pixel size and
object size it was trained at, read from any model kind's metadata and checked the same way."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipeline.errors import TilesegError

__all__ = ["ModelMetadata", "parse_metadata"]


@dataclass(frozen=True)
class ModelMetadata:
    """Optional facts about a model's output and training data.

    Attributes
    ----------
    class_names
        One name per output class (channel of the logits), e.g. ``("background", "nucleus")``.
    pixel_size_um
        The pixel size (µm, in Y and X) of the images the model was trained at.
    object_size_px
        The typical object diameter (px) of the images the model was trained at, for a model
        without a training record (a tileseg model's record measures it).
    """

    class_names: tuple[str, ...] | None = None
    pixel_size_um: float | None = None
    object_size_px: float | None = None

    def to_dict(self) -> dict[str, Any]:
        names = None if self.class_names is None else list(self.class_names)
        return {
            "class_names": names,
            "pixel_size_um": self.pixel_size_um,
            "object_size_px": self.object_size_px,
        }


def parse_metadata(data: dict[str, Any], *, classes: int | None, source: Any) -> ModelMetadata:
    """``class_names``, ``pixel_size_um`` and ``object_size_px`` from a model's metadata
    mapping (missing: None).

    Raises
    ------
    TilesegError
        Names that are not distinct strings, or not one per class; a pixel or object size that
        is not a positive number.
    """
    names = data.get("class_names")
    if names is not None:
        if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
            raise TilesegError(source, f"class_names must be a list of strings, not {names!r}")
        if len(set(names)) != len(names) or not all(n.strip() for n in names):
            raise TilesegError(source, f"class_names must be distinct and not empty: {names!r}")
        if classes is not None and len(names) != classes:
            problem = f"{len(names)} class_names {list(names)} for a model of {classes} classes"
            raise TilesegError(source, problem)
        names = tuple(names)
    sizes = [_positive(data.get(key), key, source) for key in ("pixel_size_um", "object_size_px")]
    return ModelMetadata(names, *sizes)


def _positive(value: Any, key: str, source: Any) -> float | None:
    if value is None:
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise TilesegError(source, f"{key} must be a positive number, not {value!r}")
    return float(value)
