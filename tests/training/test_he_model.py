"""The shipped H&E model: picked for RGB brightfield input, its recorded held-out Dice, and
`tileseg segment` on generated H&E with it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from imagefiles import write_tiff
from safetensors import safe_open

from pipeline.config import SegmentOptions
from pipeline.engine.driver import segment_image
from pipeline.io.readers import open_image
from pipeline.models import ModelSpec
from pipeline.models.files import DEFAULT_MODEL, HE_MODEL
from pipeline.output.ngff import read_record
from pipeline.output.qc import foreground_dice
from pipeline.synthetic.render import SyntheticConfig, synthetic_pair
from pipeline.training.train import config_from_mapping, load_train_config

ROOT = HE_MODEL.parents[2]


def training_record() -> dict:
    with safe_open(str(HE_MODEL), framework="pt") as f:
        return json.loads(f.metadata()["tileseg.training"])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rgb, _ = synthetic_pair((256, 256), config=SyntheticConfig(kind="he", seed=11))
    fluo, _ = synthetic_pair((256, 256), config=SyntheticConfig(seed=11))
    return {
        "he": write_tiff(d / "he.tif", rgb, axes="YXS", tile=(128, 128), compression="zlib"),
        "fluorescence": write_tiff(d / "fluo.tif", fluo, axes="YX"),
        # an 8-bit RGB fluorescence composite: dark background, so not brightfield
        "composite": write_tiff(d / "composite.tif", 255 - rgb, axes="YXS"),
    }


def test_rgb_brightfield_input_picks_the_he_model(images):
    assert HE_MODEL.is_file(), "the trained H&E model is not shipped"
    pick = {
        name: ModelSpec.for_image(SegmentOptions(), open_image(p)).path
        for name, p in images.items()
    }
    assert pick == {"he": str(HE_MODEL), "fluorescence": None, "composite": None}
    he = open_image(images["he"])
    # --stain hematoxylin feeds a one-channel model; --model always wins
    assert ModelSpec.for_image(SegmentOptions(stain="hematoxylin"), he).path is None
    named = SegmentOptions(model=str(DEFAULT_MODEL))
    assert ModelSpec.for_image(named, he).path == str(DEFAULT_MODEL)


def test_the_he_model_is_trained_by_its_committed_recipe():
    record = training_record()
    recipe = load_train_config(ROOT / "configs" / "train-he.yaml")
    # read as a recipe: keys added to recipes after the model was trained take their defaults
    assert config_from_mapping(record["recipe"]) == recipe
    assert record["recipe"]["model"]["in_channels"] == 3 and record["normalization"]["stain"] == (
        "normalize"
    )
    assert HE_MODEL.stat().st_size < 1.2 * DEFAULT_MODEL.stat().st_size
    assert (
        yaml.safe_load((ROOT / "configs" / "train-he.yaml").read_text())["synthetic"]["kind"]
        == "he"
    )


def test_the_he_models_recorded_heldout_dice_is_at_least_0_9():
    record = training_record()
    heldout = record["heldout"]
    assert heldout["kind"] == "he" and heldout["stain"] == "normalize"
    assert heldout["pooled_dice"] >= 0.9
    data = record["data"]
    assert not set(heldout["seeds"]) & set(range(data["seed"], data["seed"] + data["images"]))


def test_segment_on_generated_he_reproduces_the_recorded_heldout_dice(tmp_path):
    """`tileseg segment` with no --model on a held-out image: the H&E model, normalised stains,
    and the Dice the training record holds for this image (the record's whole-image pass and
    the tiled run differ only within 1e-4 of the decision boundary)."""
    heldout = training_record()["heldout"]
    i = 0
    rgb, truth = synthetic_pair(
        tuple(heldout["shape"]), config=SyntheticConfig(kind="he", seed=heldout["seeds"][i])
    )
    path = write_tiff(tmp_path / "he.tif", rgb, axes="YXS", tile=(128, 128), compression="zlib")
    segment_image(path, tmp_path / "out.zarr", SegmentOptions(precision="fp32"))
    record = read_record(tmp_path / "out.zarr")
    assert record["model"]["source"] == str(HE_MODEL)
    assert record["model"]["chosen"] == "H&E model: RGB brightfield input"
    assert record["normalization"]["stain"]["step"] == "normalize"
    dice = foreground_dice(tmp_path / "out.zarr", truth)
    assert dice == pytest.approx(heldout["dice"][i], abs=1e-3)
    assert dice >= 0.9


def test_fluorescence_input_keeps_the_default_model(tmp_path, images):
    segment_image(images["fluorescence"], tmp_path / "out.zarr", SegmentOptions(tile=128))
    record = read_record(tmp_path / "out.zarr")
    assert record["model"]["source"] != str(HE_MODEL)
    assert record["model"]["chosen"] == "default model"
    assert "stain" not in record["normalization"]
    assert np.isfinite(record["normalization"]["scale"]).all()
