"""One writer per output: an advisory lock beside the output and the run id inside it.

A run takes the lock before it looks at, creates, resumes or replaces an output, and holds it
until the output's record is written. The lock is a small JSON file beside the output
(``.NAME.tileseg-lock``: run id, user, host, pid, the process's start time, when it was taken),
created atomically with ``link(2)``, which also holds on NFS. Its holder touches it every
:data:`HEARTBEAT_SECONDS` while it runs. A lock is *stale*, and is taken over, when its holder
is gone: on this host, when no process with its pid and start time exists; on another host,
when it has not been touched for ``TILESEG_LOCK_STALE_SECONDS`` (default
:data:`STALE_SECONDS`). Taking over goes through a second exclusive file, so two runs that
find one stale lock never both take it.

Inside the output, ``.tileseg/owner`` names the run id of the run that holds it. Tasks check it
before they write (:func:`check_owner`): a run whose output was replaced by another run (its
driver killed, its Dask workers still running) stops instead of writing into its successor.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from pipeline.errors import TilesegError

__all__ = [
    "HEARTBEAT_SECONDS",
    "STALE_SECONDS",
    "LockHolder",
    "OutputLock",
    "TakenOver",
    "check_owner",
    "claim_output",
    "is_owner",
    "lock_path",
]

HEARTBEAT_SECONDS = 10.0
STALE_SECONDS = 120.0  # a lock of another host untouched this long is stale (10 heartbeats missed)
_BREAK_STALE_SECONDS = 30.0  # a take-over file left by a run killed while it took over
OWNER_FILE = ".tileseg/owner"


class TakenOver(TilesegError):
    """The output was taken over by another run while this one ran."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds an output's lock."""

    run_id: str
    user: str
    host: str
    pid: int
    process_started: float  # the holder process's start time (tells a reused pid apart)
    started: str  # when the lock was taken, ISO 8601 UTC

    def describe(self) -> str:
        return f"pid {self.pid} of {self.user} on {self.host}, since {self.started}"


def lock_path(output: str | os.PathLike[str]) -> Path:
    """The lock file of an output: beside it, so that replacing the output keeps it."""
    path = Path(output).absolute()
    return path.with_name(f".{path.name}.tileseg-lock")


class OutputLock:
    """The lock of one output, held from :meth:`acquire` to :meth:`release` (or as a context
    manager), touched by a heartbeat thread meanwhile."""

    def __init__(self, output: str | os.PathLike[str]) -> None:
        self.output = Path(output).absolute()
        self.path = lock_path(self.output)
        self.holder = _me(uuid.uuid4().hex)
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @property
    def run_id(self) -> str:
        return self.holder.run_id

    def acquire(self) -> OutputLock:
        """Take the lock, taking over a stale one; a live holder is a one-line error."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._take()
        except OSError as exc:
            problem = f"cannot write output ({exc.strerror or exc})"
            raise TilesegError(self.output, problem) from None
        self._beat = threading.Thread(target=self._heartbeat, name="tileseg-lock", daemon=True)
        self._beat.start()
        return self

    def _take(self) -> None:
        while not _create(self.path, self.holder):
            holder = _read(self.path)
            if holder is None and not self.path.exists():
                continue  # released meanwhile: try again
            if holder is not None and not _stale(self.path, holder):
                raise TilesegError(
                    self.output,
                    f"in use by another tileseg run ({holder.describe()}; lock {self.path}): "
                    "wait for it to finish, or stop it, then give this command again",
                )
            _break(self.path, holder)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still this run's."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        current = _read(self.path)
        if current is not None and current.run_id == self.run_id:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError:  # gone: taken over as stale; tasks find out by check_owner
                return


def claim_output(output: str | os.PathLike[str], run_id: str) -> None:
    """Name ``run_id`` as the output's owner (atomically), so that tasks of any earlier run
    that are still running stop writing into it."""
    owner = Path(output) / OWNER_FILE
    owner.parent.mkdir(parents=True, exist_ok=True)
    tmp = owner.with_name(f".owner.{run_id}.tmp")
    tmp.write_text(run_id)
    tmp.replace(owner)


def is_owner(output: str | os.PathLike[str], run_id: str) -> bool:
    """Whether the output names run ``run_id`` as its owner."""
    try:
        return (Path(output) / OWNER_FILE).read_text() == run_id
    except (FileNotFoundError, NotADirectoryError):
        return False


def check_owner(output: str | os.PathLike[str], run_id: str) -> None:
    """Raise :class:`TakenOver` unless the output still belongs to run ``run_id`` (an empty
    id checks nothing)."""
    if run_id and not is_owner(output, run_id):
        raise TakenOver(
            output,
            "was taken over by another tileseg run while this one was running: this run "
            "stopped without writing into it",
        )


def _me(run_id: str) -> LockHolder:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers with an arbitrary uid)
        user = str(os.getuid())
    return LockHolder(
        run_id=run_id,
        user=user,
        host=socket.gethostname(),
        pid=os.getpid(),
        process_started=psutil.Process().create_time(),
        started=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )


def _create(path: Path, holder: LockHolder) -> bool:
    """Create the lock file whole or not at all: written aside, then hard-linked into place
    (``link`` fails if the name exists, atomically, also on NFS)."""
    tmp = path.with_name(f"{path.name}.{holder.run_id}.tmp")
    tmp.write_text(json.dumps(asdict(holder)))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _read(path: Path) -> LockHolder | None:
    """The holder named in a lock file; None when it is gone or not a lock of ours."""
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return LockHolder(**data)
    except (FileNotFoundError, ValueError, TypeError):
        return None


def _stale(path: Path, holder: LockHolder) -> bool:
    if holder.host == socket.gethostname():
        try:
            started = psutil.Process(holder.pid).create_time()
        except psutil.NoSuchProcess:
            return True
        return abs(started - holder.process_started) > 1.0  # the pid was reused
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return True
    return age > float(os.environ.get("TILESEG_LOCK_STALE_SECONDS", STALE_SECONDS))


def _break(path: Path, stale: LockHolder | None) -> None:
    """Remove a stale lock, unless another run took it over meanwhile: one run at a time may
    break it (an exclusive take-over file), and only the holder found stale is removed."""
    breaker = path.with_name(f"{path.name}.break")
    try:
        fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            if time.time() - breaker.stat().st_mtime > _BREAK_STALE_SECONDS:
                breaker.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        time.sleep(0.05)
        return
    os.close(fd)
    try:
        current = _read(path)
        if stale is None:  # an unreadable file, not a lock of ours: removed if still so
            remove = current is None
        else:  # removed only if it still names the holder found stale
            remove = current is not None and current.run_id == stale.run_id
        if remove:
            path.unlink(missing_ok=True)
    finally:
        breaker.unlink(missing_ok=True)
