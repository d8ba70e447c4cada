"""tileseg's fixed costs per slide: ``segment_image`` against one whole-image forward of the same
model and against MONAI tuned as tileseg runs a model, in one warm process, interleaved.

The model is the one of ``monai_compare.py`` (the default's architecture, 'same'-padded, so that
MONAI's inferer can run it); the image a generated ``--size``² fluorescence image. After one
untimed run of each contender, ``--repeats`` rounds time, in an order that rotates from round
to round:

- ``segment``: ``segment_image`` with the defaults (labels, pyramid, overview, record), its
  output removed untimed before each run;
- ``whole``: the image read, normalised and inferred as one mirror-padded window by the same
  predictor the run used (batch norm folded, channels-last): what tileseg promises to equal,
  with no tiling, no writing and no fixed costs;
- ``monai`` (when monai is installed): ``sliding_window_inference`` at overlap 0.25, gaussian,
  roi = tileseg's default output tile (1024², or ``--tile``), batch 4, on a folded
  channels-last copy of the module.

``--tile`` sets segment's tile too; without it segment tiles as ``tileseg segment`` does by
default (an image that fits one window no larger than a batch of default windows is one tile).

Reported: each contender's median seconds with min–max, the per-round ratios segment / whole
and monai / segment (median and min–max), and the median seconds of segment's phases
(``pipeline/engine/profile.py``).

Usage: ``python bench/fixed_costs.py [--size 2048] [--tile N] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_TILE = 1024  # tileseg's default 2D output tile: MONAI's roi unless --tile is given
sys.path.insert(0, str(HERE.parent))


def setup(out: Path, size: int) -> None:
    import tifffile

    from pipeline.models import UNetConfig, save_unet, seeded_unet
    from pipeline.synthetic.render import SyntheticConfig, synthetic_pair

    out.mkdir(parents=True, exist_ok=True)
    if not (out / "same.safetensors").exists():
        config = UNetConfig(depth=3, width=16, padding="same")
        save_unet(seeded_unet(config, seed=0), out / "same.safetensors")
    image_file = out / f"image-{size}.tif"
    if not image_file.exists():
        image, _ = synthetic_pair((size, size), config=SyntheticConfig(seed=3))
        tifffile.imwrite(image_file, image, tile=(256, 256), compression="zlib")


def contenders(out: Path, size: int, tile: int | None, batch: int) -> dict:
    """name -> a function that runs that contender once and returns its seconds (and the
    segment run's timings)."""
    import numpy as np
    import torch

    from pipeline.config import SegmentOptions
    from pipeline.engine.driver import segment_image
    from pipeline.io.readers import open_image
    from pipeline.models import ModelSpec, load_model
    from pipeline.models.fold import fold_batch_norm
    from pipeline.models.inference import predict_whole
    from pipeline.preprocess.normalize import compute_normalization
    from pipeline.runtime.worker import RunSettings, cached_predictor

    model_file, image_file = out / "same.safetensors", out / f"image-{size}.tif"
    opts = SegmentOptions(model=str(model_file), tile=tile, batch_size=batch, device="cpu")
    dst = out / "segment.zarr"
    spec = ModelSpec(str(model_file))
    model = load_model(spec)

    def segment() -> tuple[float, dict]:
        shutil.rmtree(dst, ignore_errors=True)
        r = segment_image(image_file, dst, opts)
        return r.seconds, r.timings

    def whole() -> tuple[float, dict]:
        t = time.perf_counter()
        image = open_image(image_file)
        norm = compute_normalization(image, mode="percentile")
        x = norm.apply(image.read((slice(None), slice(None))))
        run = RunSettings(device="cpu", precision="fp32", channels_last="on", fold_norm="on")
        predict_whole(cached_predictor(spec, run), x, geometry=model.geometry)
        return time.perf_counter() - t, {}

    runs = {"segment": segment, "whole": whole}
    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        return runs
    module = copy.deepcopy(model.module).eval()  # folded here, not in the loaded model
    fold_batch_norm(module)
    module = module.to(memory_format=torch.channels_last)

    def monai() -> tuple[float, dict]:
        t = time.perf_counter()
        image = open_image(image_file)
        norm = compute_normalization(image, mode="percentile")
        x = torch.from_numpy(norm.apply(image.read((slice(None), slice(None))))[None])
        with torch.inference_mode():
            logits = sliding_window_inference(
                x, roi_size=(tile or DEFAULT_TILE,) * 2, sw_batch_size=batch, predictor=module,
                overlap=0.25, mode="gaussian",
            )  # fmt: skip
            np.asarray(torch.softmax(logits, dim=1)[0].argmax(0))
        return time.perf_counter() - t, {}

    runs["monai"] = monai
    return runs


def measure(out: Path, *, size: int, tile: int | None, batch: int, repeats: int) -> dict:
    setup(out, size)
    runs = contenders(out, size, tile, batch)
    for run in runs.values():  # warm: the model prepared, the heap grown, the file cached
        run()
    names = list(runs)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    phases: list[dict] = []
    for i in range(repeats):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            s, timings = runs[name]()
            seconds[name].append(s)
            if timings:
                phases.append(timings)
    ratios = {
        "segment / whole": [
            s / w for s, w in zip(seconds["segment"], seconds["whole"], strict=True)
        ]
    }
    if "monai" in seconds:
        ratios["monai / segment"] = [
            m / s for m, s in zip(seconds["monai"], seconds["segment"], strict=True)
        ]
    walls = sorted({k for t in phases for k in t if k.endswith("_wall")})
    return {
        "size": size, "tile": tile, "batch_size": batch, "repeats": repeats,
        "seconds": seconds, "ratios": ratios,
        "phases": {k: statistics.median(t.get(k, 0.0) for t in phases) for k in walls},
    }  # fmt: skip


def table(result: dict) -> list[str]:
    def spread(values: list[float], digits: int = 2) -> str:
        med = statistics.median(values)
        return f"{med:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"

    lines = ["| figure | median (min–max) |", "| --- | --- |"]
    for name, values in result["seconds"].items():
        lines.append(f"| {name} seconds | {spread(values)} |")
    for name, values in result["ratios"].items():
        lines.append(f"| {name} | {spread(values)} |")
    phases = ", ".join(f"{k[:-5]} {v:.3f}" for k, v in result["phases"].items() if v >= 0.001)
    lines.append(f"segment's phases (median s): {phases}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--tile", type=int, help="output tile (default: tileseg's own choice)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(HERE / "results" / "fixed_costs"))
    a = p.parse_args()
    out = Path(a.out)
    result = measure(out, size=a.size, tile=a.tile, batch=a.batch_size, repeats=a.repeats)
    (out / f"fixed-costs-{a.size}.json").write_text(json.dumps(result, indent=2))
    print("\n".join(table(result)))


if __name__ == "__main__":
    main()
