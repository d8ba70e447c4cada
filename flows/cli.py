"""``tileseg batch`` and ``tileseg serve``: added to the CLI through its plugin entry point.

Importing this module must stay cheap and must not need Prefect: ``tileseg`` loads it for
every command, also where the ``flows`` extra is not installed. Prefect is imported only by
``serve``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path

from pipeline.errors import TilesegError

__all__ = ["register"]

DEFAULT_CRON = "0 2 * * *"  # nightly at 02:00


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``batch`` and ``serve`` to the ``tileseg`` command line."""
    _batch_parser(sub)
    _serve_parser(sub)


def _directory_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "input_dir",
        help="directory of slides (TIFF/SVS/OME-TIFF, OpenSlide formats, DICOM folders, .zarr)",
    )
    p.add_argument("output_dir", help="directory for <stem>.zarr outputs and qc/<stem>.png")
    p.add_argument(
        "--config",
        help="directory config (segment:/run:/cluster: sections, see configs/directory.yaml) "
        "or a plain segment options file",
    )
    p.add_argument(
        "--pattern",
        action="append",
        dest="patterns",
        metavar="GLOB",
        help="glob of slides to take, e.g. '*.svs' (repeatable; default: every image)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="glob of slide names never to take, e.g. known-bad slides (repeatable; adds to "
        "run.exclude)",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--scheduler", help="address of an existing Dask scheduler")
    where.add_argument(
        "--cluster-config",
        help="Dask cluster config, e.g. configs/slurm-gpu.yaml (default: a local cluster)",
    )


def _batch_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch",
        help="segment a directory of slides as one batch job (no Prefect server needed)",
        description="Segment every slide of INPUT_DIR into OUTPUT_DIR/<stem>.zarr on one Dask "
        "cluster, skipping slides already complete for the same input, config and model, and "
        "retrying transient errors. A failing slide fails alone: the others are written, the "
        "summary lists it and the exit status is 2. Meant for cluster batch jobs (e.g. inside "
        "an sbatch script): it needs no Prefect server or database.",
    )
    _directory_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no per-slide progress lines")
    p.add_argument(
        "--only-failed",
        action="store_true",
        help="only the slides that failed in the latest run (its summary in OUTPUT_DIR/runs/)",
    )
    p.set_defaults(handler=_batch)


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the segment-directory Prefect flow on a cron schedule (long-running)",
        description="Create a Prefect deployment of the segment-directory flow with a cron "
        "schedule and run its scheduled (and manually triggered) runs until interrupted. "
        "Needs a Prefect server: start one with `prefect server start` and set PREFECT_API_URL "
        "(e.g. http://127.0.0.1:4200/api).",
    )
    _directory_arguments(p)
    p.add_argument("--cron", default=DEFAULT_CRON, help=f"cron schedule ({DEFAULT_CRON!r})")
    p.add_argument("--timezone", help="IANA timezone of the schedule, e.g. Europe/Berlin (UTC)")
    # Not "nightly": that is prefect.yaml's deployment, which this would overwrite.
    p.add_argument("--name", default="serve", help="deployment name (serve)")
    p.add_argument("--qc-base-url", help="URL at which OUTPUT_DIR is served (inline QC images)")
    p.set_defaults(handler=_serve)


def _batch(args: argparse.Namespace) -> int:
    from flows.core import plan_directory, run_batch, summary_lines
    from flows.runlog import Stopped, failed_slides, latest_summary, stop_on_signals

    # Our progress at INFO on stderr; Dask's INFO chatter (workers starting, closing) stays out.
    logger = logging.getLogger("tileseg")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    only = failed_slides(args.output_dir) if args.only_failed else None
    if only == []:
        print(f"no failed slides in {latest_summary(args.output_dir)}: nothing to rerun")
        return 0
    plan = plan_directory(
        args.input_dir, args.output_dir, config=args.config, patterns=args.patterns,
        scheduler=args.scheduler, cluster_config=args.cluster_config, exclude=args.exclude,
        only=only,
    )  # fmt: skip
    if not plan.jobs:
        raise TilesegError(args.input_dir, "no slides found (check --pattern, --exclude)")
    progress_for = None if args.no_progress else _progress_lines
    try:
        with stop_on_signals():
            reports = run_batch(plan, progress_for=progress_for)
    except Stopped as exc:
        summary = latest_summary(plan.output_dir)
        print(f"tileseg: stopped by {exc}: the run's summary is {summary}; the same command "
              "resumes it", file=sys.stderr, flush=True)  # fmt: skip
        return _stopped(128 + exc.signum)
    for line in summary_lines(reports):
        print(line)
    print(f"summary: {latest_summary(plan.output_dir)}")
    return 2 if any(r.status == "failed" for r in reports) else 0


def _stopped(code: int) -> int:
    """The exit status of a stopped run. Slides still running in other threads are not waited
    for: every output is resumable from any point (the summary says which are pending)."""
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if others:
        sys.stdout.flush()
        os._exit(code)
    return code


def _progress_lines(job):  # -> Callable[[int, int], None]
    """Plain progress lines every 10 % (batch logs are files: no bars)."""
    shown = -10

    def progress(done: int, total: int) -> None:
        nonlocal shown
        percent = min(100, int(100 * done / max(total, 1)))
        if percent >= shown + 10:
            shown = percent - percent % 10
            print(f"{job.name}: {percent}%", file=sys.stderr, flush=True)

    return progress


def _serve(args: argparse.Namespace) -> int:
    try:
        from prefect.schedules import Cron
        from prefect.settings import PREFECT_API_URL

        from flows.segment_flows import segment_directory
    except ImportError:
        raise TilesegError("serve", "needs Prefect: pip install 'tileseg[flows]'") from None
    if not PREFECT_API_URL.value():
        # A temporary (ephemeral) server runs no scheduler: nothing would ever start.
        raise TilesegError(
            "serve",
            "needs a Prefect server for its schedule: run `prefect server start` elsewhere and "
            "`prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`",
        )
    parameters = {
        "input_dir": str(Path(args.input_dir).absolute()),
        "output_dir": str(Path(args.output_dir).absolute()),
        "config": _absolute(args.config),
        "patterns": args.patterns,
        "exclude": args.exclude or None,
        "scheduler": args.scheduler,
        "cluster_config": _absolute(args.cluster_config),
        "qc_base_url": args.qc_base_url,
    }
    from flows.core import load_directory_config

    timeout = load_directory_config(args.config).run.flow_timeout_seconds
    flow = segment_directory.with_options(timeout_seconds=timeout) if timeout else segment_directory
    flow.serve(
        name=args.name,
        schedules=[Cron(args.cron, timezone=args.timezone)],
        parameters={k: v for k, v in parameters.items() if v is not None},
        # One run at a time: a run still busy at the next tick must not double the GPU load.
        limit=1,
    )
    return 0


def _absolute(path: str | None) -> str | None:
    return None if path is None else str(Path(path).absolute())
