"""A volume with a 2D model is segmented plane by plane (pipeline/models/planes.py), exactly:
each plane of the tiled run equals the 2D model's whole-image pass of that plane."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import zarr
from exactness import check, make_model, reference, run
from external_models import export_onnx, script, unet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imagefiles import write_ome_zarr, write_tiff, write_zarr
from profiles import examples
from scipy import ndimage

from pipeline.cli.main import main
from pipeline.config import SegmentOptions
from pipeline.engine.driver import segment_image
from pipeline.models import UNetConfig, default_model, save_unet
from pipeline.objects.size import object_diameters, target_object_size
from pipeline.output.ngff import LABELS_PATH, read_record
from pipeline.synthetic.render import SyntheticConfig, synthetic_pair
from pipeline.training.scale_eval import sized_config


def per_plane(model: str, image: np.ndarray, **numerics) -> np.ndarray:
    """(K, Z, Y, X): the 2D whole-image reference of each Z plane of a (C, Z, Y, X) image."""
    return np.stack([reference(model, image[:, z], **numerics) for z in range(image.shape[1])], 1)


@st.composite
def cases(draw):
    depth = draw(st.integers(1, 2))
    config = UNetConfig(
        ndim=2,
        in_channels=draw(st.integers(1, 2)),
        classes=draw(st.integers(1, 3)),
        depth=depth,
        width=2,
        padding=draw(st.sampled_from(["valid", "same"])),
    )
    halo = config.geometry.halo[0]
    shape = (draw(st.integers(1, 4)), *(draw(st.integers(halo, halo + 30)) for _ in range(2)))
    chunk = 2**depth * draw(st.integers(1, 3))
    tile = chunk * draw(st.integers(1, 2))
    run = {
        "batch_size": draw(st.integers(1, 3)),
        "batches_per_task": draw(st.integers(1, 2)),
        "channels_last": draw(st.sampled_from(["on", "off"])),
        "fold_norm": draw(st.sampled_from(["on", "off"])),
    }
    return config, shape, tile, chunk, run, draw(st.integers(0, 2**16))


@settings(
    max_examples=examples(15),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(cases())
def test_volume_tiled_equals_each_plane_whole(case):
    """ZYX and CZYX volumes, any tiling, layout and batching."""
    config, shape, tile, chunk, run_options, seed = case
    image = np.random.default_rng(seed).normal(size=(config.in_channels, *shape))
    image = image.astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_model(tmp, config, seed)
        axes = ("C" if config.in_channels > 1 else "") + "ZYX"
        data = image if config.in_channels > 1 else image[0]
        write_zarr(tmp / "in.zarr", data, chunks=(5,) * data.ndim)
        probs, labels = run(
            tmp / "in.zarr", tmp / "out.zarr",
            model=model, tile=tile, chunk=chunk, axes=axes, **run_options,
        )  # fmt: skip
        numerics = {k: run_options[k] for k in ("channels_last", "fold_norm")}
        check(probs, labels, per_plane(model, image, **numerics))
        record = read_record(tmp / "out.zarr")
        assert record["model"]["planes"] is True
        # one plane per output chunk: planes are written (and resumed) on their own
        assert zarr.open_array(tmp / "out.zarr" / LABELS_PATH / "0").chunks[0] == 1


def _fluorescence(z: int, side: int) -> np.ndarray:
    """A ZYX stack of different generated fluorescence images (uint16)."""
    config = SyntheticConfig(seed=3, tissue=False)
    planes = [synthetic_pair((side, side), config=config, origin=(0, 300 * k))[0] for k in range(z)]
    return np.stack(planes)


@pytest.mark.parametrize("form", ["ome-tiff", "ome-zarr"])
def test_default_model_on_a_volume_equals_each_plane_as_an_image(tmp_path, form):
    volume = _fluorescence(3, 96)
    if form == "ome-tiff":
        path = write_tiff(tmp_path / "vol.ome.tif", volume, axes="ZYX", tile=None)
    else:
        path = write_ome_zarr(tmp_path / "vol.ome.zarr", volume, axes="ZYX", chunks=(1, 64, 64))
    # One fixed normalisation for both: percentiles of the volume are not those of a plane.
    numerics = {"normalize": "fixed", "scale": 1 / 1000, "save_probabilities": True}
    options = SegmentOptions(**numerics)
    segment_image(path, tmp_path / "vol.zarr", options)
    out = zarr.open_group(tmp_path / "vol.zarr", mode="r")
    probs, labels = out["0"][...], out[f"{LABELS_PATH}/0"][...]
    assert labels.shape == volume.shape and labels.any()
    for z, plane in enumerate(volume):
        write_zarr(tmp_path / f"p{z}.zarr", plane, chunks=(64, 64))
        segment_image(tmp_path / f"p{z}.zarr", tmp_path / f"p{z}-out.zarr", options)
        flat = zarr.open_group(tmp_path / f"p{z}-out.zarr", mode="r")
        check(probs[:, z], labels[z], flat["0"][...])
    assert read_record(tmp_path / "vol.zarr")["model"]["planes"] is True
    assert "planes" not in read_record(tmp_path / "p0-out.zarr")["model"]


def test_default_options_on_a_volume_and_a_second_run_skips(tmp_path):
    """The CLI's defaults (percentile normalisation, the object-size check) on ZYX; the same
    command again finds the output complete."""
    path = write_zarr(tmp_path / "vol.zarr", _fluorescence(2, 64), chunks=(1, 64, 64))
    first = segment_image(path, tmp_path / "out.zarr", SegmentOptions(axes="ZYX"))
    assert not first.skipped and first.tiles == 2
    again = segment_image(path, tmp_path / "out.zarr", SegmentOptions(axes="ZYX"))
    assert again.skipped
    labels = zarr.open_array(tmp_path / "out.zarr" / LABELS_PATH / "0")
    assert labels.shape == (2, 64, 64) and labels.chunks == (1, 64, 64)


@pytest.mark.parametrize("kind", ["torchscript", "onnx"])
def test_external_2d_model_on_a_volume_is_exact(tmp_path, kind):
    config = UNetConfig(depth=2, width=2, padding="valid", classes=2)
    if kind == "onnx":
        pytest.importorskip("onnxruntime")
        model = export_onnx(unet(config), tmp_path / "m.onnx", shape=(1, 1, 44, 44))
    else:
        model = script(unet(config), tmp_path / "m.pt")
    image = np.random.default_rng(1).normal(size=(1, 3, 30, 37)).astype(np.float32)
    write_zarr(tmp_path / "in.zarr", image[0], chunks=(2, 16, 16))
    probs, labels = run(
        tmp_path / "in.zarr", tmp_path / "out.zarr", model=str(model), tile=16, chunk=8,
        axes="ZYX", batch_size=2,
    )  # fmt: skip
    check(probs, labels, per_plane(str(model), image))


def test_bioimageio_2d_package_on_a_volume_runs_as_its_weights(tmp_path):
    """A 2D package (written by ``tileseg export-model``) on ZYX: plane by plane, with its own
    normalisation of the volume, as the native file it was exported from."""
    config = UNetConfig(depth=2, width=4, padding="valid")
    model = tmp_path / "m.safetensors"
    save_unet(unet(config, seed=1), model)
    package = tmp_path / "m.zip"
    assert main(["export-model", str(model), str(package), "--author", "A Lab"]) == 0
    volume = np.random.default_rng(3).gamma(2.0, 100.0, (3, 50, 41)).astype(np.uint16)
    write_zarr(tmp_path / "in.zarr", volume, chunks=(1, 32, 32))
    found = []
    for name, path in (("native", model), ("package", package)):
        options = SegmentOptions(model=str(path), axes="ZYX", tile=32, chunk=16,
                                 save_probabilities=True, probability_dtype="float32")  # fmt: skip
        segment_image(tmp_path / "in.zarr", tmp_path / f"{name}.zarr", options)
        root = zarr.open_group(tmp_path / f"{name}.zarr", mode="r")
        found.append(root["0"][...])
        assert read_record(tmp_path / f"{name}.zarr")["model"]["planes"] is True
    assert found[0].shape == (2, *volume.shape)
    assert np.abs(found[0] - found[1]).max() < 1e-4


def test_instances_of_a_volume_connect_objects_across_planes(tmp_path):
    """The objects of a plane-wise run are the 3D connected components of its foreground
    (``scipy.ndimage.label``, up to renumbering), measured in a table."""
    plane = _fluorescence(1, 96)[0]
    volume = np.stack([plane, plane, np.roll(plane, 40, axis=1)])  # two planes alike
    path = write_zarr(tmp_path / "vol.zarr", volume, chunks=(1, 64, 64))
    options = SegmentOptions(axes="ZYX", instances="connected", table="csv", chunk=32, tile=64)
    segment_image(path, tmp_path / "out.zarr", options)
    root = zarr.open_group(tmp_path / "out.zarr", mode="r")
    labels = root[f"{LABELS_PATH}/0"][...]
    instances = root["labels/instances/0"][...]
    truth, n = ndimage.label(labels > 0)
    assert n > 3 and len(np.unique(instances[instances > 0])) == n
    pairs = np.unique(np.stack([truth.ravel(), instances.ravel()]), axis=1)
    assert pairs.shape[1] == n + 1  # one instance id per component, background with 0
    np.testing.assert_array_equal(instances[0] > 0, instances[1] > 0)
    assert (instances[0][instances[0] > 0] == instances[1][instances[0] > 0]).all()
    assert (tmp_path / "out.zarr" / "objects.csv").is_file()


def _sized_volume(diameter: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """A ZYX stack of three generated images of nuclei ~``diameter`` px across, and its truth."""
    pairs = [synthetic_pair((side, side), config=sized_config(diameter, seed=s)) for s in range(3)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


@pytest.mark.parametrize("labels_at", ["input", "model"])
def test_a_volume_at_an_object_size_is_each_plane_at_that_size(tmp_path, labels_at):
    """Only Y and X are resampled; each plane's labels are those of the plane as a 2D image
    at that object size, on either grid, with Z's NGFF scale kept."""
    volume, _ = _sized_volume(40, 160)
    path = write_ome_zarr(tmp_path / "v.ome.zarr", volume, axes="ZYX", chunks=(1, 64, 64),
                          levels=2, pixel_size=(2.0, 0.5, 0.5))  # fmt: skip
    options = SegmentOptions(object_size=40.0, labels_at=labels_at, tile=64,
                             normalize="fixed", scale=1 / 1000)  # fmt: skip
    done = segment_image(path, tmp_path / "v.zarr", options).record["resample"]
    factor = 40.0 / target_object_size(default_model())  # to the default model's target size
    assert done["input_factor"] == pytest.approx([1.0, factor, factor])
    out = zarr.open_group(tmp_path / "v.zarr", mode="r")
    labels = out[f"{LABELS_PATH}/0"][...]
    side = 160 if labels_at == "input" else done["shape"][-1]
    assert labels.shape == (3, side, side) and labels.any()
    scale = out[LABELS_PATH].attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    step = 0.5 if labels_at == "input" else 0.5 * factor
    assert scale[0]["scale"] == pytest.approx([2.0, step, step])
    for z, plane in enumerate(volume):
        flat = write_ome_zarr(tmp_path / f"p{z}.ome.zarr", plane, axes="YX", chunks=(64, 64),
                              levels=2, pixel_size=(0.5, 0.5))  # fmt: skip
        segment_image(flat, tmp_path / f"p{z}.zarr", options)
        alone = zarr.open_group(tmp_path / f"p{z}.zarr", mode="r")[f"{LABELS_PATH}/0"][...]
        np.testing.assert_array_equal(labels[z], alone)


def test_a_volume_at_a_pixel_size_reads_the_level_that_keeps_its_planes(tmp_path):
    volume, _ = _sized_volume(16, 128)
    path = write_ome_zarr(tmp_path / "v.ome.zarr", volume, axes="ZYX", chunks=(1, 64, 64),
                          levels=2, pixel_size=(2.0, 0.5, 0.5))  # fmt: skip
    args = ["segment", str(path), str(tmp_path / "o.zarr"), "--mpp", "1", "--no-progress"]
    assert main(args) == 0
    done = read_record(tmp_path / "o.zarr")["resample"]
    assert done["level"] == 1 and done["factor"] == [1.0, 1.0, 1.0]
    labels = zarr.open_array(tmp_path / "o.zarr" / LABELS_PATH / "0")
    assert labels.shape == (3, 64, 64)


def test_object_size_auto_on_a_volume_is_estimated_on_its_middle_plane(tmp_path):
    volume, truth = _sized_volume(48, 384)
    path = write_zarr(tmp_path / "v.zarr", volume, chunks=(1, 128, 128))
    options = SegmentOptions(axes="ZYX", object_size="auto", tile=128)
    done = segment_image(path, tmp_path / "o.zarr", options).record["resample"]
    assert done["chosen_by"] == "auto" and done["estimate"]["plane"] == 1
    true = np.median(object_diameters(truth[1]))
    assert done["object_size_px"] == pytest.approx(true, rel=0.25)
    assert done["input_factor"][0] == 1.0


def test_a_volume_of_large_nuclei_warns_once_from_its_middle_plane(tmp_path, caplog):
    volume, _ = _sized_volume(64, 384)
    path = write_zarr(tmp_path / "v.zarr", volume, chunks=(1, 128, 128))
    with caplog.at_level("WARNING", logger="tileseg"):
        segment_image(path, tmp_path / "o.zarr", SegmentOptions(axes="ZYX", tile=256))
    (record,) = [r for r in caplog.records if "objects look about" in r.getMessage()]
    assert "v.zarr (plane 1): objects look about" in record.getMessage()
    assert read_record(tmp_path / "o.zarr")["status"] == "complete"  # a warning, not an error
