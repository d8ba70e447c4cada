"""Geometry of models known only as functions, found by probing them with dummy inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from external_models import PadsToPeriod

from pipeline.errors import TilesegError
from pipeline.models import UNetConfig, seeded_unet
from pipeline.models.files import probe_threads, torch_forward
from pipeline.models.probe import probe_geometry, probe_size_rule


def _probe(model, ndim=2, **kwargs):
    with probe_threads():
        forward = torch_forward(model)
        return probe_geometry(forward, ndim=ndim, channels=1, source="m.pt", **kwargs)


@pytest.mark.parametrize(
    ("ndim", "depth", "padding"),
    [(2, 1, "valid"), (2, 3, "valid"), (2, 4, "valid"), (2, 1, "same"), (2, 3, "same"),
     (3, 1, "valid"), (3, 2, "same")],
)  # fmt: skip
def test_probed_geometry_is_the_analytic_one(ndim, depth, padding):
    """Smallest valid size, period, shrink, alignment and (same padding: from the measured
    receptive field) halo all equal what the built-in U-Net knows analytically: e.g. the
    paper's net, depth 4 valid, 188 → 4 and 572 → 388."""
    config = UNetConfig(ndim=ndim, depth=depth, width=2, padding=padding)
    geometry, how = _probe(seeded_unet(config, seed=1), ndim)
    assert geometry == config.geometry
    assert how["halo_from"] == ("shrink" if padding == "valid" else "receptive field")
    assert how["align_from"] == "probe"


@pytest.mark.slow
def test_depth5_valid_net_is_found_in_seconds():
    config = UNetConfig(depth=5, width=2, padding="valid")
    geometry, how = _probe(seeded_unet(config, seed=1))
    assert geometry == config.geometry and geometry.size_min == (380, 380)
    assert how["probe_seconds"] < 60


def test_a_model_that_pads_internally_is_aligned_to_its_pooling_period():
    """It accepts every size, so no period shows in the sizes: the smallest shift of the input
    that shifts its output alike is the period (4 for depth 2), and its inputs are made whole
    periods, so it never pads inside, in tiles or in a whole-image pass."""
    inner = seeded_unet(UNetConfig(depth=2, width=4, padding="same", norm="none"), seed=1)
    geometry, how = _probe(PadsToPeriod(inner, 4))
    assert geometry.align == (4, 4) and how["align_from"] == "probe"
    assert geometry.size_step == (4, 4) and geometry.size_min == (4, 4)
    assert geometry.halo == (24, 24)


def test_given_halo_below_the_receptive_field_is_refused_unless_forced():
    model = seeded_unet(UNetConfig(depth=2, width=2, padding="same"), seed=1)
    with pytest.raises(TilesegError, match=r"smaller than the model's measured receptive field 24"):
        _probe(model, halo=16)
    geometry, how = _probe(model, halo=16, force_halo=True)
    assert geometry.halo == (16, 16) and how["halo_from"] == "given (forced)"
    geometry, how = _probe(model, halo=32, align=4)
    assert geometry.halo == (32, 32) and how["halo_from"] == "given"
    assert how["align_from"] == "given"


def test_a_dead_model_is_refused_in_one_line():
    model = seeded_unet(UNetConfig(depth=1, width=2, padding="same"), seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    with pytest.raises(TilesegError, match="no output pixel responds") as info:
        _probe(model)
    assert "\n" not in str(info.value)


def test_a_model_that_accepts_nothing_is_refused_naming_the_sizes_tried():
    def refuses(x):
        raise RuntimeError("wrong shape")

    with pytest.raises(TilesegError, match=r"accepted no input size \(cubes of side 1-1024 px"):
        probe_size_rule(refuses, ndim=2, channels=1, source="m.pt")


def test_a_model_without_regular_sizes_is_refused():
    def irregular(x):  # loses an odd number of pixels: no centred output
        return x[:, :, 1:, 1:]

    with pytest.raises(TilesegError, match="no regular valid input sizes"):
        probe_size_rule(irregular, ndim=2, channels=1, source="m.pt")


def test_probing_uses_tiny_inputs():
    """Batch 1, the model's channels, at most ~1 M pixels per dummy input."""
    seen = []
    model = seeded_unet(UNetConfig(depth=3, width=2, padding="valid", in_channels=2), seed=1)
    forward = torch_forward(model)

    def spy(x):
        seen.append(x.shape)
        return forward(x)

    with probe_threads():
        probe_geometry(spy, ndim=2, channels=2, source="m.pt")
    assert all(s[0] == 1 and s[1] == 2 and np.prod(s[2:]) <= 2**20 for s in seen)
