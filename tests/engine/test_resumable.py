"""Steps a resumed run does not redo (``pipeline/engine/resumable.py``): the parts with a
completion marker are skipped, the others run and are marked, and a whole step's summary
comes back from its marker."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import SegmentOptions
from pipeline.engine.resumable import pending, run_once, run_resumable
from pipeline.errors import TilesegError
from pipeline.output.provenance import done_dir, done_summary, is_done, mark_done
from pipeline.runtime.resolved import resolve_runtime


def _write_part(path: str, text: str) -> None:
    Path(path).write_text(text)


def _failing_part(path: str) -> None:
    raise PermissionError(13, "Permission denied", path)


@pytest.fixture
def output(tmp_path) -> str:
    done_dir(tmp_path / "out.zarr").mkdir(parents=True)
    return str(tmp_path / "out.zarr")


@pytest.mark.parametrize("workers", [1, 3])
def test_only_the_parts_not_done_run_and_each_is_marked(output, workers):
    names = [f"part-{i}" for i in range(5)]
    mark_done(output, "part-1")
    mark_done(output, "part-3")
    assert pending(output, names) == (["part-0", "part-2", "part-4"], ["part-1", "part-3"])
    parts = [(name, (f"{output}/{name}.txt", name)) for name in names]
    runtime = resolve_runtime(SegmentOptions(device="cpu", workers=workers))
    run_resumable(_write_part, parts, output=output, run_id="", runtime=runtime)
    written = sorted(p.stem for p in Path(output).glob("*.txt"))
    assert written == ["part-0", "part-2", "part-4"]
    assert all(is_done(output, name) for name in names)
    assert pending(output, names) == ([], names)


def test_a_part_that_cannot_write_is_one_line_and_stays_unmarked(output):
    runtime = resolve_runtime(SegmentOptions(device="cpu"))
    with pytest.raises(TilesegError, match="cannot write output"):
        run_resumable(_failing_part, [("part", (output,))], output=output, run_id="",
                      runtime=runtime)  # fmt: skip
    assert not is_done(output, "part")


def test_a_whole_step_runs_once_and_keeps_its_summary(output):
    calls = []

    def step() -> dict[str, int]:
        calls.append(1)
        return {"objects": 7}

    assert run_once(output, "instances", step) == {"objects": 7}
    assert done_summary(output, "instances") == {"objects": 7}
    assert run_once(output, "instances", step) == {"objects": 7}  # from the marker
    assert len(calls) == 1
