"""tileseg's benchmark suite: every part in one run, each step in its own child process.

1. ``throughput``: ``tileseg segment`` (``segment_image``) on a generated N x N slide (tiled
   pyramidal OME-TIFF) against the bare model forward on the same number of tiles of the same
   window and batch size (the ceiling: no reading, normalisation or writing), and their ratio.
2. ``host``: ``throughput`` again with a model that costs next to nothing (one 1x1 convolution
   declaring the halo and alignment of the model in use): what the pipeline's own work (reading,
   normalising, writing, the pyramid) allows on this machine, the ceiling for any faster model
   or device (``--skip-host``).
3. ``rss``: peak memory of ``segment`` on N x N and on 2N x 2N (4x the pixels) with a cheap
   model of the same geometry and tasks of the same structure (one batch each), then on
   2N x 2N with the defaults: how memory grows with the image (``--skip-rss``).
4. ``monai``: MONAI's ``sliding_window_inference`` (overlap 0.25, gaussian) against tileseg on
   the same 'same'-padded model and a --monai-size image: time, peak memory, deviation from one
   whole-image forward (``bench/monai_compare.py``; skipped when monai is not installed).
5. ``tissue``: ``segment`` with ``tissue="otsu"`` on --tissue-size slides where tissue covers
   a share f of 0.25, 0.5 and 1 of the area: seconds relative to f = 1 (``--skip-tissue``).

Peak memory is each child's own peak RSS and, on CUDA, ``torch.cuda.max_memory_allocated``.
Usage: ``python bench/run.py [--size 8192] [--device cpu] [--out bench/results]``.
Prints a summary table per part and writes ``<out>/bench-<size>-<device>.json``, after every part.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import monai_compare
import tissue_fraction
from children import SEGMENT, ChildError, run_child

HERE = Path(__file__).resolve().parent

RAW = """
import json, sys, time
import numpy as np
import torch
from pipeline.models.inference import Predictor
from pipeline.models import ModelSpec, load_model
model, device, window, tiles, batch = sys.argv[1:6]
window, tiles, batch = int(window), int(tiles), int(batch)
predictor = Predictor.create(load_model(ModelSpec(model or None)), device=device)
cin = predictor.model.in_channels or 1
x = np.random.default_rng(0).random((batch, cin, window, window), dtype=np.float32)
predictor.logits(x)  # warm-up at the timed shape (cuDNN autotunes each new shape)
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
print(json.dumps({"seconds": time.perf_counter() - t, "tiles": tiles, **peak_memory()}))
"""

NULL_MODEL = """
import json, sys
import torch
from pipeline.models import ModelSpec, load_model
geometry = load_model(ModelSpec(sys.argv[2] or None)).geometry
class Null(torch.nn.Module):  # 'same' padded: the declared halo is pure context
    def __init__(self, ndim: int) -> None:
        super().__init__()
        self.head = (torch.nn.Conv2d if ndim == 2 else torch.nn.Conv3d)(1, 2, 1)
    def forward(self, x):
        return self.head(x)
meta = {"halo": max(geometry.halo), "align": max(geometry.align), "ndim": geometry.ndim,
        "in_channels": 1, "classes": 2}
example = torch.zeros((1, 1) + (16,) * geometry.ndim)
torch.jit.save(torch.jit.trace(Null(geometry.ndim), example), sys.argv[1],
               _extra_files={"tileseg.json": json.dumps(meta)})
print(json.dumps(meta))
"""

CHEAP_MODEL = """
import sys
from pipeline.models import UNetConfig, save_unet, seeded_unet
save_unet(seeded_unet(UNetConfig(depth=4, width=2, padding="valid")), sys.argv[1])
print("{}")
"""

SLIDE = """
import os, sys
from pipeline.synthetic.slides import SyntheticConfig, write_synthetic_slide
n = int(sys.argv[2])
write_synthetic_slide(sys.argv[1], shape=(n, n), config=SyntheticConfig(seed=1),
                      workers=os.cpu_count())
print("{}")
"""


def slide(out: Path, size: int) -> Path:
    path = out / f"bench-{size}.ome.tif"
    if not path.exists():
        print(f"generating {path} ...", file=sys.stderr, flush=True)
        run_child(SLIDE, str(path), str(size))
    return path


def throughput(a: argparse.Namespace, out: Path) -> dict:
    """``segment`` on the N x N slide and the bare forward on as many tiles, ``--repeats``
    times, every second pair in the other order (the first segment run says the window, tile
    count and batch size). A shared machine's slow spells land on one child or the other, so
    the figure is the median of the pairs' ratios, and the pair that gave it is reported."""
    common = [a.device, str(a.tile), str(a.batch_size), str(a.workers), "none"]
    mp = a.size * a.size / 1e6
    pairs: list[dict] = []
    plan: list[str] = []

    def segment() -> dict:
        ans, wall = run_child(SEGMENT, str(slide(out, a.size)), str(out / "seg.zarr"), a.model,
                              *common)  # fmt: skip
        plan[:] = [str(ans["window"][0]), str(ans["tiles"]), str(ans["batch_size"])]
        return {**ans, "process_seconds": wall, "mp_per_s": mp / ans["seconds"]}

    def raw() -> dict:
        ans, _ = run_child(RAW, a.model, a.device, *plan)
        return {**ans, "mp_per_s": mp / ans["seconds"]}

    for i in range(max(1, a.repeats)):
        if i % 2 == 0:
            seg = segment()
            bare = raw()
        else:
            bare = raw()
            seg = segment()
        ratio = bare["seconds"] / seg["seconds"]  # = segment throughput / raw throughput
        pairs.append({"segment": seg, "raw": bare, "ratio": ratio})
    median = sorted(pairs, key=lambda pair: pair["ratio"])[(len(pairs) - 1) // 2]
    seg = median["segment"]
    return {
        "size": a.size, "tiles": seg["tiles"], "window": seg["window"],
        "batch_size": seg["batch_size"], **median,
        "ratios": [pair["ratio"] for pair in pairs],
        "seconds": {k: [pair[k]["seconds"] for pair in pairs] for k in ("segment", "raw")},
    }  # fmt: skip


def rss_vs_size(a: argparse.Namespace, out: Path) -> dict:
    """``segment`` with a cheap model of the same geometry on N x N and 2N x 2N.

    Both with one batch per task, so that only their size differs (by default a small image's
    tasks hold one batch each, ``MIN_TASKS``, and a large one's up to four). The 2N x 2N slide
    is run once more with the defaults: the peak a large slide really has.
    ``--repeats`` rounds of the three (one run's peak moves by tens of MiB from one run to the
    next): each figure is the median of its runs, the ratio that of the two medians."""
    cheap = out / "cheap.safetensors"
    run_child(CHEAP_MODEL, str(cheap))
    common = [a.device, str(a.tile), str(a.batch_size), str(a.workers), "none"]
    n, big = a.size, 2 * a.size
    cases = ((f"{n}²", n, ["1"]), (f"{big}²", big, ["1"]), (f"{big}², defaults", big, []))
    rounds: dict[str, list[dict]] = {name: [] for name, _, _ in cases}
    for _ in range(max(1, a.repeats)):
        for name, size, per_task in cases:
            ans, _ = run_child(SEGMENT, str(slide(out, size)), str(out / f"rss-{size}.zarr"),
                               str(cheap), *common, *per_task)  # fmt: skip
            keep = ("peak", "seconds", "batches_per_task")
            rounds[name].append({k: v for k, v in ans.items() if k.startswith(keep)})
    runs = {}
    for name, answers in rounds.items():
        medians = {k: statistics.median(x[k] for x in answers)
                   for k in answers[0] if k.startswith(("peak", "seconds"))}  # fmt: skip
        runs[name] = {**answers[0], **medians}
        runs[name]["all_peak_rss_mib"] = [x["peak_rss_mib"] for x in answers]
    ratio = runs[f"{big}²"]["peak_rss_mib"] / runs[f"{n}²"]["peak_rss_mib"]
    return {"runs": runs, "ratio_4x_pixels": ratio}


def monai(a: argparse.Namespace, out: Path) -> dict:
    try:
        run_child("import monai.inferers\nprint('{}')")
    except ChildError:
        return {"skipped": "monai is not importable (pip install -c constraints.txt monai)"}
    size = a.monai_size or min(a.size, 2048)
    return monai_compare.compare(out / "monai", size=size, tile=a.tile, overlap=0.25,
                                 batch_size=int(a.batch_size), device=a.device)  # fmt: skip


def tissue(a: argparse.Namespace, out: Path) -> dict:
    return tissue_fraction.time_vs_tissue(
        out, size=a.tissue_size, model=a.model, device=a.device, tile=a.tile,
        batch_size=a.batch_size, workers=a.workers,
    )  # fmt: skip


def host(a: argparse.Namespace, out: Path) -> dict:
    """``throughput`` with a model whose forward is next to free: the pipeline's own cost."""
    null = out / "null.pt"
    meta, _ = run_child(NULL_MODEL, str(null), a.model)
    t = throughput(argparse.Namespace(**{**vars(a), "model": str(null)}), out)
    return {"model": {"kind": "one 1x1 convolution", **meta}, **t}


def summary(result: dict) -> list[str]:
    """A small Markdown table per part."""
    lines = [f"# {result['machine']}, device {result['device']}"]
    t = result.get("throughput")
    if t:
        runs = (("raw model", t["raw"]), ("segment", t["segment"]))
        cuda = any("peak_cuda_mib" in r for _, r in runs)
        lines += [
            "", f"## raw model vs `tileseg segment` ({t['size']}², {t['tiles']} tiles, "
            f"window {t['window'][0]}²)", "",
            "| | seconds | MP/s | peak RSS MiB |" + (" peak CUDA MiB |" if cuda else ""),
            "| --- | --- | --- | --- |" + (" --- |" if cuda else ""),
            *(f"| {name} | {r['seconds']:.2f} | {r['mp_per_s']:.3f} | {r['peak_rss_mib']:.0f} |"
              + (f" {_cuda(r)} |" if cuda else "") for name, r in runs),
            f"ratio (segment throughput / raw): **{t['ratio']:.3f}**" + _spread(t),
        ]  # fmt: skip
    for part, title, rows in (
        ("host", "the pipeline's own cost (a model next to free)", _host_table),
        ("rss", "peak memory vs image size (cheap model)", _rss_table),
        ("monai", "MONAI sliding_window_inference (overlap 0.25, gaussian)", _monai_table),
        ("tissue", "time vs tissue fraction (tissue=otsu)", tissue_fraction.table),
    ):
        r = result.get(part)
        if r is None:
            continue
        lines += ["", f"## {title}", ""]
        lines += [f"skipped: {r['skipped']}"] if "skipped" in r else rows(r)
    return lines


def _spread(t: dict) -> str:
    """The other pairs' ratios, when there were several (the table shows the median pair)."""
    ratios = t.get("ratios", [])
    if len(ratios) < 2:
        return ""
    return f", the median of {len(ratios)} pairs: " + ", ".join(f"{r:.3f}" for r in ratios)


def _cuda(r: dict) -> str:
    return f"{r['peak_cuda_mib']:.0f}" if "peak_cuda_mib" in r else "-"


def _host_table(r: dict) -> list[str]:
    seg, raw = r["segment"], r["raw"]
    timings = seg["timings"]
    return [
        f"{r['size']}², {r['tiles']} tiles of {r['window'][0]}², batch {r['batch_size']}", "",
        "| | seconds | MP/s |", "| --- | --- | --- |",
        f"| 1x1-convolution forward alone | {raw['seconds']:.2f} | {raw['mp_per_s']:.1f} |",
        f"| `tileseg segment` with it | {seg['seconds']:.2f} | **{seg['mp_per_s']:.1f}** |",
        "", "inside the segment run (seconds): " + ", ".join(
            f"{k} {timings[k]:.2f}"
            for k in ("read", "infer", "write", "stall", "pyramid_wall", "overview_wall")
            if k in timings
        ),
    ]  # fmt: skip


def _rss_table(r: dict) -> list[str]:
    runs = list(r["runs"].values())
    lines = [
        "| | " + " | ".join(r["runs"]) + " |",
        "| --- | --- | --- | --- |",
        "| batches per task | " + " | ".join(str(x["batches_per_task"]) for x in runs) + " |",
        "| peak RSS MiB | " + " | ".join(_peaks(x) for x in runs) + " |",
        "| seconds | " + " | ".join(f"{x['seconds']:.1f}" for x in runs) + " |",
        "", f"ratio for 4x the pixels, same task structure: **{r['ratio_4x_pixels']:.3f}**",
    ]  # fmt: skip
    if any("peak_cuda_mib" in x for x in runs):
        lines.insert(4, "| peak CUDA MiB | " + " | ".join(_cuda(x) for x in runs) + " |")
    return lines


def _peaks(run: dict) -> str:
    """The median peak, and every run's when there were several."""
    peaks = run.get("all_peak_rss_mib", [])
    spread = f" ({', '.join(f'{p:.0f}' for p in peaks)})" if len(peaks) > 1 else ""
    return f"{run['peak_rss_mib']:.0f}{spread}"


def _monai_table(r: dict) -> list[str]:
    return [f"{r['size']}², roi/tile {r['tile']}, batch {r['batch_size']}, "
            f"precision {r['tileseg']['precision']}", "", *monai_compare.table(r)]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--model", default="", help="model file (default: the built-in default)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (every part)")
    p.add_argument("--tile", type=int, default=1024)
    p.add_argument("--batch-size", default="4", help="tiles per forward, or auto")
    p.add_argument("--workers", type=int, default=0, help="local tasks in parallel (0: auto)")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--skip-rss", action="store_true", help="skip the 2N x 2N memory run")
    p.add_argument("--skip-monai", action="store_true", help="skip the MONAI comparison")
    p.add_argument("--monai-size", type=int, help="MONAI comparison image side (min(size, 2048))")
    p.add_argument("--skip-tissue", action="store_true", help="skip time vs tissue fraction")
    p.add_argument("--tissue-size", type=int, default=4096, help="tissue-fraction slide side")
    p.add_argument("--skip-host", action="store_true", help="skip the next-to-free model run")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="rounds of the throughput, host and rss parts (their medians)",
    )
    a = p.parse_args()
    out = Path(a.out).resolve()  # children run in the repository root
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "device": a.device,
        "options": {k: v for k, v in vars(a).items() if k != "out"},
    }
    path = out / f"bench-{a.size}-{a.device.replace(':', '')}.json"
    parts: list[tuple[str, Callable[[argparse.Namespace, Path], dict], str | None]] = [
        ("throughput", throughput, None),
        ("host", host, "--skip-host" if a.skip_host else None),
        ("rss", rss_vs_size, "--skip-rss" if a.skip_rss else None),
        ("monai", monai, "--skip-monai" if a.skip_monai else None),
        ("tissue", tissue, "--skip-tissue" if a.skip_tissue else None),
    ]
    for name, run, skipped_by in parts:
        if skipped_by:
            result[name] = {"skipped": skipped_by}
            continue
        print(f"== {name} ...", file=sys.stderr, flush=True)
        try:
            result[name] = run(a, out)
        except ChildError as exc:
            path.write_text(json.dumps(result, indent=2))
            sys.exit(f"{name}: {exc}")
        path.write_text(json.dumps(result, indent=2))  # a later failure keeps what is done
        if name == "throughput":
            a.batch_size = str(result[name]["batch_size"])  # "auto" resolved, for MONAI too
        if name == "monai" and "skipped" in result[name]:
            print(f"   skipped: {result[name]['skipped']}", file=sys.stderr, flush=True)
    print("\n".join(["", *summary(result), "", f"results: {path}"]))


if __name__ == "__main__":
    main()
