"""``tileseg export-model --format bioimageio``: a tileseg U-Net as a bioimage.io package.

The package holds the model as TorchScript, its geometry as bioimage.io axes (smallest input
and step, the output's size relative to the input, the halo), tileseg's default normalisation
as ``scale_range`` preprocessing (per channel, 1-99.8 %, what ``tileseg train`` trains with),
softmax (sigmoid for one class) postprocessing, class names as output channel names, the
training pixel size as the space axes' scale, and a test input with the output the package's
model gives for it. It is validated with ``bioimageio.spec`` as it is written.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import TilesegError
from pipeline.models.bioimageio import _quiet
from pipeline.models.files import load_unet

__all__ = ["export_bioimageio"]

PERCENTILES = (1.0, 99.8)
UNET_PAPER = ("Ronneberger, Fischer, Brox: U-Net: Convolutional Networks for Biomedical Image "
              "Segmentation (MICCAI 2015)", "10.1007/978-3-319-24574-4_28")  # fmt: skip


def export_bioimageio(
    model_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    name: str | None = None,
    author: str = "tileseg user",
    license: str = "CC-BY-4.0",
) -> Path:
    """Write the ``.safetensors`` U-Net at ``model_path`` as the zipped package ``out``.

    Raises
    ------
    TilesegError
        When the model is not a tileseg U-Net, bioimageio.spec is missing, or the package does
        not validate.
    """
    out = Path(out)
    if out.suffix != ".zip":
        raise TilesegError(out, "the package file name must end with .zip")
    try:
        with _quiet():
            from bioimageio.spec import save_bioimageio_package
    except ImportError:
        raise TilesegError(
            out, "needs bioimageio.spec: pip install 'tileseg[bioimageio]'"
        ) from None
    loaded = load_unet(model_path)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with _quiet():
                descr = _description(loaded, Path(tmp), author=author, license=license,
                                     name=name or f"tileseg {Path(model_path).stem}")  # fmt: skip
                save_bioimageio_package(descr, output_path=out)
        except Exception as exc:  # pydantic's validation errors, several lines each
            first = " ".join(str(exc).strip().splitlines()[:3])
            raise TilesegError(out, f"the package does not validate ({first})") from None
    return out


def _test_pair(loaded: Any, directory: Path) -> tuple[Path, Path]:
    """A test input of the smallest valid size of at least 64 px beyond the halo, and the
    output of the package's pipeline for it (scale_range, the model, softmax)."""
    g, cin = loaded.geometry, loaded.in_channels
    shape = tuple(g.input_size(64, axis) for axis in range(g.ndim))
    rng = np.random.default_rng(0)
    raw = rng.gamma(2.0, 100.0, (1, cin, *shape)).astype(np.float32)
    axes = tuple(range(2, 2 + g.ndim))
    lo, hi = (np.percentile(raw, q, axis=axes, keepdims=True) for q in PERCENTILES)
    x = ((raw - lo) / (hi - lo + 1e-6)).astype(np.float32)
    with torch.inference_mode():
        logits = loaded.module(torch.from_numpy(x))
        y = torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)
    np.save(directory / "test_input.npy", raw)
    np.save(directory / "test_output.npy", y.numpy())
    return directory / "test_input.npy", directory / "test_output.npy"


def _description(loaded: Any, directory: Path, *, name: str, author: str, license: str) -> Any:
    from bioimageio.spec.model import v0_5 as b

    g, config = loaded.geometry, loaded.info["config"]
    classes = config["classes"]
    names = loaded.class_names or tuple(f"class{i}" for i in range(classes))
    spatial = ("z", "y", "x")[-g.ndim :]
    weights = directory / "weights.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is what the zoo runs
        torch.jit.save(torch.jit.script(loaded.module.eval()), str(weights))
    test_in, test_out = _test_pair(loaded, directory)
    unit = {} if loaded.pixel_size_um is None else {
        "scale": loaded.pixel_size_um, "unit": "micrometer"
    }  # fmt: skip
    inputs = b.InputTensorDescr(
        id=b.TensorId("raw"),
        axes=[b.BatchAxis(), b.ChannelAxis(channel_names=[b.Identifier(f"channel{i}")
                                                           for i in range(loaded.in_channels)]),
              *(b.SpaceInputAxis(id=b.AxisId(a), size=b.ParameterizedSize(
                  min=g.input_size(1, i), step=g.size_step[i]), **unit)
                for i, a in enumerate(spatial))],
        test_tensor=b.FileDescr(source=test_in),
        preprocessing=[b.ScaleRangeDescr(kwargs=b.ScaleRangeKwargs(
            axes=[b.AxisId(a) for a in spatial], min_percentile=PERCENTILES[0],
            max_percentile=PERCENTILES[1]))],
    )  # fmt: skip
    post = (b.SigmoidDescr() if classes == 1
            else b.SoftmaxDescr(kwargs=b.SoftmaxKwargs(axis=b.AxisId("channel"))))  # fmt: skip
    outputs = b.OutputTensorDescr(
        id=b.TensorId("probabilities"),
        axes=[b.BatchAxis(), b.ChannelAxis(channel_names=[b.Identifier(n) for n in names]),
              *(_output_axis(b, a, g, i, unit) for i, a in enumerate(spatial))],
        test_tensor=b.FileDescr(source=test_out),
        postprocessing=[post],
    )  # fmt: skip
    docs = directory / "README.md"
    docs.write_text(_readme(loaded, name))
    version = torch.__version__.split("+")[0]
    tileseg = {"geometry": {k: list(getattr(g, k)) for k in ("halo", "align", "shrink")},
               "unet": config, "training": loaded.info.get("training")}  # fmt: skip
    return b.ModelDescr(
        name=name, description=f"tileseg U-Net ({config['padding']} padding, depth "
        f"{config['depth']}, {g.ndim}D) segmenting {', '.join(names)}",
        authors=[b.Author(name=author)], cite=[b.CiteEntry(text=UNET_PAPER[0], doi=UNET_PAPER[1])],
        license=b.LicenseId(license), documentation=b.FileDescr(source=docs),
        inputs=[inputs], outputs=[outputs], tags=["segmentation", "unet", "tileseg"],
        weights=b.WeightsDescr(torchscript=b.TorchscriptWeightsDescr(
            source=weights, pytorch_version=b.Version(version))),
        config=b.Config(**{"tileseg": json.loads(json.dumps(tileseg))}),
    )  # fmt: skip


def _output_axis(b: Any, axis: str, g: Any, i: int, unit: dict[str, Any]) -> Any:
    """The output's size is the input's less the shrink; what the halo adds beyond the shrink
    (same padding) is border to crop, a bioimage.io halo."""
    size = b.SizeReference(tensor_id=b.TensorId("raw"), axis_id=b.AxisId(axis),
                           offset=-2 * g.shrink[i])  # fmt: skip
    halo = g.halo[i] - g.shrink[i]
    if halo == 0:
        return b.SpaceOutputAxis(id=b.AxisId(axis), size=size, **unit)
    return b.SpaceOutputAxisWithHalo(id=b.AxisId(axis), halo=halo, size=size, **unit)


def _readme(loaded: Any, name: str) -> str:
    training = loaded.training
    lines = [f"# {name}", "", "A U-Net exported by tileseg (`tileseg export-model`).", "",
             "## Validation", ""]  # fmt: skip
    if "val_dice" in training:
        lines.append(f"Validation foreground Dice at training: {training['val_dice']}.")
    if "heldout" in training:
        lines.append(f"Held-out Dice: {training['heldout'].get('pooled_dice')}.")
    lines.append("Validate on your own images before trusting counts.")
    return "\n".join(lines) + "\n"
