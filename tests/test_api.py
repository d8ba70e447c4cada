"""The Python API: arrays in memory segment exactly as the same pixels in a file."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from imagefiles import write_tiff
from outputs import chunk_files

import pipeline
from pipeline.models import UNetConfig, save_unet, seeded_unet


@pytest.fixture
def api_model(tmp_path):
    path = tmp_path / "m.safetensors"
    save_unet(seeded_unet(UNetConfig(depth=2, width=4, padding="valid", classes=2), seed=0), path)
    return path


def test_import_is_lazy():
    code = (
        "import pipeline, sys; "
        "print('torch' in sys.modules, 'pipeline.engine.driver' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
    assert {"segment", "open_image", "load_model", "label_instances"} <= set(dir(pipeline))


@pytest.mark.parametrize("kind", ["numpy", "dask", "zarr"])
def test_an_array_gives_the_same_output_as_its_file(tmp_path, api_model, kind):
    image = (np.random.default_rng(0).random((2, 200, 230)) * 4000).astype(np.uint16)
    path = write_tiff(tmp_path / "img.tif", image, axes="CYX", compression="zlib")
    options = {"tile": 64, "chunk": 64, "instances": "connected"}
    model = UNetConfig(depth=2, width=4, padding="valid", classes=2, in_channels=2)
    save_unet(seeded_unet(model, seed=0), api_model)
    from_file = pipeline.segment(path, tmp_path / "file.zarr", model=api_model, **options)
    if kind == "dask":
        import dask.array as da

        array = da.from_array(image, chunks=(1, 100, 100))
    elif kind == "zarr":
        import zarr

        array = zarr.create_array(tmp_path / "src.zarr", shape=image.shape, dtype=image.dtype)
        array[...] = image
    else:
        array = image
    result = pipeline.segment(
        array, tmp_path / "array.zarr", model=api_model, axes="CYX", **options
    )
    assert result.spatial_shape == from_file.spatial_shape == (200, 230)
    files = chunk_files(tmp_path / "array.zarr")
    assert files == chunk_files(tmp_path / "file.zarr")
    assert not list(tmp_path.glob(".array.zarr.input.zarr"))  # the staged input is gone


def test_array_problems_are_one_line_errors(tmp_path):
    with pytest.raises(pipeline.TilesegError, match="needs axes"):
        pipeline.segment(np.zeros((2, 8, 8)), tmp_path / "o.zarr")
    with pytest.raises(pipeline.TilesegError, match="unknown option"):
        pipeline.segment(np.zeros((8, 8)), tmp_path / "o.zarr", tiel=64)
