"""Batch norm folded into the convolutions: the same function, fewer passes, a copy."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.models import ModelSpec, UNetConfig, load_model, save_unet, seeded_unet
from pipeline.models.fold import fold_batch_norm
from pipeline.models.inference import Predictor, resolve_fold_norm


def norms(module: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def with_statistics(module: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters far from the defaults, so a norm left out or
    folded wrongly shows."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) * 3 + 0.1)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))
    return module.eval()


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("padding", ["valid", "same"])
def test_folded_unet_is_the_same_function(ndim, padding):
    config = UNetConfig(ndim=ndim, depth=2, width=4, padding=padding, classes=3)
    model = with_statistics(seeded_unet(config, seed=1))
    x = torch.randn((2, 1) + (config.geometry.input_size(8 if ndim == 2 else 4, 0),) * ndim)
    with torch.inference_mode():
        expected = model(x)
    before = norms(model)
    assert before == 2 * (2 * config.depth + 1)  # two per block
    assert fold_batch_norm(model) == before
    assert norms(model) == 0
    with torch.inference_mode():
        got = model(x)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.equal(got, expected)  # folded: other roundings, so this test can fail


def test_what_cannot_be_folded_is_left():
    def conv():
        return nn.Conv2d(2, 2, 3)

    untracked = nn.BatchNorm2d(2, track_running_stats=False)  # normalises by the batch's stats

    class Shuffled(nn.Sequential):  # its own forward: "follows" is not known
        def forward(self, x):
            return self[0](x)

    cases = [
        nn.Sequential(conv(), nn.ReLU(), nn.BatchNorm2d(2)),  # not directly after
        nn.Sequential(conv(), nn.BatchNorm2d(3)),  # other channels: not a pair
        nn.Sequential(conv(), untracked),
        nn.Sequential(nn.ConvTranspose2d(2, 2, 2), nn.BatchNorm2d(2)),
        Shuffled(conv(), nn.BatchNorm2d(2)),
    ]
    for module in cases:
        module.eval()
        assert fold_batch_norm(module) == 0, module
    training = nn.Sequential(conv(), nn.BatchNorm2d(2)).train()
    assert fold_batch_norm(training) == 0  # train mode: the norm still learns
    plain = seeded_unet(UNetConfig(depth=1, width=2, norm="none"))
    assert fold_batch_norm(plain) == 0


def test_a_torchscript_model_is_left_as_it_is():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", DeprecationWarning)
        scripted = torch.jit.script(with_statistics(seeded_unet(UNetConfig(depth=1, width=2))))
    x = torch.randn(1, 1, 40, 40)
    with torch.inference_mode():
        expected = scripted(x)
        assert fold_batch_norm(scripted) == 0
        assert torch.equal(scripted(x), expected)


def test_the_predictor_folds_its_own_copy(tmp_path):
    config = UNetConfig(depth=2, width=4, classes=2)
    path = tmp_path / "m.safetensors"
    save_unet(with_statistics(seeded_unet(config, seed=2)), path)
    model = load_model(ModelSpec(str(path)))
    shared = norms(model.module)
    assert shared > 0
    window = tuple(model.geometry.input_size(16, axis) for axis in range(2))
    x = np.random.default_rng(0).normal(size=(2, 1, *window)).astype(np.float32)
    runs = {}
    for fold_norm in ("auto", "on", "off"):
        for channels_last in ("on", "off"):
            p = Predictor.create(model, device="cpu", fold_norm=fold_norm,
                                 channels_last=channels_last)  # fmt: skip
            assert norms(p.module) == (shared if fold_norm == "off" else 0)
            runs[fold_norm, channels_last] = p.predict(x, probability_dtype="float32").probabilities
    assert norms(model.module) == shared  # the cached, shared model is left as it was
    for layout in ("on", "off"):
        folded, plain = runs["on", layout], runs["off", layout]
        np.testing.assert_array_equal(runs["auto", layout], folded)
        assert np.abs(folded - plain).max() < 1e-5
        assert not np.array_equal(folded, plain)
    assert resolve_fold_norm("auto") and resolve_fold_norm("on") and not resolve_fold_norm("off")
    with pytest.raises(ValueError, match="fold_norm"):
        resolve_fold_norm("yes")
