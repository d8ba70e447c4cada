"""The plane-wise adapter of a 2D model (pipeline/models/planes.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.geometry import ModelGeometry
from pipeline.models import ModelSpec, UNetConfig, load_model, seeded_unet
from pipeline.models.files import DEFAULT_MODEL
from pipeline.models.inference import Predictor
from pipeline.models.planes import (
    PlaneWise,
    module_ndim,
    one_plane_model,
    plane_geometry,
    plane_model,
)


def test_plane_geometry_has_no_context_along_z():
    flat = ModelGeometry((44, 44), (8, 8), (44, 44), (100, 100), (8, 8))
    assert plane_geometry(flat) == ModelGeometry(
        (0, 44, 44), (1, 8, 8), (0, 44, 44), (1, 100, 100), (1, 8, 8)
    )
    assert plane_geometry(flat).input_size(3, 0) == 3  # a window of any number of planes
    with pytest.raises(ValueError, match="2D model"):
        plane_geometry(plane_geometry(flat))


@pytest.mark.parametrize("channels_last", [False, True])
def test_plane_wise_forward_is_the_2d_forward_of_each_plane(channels_last):
    config = UNetConfig(in_channels=2, classes=3, depth=1, width=2, padding="valid")
    inner = seeded_unet(config, seed=1).eval()
    x = torch.randn(2, 2, 3, 20, 22)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        y = PlaneWise(inner)(x)
        for n in range(2):
            for z in range(3):
                torch.testing.assert_close(y[n, :, z], inner(x[n : n + 1, :, z])[0])
    assert y.shape == (
        2,
        3,
        3,
        20 - 2 * config.geometry.shrink[0],
        22 - 2 * config.geometry.shrink[1],
    )


def test_loaded_plane_model_keeps_the_file_and_says_planes():
    flat = load_model(ModelSpec(str(DEFAULT_MODEL)))
    planes = load_model(ModelSpec(str(DEFAULT_MODEL), planes=True))
    assert planes is load_model(ModelSpec(str(DEFAULT_MODEL), planes=True))  # cached
    assert (planes.source, planes.sha256, planes.classes) == (flat.source, flat.sha256, 2)
    assert planes.info["planes"] is True and "planes" not in flat.info
    assert planes.geometry == plane_geometry(flat.geometry)
    assert (module_ndim(planes), module_ndim(flat)) == (2, 2)


def test_one_plane_model_is_the_2d_model_a_plane_model_runs():
    flat = load_model(ModelSpec(str(DEFAULT_MODEL)))
    planes = load_model(ModelSpec(str(DEFAULT_MODEL), planes=True))
    one = one_plane_model(planes)
    assert one.module is planes.module.inner and not isinstance(one.module, PlaneWise)
    assert one.geometry == flat.geometry and one.info == flat.info
    assert one_plane_model(flat) is flat


@pytest.mark.parametrize("fold_norm", ["on", "off"])
def test_predictor_of_a_plane_model_in_channels_last(fold_norm):
    """Weights of a plane model take the 2D channels-last layout (their convolutions are 2D)."""
    model = plane_model(load_model(ModelSpec(str(DEFAULT_MODEL))))
    predictor = Predictor.create(
        model, device="cpu", precision="fp32", channels_last="on", fold_norm=fold_norm
    )
    window = tuple(model.geometry.input_size(n, a) for a, n in enumerate((2, 8, 8)))
    probs = predictor.probabilities(np.zeros((1, 1, *window), np.float32))
    out = tuple(model.geometry.output_size(w, a) for a, w in enumerate(window))
    assert probs.shape == (1, 2, *out) and out[0] == 2
