"""Model files with a known output, written for tests."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.models import UNetConfig, save_unet, seeded_unet


def save_tied_softmax_model(path: Path, *, classes: int) -> str:
    """A U-Net whose logits everywhere are 0 but the last, 1e-8: different logits whose softmax
    (for one class: sigmoid, against 0.5) rounds to a tie in float32. Its labels from the
    logits are the last class everywhere; from the probabilities, 0."""
    model = seeded_unet(UNetConfig(depth=1, width=2, classes=classes), seed=0)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        model.head.bias[-1] = 1e-8
    save_unet(model, path)
    return str(path)


def threshold_model(path, *, level: float) -> str:
    """A built-in U-Net wired by hand to label pixels brighter than ``level`` (normalised):
    depth 0, one feature passing the pixel through both ReLU convs, a steep 1x1 classifier."""
    config = UNetConfig(depth=0, width=1, padding="same", norm="none", classes=2)
    net = seeded_unet(config)
    with torch.no_grad():
        for conv in (net.bottom[0], net.bottom[2]):
            conv.weight.zero_()
            conv.weight[0, 0, 1, 1] = 1.0
            conv.bias.zero_()
        net.head.weight.zero_()
        net.head.weight[1, 0] = 50.0
        net.head.bias.copy_(torch.tensor([0.0, -50.0 * level]))
    save_unet(net, path)
    return str(path)
