"""One benchmark step per child process, so that its peak memory is its own.

A child is ``python -c CODE ARGS...`` run in the repository root; the last line it prints is its
JSON answer. :data:`PEAK` is prepended to every child's code: ``peak_memory()`` gives the
child's own peak RSS and, when it used CUDA, the peak of ``torch.cuda.max_memory_allocated``
(the parent's ``RUSAGE_CHILDREN`` is a maximum over all children so far, not per child).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PEAK = """
def peak_memory():
    import resource, sys
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        # several GPUs (one task thread each): the largest, which is what has to fit
        out["peak_cuda_mib"] = max(
            torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())
        ) / 2**20
    return out
"""


# ``segment_image`` on one slide: SRC DST MODEL DEVICE TILE BATCH WORKERS TISSUE [PER_TASK]
# (MODEL "" for the default, BATCH a number or auto, WORKERS 0 for auto, TISSUE
# none|otsu|triangle, PER_TASK batches per task, the default when not given).
SEGMENT = """
import json, shutil, sys
from pipeline.config import SegmentOptions
from pipeline.engine.driver import segment_image
from pipeline.models.inference import resolve_device
src, dst, model, device, tile, batch, workers, tissue = sys.argv[1:9]
per_task = int(sys.argv[9]) if len(sys.argv) > 9 else SegmentOptions().batches_per_task
opts = SegmentOptions(model=model or None, device=device, tile=int(tile),
                      batch_size=batch if batch == "auto" else int(batch),
                      workers=int(workers) or None, tissue=tissue, overwrite=True,
                      batches_per_task=per_task)
if resolve_device(device).type == "cuda":
    # Timed warm, like the raw forward: CUDA context, cuDNN autotuning and compilation are
    # paid once per worker process, not per slide.
    segment_image(src, dst + "-warm-up", opts)
# The last run's output is removed untimed: --overwrite's removal of it (which grows with the
# output's number of files) is not segmenting.
shutil.rmtree(dst, ignore_errors=True)
r = segment_image(src, dst, opts)
print(json.dumps({"seconds": r.seconds, "tiles": r.tiles, "timings": r.timings,
                  "tiles_inferred": r.timings["tiles_inferred"], "tissue": r.record["tissue"],
                  "batch_size": r.record["run"]["batch_size"],
                  "window": r.record["geometry"]["window"], "shape": list(r.spatial_shape),
                  "batches_per_task": r.record["run"]["batches_per_task"],
                  **peak_memory()}))
"""


class ChildError(RuntimeError):
    """A child process failed; the message holds the end of its stderr."""


def run_child(code: str, *args: str) -> tuple[dict, float]:
    """Run ``code`` with ``args`` in a child; returns (its JSON answer, wall seconds)."""
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", PEAK + code, *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    wall = time.perf_counter() - t
    if proc.returncode:
        raise ChildError(f"child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall
