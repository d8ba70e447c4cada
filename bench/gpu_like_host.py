"""The host side of a GPU run, on a machine without a GPU.

``segment_image`` with what a local CUDA run does on the host (two task threads, prefetch 2,
each batch's windows read and its tiles written by the I/O pool, the overview beside the tasks)
and a stand-in for the forward: a sleep of ``--gpu-seconds`` per batch under one lock (one GPU
runs one batch at a time), returning a label per pixel. ``--gpu-seconds 0`` gives what the host
allows whatever the GPU; a larger value, how much of a GPU-bound run is left over the GPU's own
time. Timed warm, the output removed untimed before each run. An emulation: the model, the
copies to and from the device and the GPU's own overlap are not in it (``bench/device/``
measures those on a GPU).

Usage: ``python bench/gpu_like_host.py [--size 8192] [--gpu-seconds 0.25] [--overview after]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from pipeline.config import SegmentOptions  # noqa: E402
from pipeline.engine import driver as seg  # noqa: E402
from pipeline.engine import tasks as blocks  # noqa: E402
from pipeline.models.inference import Prediction  # noqa: E402
from pipeline.runtime import worker  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=8192, help="side of the bench slide (run.py's)")
    p.add_argument("--gpu-seconds", type=float, default=0.25, help="per batch, one at a time")
    p.add_argument("--overview", choices=("after", "alongside"), default="alongside")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--json", help="also write every run's figures to this file")
    a = p.parse_args()
    out = Path(a.out)
    src = out / f"bench-{a.size}.ome.tif"
    if not src.exists():
        sys.exit(f"{src}: missing (python bench/run.py --size {a.size} writes it)")
    null = out / "null.pt"
    if not null.exists():
        sys.exit(f"{null}: missing (python bench/run.py writes it in its host part)")

    gpu = threading.Lock()
    forwards: list[tuple[float, float]] = []

    def forward(self, batch, x) -> Prediction:
        with gpu:
            t = time.perf_counter()
            time.sleep(a.gpu_seconds)
            forwards.append((t, time.perf_counter()))
        labels = np.ones((len(batch), *x.shape[2:]), np.uint8)
        return Prediction(labels, None, label_dtype=np.dtype(np.uint8))

    blocks._Block.infer = forward
    worker.parallel_io = lambda device: True
    seg.overview_alongside = lambda runtime: a.overview == "alongside"
    opts = SegmentOptions(
        model=str(null), device="cpu", tile=1024, batch_size=a.batch_size, overwrite=True,
        prefetch=2, workers=2,
    )  # fmt: skip
    dst = out / "gpu-like.zarr"
    seg.segment_image(src, dst, opts)  # warm: the model, the decoded-tile cache's first fill
    runs = []
    for _ in range(a.repeats):
        shutil.rmtree(dst, ignore_errors=True)
        forwards.clear()
        t = time.perf_counter()
        r = seg.segment_image(src, dst, opts)
        wall = time.perf_counter() - t
        gpu_time = sum(b - s for s, b in forwards)
        runs.append({
            "seconds": wall, "gpu": gpu_time,
            "before_first": forwards[0][0] - t, "after_last": t + wall - forwards[-1][1],
            "phases": {k: v for k, v in r.timings.items() if k.endswith("_wall")},
        })  # fmt: skip
    median = sorted(runs, key=lambda run: run["seconds"])[len(runs) // 2]
    mp = a.size * a.size / 1e6
    each = ", ".join(f"{run['seconds']:.2f}" for run in runs)
    print(
        f"{a.size}², overview {a.overview}, {a.gpu_seconds} s per batch: "
        f"median {median['seconds']:.3f} s ({mp / median['seconds']:.1f} MP/s) of "
        f"{len(runs)} ({each}); its GPU time "
        f"{median['gpu']:.2f} s (ratio {median['gpu'] / median['seconds']:.3f}), before the "
        f"first forward {median['before_first']:.3f} s, after the last "
        f"{median['after_last']:.3f} s; the spread: "
        f"{statistics.pstdev(r['seconds'] for r in runs):.3f} s"
    )
    over = [r["seconds"] - r["gpu"] for r in runs]
    print(f"over the GPU time: median {statistics.median(over):.3f} s "
          f"({min(over):.3f}-{max(over):.3f})")  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps(runs))
    phases = median["phases"]
    print("its phases (s): " + ", ".join(
        f"{k[:-5]} {v:.3f}" for k, v in phases.items() if v >= 0.001 and k != "total_wall"
    ))  # fmt: skip


if __name__ == "__main__":
    main()
