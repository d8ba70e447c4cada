"""Models: the built-in U-Net, its file format, external TorchScript and ONNX models, loading."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import TilesegError
from pipeline.models.bioimageio import is_package, load_bioimageio
from pipeline.models.files import (
    HE_MODEL,
    LoadedModel,
    default_model,
    load_torchscript,
    load_unet,
    save_unet,
)
from pipeline.models.metadata import ModelMetadata
from pipeline.models.onnx_model import load_onnx
from pipeline.models.planes import plane_model
from pipeline.models.unet import UNet, UNetConfig, seeded_unet

if TYPE_CHECKING:
    from pipeline.config import SegmentOptions
    from pipeline.io.readers import LazyImage

__all__ = [
    "LoadedModel",
    "ModelMetadata",
    "ModelSpec",
    "UNet",
    "UNetConfig",
    "load_model",
    "save_unet",
    "seeded_unet",
]


@dataclass(frozen=True)
class ModelSpec:
    """Which model to use: small and picklable, so workers load the model themselves."""

    path: str | None = None
    halo: int | None = None
    align: int | None = None
    force_halo: bool = False
    planes: bool = False  # a 2D model run plane by plane on a volume (models/planes.py)

    @classmethod
    def from_options(cls, options: SegmentOptions) -> ModelSpec:
        """The model a run's options name, with their geometry overrides."""
        return cls(options.model, options.halo, options.align, force_halo=options.force_halo)

    @classmethod
    def for_image(cls, options: SegmentOptions, image: LazyImage) -> ModelSpec:
        """The model a run on ``image`` uses: ``--model`` when given; else the shipped H&E model
        for RGB brightfield input (:func:`~pipeline.preprocess.stain.is_brightfield`; not with
        ``--stain hematoxylin``, which feeds the one-channel default model), else the default
        model."""
        from pipeline.preprocess.stain import is_brightfield

        spec = cls.from_options(options)
        if spec.path is not None or options.stain == "hematoxylin" or not HE_MODEL.is_file():
            return spec
        return replace(spec, path=os.fspath(HE_MODEL)) if is_brightfield(image) else spec

    def load(self) -> LoadedModel:
        return load_model(self)

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """One name per output class, when the model's metadata has them (the model is loaded
        once per process to read them)."""
        return load_model(self).class_names

    @property
    def pixel_size_um(self) -> float | None:
        """The pixel size (µm) the model was trained at, when its metadata says."""
        return load_model(self).pixel_size_um


_cache: dict[tuple[ModelSpec, tuple[int, int] | None], LoadedModel] = {}
_cache_lock = threading.Lock()


def _stamp(path: str | None) -> tuple[int, int] | None:
    """A model file replaced in place (retrained) must not be served from the cache."""
    try:
        st = os.stat(path) if path is not None else None
    except OSError:
        return None
    return None if st is None else (st.st_mtime_ns, st.st_size)


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load a model once per process (cached by spec and file stamp)."""
    flat = load_model(replace(spec, planes=False)) if spec.planes else None
    key = (spec, _stamp(spec.path))
    with _cache_lock:
        if key not in _cache:
            _cache[key] = _load_uncached(spec) if flat is None else plane_model(flat)
        return _cache[key]


def _load_uncached(spec: ModelSpec) -> LoadedModel:
    path = None if spec.path is None else Path(spec.path)
    if path is not None and path.suffix in (".pt", ".pth", ".ts", ".torchscript"):
        if not path.is_file():
            raise TilesegError(path, "model file not found")
        return load_torchscript(path, halo=spec.halo, align=spec.align, force_halo=spec.force_halo)
    if path is not None and is_package(path):
        if not path.is_file():
            raise TilesegError(path, "model file not found")
        return load_bioimageio(path, halo=spec.halo, align=spec.align, force_halo=spec.force_halo)
    if path is not None and path.suffix == ".onnx":
        if not path.is_file():
            raise TilesegError(path, "model file not found")
        return load_onnx(path, halo=spec.halo, align=spec.align, force_halo=spec.force_halo)
    if spec.halo is not None or spec.align is not None or spec.force_halo:
        # A built-in U-Net knows its geometry; a silent override could break exactness.
        raise TilesegError(
            path, "--halo/--align/--force-halo apply to TorchScript and ONNX models only"
        )
    if path is None:
        return default_model()
    if not path.is_file():
        raise TilesegError(path, "model file not found")
    if path.suffix != ".safetensors":
        raise TilesegError(
            path, "unknown model format (expected .safetensors, TorchScript .pt or .onnx)"
        )
    return load_unet(path)
