"""Users' own models, end to end: tiled output equals one whole-image pass for external models
whose geometry tileseg found by itself (files written here, run by ``segment_image``/the CLI)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from exactness import check, reference, run
from external_models import PadsToPeriod, export_onnx, script, unet
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from imagefiles import write_zarr

from pipeline.cli.main import main
from pipeline.models import ModelSpec, UNetConfig, load_model
from pipeline.output.ngff import read_record


def _segment(tmp_path, model: str, shape, *, tile: int, chunk: int, seed=0, **options):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=shape).astype(np.float32)
    write_zarr(tmp_path / "in.zarr", image, chunks=(16,) * len(shape))
    axes = "ZYX" if len(shape) == 3 else "YX"
    probs, labels = run(
        tmp_path / "in.zarr", tmp_path / "out.zarr",
        model=model, tile=tile, chunk=chunk, axes=axes, batch_size=2, **options,
    )  # fmt: skip
    check(probs, labels, reference(model, image[None]))
    return read_record(tmp_path / "out.zarr")


def test_torchscript_of_the_papers_geometry_is_exact(tmp_path):
    """Depth 4, valid 3x3 convolutions: smallest input 188, 572 -> 388; nothing given."""
    config = UNetConfig(depth=4, width=2, padding="valid", classes=2)
    model = str(script(unet(config), tmp_path / "paper.pt"))
    loaded = load_model(ModelSpec(model))
    assert loaded.geometry == config.geometry
    assert loaded.geometry.input_size(388, 0) == 572
    record = _segment(tmp_path, model, (130, 110), tile=64, chunk=32)
    how = record["model"]["geometry"]
    assert how["halo"] == [92, 92] and how["halo_from"] == "shrink"
    assert how["size_min"] == [188, 188] and how["size_step"] == [16, 16]


@pytest.mark.slow
def test_torchscript_depth5_valid_net_is_exact(tmp_path):
    config = UNetConfig(depth=5, width=2, padding="valid", classes=3)
    model = str(script(unet(config), tmp_path / "deep.pt"))
    assert load_model(ModelSpec(model)).geometry == config.geometry
    _segment(tmp_path, model, (200, 190), tile=64, chunk=32)


@pytest.mark.parametrize("ndim", [2, 3])
def test_same_padded_torchscript_with_the_measured_halo_is_exact(tmp_path, ndim):
    config = UNetConfig(ndim=ndim, depth=2 if ndim == 2 else 1, width=4, padding="same")
    model = str(script(unet(config, seed=1), tmp_path / "same.pt"))
    shape = (70, 61) if ndim == 2 else (20, 26, 23)
    record = _segment(tmp_path, model, shape, tile=16, chunk=8)
    assert record["model"]["geometry"]["halo_from"] == "receptive field"
    assert record["geometry"]["halo"] == list(config.geometry.halo)


def test_a_model_that_pads_internally_is_exact(tmp_path):
    """Accepts every size; aligned to the pooling period the probe found."""
    inner = unet(UNetConfig(depth=2, width=4, padding="same", norm="none"), seed=1)
    model = str(script(PadsToPeriod(inner, 4), tmp_path / "pads.pt"))
    record = _segment(tmp_path, model, (57, 66), tile=12, chunk=12)
    assert record["geometry"]["align"] == [4, 4]


def test_cli_refuses_a_halo_below_the_receptive_field_in_one_line(tmp_path, capsys):
    config = UNetConfig(depth=2, width=2, padding="same")
    model = str(script(unet(config, seed=1), tmp_path / "same.pt"))
    image = np.random.default_rng(0).normal(size=(40, 40)).astype(np.float32)
    write_zarr(tmp_path / "in.zarr", image, chunks=(16, 16))
    args = ["segment", str(tmp_path / "in.zarr"), str(tmp_path / "out.zarr"), "--axes", "YX",
            "--model", model, "--tile", "16", "--chunk", "16", "--no-progress"]  # fmt: skip
    assert main([*args, "--halo", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--halo: halo 8 is smaller than the model's measured" in err[0]
    assert not (tmp_path / "out.zarr").exists()
    assert main([*args, "--halo", "8", "--force-halo"]) == 0
    assert read_record(tmp_path / "out.zarr")["config"]["force_halo"] is True


# -- ONNX ------------------------------------------------------------------------------------


def test_onnx_of_the_papers_geometry_is_exact(tmp_path):
    config = UNetConfig(depth=4, width=2, padding="valid", classes=2)
    model = str(export_onnx(unet(config), tmp_path / "paper.onnx", shape=(1, 1, 188, 188)))
    loaded = load_model(ModelSpec(model))
    assert loaded.geometry == config.geometry and loaded.info["arch"] == "onnx"
    record = _segment(tmp_path, model, (130, 110), tile=64, chunk=32)
    assert record["model"]["geometry"]["size_min"] == [188, 188]


@pytest.mark.slow
def test_onnx_depth5_valid_net_is_exact(tmp_path):
    config = UNetConfig(depth=5, width=2, padding="valid", classes=3)
    model = str(export_onnx(unet(config), tmp_path / "deep.onnx", shape=(1, 1, 380, 380)))
    assert load_model(ModelSpec(model)).geometry == config.geometry
    _segment(tmp_path, model, (200, 190), tile=64, chunk=32)


def test_onnx_same_padded_3d_with_fixed_batch_is_exact(tmp_path):
    """The halo measured; a batch fixed at 1 is run a tile at a time."""
    config = UNetConfig(ndim=3, depth=1, width=4, padding="same")
    path = tmp_path / "same3d.onnx"
    export_onnx(unet(config, seed=1), path, shape=(1, 1, 8, 8, 8), dynamic={2: "z", 3: "y", 4: "x"})
    assert load_model(ModelSpec(str(path))).geometry == config.geometry
    _segment(tmp_path, str(path), (20, 26, 23), tile=8, chunk=8)


@pytest.mark.parametrize(
    ("dynamic", "problem"),
    [({0: "n", 1: "c", 2: "h", 3: "w"}, "channel dimension is dynamic ('c')"),
     ({0: "n"}, "spatial dimensions are fixed")],
)  # fmt: skip
def test_cli_refuses_onnx_without_dynamic_spatial_dims_in_one_line(
    tmp_path, capsys, dynamic, problem
):
    config = UNetConfig(depth=1, width=2, padding="same")
    model = export_onnx(unet(config), tmp_path / "bad.onnx", shape=(1, 1, 16, 16), dynamic=dynamic)
    image = np.random.default_rng(0).normal(size=(40, 40)).astype(np.float32)
    write_zarr(tmp_path / "in.zarr", image, chunks=(16, 16))
    code = main(["segment", str(tmp_path / "in.zarr"), str(tmp_path / "out.zarr"), "--axes", "YX",
                 "--model", str(model), "--no-progress"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and problem in err[0] and str(model) in err[0]


# -- any geometry, any kind --------------------------------------------------------------------


def responds(net: torch.nn.Module, size: int) -> bool:
    """Whether the net's output changes with its input at all."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        a, b = (net.eval()(torch.randn(1, 1, size, size, generator=g)) for _ in range(2))
    return bool((a != b).any())


@st.composite
def external_cases(draw):
    padding = draw(st.sampled_from(["valid", "same"]))
    config = UNetConfig(depth=draw(st.integers(1, 3)), width=2, padding=padding,
                        classes=draw(st.integers(1, 3)))  # fmt: skip
    halo, align = config.geometry.halo[0], config.geometry.align[0]
    shape = tuple(draw(st.integers(halo, halo + 40)) for _ in range(2))
    tile = align * draw(st.integers(1, max(1, 48 // align)))
    return draw(st.sampled_from(["pt", "onnx"])), config, shape, tile, draw(st.integers(0, 99))


@pytest.mark.slow
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(external_cases())
def test_external_models_of_any_geometry_are_exact(case):
    """Whatever the depth, padding and classes, tiles of a model whose geometry was probed
    equal one whole-image pass."""
    kind, config, shape, tile, seed = case
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        net = unet(config, seed=seed)
        size = config.geometry.input_size(8, 0)
        # a two-channel net can be dead (its ReLUs zero for any input), which the probe refuses
        assume(responds(net, size))
        path = (script(net, tmp / "m.pt") if kind == "pt"
                else export_onnx(net, tmp / "m.onnx", shape=(1, 1, size, size)))  # fmt: skip
        assert load_model(ModelSpec(str(path))).geometry == config.geometry
        _segment(tmp, str(path), shape, tile=tile, chunk=tile, seed=seed)
