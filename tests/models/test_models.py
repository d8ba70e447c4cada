"""The built-in U-Net, its analytic geometry, and model files."""

from __future__ import annotations

import json
import pickle
import warnings
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.errors import TilesegError
from pipeline.models import ModelSpec, UNetConfig, load_model, save_unet, seeded_unet
from pipeline.models.files import load_torchscript, load_unet
from pipeline.models.unet import valid_output_size


def test_valid_unet_matches_the_paper():
    config = UNetConfig(depth=4, padding="valid")
    assert valid_output_size(config, 572) == 388
    g = config.geometry
    assert g.halo == (92, 92) and g.shrink == (92, 92) and g.align == (16, 16)
    assert g.input_size(388, 0) == 572


@pytest.mark.parametrize(
    "depth", [1, pytest.param(2, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow)]
)
def test_same_padding_halo_is_the_measured_receptive_field(depth):
    """Back-propagate from output pixels of every phase and measure how far the gradient
    reaches; a tile starts at phase 0 and spans whole periods, so the context a tile needs is
    max over phases p of (left reach - p) and (right reach - (period - 1 - p)). The analytic
    halo is exactly that, rounded up to the period."""
    config = UNetConfig(depth=depth, padding="same", width=8, norm="none")
    model = seeded_unet(config, seed=1)
    n, centre, period, need = 128, 64, 2**depth, 0
    for phase in range(period):
        x = torch.randn(4, 1, n, n, generator=torch.Generator().manual_seed(phase))
        x.requires_grad_(True)
        p = centre + phase
        model(x)[:, :, p, p].sum().backward()
        ys, xs = torch.nonzero(x.grad.abs().sum((0, 1)) != 0, as_tuple=True)
        for coords in (ys, xs):
            left, right = p - int(coords.min()), int(coords.max()) - p
            need = max(need, left - phase, right - (period - 1 - phase))
    halo = config.geometry.halo[0]
    assert halo == -(-need // period) * period


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("padding", ["valid", "same"])
def test_forward_output_size_matches_geometry(ndim, padding):
    config = UNetConfig(ndim=ndim, depth=2, width=2, padding=padding, classes=3)
    g = config.geometry
    size = g.input_size(6, 0)
    y = seeded_unet(config)(torch.zeros((1, 1) + (size,) * ndim))
    assert y.shape == (1, 3) + (g.output_size(size, 0),) * ndim


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="padding"):
        UNetConfig(padding="reflect")
    with pytest.raises(ValueError, match="unknown"):
        UNetConfig.from_dict({"depth": 2, "heads": 3})


def test_safetensors_round_trip(tmp_path):
    config = UNetConfig(depth=2, width=4, padding="same", classes=3)
    model = seeded_unet(config, seed=3)
    path = tmp_path / "m.safetensors"
    save_unet(model, path, training={"epochs": 1})
    loaded = load_unet(path)
    assert loaded.geometry == config.geometry
    assert loaded.info["training"] == {"epochs": 1}
    assert loaded.in_channels == 1 and loaded.classes == 3
    x = torch.randn(1, 1, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.module(x), model(x))


def test_model_file_without_metadata_is_refused(tmp_path):
    path = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(TilesegError, match=r"metadata key 'tileseg\.format' is missing"):
        load_unet(path)


def test_model_file_with_mismatched_weights_is_refused(tmp_path):
    path = tmp_path / "wrong.safetensors"
    save_unet(seeded_unet(UNetConfig(depth=2, width=4)), path)
    metadata = {
        "tileseg.format": "1",
        "tileseg.arch": "unet",
        "tileseg.config": json.dumps(UNetConfig(depth=3, width=4).to_dict()),
    }
    from safetensors.torch import load_file

    save_file(load_file(str(path)), str(path), metadata=metadata)
    with pytest.raises(TilesegError, match="weights do not match"):
        load_unet(path)


def test_garbage_model_file_is_refused(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x00\x01not a model")
    with pytest.raises(TilesegError, match="not a readable safetensors"):
        load_model(ModelSpec(str(path)))


class _Boom:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_checkpoint_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "ckpt.pt"
    torch.save({"state": _Boom(str(marker))}, path)
    with open(path.with_suffix(".pkl"), "wb") as f:
        pickle.dump(_Boom(str(marker)), f)
    for p in (path, path.with_suffix(".pkl").rename(tmp_path / "plain.pt")):
        with pytest.raises(TilesegError, match="not a TorchScript archive"):
            load_model(ModelSpec(str(p), halo=4, align=4))
    assert not marker.exists()


def _scripted(tmp_path, config, meta):
    # Users bring TorchScript archives; making one here needs the (deprecated) scripting API.
    path = tmp_path / "model.pt"
    extra = {"tileseg.json": json.dumps(meta)} if meta is not None else {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", DeprecationWarning)
        model = torch.jit.script(seeded_unet(config, seed=5))
        torch.jit.save(model, str(path), _extra_files=extra)
    assert zipfile.is_zipfile(path)
    return path


def test_torchscript_geometry_from_extra_file_and_probe(tmp_path):
    config = UNetConfig(depth=2, width=2, padding="valid")
    path = _scripted(tmp_path, config, {"align": 4, "classes": 2})
    loaded = load_torchscript(path, halo=None, align=None)
    g = config.geometry
    assert loaded.geometry.halo == g.halo and loaded.geometry.shrink == g.shrink
    assert loaded.geometry.align == (4, 4) and loaded.in_channels == 1
    size = loaded.geometry.input_size(10, 0)
    assert valid_output_size(config, size) is not None


def test_torchscript_model_runs_in_every_layout_without_warnings(tmp_path):
    """Each predictor copies the model; a copied ScriptModule's parameters are no leaves while
    they require grad, and moving them to channels-last warned (an error under the suite's
    ``filterwarnings``) for every TorchScript model."""
    from pipeline.models.inference import Predictor

    config = UNetConfig(depth=1, width=2, padding="valid", classes=2)
    loaded = load_model(ModelSpec(str(_scripted(tmp_path, config, {"align": 2}))))
    x = np.random.default_rng(0).random((1, 1, 24, 24), dtype=np.float32)
    outputs = []
    for channels_last in ("off", "on"):
        predictor = Predictor.create(loaded, device="cpu", channels_last=channels_last)
        outputs.append(predictor.predict(x, probability_dtype="float32").probabilities)
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-6)


def test_torchscript_same_model_geometry_is_measured(tmp_path):
    """Nothing given: alignment from the sizes it accepts, halo from its receptive field,
    recorded as found; a smaller --halo is refused unless forced."""
    config = UNetConfig(depth=2, width=2, padding="same")
    path = _scripted(tmp_path, config, None)
    loaded = load_torchscript(path, halo=None, align=None)
    assert loaded.geometry == config.geometry
    how = loaded.info["geometry"]
    assert how["halo_from"] == "receptive field" and how["align_from"] == "probe"
    with pytest.raises(TilesegError, match="--force-halo") as info:
        load_model(ModelSpec(str(path), halo=20))
    assert str(info.value).startswith("--halo: halo 20 is smaller")
    forced = load_model(ModelSpec(str(path), halo=20, align=4, force_halo=True))
    assert forced.geometry.halo == (20, 20) and forced.geometry.shrink == (0, 0)


def test_torchscript_3d_model_is_3d_without_saying_so(tmp_path):
    """Its convolution weights are 5D: no tileseg.json is needed to make it 3D."""
    config = UNetConfig(ndim=3, depth=1, width=2, padding="valid")
    path = _scripted(tmp_path, config, None)
    loaded = load_torchscript(path, halo=None, align=2)
    g = config.geometry
    assert loaded.geometry.ndim == 3 and loaded.geometry.halo == g.halo and len(g.halo) == 3
    assert loaded.geometry.shrink == g.shrink and loaded.in_channels == 1
    flat = load_torchscript(_scripted(tmp_path, UNetConfig(depth=1, width=2), None),
                            halo=None, align=2)  # fmt: skip
    assert flat.geometry.ndim == 2


def test_halo_override_for_builtin_model_is_refused():
    with pytest.raises(TilesegError, match="TorchScript and ONNX models only"):
        load_model(ModelSpec(None, halo=3))
    with pytest.raises(TilesegError, match="TorchScript and ONNX models only"):
        load_model(ModelSpec(None, force_halo=True))


def test_seeded_unet_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = seeded_unet(UNetConfig(depth=1, width=2), seed=7)
    after = torch.rand(1)
    b = seeded_unet(UNetConfig(depth=1, width=2), seed=7)
    assert torch.equal(before, after)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert np.isfinite(next(a.parameters()).detach().numpy()).all()
