"""Model files: the native single-file ``.safetensors`` format and external TorchScript archives.

Nothing here ever unpickles: safetensors holds raw tensors plus a JSON metadata header, and a
TorchScript archive is checked to be one (it has a ``code/`` section) before ``torch.jit.load``;
a plain ``torch.save`` checkpoint is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.errors import TilesegError
from pipeline.geometry import ModelGeometry
from pipeline.models.unet import UNet, UNetConfig, seeded_unet

FORMAT_VERSION = "1"
DEFAULT_MODEL = Path(__file__).with_name("default.safetensors")
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


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_unet(
    model: UNet, path: str | os.PathLike[str], *, training: dict[str, Any] | None = None
) -> None:
    """Write a built-in U-Net as one ``.safetensors`` file with its config in the metadata."""
    metadata = {
        "tileseg.format": FORMAT_VERSION,
        "tileseg.arch": "unet",
        "tileseg.config": json.dumps(model.config.to_dict()),
    }
    if training is not None:
        metadata["tileseg.training"] = json.dumps(training)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, os.fspath(path), metadata=metadata)


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
    return LoadedModel(
        model.eval(), config.geometry, config.in_channels, config.classes,
        file_sha256(path), os.fspath(path), info,
    )  # fmt: skip


def default_model() -> LoadedModel:
    """The shipped default model, or a seeded untrained U-Net when none is shipped."""
    if DEFAULT_MODEL.exists():
        return load_unet(DEFAULT_MODEL)
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
    path: str | os.PathLike[str], *, halo: int | None, align: int | None, ndim: int | None = None
) -> LoadedModel:
    """Load an external fully convolutional TorchScript model.

    Halo and alignment come from the arguments or from a ``tileseg.json`` extra file in the
    archive (``{"halo": N, "align": N, "ndim": 2, "in_channels": C, "classes": K}``). The shrink
    (valid convolutions) is measured with dummy inputs; without ``ndim``, a 5D first
    convolution weight makes the model 3D.
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
    halo = halo if halo is not None else meta.get("halo")
    align = align if align is not None else meta.get("align")
    ndim = ndim or int(meta.get("ndim") or _conv_ndim(module) or 2)
    in_channels = meta.get("in_channels") or _first_conv_channels(module, ndim)
    if align is None:
        raise TilesegError(path, "unknown alignment: pass --align or add tileseg.json to the model")
    module.eval()
    # Inference only. A copy of a ScriptModule (each predictor's) has non-leaf parameters while
    # they require grad, and moving those to channels-last warns about their .grad.
    for param in module.parameters():
        param.requires_grad_(False)
    align = int(align)
    shrink, size_min = _probe_shrink(module, path, ndim=ndim, align=align, cin=in_channels or 1)
    if halo is None:
        if shrink == 0:
            raise TilesegError(path, "unknown halo of a same-padded model: pass --halo")
        halo = shrink
    if halo < shrink:
        raise TilesegError(path, f"halo {halo} is smaller than the model's shrink {shrink}")
    geometry = ModelGeometry.uniform(
        ndim, halo=int(halo), align=align, shrink=shrink, size_min=size_min, size_step=align
    )
    info = {"arch": "torchscript", "tileseg.json": meta}
    return LoadedModel(
        module, geometry, in_channels, meta.get("classes"), file_sha256(path), os.fspath(path), info
    )


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


def _probe_shrink(
    module: torch.nn.Module, path: Path, *, ndim: int, align: int, cin: int
) -> tuple[int, int]:
    """Find (shrink, smallest probed valid input size) by running small dummy inputs.

    Valid sizes are assumed to repeat with the alignment period; two sizes one period apart
    must give the same shrink, otherwise the model is not translation-equivariant the way
    overlap-tile inference needs."""
    base = max(4, math.ceil(64 / align)) * align
    for size in range(base, base + align):
        outs = []
        for s in (size, size + align):
            x = torch.zeros((1, cin) + (s,) * ndim)
            try:
                with torch.inference_mode():
                    y = module(x)
            except Exception:
                break
            if y.dim() != ndim + 2 or len(set(y.shape[2:])) != 1 or (s - y.shape[-1]) % 2:
                break
            outs.append((s - y.shape[-1]) // 2)
        if len(outs) == 2 and outs[0] == outs[1] and outs[0] >= 0:
            return outs[0], size
    raise TilesegError(path, "could not find a valid input size for this model with dummy tiles")
