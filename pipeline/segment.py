"""Segmenting one image: plan in the driver, infer in tasks that each own a block of output chunks.

The driver opens the image and the model only to learn shapes, checks everything that can be
checked before any work starts, decides the normalisation, creates the output arrays, and then
runs the tasks of :mod:`pipeline.blocks`. Each task reads its input windows (halo included,
mirrored at the image border), infers in batches and writes its own chunk-aligned regions
once. Pyramid levels follow, each computed from the level below, and the object steps; the
overview (``pipeline/overview.py``) is written after the tasks in a local CPU run and alongside
them otherwise. The provenance record is written last.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import __version__
from pipeline.blocks import BlockTask, run_block, run_blocks, writing
from pipeline.chunk_writer import remove_leftovers
from pipeline.config import SegmentOptions
from pipeline.errors import TilesegError
from pipeline.execution import run_tasks
from pipeline.geometry import (
    TileGrid,
    group_tiles,
    plan_tiles,
)
from pipeline.inference import (
    label_dtype,
    resolve_device,
)
from pipeline.instances import label_instances
from pipeline.measure import measure_objects
from pipeline.models import LoadedModel, ModelSpec, load_model
from pipeline.ngff import (
    OutputLayout,
    Overview,
    create_output,
    downsample_region,
    forget_arrays,
    level_regions,
    levels_in_tasks,
    mark_complete,
    overview_factor,
    read_layout,
    read_record,
)
from pipeline.normalize import compute_normalization
from pipeline.overview import (
    OverviewSource,
    finish_overview,
    overview_regions,
    overview_source,
    write_overview_block,
)
from pipeline.provenance import (
    done_dir,
    done_summary,
    fingerprint,
    is_done,
    mark_done,
    output_state,
)
from pipeline.readers import LazyImage, open_image
from pipeline.tissue import TissueMask, tissue_mask
from pipeline.worker import (
    RunSettings,
    batches_per_task,
    cached_predictor,
    local_workers,
    resolve_batch_size,
    resolve_numerics,
    resolve_prefetch,
    shared_cpu,
)


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

    @property
    def megapixels_per_second(self) -> float:
        return float(np.prod(self.spatial_shape)) / 1e6 / max(self.seconds, 1e-9)


def _pyramid_block(
    args: tuple[str, OutputLayout, int, tuple[slice, ...], str],
) -> dict[str, float]:
    output, layout, level, region, name = args
    with writing(output):
        downsample_region(output, layout, level, region)
        mark_done(output, name)
    return {"tiles": 0}


def check_compatible(image: LazyImage, model: LoadedModel) -> None:
    """Refuse image/model combinations that cannot work, before any work starts."""
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
    if model.in_channels is not None and image.n_channels != model.in_channels:
        raise TilesegError(
            image.path,
            f"image has {image.n_channels} channel(s) but the model ({model.source}) "
            f"expects {model.in_channels}",
        )


def plan(image: LazyImage, model: LoadedModel, options: SegmentOptions) -> TileGrid:
    g = model.geometry
    tile, chunk = options.tile_and_chunk(g.ndim)
    for axis, a in enumerate(g.align):
        if tile < a or tile % a:
            problem = f"tile {tile} is not a multiple of the model's alignment {a} (axis {axis})"
            raise TilesegError("--tile", problem)
    if tile % chunk:
        raise TilesegError("--tile", f"tile {tile} is not a multiple of the output chunk {chunk}")
    return plan_tiles(
        image.spatial_shape, geometry=g, tile=(tile,) * g.ndim, chunk=(chunk,) * g.ndim
    )


def segment_image(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    options: SegmentOptions,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> SegmentResult:
    """Segment one image into an OME-Zarr output.

    ``progress(done_pixels, total_pixels)`` is called in this process as tiles finish.
    """
    started = time.perf_counter()
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    output = os.fspath(Path(output_path).absolute())
    try:
        resolve_device(options.device)
    except (ValueError, RuntimeError) as exc:
        raise TilesegError("--device", str(exc)) from None
    image = open_image(
        input_path,
        level=options.level,
        axes=options.axes,
        allow_missing_chunks=options.allow_missing_chunks,
    )
    model_spec = ModelSpec.from_options(options)
    model = load_model(model_spec)
    check_compatible(image, model)
    grid = plan(image, model, options)
    run_fingerprint = fingerprint(input_path, options, model_sha256=model.sha256)
    state = "missing" if options.overwrite else output_state(output, run_fingerprint)
    if state == "complete":
        record = read_record(output) or {}
        return SegmentResult(
            os.fspath(input_path), output, image.spatial_shape, len(grid), 0.0,
            record.get("timings", {}), record, skipped=True,
        )  # fmt: skip
    if state in ("different", "foreign"):
        what = {
            "different": "was made from a different input, model or configuration",
            "foreign": "is not a tileseg output",
        }[state]
        raise TilesegError(output, f"already exists and {what} (use --overwrite to replace it)")
    normalization = (
        model.normalization(image)  # a bioimage.io package's own preprocessing
        if model.normalization is not None
        else compute_normalization(
            image,
            mode=options.normalize,
            percentiles=options.percentiles,
            scale=options.scale,
            offset=options.offset,
        )
    )
    mask = None if options.tissue == "none" else _tissue_mask(input_path, image, options)
    classes = int(model.classes or 0) or _probe_classes(model_spec, options, grid)
    _, chunk = options.tile_and_chunk(grid.geometry.ndim)
    layout = OutputLayout(
        spatial_shape=image.spatial_shape,
        chunks=tuple(min(chunk, n) for n in image.spatial_shape),
        classes=classes,
        label_dtype=label_dtype(max(classes, 2)).str,
        probability_dtype=options.probability_dtype if options.save_probabilities else None,
        pixel_size=image.pixel_size,
        overview=None
        if options.save_probabilities
        else Overview(image.n_channels, image.dtype.str, overview_factor(image.spatial_shape)),
    )
    if state == "partial" and read_layout(output).overview is None:
        layout = replace(layout, overview=None)  # begun before outputs had an overview
    record: dict[str, Any] = {
        "version": __version__,
        "input": os.fspath(Path(input_path).absolute()),
        "level": options.level,
        "model": {"source": model.source, "sha256": model.sha256, **model.info},
        "config": options.to_dict(),
        "normalization": normalization.to_dict(),
        "geometry": {
            "halo": list(grid.geometry.halo),
            "align": list(grid.geometry.align),
            "tile": list(grid.tile),
            "window": list(grid.window),
            "chunks": list(layout.chunks),
        },
        "tissue": None if mask is None else mask.to_dict(),
        "started": started_at,
        "fingerprint": run_fingerprint,
    }
    workers = options.workers or local_workers(options)
    # A resumed run works as the run it continues did: its done tasks must match the rest.
    resumed = (read_record(output) or {}).get("run", {}) if state == "partial" else None
    numerics = resolve_numerics(options, resumed=resumed)
    batch_size = resolve_batch_size(
        options, model_spec, image, grid, resumed=resumed, numerics=numerics
    )
    run = RunSettings(
        device=options.device, precision=options.precision, **numerics,
        compile=options.compile, prefetch=resolve_prefetch(options, workers),
        batch_size=batch_size,
    )  # fmt: skip
    per_task = batches_per_task(options, grid, run.batch_size)
    if resumed is not None:  # the tasks it left done wrote the levels of the version that ran
        levels = int(resumed.get("levels_in_tasks", 0))
    else:
        levels = levels_in_tasks(layout, [tile.region for tile in grid.tiles()])
    record["run"] = {
        "batch_size": run.batch_size, "batches_per_task": per_task, "levels_in_tasks": levels,
        **numerics,
    }  # fmt: skip
    forget_arrays(output)
    if state != "partial":
        with writing(output):
            create_output(
                output, layout, overwrite=options.overwrite, attrs=record,
                subdirs=[os.path.relpath(done_dir(output), output)],
            )  # fmt: skip

    # Groups are fixed by the full grid, so a resumed run batches tiles exactly as the first
    # run did and rewrites byte-identical chunks.
    groups = group_tiles(grid, per_group=run.batch_size * per_task)
    names = [f"tiles-{i:07d}" for i in range(len(groups))]
    tasks = [
        BlockTask(
            image=image.spec,
            model=model_spec,
            normalization=normalization,
            grid=grid,
            tiles=tuple(t.index for t in group),
            output=output,
            layout=layout,
            run=run,
            name=name,
            levels=levels,
            skip=tuple(
                t.index
                for t in group
                if mask is not None and not mask.covers(t.region, margin=options.tissue_margin)
            ),
        )
        for group, name in zip(groups, names, strict=True)
        if not is_done(output, name)
    ]
    resumed = len(groups) - len(tasks)
    total = int(np.prod(image.spatial_shape))
    done = int(total * resumed / max(len(groups), 1))

    def on_done(result: dict[str, float]) -> None:
        nonlocal done
        done += int(result.get("pixels", 0))
        if progress:
            progress(done, total)

    def write_overview() -> float:
        t = time.perf_counter()
        if layout.overview is not None:
            _overview(output, image, layout, options, workers=workers)
        return time.perf_counter() - t

    # The overview reads only the input: where the forwards are not the host's (a GPU, a
    # cluster), it is written while they run instead of after them. Leaving the block waits
    # for it, so that nothing of it is still being written once a failure is raised.
    with ThreadPoolExecutor(1, thread_name_prefix="tileseg-overview") as alongside:
        overview = alongside.submit(write_overview) if overview_alongside(options) else None
        t = time.perf_counter()
        with shared_cpu(options, workers):
            if options.scheduler is None and workers == 1:
                # One task at a time here: as one stream of batches, the next task's first
                # read and the last one's writes overlap inference instead of waiting for it.
                results = [run_blocks(tasks, on_done=on_done)] if tasks else []
            else:
                results = run_tasks(
                    run_block, tasks, scheduler=options.scheduler, workers=workers,
                    on_done=on_done, resources=options.resources,
                )  # fmt: skip
        infer_wall = time.perf_counter() - t
        t = time.perf_counter()
        for level in range(1 + levels, len(layout.levels)):
            jobs = [
                (output, layout, level, region, f"pyramid-{level}-{i:07d}")
                for i, region in enumerate(level_regions(layout, level))
            ]
            jobs = [job for job in jobs if not is_done(output, job[-1])]
            run_tasks(_pyramid_block, jobs, scheduler=options.scheduler, workers=workers)
        pyramid_wall = time.perf_counter() - t
        overview_wall = write_overview() if overview is None else overview.result()
    record.update(_objects(output, image, options, workers=workers))
    seconds = time.perf_counter() - started
    timings = {
        key: float(sum(r[key] for r in results))
        for key in ("read", "infer", "write", "stall", "task")
    }
    timings["resumed_tasks"] = resumed
    timings["tiles_inferred"] = int(sum(r["tiles"] for r in results))
    timings["tasks_off_main_heap"] = int(sum(r["tasks_off_main_heap"] for r in results))
    threads = [int(r["cpu_forward_threads"]) for r in results if r["cpu_forward_threads"]]
    if threads:  # CPU forwards: the fewest threads a task's ran on
        timings["cpu_forward_threads"] = min(threads)
    walls = {"segment": infer_wall, "pyramid": pyramid_wall, "overview": overview_wall}
    timings.update({f"{k}_wall": v for k, v in walls.items()}, total_wall=seconds)
    record.update(
        {
            "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "timings": timings,
            "tiles": len(grid),
            "spatial_shape": list(image.spatial_shape),
            "megapixels_per_second": total / 1e6 / max(seconds, 1e-9),
        }
    )
    with writing(output):
        remove_leftovers(output)  # of writers killed mid-chunk, whose tasks were redone
        mark_complete(output, record)
    return SegmentResult(
        os.fspath(input_path), output, image.spatial_shape, len(grid), seconds, timings, record,
        resumed_tasks=resumed,
    )  # fmt: skip


def overview_alongside(options: SegmentOptions) -> bool:
    """Whether the overview is written while the inference tasks run: not in a local CPU run,
    whose forwards use every core (threads beside them hold up each of their parallel regions,
    as readers and writers beside them did: ``resolve_prefetch``)."""
    return options.scheduler is not None or resolve_device(options.device).type != "cpu"


def _overview(
    output: str, image: LazyImage, layout: OutputLayout, options: SegmentOptions, *, workers: int
) -> None:
    """Write the overview (``pipeline/overview.py``) in tasks that each own chunks of it."""
    assert layout.overview is not None
    source = overview_source(image, factor=layout.overview.factor)
    jobs = [
        (output, source, region, f"overview-{i:07d}")
        for i, region in enumerate(overview_regions(layout))
    ]
    jobs = [job for job in jobs if not is_done(output, job[-1])]
    run_tasks(_overview_block, jobs, scheduler=options.scheduler, workers=workers)
    with writing(output):
        finish_overview(output, rgb="S" in image.axes)


def _overview_block(args: tuple[str, OverviewSource, tuple[slice, ...], str]) -> dict[str, int]:
    output, source, region, name = args
    with writing(output):
        write_overview_block(output, source, region)
        mark_done(output, name)
    return {"tiles": 0}


def _objects(
    output: str, image: LazyImage, options: SegmentOptions, *, workers: int
) -> dict[str, Any]:
    """Instance labels and the object table, as steps after the class labels are complete.
    Each is redone whole unless its marker says it finished (both are idempotent)."""
    # A run resumed after these steps finished takes their summaries from the markers.
    found: dict[str, Any] = {
        name: done_summary(output, name)
        for name, wanted in (("instances", options.instances), ("table", options.table))
        if wanted != "none" and is_done(output, name)
    }
    run = {"scheduler": options.scheduler, "workers": workers}
    if options.instances != "none" and not is_done(output, "instances"):
        with writing(output):
            threshold = options.instance_threshold
            summary = label_instances(
                output, watershed=options.instances == "watershed",
                min_distance=options.min_distance,
                source="labels" if threshold is None else "probabilities",
                threshold=0.5 if threshold is None else threshold, **run,
            )  # fmt: skip
            found["instances"] = summary.to_dict()
            mark_done(output, "instances", found["instances"])
    if options.table != "none" and not is_done(output, "table"):
        with writing(output):
            table = measure_objects(
                output, image, table_path=Path(output) / f"objects.{options.table}",
                format=options.table, pixel_size=image.pixel_size, **run,
            )  # fmt: skip
            found["table"] = table.to_dict()
            mark_done(output, "table", found["table"])
    return found


def _probe_classes(spec: ModelSpec, options: SegmentOptions, grid: TileGrid) -> int:
    """Number of output classes of a model that does not declare it: one dummy window."""
    predictor = cached_predictor(
        spec, RunSettings(device="cpu", precision="fp32", channels_last="off")
    )
    cin = predictor.model.in_channels or 1
    return int(predictor.logits(np.zeros((1, cin, *grid.window), np.float32)).shape[1])


def _tissue_mask(
    input_path: str | os.PathLike, image: LazyImage, options: SegmentOptions
) -> TissueMask:
    """The tissue mask the options ask for; a level the file lacks is the file's problem."""
    try:
        return tissue_mask(
            image, method=options.tissue, threshold=options.tissue_threshold,
            level=options.tissue_level,
        )  # fmt: skip
    except ValueError as exc:
        raise TilesegError(input_path, f"tissue mask: {exc}") from None
