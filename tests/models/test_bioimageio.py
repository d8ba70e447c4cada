"""bioimage.io model packages: written here (by bioimageio.spec and by ``tileseg export-model``),
read back, validated, and run exactly."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
import yaml
import zarr
from bioimageio.spec import load_description, save_bioimageio_package
from bioimageio.spec.model import v0_5 as b
from exactness import check, reference, run
from external_models import export_onnx, unet
from imagefiles import write_zarr

from pipeline.cli.main import main
from pipeline.config import SegmentOptions
from pipeline.engine.driver import segment_image
from pipeline.models import ModelMetadata, ModelSpec, UNetConfig, load_model, save_unet
from pipeline.models.bioimageio import _quiet, opened
from pipeline.models.files import DEFAULT_MODEL
from pipeline.objects.size import target_object_size, trained_object_size
from pipeline.output.ngff import LABELS_PATH, read_record


def _exported(tmp_path, config: UNetConfig, *, seed=1):
    model = tmp_path / "m.safetensors"
    save_unet(
        unet(config, seed=seed), model, metadata=ModelMetadata(("background", "nucleus"), 0.5)
    )
    package = tmp_path / "m.zip"
    assert main(["export-model", str(model), str(package), "--author", "A Lab"]) == 0
    return model, package


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_exported_model_validates_and_reimports_with_its_geometry(tmp_path, padding):
    config = UNetConfig(depth=2, width=4, padding=padding)
    _, package = _exported(tmp_path, config)
    with _quiet(), opened(package) as source:
        descr = load_description(source, perform_io_checks=True)
    assert descr.validation_summary.status == "valid-format"
    assert [str(a.id) for a in descr.inputs[0].axes] == ["batch", "channel", "y", "x"]
    loaded = load_model(ModelSpec(str(package)))
    assert loaded.geometry == config.geometry
    assert loaded.class_names == ("background", "nucleus") and loaded.pixel_size_um == 0.5
    assert loaded.info["arch"] == "bioimageio/torchscript"


def test_an_exported_model_keeps_its_object_size(tmp_path):
    """The default model's package carries its training record: reloaded, it segments at the
    same object size (``--object-size``) as the file it came from."""
    package = tmp_path / "default.zip"
    assert main(["export-model", str(DEFAULT_MODEL), str(package), "--author", "A Lab"]) == 0
    native, loaded = load_model(ModelSpec(str(DEFAULT_MODEL))), load_model(ModelSpec(str(package)))
    quartiles = native.info["training"]["object_size"]["diameter_quartiles_px"]
    assert trained_object_size(loaded) == trained_object_size(native) is not None
    assert target_object_size(loaded) == target_object_size(native) == quartiles[1]


def test_exported_model_reimported_gives_the_same_labels(tmp_path):
    """The package normalises as tileseg does (scale_range 1-99.8 % per channel, statistics
    once per image) and runs the same weights: the same labels wherever they are decided."""
    config = UNetConfig(depth=2, width=4, padding="valid")
    model, package = _exported(tmp_path, config)
    image = np.random.default_rng(3).gamma(2.0, 100.0, (90, 77)).astype(np.uint16)
    write_zarr(tmp_path / "in.zarr", image, chunks=(32, 32))
    labels, probabilities = [], []
    for name, path in (("native", model), ("package", package)):
        options = SegmentOptions(model=str(path), tile=32, chunk=32, save_probabilities=True,
                                 probability_dtype="float32")  # fmt: skip
        segment_image(tmp_path / "in.zarr", tmp_path / f"{name}.zarr", options)
        root = zarr.open_group(tmp_path / f"{name}.zarr", mode="r")
        labels.append(root[f"{LABELS_PATH}/0"][...])
        probabilities.append(root["0"][...])
    record = read_record(tmp_path / "package.zarr")
    assert record["normalization"]["mode"] == "model"
    assert np.abs(probabilities[0] - probabilities[1]).max() < 1e-4
    decided = np.abs(probabilities[0][1] - 0.5) > 1e-4
    np.testing.assert_array_equal(labels[0][decided], labels[1][decided])


class ChannelsLast(torch.nn.Module):
    """A model taking (N, Y, X, C) and giving (N, Y, X, K), as some exports do."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def _onnx_package(tmp_path, config: UNetConfig):
    with _quiet():  # bioimageio.spec's unclosed files, collected under its filter
        return _write_onnx_package(tmp_path, config)


def _write_onnx_package(tmp_path, config: UNetConfig):
    """A package written here with bioimageio.spec: ONNX weights, channels-last axes, per-image
    zero-mean-unit-variance then a fixed linear scaling, sigmoid postprocessing."""
    weights = export_onnx(ChannelsLast(unet(config, seed=2)), tmp_path / "w.onnx",
                          shape=(1, 32, 32, 2), dynamic={0: "n", 1: "h", 2: "w"})  # fmt: skip
    rng = np.random.default_rng(0)
    np.save(tmp_path / "in.npy", rng.random((1, 32, 32, 2), np.float32))
    np.save(tmp_path / "out.npy", rng.random((1, 32, 32, 1), np.float32))
    (tmp_path / "README.md").write_text("# test\n\n## Validation\n\nnone\n")
    space = [b.SpaceInputAxis(id=b.AxisId(a), size=b.ParameterizedSize(min=20, step=4),
                              scale=0.25, unit="micrometer") for a in "yx"]  # fmt: skip
    ref = [b.SpaceOutputAxisWithHalo(
        id=b.AxisId(a), halo=8, scale=0.25, unit="micrometer",
        size=b.SizeReference(tensor_id=b.TensorId("raw"), axis_id=b.AxisId(a)))
        for a in "yx"]  # fmt: skip
    descr = b.ModelDescr(
        name="channels-last test net", description="test", authors=[b.Author(name="t")],
        cite=[b.CiteEntry(text="t", doi="10.1007/978-3-319-24574-4_28")],
        license=b.LicenseId("MIT"), documentation=b.FileDescr(source=tmp_path / "README.md"),
        inputs=[b.InputTensorDescr(
            id=b.TensorId("raw"), axes=[b.BatchAxis(), *space, b.ChannelAxis(
                channel_names=[b.Identifier("dapi"), b.Identifier("gfp")])],
            test_tensor=b.FileDescr(source=tmp_path / "in.npy"),
            preprocessing=[
                b.ZeroMeanUnitVarianceDescr(kwargs=b.ZeroMeanUnitVarianceKwargs(
                    axes=[b.AxisId("y"), b.AxisId("x")])),
                b.ScaleLinearDescr(kwargs=b.ScaleLinearKwargs(gain=2.0, offset=0.5))])],
        outputs=[b.OutputTensorDescr(
            id=b.TensorId("mask"), axes=[b.BatchAxis(), *ref, b.ChannelAxis(
                channel_names=[b.Identifier("cell")])],
            test_tensor=b.FileDescr(source=tmp_path / "out.npy"),
            postprocessing=[b.SigmoidDescr()])],
        weights=b.WeightsDescr(onnx=b.OnnxWeightsDescr(source=weights, opset_version=17)),
    )  # fmt: skip
    package = tmp_path / "net.zip"
    save_bioimageio_package(descr, output_path=package)
    return package


def test_a_package_written_here_reads_back_and_runs_exactly(tmp_path):
    config = UNetConfig(depth=2, width=4, padding="same", in_channels=2, classes=1)
    package = _onnx_package(tmp_path, config)
    loaded = load_model(ModelSpec(str(package)))
    assert loaded.geometry == config.geometry and loaded.in_channels == 2
    assert loaded.class_names == ("cell",) and loaded.pixel_size_um == 0.25
    assert loaded.info["geometry"]["package_halo"] == [8, 8]
    image = np.random.default_rng(4).gamma(2.0, 50.0, (2, 61, 70)).astype(np.float32)
    image[1] *= 3
    write_zarr(tmp_path / "in.zarr", image, chunks=(2, 16, 16))
    probs, labels = run(tmp_path / "in.zarr", tmp_path / "out.zarr", model=str(package),
                        tile=16, chunk=16, axes="CYX")  # fmt: skip
    norm = read_record(tmp_path / "out.zarr")["normalization"]
    mean, std = image.mean(axis=(1, 2)), image.std(axis=(1, 2))
    np.testing.assert_allclose(norm["scale"], 2.0 / (std + 1e-6), rtol=1e-5)
    np.testing.assert_allclose(norm["offset"], -2.0 * mean / (std + 1e-6) + 0.5, rtol=1e-5)
    scale = np.asarray(norm["scale"], np.float32)[:, None, None]
    normalised = image * scale + np.asarray(norm["offset"], np.float32)[:, None, None]
    check(probs, labels, reference(str(package), normalised))


def test_a_package_without_usable_weights_is_one_line_exit_2(tmp_path, capsys):
    _, package = _exported(tmp_path, UNetConfig(depth=1, width=2, padding="valid"))
    with zipfile.ZipFile(package) as archive:
        rdf = yaml.safe_load(archive.read("rdf.yaml"))
        names = archive.namelist()
        archive.extractall(tmp_path / "pkg")
    rdf["weights"] = {"keras_hdf5": {"source": "weights.pt", "tensorflow_version": "2.15"}}
    (tmp_path / "pkg" / "rdf.yaml").write_text(yaml.safe_dump(rdf))
    assert "rdf.yaml" in names
    write_zarr(tmp_path / "in.zarr", np.ones((40, 40), np.float32), chunks=(40, 40))
    code = main(["segment", str(tmp_path / "in.zarr"), str(tmp_path / "out.zarr"), "--axes",
                 "YX", "--model", str(tmp_path / "pkg" / "rdf.yaml"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "no torchscript or onnx weights" in err[0] and "keras_hdf5" in err[0]
    assert json.dumps(rdf)  # the package itself stayed a valid mapping
    assert not (tmp_path / "out.zarr" / LABELS_PATH).exists()


def test_export_refuses_what_it_cannot_package_in_one_line(tmp_path, capsys):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a model")
    for args, problem in (
        ([str(junk), str(tmp_path / "out.zip")], "not a readable safetensors model file"),
        ([str(junk), str(tmp_path / "out.tar")], "must end with .zip"),
    ):
        assert main(["export-model", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and problem in err[0]
    assert not (tmp_path / "out.zip").exists()
