"""Freed memory kept in the heap for CPU inference: fewer page faults, same results.

Each case runs in a fresh interpreter: the policy is process-wide and cannot be undone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc's malloc policy (Linux only)"
)

# 64 MiB blocks, above glibc's largest mmap threshold (32 MiB): by default each one is a fresh
# mapping, page-faulted in page by page, like a forward's activations. Straight from malloc:
# numpy asks for transparent huge pages, and torch's aligned blocks fragment the heap a little.
FAULTS = """
import ctypes, json, resource
from pipeline.runtime import heap
{setup}
kept = heap._state  # None: never asked for
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def block():
    p = libc.malloc(1 << 26)
    libc.memset(p, 1, 1 << 26)
    libc.free(p)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block()
before = faults()
for _ in range(8):
    block()
print(json.dumps({{"kept": kept, "faults": faults() - before}}))
"""

PREDICTOR = """
from pipeline.models import ModelSpec
from pipeline.runtime.worker import RunSettings, cached_predictor
cached_predictor(ModelSpec(None), RunSettings(device="cpu"))
"""


def child(setup: str, *, keep: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TILESEG_KEEP_FREED_MEMORY"}
    if keep is not None:
        env["TILESEG_KEEP_FREED_MEMORY"] = keep
    out = subprocess.run(
        [sys.executable, "-c", FAULTS.format(setup=setup)],
        capture_output=True, text=True, env=env, check=True, timeout=120,
    )  # fmt: skip
    return json.loads(out.stdout)


def test_kept_freed_memory_is_reused_without_page_faults():
    default = child("")
    kept = child("heap.keep_freed_memory()")
    assert default["kept"] is None and kept["kept"] is True
    # Eight 64 MiB blocks: 131072 faults of 4 KiB pages by default (fewer with transparent
    # huge pages), next to none once the first one's memory stays in the heap.
    assert kept["faults"] * 4 < default["faults"]


@pytest.mark.slow  # two child processes, each importing torch and building a predictor
def test_a_cpu_predictor_keeps_it_and_the_environment_opts_out():
    with_predictor = child(PREDICTOR)
    assert with_predictor["kept"] is True
    opted_out = child(PREDICTOR, keep="0")
    assert opted_out["kept"] is False
    assert opted_out["faults"] > 4 * with_predictor["faults"]


def test_a_one_worker_local_run_runs_its_tasks_in_the_calling_thread():
    """Only the main thread's heap keeps freed activations: one task at a time runs there, in
    order; several run in Dask's threads."""
    import threading

    from pipeline.runtime.execution import run_tasks

    def ident(i: int) -> tuple[int, int]:
        return i, threading.get_ident()

    here = threading.get_ident()
    assert run_tasks(ident, [0, 1, 2], workers=1) == [(0, here), (1, here), (2, here)]
    assert all(t != here for _, t in run_tasks(ident, [0, 1, 2], workers=2))
