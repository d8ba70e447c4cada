"""bioimage.io model packages: a format-0.5 ``rdf.yaml`` (or ``*.bioimageio.yaml``) or a zipped
package, read with ``bioimageio.spec`` (the optional ``bioimageio`` extra).

What tileseg takes from a package:

* **weights**: TorchScript, else ONNX (others are refused in one line);
* **axes**: one input and one output tensor with batch (optional), channel (optional) and
  space axes in any order; the model is wrapped to take and give tileseg's (N, C, [Z,] Y, X);
* **geometry**: probed from the weights as for any external model
  (:mod:`pipeline.models.probe`); a larger output halo declared by the package wins;
* **preprocessing**: ``scale_range``, ``zero_mean_unit_variance``,
  ``fixed_zero_mean_unit_variance``, ``scale_linear`` and ``ensure_dtype`` (float32) reduce to
  one per-channel affine map whose statistics come from the whole image once, before any
  tile, so tiles still equal a whole-image pass; it replaces ``--normalize``;
* **postprocessing**: ``softmax``/``sigmoid`` over channels are what tileseg's probabilities
  are anyway; other steps are refused;
* **metadata**: output channel names as class names, the input's x scale in µm as pixel size.
"""

from __future__ import annotations

import gc
import hashlib
import io
import os
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.errors import TilesegError
from pipeline.models.files import LoadedModel, probe_threads, torch_forward
from pipeline.models.metadata import ModelMetadata, parse_metadata
from pipeline.models.onnx_model import onnx_module
from pipeline.models.probe import probe_geometry
from pipeline.preprocess.normalize import Normalization, percentiles_of, sample_pixels

if TYPE_CHECKING:
    from pipeline.io.readers import LazyImage

__all__ = ["AxesAdapter", "is_package", "load_bioimageio", "opened", "package_normalization"]

YAML_NAMES = ("rdf.yaml", "bioimageio.yaml")
SPACE = ("z", "y", "x")
AFFINE = ("ensure_dtype", "scale_range", "zero_mean_unit_variance",
          "fixed_zero_mean_unit_variance", "scale_linear")  # fmt: skip
POST = ("ensure_dtype", "softmax", "sigmoid")


def is_package(path: Path) -> bool:
    """A bioimage.io description file, or a zip holding one at its root."""
    if path.name.endswith(YAML_NAMES):
        return True
    if path.suffix != ".zip" or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith(YAML_NAMES) and "/" not in n for n in archive.namelist())


@contextmanager
def _quiet() -> Iterator[None]:
    """bioimageio.spec leaves file handles to the garbage collector, which warns about them:
    they are collected here, under the filter, not in whatever code runs next."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            yield
        finally:
            gc.collect()


@contextmanager
def opened(path: Path) -> Iterator[Any]:
    """What bioimageio.spec reads a package from: a zip we open and close (given the path, it
    keeps the zip open in a cache until the interpreter exits), or the description file."""
    if path.suffix != ".zip":
        yield path
        return
    with zipfile.ZipFile(path) as archive:
        yield archive


def _describe(path: Path, source: Any) -> Any:
    try:
        with _quiet():
            from bioimageio.spec import load_description
            from bioimageio.spec.model.v0_5 import ModelDescr
    except ImportError:
        raise TilesegError(
            path, "bioimage.io packages need bioimageio.spec: pip install 'tileseg[bioimageio]'"
        ) from None
    with _quiet():
        descr = load_description(source, format_version="latest", perform_io_checks=False)
    if not isinstance(descr, ModelDescr):
        errors = getattr(descr.validation_summary, "errors", None) or []
        first = f"{errors[0].loc}: {errors[0].msg}" if errors else type(descr).__name__
        raise TilesegError(path, f"not a valid bioimage.io model description ({first})")
    if len(descr.inputs) != 1 or len(descr.outputs) != 1:
        problem = f"{len(descr.inputs)} inputs and {len(descr.outputs)} outputs; tileseg needs 1"
        raise TilesegError(path, problem)
    return descr


def _axis_ids(tensor: Any, path: Path) -> list[str]:
    ids = []
    for axis in tensor.axes:
        if axis.type not in ("batch", "channel", "space") or (
            axis.type == "space" and str(axis.id) not in SPACE
        ):
            raise TilesegError(path, f"tensor {tensor.id!r}: axis {axis.id!r} ({axis.type}) "
                               "is not one tileseg tiles (batch, channel, z, y, x)")  # fmt: skip
        ids.append({"batch": "batch", "channel": "channel"}.get(axis.type, str(axis.id)))
    return ids


class AxesAdapter(torch.nn.Module):
    """A package's model seen as tileseg's (N, C, *spatial) -> (N, K, *spatial)."""

    def __init__(self, inner: torch.nn.Module, inputs: list[str], outputs: list[str]) -> None:
        super().__init__()
        self.inner, self.inputs, self.outputs = inner, inputs, outputs
        self.spatial = [a for a in SPACE if a in inputs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batched = "batch" in self.inputs
        parts = [x] if batched else list(x.split(1))
        return torch.cat([self._one(part, batched) for part in parts])

    def _one(self, x: torch.Tensor, batched: bool) -> torch.Tensor:
        names = ["batch", "channel", *self.spatial]
        if "channel" not in self.inputs:
            x, names = x[:, 0], [n for n in names if n != "channel"]
        if not batched:
            x, names = x[0], names[1:]
        y = self.inner(x.permute([names.index(a) for a in self.inputs]))
        names = list(self.outputs)
        if "batch" not in names:
            y, names = y.unsqueeze(0), ["batch", *names]
        if "channel" not in names:
            y, names = y.unsqueeze(1), [names[0], "channel", *names[1:]]
        return y.permute([names.index(a) for a in ["batch", "channel", *self.spatial]])


def _weights(descr: Any, path: Path) -> tuple[str, bytes]:
    from bioimageio.spec.utils import get_reader

    for kind in ("torchscript", "onnx"):
        entry = getattr(descr.weights, kind, None)
        if entry is not None:
            try:
                with _quiet():
                    return kind, get_reader(entry.source).read()
            except Exception as exc:
                raise TilesegError(path, f"{kind} weights {entry.source} missing ({exc})") from None
    given = [k for k, v in descr.weights if v is not None]
    raise TilesegError(path, f"no torchscript or onnx weights (the package has {given})")


def _inner_module(kind: str, data: bytes, path: Path, axes: list[str]) -> torch.nn.Module:
    if kind == "onnx":
        return onnx_module(data, source=path, axes=axes)[0]
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        if not any("/code/" in n or n.startswith("code/") for n in archive.namelist()):
            raise TilesegError(path, "torchscript weights are not a TorchScript archive")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.load` is", DeprecationWarning)
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    for param in module.parameters():
        param.requires_grad_(False)
    return module.eval()


def load_bioimageio(
    path: str | os.PathLike[str], *, halo: int | None, align: int | None, force_halo: bool = False
) -> LoadedModel:
    """Load a bioimage.io model package for tiling (see the module's docstring)."""
    path = Path(path)
    with opened(path) as package:
        descr = _describe(path, package)
        source, target = descr.inputs[0], descr.outputs[0]
        inputs, outputs = _axis_ids(source, path), _axis_ids(target, path)
        _check_processing(source.preprocessing, AFFINE, "preprocessing", path)
        _check_processing(target.postprocessing, POST, "postprocessing", path)
        kind, data = _weights(descr, path)
    module = AxesAdapter(_inner_module(kind, data, path, inputs), inputs, outputs).eval()
    channels = _channels(source)
    ndim = len(module.spatial)
    if ndim not in (2, 3):
        raise TilesegError(path, f"the input has {ndim} space axes; tileseg needs 2 or 3")
    with probe_threads():
        geometry, how = probe_geometry(
            torch_forward(module), ndim=ndim, channels=channels, source=path, halo=halo,
            align=align, force_halo=force_halo,
        )  # fmt: skip
    geometry, how = _package_halo(geometry, how, target, module.spatial, given=halo)
    names = _channel_names(target)
    ours = _tileseg_config(descr)
    size = parse_metadata({"object_size_px": ours.get("object_size_px")}, classes=None,
                          source=path).object_size_px  # fmt: skip
    facts = ModelMetadata(names, _pixel_size(source), size)
    digest = hashlib.sha256(path.read_bytes() + (b"" if path.suffix == ".zip" else data))
    info = {
        "arch": f"bioimageio/{kind}", "name": descr.name, "geometry": how,
        "preprocessing": [p.model_dump(mode="json") for p in source.preprocessing],
        "postprocessing": [p.model_dump(mode="json") for p in target.postprocessing],
        **facts.to_dict(),
    }  # fmt: skip
    if ours.get("training"):  # a tileseg model's record: its object size among it
        info["training"] = ours["training"]
    steps = [p.model_dump(mode="json") for p in source.preprocessing]
    normalize = _normalizer(steps, path) if any(s["id"] != "ensure_dtype" for s in steps) else None
    classes = None if names is None else len(names)
    return LoadedModel(
        module, geometry, channels, classes, digest.hexdigest(), os.fspath(path), info, facts,
        normalization=normalize,
    )  # fmt: skip


def _tileseg_config(descr: Any) -> dict[str, Any]:
    """The package's ``config.tileseg`` entry (a training record, ``object_size_px``), if any."""
    config = descr.config.model_dump(mode="json") if descr.config is not None else {}
    ours = config.get("tileseg")
    return ours if isinstance(ours, dict) else {}


def _check_processing(steps: Any, allowed: tuple[str, ...], what: str, path: Path) -> None:
    for step in steps:
        if step.id not in allowed:
            raise TilesegError(path, f"{what} {step.id!r} is not supported (only {allowed})")
        kwargs = getattr(step, "kwargs", None)
        if step.id == "ensure_dtype" and str(kwargs.dtype) not in ("float32", "float64"):
            raise TilesegError(path, f"{what} ensure_dtype {kwargs.dtype} is not supported")
        if step.id == "scale_range" and kwargs.reference_tensor not in (None,):
            raise TilesegError(path, f"{what} scale_range of another tensor is not supported")
        if step.id in ("softmax", "sigmoid") and str(getattr(kwargs, "axis", "channel")) != (
            "channel"
        ):
            raise TilesegError(path, f"{what} {step.id} not over channels is not supported")


def _channels(tensor: Any) -> int:
    for axis in tensor.axes:
        if axis.type == "channel":
            return len(axis.channel_names)
    return 1


def _channel_names(tensor: Any) -> tuple[str, ...] | None:
    for axis in tensor.axes:
        if axis.type == "channel":
            return tuple(str(n) for n in axis.channel_names)
    return None


def _pixel_size(tensor: Any) -> float | None:
    for axis in tensor.axes:
        if axis.type == "space" and str(axis.id) == "x" and axis.unit == "micrometer":
            return float(axis.scale)
    return None


def _package_halo(geometry: Any, how: dict, target: Any, spatial: list[str], *, given: int | None):
    """A package may declare more output halo than its measured field: the larger is kept."""
    if given is not None:
        return geometry, how
    declared = {str(a.id): int(getattr(a, "halo", 0) or 0) for a in target.axes}
    halos = list(geometry.halo)
    for i, axis in enumerate(spatial):
        need = declared.get(axis, 0) + geometry.shrink[i]
        if need > halos[i]:
            period = geometry.align[i]
            halos[i] = -(-need // period) * period
            how = {**how, "halo_from": "package"}
    how = {**how, "halo": halos, "package_halo": [declared.get(a, 0) for a in spatial]}
    return replace(geometry, halo=tuple(halos)), how


# -- preprocessing -------------------------------------------------------------------------


def _normalizer(steps: list[dict], path: Path) -> Callable[[LazyImage], Normalization]:
    def normalize(image: LazyImage) -> Normalization:
        return package_normalization(image, steps, source=path)

    return normalize


def _per_channel(value: Any, c: int) -> np.ndarray:
    values = np.asarray(value, np.float64).reshape(-1)
    return np.broadcast_to(values, (c,)).copy() if values.size in (1, c) else values[:c]


def package_normalization(image: LazyImage, steps: list[dict], *, source: Any) -> Normalization:
    """The package's affine preprocessing as one per-channel ``x * scale + offset``, its
    statistics taken once from the whole image (tileseg's bounded sample of it)."""
    pixels, where = sample_pixels(image)
    c = pixels.shape[0]
    scale, offset = np.ones(c), np.zeros(c)
    for step in steps:
        kind, kw = step["id"], step.get("kwargs") or {}
        x = pixels * scale[:, None] + offset[:, None]
        joint = kw.get("axes") is None or "channel" in (kw.get("axes") or [])
        if kind == "scale_range":
            q = (kw.get("min_percentile", 0.0), kw.get("max_percentile", 100.0))
            data = x.reshape(1, -1) if joint else x
            lo, hi = (np.broadcast_to(v, (c,)) for v in percentiles_of(data, q, axis=1))
            a = 1.0 / (hi - lo + kw.get("eps", 1e-6))
            scale, offset = scale * a, (offset - lo) * a
        elif kind == "zero_mean_unit_variance":
            data = x.reshape(1, -1) if joint else x
            mean = np.broadcast_to(data.mean(axis=1), (c,))
            std = np.broadcast_to(data.std(axis=1), (c,))
            a = 1.0 / (std + kw.get("eps", 1e-6))
            scale, offset = scale * a, (offset - mean) * a
        elif kind == "fixed_zero_mean_unit_variance":
            mean, std = _per_channel(kw["mean"], c), _per_channel(kw["std"], c)
            a = 1.0 / (std + kw.get("eps", 1e-6))
            scale, offset = scale * a, (offset - mean) * a
        elif kind == "scale_linear":
            gain, shift = _per_channel(kw.get("gain", 1.0), c), _per_channel(kw.get("offset", 0), c)
            scale, offset = scale * gain, offset * gain + shift
    summary = ", ".join(s["id"] for s in steps)
    return Normalization(
        tuple(float(s) for s in scale), tuple(float(o) for o in offset), "model",
        f"bioimage.io preprocessing ({summary}) from {where}",
    )  # fmt: skip
