"""Where a run's tasks run, decided once per run from its options.

A :class:`Runtime` holds what the options leave to be worked out here: the device (``auto`` is
the first CUDA device when there is one), the Dask scheduler or the embedded one, the number
of task threads of a local run and the torch threads of each. The driver and the steps after
inference read it instead of each resolving the device and the workers again. It holds only
plain values, so it pickles (tasks go to Dask workers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pipeline.config import SegmentOptions
from pipeline.errors import TilesegError
from pipeline.models.inference import TASKS_PER_GPU, resolve_device
from pipeline.runtime.cores import usable_cores

__all__ = ["Runtime", "resolve_runtime"]


@dataclass(frozen=True)
class Runtime:
    """How one run's tasks run.

    Parameters
    ----------
    device
        The device as asked for (``auto``, ``cpu``, ``cuda``, ``cuda:N``): each worker thread
        resolves it itself (:func:`~pipeline.models.inference.worker_device`).
    device_type
        What ``device`` is in this process: ``cpu`` or ``cuda``.
    scheduler
        A Dask scheduler's address, or None for the embedded scheduler in this process.
    workers
        Tasks in parallel in a local run (a distributed run's workers are the cluster's).
    cores
        The cores this process may run on.
    cpu_threads
        torch threads per task thread in a local CPU run of several task threads (they split
        the cores); None leaves torch's own count.
    """

    device: str
    device_type: str
    scheduler: str | None
    workers: int
    cores: int
    cpu_threads: int | None = None

    @property
    def local(self) -> bool:
        """Whether the tasks run in this process (Dask's embedded scheduler)."""
        return self.scheduler is None

    @property
    def local_cpu(self) -> bool:
        """A local run on the CPU: the forwards take the cores of this process."""
        return self.local and self.device_type == "cpu"

    @property
    def serial(self) -> bool:
        """One task at a time, in this process."""
        return self.local and self.workers == 1

    def tasks(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~pipeline.runtime.execution.run_tasks` (and of the
        object steps) that say where tasks run."""
        return {"scheduler": self.scheduler, "workers": self.workers}


def resolve_runtime(options: SegmentOptions) -> Runtime:
    """The runtime of a run with these options; a device that is not there is the option's
    problem (one :class:`~pipeline.errors.TilesegError`)."""
    try:
        device = resolve_device(options.device)
    except (ValueError, RuntimeError) as exc:
        raise TilesegError("--device", str(exc)) from None
    workers = options.workers or _local_workers(options, device)
    cores = usable_cores()
    split = options.scheduler is None and device.type == "cpu" and workers >= 2
    return Runtime(
        device=options.device,
        device_type=device.type,
        scheduler=options.scheduler,
        workers=workers,
        cores=cores,
        cpu_threads=max(1, cores // workers) if split else None,
    )


def _local_workers(options: SegmentOptions, device: torch.device) -> int:
    """Tasks in parallel when ``workers`` is not given. On the CPU one (a forward already uses
    every core). On CUDA two per GPU, spread over the GPUs by
    :func:`~pipeline.models.inference.worker_device`: while one task of a GPU reads its first batch
    or writes its last, the other keeps the GPU busy; both share the GPU's one model."""
    if options.scheduler is not None or device.type != "cuda":
        return 1
    gpus = torch.cuda.device_count() if options.device in ("auto", "cuda") else 1  # or cuda:N
    return TASKS_PER_GPU * gpus
