"""The pyramid levels above the inference tasks' (``pipeline/engine/pyramid.py``): parts that
each own a band of chunks, run after the tasks or beside them as their sources finish, the
same levels either way, and resumable."""

from __future__ import annotations

import itertools
import math
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from imagefiles import write_tiff
from outputs import assert_pyramid_from_level_below, chunk_files

import pipeline.engine.driver
import pipeline.engine.pyramid
import pipeline.engine.tasks
from pipeline.config import SegmentOptions
from pipeline.engine.driver import segment_image
from pipeline.engine.pyramid import band_regions, pyramid_parts
from pipeline.errors import TilesegError
from pipeline.geometry import ModelGeometry, TileGrid, group_tiles, plan_tiles
from pipeline.output.ngff import OutputLayout, levels_in_tasks, read_record
from pipeline.output.provenance import done_dir


def _grid(shape: tuple[int, int], tile: int, chunk: int) -> TileGrid:
    geometry = ModelGeometry.uniform(2, halo=4, align=1, shrink=0, size_min=1, size_step=1)
    return plan_tiles(shape, geometry=geometry, tile=(tile, tile), chunk=(chunk, chunk))


def _cells(region, chunks) -> set[tuple[int, ...]]:
    """The chunk indices of a chunk-aligned region."""
    ranges = [range(s.start // c, math.ceil(s.stop / c)) for s, c in zip(region, chunks)]
    return set(itertools.product(*ranges))


@given(
    shape=st.tuples(st.integers(40, 400), st.integers(40, 400)),
    chunk=st.sampled_from([8, 16]),
    tiles_per_chunk=st.sampled_from([1, 2, 4]),
    per_group=st.integers(1, 9),
)
def test_each_level_is_split_once_over_and_each_part_reads_what_its_sources_wrote(
    shape, chunk, tiles_per_chunk, per_group
):
    tile = chunk * tiles_per_chunk
    layout = OutputLayout(spatial_shape=shape, chunks=(chunk, chunk), classes=2, label_dtype="|u1")
    grid = _grid(shape, tile, chunk)
    groups = group_tiles(grid, per_group=per_group)
    writers = {f"tiles-{i}": [t.region for t in g] for i, g in enumerate(groups)}
    levels = levels_in_tasks(layout, [t.region for t in grid.tiles()])
    parts = pyramid_parts(layout, levels, writers)
    assert [p.level for p in parts] == sorted(p.level for p in parts)
    # who wrote each chunk of each level: the writers up to ``levels``, then the parts
    owner = {}
    for name, regions in writers.items():
        for region in regions:
            for _ in range(levels):
                region = tuple(slice(-(-s.start // 2), -(-s.stop // 2)) for s in region)
            owner.update({(levels, c): name for c in _cells(region, layout.level_chunks(levels))})
    for level in range(levels + 1, len(layout.levels)):
        here = [p for p in parts if p.level == level]
        assert [p.region for p in here] == band_regions(layout, level)
        counts = np.zeros(layout.levels[level], np.int32)
        for part in here:
            counts[part.region] += 1
            below = layout.level_chunks(level - 1)
            source = [slice(2 * s.start, min(2 * s.stop, n))
                      for s, n in zip(part.region, layout.levels[level - 1])]  # fmt: skip
            assert part.needs == {owner[(level - 1, c)] for c in _cells(source, below)}
            owner.update({(level, c): part.name
                          for c in _cells(part.region, layout.level_chunks(level))})  # fmt: skip
        assert (counts == 1).all()  # every pixel of the level written once, by one part


@pytest.fixture
def slide(tmp_path):
    image = np.random.default_rng(3).integers(0, 255, (200, 180), dtype=np.uint8)
    return write_tiff(tmp_path / "a.tif", image, axes="YX", tile=(32, 32))


def _beside(monkeypatch) -> None:
    monkeypatch.setattr(pipeline.engine.driver, "overview_alongside", lambda runtime: True)


def _parts_written(monkeypatch) -> tuple[list[str], threading.Event]:
    """Record the levels the parts write, and an event set once one is written."""
    real, written, one = pipeline.engine.pyramid.downsample_region, [], threading.Event()

    def downsample_region(output, layout, level, region):
        real(output, layout, level, region)
        written.append(level)
        one.set()

    monkeypatch.setattr(pipeline.engine.pyramid, "downsample_region", downsample_region)
    return written, one


@pytest.mark.parametrize("workers", [1, 2])
def test_parts_beside_the_tasks_run_before_the_last_task_and_give_the_same_levels(
    tmp_path, slide, model, monkeypatch, workers
):
    """The last task waits until a part is written: with the parts after the tasks it never
    would be. The output is the one written with the pyramid after the tasks."""
    options = SegmentOptions(
        model=model, tile=32, chunk=8, batch_size=2, workers=workers, save_probabilities=True
    )
    segment_image(slide, tmp_path / "after.zarr", options)
    _beside(monkeypatch)
    written, one = _parts_written(monkeypatch)
    real, last = pipeline.engine.tasks.mark_done, []

    def mark_done(output, name, summary=None):
        if name == "tiles-0000020":  # the last of 21 tasks (42 tiles, 2 a task)
            last.append(one.wait(timeout=20))
        real(output, name, summary)

    monkeypatch.setattr(pipeline.engine.tasks, "mark_done", mark_done)
    out = tmp_path / "beside.zarr"
    segment_image(slide, out, options)
    assert last == [True], "no pyramid part was written before the last task finished"
    assert read_record(out)["status"] == "complete"
    assert chunk_files(out) == chunk_files(tmp_path / "after.zarr")
    assert assert_pyramid_from_level_below(out) == 5
    assert sorted(set(written)) == [3, 4, 5]  # the tasks write levels 1 and 2


def test_a_failed_part_beside_the_tasks_fails_the_run_and_the_resumed_run_redoes_the_rest(
    tmp_path, slide, model, monkeypatch
):
    options = SegmentOptions(model=model, tile=32, chunk=8, batch_size=2)
    segment_image(slide, tmp_path / "after.zarr", options)
    _beside(monkeypatch)
    real, calls = pipeline.engine.pyramid.downsample_region, []

    def failing(output, layout, level, region):
        calls.append(level)
        if len(calls) == 2:
            raise PermissionError(13, "Permission denied", str(output))
        real(output, layout, level, region)

    monkeypatch.setattr(pipeline.engine.pyramid, "downsample_region", failing)
    out = tmp_path / "out.zarr"
    with pytest.raises(TilesegError, match="cannot write output"):
        segment_image(slide, out, options)
    assert read_record(out)["status"] == "failed"
    marked = _pyramid_markers(out)
    assert 1 <= len(marked) < len(calls)  # the failed part is not marked
    monkeypatch.setattr(pipeline.engine.pyramid, "downsample_region", real)
    written, _ = _parts_written(monkeypatch)
    segment_image(slide, out, options)
    assert read_record(out)["status"] == "complete"
    assert len(written) == len(_pyramid_markers(out)) - len(marked)  # those not marked, once
    assert chunk_files(out) == chunk_files(tmp_path / "after.zarr")


def _pyramid_markers(out) -> set[str]:
    return {p.name for p in done_dir(out).iterdir() if p.name.startswith("pyramid-")}
