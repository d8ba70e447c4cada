"""The durable summary of a directory run: ``OUTPUT_DIR/runs/<timestamp>.json``.

Written when the run starts (every slide ``pending``) and again each time a slide starts or
finishes, each time whole (a temporary file renamed into place), so that a run ended by
SIGTERM (SLURM's walltime, ``scancel``), a lost node or a kill still leaves the list of slides
done, skipped, failed and pending. ``--only-failed`` reads the latest one.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.errors import TilesegError

__all__ = [
    "RUNS_DIR",
    "RunLog",
    "Stopped",
    "failed_slides",
    "latest_summary",
    "stop_on_signals",
]

RUNS_DIR = "runs"
STATUSES = ("pending", "running", "done", "skipped", "failed")


class Stopped(KeyboardInterrupt):
    """The run was asked to stop by a signal (SIGTERM, SIGINT); ends it like Ctrl-C does."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


@contextmanager
def stop_on_signals(signums: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Turn the signals into :class:`Stopped` in the main thread while the block runs, so the
    run unwinds (tasks cancelled, the cluster closed, the summary written) instead of dying."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def stop(signum: int, frame: Any) -> None:
        raise Stopped(signum)

    previous = {s: signal.signal(s, stop) for s in signums}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class RunLog:
    """One run's summary file, rewritten whole on every change (thread-safe).

    Parameters
    ----------
    output_dir
        The run's output directory; the file is ``output_dir/runs/<UTC timestamp>.json``.
    slides
        ``(slide name, input path, output path)`` of every slide of the run, in order.
    """

    def __init__(
        self, output_dir: Path, slides: Sequence[tuple[str, str, str]], *, input_dir: str = ""
    ) -> None:
        now = datetime.now(UTC)
        # Microseconds and the pid keep two runs started in one second apart; names sort by time.
        name = f"{now:%Y%m%dT%H%M%S.%fZ}-{os.getpid()}.json"
        self.path = Path(output_dir) / RUNS_DIR / name
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._data: dict[str, Any] = {
            "started": now.isoformat(timespec="seconds"),
            "finished": None,
            "status": "running",
            "input_dir": input_dir,
            "output_dir": str(output_dir),
            "error": None,
            "slides": [_row(*slide) for slide in slides],
        }
        self._rows = {row["slide"]: row for row in self._data["slides"]}
        self._write()

    def update(
        self, slide: str, status: str, *, seconds: float | None = None, error: str | None = None
    ) -> None:
        """Set one slide's status (``running`` when it starts, its outcome when it ends);
        ignored once the run is finished."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        with self._lock:
            if self._data["finished"]:
                return  # a slide thread outliving an interrupted run: the summary is final
            row = self._rows[slide]
            row.update(status=status, error=error)
            row["seconds"] = None if seconds is None else round(seconds, 2)
            self._write()

    def finish(self, status: str, *, error: str | None = None) -> None:
        """End the run: ``complete``, ``interrupted`` (slides still running are ``pending``
        again: the next run resumes them) or ``failed`` (the run itself, e.g. no workers)."""
        with self._lock:
            for row in self._data["slides"]:
                if row["status"] == "running":
                    row["status"] = "pending"
            self._data.update(
                status=status,
                error=error,
                finished=datetime.now(UTC).isoformat(timespec="seconds"),
                seconds=round(time.monotonic() - self._started, 2),
            )
            self._write()

    def counts(self) -> dict[str, int]:
        """Slides per status."""
        with self._lock:
            rows = self._data["slides"]
            return {s: sum(r["status"] == s for r in rows) for s in STATUSES}

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.name}.partial")
        partial.write_text(json.dumps(self._data, indent=1) + "\n")
        os.replace(partial, self.path)  # readers see the old summary or the new, never half


def _row(slide: str, source: str, output: str) -> dict[str, Any]:
    return {"slide": slide, "input": source, "output": output, "status": "pending",
            "seconds": None, "error": None}  # fmt: skip


def latest_summary(output_dir: str | os.PathLike[str]) -> Path | None:
    """The newest run summary in ``output_dir/runs``, if any."""
    runs = Path(output_dir) / RUNS_DIR
    found = sorted(runs.glob("*.json")) if runs.is_dir() else []
    return found[-1] if found else None


def failed_slides(output_dir: str | os.PathLike[str]) -> list[str]:
    """Names of the slides that failed in the latest run (for ``--only-failed``)."""
    path = latest_summary(output_dir)
    if path is None:
        raise TilesegError(output_dir, f"no run summary in {RUNS_DIR}/ to take failed slides from")
    try:
        data = json.loads(path.read_text())
        return [row["slide"] for row in data["slides"] if row["status"] == "failed"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TilesegError(path, f"unreadable run summary ({exc})") from None
