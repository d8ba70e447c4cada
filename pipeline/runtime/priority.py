"""A thread pool that runs the calls waiting for it lowest priority first.

The I/O threads of a GPU run (:func:`pipeline.runtime.worker.io_pool`) serve the reads and
writes of every task thread at once. First come, first served, two tasks' first batches
would share the threads and both be read late; served oldest batch first, the first forward
waits for one batch's reads only, and the batches a forward waits for next go ahead of those
it needs later.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

__all__ = ["PriorityPool"]

R = TypeVar("R")


class PriorityPool:
    """``workers`` threads (daemons, started with the pool) that run submitted calls in order
    of ``priority`` (any comparable values; among equal ones, first submitted first).

    Parameters
    ----------
    workers
        Threads, at least one.
    name
        The threads' name prefix.
    """

    def __init__(self, workers: int, *, name: str) -> None:
        self._queue: list[tuple[Any, int, Future[Any], Callable[..., Any], tuple[Any, ...]]] = []
        self._ready = threading.Condition()
        self._order = itertools.count()
        for i in range(max(1, workers)):
            threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True).start()

    def submit(self, fn: Callable[..., R], *args: Any, priority: Any = 0) -> Future[R]:
        """Run ``fn(*args)`` once every call of a lower ``priority`` has started."""
        future: Future[R] = Future()
        with self._ready:
            heapq.heappush(self._queue, (priority, next(self._order), future, fn, args))
            self._ready.notify()
        return future

    def _work(self) -> None:
        while True:
            with self._ready:
                while not self._queue:
                    self._ready.wait()
                _, _, future, fn, args = heapq.heappop(self._queue)
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to whoever waits on it, as an executor does
                future.set_exception(exc)
