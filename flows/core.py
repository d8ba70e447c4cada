"""Directory runs without Prefect: discovery, skip decisions, one slide, the batch loop.

Everything here is plain Python over the library, so ``tileseg batch`` (inside a SLURM job, with
no Prefect server) and the Prefect flow in :mod:`flows.segment_flows` make the same decisions:
which slides exist, which are already done, what a failure looks like in the summary.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import dask

from pipeline.config import SegmentOptions, load_yaml_config, options_from_mapping
from pipeline.errors import TilesegError
from pipeline.io.readers import find_images, image_stem
from pipeline.models import ModelSpec, load_model
from pipeline.output.provenance import fingerprint, output_state
from pipeline.runtime.heap import heap_hint
from pipeline.runtime.worker_wait import CONFIG_KEY, DEFAULT_WAIT_S, NoWorkers

__all__ = [
    "DirectoryConfig",
    "DirectoryPlan",
    "RunSettings",
    "SlideJob",
    "SlideReport",
    "counts_line",
    "failed_report",
    "is_transient",
    "load_directory_config",
    "plan_directory",
    "process_slide",
    "run_batch",
    "run_with_retries",
    "summary_lines",
]

log = logging.getLogger("tileseg.flows")

ON_CHANGED = ("reprocess", "fail")
QC_DIR = "qc"  # QC pictures go to OUTPUT_DIR/qc/<stem>.png, beside (not inside) the outputs


@dataclass(frozen=True)
class RunSettings:
    """How a directory run behaves (the ``run:`` section of a directory config)."""

    patterns: tuple[str, ...] = ()  # glob patterns in the input directory; () = every image
    exclude: tuple[str, ...] = ()  # globs of slide names never taken (e.g. known-bad slides)
    max_concurrent_slides: int = 1  # slides in flight at once (each fills the whole cluster)
    retries: int = 2  # retries of a slide after a transient (non-user) error
    retry_delay_seconds: float = 30.0
    qc: bool = True  # write a QC overlay picture per slide (2D images only)
    on_changed: str = "reprocess"  # an output made with another input/config/model: redo or fail
    # How long the run waits for a Dask worker able to run its tasks (GPU resources, any worker
    # at all) before it fails with one line saying what is missing, up front and while it runs.
    worker_wait_seconds: float = DEFAULT_WAIT_S
    slide_timeout_seconds: float | None = None  # Prefect: a slide's task fails after this
    flow_timeout_seconds: float | None = None  # Prefect: the whole run fails after this

    def __post_init__(self) -> None:
        if self.on_changed not in ON_CHANGED:
            raise TilesegError("run.on_changed", f"must be one of {', '.join(ON_CHANGED)}")
        if self.max_concurrent_slides < 1 or self.retries < 0 or self.retry_delay_seconds < 0:
            raise TilesegError("run", "max_concurrent_slides >= 1, retries >= 0, delay >= 0")
        timeouts = (self.slide_timeout_seconds, self.flow_timeout_seconds)
        if self.worker_wait_seconds < 0 or any(t is not None and t <= 0 for t in timeouts):
            raise TilesegError("run", "worker_wait_seconds >= 0, timeouts > 0 (or null)")


@dataclass(frozen=True)
class DirectoryConfig:
    """A directory-run config file: segment options, run settings and the Dask cluster."""

    options: SegmentOptions = field(default_factory=SegmentOptions)
    run: RunSettings = field(default_factory=RunSettings)
    cluster: dict[str, Any] | None = None


SECTIONS = ("segment", "run", "cluster")


def load_directory_config(path: str | os.PathLike[str] | None) -> DirectoryConfig:
    """Read a directory config (see ``configs/directory.yaml``).

    A file with any of the sections ``segment:``, ``run:``, ``cluster:`` is read by section;
    a file without them is a plain ``tileseg segment`` options file (``configs/segment.yaml``).
    """
    if path is None:
        return DirectoryConfig()
    source = os.fspath(path)
    data = load_yaml_config(source)
    if not any(key in data for key in SECTIONS):
        data = {"segment": data}
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise TilesegError(source, f"unknown section(s) {unknown} (known: {', '.join(SECTIONS)})")
    segment = _section(data, "segment", source)
    options = options_from_mapping(
        {k.replace("-", "_"): v for k, v in segment.items()}, source=source
    )
    run = _run_settings(_section(data, "run", source), source)
    cluster = _section(data, "cluster", source) or None
    return DirectoryConfig(options=options, run=run, cluster=cluster)


def _section(data: dict[str, Any], name: str, source: str) -> dict[str, Any]:
    value = data.get(name) or {}
    if not isinstance(value, dict):
        raise TilesegError(source, f"{name}: must be a mapping")
    return value


def _run_settings(data: dict[str, Any], source: str) -> RunSettings:
    known = {f.name for f in fields(RunSettings)}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise TilesegError(source, f"run: unknown key(s) {unknown} (known: {sorted(known)})")
    for key in ("patterns", "exclude"):
        if key in data:
            patterns = data[key]
            if isinstance(patterns, str):
                patterns = [patterns]
            data[key] = tuple(str(p) for p in patterns or ())
    try:
        return RunSettings(**data)
    except TilesegError as exc:
        raise TilesegError(source, exc.problem) from None
    except TypeError as exc:
        raise TilesegError(source, f"run: {exc}") from None


# ------------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class SlideJob:
    """One slide of a directory run and where its output goes."""

    input: Path
    output: Path
    problem: str | None = None  # known before any work (e.g. two slides, one output name)

    @property
    def name(self) -> str:
        return self.input.name


def discover(
    directory: str | os.PathLike[str],
    patterns: Sequence[str] = (),
    *,
    exclude: Sequence[str] = (),
    output_dir: str | os.PathLike[str] | None = None,
) -> list[Path]:
    """Slides directly inside ``directory``: every image, or those matching any glob pattern,
    less those whose name matches an ``exclude`` glob.

    Hidden entries are skipped, as in :func:`pipeline.io.readers.find_images`; so is everything
    inside ``output_dir`` when it lies in ``directory`` (a run's own outputs are no slides).
    """
    if not patterns:
        found = find_images(directory)
    else:
        root = Path(directory)
        if not root.is_dir():
            raise TilesegError(root, "not a directory" if root.exists() else "no such directory")
        found = sorted(
            {p for pattern in patterns for p in root.glob(pattern) if not p.name.startswith(".")}
        )
    found = [p for p in found if not any(fnmatch.fnmatch(p.name, x) for x in exclude)]
    if output_dir is None:
        return found
    outputs = Path(output_dir).resolve()
    if not outputs.is_relative_to(Path(directory).resolve()):
        return found
    return [p for p in found if not p.resolve().is_relative_to(outputs)]


def check_directories(
    input_dir: str | os.PathLike[str], output_dir: str | os.PathLike[str]
) -> None:
    """Refuse an output directory that is the input directory: its ``<stem>.zarr`` outputs
    would lie beside the slides and be taken as slides by the next run."""
    if Path(input_dir).resolve() == Path(output_dir).resolve():
        raise TilesegError(
            output_dir,
            "OUTPUT_DIR is INPUT_DIR: the outputs would be taken as slides by the next run; "
            "write them to another directory (a subdirectory of INPUT_DIR is fine)",
        )


def plan_jobs(slides: Sequence[Path], output_dir: str | os.PathLike[str]) -> list[SlideJob]:
    """``OUTPUT_DIR/<stem>.zarr`` per slide. Two slides with one stem (``a.tif``, ``a.svs``)
    would overwrite each other's output: the later ones fail alone instead."""
    out = Path(output_dir).absolute()
    owners: dict[str, Path] = {}
    jobs = []
    for slide in slides:
        stem = image_stem(slide)
        problem = None
        if stem in owners:
            problem = f"output {stem}.zarr is already used by {owners[stem].name}; rename one"
        else:
            owners[stem] = slide
        jobs.append(SlideJob(slide.absolute(), out / f"{stem}.zarr", problem))
    return jobs


# ------------------------------------------------------------------------------- one slide


@dataclass
class SlideReport:
    """One row of a run's summary."""

    slide: str
    output: str
    status: str  # done | skipped | failed
    size: str = ""  # e.g. 40000x30000
    megapixels: float | None = None
    seconds: float = 0.0
    megapixels_per_second: float | None = None
    tissue_fraction: float | None = None  # when the output's record says
    objects: int | None = None  # when the output's record says
    qc: str | None = None  # QC picture path
    error: str | None = None
    reprocessed: bool = False  # an older output from another config/model/input was replaced
    tasks_off_main_heap: int = (
        0  # CPU forwards that lost their freed memory (pipeline/runtime/heap.py)
    )

    def row(self) -> dict[str, Any]:
        """The artifact/summary table row: blanks where a value is not known."""

        def fmt(value: float | None, digits: int) -> str:
            return "" if value is None else f"{value:.{digits}f}"

        return {
            "slide": self.slide,
            "size": self.size,
            "tissue fraction": fmt(self.tissue_fraction, 3),
            "time (s)": fmt(self.seconds, 1) if self.status == "done" else "",
            "throughput (MP/s)": fmt(self.megapixels_per_second, 2),
            "objects": "" if self.objects is None else str(self.objects),
            "status": self.status if not self.error else f"{self.status}: {self.error}",
            "output": self.output,
        }


Progress = Callable[[int, int], None]


def prior_state(job: SlideJob, options: SegmentOptions) -> str:
    """State of the slide's existing output for these options (see ``output_state``)."""
    model = load_model(ModelSpec.from_options(options))
    return output_state(job.output, fingerprint(job.input, options, model_sha256=model.sha256))


def process_slide(
    job: SlideJob,
    options: SegmentOptions,
    *,
    settings: RunSettings = RunSettings(),
    progress: Progress | None = None,
    resources: dict[str, float] | None = None,
) -> SlideReport:
    """Segment one slide unless its output is already complete; raise on failure.

    ``resources`` (e.g. ``{"GPU": 1}``) is asked of a distributed worker by every task of the
    slide (``options.scheduler`` names the cluster), so each GPU worker runs one model.

    ``TilesegError`` means a problem with this slide or config (not worth retrying); anything
    else may be transient (a lost worker, a full scratch disk being cleaned) and is retried by
    the caller.
    """
    from pipeline.engine.driver import (
        segment_image,  # torch import: only where slides are processed
    )

    if job.problem:
        raise TilesegError(job.input, job.problem)
    try:
        state = prior_state(job, options)
    except OSError as exc:  # the slide vanished or is unreadable between discovery and now
        raise TilesegError(job.input, f"cannot read ({exc.strerror or exc})") from None
    if state == "complete":
        return _report_from_record(job, status="skipped")
    reprocess = state == "different"
    if reprocess and settings.on_changed == "fail":
        raise TilesegError(
            job.output, "exists from another input, model or configuration (run.on_changed: fail)"
        )
    if reprocess:
        log.info("%s: output was made with another config/model/input: reprocessing", job.name)
        options = replace(options, overwrite=True)
    job.output.parent.mkdir(parents=True, exist_ok=True)
    if resources:
        options = replace(options, resources=resources)  # inference tasks only, not the pyramid
    result = segment_image(job.input, job.output, options, progress=progress)
    report = _report_from_record(job, status="skipped" if result.skipped else "done")
    report.seconds = result.seconds
    report.megapixels_per_second = None if result.skipped else result.megapixels_per_second
    report.reprocessed = reprocess
    if settings.qc and not result.skipped:
        report.qc = write_qc(job, options)
    return report


def _report_from_record(job: SlideJob, *, status: str) -> SlideReport:
    from pipeline.output.ngff import read_record

    record = read_record(job.output) or {}
    shape = record.get("spatial_shape") or []
    report = SlideReport(slide=job.name, output=str(job.output), status=status)
    if shape:
        report.size = "x".join(str(n) for n in shape)
        report.megapixels = float(_prod(shape)) / 1e6
    # present when the run masked tissue / labelled instances
    report.tissue_fraction = (record.get("tissue") or {}).get("fraction")
    report.objects = (record.get("instances") or {}).get("objects")
    if status == "done":
        report.tasks_off_main_heap = int(
            (record.get("timings") or {}).get("tasks_off_main_heap", 0)
        )
    qc = qc_path(job)
    report.qc = str(qc) if qc.exists() else None
    return report


def _prod(values: Sequence[int]) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def qc_path(job: SlideJob) -> Path:
    return job.output.parent / QC_DIR / f"{job.output.stem}.png"


def write_qc(job: SlideJob, options: SegmentOptions) -> str | None:
    """A QC overlay picture; a failure here is logged, never fails a segmented slide."""
    from pipeline.io.readers import open_image
    from pipeline.output.qc import overlay_png

    png = qc_path(job)
    try:
        png.parent.mkdir(parents=True, exist_ok=True)
        with open_image(job.input, level=options.level, axes=options.axes) as image:
            if len(image.spatial_shape) != 2:
                return None  # the overlay is a 2D picture
            return str(overlay_png(image, job.output, png, max_side=1024))
    except Exception as exc:  # QC is a convenience: report and go on
        log.warning("%s: no QC picture (%s)", job.name, exc)
        return None


# ------------------------------------------------------------------------------ batch loop


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: anything but a user error (bad file, bad config) or an interrupt."""
    return not isinstance(exc, TilesegError | KeyboardInterrupt)


def run_with_retries(
    job: SlideJob,
    options: SegmentOptions,
    settings: RunSettings,
    *,
    progress: Progress | None = None,
    resources: dict[str, float] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> SlideReport:
    """``process_slide`` with the retry policy of the flow's task, for runs without Prefect.
    Never raises (except on interrupt and :class:`NoWorkers`): a failure is a ``failed``
    report."""
    for attempt in range(settings.retries + 1):
        try:
            return process_slide(
                job, options, settings=settings, progress=progress, resources=resources
            )
        except (KeyboardInterrupt, NoWorkers):
            raise  # not this slide's problem: the run ends
        except Exception as exc:
            if is_transient(exc) and attempt < settings.retries:
                n = f"{attempt + 1}/{settings.retries}"
                log.warning("%s: %s; retrying (%s)", job.name, exc, n)
                sleep(settings.retry_delay_seconds)
                continue
            return failed_report(job, exc)
    raise AssertionError("unreachable")


def failed_report(job: SlideJob, exc: BaseException) -> SlideReport:
    message = exc.problem if isinstance(exc, TilesegError) else f"{type(exc).__name__}: {exc}"
    return SlideReport(slide=job.name, output=str(job.output), status="failed", error=message)


def summary_lines(reports: Sequence[SlideReport]) -> Iterator[str]:
    """Human-readable run summary: one line per slide, then the counts."""
    for r in reports:
        if r.status == "failed":
            yield f"FAILED  {r.slide}: {r.error}"
        elif r.status == "skipped":
            yield f"skipped {r.slide}: already complete -> {r.output}"
        else:
            rate = f"{r.megapixels_per_second:.2f} MP/s" if r.megapixels_per_second else ""
            yield f"done    {r.slide}: {r.size} px, {r.seconds:.1f} s, {rate} -> {r.output}"
    yield counts_line(reports)
    off_main_heap = sum(r.tasks_off_main_heap for r in reports)
    if off_main_heap:
        yield heap_hint(off_main_heap)


def counts_line(reports: Sequence[SlideReport]) -> str:
    n = {s: sum(r.status == s for r in reports) for s in ("done", "skipped", "failed")}
    return (
        f"{len(reports)} slide(s): {n['done']} done, {n['skipped']} skipped (already complete), "
        f"{n['failed']} failed"
    )


# ------------------------------------------------------------------------- directory runs


@dataclass(frozen=True)
class DirectoryPlan:
    """Everything a directory run decides before it starts its cluster."""

    options: SegmentOptions
    run: RunSettings
    cluster: dict[str, Any]
    jobs: list[SlideJob]
    input_dir: Path = Path(".")
    output_dir: Path = Path(".")


def plan_directory(
    input_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    config: str | os.PathLike[str] | None = None,
    patterns: Sequence[str] | None = None,
    scheduler: str | None = None,
    cluster_config: str | os.PathLike[str] | None = None,
    exclude: Sequence[str] = (),
    only: Sequence[str] | None = None,
) -> DirectoryPlan:
    """Read the configs and discover the slides. Arguments given here override the config:
    ``patterns`` its ``run.patterns``; ``scheduler`` (an address) or ``cluster_config`` (a
    file) its ``cluster:`` section, which overrides a ``segment.scheduler``. ``exclude`` adds
    to ``run.exclude``; ``only`` (slide names, e.g. the failed ones of the latest run) keeps
    just those."""
    from flows.cluster import check_cluster_config, choose_cluster, load_cluster_config

    check_directories(input_dir, output_dir)
    loaded = load_directory_config(config)
    settings = loaded.run if patterns is None else replace(loaded.run, patterns=tuple(patterns))
    settings = replace(settings, exclude=(*settings.exclude, *exclude))
    cluster = load_cluster_config(cluster_config) if cluster_config else loaded.cluster
    if cluster is not None:
        check_cluster_config(cluster, source=os.fspath(cluster_config or config or "cluster"))
    if scheduler is None and cluster is None:
        scheduler = loaded.options.scheduler
    spec = choose_cluster(scheduler=scheduler, cluster=cluster)
    slides = discover(input_dir, settings.patterns, exclude=settings.exclude, output_dir=output_dir)
    if only is not None:
        slides = [s for s in slides if s.name in set(only)]
    jobs = plan_jobs(slides, output_dir)
    return DirectoryPlan(
        loaded.options,
        settings,
        spec,
        jobs,
        Path(input_dir).absolute(),
        Path(output_dir).absolute(),
    )


def run_batch(
    plan: DirectoryPlan,
    *,
    progress_for: Callable[[SlideJob], Progress | None] | None = None,
) -> list[SlideReport]:
    """The directory run without Prefect: one cluster, at most ``run.max_concurrent_slides``
    slides at once, failures isolated and retried like the flow's tasks, and the run's summary
    in ``OUTPUT_DIR/runs/`` (:class:`~flows.runlog.RunLog`) kept as slides start and finish.

    An interrupt (:class:`~flows.runlog.Stopped` from SIGTERM, Ctrl-C) or a cluster without
    able workers ends the run: the summary is finished first, then the exception goes on.
    """
    from flows.cluster import check_workers, open_cluster
    from flows.runlog import RunLog

    rows = [(job.name, str(job.input), str(job.output)) for job in plan.jobs]
    runlog = RunLog(plan.output_dir, rows, input_dir=str(plan.input_dir))
    reports: list[SlideReport] = []
    try:
        with (
            open_cluster(plan.cluster) as cluster,
            dask.config.set({CONFIG_KEY: plan.run.worker_wait_seconds}),
        ):
            log.info("%d slide(s) on %s", len(plan.jobs), cluster.description)
            check_workers(cluster, wait=plan.run.worker_wait_seconds)
            options = replace(plan.options, scheduler=cluster.address)

            def one(job: SlideJob) -> SlideReport:
                runlog.update(job.name, "running")
                progress = progress_for(job) if progress_for else None
                return run_with_retries(
                    job, options, plan.run, progress=progress, resources=cluster.task_resources
                )

            for report in _each_slide(one, plan.jobs, plan.run.max_concurrent_slides):
                if report.status == "failed":
                    log.error("%s failed: %s", report.slide, report.error)
                error = report.error
                runlog.update(report.slide, report.status, seconds=report.seconds, error=error)
                reports.append(report)
    except KeyboardInterrupt as exc:
        runlog.finish("interrupted", error=f"stopped by {exc}" if str(exc) else "interrupted")
        raise
    except BaseException as exc:
        runlog.finish("failed", error=str(exc))
        raise
    runlog.finish("complete")
    order = {job.name: i for i, job in enumerate(plan.jobs)}
    return sorted(reports, key=lambda r: order[r.slide])


def _each_slide(
    one: Callable[[SlideJob], SlideReport], jobs: Sequence[SlideJob], limit: int
) -> Iterator[SlideReport]:
    """``one(job)`` for every job, at most ``limit`` at a time, reports as they finish. One at
    a time runs in the calling thread (where a CPU forward keeps its freed memory)."""
    if limit == 1:
        yield from map(one, jobs)
        return
    pool = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="tileseg-slide")
    try:
        futures = [pool.submit(one, job) for job in jobs]
        for future in as_completed(futures):
            yield future.result()
    finally:
        # On an interrupt, slides not yet started never start; running ones are not waited for.
        pool.shutdown(wait=False, cancel_futures=True)
