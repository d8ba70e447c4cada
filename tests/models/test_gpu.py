"""The CUDA path, on a machine with a GPU (skipped elsewhere): exactness in fp32, bf16 close to
fp32, batch size from free memory, compiled and channels-last models, several GPUs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from exactness import check, make_model, reference
from imagefiles import write_zarr

from pipeline.config import SegmentOptions
from pipeline.engine.driver import segment_image
from pipeline.models import ModelSpec, UNetConfig, load_model
from pipeline.models.inference import Predictor, auto_batch_size
from pipeline.output.ngff import LABELS_PATH, read_record

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CONFIG = UNetConfig(depth=3, width=8, padding="valid", classes=3)


@pytest.fixture
def case(tmp_path):
    model = make_model(tmp_path, CONFIG, seed=5)
    image = np.random.default_rng(5).normal(size=(300, 333)).astype(np.float32)
    write_zarr(tmp_path / "in.zarr", image, chunks=(64, 64))
    return tmp_path, model, image


def segment(tmp_path, name, model, **options):
    opts = SegmentOptions(
        model=model, tile=64, chunk=64, normalize="none", save_probabilities=True,
        probability_dtype="float32", device="cuda", **options,
    )  # fmt: skip
    segment_image(tmp_path / "in.zarr", tmp_path / name, opts)
    root = zarr.open_group(tmp_path / name, mode="r")
    return root["0"][...], root[f"{LABELS_PATH}/0"][...], read_record(tmp_path / name)


@pytest.mark.parametrize("compile", [False, True])
def test_fp32_on_the_gpu_is_exact(case, compile):
    tmp_path, model, image = case
    probs, labels, _ = segment(
        tmp_path, f"fp32-{compile}.zarr", model, precision="fp32", compile=compile, batch_size=3
    )
    check(probs, labels, reference(model, image[None]))


def test_bf16_autocast_stays_close_to_fp32(case):
    tmp_path, model, image = case
    probs, labels, record = segment(tmp_path, "bf16.zarr", model)  # precision auto: bf16
    expected = reference(model, image[None])
    assert np.abs(probs - expected).max() < 0.05
    decided = np.sort(expected, axis=0)[-1] - np.sort(expected, axis=0)[-2] > 0.05
    assert (labels[decided] == np.argmax(expected, axis=0)[decided]).mean() > 0.999
    assert 1 <= record["run"]["batch_size"] <= 16  # auto: from free GPU memory


def test_auto_batch_size_fits_the_memory(case):
    _, model, _ = case
    loaded = load_model(ModelSpec(model))
    predictor = Predictor.create(loaded, device="cuda")
    window = (1116, 1116)
    n = auto_batch_size(predictor, window=window, in_channels=1)
    fixed, per_tile = predictor.probe_memory(window, 1)
    free, _ = torch.cuda.mem_get_info()
    assert 1 <= n <= 16 and fixed + n * per_tile <= free
    predictor.predict(np.zeros((n, 1, *window), np.float32))  # and it runs


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_several_gpus_give_the_same_output(case):
    tmp_path, model, _ = case
    one = segment(tmp_path, "one.zarr", model, precision="fp32", workers=1)
    many = segment(tmp_path, "many.zarr", model, precision="fp32")  # 2 tasks per GPU, all GPUs
    np.testing.assert_allclose(many[0], one[0], atol=1e-5)
