"""The I/O threads' pool (``pipeline/runtime/priority.py``): lowest priority first, first
come first among equals, results and failures handed back as an executor's futures."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.runtime.priority import PriorityPool

ONE_THREAD = PriorityPool(1, name="test-priority")  # one for every example: threads never end


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), min_size=1, max_size=30))
def test_calls_waiting_run_lowest_priority_first_then_in_the_order_submitted(priorities):
    pool = ONE_THREAD
    started, release, ran = threading.Event(), threading.Event(), []

    def block() -> None:
        started.set()
        release.wait(timeout=20)

    pool.submit(block)  # holds the one thread while the others queue up
    assert started.wait(timeout=20)
    futures = [pool.submit(ran.append, (p, i), priority=p) for i, p in enumerate(priorities)]
    release.set()
    for future in futures:
        future.result(timeout=20)
    assert ran == sorted((p, i) for i, p in enumerate(priorities))


def test_a_result_or_a_failure_comes_back_through_the_future():
    pool = PriorityPool(2, name="test-priority")
    assert pool.submit(pow, 2, 10, priority=(1, 0)).result(timeout=20) == 1024
    with pytest.raises(ZeroDivisionError):
        pool.submit(divmod, 1, 0).result(timeout=20)
    assert pool.submit(len, "abc").result(timeout=20) == 3  # the threads outlive a failure
