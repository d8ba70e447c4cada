"""ONNX models through onnxruntime (the optional ``onnx`` extra).

The model is wrapped as a parameter-free ``torch.nn.Module`` so that the rest of the engine
(batching, layouts, labels and probabilities on the device) treats it like any other model:
its forward hands the batch to an onnxruntime session, the CUDA execution provider for a batch
on a CUDA device where onnxruntime has it, else the CPU one, and returns the output on the
batch's device. Geometry is probed as for TorchScript (:mod:`pipeline.models.probe`); the
spatial dimensions must be dynamic, the channel dimension fixed.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import TilesegError
from pipeline.models.files import LoadedModel, file_sha256
from pipeline.models.metadata import parse_metadata
from pipeline.models.probe import Forward, probe_geometry

__all__ = ["OnnxModule", "load_onnx", "onnx_module"]

METADATA_KEY = "tileseg"  # optional JSON in the model's metadata_props, as tileseg.json


def _runtime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime


def _session(model: str | bytes, *, device: torch.device, threads: int = 0) -> Any:
    ort = _runtime()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # refused probe sizes are errors the caller handles
    options.intra_op_num_threads = threads
    providers: list[Any] = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        cuda = ("CUDAExecutionProvider", {"device_id": device.index or 0})
        providers = [cuda, "CPUExecutionProvider"]
    return ort.InferenceSession(model, options, providers=providers)


class OnnxModule(torch.nn.Module):
    """An ONNX model (a file, or its bytes) as a module: (N, C, *spatial) float32 in, its first
    output back."""

    def __init__(self, model: str | bytes, *, input_name: str, batch_one: bool) -> None:
        super().__init__()
        self.model, self.input_name, self.batch_one = model, input_name, batch_one
        self._sessions: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __deepcopy__(self, memo: dict[int, Any]) -> OnnxModule:
        # Predictors copy their model; sessions are thread-safe and hold no torch state.
        return self

    def session(self, device: torch.device) -> Any:
        with self._lock:
            key = str(device)
            if key not in self._sessions:
                self._sessions[key] = _session(self.model, device=device)
            return self._sessions[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        session = self.session(x.device)
        batch = x.detach().float().cpu().contiguous().numpy()
        parts = [batch[i : i + 1] for i in range(len(batch))] if self.batch_one else [batch]
        outputs = [session.run(None, {self.input_name: part})[0] for part in parts]
        return torch.from_numpy(np.concatenate(outputs)).to(x.device)


def _checked_input(
    session: Any, path: Path, axes: list[str] | None = None
) -> tuple[str, int, int, bool]:
    """(input name, spatial dimensions, channels, batch fixed at 1) of a model tileseg can
    tile: one float input of rank 4 or 5, the channels fixed, every spatial dimension dynamic.
    ``axes`` names the input's dimensions where they are not (batch, channel, *spatial)."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise TilesegError(path, f"the ONNX model has {len(inputs)} inputs; tileseg needs one")
    spec = inputs[0]
    if spec.type != "tensor(float)":
        raise TilesegError(path, f"the ONNX model's input is {spec.type}, not tensor(float)")
    shape = list(spec.shape)
    if len(shape) not in ((4, 5) if axes is None else (len(axes),)):
        raise TilesegError(
            path, f"the ONNX model's input has rank {len(shape)} {shape}; tileseg needs "
            f"{axes or '(N, C, Y, X) or (N, C, Z, Y, X)'}",
        )  # fmt: skip
    names = axes or ["batch", "channel", *("s" * (len(shape) - 2))]
    named = dict(zip(names, shape, strict=True))
    batch, channels = named.get("batch", 1), named.get("channel", 1)
    spatial = [d for a, d in zip(names, shape, strict=True) if a not in ("batch", "channel")]
    if not isinstance(channels, int):
        raise TilesegError(
            path, f"the ONNX model's channel dimension is dynamic ({channels!r}) in input "
            f"shape {shape}: only the batch and spatial dimensions may be",
        )  # fmt: skip
    if isinstance(batch, int) and batch != 1:
        raise TilesegError(path, f"the ONNX model's batch dimension is fixed at {batch}")
    fixed = [d for d in spatial if isinstance(d, int)]
    if fixed:
        raise TilesegError(
            path, f"the ONNX model's spatial dimensions are fixed in input shape {shape}: "
            "export it with dynamic spatial axes",
        )  # fmt: skip
    return spec.name, len(spatial), channels, isinstance(batch, int)


def load_onnx(
    path: str | os.PathLike[str],
    *,
    halo: int | None,
    align: int | None,
    force_halo: bool = False,
) -> LoadedModel:
    """Load an ONNX model and find its geometry by probing (``halo``/``align`` override it;
    so does a ``tileseg`` JSON entry in the model's metadata, like TorchScript's tileseg.json).
    """
    path = Path(path)
    module, probe_session = onnx_module(os.fspath(path), source=path)
    meta = _metadata(probe_session, path)
    geometry, how = probe_geometry(
        _forward(probe_session, module.input_name), ndim=module.ndim, channels=module.channels,
        source=path, halo=halo if halo is not None else meta.get("halo"),
        align=align if align is not None else meta.get("align"),
        force_halo=force_halo, reach_forward=_open_paths(path, module.input_name),
    )  # fmt: skip
    channels = module.channels
    facts = parse_metadata(meta, classes=meta.get("classes"), source=path)
    info = {"arch": "onnx", "metadata": meta, "geometry": how, **facts.to_dict()}
    return LoadedModel(
        module, geometry, channels, meta.get("classes"), file_sha256(path), os.fspath(path),
        info, facts,
    )  # fmt: skip


def onnx_module(
    model: str | bytes, *, source: Any, axes: list[str] | None = None
) -> tuple[OnnxModule, Any]:
    """The module of an ONNX model (a path or its bytes) whose input tileseg can tile, and a
    one-thread session for probing it; ``ndim`` and ``channels`` are set on the module.
    ``axes``: the input's dimension names, where they are not (batch, channel, *spatial)."""
    if _runtime() is None:
        raise TilesegError(source, "ONNX models need onnxruntime: pip install 'tileseg[onnx]'")
    try:
        probe_session = _session(model, device=torch.device("cpu"), threads=1)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TilesegError(source, f"cannot load ONNX model ({first})") from None
    name, ndim, channels, batch_one = _checked_input(probe_session, source, axes)
    module = OnnxModule(model, input_name=name, batch_one=batch_one)
    module.ndim, module.channels = ndim, channels
    return module, probe_session


def _open_paths(path: Path, name: str) -> Forward | None:
    """The model with every path open, for measuring its receptive field (as
    :func:`pipeline.models.files.open_paths` does for torch modules): positive weights and
    biases, batch norms with means 0 and variances 1, run on the absolute value of its input.
    None without the ``onnx`` package to edit the model with."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        return None
    model = onnx.load(os.fspath(path))
    stats = {}
    for node in model.graph.node:
        if node.op_type == "BatchNormalization" and len(node.input) >= 5:
            stats[node.input[3]], stats[node.input[4]] = 0.0, 1.0
    for init in model.graph.initializer:
        values = numpy_helper.to_array(init)
        if values.dtype.kind != "f":
            continue
        if init.name in stats:
            opened = np.full_like(values, stats[init.name])
        else:
            opened = np.abs(values) + values.dtype.type(1e-2)
        init.CopyFrom(numpy_helper.from_array(opened.astype(values.dtype), init.name))
    session = _session(model.SerializeToString(), device=torch.device("cpu"), threads=1)
    forward = _forward(session, name)
    return lambda x: forward(np.abs(x) + np.float32(1.0))


def _forward(session: Any, name: str) -> Forward:
    def forward(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: x})[0]

    return forward


def _metadata(session: Any, path: Path) -> dict[str, Any]:
    text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if not text:
        return {}
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TilesegError(
            path, f"bad {METADATA_KEY!r} metadata in the ONNX model ({exc})"
        ) from None
    if not isinstance(meta, dict):
        raise TilesegError(path, f"{METADATA_KEY!r} metadata in the ONNX model is not an object")
    return meta
