"""External model files written for tests: TorchScript archives of U-Nets of any geometry."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models import UNetConfig, seeded_unet


def with_statistics(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial batch-norm running statistics, so that the norms are exercised too."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm3d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def unet(config: UNetConfig, seed: int = 5) -> nn.Module:
    return with_statistics(seeded_unet(config, seed=seed), seed)


class PadsToPeriod(nn.Module):
    """A same-padded U-Net that accepts any size: it zero-pads its input at the end up to a
    multiple of its pooling period and crops the output back, as many user models do."""

    def __init__(self, inner: nn.Module, period: int) -> None:
        super().__init__()
        self.inner, self.period = inner, period

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        ph, pw = (-h) % self.period, (-w) % self.period
        y = self.inner(F.pad(x, [0, pw, 0, ph]))
        return y[:, :, :h, :w]


def script(module: nn.Module, path: Path, meta: dict | None = None) -> Path:
    """A TorchScript archive of ``module`` (``meta``: a tileseg.json extra file)."""
    extra = {"tileseg.json": json.dumps(meta)} if meta is not None else {}
    with warnings.catch_warnings():
        # Users bring TorchScript archives; making one needs the (deprecated) scripting API.
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", DeprecationWarning)
        torch.jit.save(torch.jit.script(module.eval()), str(path), _extra_files=extra)
    return path


def export_onnx(
    module: nn.Module, path: Path, *, shape: tuple[int, ...], dynamic: dict[int, str] | None = None
) -> Path:
    """An ONNX export of ``module`` traced at input ``shape``, with the dimensions in
    ``dynamic`` (default: batch and spatial) dynamic.

    The TorchScript-based exporter: the torch.export-based one takes minutes on a U-Net whose
    sizes it must prove symbolically, this one about a second."""
    if dynamic is None:
        dynamic = {0: "n", **{d: f"s{d}" for d in range(2, len(shape))}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module.eval(), (torch.zeros(shape),), str(path), dynamo=False, input_names=["x"],
            output_names=["y"], dynamic_axes={"x": dynamic},
        )  # fmt: skip
    return path
