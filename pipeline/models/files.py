"""Model files: the native single-file ``.safetensors`` format and external TorchScript archives.

Nothing here ever unpickles: safetensors holds raw tensors plus a JSON metadata header, and a
TorchScript archive is checked to be one (it has a ``code/`` section) before ``torch.jit.load``;
a plain ``torch.save`` checkpoint is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.errors import TilesegError
from pipeline.geometry import ModelGeometry
from pipeline.models.metadata import ModelMetadata, parse_metadata
from pipeline.models.probe import Forward, probe_geometry
from pipeline.models.unet import UNet, UNetConfig, seeded_unet

if TYPE_CHECKING:
    from pipeline.io.readers import LazyImage
    from pipeline.preprocess.normalize import Normalization

__all__ = [
    "DEFAULT_MODEL",
    "LoadedModel",
    "default_model",
    "file_sha256",
    "load_torchscript",
    "load_unet",
    "open_paths",
    "probe_threads",
    "read_metadata",
    "save_unet",
    "torch_forward",
]

FORMAT_VERSION = "1"
DEFAULT_MODEL = Path(__file__).with_name("default.safetensors")
HE_MODEL = Path(__file__).with_name("he.safetensors")  # RGB brightfield (configs/train-he.yaml)
DEFAULT_CLASS_NAMES = ("background", "nucleus")
SEEDED_DEFAULT = UNetConfig(ndim=2, in_channels=1, classes=2, depth=4, width=16, padding="valid")


@dataclass
class LoadedModel:
    """A model ready for inference with everything the tiler needs to know about it."""

    module: torch.nn.Module
    geometry: ModelGeometry
    in_channels: int | None
    classes: int | None
    sha256: str
    source: str
    info: dict[str, Any] = field(default_factory=dict)
    metadata: ModelMetadata = field(default_factory=ModelMetadata)
    # the model's own per-image normalisation (a bioimage.io package's preprocessing), which
    # replaces --normalize
    normalization: Callable[[LazyImage], Normalization] | None = None

    @property
    def class_names(self) -> tuple[str, ...] | None:
        return self.metadata.class_names

    @property
    def pixel_size_um(self) -> float | None:
        return self.metadata.pixel_size_um

    @property
    def training(self) -> dict[str, Any]:
        """The training record ``tileseg train`` wrote into the model; empty without one."""
        return (self.info or {}).get("training") or {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_unet(
    model: UNet,
    path: str | os.PathLike[str],
    *,
    training: dict[str, Any] | None = None,
    metadata: ModelMetadata | None = None,
) -> None:
    """Write a built-in U-Net as one ``.safetensors`` file with its config in the metadata
    (and, when given, its class names and training pixel size: ``tileseg.model``)."""
    header = {
        "tileseg.format": FORMAT_VERSION,
        "tileseg.arch": "unet",
        "tileseg.config": json.dumps(model.config.to_dict()),
    }
    if training is not None:
        header["tileseg.training"] = json.dumps(training)
    if metadata is not None and metadata != ModelMetadata():
        parse_metadata(metadata.to_dict(), classes=model.config.classes, source=path)
        header["tileseg.model"] = json.dumps(metadata.to_dict())
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, os.fspath(path), metadata=header)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata header of a tileseg ``.safetensors`` file, validated."""
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises several unrelated types for bad headers
        raise TilesegError(path, f"not a readable safetensors model file ({exc})") from None
    for key in ("tileseg.format", "tileseg.arch", "tileseg.config"):
        if key not in metadata:
            raise TilesegError(path, f"not a tileseg model: metadata key {key!r} is missing")
    if metadata["tileseg.format"] != FORMAT_VERSION:
        raise TilesegError(path, f"unsupported model format version {metadata['tileseg.format']!r}")
    if metadata["tileseg.arch"] != "unet":
        raise TilesegError(path, f"unknown architecture {metadata['tileseg.arch']!r}")
    return metadata


def load_unet(path: str | os.PathLike[str]) -> LoadedModel:
    metadata = read_metadata(path)
    try:
        config = UNetConfig.from_dict(json.loads(metadata["tileseg.config"]))
    except (ValueError, TypeError) as exc:
        raise TilesegError(path, f"bad model config in metadata: {exc}") from None
    model = UNet(config)
    try:
        model.load_state_dict(load_file(os.fspath(path)))
    except (RuntimeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise TilesegError(path, f"weights do not match the model config: {first}") from None
    info: dict[str, Any] = {"arch": "unet", "config": config.to_dict()}
    if "tileseg.training" in metadata:
        info["training"] = json.loads(metadata["tileseg.training"])
    try:
        facts = json.loads(metadata.get("tileseg.model", "{}"))
    except json.JSONDecodeError as exc:
        raise TilesegError(path, f"bad tileseg.model metadata ({exc})") from None
    facts = parse_metadata(facts, classes=config.classes, source=path)
    info.update(facts.to_dict())
    return LoadedModel(
        model.eval(), config.geometry, config.in_channels, config.classes,
        file_sha256(path), os.fspath(path), info, facts,
    )  # fmt: skip


def default_model() -> LoadedModel:
    """The shipped default model, or a seeded untrained U-Net when none is shipped."""
    if DEFAULT_MODEL.exists():
        loaded = load_unet(DEFAULT_MODEL)
        if loaded.class_names is None:
            # Named here, not in the file: rewriting it would change its sha256, and with it
            # the fingerprint of every output made with it.
            loaded.metadata = ModelMetadata(DEFAULT_CLASS_NAMES, loaded.pixel_size_um)
            loaded.info.update(loaded.metadata.to_dict())
        return loaded
    config = SEEDED_DEFAULT
    model = seeded_unet(config, seed=0)
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()
    info = {"arch": "unet", "config": config.to_dict(), "untrained": True}
    return LoadedModel(
        model, config.geometry, config.in_channels, config.classes, digest, "builtin:seeded", info
    )


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any("/code/" in n or n.startswith("code/") for n in names)


def load_torchscript(
    path: str | os.PathLike[str],
    *,
    halo: int | None,
    align: int | None,
    ndim: int | None = None,
    force_halo: bool = False,
) -> LoadedModel:
    """Load an external fully convolutional TorchScript model and find its geometry.

    Halo and alignment may come from the arguments or from a ``tileseg.json`` extra file in the
    archive (``{"halo": N, "align": N, "ndim": 2, "in_channels": C, "classes": K}``); whatever
    is not given is probed with dummy inputs (:mod:`pipeline.models.probe`): valid sizes and
    shrink always, the alignment from the period of valid sizes, the halo of a same-padded
    model from its measured receptive field. Without ``ndim``, a 5D first convolution weight
    makes the model 3D.
    """
    path = Path(path)
    if not _is_torchscript(path):
        reason = "not a TorchScript archive (pickled checkpoints are refused, never unpickled)"
        raise TilesegError(path, reason)
    extra = {"tileseg.json": ""}
    try:
        with warnings.catch_warnings():
            # TorchScript is deprecated upstream, but it is what users' exported models are.
            warnings.filterwarnings("ignore", r"`torch\.jit\.load` is", DeprecationWarning)
            module = torch.jit.load(os.fspath(path), map_location="cpu", _extra_files=extra)
    except Exception as exc:
        raise TilesegError(path, f"cannot load TorchScript model ({exc})") from None
    meta: dict[str, Any] = {}
    if extra["tileseg.json"]:
        try:
            meta = json.loads(extra["tileseg.json"])
        except json.JSONDecodeError as exc:
            raise TilesegError(path, f"bad tileseg.json in the archive ({exc})") from None
    ndim = ndim or int(meta.get("ndim") or _conv_ndim(module) or 2)
    in_channels = meta.get("in_channels") or _first_conv_channels(module, ndim)
    module.eval()
    # Inference only. A copy of a ScriptModule (each predictor's) has non-leaf parameters while
    # they require grad, and moving those to channels-last warns about their .grad.
    for param in module.parameters():
        param.requires_grad_(False)
    with probe_threads():
        geometry, how = probe_geometry(
            torch_forward(module), ndim=ndim, channels=in_channels or 1, source=path,
            halo=halo if halo is not None else meta.get("halo"),
            align=align if align is not None else meta.get("align"),
            force_halo=force_halo, reach_forward=open_paths(module),
        )  # fmt: skip
    facts = parse_metadata(meta, classes=meta.get("classes"), source=path)
    info = {"arch": "torchscript", "tileseg.json": meta, "geometry": how, **facts.to_dict()}
    return LoadedModel(
        module, geometry, in_channels, meta.get("classes"), file_sha256(path), os.fspath(path),
        info, facts,
    )  # fmt: skip


@contextmanager
def probe_threads() -> Iterator[None]:
    """One CPU thread for the probes' small dummy inputs: a parallel region's start costs more
    than it saves on them, and far more where other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def open_paths(module: torch.nn.Module) -> Forward:
    """The network of ``module`` with every path open, for measuring its receptive field: a
    copy with positive weights, biases and batch-norm scales (running means 0, variances 1),
    run on the absolute value of its input, so every ReLU passes and every input pixel that
    the architecture connects to an output changes it."""
    import copy

    opened = copy.deepcopy(module)
    with torch.no_grad():
        for name, tensor in [*opened.named_parameters(), *opened.named_buffers()]:
            if not tensor.is_floating_point():
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "running_mean":
                tensor.zero_()
            elif leaf == "running_var":
                tensor.fill_(1.0)
            else:
                tensor.abs_().add_(1e-2)
    forward = torch_forward(opened)
    return lambda x: forward(np.abs(x) + 1.0)


def torch_forward(module: torch.nn.Module) -> Forward:
    """A module as a numpy function of one float32 batch, for the geometry probes."""

    def forward(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x)).float().numpy()

    return forward


def _conv_ndim(module: torch.nn.Module) -> int | None:
    """Spatial dimensions of the first convolution weight (4D: 2D, 5D: 3D), so that a 3D model
    needs no tileseg.json to say so."""
    for p in module.parameters():
        if p.dim() in (4, 5):
            return p.dim() - 2
    return None


def _first_conv_channels(module: torch.nn.Module, ndim: int) -> int | None:
    """Input channels of the first convolution weight, the usual first parameter."""
    for p in module.parameters():
        if p.dim() == ndim + 2:
            return int(p.shape[1])
    return None
