"""An output's fingerprint: the input's content, the model and the options that decide pixels;
not where the input lies, when it was written, or how the work ran."""

from __future__ import annotations

import dataclasses
import os
import shutil

import numpy as np
import pytest
import zarr
from imagefiles import write_tiff

from pipeline.config import SegmentOptions
from pipeline.engine.driver import segment_image
from pipeline.models import UNetConfig, save_unet, seeded_unet
from pipeline.output.ngff import read_record
from pipeline.output.provenance import EXECUTION_ONLY, fingerprint, input_identity


def image(seed: int = 0, shape=(300, 260)) -> np.ndarray:
    return (np.random.default_rng(seed).random(shape) * 4000).astype(np.uint16)


@pytest.fixture
def raw_slide(tmp_path):
    """An uncompressed slide: another image of the same shape has the same size and header."""
    (tmp_path / "a").mkdir()
    return write_tiff(tmp_path / "a" / "slide.tif", image(), axes="YX", compression=None)


def test_identity_ignores_path_links_and_mtime(tmp_path, raw_slide):
    copy = tmp_path / "b" / "copy.tif"
    copy.parent.mkdir()
    shutil.copy(raw_slide, copy)
    os.utime(copy, (1, 1))
    link = tmp_path / "linked"
    link.symlink_to(raw_slide.parent, target_is_directory=True)
    same = {"raw": input_identity(raw_slide)}
    same["copy"] = input_identity(copy)
    same["link"] = input_identity(link / raw_slide.name)
    assert len({str(v) for v in same.values()}) == 1


@pytest.mark.parametrize("shape", [(300, 260), (1200, 1100)], ids=["whole-file", "sampled"])
def test_identity_changes_with_the_pixels(tmp_path, shape):
    a = write_tiff(tmp_path / "a.tif", image(0, shape), axes="YX", compression=None)
    b = write_tiff(tmp_path / "b.tif", image(1, shape), axes="YX", compression=None)
    assert a.stat().st_size == b.stat().st_size
    assert input_identity(a) != input_identity(b)


def test_zarr_identity_follows_chunk_content_not_mtime(tmp_path):
    path = tmp_path / "img.zarr"
    array = zarr.create_array(path, shape=(64, 64), chunks=(32, 32), dtype="u2")
    array[...] = image(0, (64, 64))
    before = input_identity(path)
    for p in path.rglob("*"):
        os.utime(p, (1, 1))
    assert input_identity(path) == before
    array[:32, :32] = image(1, (32, 32))
    assert input_identity(path) != before


def test_how_the_work_runs_is_not_part_of_the_fingerprint(raw_slide):
    options = SegmentOptions(tile=64)
    base = fingerprint(raw_slide, options, model_sha256="abc")
    ran = dataclasses.replace(
        options, batch_size=8, batches_per_task=1, device="cpu", compile=True, workers=3,
        prefetch=0, channels_last="off", fold_norm="off", scheduler="tcp://x:1",
    )  # fmt: skip
    assert fingerprint(raw_slide, ran, model_sha256="abc") == base
    for changed in ({"tile": 128}, {"normalize": "none"}, {"level": 1}, {"instances": "connected"}):
        other = dataclasses.replace(options, **changed)
        assert fingerprint(raw_slide, other, model_sha256="abc") != base
    assert fingerprint(raw_slide, options, model_sha256="abd") != base
    assert set(EXECUTION_ONLY) <= {f.name for f in dataclasses.fields(SegmentOptions)}


@pytest.fixture
def small_model(tmp_path):
    path = tmp_path / "m.safetensors"
    save_unet(seeded_unet(UNetConfig(depth=2, width=4, padding="same", classes=2), seed=0), path)
    return str(path)


def test_a_finished_slide_moved_and_run_with_other_batches_is_skipped(
    tmp_path, raw_slide, small_model
):
    options = SegmentOptions(model=small_model, tile=64, chunk=64, batch_size=2)
    out = tmp_path / "out.zarr"
    assert not segment_image(raw_slide, out, options).skipped
    moved = tmp_path / "elsewhere"
    moved.symlink_to(raw_slide.parent, target_is_directory=True)
    again = dataclasses.replace(options, batch_size=4, batches_per_task=1)
    assert segment_image(moved / raw_slide.name, out, again).skipped


def test_a_resumed_run_batches_as_the_run_it_continues(tmp_path, raw_slide, small_model):
    """Whatever batch size the resuming command asks for, the done tasks' grouping holds."""
    from outputs import chunk_files

    from pipeline.output.provenance import done_dir

    options = SegmentOptions(model=small_model, tile=32, chunk=32, batch_size=2)
    segment_image(raw_slide, tmp_path / "reference.zarr", options)
    out = tmp_path / "out.zarr"
    segment_image(raw_slide, out, options)
    markers = sorted(done_dir(out).glob("tiles-*"))
    for marker in markers[len(markers) // 2 :]:
        marker.unlink()
    record = read_record(out)
    import zarr as z

    root = z.open_group(out, mode="r+", zarr_format=2)
    root.attrs["tileseg"] = {**record, "status": "running"}
    result = segment_image(raw_slide, out, dataclasses.replace(options, batch_size=5))
    assert result.resumed_tasks == len(markers) // 2
    assert read_record(out)["run"]["batch_size"] == 2
    assert chunk_files(out) == chunk_files(tmp_path / "reference.zarr")
    assert 0 < result.computed_pixels < 300 * 260
