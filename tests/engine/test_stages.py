"""Overlapped read / infer / write stages: order, bounds, failures."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from profiles import examples

from pipeline.engine.stages import run_stages


class Recorder:
    """Stage functions that record what ran where, and how far reads ran ahead."""

    def __init__(self, *, fail: tuple[str, int] | None = None, delay: float = 0.0) -> None:
        self.lock = threading.Lock()
        self.read_done: set[int] = set()
        self.inferred: list[int] = []
        self.written: dict[int, int] = {}
        self.infer_threads: set[int] = set()
        self.max_ahead = 0
        self.fail = fail
        self.delay = delay
        self.after: list[int] = []
        self.after_threads: set[int] = set()

    def _maybe_fail(self, stage: str, item: int) -> None:
        if self.fail == (stage, item):
            raise RuntimeError(f"{stage} {item} failed")

    def read(self, item: int) -> int:
        time.sleep(self.delay)
        self._maybe_fail("read", item)
        with self.lock:
            self.read_done.add(item)
            self.max_ahead = max(self.max_ahead, len(self.read_done) - len(self.inferred))
        return item * 10

    def infer(self, item: int, data: int) -> int:
        self._maybe_fail("infer", item)
        with self.lock:
            self.infer_threads.add(threading.get_ident())
            self.inferred.append(item)
        return data + 1

    def write(self, item: int, out: int) -> None:
        time.sleep(self.delay)
        self._maybe_fail("write", item)
        with self.lock:
            assert item not in self.written
            self.written[item] = out

    def finished(self, item: int) -> None:
        with self.lock:
            assert item in self.written  # never before the item's own write has finished
        self.after.append(item)
        self.after_threads.add(threading.get_ident())

    def run(self, items, depth):
        return run_stages(
            items, read=self.read, infer=self.infer, write=self.write, depth=depth,
            after=self.finished,
        )  # fmt: skip


@settings(max_examples=examples(40), deadline=None)
@given(n=st.integers(0, 12), depth=st.integers(0, 4))
def test_every_item_is_written_once_from_its_own_read(n, depth):
    rec = Recorder()
    times = rec.run(list(range(n)), depth)
    assert rec.written == {i: i * 10 + 1 for i in range(n)}
    assert rec.inferred == list(range(n))  # inference keeps the order of the items
    assert rec.infer_threads <= {threading.get_ident()}  # and runs in the calling thread
    assert rec.after == list(range(n))  # `after` once per item, in order, in that thread
    assert rec.after_threads <= {threading.get_ident()}
    assert times.items == n
    # Besides the item being inferred, reads run ahead by at most `depth` items.
    assert rec.max_ahead <= depth + 1


def test_reads_and_writes_overlap_inference():
    rec = Recorder(delay=0.05)
    start = time.perf_counter()
    times = rec.run(list(range(8)), 2)
    wall = time.perf_counter() - start
    # 8 reads + 8 writes of 50 ms each: 0.8 s serial; overlapped in two threads each way.
    assert wall < 0.6
    assert times.read >= 0.35 and times.write >= 0.35


@pytest.mark.parametrize("stage", ["read", "infer", "write"])
@pytest.mark.parametrize("depth", [0, 2])
def test_the_first_failure_is_raised_and_later_items_are_not_written(stage, depth):
    rec = Recorder(fail=(stage, 3))
    with pytest.raises(RuntimeError, match=f"{stage} 3 failed"):
        rec.run(list(range(20)), depth)
    assert 3 not in rec.written
    assert rec.after == list(range(len(rec.after))) and len(rec.after) <= 3  # none from 3 on
    # Nothing far beyond the failure was written: at most the items already in flight.
    assert max(rec.written, default=-1) <= 3 + 2 * depth + 1
    # No stage thread is left running once run_stages has raised.
    stage_threads = ("tileseg-read", "tileseg-write")  # (not the per-process I/O pool)
    assert not [t for t in threading.enumerate() if t.name.startswith(stage_threads)]
