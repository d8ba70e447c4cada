"""What a worker keeps and decides: how a run uses its devices, threads and memory.

Per-process caches (each image handle and each model is opened once per worker, not per tile),
the run settings every task carries (a resumed run keeps those of the run it continues), how
many tasks run at once in a local run, how large a batch is (``auto``: measured where the tasks
run), and how many batches a task holds.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.config import SERIAL_CORES, SegmentOptions
from pipeline.errors import TilesegError
from pipeline.geometry import TileGrid
from pipeline.io.readers import LazyImage
from pipeline.models import ModelSpec, load_model
from pipeline.models.inference import (
    LEGACY_AUTO_LAYOUT,
    LEGACY_LABELS_FROM,
    Predictor,
    auto_batch_size,
    resolve_device,
    worker_device,
)
from pipeline.runtime.cores import usable_cores
from pipeline.runtime.execution import run_tasks
from pipeline.runtime.heap import keep_freed_memory
from pipeline.runtime.priority import PriorityPool
from pipeline.runtime.resolved import Runtime

__all__ = [
    "MIN_TASKS",
    "RunSettings",
    "batches_per_task",
    "cached_predictor",
    "io_pool",
    "parallel_io",
    "resolve_batch_size",
    "resolve_numerics",
    "resolve_prefetch",
    "shared_cpu",
]

MIN_TASKS = 16  # per image, when it has that many batches: progress steps and parallelism


@dataclass(frozen=True)
class RunSettings:
    """How a worker runs the model: device, numerics and the overlap of the stages."""

    device: str = "auto"
    precision: str = "auto"
    channels_last: str = "auto"
    fold_norm: str = "auto"
    compile: bool = False
    batch_size: int = 4
    prefetch: int = 2
    labels_from: str = "logits"  # see pipeline.models.inference.LABELS_FROM


# Per-process caches: a worker loads each image handle and each model once, not per tile.
_predictors: dict[tuple[str, str, str, tuple], Predictor] = {}
_cache_lock = threading.Lock()


def cached_predictor(
    spec: ModelSpec,
    run: RunSettings,
    *,
    window: tuple[int, ...] | None = None,
    in_channels: int = 1,
) -> Predictor:
    """The worker's predictor for a model and run settings. A compiled one is compiled here,
    under the lock, on a batch of ``window``s: task threads sharing it must not race to
    compile it."""
    model = load_model(spec)
    device = worker_device(run.device)
    # What the predictor depends on: not the prefetch, nor the batch size unless compiled.
    numerics = (run.precision, run.channels_last, run.fold_norm, run.compile,
                run.compile and run.batch_size)  # fmt: skip
    # A 2D model run plane by plane is another module (models/planes.py) of the same file.
    key = (model.source, model.sha256, spec.planes, device, numerics)
    if resolve_device(device).type == "cpu":
        keep_freed_memory()  # else each forward page-faults its activations in again
    with _cache_lock:
        if key not in _predictors:
            predictor = Predictor.create(
                model, device=device, precision=run.precision, channels_last=run.channels_last,
                fold_norm=run.fold_norm, compile=run.compile, batch_size=run.batch_size,
            )  # fmt: skip
            if run.compile and window is not None:
                _compile_now(predictor, (run.batch_size, in_channels, *window))
            _predictors[key] = predictor
        return _predictors[key]


def _compile_now(predictor: Predictor, shape: tuple[int, ...]) -> None:
    """torch.compile compiles at the first call: a missing C++ compiler or an unsupported
    model surfaces here, as one line, not as a compiler traceback from the middle of a run."""
    try:
        predictor.predict(np.zeros(shape, np.float32))
    except Exception as exc:  # torch raises many kinds from its compiler stack
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        problem = f"torch.compile failed ({type(exc).__name__}: {first}); run without --compile"
        raise TilesegError("--compile", problem) from None


_io_pool: PriorityPool | None = None


def io_pool() -> PriorityPool:
    """Threads that read the windows of one batch, and write its tiles, in parallel (see
    :func:`parallel_io`), the oldest batch's first. Decoders and compressors release the GIL."""
    global _io_pool
    with _cache_lock:
        if _io_pool is None:
            _io_pool = PriorityPool(min(16, usable_cores()), name="tileseg-io")
        return _io_pool


def parallel_io(device: torch.device) -> bool:
    """Whether a batch's windows are read, and its tiles written, by :func:`io_pool`: on a GPU,
    which consumes a batch faster than one thread decodes or compresses it. CPU runs read and
    write each batch in one thread: the cores are the model's."""
    return device.type == "cuda"


@contextmanager
def shared_cpu(runtime: Runtime) -> Iterator[None]:
    """Local CPU runs with several task threads split the cores between them: each forward
    would otherwise start one thread per core and they would fight over the cores."""
    if runtime.cpu_threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(runtime.cpu_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_prefetch(prefetch: int | str, runtime: Runtime) -> int:
    """Batches read ahead of and written behind inference: as given, or for ``auto`` 0 (the
    stages in turn) in a local CPU run of one task at a time on at most ``SERIAL_CORES``
    cores, else 2. There the forward's threads take every core, and a reader or writer thread
    beside them holds up each of its parallel regions by more than its work costs in turn (and
    in turn the stages need less peak memory; bench/README.md). With more cores the forward is
    faster and one thread's reading is not, so overlapping it pays; on a cluster or a GPU it
    always does."""
    if prefetch != "auto":
        return int(prefetch)
    few_cores = runtime.cores <= SERIAL_CORES
    return 0 if runtime.local_cpu and runtime.workers == 1 and few_cores else 2


@dataclass(frozen=True)
class _BatchProbe:
    model: ModelSpec
    run: RunSettings
    window: tuple[int, ...]
    in_channels: int


_batch_sizes: dict[tuple, int] = {}  # per predictor (cached for the process), window, channels
_probe_lock = threading.Lock()


def _probe_batch_size(probe: _BatchProbe) -> int:
    """Measured once per worker process and predictor: slides of one directory run (several
    at once, on the same workers) then batch alike, and a later probe cannot be misled by the
    memory another slide's forwards hold on the same GPU (the counters are per process)."""
    predictor = cached_predictor(probe.model, probe.run)
    key = (id(predictor), probe.window, probe.in_channels)
    with _probe_lock:
        if key not in _batch_sizes:
            _batch_sizes[key] = auto_batch_size(
                predictor, window=probe.window, in_channels=probe.in_channels
            )
        return _batch_sizes[key]


# Settings that change the last bits of a float result: what ``auto`` is for a new run, and
# for a resumed run whose record predates the setting (what ``auto`` meant then).
NUMERICS = {"channels_last": ("on", LEGACY_AUTO_LAYOUT), "fold_norm": ("on", "off")}


def resolve_numerics(
    options: SegmentOptions, *, resumed: Mapping[str, Any] | None
) -> dict[str, str]:
    """The model's layout and batch-norm folding for a run: as given, ``auto`` being ``on``,
    and where its labels come from (not an option). A resumed run (``resumed``: the record's
    ``run`` of the run it continues) keeps the settings of that run, so that the chunks it
    redoes are byte-identical to its done ones."""
    numerics = {}
    for key, (new, legacy) in NUMERICS.items():
        value = getattr(options, key)
        if resumed is not None:
            value = str(resumed.get(key, legacy))
        elif value == "auto":
            value = new
        numerics[key] = value
    numerics["labels_from"] = (
        "logits" if resumed is None else str(resumed.get("labels_from", LEGACY_LABELS_FROM))
    )
    return numerics


def resolve_batch_size(
    options: SegmentOptions,
    spec: ModelSpec,
    image: LazyImage,
    grid: TileGrid,
    *,
    resumed: Mapping[str, Any] | None,
    numerics: Mapping[str, str],
    in_channels: int | None = None,
) -> int:
    """The batch size: as given, or for ``auto`` measured where inference runs (a task on the
    same workers, asking the same resources) from free device memory. A resumed run reuses
    the batch size of the run it continues, so its tasks batch tiles exactly as before.
    ``in_channels``: what the model is given per pixel (default: the image's channels)."""
    if options.batch_size != "auto":
        return int(options.batch_size)
    if resumed is not None and resumed.get("batch_size"):
        return int(resumed["batch_size"])
    run = RunSettings(device=options.device, precision=options.precision, **numerics)
    probe = _BatchProbe(spec, run, grid.window, in_channels or image.n_channels)
    [size] = run_tasks(
        _probe_batch_size, [probe], scheduler=options.scheduler, workers=1,
        resources=options.resources, name="tileseg-batch-probe",
    )  # fmt: skip
    return int(size)


def batches_per_task(options: SegmentOptions, grid: TileGrid, batch_size: int) -> int:
    """``batches_per_task``, lowered on small images so that each has at least ``MIN_TASKS``
    tasks where it has that many batches. Fixed by the image and options alone, so a resumed
    run groups tiles exactly as the run it continues."""
    batches = math.ceil(len(grid) / batch_size)
    return max(1, min(options.batches_per_task, batches // MIN_TASKS))
