"""Shared by the exactness tests: a model file, the whole-image reference pass, a tiled run
through files, and the comparison of the two."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import torch
import zarr
from outputs import assert_pyramid_from_level_below

from pipeline.config import SegmentOptions
from pipeline.engine.driver import segment_image
from pipeline.models import ModelSpec, UNetConfig, load_model, save_unet, seeded_unet
from pipeline.models.inference import Predictor, predict_whole
from pipeline.output.ngff import LABELS_PATH

TOLERANCE = 1e-4


def randomise_batchnorm(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give BatchNorm layers non-trivial running statistics so they are exercised too."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm3d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def make_model(directory: Path, config: UNetConfig, seed: int = 0) -> str:
    path = directory / "model.safetensors"
    save_unet(randomise_batchnorm(seeded_unet(config, seed=seed), seed), path)
    return str(path)


def reference(
    model_path: str, image: np.ndarray, *, channels_last: str = "auto", fold_norm: str = "auto"
) -> np.ndarray:
    model = load_model(ModelSpec(model_path))
    predictor = Predictor.create(
        model, device="cpu", precision="fp32", channels_last=channels_last, fold_norm=fold_norm
    )
    return predict_whole(predictor, image.astype(np.float32), geometry=model.geometry)


def run(
    input_path, output_path, *, parallel_io: bool = False, **options
) -> tuple[np.ndarray, np.ndarray]:
    # fp32 on any device (bf16 autocast is the CUDA default): exactness is a float32 property.
    opts = SegmentOptions(
        normalize="none", save_probabilities=True, probability_dtype="float32", precision="fp32",
        **options,
    )  # fmt: skip
    # Tiny images have few batches: let tasks hold several anyway, as on a large image. The
    # windows of a batch read, and its tiles written, in parallel threads as on a GPU, or not.
    with (
        mock.patch("pipeline.runtime.worker.MIN_TASKS", 1),
        mock.patch("pipeline.runtime.worker.parallel_io", lambda device: parallel_io),
    ):
        segment_image(input_path, output_path, opts)
    assert_pyramid_from_level_below(output_path)
    root = zarr.open_group(output_path, mode="r")
    return root["0"][...], root[f"{LABELS_PATH}/0"][...]


def check(probabilities: np.ndarray, labels: np.ndarray, expected: np.ndarray) -> None:
    assert probabilities.shape == expected.shape
    assert np.abs(probabilities - expected).max() < TOLERANCE
    if expected.shape[0] == 1:
        decided = np.abs(expected[0] - 0.5) > TOLERANCE
        truth = expected[0] > 0.5
    else:
        top2 = np.sort(expected, axis=0)[-2:]
        decided = top2[1] - top2[0] > TOLERANCE
        truth = np.argmax(expected, axis=0)
    np.testing.assert_array_equal(labels[decided], truth[decided])
