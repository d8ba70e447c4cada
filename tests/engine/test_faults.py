"""Fault injection: killed runs resume to identical output, lost workers are survived, and bad
input or a failing disk stops the run with one line and nothing marked done."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import threading
from dataclasses import replace

import numpy as np
import pytest
import tifffile
from imagefiles import write_tiff, write_zarr
from outputs import chunk_files, wait_for_done_tasks

from pipeline.config import SegmentOptions
from pipeline.engine.driver import segment_image
from pipeline.errors import TilesegError
from pipeline.models import UNetConfig
from pipeline.output.ngff import read_record
from pipeline.output.provenance import done_dir

pytestmark = pytest.mark.slow


@pytest.fixture
def model_config():
    return UNetConfig(depth=2, width=8, padding="same", classes=2)


@pytest.fixture
def slide(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (384, 448)).astype(np.uint8)
    return write_tiff(tmp_path / "slide.tif", image, axes="YX", tile=(64, 64), compression="zlib")


def cli(*args: str, **kwargs) -> subprocess.Popen:
    """``tileseg segment`` in a child process (call communicate() on it, also after a kill)."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "segment", *args, "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_sigkill_mid_run_then_resume_gives_identical_output(tmp_path, slide, model):
    args = ["--model", model, "--tile", "32", "--chunk", "32", "--batch-size", "2"]
    reference = tmp_path / "reference.zarr"
    assert cli(str(slide), str(reference), *args).communicate() and True
    assert read_record(reference)["status"] == "complete"

    out = tmp_path / "out.zarr"
    proc = cli(str(slide), str(out), *args)
    markers = done_dir(out)
    wait_for_done_tasks(out, 5, running=lambda: proc.poll() is None)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert read_record(out)["status"] == "running"
    killed_at = len(list(markers.glob("tiles-*")))

    again = cli(str(slide), str(out), *args)
    stdout, stderr = again.communicate()
    assert again.returncode == 0, stderr
    assert "resumed" in stdout
    resumed = int(stdout.split("resumed ")[1].split()[0])
    assert resumed >= killed_at - 1 >= 4  # only unfinished blocks were recomputed
    assert read_record(out)["status"] == "complete"
    assert chunk_files(out) == chunk_files(reference)


def test_chunk_files_left_by_a_killed_writer_are_removed_when_the_run_completes(
    tmp_path, slide, model, monkeypatch
):
    """A writer killed between writing a chunk's file and renaming it into place (SIGKILL, a
    lost worker) leaves the file; the task is redone, and the run removes the leftover."""
    import uuid

    import pipeline.engine.tasks

    options = SegmentOptions(model=model, tile=32, chunk=32, batch_size=2)
    segment_image(slide, tmp_path / "reference.zarr", options)
    real, calls = pipeline.engine.tasks._Block.write, []

    def killed_at_the_fifth(self, *args):
        calls.append(args)
        if len(calls) == 5:
            raise Killed
        return real(self, *args)

    out = tmp_path / "out.zarr"
    monkeypatch.setattr(pipeline.engine.tasks._Block, "write", killed_at_the_fifth)
    with pytest.raises(Killed):
        segment_image(slide, out, options)
    monkeypatch.setattr(pipeline.engine.tasks._Block, "write", real)
    leftover = out / "labels" / "segmentation" / "0" / "1" / f"2.{uuid.uuid4().hex}.partial"
    leftover.parent.mkdir(parents=True, exist_ok=True)  # not there if that row was not written
    leftover.write_bytes(b"half a chunk")
    ours = out / "notes.partial"  # not a chunk writer's name: not ours to remove
    ours.write_text("kept")
    segment_image(slide, out, options)
    assert read_record(out)["status"] == "complete"
    assert not leftover.exists() and ours.read_text() == "kept"
    ours.unlink()
    assert chunk_files(out) == chunk_files(tmp_path / "reference.zarr")


def kill_a_worker_mid_run(slide, out, options, *, workers: int, after: int) -> list:
    """Segment on a local cluster of worker processes in a thread, SIGKILL one worker once
    ``after`` tasks are done, and return what the run raised (its nanny starts a new one)."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        errors: list[BaseException] = []

        def run() -> None:
            try:
                segment_image(slide, out, replace(options, scheduler=cluster.scheduler_address))
            except BaseException as exc:  # returned to the test
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        wait_for_done_tasks(out, after, running=thread.is_alive)
        pids = client.run(os.getpid)
        os.kill(next(iter(pids.values())), signal.SIGKILL)
        thread.join(timeout=240)
    return errors


def test_lost_worker_is_survived_with_identical_output(tmp_path, slide, model):
    options = SegmentOptions(model=model, tile=32, chunk=32, batch_size=2)
    segment_image(slide, tmp_path / "reference.zarr", options)
    out = tmp_path / "out.zarr"
    errors = kill_a_worker_mid_run(slide, out, options, workers=2, after=3)
    assert not errors, errors
    assert read_record(out)["status"] == "complete"
    assert chunk_files(out) == chunk_files(tmp_path / "reference.zarr")


def tiff_with_a_corrupt_tile(path):
    """A 256² tiled TIFF whose file tile 5 (row 1, column 1 of 64² tiles) is no zlib stream."""
    image = np.random.default_rng(1).integers(0, 255, (256, 256)).astype(np.uint8)
    path = write_tiff(path, image, axes="YX", tile=(64, 64), compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[5], tif.pages[0].databytecounts[5]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * count)
    return path


def test_corrupt_tile_data_fails_with_one_line_and_nothing_done(tmp_path, model):
    path = tiff_with_a_corrupt_tile(tmp_path / "bad.tif")
    out = tmp_path / "out.zarr"
    # no percentile statistics: the driver reads nothing, so the failure happens in a task
    args = ["--model", model, "--tile", "64", "--chunk", "64", "--normalize", "none"]
    proc = cli(str(path), str(out), *args)
    _, stderr = proc.communicate()
    assert proc.returncode == 2
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr
    assert lines[-1].startswith("tileseg: error: ") and "bad.tif" in lines[-1]
    assert "cannot read region" in lines[-1]
    assert read_record(out)["status"] != "complete"


def test_a_failing_read_among_parallel_ones_is_one_line_and_its_task_not_done(
    tmp_path, model, monkeypatch
):
    """With a batch's windows read in parallel threads (as on a GPU), the corrupt tile's error
    is the run's one-line error, and the task it belongs to is not marked done."""
    monkeypatch.setattr("pipeline.runtime.worker.parallel_io", lambda device: True)
    path = tiff_with_a_corrupt_tile(tmp_path / "bad.tif")
    out = tmp_path / "out.zarr"
    options = SegmentOptions(model=model, tile=64, chunk=64, normalize="none", batch_size=4)
    with pytest.raises(TilesegError, match=r"bad\.tif: cannot read region"):
        segment_image(path, out, options)
    assert read_record(out)["status"] != "complete"
    done = {p.name for p in done_dir(out).glob("tiles-*")}
    assert "tiles-0000001" not in done  # tile (1, 1) reads file tile 5: the second row's task


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda d: write_zarr(d / "c.zarr", np.zeros((64, 64), np.complex64), chunks=(32, 32)),
         "unsupported pixel type complex64"),
        (lambda d: write_zarr(d / "tiny.zarr", np.zeros((10, 300), np.uint8), chunks=(10, 64)),
         "smaller than the model's halo"),
        (lambda d: write_zarr(d / "empty.zarr", np.zeros((0, 64), np.uint8), chunks=(1, 64)),
         "zero-size"),
    ],
)  # fmt: skip
def test_unusable_images_are_refused(tmp_path, model, make, expected):
    path = make(tmp_path)
    proc = cli(str(path), str(tmp_path / "o.zarr"), "--model", model)
    _, stderr = proc.communicate()
    assert proc.returncode == 2 and "Traceback" not in stderr
    assert expected in stderr.strip().splitlines()[-1]
    assert not (tmp_path / "o.zarr").exists()


def test_zarr_with_a_missing_chunk_is_refused_unless_allowed(tmp_path, model):
    data = np.random.default_rng(2).integers(1, 255, (96, 96)).astype(np.uint8)
    path = write_zarr(tmp_path / "holey.zarr", data, chunks=(32, 32))
    (path / "c" / "1" / "2").unlink()
    args = ["--model", model, "--normalize", "none", "--tile", "32", "--chunk", "32"]
    proc = cli(str(path), str(tmp_path / "o.zarr"), *args)
    _, stderr = proc.communicate()
    assert proc.returncode == 2 and "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    assert "holey.zarr" in line and "'c/1/2' is missing" in line
    assert read_record(tmp_path / "o.zarr")["status"] != "complete"
    proc = cli(str(path), str(tmp_path / "o.zarr"), *args, "--allow-missing-chunks", "--overwrite")
    assert proc.communicate() and proc.returncode == 0


def test_unwritable_output_is_refused(tmp_path, slide, model):
    """An output below a regular file cannot be created, whoever runs the test (root too)."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    proc = cli(str(slide), str(blocker / "out.zarr"), "--model", model)
    _, stderr = proc.communicate()
    assert proc.returncode == 2 and "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    assert "cannot write output" in line and "out.zarr" in line


def test_full_disk_stops_with_one_line_and_no_done_record(tmp_path, slide, model):
    """A file-size limit makes chunk writes fail like a full disk (EFBIG instead of ENOSPC)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    out = tmp_path / "out.zarr"
    args = ["--model", model, "--save-probabilities", "--probability-dtype", "float32"]
    proc = cli(str(slide), str(out), *args, preexec_fn=limit)
    _, stderr = proc.communicate()
    assert proc.returncode == 2, stderr
    assert "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    assert "cannot write output" in line and "out.zarr" in line
    record = read_record(out)
    assert record is None or record["status"] != "complete"


class Killed(BaseException):
    """Stands for a SIGKILL at one exact point: nothing after it runs, no cleanup is owed."""


def test_killed_while_creating_the_output_the_same_command_starts_afresh(
    tmp_path, slide, model, monkeypatch
):
    import pipeline.output.ngff

    options = SegmentOptions(model=model, tile=64, chunk=64, batch_size=2)
    segment_image(slide, tmp_path / "reference.zarr", options)
    out = tmp_path / "out.zarr"

    def killed_after_the_skeleton(*args):
        real(*args)
        raise Killed

    real = pipeline.output.ngff._create_skeleton
    monkeypatch.setattr(pipeline.output.ngff, "_create_skeleton", killed_after_the_skeleton)
    with pytest.raises(Killed):
        segment_image(slide, out, options)
    assert not out.exists()  # never a half-made group that a rerun would refuse as foreign
    assert list(tmp_path.glob(".out.zarr.creating-*"))
    monkeypatch.setattr(pipeline.output.ngff, "_create_skeleton", real)

    segment_image(slide, out, options)
    assert read_record(out)["status"] == "complete"
    assert not list(tmp_path.glob(".out.zarr.creating-*"))  # the leftover is cleared
    assert chunk_files(out) == chunk_files(tmp_path / "reference.zarr")


def test_a_failed_normalisation_leaves_no_output_beside_the_built_skeleton(
    tmp_path, slide, model, monkeypatch
):
    # The arrays are built while the normalisation is decided: when it fails, neither the
    # output nor the hidden build is left, and the same command then makes the whole output.
    import pipeline.engine.driver

    options = SegmentOptions(model=model, tile=64, chunk=64, batch_size=2)
    segment_image(slide, tmp_path / "reference.zarr", options)
    out = tmp_path / "out.zarr"

    def unreadable(*args, **kwargs):
        raise TilesegError(slide, "cannot read the normalisation sample")

    monkeypatch.setattr(pipeline.engine.driver, "compute_normalization", unreadable)
    with pytest.raises(TilesegError, match="normalisation sample"):
        segment_image(slide, out, options)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.zarr.creating-*"))
    monkeypatch.undo()

    segment_image(slide, out, options)
    assert read_record(out)["status"] == "complete"
    assert chunk_files(out) == chunk_files(tmp_path / "reference.zarr")


def test_resumed_after_the_object_steps_the_record_keeps_their_summaries(
    tmp_path, slide, model, monkeypatch
):
    import pipeline.engine.driver

    options = SegmentOptions(
        model=model, tile=64, chunk=64, instances="connected", table="csv", export=("geojson",)
    )
    out = tmp_path / "out.zarr"

    def killed_before_the_record(*args):
        raise Killed

    monkeypatch.setattr(pipeline.engine.driver, "mark_complete", killed_before_the_record)
    with pytest.raises(Killed):
        segment_image(slide, out, options)
    monkeypatch.undo()
    assert read_record(out)["status"] == "running"
    result = segment_image(slide, out, options)
    assert result.resumed_tasks > 0
    record = read_record(out)
    assert record["status"] == "complete"
    assert record["instances"]["objects"] > 0
    assert record["table"]["objects"] == record["instances"]["objects"]
    assert record["export"]["objects"] == record["instances"]["objects"]
    assert record["export"]["files"] == {"geojson": "objects.geojson"}


def _many_corrupt_tiles(path, *, channels: int = 0):
    """A 2048x2048 zlib TIFF of 64x64 tiles with every third tile overwritten by garbage: one
    window read touches hundreds of tiles, many of them failing to decode. With ``channels``,
    one page per channel (read through tifffile's Zarr store), the first one's tiles broken."""
    shape = (channels, 2048, 2048) if channels else (2048, 2048)
    image = np.random.default_rng(3).integers(0, 255, shape).astype(np.uint8)
    axes = "CYX" if channels else "YX"
    path = write_tiff(path, image, axes=axes, tile=(64, 64), compression="zlib")
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        tiles = list(zip(page.dataoffsets, page.databytecounts, strict=True))[::3]
    with open(path, "r+b") as f:
        for offset, count in tiles:
            f.seek(offset)
            f.write(b"\xff" * count)
    return path


def test_failed_read_leaves_no_chunk_read_running(tmp_path):
    """zarr gathers a window's chunk reads without cancelling the others when one fails: the
    error must come back only once every sibling has finished, none left to fail on the closed
    file or be destroyed pending at exit (each printed by asyncio as an unretrieved error)."""
    import asyncio

    from zarr.core.sync import sync

    from pipeline.errors import TilesegError
    from pipeline.io.readers import open_image

    async def others() -> int:
        return len(asyncio.all_tasks()) - 1  # the zarr loop's tasks, less this one

    image = open_image(_many_corrupt_tiles(tmp_path / "bad.tif", channels=2))
    assert image.n_channels == 2  # pages: through zarr (one page's tiles are read directly)
    with pytest.raises(TilesegError, match=r"bad\.tif: cannot read region y=0:2048, x=0:2048"):
        image.read((slice(None), slice(None)))
    assert sync(others()) == 0
    image.close()


def test_corrupt_tiles_give_one_line_on_stderr_every_time(tmp_path, model):
    """Reported intermittently followed by a flood of asyncio tracebacks at exit: runs at once
    (loading the machine) must each print the one line and nothing else."""
    path = _many_corrupt_tiles(tmp_path / "bad.tif")
    procs = [cli(str(path), str(tmp_path / f"out{i}.zarr"), "--model", model) for i in range(4)]
    for proc in procs:
        _, stderr = proc.communicate()
        assert proc.returncode == 2
        lines = stderr.strip().splitlines()
        assert len(lines) == 1, stderr[:2000]
        assert lines[0].startswith("tileseg: error: ") and "bad.tif: cannot read region" in lines[0]


def test_non_finite_input_pixels_are_segmented_as_zero_and_reported(tmp_path, model):
    """NaN and ±Inf pixels of a float image: labels equal those of the same image with those
    pixels set to the value that normalises to 0, and the CLI warns with their count."""
    rng = np.random.default_rng(3)
    clean = (rng.random((256, 320)) * 200).astype(np.float32)
    dirty = clean.copy()
    dirty.flat[rng.choice(dirty.size, 100, replace=False)] = np.nan
    dirty[100:120, 200:230] = np.inf
    dirty[5, 5] = -np.inf
    bad = ~np.isfinite(dirty)
    clean[bad] = 0.0  # the fixed normalisation below maps 0 to 0
    args = ["--model", model, "--tile", "64", "--chunk", "64", "--normalize", "fixed",
            "--scale", "0.01"]  # fmt: skip
    outputs = {}
    for name, image in (("clean", clean), ("dirty", dirty)):
        path = write_tiff(tmp_path / f"{name}.tif", image, axes="YX", compression="zlib")
        outputs[name] = tmp_path / f"{name}.zarr"
        proc = cli(str(path), str(outputs[name]), *args)
        _, stderr = proc.communicate()
        assert proc.returncode == 0, stderr
        if name == "dirty":
            line = stderr.strip().splitlines()[-1]
            assert line.startswith("tileseg: warning: ") and f"{bad.sum()} pixels" in line
    assert read_record(outputs["dirty"])["nonfinite_pixels"] == bad.sum()
    assert chunk_files(outputs["dirty"])["labels/segmentation/0/0/0"] is not None
    dirty_files, clean_files = chunk_files(outputs["dirty"]), chunk_files(outputs["clean"])
    labels = [k for k in clean_files if k.startswith("labels/")]
    assert labels and all(dirty_files[k] == clean_files[k] for k in labels)


def test_percentile_normalisation_of_a_float_image_with_nans_is_not_empty(tmp_path, model):
    rng = np.random.default_rng(4)
    image = (rng.random((256, 256)) * 200).astype(np.float32)
    image.flat[rng.choice(image.size, 100, replace=False)] = np.nan
    path = write_tiff(tmp_path / "nan.tif", image, axes="YX")
    result = segment_image(path, tmp_path / "out.zarr", SegmentOptions(model=model, tile=64))
    norm = read_record(tmp_path / "out.zarr")["normalization"]
    assert all(np.isfinite(norm["scale"])) and all(np.isfinite(norm["offset"]))
    assert result.nonfinite_pixels == 100


def test_a_run_failed_on_a_corrupt_tile_resumes_once_the_input_is_repaired(tmp_path, model):
    path = tmp_path / "slide.tif"
    tiff_with_a_corrupt_tile(path)
    corrupt = path.read_bytes()
    image = np.random.default_rng(1).integers(0, 255, (256, 256)).astype(np.uint8)
    write_tiff(path, image, axes="YX", tile=(64, 64), compression="zlib")
    good = path.read_bytes()
    args = ["--model", model, "--tile", "64", "--chunk", "64", "--normalize", "none"]
    reference = tmp_path / "reference.zarr"
    proc = cli(str(path), str(reference), *args)
    assert proc.communicate() and proc.returncode == 0

    path.write_bytes(corrupt)
    out = tmp_path / "out.zarr"
    proc = cli(str(path), str(out), *args)
    _, stderr = proc.communicate()
    assert proc.returncode == 2
    line = stderr.strip().splitlines()[-1]
    assert "cannot read region" in line and "resumes when the same command is given again" in line

    assert read_record(out)["status"] == "failed"
    path.write_bytes(good)  # repaired in place
    proc = cli(str(path), str(out), *args)
    _, stderr = proc.communicate()
    assert proc.returncode == 0, stderr
    assert read_record(out)["status"] == "complete"
    assert chunk_files(out) == chunk_files(reference)


def test_workers_dying_past_the_allowed_failures_is_one_line_and_resumable(tmp_path, slide, model):
    import dask

    options = SegmentOptions(model=model, tile=32, chunk=32, batch_size=2)
    segment_image(slide, tmp_path / "reference.zarr", options)
    out = tmp_path / "out.zarr"
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        errors = kill_a_worker_mid_run(slide, out, options, workers=1, after=2)
    assert len(errors) == 1 and isinstance(errors[0], TilesegError), errors
    assert "died running task" in str(errors[0]) and "resumes when" in str(errors[0])
    assert "\n" not in str(errors[0])
    segment_image(slide, out, options)
    assert chunk_files(out) == chunk_files(tmp_path / "reference.zarr")
