"""A bounded wait for Dask workers able to run a run's tasks.

A distributed scheduler keeps a task whose resources (``GPU=0.5``) no worker declares, or any
task while it has no workers at all, waiting forever. A run sent there checks before it submits
and while it waits for results: no able worker for ``wait`` seconds in a row ends it with one
line naming what is missing (:class:`NoWorkers`), instead of a silent hang.

The wait is Dask config ``tileseg.worker-wait-seconds`` (default 300; also
``DASK_TILESEG__WORKER_WAIT_SECONDS`` in the environment); directory runs set it from
``run.worker_wait_seconds``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import dask

from pipeline.errors import TilesegError

__all__ = [
    "CONFIG_KEY",
    "DEFAULT_WAIT_S",
    "NoWorkers",
    "able_workers",
    "wait_for_workers",
    "worker_wait_s",
]

DEFAULT_WAIT_S = 300.0
CONFIG_KEY = "tileseg.worker-wait-seconds"
POLL_S = 0.5  # how often the scheduler is asked while waiting


class NoWorkers(TilesegError):
    """No worker able to run the tasks joined the cluster within the wait."""


def worker_wait_s() -> float:
    """The configured wait for able workers, in seconds."""
    value = dask.config.get(CONFIG_KEY, default=DEFAULT_WAIT_S)
    try:
        wait = float(value)
    except (TypeError, ValueError):
        raise TilesegError(CONFIG_KEY, f"must be a number of seconds, got {value!r}") from None
    if wait < 0:
        raise TilesegError(CONFIG_KEY, f"must be >= 0, got {value!r}")
    return wait


def able_workers(
    workers: Mapping[str, Mapping[str, Any]], resources: Mapping[str, float] | None
) -> list[str]:
    """The workers (of ``scheduler_info()["workers"]``) declaring every resource asked for."""
    need = dict(resources or {})
    return [
        address
        for address, info in workers.items()
        if all((info.get("resources") or {}).get(k, 0) >= v for k, v in need.items())
    ]


def missing_line(
    workers: Mapping[str, Mapping[str, Any]], resources: Mapping[str, float] | None, wait: float
) -> str:
    """What is missing, in one line: no workers at all, or none declaring the resources."""
    if not workers:
        return f"no Dask worker connected within {wait:g} s"
    asked = ", ".join(f"{k}={v:g}" for k, v in (resources or {}).items())
    declared = sorted({k for info in workers.values() for k in (info.get("resources") or {})})
    have = f"they declare {', '.join(declared)}" if declared else "none declares any resource"
    first = next(iter(resources or {"GPU": 1}))
    return (
        f"no Dask worker with resources {asked} within {wait:g} s: {len(workers)} worker(s) "
        f"connected, {have} (start GPU workers with --resources {first}=1)"
    )


def wait_for_workers(
    client: Any,
    resources: Mapping[str, float] | None,
    *,
    wait: float | None = None,
    address: str = "scheduler",
    detail: Callable[[], str] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Return the number of able workers once there is one; raise :class:`NoWorkers` when
    none came within ``wait`` seconds (default :func:`worker_wait_s`).

    Parameters
    ----------
    client
        A connected ``distributed.Client``.
    resources
        What each task asks of a worker (``{"GPU": 0.5}``); ``None``: any worker will do.
    address
        Named in the error line.
    detail
        Called for more of the story when the wait runs out (e.g. SLURM job states).
    """
    wait = worker_wait_s() if wait is None else wait
    deadline = clock() + wait
    while True:
        workers = client.scheduler_info(n_workers=-1).get("workers", {})
        able = able_workers(workers, resources)
        if able:
            return len(able)
        if clock() >= deadline:
            line = missing_line(workers, resources, wait)
            extra = detail() if detail else ""
            raise NoWorkers(address, f"{line}{'; ' + extra if extra else ''}")
        time.sleep(min(POLL_S, max(0.0, deadline - clock())))
