"""The signature property: tiled output equals one forward pass over the whole mirrored image.

Real files end to end: a Zarr/TIFF input, a model file, ``segment_image`` with Dask, the
OME-Zarr output read back, against :func:`predict_whole` on the in-memory image.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import zarr
from exactness import TOLERANCE, check, make_model, reference, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imagefiles import write_tiff, write_zarr
from profiles import examples

from pipeline.config import SegmentOptions
from pipeline.engine.driver import segment_image
from pipeline.models import UNetConfig


@st.composite
def cases(draw):
    ndim = draw(st.sampled_from([2, 2, 3]))
    depth = draw(st.integers(1, 2 if ndim == 2 else 1))
    config = UNetConfig(
        ndim=ndim,
        in_channels=draw(st.integers(1, 2)),
        classes=draw(st.integers(1, 3)),
        depth=depth,
        width=2,
        padding=draw(st.sampled_from(["valid", "same"])),
    )
    # Images smaller than the halo are refused (too little context); anything larger works,
    # including images smaller than one tile.
    halo = config.geometry.halo[0]
    side = st.integers(halo, halo + (50 if ndim == 2 else 12))
    shape = tuple(draw(side) for _ in range(ndim))
    chunk = 2**depth * draw(st.integers(1, 4))
    tile = chunk * draw(st.integers(1, 2))
    # How the work is run must not change the result: batching, tasks, overlap, layout,
    # batch norm folded or not (each against a reference run the same way).
    run = {
        "batch_size": draw(st.integers(1, 3)),
        "batches_per_task": draw(st.integers(1, 3)),
        "prefetch": draw(st.integers(0, 2)),
        "channels_last": draw(st.sampled_from(["auto", "on", "off"])),
        "fold_norm": draw(st.sampled_from(["auto", "on", "off"])),
        "parallel_io": draw(st.booleans()),
    }
    return config, shape, tile, chunk, run, draw(st.integers(0, 2**16))


@settings(
    max_examples=examples(40),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(cases())
def test_tiled_equals_whole_image(case):
    config, shape, tile, chunk, run_options, seed = case
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(config.in_channels, *shape)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_model(tmp, config, seed)
        axes = ("C" if config.in_channels > 1 else "") + ("ZYX" if config.ndim == 3 else "YX")
        data = image if config.in_channels > 1 else image[0]
        write_zarr(tmp / "in.zarr", data, chunks=(7,) * data.ndim)
        probs, labels = run(
            tmp / "in.zarr", tmp / "out.zarr",
            model=model, tile=tile, chunk=chunk, axes=axes, **run_options,
        )  # fmt: skip
        numerics = {k: run_options[k] for k in ("channels_last", "fold_norm")}
        check(probs, labels, reference(model, image, **numerics))


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_paper_sized_unet_on_a_tiled_tiff(tmp_path, padding):
    """Depth 3 (align 8, halo 44/56), an odd-sized image, tiles smaller than the halo."""
    config = UNetConfig(depth=3, width=4, padding=padding, classes=2)
    model = make_model(tmp_path, config, seed=1)
    image = np.random.default_rng(1).integers(0, 255, (101, 77)).astype(np.uint8)
    write_tiff(tmp_path / "in.tif", image, axes="YX", tile=(32, 32), compression="zlib")
    probs, labels = run(tmp_path / "in.tif", tmp_path / "out.zarr", model=model, tile=32, chunk=16)
    check(probs, labels, reference(model, image[None]))


@pytest.mark.slow  # compiling the model takes most of it
@pytest.mark.skipif(
    shutil.which("cc") is None, reason="torch.compile on the CPU needs a C compiler"
)
def test_compiled_model_is_exact_too(tmp_path):
    """torch.compile'd model, last batch short (padded to the compiled shape)."""
    config = UNetConfig(depth=2, width=4, padding="valid", classes=2)
    model = make_model(tmp_path, config, seed=3)
    image = np.random.default_rng(3).normal(size=(70, 90)).astype(np.float32)
    write_zarr(tmp_path / "in.zarr", image, chunks=(16, 16))
    probs, labels = run(
        tmp_path / "in.zarr", tmp_path / "out.zarr",
        model=model, tile=32, chunk=32, batch_size=4, compile=True,
    )  # fmt: skip
    check(probs, labels, reference(model, image[None]))


def test_percentile_normalisation_is_global(tmp_path):
    """With percentile normalisation the tiles still match one whole-image pass, because the
    statistics are computed once and applied to every tile."""
    config = UNetConfig(depth=2, width=4, padding="same", classes=2)
    model = make_model(tmp_path, config, seed=2)
    image = np.random.default_rng(2).gamma(2.0, 100.0, (90, 120)).astype(np.uint16)
    write_tiff(tmp_path / "in.tif", image, axes="YX", tile=(32, 32))
    opts = SegmentOptions(
        model=model, tile=32, chunk=32, normalize="percentile", save_probabilities=True,
        probability_dtype="float32", precision="fp32",
    )  # fmt: skip
    result = segment_image(tmp_path / "in.tif", tmp_path / "out.zarr", opts)
    norm = result.record["normalization"]
    lo, hi = np.percentile(image.astype(np.float64), [1.0, 99.8])
    assert norm["scale"][0] == pytest.approx(1 / (hi - lo))
    normalised = image[None].astype(np.float32) * norm["scale"][0] + norm["offset"][0]
    probs = zarr.open_group(tmp_path / "out.zarr", mode="r")["0"][...]
    assert np.abs(probs - reference(model, normalised)).max() < TOLERANCE
