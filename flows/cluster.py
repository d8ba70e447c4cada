"""One Dask cluster per directory run, shared by all of its slides.

A cluster config (the ``cluster:`` section of a directory config, or a file of its own such as
``configs/slurm-gpu.yaml``) says which one:

- ``type: local`` (default): a ``LocalCluster`` on this machine (CPU workers start with their
  share of the cores and glibc's main heap, see :func:`_cpu_worker_environ`); with ``gpus: N``,
  one worker process per GPU, each seeing only its GPU (``CUDA_VISIBLE_DEVICES``), declaring
  ``GPU=1`` and running at least two task threads.
- ``type: address``: an existing scheduler (``address: tcp://head:8786``).
- ``type: slurm``: a ``dask_jobqueue.SLURMCluster`` (keyword arguments under ``slurm:``) scaled
  to ``jobs:`` jobs, or adaptively with ``adapt: {minimum_jobs, maximum_jobs}`` (CPU workers
  on glibc's main heap, see :func:`slurm_arguments`).
- ``type: none``: no cluster; each slide runs on Dask's embedded threads (small runs, tests).

``task_resources`` is what every inference task asks of a worker. It defaults to
``{GPU: 0.5}`` whenever the cluster's workers are declared as GPU workers here: a worker
declaring ``GPU=1`` then runs two tasks at a time, sharing its one model, so that one task's
first read and last write are hidden behind the other's inference (as local runs do, see
``pipeline.runtime.resolved.resolve_runtime``). ``{GPU: 1}`` gives one task at a time per GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import dask

from pipeline.config import read_yaml_mapping
from pipeline.errors import TilesegError
from pipeline.models.inference import TASKS_PER_GPU
from pipeline.runtime.cores import usable_cores
from pipeline.runtime.worker_wait import wait_for_workers

__all__ = [
    "THREAD_VARIABLES",
    "ClusterHandle",
    "check_cluster_config",
    "check_workers",
    "choose_cluster",
    "load_cluster_config",
    "open_cluster",
    "slurm_arguments",
    "worker_lifetime",
]

TYPES = ("local", "address", "slurm", "none")
GPU = {"GPU": 1}  # what a GPU worker declares
GPU_TASK = {"GPU": 1 / TASKS_PER_GPU}  # what an inference task asks of it
LOOPBACK = "127.0.0.1"  # a local cluster serves this machine only (as LocalCluster does)
PRE_SPAWN = "distributed.nanny.pre-spawn-environ"  # set before a worker process starts
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_LOCAL_KEYS = (
    "n_workers", "threads_per_worker", "processes", "memory_limit", "gpus", "dashboard_address",
)  # fmt: skip
_COMMON_KEYS = ("type", "task_resources")
_KEYS = {
    "local": _LOCAL_KEYS,
    "address": ("address",),
    "slurm": ("slurm", "jobs", "adapt"),
    "none": (),
}


@dataclass(frozen=True)
class ClusterHandle:
    """A running cluster as the slides see it."""

    address: str | None  # None: embedded threads, no cluster
    task_resources: dict[str, float] | None
    description: str
    detail: Callable[[], str] | None = None  # why workers are missing (e.g. SLURM job states)


def load_cluster_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A cluster config file: the mapping itself, or its ``cluster:`` section."""
    source = os.fspath(path)
    data = read_yaml_mapping(source, what="cluster config")
    if isinstance(data.get("cluster"), dict):
        data = data["cluster"]
    check_cluster_config(data, source=source)
    return data


def check_cluster_config(spec: dict[str, Any], *, source: str = "cluster") -> None:
    """Refuse unknown types and keys before anything starts (a typo must not be ignored)."""
    kind = spec.get("type", "local")
    if kind not in TYPES:
        raise TilesegError(source, f"cluster type must be one of {', '.join(TYPES)}, got {kind!r}")
    unknown = sorted(set(spec) - set(_COMMON_KEYS) - set(_KEYS[kind]))
    if unknown:
        known = ", ".join((*_COMMON_KEYS, *_KEYS[kind]))
        raise TilesegError(source, f"unknown key(s) {unknown} for type {kind} (known: {known})")
    if kind == "address" and not spec.get("address"):
        raise TilesegError(source, "type address needs address: tcp://HOST:PORT")
    if kind == "slurm" and not isinstance(spec.get("slurm", {}), dict):
        raise TilesegError(source, "slurm: must be a mapping of SLURMCluster arguments")
    resources = spec.get("task_resources")
    if resources is not None and not (
        isinstance(resources, dict) and all(isinstance(v, int | float) for v in resources.values())
    ):
        raise TilesegError(source, "task_resources: must map resource names to numbers")


def choose_cluster(*, scheduler: str | None, cluster: dict[str, Any] | None) -> dict[str, Any]:
    """An explicit scheduler address wins, then a cluster config, then a local cluster."""
    if scheduler:
        return {"type": "address", "address": scheduler, **_resources_of(cluster)}
    return dict(cluster) if cluster else {"type": "local"}


def _resources_of(cluster: dict[str, Any] | None) -> dict[str, Any]:
    if cluster and cluster.get("task_resources") is not None:
        return {"task_resources": cluster["task_resources"]}
    return {}


@contextmanager
def open_cluster(spec: dict[str, Any]) -> Iterator[ClusterHandle]:
    """Start (or connect to) the cluster for one run and shut down what was started."""
    check_cluster_config(spec)
    kind = spec.get("type", "local")
    if kind == "none":
        yield ClusterHandle(None, None, "embedded Dask threads (no cluster)")
        return
    if kind == "address":
        resources = spec.get("task_resources")
        yield ClusterHandle(spec["address"], resources, f"existing scheduler {spec['address']}")
        return
    with _environ_kept():
        cluster = _local_cluster(spec) if kind == "local" else _slurm_cluster(spec)
    detail = (lambda: _slurm_job_states(cluster)) if kind == "slurm" else None
    try:
        yield ClusterHandle(
            cluster.scheduler_address, _task_resources(spec), _describe(spec), detail
        )
    finally:
        with _environ_kept():  # a nanny that restarted its worker wrote them again
            cluster.close()


@contextmanager
def _environ_kept() -> Iterator[None]:
    """Put back this process's environment as it was. Dask's nanny writes its workers'
    variables (:data:`PRE_SPAWN`) into the parent's ``os.environ`` before each spawn, and a
    later nanny prefers them to its own config: the next run of a long-lived process would
    start its workers with this run's thread share and heap setting."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        for name in set(os.environ) - set(saved):
            del os.environ[name]
        for name, value in saved.items():
            if os.environ.get(name) != value:
                os.environ[name] = value


def check_workers(handle: ClusterHandle, *, wait: float) -> int:
    """Connect to the run's cluster once and wait at most ``wait`` seconds for a worker able
    to run its inference tasks; the number of such workers (0 without a cluster).

    An unreachable scheduler or no able worker is one :class:`~pipeline.errors.TilesegError`
    line before any slide starts, not one failure (and one connection timeout) per slide.
    """
    if handle.address is None:
        return 0
    from distributed import Client

    try:
        client = Client(handle.address, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:  # refused, timed out, malformed address
        problem = f"cannot connect to the Dask scheduler ({exc})"
        raise TilesegError(handle.address, problem) from None
    with client:
        return wait_for_workers(
            client, handle.task_resources, wait=wait, address=handle.address, detail=handle.detail
        )


def _task_resources(spec: dict[str, Any]) -> dict[str, float] | None:
    if "task_resources" in spec:
        return spec["task_resources"] or None
    if spec.get("type", "local") == "local":
        return dict(GPU_TASK) if spec.get("gpus") else None
    # SLURM workers declared as GPU workers (--resources GPU=1): tasks must ask for the GPU.
    return dict(GPU_TASK) if _slurm_gpu_workers(spec) else None


def _slurm_gpu_workers(spec: dict[str, Any]) -> bool:
    args = [str(a) for a in (spec.get("slurm") or {}).get("worker_extra_args", [])]
    return any("GPU=" in a for a in args)


def _describe(spec: dict[str, Any]) -> str:
    if spec.get("type", "local") == "slurm":
        size = spec.get("adapt") or f"{spec.get('jobs', 1)} job(s)"
        return f"SLURM cluster ({size})"
    if spec.get("gpus"):
        return f"local cluster, {spec['gpus']} GPU worker(s)"
    return f"local cluster, {spec.get('n_workers', 1)} worker(s)"


def _local_cluster(spec: dict[str, Any]) -> Any:
    from distributed import LocalCluster, Nanny, Scheduler, SpecCluster

    # ":0" picks a free port: a fixed 8787 clashes with another run's dashboard.
    dashboard = spec.get("dashboard_address", ":0")
    threads = int(spec.get("threads_per_worker", 1))
    gpus = int(spec.get("gpus", 0) or 0)
    if gpus:
        # One process per GPU, started with only that GPU visible, so "cuda" means its own GPU;
        # GPU=1 against tasks asking GPU_TASK lets it run TASKS_PER_GPU tasks on its one model.
        devices = _gpu_ids(gpus)
        workers = {
            f"gpu-{i}": {
                "cls": Nanny,
                "options": {
                    "nthreads": max(threads, TASKS_PER_GPU),
                    "host": LOOPBACK,
                    "resources": dict(GPU),
                    "env": {"CUDA_VISIBLE_DEVICES": devices[i]},
                    **_memory(spec),
                },
            }
            for i in range(gpus)
        }
        options = {"host": LOOPBACK, "dashboard_address": dashboard}
        scheduler = {"cls": Scheduler, "options": options}
        return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=40)
    n_workers = int(spec.get("n_workers", 1))
    # Read by each nanny when it is made, and kept for the workers it restarts.
    with dask.config.set({PRE_SPAWN: _cpu_worker_environ(workers=n_workers, threads=threads)}):
        return LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads,
            processes=bool(spec.get("processes", True)),
            dashboard_address=dashboard,
            silence_logs=40,
            **_memory(spec),
        )


def _cpu_worker_environ(*, workers: int, threads: int) -> dict[str, Any]:
    """The environment CPU worker processes start with. Dask's nanny gives them one OpenMP and
    BLAS thread each and a low malloc trim threshold, made for many small tasks; a tileseg task
    is a model forward. So each task thread gets its share of the cores, and every thread uses
    glibc's main heap, which keeps freed activations for the next batch
    (``pipeline/runtime/heap.py``;
    glibc reads these variables only at start-up)."""
    share = str(max(1, usable_cores() // max(1, workers * threads)))
    environ = dict(dask.config.get(PRE_SPAWN, default={}) or {})
    environ.update({name: share for name in THREAD_VARIABLES})
    environ["MALLOC_ARENA_MAX"] = "1"
    return environ


def _gpu_ids(gpus: int) -> list[str]:
    """The GPUs this process may use: inside a SLURM job (or any CUDA_VISIBLE_DEVICES) only
    the ones it was given, which need not be 0..N-1."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else None
    if ids is None:
        return [str(i) for i in range(gpus)]
    if len(ids) < gpus:
        raise TilesegError("cluster.gpus", f"{gpus} GPU workers but CUDA_VISIBLE_DEVICES={visible}")
    return ids[:gpus]


def _memory(spec: dict[str, Any]) -> dict[str, Any]:
    return {"memory_limit": spec["memory_limit"]} if "memory_limit" in spec else {}


def _slurm_cluster(spec: dict[str, Any]) -> Any:
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise TilesegError(
            "cluster", "type slurm needs dask-jobqueue: pip install 'tileseg[flows]'"
        ) from None
    if shutil.which("sbatch") is None:
        raise TilesegError(
            "cluster", "type slurm: sbatch not found on PATH (run where SLURM's commands are)"
        )
    cluster = SLURMCluster(**slurm_arguments(spec))
    if spec.get("adapt"):
        cluster.adapt(**spec["adapt"])
    else:
        cluster.scale(jobs=int(spec.get("jobs", 1)))
    return cluster


def slurm_arguments(spec: dict[str, Any]) -> dict[str, Any]:
    """``SLURMCluster``'s arguments: the ``slurm:`` section, and what it leaves out:

    - ``python: python`` when a ``job_script_prologue`` is given: the worker runs the Python
      the prologue chose (an activated environment), not this process's interpreter (Dask's
      default, a path that need not exist on the nodes).
    - ``--lifetime``/``--lifetime-stagger`` worker arguments from ``walltime``: workers leave
      cleanly before SLURM kills their job, and an adaptive cluster (``adapt:``) submits
      replacements.
    - for CPU workers glibc's main heap for every thread, as local CPU workers get
      (:func:`_cpu_worker_environ`): the job script exports it before the nanny starts, and
      the worker it spawns inherits it. Their thread count is set by each inference task
      (``pipeline/runtime/cores.py``).
    """
    args = dict(spec.get("slurm") or {})
    if args.get("job_script_prologue") and "python" not in args:
        args["python"] = "python"
    extra = [str(a) for a in args.get("worker_extra_args") or []]
    if args.get("walltime") and not any(a.startswith("--lifetime") for a in extra):
        lifetime, stagger = worker_lifetime(str(args["walltime"]))
        args["worker_extra_args"] = [*extra, "--lifetime", lifetime, "--lifetime-stagger", stagger]
    if not _slurm_gpu_workers(spec):
        prologue = [str(line) for line in args.get("job_script_prologue") or []]
        if not any("MALLOC_ARENA_MAX" in line for line in prologue):
            args["job_script_prologue"] = ["export MALLOC_ARENA_MAX=1", *prologue]
    return args


def _slurm_job_states(cluster: Any) -> str:
    """The state of the cluster's SLURM jobs (``squeue``), e.g. ``SLURM jobs 41 PENDING
    (Resources)``: why no worker came."""
    ids = [str(job.job_id) for job in cluster.workers.values() if getattr(job, "job_id", None)]
    if not ids:
        return "no SLURM job was submitted (see the log for sbatch's error)"
    try:
        out = subprocess.run(
            ["squeue", "--noheader", "--jobs", ",".join(ids), "--format", "%i %T (%r)"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"SLURM jobs {', '.join(ids)}: squeue failed ({exc})"
    listed = ", ".join(line.strip() for line in out.stdout.splitlines() if line.strip())
    if not listed:
        return f"SLURM jobs {', '.join(ids)} are no longer queued (ended or failed: see sacct)"
    return f"SLURM jobs {listed}"


def worker_lifetime(walltime: str) -> tuple[str, str]:
    """``--lifetime`` and ``--lifetime-stagger`` for a SLURM walltime (``MM``, ``MM:SS``,
    ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``): a worker leaves at most lifetime +
    stagger after it starts, a margin (a tenth of the walltime, at most 5 min) short of the
    walltime, so that it hands back its tasks before SLURM kills it."""
    seconds = _walltime_seconds(walltime)
    stagger = min(240, seconds // 20)
    margin = min(300, seconds // 10)
    return f"{seconds - stagger - margin}s", f"{stagger}s"


def _walltime_seconds(walltime: str) -> int:
    days, _, clock = walltime.rpartition("-")
    try:
        parts = [int(p) for p in clock.split(":")]
        if len(parts) > 3 or any(p < 0 for p in parts):
            raise ValueError
        # SLURM: MM, MM:SS, HH:MM:SS; with days D-HH, D-HH:MM, D-HH:MM:SS
        if days:
            parts = [*parts, 0, 0][:3]
        else:
            parts = [0, *parts, 0][:3] if len(parts) < 3 else parts
        hours, minutes, secs = parts
        total = int(days or 0) * 86400 + hours * 3600 + minutes * 60 + secs
    except ValueError:
        raise TilesegError(
            "slurm.walltime", f"not a SLURM time, e.g. 12:00:00: {walltime!r}"
        ) from None
    if total < 60:
        raise TilesegError("slurm.walltime", f"too short for a worker: {walltime!r}")
    return total
