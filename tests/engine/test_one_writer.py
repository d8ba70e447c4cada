"""Two `tileseg segment` processes aimed at one output: never two writers, never a mixed output.

Afterwards the output equals, chunk file for chunk file, a clean run of the input its record
names, or the run that lost exited non-zero with one line naming the holder.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from imagefiles import write_tiff
from outputs import chunk_files, wait_for_done_tasks

from pipeline.models import UNetConfig, save_unet, seeded_unet
from pipeline.output.lock import OWNER_FILE, lock_path
from pipeline.output.ngff import read_record

pytestmark = pytest.mark.slow
ARGS = ["--tile", "32", "--chunk", "32", "--batch-size", "2", "--no-progress"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A model, two different slides, and a clean output of each."""
    root = tmp_path_factory.mktemp("one-writer")
    model = root / "m.safetensors"
    save_unet(seeded_unet(UNetConfig(depth=2, width=8, padding="same", classes=2), seed=0), model)
    slides, references = [], []
    for seed in (0, 1):
        image = np.random.default_rng(seed).integers(0, 255, (256, 256)).astype(np.uint8)
        slide = write_tiff(root / f"slide{seed}.tif", image, axes="YX", compression="zlib")
        reference = root / f"reference{seed}.zarr"
        code, _, stderr = finish(segment(slide, reference, model))
        assert code == 0, stderr
        slides.append(slide)
        references.append(chunk_files(reference))
    return model, slides, references


def segment(slide, out, model, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "segment", str(slide), str(out), "--model",
         str(model), *ARGS, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = proc.communicate(timeout=240)
    assert "Traceback" not in stderr, stderr
    return proc.returncode, stdout, stderr


def assert_clean_output_of_its_input(out, setup) -> None:
    _, slides, references = setup
    record = read_record(out)
    assert record["status"] == "complete"
    which = [str(s) for s in slides].index(record["input"])
    assert chunk_files(out) == references[which]


@pytest.mark.parametrize("delay", [0.0, 0.3])
@pytest.mark.parametrize("second", ["same", "other", "other-overwrite", "same-overwrite"])
def test_two_runs_on_one_output_never_both_write(tmp_path, setup, delay, second):
    model, slides, _ = setup
    out = tmp_path / "out.zarr"
    first = segment(slides[0], out, model)
    time.sleep(delay)
    slide = slides[0] if second.startswith("same") else slides[1]
    extra = ["--overwrite"] if second.endswith("overwrite") else []
    results = [finish(first), finish(segment(slide, out, model, *extra))]
    wrote = [code == 0 and "skipped" not in stdout for code, stdout, _ in results]
    assert wrote[0] or wrote[1]
    if all(wrote):  # the second ran only after the first had finished
        assert second.endswith("overwrite")
    for code, _, stderr in results:
        if code:
            assert code == 2
            line = stderr.strip().splitlines()[-1]
            assert "in use by another tileseg run" in line or "different input" in line, line
    assert_clean_output_of_its_input(out, setup)
    assert not lock_path(out).exists()


def test_killed_run_taken_over_then_the_successor_killed_resumes_clean(tmp_path, setup):
    """The first run is killed; a second replaces its output with --overwrite and is killed
    right after its new output is in place; the second's command then finishes it."""
    model, slides, references = setup
    out = tmp_path / "out.zarr"
    first = segment(slides[0], out, model)
    deadline = time.monotonic() + 120  # for this wait and the next
    wait_for_done_tasks(out, 3, running=lambda: first.poll() is None)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    owner = (out / OWNER_FILE).read_text()

    second = segment(slides[1], out, model, "--overwrite")
    while not ((out / OWNER_FILE).exists() and (out / OWNER_FILE).read_text() != owner):
        assert second.poll() is None and time.monotonic() < deadline
        time.sleep(0.002)
    second.send_signal(signal.SIGKILL)
    second.communicate()
    assert read_record(out)["input"] == str(slides[1])

    code, stdout, _ = finish(segment(slides[1], out, model))
    assert code == 0 and "skipped" not in stdout
    assert chunk_files(out) == references[1]


def test_overwrite_never_deletes_what_is_not_a_tileseg_output(tmp_path, setup):
    model, slides, _ = setup
    out = tmp_path / "precious"
    (out / "data").mkdir(parents=True)
    (out / "data" / "notes.txt").write_text("keep me")
    code, _, stderr = finish(segment(slides[0], out, model, "--overwrite"))
    assert code == 2
    line = stderr.strip().splitlines()[-1]
    assert "not a tileseg output" in line and "precious" in line
    assert (out / "data" / "notes.txt").read_text() == "keep me"
