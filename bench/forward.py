"""The bare forward of a model under each setting that changes how it runs: memory layout
(``--channels-last``) and batch norm folded or not (``--fold-norm``).

One process, one batch of random windows of the default tile's size, one warm-up forward per
setting, then ``--repeats`` timed forwards per setting taken in turns (so that a slow spell of a
shared machine does not land on one setting); the median is reported. On CUDA each forward is
synchronised and runs in the precision tileseg picks there.

Usage: ``python bench/forward.py [--device cpu] [--batch-size 4] [--tile 1024] [--model M]``
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import numpy as np
import torch

from pipeline.models import ModelSpec, load_model
from pipeline.models.inference import Predictor

ON_OFF = ("off", "on")
SETTINGS = [{"channels_last": c, "fold_norm": f} for c, f in itertools.product(ON_OFF, ON_OFF)]


def name(setting: dict[str, str]) -> str:
    return f"channels_last={setting['channels_last']} fold_norm={setting['fold_norm']}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--tile", type=int, default=None, help="output tile (default 1024 / 3D 128)")
    p.add_argument("--model", default=None, help="model file (default: the shipped one)")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    model = load_model(ModelSpec(a.model))
    g = model.geometry
    tile = a.tile or (1024 if g.ndim == 2 else 128)
    window = tuple(g.input_size(tile, axis) for axis in range(g.ndim))
    shape = (a.batch_size, model.in_channels or 1, *window)
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    predictors = [Predictor.create(model, device=a.device, **s) for s in SETTINGS]
    cuda = predictors[0].device.type == "cuda"

    def forward(predictor: Predictor) -> float:
        t = time.perf_counter()
        predictor.logits(x)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for predictor in predictors:
        forward(predictor)  # warm-up: first-touch memory, cuDNN autotuning
    times: list[list[float]] = [[] for _ in SETTINGS]
    for _ in range(a.repeats):
        for k, predictor in enumerate(predictors):
            times[k].append(forward(predictor))
    mp = a.batch_size * float(np.prod(window)) / 1e6
    base = statistics.median(times[0])
    rows = []
    for setting, ts in zip(SETTINGS, times, strict=True):
        median = statistics.median(ts)
        rows.append({**setting, "seconds": median, "all": ts, "window_mp_per_s": mp / median,
                     "speedup": base / median})  # fmt: skip
    print(json.dumps({"device": str(predictors[0].device), "window": window,
                      "batch_size": a.batch_size, "precision": str(predictors[0].autocast),
                      "rows": rows}))  # fmt: skip
    print(f"\n| setting | seconds per batch of {a.batch_size} × {window} | MP/s | vs off/off |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print(f"| {name(row)} | {row['seconds']:.3f} | {row['window_mp_per_s']:.2f} | "
              f"{row['speedup']:.2f}× |")  # fmt: skip


if __name__ == "__main__":
    main()
