"""Where a run's seconds go: every phase in the record's timings, and ``--profile``."""

from __future__ import annotations

import numpy as np
import pytest
from imagefiles import write_tiff

from pipeline.cli.main import main
from pipeline.config import SERIAL_CORES, SegmentOptions
from pipeline.engine.driver import segment_image
from pipeline.engine.profile import PHASES, PhaseTimer, profile_table
from pipeline.models import UNetConfig
from pipeline.output.ngff import read_record

# Every phase a local CPU run of the default options passes through (the record is written
# after the record's own timings, so only the result has its phase).
LOCAL_PHASES = [name for name in PHASES if name != "record"]


@pytest.fixture
def model_config():
    return UNetConfig(depth=2, width=4, padding="valid", classes=3)


@pytest.fixture
def slide(tmp_path):
    image = (np.random.default_rng(0).random((300, 260)) * 4000).astype(np.uint16)
    path = tmp_path / "slide.ome.tif"
    write_tiff(path, image, axes="YX", tile=(64, 64), compression="zlib")
    return path


def test_the_record_times_every_phase_and_they_add_up_to_the_total(
    tmp_path, slide, model, monkeypatch
):
    # The overview after the tasks, as on a CPU of few cores: the phases follow each other.
    monkeypatch.setattr("pipeline.runtime.resolved.usable_cores", lambda: SERIAL_CORES)
    options = SegmentOptions(model=model, tile=128, chunk=64, device="cpu")
    result = segment_image(slide, tmp_path / "out.zarr", options)
    timings = read_record(tmp_path / "out.zarr")["timings"]
    for name in LOCAL_PHASES:
        assert timings[f"{name}_wall"] >= 0, name
    walls = [timings[f"{name}_wall"] for name in LOCAL_PHASES] + [timings["other_wall"]]
    assert sum(walls) == pytest.approx(timings["total_wall"], rel=1e-6)
    assert timings["segment_wall"] > 0 and timings["infer"] > 0
    # The result adds the record's own writing, and its total covers it.
    assert result.timings["record_wall"] > 0
    assert result.seconds == result.timings["total_wall"] >= timings["total_wall"]


def test_profile_flag_prints_the_phases(tmp_path, slide, model, capsys):
    out = tmp_path / "out.zarr"
    args = ["segment", str(slide), str(out), "--model", model, "--tile", "128", "--chunk", "64"]
    assert main([*args, "--no-progress", "--profile"]) == 0
    printed = capsys.readouterr().out
    for name in [*PHASES, "other", "total"]:
        assert f"\n{name} " in printed, name
    assert main([*args, "--no-progress"]) == 0  # skipped: complete; no table without the flag
    assert "total" not in capsys.readouterr().out


def test_phase_timer_sums_repeated_phases_and_leaves_the_rest_to_other():
    timer = PhaseTimer()
    timer.add("segment", 1.0)
    timer.add("segment", 0.5)
    with timer.phase("open"):
        pass
    walls = timer.walls()
    assert walls["segment_wall"] == 1.5 and walls["open_wall"] >= 0
    assert walls["other_wall"] == 0.0  # never negative, though the phases claim more
    table = profile_table({"segment_wall": 3.0, "other_wall": 1.0, "total_wall": 4.0})
    assert "segment" in table and "75.0%" in table and "open" not in table


@pytest.mark.parametrize(
    ("percentiles", "samples"), [((1.0, 99.8), 1), ((2.0, 99.0), 2)], ids=["shared", "own"]
)
def test_the_object_size_check_and_the_run_sample_the_image_once(
    tmp_path, monkeypatch, percentiles, samples
):
    """The default model records its trained size, so its runs check object sizes: with the
    default percentiles the check's normalisation is the run's, decided once for both."""
    import pipeline.preprocess.normalize as normalize

    image = (np.random.default_rng(1).random((256, 256)) * 4000).astype(np.uint16)
    path = write_tiff(tmp_path / "s.tif", image, axes="YX", tile=(64, 64))
    calls = []
    real = normalize.sample_pixels
    monkeypatch.setattr(normalize, "sample_pixels", lambda img: calls.append(1) or real(img))
    options = SegmentOptions(tile=128, device="cpu", percentiles=percentiles)
    segment_image(path, tmp_path / "out.zarr", options)
    assert len(calls) == samples
    record = read_record(tmp_path / "out.zarr")
    lo, hi = percentiles
    assert f"percentiles {lo}-{hi}" in record["normalization"]["source"]
