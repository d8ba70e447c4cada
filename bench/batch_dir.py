"""A directory run against one ``tileseg segment`` per slide and the bare forward, in one run.

Eight generated slides of 2048² (``--slides``, ``--size``) in ``bench/results/batch_dir/``:

- ``tileseg batch`` on the directory, with the default local cluster and with ``cluster: none``
  (the slides in this process), each a fresh process, wall time from start to exit;
- ``tileseg segment`` once per slide, a fresh process each (what a shell loop does);
- the bare model forward on as many tiles of the same window and batch size, in one warm
  process (no start-up, no reading or writing): the ceiling.

Each figure is the median of ``--repeats`` rounds, the steps of a round taken in turns.
Throughput is the slides' pixels over the time; the ratios are against the bare forward.

Usage: ``python bench/batch_dir.py [--slides 8] [--size 2048] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from children import ROOT, run_child
from run import RAW

SLIDES = """
import os, sys
from pipeline.synthetic.slides import SyntheticConfig, write_synthetic_slide
folder, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    write_synthetic_slide(os.path.join(folder, f"slide{i}.ome.tif"), shape=(size, size),
                          config=SyntheticConfig(seed=i), workers=os.cpu_count())
print("{}")
"""


def timed(argv: list[str]) -> float:
    """Wall seconds of one ``tileseg`` process, from start to exit."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", *argv], capture_output=True, text=True, cwd=ROOT
    )
    if proc.returncode:
        raise RuntimeError(f"tileseg {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def batch(slides: Path, out: Path, cluster: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    config = out.parent / f"{cluster}.yaml"
    config.write_text(
        f"segment: {{device: cpu}}\nrun: {{qc: false}}\ncluster: {{type: {cluster}}}\n"
    )
    return timed(["batch", str(slides), str(out), "--config", str(config), "--no-progress"])


def segments(slides: Path, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    total = 0.0
    for slide in sorted(slides.glob("*.ome.tif")):
        dst = out / slide.name.replace(".ome.tif", ".zarr")
        total += timed(["segment", str(slide), str(dst), "--device", "cpu", "--no-progress"])
    return total


def plan_of(out: Path) -> tuple[int, int, int]:
    """Window, tiles per slide and batch size of a finished output."""
    record = json.loads((next(out.glob("*.zarr")) / ".zattrs").read_text())["tileseg"]
    window = record["geometry"]["window"][0]
    tiles = record["timings"]["tiles_inferred"]
    return window, tiles, record["run"]["batch_size"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--slides", type=int, default=8)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    work = ROOT / "bench" / "results" / "batch_dir"
    slides = work / f"slides-{a.slides}x{a.size}"
    if not slides.is_dir():
        slides.mkdir(parents=True)
        run_child(SLIDES, str(slides), str(a.slides), str(a.size))
    steps = {
        "batch (local cluster)": lambda: batch(slides, work / "out-local", "local"),
        "batch (cluster: none)": lambda: batch(slides, work / "out-none", "none"),
        "segment per slide": lambda: segments(slides, work / "out-segment"),
    }
    times: dict[str, list[float]] = {name: [] for name in (*steps, "bare forward")}
    for i in range(a.repeats):
        order = list(steps) if i % 2 == 0 else list(reversed(steps))
        for name in order:
            times[name].append(steps[name]())
        window, tiles, batch_size = plan_of(work / "out-segment")
        answer, _ = run_child(RAW, "", "cpu", str(window), str(tiles * a.slides), str(batch_size))
        times["bare forward"].append(answer["seconds"])
    megapixels = a.slides * a.size * a.size / 1e6
    bare = statistics.median(times["bare forward"])
    result = {"slides": a.slides, "size": a.size, "cores": os.cpu_count(), "seconds": times}
    print(json.dumps(result))
    print(f"{a.slides} slides of {a.size}², {megapixels:.1f} MP, median of {a.repeats}:")
    for name, values in times.items():
        t = statistics.median(values)
        print(f"  {name:24s} {t:7.1f} s  {megapixels / t:5.2f} MP/s  {bare / t:5.2f}x bare "
              f"(runs: {', '.join(f'{v:.1f}' for v in values)})")  # fmt: skip
    # Within a round the steps shared the machine's load: their ratios say more than seconds.
    for name in steps:
        ratios = [t / b for t, b in zip(times[name], times["bare forward"], strict=True)]
        print(f"  {name:24s} / bare forward per round: median {statistics.median(ratios):.2f} "
              f"({min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
