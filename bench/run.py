"""End-to-end throughput and memory of ``tileseg segment`` against the raw model.

In one run:

1. ``segment``: ``tileseg segment`` on a generated N x N slide (tiled pyramidal OME-TIFF), in a
   child process; its wall time and peak RSS.
2. ``raw``: the bare model forward on the same number of tiles of the same window size and
   batch size, in a child process (the ceiling: no reading, no normalisation, no writing).
3. ``rss``: peak RSS of ``segment`` on N x N and on 2N x 2N (4x the pixels) with a cheap model
   of the same geometry, to show memory does not grow with the image.

Usage: ``python bench/run.py [--size 8192] [--device cpu] [--out bench/results]``.
Prints a Markdown table and writes ``<out>/bench-<size>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(args: list[str]) -> tuple[dict, float, float]:
    """Run ``python -c`` child code; returns (its JSON answer, wall seconds, peak RSS MiB)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, check=False, cwd=HERE.parent
    )
    wall = time.perf_counter() - t
    if proc.returncode:
        sys.exit(f"child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the max over all children so far: run the biggest last or
    # read the child's own figure, which it prints.
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    rss = answer.get("peak_rss_mib", max(peak, before) / 1024)
    return answer, wall, rss


SEGMENT = """
import json, resource, sys
from pipeline.config import SegmentOptions
from pipeline.segment import segment_image
src, dst, model, device, tile, batch, workers = sys.argv[1:8]
opts = SegmentOptions(model=model or None, device=device, tile=int(tile), batch_size=int(batch),
                      workers=int(workers), overwrite=True)
r = segment_image(src, dst, opts)
print(json.dumps({"seconds": r.seconds, "tiles": r.tiles, "timings": r.timings,
                  "window": r.record["geometry"]["window"], "shape": list(r.spatial_shape),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

RAW = """
import json, resource, sys, time
import numpy as np
import torch
from pipeline.inference import Predictor
from pipeline.models import ModelSpec, load_model
model, device, window, tiles, batch = sys.argv[1:6]
window, tiles, batch = int(window), int(tiles), int(batch)
predictor = Predictor.create(load_model(ModelSpec(model or None)), device=device)
cin = predictor.model.in_channels or 1
x = np.random.default_rng(0).random((batch, cin, window, window), dtype=np.float32)
predictor.logits(x[:1])  # warm-up
if predictor.device.type == "cuda":
    torch.cuda.synchronize()
t = time.perf_counter()
done = 0
while done < tiles:
    n = min(batch, tiles - done)
    y = predictor.logits(x[:n])
    done += n
if predictor.device.type == "cuda":
    torch.cuda.synchronize()
print(json.dumps({"seconds": time.perf_counter() - t, "tiles": tiles,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

CHEAP_MODEL = """
import sys
from pipeline.models import UNetConfig, save_unet, seeded_unet
save_unet(seeded_unet(UNetConfig(depth=4, width=2, padding="valid")), sys.argv[1])
print("{}")
"""

SLIDE = """
import sys
from pipeline.synthetic import SyntheticConfig, write_synthetic_slide
n = int(sys.argv[2])
write_synthetic_slide(sys.argv[1], shape=(n, n), config=SyntheticConfig(seed=1))
print("{}")
"""


def slide(out: Path, size: int) -> Path:
    path = out / f"bench-{size}.ome.tif"
    if not path.exists():
        print(f"generating {path} ...", file=sys.stderr, flush=True)
        child(["-c", SLIDE, str(path), str(size)])
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--model", default="", help="model file (default: the built-in default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tile", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--skip-rss", action="store_true", help="skip the 2N x 2N memory run")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    src = slide(out, a.size)

    common = [a.device, str(a.tile), str(a.batch_size), str(a.workers)]
    seg, seg_wall, seg_rss = child(
        ["-c", SEGMENT, str(src), str(out / "seg.zarr"), a.model, *common]
    )
    raw, _, raw_rss = child(
        ["-c", RAW, a.model, a.device, str(seg["window"][0]), str(seg["tiles"]), str(a.batch_size)]
    )
    mp = a.size * a.size / 1e6
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "device": a.device,
        "size": a.size,
        "tiles": seg["tiles"],
        "window": seg["window"],
        "batch_size": a.batch_size,
        "workers": a.workers,
        "segment_seconds": seg["seconds"],
        "segment_process_seconds": seg_wall,
        "segment_timings": seg["timings"],
        "raw_seconds": raw["seconds"],
        "segment_mp_per_s": mp / seg["seconds"],
        "raw_mp_per_s": mp / raw["seconds"],
        "ratio": raw["seconds"] / seg["seconds"],
        "segment_peak_rss_mib": seg_rss,
        "raw_peak_rss_mib": raw_rss,
    }
    if not a.skip_rss:
        cheap = out / "cheap.safetensors"
        child(["-c", CHEAP_MODEL, str(cheap)])
        rss = {}
        for size in (a.size, 2 * a.size):
            ans, _, peak = child(
                ["-c", SEGMENT, str(slide(out, size)), str(out / f"rss-{size}.zarr"),
                 str(cheap), *common]
            )  # fmt: skip
            rss[size] = {"peak_rss_mib": peak, "seconds": ans["seconds"]}
        result["rss"] = rss
        result["rss_ratio_4x_pixels"] = (
            rss[2 * a.size]["peak_rss_mib"] / rss[a.size]["peak_rss_mib"]
        )
    (out / f"bench-{a.size}-{a.device}.json").write_text(json.dumps(result, indent=2))
    print(f"| {result['machine']} | {a.device} | {a.size}² | {seg['tiles']} tiles "
          f"| raw {result['raw_mp_per_s']:.2f} MP/s | segment {result['segment_mp_per_s']:.2f} "
          f"MP/s | ratio {result['ratio']:.3f} | RSS {seg_rss:.0f} MiB |")  # fmt: skip
    if "rss" in result:
        print(f"peak RSS {a.size}²: {result['rss'][a.size]['peak_rss_mib']:.0f} MiB, "
              f"{2 * a.size}²: {result['rss'][2 * a.size]['peak_rss_mib']:.0f} MiB, "
              f"ratio {result['rss_ratio_4x_pixels']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
