"""tileseg on Dask workers started elsewhere, against the same run on this machine alone.

Workers that ``dask worker`` or dask-jobqueue start get Dask's nanny defaults: one OpenMP and
BLAS thread, and glibc's per-thread arenas. An inference task then sets its thread's forward
to the worker's share of the cores (``pipeline/runtime/cores.py``); the arenas cannot be changed
once
a process runs, so a task's CPU forward maps and page-faults its activations in again at every
batch unless the worker was started with ``MALLOC_ARENA_MAX=1`` (``pipeline/runtime/heap.py``; the
SLURM clusters tileseg starts export it).

Three runs of the default model on one generated --size slide, each timed warm (its second
run: the model loaded, the worker processes started): ``local`` (``segment_image`` in this
process, no cluster), ``dask-defaults`` (a LocalCluster of one worker process of one thread,
as ``dask worker --nworkers 1 --nthreads 1`` starts it) and ``dask-main-heap`` (the same,
started with ``MALLOC_ARENA_MAX=1``).

Usage: ``python bench/dask_workers.py [--size 4096]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from children import run_child

HERE = Path(__file__).resolve().parent

SETUP = """
import sys, tifffile
from pipeline.synthetic.render import SyntheticConfig, synthetic_pair
image, _ = synthetic_pair((int(sys.argv[2]),) * 2, config=SyntheticConfig(seed=3))
tifffile.imwrite(sys.argv[1], image, tile=(256, 256), compression="zlib")
print("{}")
"""

RUN = """
import json, sys, time
import dask
src, dst, mode = sys.argv[1:4]
from pipeline.config import SegmentOptions
from pipeline.engine.driver import segment_image
def timed(scheduler=None):
    opts = SegmentOptions(device="cpu", overwrite=True, scheduler=scheduler)
    segment_image(src, dst + "-warm-up", opts)
    t = time.perf_counter()
    segment_image(src, dst, opts)
    return time.perf_counter() - t
if mode == "local":
    seconds, threads = timed(), None
else:
    from distributed import Client, LocalCluster
    import torch
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ"))
    if mode == "dask-main-heap":
        environ["MALLOC_ARENA_MAX"] = "1"
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}), LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
        silence_logs=40,
    ) as cluster, Client(cluster, set_as_default=False) as client:
        seconds = timed(cluster.scheduler_address)
        threads = client.submit(torch.get_num_threads, pure=False).result()
print(json.dumps({"seconds": seconds, "forward_threads": threads, **peak_memory()}))
"""

MODES = ("local", "dask-defaults", "dask-main-heap")


def compare(out: Path, *, size: int) -> dict:
    out = out.resolve()  # children run in the repository root
    out.mkdir(parents=True, exist_ok=True)
    src = out / f"slide-{size}.tif"
    if not src.exists():
        run_child(SETUP, str(src), str(size))
    runs = {mode: run_child(RUN, str(src), str(out / f"{mode}.zarr"), mode)[0] for mode in MODES}
    return {"size": size, **runs}


def table(result: dict) -> list[str]:
    mp = result["size"] ** 2 / 1e6
    local = result["local"]["seconds"]
    lines = ["| run | seconds | MP/s | forward threads | vs local |", "| --- " * 5 + "|"]
    for mode in MODES:
        r = result[mode]
        threads = r["forward_threads"] or "-"
        lines.append(
            f"| {mode} | {r['seconds']:.2f} | {mp / r['seconds']:.2f} | {threads} |"
            f" {local / r['seconds']:.2f} |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--out", default=str(HERE / "results" / "dask-workers"))
    a = p.parse_args()
    result = compare(Path(a.out), size=a.size)
    (Path(a.out) / "compare.json").write_text(json.dumps(result, indent=2))
    print("\n".join(table(result)))


if __name__ == "__main__":
    main()
