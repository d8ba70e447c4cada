"""The output lock: one holder at a time, stale locks taken over, never by two runs at once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.errors import TilesegError
from pipeline.output.lock import (
    LockHolder,
    OutputLock,
    TakenOver,
    check_owner,
    claim_output,
    lock_path,
)


def plant(output, **changes) -> LockHolder:
    """Write a lock file for ``output`` as another run would have."""
    holder = replace(OutputLock(output).holder, run_id="planted", **changes)
    lock_path(output).write_text(json.dumps(asdict(holder)))
    return holder


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_held_lock_refuses_a_second_run_naming_the_holder(tmp_path):
    out = tmp_path / "out.zarr"
    with OutputLock(out) as first:
        with pytest.raises(TilesegError, match="in use by another tileseg run") as caught:
            OutputLock(out).acquire()
        assert f"pid {os.getpid()}" in str(caught.value) and socket.gethostname() in str(
            caught.value
        )
        assert json.loads(lock_path(out).read_text())["run_id"] == first.run_id
    assert not lock_path(out).exists()  # released
    with OutputLock(out):  # and free again
        pass


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"pid": -1}, id="dead-pid"),
        pytest.param({"process_started": 1.0}, id="pid-reused"),
    ],
)
def test_a_lock_whose_holder_is_gone_on_this_host_is_taken_over(tmp_path, changes):
    out = tmp_path / "out.zarr"
    if changes.get("pid") == -1:
        changes = {"pid": dead_pid()}
    plant(out, **changes)
    with OutputLock(out) as lock:
        assert json.loads(lock_path(out).read_text())["run_id"] == lock.run_id


def test_a_lock_of_another_host_is_stale_only_once_its_heartbeat_stopped(tmp_path, monkeypatch):
    out = tmp_path / "out.zarr"
    plant(out, host="elsewhere.example", pid=1)
    with pytest.raises(TilesegError, match=r"elsewhere\.example"):
        OutputLock(out).acquire()  # touched just now: alive
    monkeypatch.setenv("TILESEG_LOCK_STALE_SECONDS", "60")
    old = time.time() - 61
    os.utime(lock_path(out), (old, old))
    with OutputLock(out) as lock:
        assert json.loads(lock_path(out).read_text())["run_id"] == lock.run_id


def test_an_unreadable_lock_file_is_taken_over(tmp_path):
    out = tmp_path / "out.zarr"
    lock_path(out).write_text("{not json")
    with OutputLock(out):
        pass


def test_the_holder_keeps_its_lock_fresh(tmp_path, monkeypatch):
    import pipeline.output.lock

    monkeypatch.setattr(pipeline.output.lock, "HEARTBEAT_SECONDS", 0.05)
    out = tmp_path / "out.zarr"
    with OutputLock(out):
        old = time.time() - 1000
        os.utime(lock_path(out), (old, old))
        time.sleep(0.3)
        assert time.time() - lock_path(out).stat().st_mtime < 5


@given(contenders=st.integers(2, 6), stale=st.booleans())
def test_contenders_for_one_lock_never_both_get_it(tmp_path_factory, contenders, stale):
    """However many runs go for a free or a stale lock at once, exactly one gets it."""
    out = tmp_path_factory.mktemp("race") / "out.zarr"
    if stale:
        plant(out, pid=dead_pid())
    start = threading.Barrier(contenders)
    won: list[OutputLock] = []
    refused: list[TilesegError] = []

    def contend() -> None:
        lock = OutputLock(out)
        start.wait()
        try:
            won.append(lock.acquire())
        except TilesegError as exc:
            refused.append(exc)

    threads = [threading.Thread(target=contend) for _ in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and len(refused) == contenders - 1
    assert json.loads(lock_path(out).read_text())["run_id"] == won[0].run_id
    won[0].release()


def test_tasks_of_a_run_whose_output_was_taken_over_stop(tmp_path):
    out = tmp_path / "out.zarr"
    out.mkdir()
    claim_output(out, "first")
    check_owner(out, "first")
    claim_output(out, "second")
    with pytest.raises(TakenOver, match="taken over by another tileseg run"):
        check_owner(out, "first")
    check_owner(out, "second")
