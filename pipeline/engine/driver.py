"""Segmenting one image: plan in the driver, infer in tasks that each own a block of output chunks.

The driver opens the image and the model only to learn shapes, checks everything that can be
checked before any work starts, decides the normalisation, creates the output arrays, and then
runs the tasks of :mod:`pipeline.engine.tasks`. Each task reads its input windows (halo included,
mirrored at the image border), infers in batches and writes its own chunk-aligned regions
once. Pyramid levels follow, each computed from the level below (``pipeline/engine/pyramid.py``),
and the object steps. The overview (``pipeline/output/overview.py``) and the pyramid are written
after the tasks in a local CPU run; where the forwards are not the host's they are written beside
the tasks (the pyramid only in a local run). The provenance record is written last.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import __version__
from pipeline.config import SERIAL_CORES, SegmentOptions
from pipeline.engine.profile import PhaseTimer
from pipeline.engine.pyramid import PyramidFeed, pyramid_parts, run_pyramid
from pipeline.engine.resumable import pending, run_once, run_resumable
from pipeline.engine.scale import Scale, choose_scale
from pipeline.engine.tasks import BlockTask, read_window, run_block, run_blocks, writing
from pipeline.errors import TilesegError
from pipeline.geometry import (
    ModelGeometry,
    Tile,
    TileGrid,
    group_tiles,
    one_tile,
    plan_tiles,
)
from pipeline.io import chunk_cache
from pipeline.io.channels import auto_channel, channel_listing, channel_record, select_channels
from pipeline.io.readers import LazyImage, open_image
from pipeline.models import LoadedModel, ModelSpec, load_model
from pipeline.models.inference import CPU_BATCH_SIZE, Predictor, label_dtype
from pipeline.models.planes import module_ndim, runs_plane_wise
from pipeline.objects.export import check_export, export_segmentation
from pipeline.objects.instances import SplitGrid, label_instances
from pipeline.objects.measure import measure_objects
from pipeline.objects.size import trained_object_size, warn_object_size, with_object_size
from pipeline.output.chunk_writer import remove_leftovers
from pipeline.output.label_classes import class_names
from pipeline.output.lock import OutputLock, TakenOver, claim_output, is_owner
from pipeline.output.ngff import (
    OutputLayout,
    Overview,
    build_output,
    forget_arrays,
    level_regions,
    levels_in_tasks,
    mark_complete,
    mark_failed,
    model_grid_path,
    overview_factor,
    place_output,
    read_layout,
    read_record,
    upsample_region,
)
from pipeline.output.overview import (
    finish_overview,
    overview_regions,
    overview_source,
    write_overview_block,
)
from pipeline.output.provenance import (
    done_dir,
    done_summary,
    fingerprint,
    output_state,
)
from pipeline.preprocess.normalize import Normalization, compute_normalization
from pipeline.preprocess.stain import (
    StainMap,
    StainNormalizer,
    slide_stain,
    stain_identity,
    stain_step,
)
from pipeline.preprocess.tissue import TissueMask, tissue_mask
from pipeline.runtime.execution import run_tasks
from pipeline.runtime.resolved import Runtime, resolve_runtime
from pipeline.runtime.worker import (
    RunSettings,
    batches_per_task,
    cached_predictor,
    resolve_batch_size,
    resolve_numerics,
    resolve_prefetch,
    shared_cpu,
)

__all__ = [
    "SegmentResult",
    "check_compatible",
    "existing_output",
    "expected_fingerprint",
    "overview_alongside",
    "plan",
    "segment_image",
]


@dataclass
class SegmentResult:
    """What a finished segmentation reports."""

    input: str
    output: str
    spatial_shape: tuple[int, ...]
    tiles: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False  # the output was already complete for the same fingerprint
    resumed_tasks: int = 0  # tasks found done from an interrupted run
    computed_pixels: int = 0  # pixels this run inferred (a resumed run: not those found done)

    @property
    def megapixels_per_second(self) -> float:
        return self.computed_pixels / 1e6 / max(self.seconds, 1e-9)

    @property
    def nonfinite_pixels(self) -> int:
        """Input pixels that were NaN or infinite (set to 0 after normalisation)."""
        return int(self.record.get("nonfinite_pixels", 0))


def check_compatible(image: LazyImage, model: LoadedModel, *, channels: int | None = None) -> None:
    """Refuse image/model combinations that cannot work, before any work starts; ``channels``:
    what the model is given per pixel (default: the image's channels)."""
    g = model.geometry
    if len(image.spatial_shape) != g.ndim:
        raise TilesegError(
            image.path,
            f"image has {len(image.spatial_shape)} spatial axes ({image.spatial_axes}) "
            f"but the model ({model.source}) is {g.ndim}D",
        )
    if image.dtype.kind not in "biuf":
        raise TilesegError(image.path, f"unsupported pixel type {image.dtype} (need integer/float)")
    small = [
        f"{ax}={n} < {h}"
        for ax, n, h in zip(image.spatial_axes, image.spatial_shape, g.halo, strict=True)
        if n < h
    ]
    if small:
        # Context for the border pixels would be mirrored many times over: not a real image
        # for this model. Use a finer pyramid level or a model with a smaller halo.
        raise TilesegError(
            image.path,
            f"image is smaller than the model's halo ({', '.join(small)} px): too little "
            "context to segment it",
        )
    given = image.n_channels if channels is None else channels
    if model.in_channels is not None and given != model.in_channels:
        raise TilesegError(image.path, _channels_problem(image, model, given))


def _channels_problem(image: LazyImage, model: LoadedModel, given: int) -> str:
    """Why the model cannot take the image's channels (``given`` per pixel), in one line."""
    what = f"image has {image.n_channels} channel(s)"
    chosen = image.spec.channels
    if chosen is not None:
        what = f"{image.n_channels} channel(s) chosen ({channel_listing(image, chosen)})"
    if given != image.n_channels:
        what = f"{what}, {given} after stain separation,"
    hint = ""
    if chosen is None and image.file_channels > (model.in_channels or 0):
        hint = f" (channels: {channel_listing(image)}; choose with --channels NAME|INDEX,...)"
    return f"{what} but the model ({model.source}) expects {model.in_channels}{hint}"


def plan(image: LazyImage, model: LoadedModel, options: SegmentOptions) -> TileGrid:
    """The tiling of ``image`` for ``model``: ``--tile``/``--chunk`` (or their defaults for the
    model's dimensions) on every axis; one plane per tile and chunk along Z for a 2D model run
    plane by plane, which needs no context there. Without ``--tile`` an image whose one window
    is no larger than a batch of default windows is one tile (:func:`one_tile`)."""
    g, n = model.geometry, module_ndim(model)
    tile, chunk = options.tile_and_chunk(n)
    for axis, a in enumerate(g.align):
        if tile < a or tile % a:
            problem = f"tile {tile} is not a multiple of the model's alignment {a} (axis {axis})"
            raise TilesegError("--tile", problem)
    if tile % chunk:
        raise TilesegError("--tile", f"tile {tile} is not a multiple of the output chunk {chunk}")
    planes = (1,) * (g.ndim - n)  # a 2D model on a volume: one plane per tile and chunk
    tiles, chunks = (*planes, *(tile,) * n), (*planes, *(chunk,) * n)
    if options.tile is None:
        # the option's batch, not a device's: a resumed run plans the same tiles anywhere
        batch = options.batch_size if isinstance(options.batch_size, int) else CPU_BATCH_SIZE
        own = ModelGeometry(*(getattr(g, f.name)[-n:] for f in fields(g)))  # the model's axes
        whole = one_tile(image.spatial_shape[-n:], geometry=own, tile=(tile,) * n,
                         chunk=(chunk,) * n, batch=batch)  # fmt: skip
        tiles = tiles if whole is None else (*planes, *whole)
    return plan_tiles(image.spatial_shape, geometry=g, tile=tiles, chunk=chunks)


def segment_image(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    options: SegmentOptions,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> SegmentResult:
    """Segment one image into an OME-Zarr output.

    The output's lock (:mod:`pipeline.output.lock`) is held from before the output is looked
    at until its record is written: one run writes an output at a time.
    ``progress(done_pixels, total_pixels)`` is called in this process as tiles finish.
    """
    job = _prepare(input_path, output_path, options)
    output, image, grid = job.output, job.image, job.grid
    with OutputLock(output) as lock:
        state = existing_output(
            output, job.fingerprint, overwrite=options.overwrite, input_path=input_path
        )
        if state == "complete":
            record = read_record(output) or {}
            return SegmentResult(
                os.fspath(input_path), output, image.spatial_shape, len(grid), 0.0,
                record.get("timings", {}), record, skipped=True,
            )  # fmt: skip
        try:
            return _run(job, state, lock.run_id, progress=progress)
        except TilesegError as exc:
            raise _with_resume_hint(exc, output, lock.run_id) from None


def _prepare(
    input_path: str | os.PathLike[str], output_path: str | os.PathLike[str], options: SegmentOptions
) -> _Job:
    """Open the image and the model, and refuse what cannot work, before any output exists."""
    timer = PhaseTimer()
    runtime = resolve_runtime(options)
    image, model_spec, model, step = _open_run(input_path, options, timer=timer)
    with timer.phase("scale"):
        scale = choose_scale(image, model, options, device=options.device)
    image = scale.image
    with timer.phase("normalization"):  # the stain map is part of the normalisation
        stain = slide_stain(image, step or "none", model.in_channels)
    check_compatible(image, model, channels=None if stain is None else stain.channels)
    normalization = None
    if options.object_size is None:
        normalization = _check_object_size(image, model_spec, model, options, timer, stain=stain)
    if options.export:
        check_export(input_path, ndim=len(image.spatial_shape))
    grid = plan(image, model, options)
    with timer.phase("fingerprint"):
        found = fingerprint(
            input_path, options, model_sha256=model.sha256, stain=stain_identity(step),
            channels=image.spec.channels,
        )  # fmt: skip
    return _Job(
        input_path, os.fspath(Path(output_path).absolute()), image, model_spec, model, grid,
        options, timer, found, runtime, stain=stain, scale=scale, normalization=normalization,
    )  # fmt: skip


def _open_run(
    input_path: str | os.PathLike[str], options: SegmentOptions, *, timer: PhaseTimer
) -> tuple[LazyImage, ModelSpec, LoadedModel, str | None]:
    """The image as opened, reading the channels the model is given (``--channels``, or the
    nuclear stain: :mod:`pipeline.io.channels`), the model picked for it, and the stain step
    (``hematoxylin``, ``normalize`` or None) ``--stain`` takes on them."""
    with timer.phase("open"):
        image = open_image(
            input_path,
            level=options.level,
            axes=options.axes,
            allow_missing_chunks=options.allow_missing_chunks,
        )
        image = select_channels(image, options.channels)
    model_spec = ModelSpec.for_image(options, image)
    with timer.phase("model_load"):
        model = load_model(model_spec)
        if runs_plane_wise(model, len(image.spatial_shape)):  # a volume, a 2D model
            model_spec = replace(model_spec, planes=True)
            model = load_model(model_spec)
        if options.model_object_size is not None:
            model = with_object_size(model, options.model_object_size)
    step = stain_step(options.stain, image, model.in_channels)
    if step is None:
        image = auto_channel(
            image, requested=options.channels, model_channels=model.in_channels,
            model=model.source, trained=_trained_channels(model),
        )  # fmt: skip
    return image, model_spec, model, step


def _trained_channels(model: LoadedModel) -> str | None:
    """The channels a model was trained on (``tileseg train --channels``), if its record says."""
    return model.training.get("recipe", {}).get("channels")


def expected_fingerprint(input_path: str | os.PathLike[str], options: SegmentOptions) -> str:
    """The fingerprint a run of ``options`` on this input records (for skip checks): the model
    picked for the image and the stain step are decided as a run decides them."""
    image, _, model, step = _open_run(input_path, options, timer=PhaseTimer())
    return fingerprint(
        input_path, options, model_sha256=model.sha256, stain=stain_identity(step),
        channels=image.spec.channels,
    )  # fmt: skip


def _check_object_size(
    image: LazyImage,
    spec: ModelSpec,
    model: LoadedModel,
    options: SegmentOptions,
    timer: PhaseTimer,
    *,
    stain: StainMap | StainNormalizer | None,
) -> Normalization | None:
    """Warn when the image's objects look far from the model's trained size. The check runs
    on the run's own predictor and, where the run's normalisation is the check's (percentiles
    1-99.8 of the image's channels as ``stain`` maps them), computes that once for both:
    returned for the run."""
    if trained_object_size(model) is None:  # nothing to check against
        timer.add("object_size", 0.0)
        return None
    with timer.phase("warmup"):
        predictor = _predictor_of_run(spec, options)
    with timer.phase("normalization"):
        normalization = compute_normalization(image, mode="percentile", stain=stain)
    with timer.phase("object_size"):
        warn_object_size(
            image, model, device=options.device, predictor=predictor, normalization=normalization
        )
    same = options.normalize == "percentile" and tuple(options.percentiles) == (1.0, 99.8)
    return normalization if same and model.normalization is None else None


def _predictor_of_run(spec: ModelSpec, options: SegmentOptions) -> Predictor:
    """The predictor a new local run's tasks use (cached per process): the object-size check
    shares it instead of preparing a copy of the model of its own."""
    numerics = resolve_numerics(options, resumed=None)
    return cached_predictor(
        spec, RunSettings(device=options.device, precision=options.precision, **numerics)
    )


def existing_output(
    output: str, expected: str, *, overwrite: bool, input_path: str | os.PathLike[str]
) -> str:
    """What to do with what is at ``output``: ``missing`` (create it), ``replace`` (it),
    ``partial`` (resume it) or ``complete`` (skip it). A directory that is not a tileseg output
    is never replaced; another run's output only with ``overwrite``, or when it is a failed run
    of the same input path whose file has changed since (repaired: its done tasks read the
    file as it was, so it starts afresh)."""
    state = output_state(output, expected)
    if state == "different" and _failed_on(output, input_path):
        return "replace"
    if state == "foreign":
        what = "--overwrite replaces tileseg outputs only: " if overwrite else ""
        raise TilesegError(
            output,
            f"already exists and is not a tileseg output ({what}choose another output path, "
            "or remove it yourself)",
        )
    if overwrite:
        return "missing" if state == "missing" else "replace"
    if state == "different":
        raise TilesegError(
            output,
            "already exists and was made from a different input, model or configuration "
            "(use --overwrite to replace it)",
        )
    return state


def _with_resume_hint(exc: TilesegError, output: str, run_id: str) -> TilesegError:
    """A failure after this run made or took up its output: the output is recorded as failed
    and stays unfinished, and the same command continues it, which the message says."""
    if isinstance(exc, TakenOver) or not is_owner(output, run_id):
        return exc
    with contextlib.suppress(OSError, ValueError):
        mark_failed(output, exc.problem)
    return TilesegError(
        exc.path or output,
        f"{exc.problem}; the unfinished output {output} resumes when the same command is "
        "given again once this is fixed",
    )


def _failed_on(output: str, input_path: str | os.PathLike[str]) -> bool:
    record = read_record(output) or {}
    here = os.fspath(Path(input_path).absolute())
    return record.get("status") == "failed" and record.get("input") == here


@dataclass(frozen=True)
class _Job:
    """What a run works on, decided before its output is looked at."""

    input_path: str | os.PathLike[str]
    output: str
    image: LazyImage
    model_spec: ModelSpec
    model: LoadedModel
    grid: TileGrid
    options: SegmentOptions
    timer: PhaseTimer  # wall time per phase, from the start of the run
    fingerprint: str
    runtime: Runtime
    # RGB brightfield to haematoxylin or to reference stains, fitted per slide
    stain: StainMap | StainNormalizer | None = None
    scale: Scale | None = None  # the grids segmented and written on (engine/scale.py)
    normalization: Normalization | None = None  # decided already (by the object-size check)

    @property
    def labels_image(self) -> LazyImage:
        """The image on whose grid the labels are written."""
        return self.image if self.scale is None else self.scale.labels_image

    @property
    def upsampled(self) -> bool:
        """Whether the tasks write the model's grid, upsampled to the input's after them."""
        return self.scale is not None and self.scale.upsampled


def _run(
    job: _Job, state: str, run_id: str, *, progress: Callable[[int, int], None] | None
) -> SegmentResult:
    """Create or resume the output, run the tasks and the steps after them, write the record."""
    with _first_reads_beside(job) as first_reads:
        with _skeleton_beside(job, state) as skeleton:
            normalization, mask = _inputs(job)
            first_reads.set()  # what it has decoded by now is what the tasks need first
            made = _make_output(
                job, state, run_id, normalization=normalization, mask=mask, skeleton=skeleton
            )
        return _run_tasks(job, made, normalization, mask, run_id, progress=progress)


def _run_tasks(
    job: _Job,
    made: _MadeOutput,
    normalization: Normalization,
    mask: TissueMask | None,
    run_id: str,
    *,
    progress: Callable[[int, int], None] | None,
) -> SegmentResult:
    timer = job.timer
    if job.runtime.serial:  # its tasks run in this thread: the model prepared here, timed apart
        with timer.phase("warmup"):
            cached_predictor(
                job.model_spec, made.run, window=job.grid.window, in_channels=made.in_channels
            )
    tasks, resumed_tasks, writers = _tasks(
        job, normalization, made.task_layout, made.run, made.per_task, made.levels, mask, run_id
    )
    computed = _execute(
        job, tasks, made.layout, made.levels, run_id, resumed_tasks, progress, writers=writers
    )
    for name, seconds in computed["walls"].items():
        timer.add(name, seconds)
    return _complete(job, made.record, computed, resumed_tasks)


@dataclass(frozen=True)
class _MadeOutput:
    """The output a run writes to, and the settings its tasks run with."""

    layout: OutputLayout
    task_layout: OutputLayout  # the model's grid of an upsampled run, else ``layout``
    record: dict[str, Any]  # completed after the tasks, then written
    run: RunSettings
    per_task: int
    levels: int
    in_channels: int


def _inputs(job: _Job) -> tuple[Normalization, TissueMask | None]:
    """The input's normalization (the job's own, else computed) and its tissue mask."""
    normalization = job.normalization
    if normalization is None:
        with job.timer.phase("normalization"):
            normalization = _normalization(job)
    with job.timer.phase("tissue"):
        mask = None if job.options.tissue == "none" else _tissue_mask(job, job.options)
    return normalization, mask


@dataclass(frozen=True)
class _Skeleton:
    """The output's arrays, built under a hidden name and not yet in place."""

    layout: OutputLayout
    task_layout: OutputLayout  # the model's grid of an upsampled run, else ``layout``
    building: Path


@contextlib.contextmanager
def _skeleton_beside(job: _Job, state: str) -> Iterator[Future[_Skeleton] | None]:
    """Build a new output's arrays in a thread while the normalisation is decided: they need
    only the layout. The record, which needs the normalisation, is written after, and only
    then is the output renamed into place (``build_output``, ``place_output``), so a failure
    or a kill meanwhile leaves no output, as before. A resumed output is not built (None)."""
    if state == "partial":
        yield None
        return
    with ThreadPoolExecutor(1, thread_name_prefix="tileseg-skeleton") as pool:
        future = pool.submit(_build_skeleton, job, state)
        try:
            yield future
        except Exception:
            # Not placed: the hidden build goes too (a kill leaves it for the next run).
            with contextlib.suppress(Exception):
                shutil.rmtree(future.result().building, ignore_errors=True)
            raise


@contextlib.contextmanager
def _first_reads_beside(job: _Job) -> Iterator[threading.Event]:
    """Decode the file tiles of the first row of windows into the decoded-tile cache
    (``pipeline/io/chunk_cache.py``) in a thread while the normalisation is decided: the
    first batch's reads, which the first forward waits on, then find them decoded. Only
    where the tasks run in this process, on a tiled input. Setting the event yielded stops
    it at its next window; leaving the block waits for it (nothing of it reads on once the
    run has ended, also after a failure: its own failures are the tasks' to report)."""
    image, grid = job.image, job.grid
    stop = threading.Event()
    if not job.runtime.local or image.chunk_shape is None:
        yield stop
        return
    chunk_cache.reserve(
        window=grid.window, spatial_shape=image.spatial_shape,
        bytes_per_pixel=image.n_channels * image.dtype.itemsize,
        tile_rows=image.chunk_shape[-2],
    )  # fmt: skip
    first = next(grid.tiles())
    row = itertools.takewhile(lambda t: t.index[:-1] == first.index[:-1], grid.tiles())

    def decode() -> None:
        for tile in row:
            if stop.is_set():
                return
            read_window(image, tile.window_start, tile.window_stop)

    with ThreadPoolExecutor(1, thread_name_prefix="tileseg-first-reads") as pool:
        pool.submit(decode)
        try:
            yield stop
        finally:
            stop.set()


def _build_skeleton(job: _Job, state: str) -> _Skeleton:
    layout = _layout(job, state)
    task_layout = _model_grid_layout(job, layout) if job.upsampled else layout
    with writing(job.output):
        building = build_output(
            job.output, layout, overwrite=state == "replace",
            subdirs=[os.path.relpath(done_dir(job.output), job.output)],
            model_grid=task_layout if job.upsampled else None,
        )  # fmt: skip
    return _Skeleton(layout, task_layout, building)


def _make_output(
    job: _Job,
    state: str,
    run_id: str,
    *,
    normalization: Normalization,
    mask: TissueMask | None,
    skeleton: Future[_Skeleton] | None,
) -> _MadeOutput:
    """Put the output in place, its record written (``skeleton``: its arrays, built beside the
    normalisation), or reopen a partial one, and claim it. Timed as what is left of the
    output's creation after the normalisation."""
    output = job.output
    output_started = time.perf_counter()
    if skeleton is None:
        layout = _layout(job, state)
        task_layout = _model_grid_layout(job, layout) if job.upsampled else layout
    else:
        built = skeleton.result()
        layout, task_layout = built.layout, built.task_layout
    record = _record(job, normalization, layout, mask)
    # A resumed run works as the run it continues did: its done tasks must match the rest.
    resumed = (read_record(output) or {}).get("run", {}) if state == "partial" else None
    in_channels = normalization.channels(job.image.n_channels)
    run, per_task, levels = _run_settings(job, layout, resumed=resumed, in_channels=in_channels)
    record["run"] = {
        "batch_size": run.batch_size, "batches_per_task": per_task, "levels_in_tasks": levels,
        "channels_last": run.channels_last, "fold_norm": run.fold_norm,
        "labels_from": run.labels_from,
    }  # fmt: skip
    forget_arrays(output)
    forget_arrays(model_grid_path(output))
    if skeleton is not None:
        with writing(output):
            place_output(built.building, output, attrs=record)
    claim_output(output, run_id)
    job.timer.add("output", time.perf_counter() - output_started)
    return _MadeOutput(layout, task_layout, record, run, per_task, levels, in_channels)


def _complete(
    job: _Job, record: dict[str, Any], computed: dict[str, Any], resumed_tasks: list[str]
) -> SegmentResult:
    """Find the objects, write the finished record and mark the output complete."""
    output, timer = job.output, job.timer
    split_on = None
    if job.upsampled:  # split where segmented, while the model's grid is still there
        split_on = SplitGrid(model_grid_path(output), tuple(job.scale.input_factor))
    with timer.phase("objects"):
        found = _objects(output, job.labels_image, job.options, runtime=job.runtime,
                         downsample=_labels_downsample(job), split_on=split_on)  # fmt: skip
        record.update(found)
    with timer.phase("record"):
        _finish_record(record, job, computed, resumed_tasks)
        with writing(output):
            remove_leftovers(output)  # of writers killed mid-chunk, whose tasks were redone
            shutil.rmtree(model_grid_path(output), ignore_errors=True)  # upsampled: not needed
            mark_complete(output, record)
    # The record holds every phase but its own writing; the result has that too.
    timings = {**record["timings"], **timer.walls()}
    return SegmentResult(
        os.fspath(job.input_path), output, job.labels_image.spatial_shape, len(job.grid),
        timings["total_wall"], timings, record,
        resumed_tasks=len(resumed_tasks), computed_pixels=computed["pixels"],
    )  # fmt: skip


def _normalization(job: _Job) -> Normalization:
    options = job.options
    if job.model.normalization is not None:  # a bioimage.io package's own preprocessing
        return job.model.normalization(job.image)
    return compute_normalization(
        job.image,
        mode=options.normalize,
        percentiles=options.percentiles,
        scale=options.scale,
        offset=options.offset,
        stain=job.stain,
    )


def _layout(job: _Job, state: str) -> OutputLayout:
    """The output's arrays, on the grid the labels are written on (``job.labels_image``)."""
    image, options = job.labels_image, job.options
    scale_base = None  # the model's grid of a resampled input without a pixel size
    if job.scale is not None and job.scale.record is not None and image.pixel_size is None:
        scale_base = job.scale.input_factor if image is job.image else None
    classes = int(job.model.classes or 0) or _probe_classes(job.model_spec, options, job.grid)
    layout = OutputLayout(
        spatial_shape=image.spatial_shape,
        chunks=_chunks(job.grid, image.spatial_shape),
        classes=classes,
        label_dtype=label_dtype(max(classes, 2)).str,
        probability_dtype=options.probability_dtype if options.save_probabilities else None,
        pixel_size=image.pixel_size,
        overview=None
        if options.save_probabilities
        else Overview(image.n_channels, image.dtype.str, overview_factor(image.spatial_shape)),
        class_names=class_names(classes, getattr(job.model_spec, "class_names", None)),
        scale_base=scale_base,
    )
    if state == "partial" and read_layout(job.output).overview is None:
        layout = replace(layout, overview=None)  # begun before outputs had an overview
    return layout


def _model_grid_layout(job: _Job, layout: OutputLayout) -> OutputLayout:
    """The arrays the tasks write when the labels are upsampled after them: level 0 on the
    model's grid, chunked as the output."""
    shape = job.image.spatial_shape
    return replace(
        layout, spatial_shape=shape, chunks=_chunks(job.grid, shape),
        pixel_size=None, overview=None, scale_base=None,
    )  # fmt: skip


def _chunks(grid: TileGrid, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The output chunks of an array of ``shape``: the plan's, clipped to the array."""
    return tuple(min(c, n) for c, n in zip(grid.chunk, shape, strict=True))


def _labels_downsample(job: _Job) -> tuple[float, ...]:
    """One pixel of the labels' grid in pixels of level 0 of the input file (where exported
    polygons lie)."""
    source = job.image if job.scale is None else job.scale.input
    base = [n0 / n for n0, n in zip(source.level_shapes[0], source.spatial_shape, strict=True)]
    if job.scale is None or job.labels_image is job.scale.input:
        return tuple(base)
    return tuple(b * f for b, f in zip(base, job.scale.input_factor, strict=True))


def _record(
    job: _Job, normalization: Normalization, layout: OutputLayout, mask: TissueMask | None
) -> dict[str, Any]:
    """The provenance record as it is written when the output is created."""
    model, grid = job.model, job.grid
    return {
        "version": __version__,
        "input": os.fspath(Path(job.input_path).absolute()),
        "reader": job.image.reader,
        "level": job.options.level,
        "model": {"source": model.source, "sha256": model.sha256, "chosen": _model_choice(job)}
        | model.info,
        "channels": channel_record(
            job.image, job.options.channels, trained=_trained_channels(job.model)
        ),
        "config": job.options.to_dict(),
        "normalization": normalization.to_dict(),
        "geometry": {
            "halo": list(grid.geometry.halo),
            "align": list(grid.geometry.align),
            "tile": list(grid.tile),
            "window": list(grid.window),
            "chunks": list(layout.chunks),
        },
        "tissue": None if mask is None else mask.to_dict(),
        **_resample_record(job),
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "fingerprint": job.fingerprint,
    }


def _resample_record(job: _Job) -> dict[str, Any]:
    """How the input was resampled and why (engine/scale.py), where it was."""
    if job.scale is None or job.scale.record is None:
        return {}
    return {"resample": job.scale.record}


def _model_choice(job: _Job) -> str:
    """Why this model: named by ``--model``, or picked for the input."""
    if job.options.model is not None:
        return "--model"
    if job.model_spec.path is not None:
        return "H&E model: RGB brightfield input"
    return "default model"


def _run_settings(
    job: _Job,
    layout: OutputLayout,
    *,
    resumed: dict[str, Any] | None,
    in_channels: int,
) -> tuple[RunSettings, int, int]:
    """How the tasks run, and how many tiles a task and pyramid levels it takes. A resumed
    run takes all of these from the run it continues: its tasks must batch and group tiles,
    and compute them, exactly as the done ones were."""
    options = job.options
    numerics = resolve_numerics(options, resumed=resumed)
    if resumed and resumed.get("batch_size"):
        batch_size = int(resumed["batch_size"])
    else:
        batch_size = resolve_batch_size(
            options, job.model_spec, job.image, job.grid, resumed=None, numerics=numerics,
            in_channels=in_channels,
        )  # fmt: skip
    run = RunSettings(
        device=options.device, precision=options.precision, **numerics,
        compile=options.compile, prefetch=resolve_prefetch(options.prefetch, job.runtime),
        batch_size=batch_size,
    )  # fmt: skip
    if resumed and resumed.get("batches_per_task"):
        per_task = int(resumed["batches_per_task"])
    else:
        per_task = batches_per_task(options, job.grid, run.batch_size)
    if resumed is not None:  # the tasks it left done wrote the levels of the version that ran
        levels = int(resumed.get("levels_in_tasks", 0))
    elif job.upsampled:  # the tasks write level 0 of the model's grid only
        levels = 0
    else:
        levels = levels_in_tasks(layout, [tile.region for tile in job.grid.tiles()])
    return run, per_task, levels


def _tasks(
    job: _Job,
    normalization: Normalization,
    layout: OutputLayout,
    run: RunSettings,
    per_task: int,
    levels: int,
    mask: TissueMask | None,
    run_id: str,
) -> tuple[list[BlockTask], list[str], dict[str, list[tuple[slice, ...]]]]:
    """The tasks still to do, the names of those a resumed run found done, and every task's
    level-0 regions by name (what the pyramid's first level above theirs reads)."""
    grid, output, margin = job.grid, job.output, job.options.tissue_margin
    # Groups are fixed by the full grid, so a resumed run batches tiles exactly as the first
    # run did and rewrites byte-identical chunks.
    groups = group_tiles(grid, per_group=run.batch_size * per_task)
    names = [f"tiles-{i:07d}" for i in range(len(groups))]
    _, done = pending(output, names)

    def task(group: list[Tile], name: str) -> BlockTask:
        skip = (
            ()
            if mask is None
            else tuple(t.index for t in group if not mask.covers(t.region, margin=margin))
        )
        return BlockTask(
            image=job.image.spec, model=job.model_spec, normalization=normalization, grid=grid,
            tiles=tuple(t.index for t in group), output=output, layout=layout, run=run,
            name=name, levels=levels, run_id=run_id, skip=skip,
            arrays=model_grid_path(output) if job.upsampled else "",
        )  # fmt: skip

    tasks = [task(g, n) for g, n in zip(groups, names, strict=True) if n not in done]
    writers = {n: [t.region for t in g] for g, n in zip(groups, names, strict=True)}
    return tasks, done, writers


def _execute(
    job: _Job,
    tasks: list[BlockTask],
    layout: OutputLayout,
    levels: int,
    run_id: str,
    resumed: list[str],
    progress: Callable[[int, int], None] | None,
    *,
    writers: dict[str, list[tuple[slice, ...]]],
) -> dict[str, Any]:
    """Run the inference tasks, the pyramid levels above theirs and the overview; return
    the tasks' results and the steps' wall times."""
    total = int(np.prod(job.image.spatial_shape))
    done = int(total * len(resumed) / max(len(tasks) + len(resumed), 1))
    with _Beside(job, layout, levels, run_id, writers=writers, resumed=resumed) as beside:

        def on_done(result: dict[str, Any]) -> None:
            nonlocal done
            done += int(result.get("pixels", 0))
            if progress:
                progress(done, total)
            beside.finished(result.get("tasks", ()))

        if len(tasks) <= job.runtime.workers:  # none starts later, to write it beside
            beside.start_overview()
        t = time.perf_counter()
        results = _infer(job, tasks, on_done=on_done)
        infer_wall = time.perf_counter() - t
        t = time.perf_counter()
        if job.upsampled:
            levels, writers = _upsample(job, layout, job.runtime, run_id=run_id)
        beside.pyramid(levels, writers)
        pyramid_wall = time.perf_counter() - t
        overview_wall = beside.overview()
    nonfinite = sum(int(r.get("nonfinite", 0)) for r in results)
    nonfinite += sum(int((done_summary(job.output, n) or {}).get("nonfinite", 0)) for n in resumed)
    return {
        "results": results,
        "pixels": int(sum(r.get("pixels", 0) for r in results)),
        "nonfinite": nonfinite,
        "walls": {"segment": infer_wall, "pyramid": pyramid_wall, "overview": overview_wall},
    }


class _Beside:
    """The overview and the pyramid of a run, written beside its inference tasks where the
    forwards are not the host's (:func:`overview_alongside`), else after them.

    Beside them the overview starts once the first task has finished (the first batches'
    reads, on which the first forwards wait, have the cores to themselves; at once when every
    task starts at once: none runs after the first ones to write it beside), and in a local
    run each pyramid part runs in a thread of its own as soon as the tasks it reads have
    finished (``pipeline/engine/pyramid.py``), so that only the parts above the last tasks
    are left after them. Leaving the block waits for both, so
    that nothing is still being written once a failure is raised.
    """

    def __init__(
        self, job: _Job, layout: OutputLayout, levels: int, run_id: str, *,
        writers: dict[str, list[tuple[slice, ...]]], resumed: list[str],
    ) -> None:  # fmt: skip
        self._job, self._layout, self._run_id = job, layout, run_id
        self._alongside = overview_alongside(job.runtime)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tileseg-overview")
        self._overview: Future[float] | None = None
        self._feed: PyramidFeed | None = None
        if self._alongside and job.runtime.local and not job.upsampled:
            parts = pyramid_parts(layout, levels, writers)
            self._feed = PyramidFeed(
                parts, output=job.output, layout=layout, run_id=run_id, done=resumed
            )

    def __enter__(self) -> _Beside:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._feed is not None:
            self._feed.stop()
        self._pool.shutdown(wait=True)

    def finished(self, tasks: Iterable[str]) -> None:
        """Inference tasks have finished (their chunks are written)."""
        if self._feed is not None:
            for name in tasks:
                self._feed.written(name)
        self.start_overview()

    def start_overview(self) -> None:
        if self._alongside and self._overview is None:
            self._overview = self._pool.submit(self._write_overview)

    def pyramid(self, levels: int, writers: dict[str, list[tuple[slice, ...]]]) -> None:
        """Once every task has finished: the pyramid's parts left, and wait for them."""
        if self._feed is not None:
            self._feed.finish()
            return
        job = self._job
        run_pyramid(
            pyramid_parts(self._layout, levels, writers), output=job.output,
            layout=self._layout, run_id=self._run_id, runtime=job.runtime,
        )  # fmt: skip

    def overview(self) -> float:
        """Its wall seconds, once written."""
        if not self._alongside:
            return self._write_overview()
        self.start_overview()
        assert self._overview is not None
        return self._overview.result()

    def _write_overview(self) -> float:
        t = time.perf_counter()
        job, layout = self._job, self._layout
        if layout.overview is not None:
            _overview(job.output, job.labels_image, layout, job.runtime, run_id=self._run_id)
        return time.perf_counter() - t


def _infer(
    job: _Job, tasks: list[BlockTask], *, on_done: Callable[[dict[str, float]], None]
) -> list[dict[str, Any]]:
    """Run the inference tasks where the job's runtime says; their results."""
    runtime = job.runtime
    with shared_cpu(runtime):
        if runtime.serial:
            # One task at a time here: as one stream of batches, the next task's first
            # read and the last one's writes overlap inference instead of waiting for it.
            return [run_blocks(tasks, on_done=on_done)] if tasks else []
        return run_tasks(
            run_block, tasks, **runtime.tasks(), on_done=on_done, resources=job.options.resources
        )


def _upsample(
    job: _Job, layout: OutputLayout, runtime: Runtime, *, run_id: str
) -> tuple[int, dict[str, list[tuple[slice, ...]]]]:
    """The labels on the input's grid from those on the model's (nearest neighbour), in
    tasks that each own a block of chunks and the pyramid levels above it they can; returns
    how many levels above 0 they wrote, and each one's level-0 region by name."""
    assert job.scale is not None
    regions = level_regions(layout, 0)
    levels = levels_in_tasks(layout, regions)
    source, factors = job.image.spatial_shape, job.scale.input_factor
    parts = [
        (f"upsample-{i:07d}", (job.output, layout, region, source, factors, levels))
        for i, region in enumerate(regions)
    ]
    run_resumable(
        _upsample_part, parts, output=job.output, run_id=run_id, runtime=runtime, name="upsample"
    )
    return levels, {name: [args[2]] for name, args in parts}


def _upsample_part(
    output: str,
    layout: OutputLayout,
    region: tuple[slice, ...],
    source: tuple[int, ...],
    factors: tuple[float, ...],
    levels: int,
) -> None:
    upsample_region(output, layout, region, source_shape=source, factors=factors, levels=levels)


def _finish_record(
    record: dict[str, Any], job: _Job, computed: dict[str, Any], resumed: list[str]
) -> None:
    """Add what the run measured to the record: timings, counts, throughput (over the pixels
    this run computed, not those a resumed run found done)."""
    results = computed["results"]
    timings = {
        key: float(sum(r[key] for r in results))
        for key in ("read", "infer", "write", "stall", "task")
    }
    timings["resumed_tasks"] = len(resumed)
    timings["tiles_inferred"] = int(sum(r["tiles"] for r in results))
    timings["tasks_off_main_heap"] = int(sum(r["tasks_off_main_heap"] for r in results))
    threads = [int(r["cpu_forward_threads"]) for r in results if r["cpu_forward_threads"]]
    if threads:  # CPU forwards: the fewest threads a task's ran on
        timings["cpu_forward_threads"] = min(threads)
    timings.update(job.timer.walls())  # the phases so far, the record's own writing not yet
    seconds = timings["total_wall"]
    record.update(
        {
            "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "timings": timings,
            "tiles": len(job.grid),
            "spatial_shape": list(job.labels_image.spatial_shape),
            "model_grid_shape": list(job.image.spatial_shape),
            "computed_pixels": computed["pixels"],
            "megapixels_per_second": computed["pixels"] / 1e6 / max(seconds, 1e-9),
            "nonfinite_pixels": computed["nonfinite"],
        }
    )


def overview_alongside(runtime: Runtime) -> bool:
    """Whether the overview is written while the inference tasks run: not in a local CPU run
    on at most ``SERIAL_CORES`` cores, whose forwards use every core (a thread beside them
    holds up each of their parallel regions, as readers and writers beside them do:
    ``resolve_prefetch``, which overlaps those by the same rule)."""
    return not runtime.local_cpu or runtime.cores > SERIAL_CORES


def _overview(
    output: str,
    image: LazyImage,
    layout: OutputLayout,
    runtime: Runtime,
    *,
    run_id: str,
) -> None:
    """Write the overview (``pipeline/output/overview.py``) in tasks that each own chunks of it."""
    assert layout.overview is not None
    source = overview_source(image, factor=layout.overview.factor)
    parts = [
        (f"overview-{i:07d}", (output, source, region))
        for i, region in enumerate(overview_regions(layout))
    ]
    run_resumable(
        write_overview_block, parts, output=output, run_id=run_id, runtime=runtime,
        name="overview",
    )  # fmt: skip
    with writing(output):
        finish_overview(output, rgb="S" in image.axes)


def _objects(
    output: str,
    image: LazyImage,
    options: SegmentOptions,
    *,
    runtime: Runtime,
    downsample: tuple[float, ...] | None = None,
    split_on: SplitGrid | None = None,
) -> dict[str, Any]:
    """Instance labels and the object table, as steps after the class labels are complete.
    Each is redone whole unless its marker says it finished (both are idempotent).
    ``split_on``: the model's grid of labels upsampled to the input's; the watershed splits
    there, at the size the model segments (``--min-distance`` in its pixels), its halo grown
    to the same extent in label pixels."""
    # A run resumed after these steps finished takes their summaries from the markers.
    found: dict[str, Any] = {}
    run = runtime.tasks()
    if options.instances != "none":
        threshold = options.instance_threshold
        grid_scale = math.sqrt(math.prod(split_on.factors)) if split_on else 1.0
        found["instances"] = run_once(output, "instances", lambda: label_instances(
            output, watershed=options.instances == "watershed",
            min_distance=options.min_distance, split_on=split_on, min_area=options.min_area,
            halo=max(64, math.ceil(64 * grid_scale)),
            source="labels" if threshold is None else "probabilities",
            threshold=0.5 if threshold is None else threshold, **run,
        ).to_dict())  # fmt: skip
    if options.table != "none":
        found["table"] = run_once(output, "table", lambda: measure_objects(
            output, image, table_path=Path(output) / f"objects.{options.table}",
            format=options.table, pixel_size=image.pixel_size, **run,
        ).to_dict())  # fmt: skip
    if options.export:
        table_file = Path(output) / f"objects.{options.table}"
        found["export"] = run_once(output, "export", lambda: export_segmentation(
            output, image, formats=options.export, downsample=downsample,
            table=table_file if options.table != "none" else None, **run,
        ).to_dict())  # fmt: skip
    return found


def _probe_classes(spec: ModelSpec, options: SegmentOptions, grid: TileGrid) -> int:
    """Number of output classes of a model that does not declare it: one dummy window."""
    predictor = cached_predictor(
        spec, RunSettings(device="cpu", precision="fp32", channels_last="off")
    )
    cin = predictor.model.in_channels or 1
    return int(predictor.logits(np.zeros((1, cin, *grid.window), np.float32)).shape[1])


def _tissue_mask(job: _Job, options: SegmentOptions) -> TissueMask:
    """The tissue mask the options ask for; a level the file lacks is the file's problem.
    It is made from the pyramid of the image as opened (a resampled view has one level), and
    laid over the grid segmented, which spans the same extent."""
    source = job.image if job.scale is None else job.scale.input
    try:
        mask = tissue_mask(
            source, method=options.tissue, threshold=options.tissue_threshold,
            level=options.tissue_level,
        )  # fmt: skip
    except ValueError as exc:
        raise TilesegError(job.input_path, f"tissue mask: {exc}") from None
    return replace(mask, image_shape=tuple(job.image.spatial_shape))
