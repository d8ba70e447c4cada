"""Keeping freed memory in the process for CPU inference (glibc's malloc).

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap``
and hands it back to the kernel on ``free``. A U-Net forward on the CPU allocates and frees
gigabytes of activations, each of them above that threshold, so every forward page-faults all
of them in again: 1.5 million faults per batch of four 1116² windows, with
the kernel's time (zeroing pages) as large as the convolutions' (bench/README.md). With mmap
switched off for the heap and trimming off, freed activations stay in the heap and the next
forward reuses them: the same forward takes about half the time. Peak memory grows by what the
heap loses to fragmentation (0.5-1 GiB for batches of four 1116² windows, the same at any image
size), and the process keeps its peak until it exits.

Only the main heap can keep them: glibc gives each further thread an arena of its own, which
maps any block over 64 MiB afresh whatever the settings. So a local CPU run with one task at a
time runs it in the calling thread (``pipeline/runtime/execution.py``), the main thread for
``tileseg``
and ``tileseg demo``. Processes whose tasks run in other threads (Dask workers on CPUs) can
put every thread on the main heap by starting with ``MALLOC_ARENA_MAX=1`` in their environment
(glibc reads it once, before a second arena exists; too late for ``mallopt`` here): the local
clusters of ``flows/cluster.py`` start their CPU workers so.

Process-wide and applied once, when a CPU predictor is created or training runs on the CPU.
``TILESEG_KEEP_FREED_MEMORY=0`` leaves glibc's defaults. Other C libraries are left alone.
Results do not change: this only decides where the allocator takes its memory from.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading

__all__ = ["heap_hint", "keep_freed_memory", "off_main_heap"]

ENV = "TILESEG_KEEP_FREED_MEMORY"
# mallopt(3) parameters: glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_lock = threading.Lock()
_state: bool | None = None  # None: not tried yet


def keep_freed_memory() -> bool:
    """Keep freed memory in the heap from now on (glibc only; idempotent). Returns whether
    the process now keeps it."""
    global _state
    with _lock:
        if _state is None:
            _state = _apply()
        return _state


def off_main_heap() -> bool:
    """Whether the calling thread loses what :func:`keep_freed_memory` keeps: the process keeps
    freed memory (glibc, asked for once), but this thread has an arena of its own. That is any
    thread but the main one, unless every thread shares the main heap (``MALLOC_ARENA_MAX=1``,
    or its glibc tunable, in the environment the process started with)."""
    if not keep_freed_memory() or threading.current_thread() is threading.main_thread():
        return False
    environ = _startup_environ()
    tunables = environ.get("GLIBC_TUNABLES", "").split(":")
    shared = environ.get("MALLOC_ARENA_MAX", "").strip() == "1" or any(
        t.strip() == "glibc.malloc.arena_max=1" for t in tunables
    )
    return not shared


@functools.cache
def _startup_environ() -> dict[str, str]:
    """The environment glibc read: the one the process was started with. ``os.environ`` may
    have changed since (Dask's nanny sets its workers' variables in its own process)."""
    try:
        with open("/proc/self/environ", "rb") as f:
            entries = f.read().split(b"\0")
    except OSError:
        return dict(os.environ)
    pairs = (entry.decode(errors="replace").partition("=") for entry in entries if entry)
    return {name: value for name, _, value in pairs}


def heap_hint(tasks: int) -> str:
    """What to say when ``tasks`` inference tasks ran :func:`off_main_heap`."""
    return (
        f"tileseg: hint: {tasks} inference task(s) ran their CPU forward in a thread with a heap "
        "of its own, which maps its memory afresh at every batch (1.7x slower in "
        "bench/README.md): start the Dask workers (or tileseg) with MALLOC_ARENA_MAX=1 in "
        "their environment"
    )


def _apply() -> bool:
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (glibc's mallopt, not another libc's)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # -1 is SIZE_MAX to glibc's trim threshold: never give the top of the heap back.
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, -1))
