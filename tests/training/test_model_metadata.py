"""Class names, training pixel size and object size: in every model kind's metadata, on the
model spec, in the provenance record, and written by ``tileseg train``."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from external_models import export_onnx, script, unet
from imagefiles import write_tiff, write_zarr
from safetensors import safe_open
from test_train import dataset, tiny  # noqa: F401 (a fixture)

from pipeline.config import SegmentOptions
from pipeline.engine.driver import segment_image
from pipeline.errors import TilesegError
from pipeline.models import ModelMetadata, ModelSpec, UNetConfig, load_model, save_unet
from pipeline.objects.size import target_object_size, trained_object_size
from pipeline.training.data import file_pairs
from pipeline.training.train import TrainConfig, _model_metadata, train

NAMES = ("background", "nucleus", "membrane")


def test_safetensors_metadata_round_trip_and_provenance(tmp_path):
    path = tmp_path / "m.safetensors"
    config = UNetConfig(depth=1, width=2, padding="same", classes=3)
    save_unet(unet(config), path, metadata=ModelMetadata(NAMES, 0.325))
    spec = ModelSpec(str(path))
    assert spec.class_names == NAMES and spec.pixel_size_um == 0.325
    write_zarr(tmp_path / "in.zarr", np.random.default_rng(0).random((24, 24)), chunks=(8, 8))
    options = SegmentOptions(model=str(path), tile=8, chunk=8, axes="YX")
    record = segment_image(tmp_path / "in.zarr", tmp_path / "out.zarr", options).record
    assert record["model"]["class_names"] == list(NAMES)
    assert record["model"]["pixel_size_um"] == 0.325


def test_the_default_model_names_its_classes():
    spec = ModelSpec()
    assert spec.class_names == ("background", "nucleus") and spec.pixel_size_um is None


@pytest.mark.parametrize(
    ("meta", "problem"),
    [({"class_names": ["a", "b", "c"]}, "3 class_names"),
     ({"class_names": ["a", "a"]}, "distinct"),
     ({"class_names": "ab"}, "list of strings"),
     ({"pixel_size_um": -1}, "positive number"),
     ({"object_size_px": 0}, "object_size_px must be a positive number")],
)  # fmt: skip
def test_bad_metadata_is_refused_in_one_line(tmp_path, meta, problem):
    config = UNetConfig(depth=1, width=2, padding="valid", classes=2)
    path = script(unet(config), tmp_path / "m.pt", {"classes": 2, **meta})
    with pytest.raises(TilesegError, match=problem) as info:
        load_model(ModelSpec(str(path)))
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_torchscript_and_onnx_carry_metadata(tmp_path):
    config = UNetConfig(depth=1, width=2, padding="valid", classes=2)
    meta = {"classes": 2, "class_names": ["bg", "cell"], "pixel_size_um": 0.5,
            "object_size_px": 12}  # fmt: skip
    ts = script(unet(config), tmp_path / "m.pt", meta)
    path = export_onnx(unet(config), tmp_path / "m.onnx", shape=(1, 1, 32, 32))
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {"tileseg": json.dumps(meta)})
    onnx.save(proto, str(path))
    for p in (ts, path):
        loaded = load_model(ModelSpec(str(p)))
        assert loaded.class_names == ("bg", "cell") and loaded.pixel_size_um == 0.5
        assert loaded.info["class_names"] == ["bg", "cell"]
        assert trained_object_size(loaded) == target_object_size(loaded) == 12.0


@pytest.mark.slow
def test_train_records_class_names_and_pixel_size(dataset, tmp_path):  # noqa: F811
    config = tiny(dataset, epochs=1, steps_per_epoch=1, class_names=["bg", "nucleus"],
                  pixel_size_um=0.25)  # fmt: skip
    out = tmp_path / "m.safetensors"
    train(config, out, progress=False)
    with safe_open(str(out), framework="pt") as f:
        assert json.loads(f.metadata()["tileseg.model"])["class_names"] == ["bg", "nucleus"]
    loaded = load_model(ModelSpec(str(out)))
    assert loaded.class_names == ("bg", "nucleus") and loaded.pixel_size_um == 0.25
    with pytest.raises(TilesegError, match="one name per class"):
        tiny(dataset, class_names=["only one"])


def test_train_takes_the_pixel_size_of_its_images_when_they_agree(tmp_path):
    for name in ("a", "b"):
        image = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
        write_tiff(tmp_path / f"{name}.ome.tif", image, axes="YX", pixel_size=(0.5, 0.5))
        write_tiff(tmp_path / f"{name}_mask.tif", (image > 128).astype(np.uint8), axes="YX")
    (tmp_path / "masks").mkdir()
    (tmp_path / "images").mkdir()
    for name in ("a", "b"):
        (tmp_path / f"{name}.ome.tif").rename(tmp_path / "images" / f"{name}.ome.tif")
        (tmp_path / f"{name}_mask.tif").rename(tmp_path / "masks" / f"{name}.tif")
    pairs = file_pairs(tmp_path / "images", tmp_path / "masks", percentiles=(1.0, 99.8))
    assert _model_metadata(TrainConfig(), pairs) == ModelMetadata(None, 0.5)
    assert _model_metadata(TrainConfig(pixel_size_um=0.3), pairs).pixel_size_um == 0.3
