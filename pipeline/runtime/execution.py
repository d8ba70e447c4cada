"""Running independent tasks on Dask: embedded threads by default, or an existing cluster.

Tasks take small picklable specs and return small result dicts; the data they produce goes
straight to the output store, never through the scheduler.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from typing import Any, TypeVar

import dask
from dask.callbacks import Callback
from dask.utils import funcname

from pipeline.errors import TilesegError
from pipeline.runtime.worker_wait import wait_for_workers

__all__ = ["run_tasks"]

T = TypeVar("T")
R = TypeVar("R")
WATCH_S = 5.0  # while no task finishes, how often the workers are checked
POLL_S = 0.02  # how often finished tasks are collected (a task takes seconds)


class _Progress(Callback):
    """Dask local-scheduler hook calling ``on_done`` with each finished task's result."""

    def __init__(self, keys: set[Any], on_done: Callable[[Any], None]) -> None:
        super().__init__()
        self._keys = keys
        self._on_done = on_done

    def _posttask(self, key, result, dsk, state, worker_id) -> None:
        if key in self._keys:
            self._on_done(result)


def run_tasks(
    fn: Callable[[T], R],
    items: Sequence[T],
    *,
    scheduler: str | None = None,
    workers: int = 1,
    on_done: Callable[[R], None] | None = None,
    name: str | None = None,
    resources: dict[str, float] | None = None,
) -> list[R]:
    """Run ``fn`` on every item and return the results in order.

    Parameters
    ----------
    scheduler
        ``None`` runs on Dask's embedded threaded scheduler with ``workers`` threads (no server;
        with one, in order in the calling thread);
        an address (``tcp://host:8786``) runs on that existing distributed cluster, where a lost
        worker's tasks are rescheduled elsewhere.
        No worker able to run the tasks for ``tileseg.worker-wait-seconds`` (Dask config,
        default 300) ends the run with :class:`~pipeline.runtime.worker_wait.NoWorkers`, not a hang.
    on_done
        Called in the calling process with each result as it finishes (progress reporting).
    name
        The tasks' key prefix, as the scheduler and its dashboard show them (default: the name
        of ``fn``).
    resources
        Worker resources each task needs on a distributed cluster (e.g. ``{"GPU": 1}``, so a GPU
        worker runs one model at a time); ignored by the embedded scheduler.
    """
    if not items:
        return []
    if scheduler is None and workers == 1:
        # What Dask's synchronous scheduler does, without the set-up of its first call:
        # in order, in the calling thread. There a CPU forward's activations come from glibc's
        # main heap, which keeps freed memory (pipeline/runtime/heap.py); any other thread's arena
        # maps and page-faults them in anew for every batch.
        results = []
        for item in items:
            results.append(result := fn(item))
            if on_done:
                on_done(result)
        return results
    prefix = name or funcname(fn)
    if scheduler is None:
        tasks = [
            dask.delayed(fn, pure=False)(item, dask_key_name=(prefix, i))
            for i, item in enumerate(items)
        ]
        progress = _Progress({t.key for t in tasks}, on_done) if on_done else nullcontext()
        with progress:
            return list(dask.compute(*tasks, scheduler="threads", num_workers=workers))
    return _run_distributed(
        fn, items, scheduler=scheduler, on_done=on_done, resources=resources, name=prefix
    )


def _run_distributed(
    fn: Callable[[T], R],
    items: Sequence[T],
    *,
    scheduler: str,
    on_done: Callable[[R], None] | None,
    resources: dict[str, float] | None = None,
    name: str,
) -> list[R]:
    from distributed import Client, KilledWorker

    try:
        client = Client(scheduler, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:  # refused, timed out, malformed address
        raise TilesegError(scheduler, f"cannot connect to the Dask scheduler ({exc})") from None
    with client:
        # A scheduler without an able worker would hold the tasks forever: bounded waits.
        wait_for_workers(client, resources, address=scheduler)
        token = uuid.uuid4().hex  # keys unique to this call, named for the scheduler's views
        keys = [f"{name}-{token}-{i}" for i in range(len(items))]
        futures = client.map(fn, list(items), key=keys, resources=resources)
        index = {f.key: i for i, f in enumerate(futures)}
        results: list[Any] = [None] * len(futures)
        try:
            for future in _finished(client, futures, resources, scheduler):
                # .result() re-raises a task's exception here, with its original type.
                results[index[future.key]] = result = future.result()
                if on_done:
                    on_done(result)
        except KilledWorker as exc:
            client.cancel(futures)
            raise TilesegError(
                scheduler,
                f"{exc.allowed_failures + 1} workers died running task {exc.task!r} (the last "
                f"one {exc.last_worker.address}): see the workers' logs (out of memory?)",
            ) from None
        except BaseException:
            client.cancel(futures)
            raise
    return results


def _finished(
    client: Any, futures: list[Any], resources: dict[str, float] | None, scheduler: str
) -> Iterator[Any]:
    """The futures as they finish; while none does, the cluster is asked whether a worker
    able to run them is still there (workers lost at a job's walltime, and none replaced)."""
    from distributed import as_completed

    finished = as_completed(futures, loop=client.loop)
    quiet_since = time.monotonic()
    while not finished.is_empty():
        batch = finished.next_batch(block=False)
        yield from batch
        now = time.monotonic()
        if batch:
            quiet_since = now
        elif now - quiet_since > WATCH_S:
            wait_for_workers(client, resources, address=scheduler)
            quiet_since = time.monotonic()
        else:
            time.sleep(POLL_S)
