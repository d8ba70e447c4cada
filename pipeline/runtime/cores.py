"""How many cores a CPU forward gets: this process's, shared between the threads that run
forwards on them.

A CPU forward spreads over as many threads as torch gives its calling thread (one OpenMP team
per calling thread). A local run decides that itself (:func:`pipeline.runtime.worker.shared_cpu`),
and
the local clusters of ``flows/cluster.py`` start their workers with their share. Workers
started elsewhere (``dask worker``, dask-jobqueue) start with Dask's nanny default,
``OMP_NUM_THREADS=1``, made for many small numpy tasks: a worker of one task thread on a node
of 32 cores would run every forward on one of them. So an inference task on a CPU worker whose
thread count is that default (or unset) sets its thread's to its share of the cores: the cores
of the worker's CPU affinity, divided between the task threads of the workers on its host
whose affinities overlap it. The workers of one SLURM job share its cpuset; another job's
workers on the same node have a cpuset of their own and are not counted. A worker started with
``OMP_NUM_THREADS`` (or ``MKL_NUM_THREADS``) set to another number gets that number.

Cores are always the process's affinity, not the machine's: inside a SLURM job or a container
limited to some cores, ``os.cpu_count()`` counts the node's.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterable

import torch

__all__ = ["thread_share", "usable_cores", "use_worker_cores"]

DASK_DEFAULT = "1"  # OMP_NUM_THREADS as Dask's nanny sets it (distributed.nanny.pre-spawn-environ)

_shares: dict[tuple[tuple[str, int], ...], int] = {}  # per set of workers on this host
_lock = threading.Lock()


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity)."""
    return len(_affinity()) or os.cpu_count() or 1


def _affinity() -> frozenset[int]:
    """The CPUs this process may run on; all of them where the platform cannot say."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return frozenset(range(os.cpu_count() or 1))


def thread_share(cores: frozenset[int], siblings: Iterable[tuple[frozenset[int], int]]) -> int:
    """Threads for each task thread of a worker that runs on ``cores``.

    Parameters
    ----------
    cores
        The worker's CPU affinity.
    siblings
        ``(affinity, task threads)`` of each worker on the same host, the worker itself
        included. Those whose affinity overlaps ``cores`` share them.
    """
    sharing = sum(threads for other, threads in siblings if other & cores)
    return max(1, len(cores) // max(1, sharing))


def _asked_threads() -> int | None:
    """The thread count the environment asks for, where it is not Dask's default (or unset).
    Either variable counts: torch takes ``MKL_NUM_THREADS`` over ``OMP_NUM_THREADS``, and
    Dask's nanny sets both to one, so a worker started with only ``OMP_NUM_THREADS=8`` would
    otherwise run on one thread."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        value = os.environ.get(name, DASK_DEFAULT).split(",")[0].strip()  # OpenMP: "8,2"
        if value not in (DASK_DEFAULT, ""):
            try:
                return max(1, int(value))
            except ValueError:
                continue
    return None


def _worker_cpu_threads() -> int | None:
    """Threads for a CPU forward in the calling task of a Dask worker: the count the worker
    was started with where that is not Dask's default, else its share of the cores (see the
    module's docstring). None outside a Dask worker."""
    if "distributed" not in sys.modules:  # no worker runs this: not worth its ~0.3 s import
        return None
    try:
        from distributed import get_client, get_worker
        from distributed.comm import get_address_host

        worker = get_worker()
    except (ImportError, ValueError):  # ValueError: not in a worker's task
        return None
    asked = _asked_threads()
    if asked is not None:
        return asked
    host = get_address_host(worker.address)
    client = get_client()
    # Asked at every task: workers of an adaptive cluster come and go.
    threads = {a: n for a, n in client.nthreads().items() if get_address_host(a) == host}
    threads[worker.address] = worker.state.nthreads
    key = tuple(sorted(threads.items()))
    with _lock:
        if key not in _shares:
            others = [a for a in threads if a != worker.address]
            # A worker that left meanwhile is dropped ("ignore"), not waited for.
            seen = client.run(_affinity, workers=others, on_error="ignore") if others else {}
            seen[worker.address] = _affinity()
            siblings = [(seen[a], n) for a, n in threads.items() if a in seen]
            _shares[key] = thread_share(seen[worker.address], siblings)
        return _shares[key]


def use_worker_cores() -> None:
    """Give the calling thread's CPU forwards the thread count of :func:`_worker_cpu_threads`
    (a no-op outside a Dask worker)."""
    threads = _worker_cpu_threads()
    # Per thread: torch's OpenMP thread count is the calling thread's, so every task sets it.
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
