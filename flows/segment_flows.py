"""Prefect flows over the library: ``segment_slide`` (a task) and ``segment_directory``.

Thin by design: what to run and how a slide is processed live in :mod:`flows.core` (shared
with ``tileseg batch``, which needs no Prefect); this module adds what Prefect is for: task
retries, concurrency, logs, progress and artifacts in the UI, schedules and deployments.

Runs need no Prefect server: without ``PREFECT_API_URL`` Prefect starts a temporary local one.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import dask
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from flows.cluster import check_workers, open_cluster
from flows.core import (
    RunSettings,
    SlideJob,
    SlideReport,
    counts_line,
    failed_report,
    is_transient,
    plan_directory,
    process_slide,
    summary_lines,
)
from flows.runlog import RunLog
from pipeline.config import SegmentOptions
from pipeline.runtime.worker_wait import CONFIG_KEY, NoWorkers

__all__ = ["SLIDE_TAG", "SlidesFailed", "segment_directory", "segment_slide"]

SLIDE_TAG = "tileseg-slide"  # `prefect concurrency-limit create tileseg-slide N` caps all runs


class SlidesFailed(RuntimeError):
    """Raised at the end of a directory run, after every other slide finished."""


class RunTimedOut(TimeoutError):
    """``run.flow_timeout_seconds`` passed: the run fails and starts no further slide."""


def _retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry lost workers and the like; a corrupt slide or a bad config fails at once."""
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc)
    return True


class _ProgressArtifact:
    """A Prefect progress artifact for one slide, updated at most every few seconds."""

    def __init__(self, job: SlideJob, *, every_s: float = 5.0) -> None:
        self._logger = get_run_logger()
        self._every = every_s
        self._last = 0.0
        self._job = job
        self._id = create_progress_artifact(progress=0.0, description=f"segmenting {job.name}")

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last < self._every and done < total:
            return
        self._last = now
        percent = min(100.0, 100.0 * done / max(total, 1))
        try:
            update_progress_artifact(artifact_id=self._id, progress=percent)
        except Exception as exc:  # the UI is a convenience: never fail a slide over it
            self._logger.debug("progress artifact not updated: %s", exc)
        self._logger.info("%s: %.0f%%", self._job.name, percent)


@task(
    name="segment-slide",
    task_run_name="segment {job.name}",
    tags=[SLIDE_TAG],
    retries=2,
    retry_delay_seconds=30,
    retry_condition_fn=_retry_transient,
    # Inputs are paths and options, results are small reports: nothing worth caching, and
    # skipping done slides is decided from the outputs themselves (their completion record).
    cache_policy=NO_CACHE,
)
def segment_slide(
    job: SlideJob,
    options: SegmentOptions,
    settings: RunSettings,
    resources: dict[str, float] | None = None,
) -> SlideReport:
    """Segment one slide into ``job.output`` (skipped if already complete for this config)."""
    logger = get_run_logger()
    progress = _ProgressArtifact(job)
    report = process_slide(job, options, settings=settings, progress=progress, resources=resources)
    if report.status == "skipped":
        logger.info("%s: already complete (same input, config and model), skipped", job.name)
    else:
        progress(1, 1)
        logger.info(
            "%s: %s px in %.1f s (%.2f MP/s)%s -> %s", job.name, report.size, report.seconds,
            report.megapixels_per_second or 0.0,
            ", replacing an output made with another config/model" if report.reprocessed else "",
            report.output,
        )  # fmt: skip
    return report


@flow(
    name="segment-directory",
    # Slides are throttled by run.max_concurrent_slides below; the pool only bounds threads.
    task_runner=ThreadPoolTaskRunner(max_workers=8),
)
def segment_directory(
    input_dir: str,
    output_dir: str,
    config: str | None = None,
    patterns: list[str] | None = None,
    scheduler: str | None = None,
    cluster_config: str | None = None,
    qc_base_url: str | None = None,
    exclude: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Segment every slide of ``input_dir`` into ``output_dir/<stem>.zarr``.

    Slides whose output is complete for the same input, config and model are skipped; a
    slide that fails (e.g. a corrupt file) fails alone and the run fails at the end, after the
    others completed, with the failures in the log and in the summary artifact. One Dask
    cluster serves all slides: ``scheduler`` (an address), else ``cluster_config`` (a file such
    as configs/slurm-gpu.yaml), else the config's ``cluster:`` section, else a local cluster.
    ``qc_base_url``: where ``output_dir`` is served over HTTP, to show QC pictures inline.
    ``exclude``: globs of slide names never taken (adds to the config's ``run.exclude``).
    """
    started = time.monotonic()
    logger = get_run_logger()
    plan = plan_directory(
        input_dir, output_dir, config=config, patterns=patterns, scheduler=scheduler,
        cluster_config=cluster_config, exclude=exclude or (),
    )  # fmt: skip
    logger.info("%d slide(s) in %s", len(plan.jobs), input_dir)
    wait = plan.run.worker_wait_seconds
    rows = [(job.name, str(job.input), str(job.output)) for job in plan.jobs]
    runlog = RunLog(plan.output_dir, rows, input_dir=str(plan.input_dir))
    logger.info("run summary: %s", runlog.path)
    try:
        with open_cluster(plan.cluster) as cluster, dask.config.set({CONFIG_KEY: wait}):
            logger.info("Dask: %s", cluster.description)
            check_workers(cluster, wait=wait)  # no able worker: the run fails now, with one line
            options = replace(plan.options, scheduler=cluster.address)
            limit = plan.run.flow_timeout_seconds
            deadline = None if limit is None else started + limit
            reports = _run_slides(
                plan.jobs, options, plan.run, cluster.task_resources, runlog, deadline=deadline
            )
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        runlog.finish("interrupted" if interrupted else "failed", error=str(exc) or None)
        raise
    runlog.finish("complete")
    for line in summary_lines(reports):
        (logger.error if line.startswith("FAILED") else logger.info)(line)
    _publish(reports, output_dir, qc_base_url)
    failed = [r for r in reports if r.status == "failed"]
    if failed:
        first = "; ".join(f"{r.slide}: {r.error}" for r in failed[:3])
        raise SlidesFailed(f"{len(failed)} of {len(reports)} slide(s) failed: {first}")
    return [r.row() for r in reports]


def _run_slides(
    jobs: Sequence[SlideJob],
    options: SegmentOptions,
    settings: RunSettings,
    resources: dict[str, float] | None,
    runlog: RunLog,
    *,
    deadline: float | None = None,
) -> list[SlideReport]:
    """Submit the slides, at most ``run.max_concurrent_slides`` in flight, and collect every
    outcome, each into the run's summary file as it comes. At ``deadline`` (monotonic: the
    config's ``run.flow_timeout_seconds`` from the run's start, which a ``prefect.yaml``
    deployment cannot give the flow itself) :class:`RunTimedOut` is raised; slides still
    running finish (bounded by ``run.slide_timeout_seconds``), none starts after it."""
    slide_task = segment_slide.with_options(
        retries=settings.retries,
        retry_delay_seconds=settings.retry_delay_seconds,
        timeout_seconds=settings.slide_timeout_seconds,
    )
    reports: dict[SlideJob, SlideReport] = {}
    running: dict[PrefectFuture[SlideReport], SlideJob] = {}

    def timed_out() -> RunTimedOut:
        return RunTimedOut(
            f"run.flow_timeout_seconds ({settings.flow_timeout_seconds:g} s) passed with "
            f"{len(jobs) - len(reports)} of {len(jobs)} slide(s) unfinished"
        )

    def collect_one() -> None:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            future = next(as_completed(list(running), timeout=left))
        except TimeoutError:
            raise timed_out() from None
        job = running.pop(future)
        reports[job] = report = _outcome(job, future)
        runlog.update(job.name, report.status, seconds=report.seconds, error=report.error)

    for job in jobs:
        while len(running) >= settings.max_concurrent_slides:
            collect_one()
        if deadline is not None and time.monotonic() >= deadline:
            raise timed_out()  # no slide starts after the deadline
        runlog.update(job.name, "running")
        running[slide_task.submit(job, options, settings, resources)] = job
    while running:
        collect_one()
    return [reports[job] for job in jobs]


def _outcome(job: SlideJob, future: PrefectFuture[SlideReport]) -> SlideReport:
    try:
        return future.result()
    except NoWorkers:
        raise  # the cluster's problem, not the slide's: the run fails with it
    except Exception as exc:  # one slide's failure is a row of the summary, not the run's end
        return failed_report(job, exc)


def _publish(reports: Sequence[SlideReport], output_dir: str, qc_base_url: str | None) -> None:
    """The run's table and its QC pictures as Prefect artifacts."""
    key = _artifact_key(output_dir)
    create_table_artifact(
        table=[r.row() for r in reports],
        key=key,
        description=f"tileseg directory run into {output_dir}: {counts_line(reports)}",
    )
    pictures = [r for r in reports if r.qc]
    if not pictures:
        return
    if qc_base_url:
        base = qc_base_url.rstrip("/")
        for r in pictures:
            relative = Path(r.qc).relative_to(Path(output_dir).absolute()).as_posix()
            create_image_artifact(image_url=f"{base}/{relative}", description=f"QC: {r.slide}")
    lines = ["| slide | QC picture |", "| --- | --- |"]
    lines += [f"| {r.slide} | [{Path(r.qc).name}]({Path(r.qc).as_uri()}) |" for r in pictures]
    create_markdown_artifact(markdown="\n".join(lines), key=f"{key}-qc", description="QC pictures")


def _artifact_key(output_dir: str) -> str:
    """Keys allow lowercase letters, digits and dashes; one key per output directory keeps
    the history of its runs together in the Artifacts page."""
    name = re.sub(r"[^a-z0-9]+", "-", Path(output_dir).absolute().name.lower()).strip("-")
    return f"tileseg-{name or 'run'}"
