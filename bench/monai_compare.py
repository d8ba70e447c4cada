"""tileseg against MONAI's ``sliding_window_inference`` on the same model and image.

Both predict class probabilities for one generated fluorescence image with the same 'same'-padded
U-Net (MONAI's inferer needs output size == input size). The reference is one forward pass over
the whole image, mirror-padded by the halo (what tileseg promises to equal). Each contender runs
in its own child process so its peak RSS is its own.

Usage: ``python bench/monai_compare.py [--size 2048] [--tile 1024] [--overlap 0.25]``
(needs ``pip install monai``; not a tileseg dependency).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

SETUP = """
import sys, numpy as np, tifffile
from pipeline.models import UNetConfig, save_unet, seeded_unet
from pipeline.synthetic import SyntheticConfig, synthetic_pair
out, size = sys.argv[1], int(sys.argv[2])
config = UNetConfig(depth=4, width=16, padding="same")
save_unet(seeded_unet(config, seed=0), out + "/same.safetensors")
image, _ = synthetic_pair((size, size), config=SyntheticConfig(seed=3))
tifffile.imwrite(out + "/image.tif", image, tile=(256, 256), compression="zlib")
print("{}")
"""

COMMON = """
import json, resource, sys, time
import numpy as np, tifffile, torch
from pipeline.inference import Predictor, predict_whole
from pipeline.models import ModelSpec, load_model
from pipeline.normalize import compute_normalization
from pipeline.readers import open_image
out, tile, overlap, batch = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
model = load_model(ModelSpec(out + "/same.safetensors"))
image = open_image(out + "/image.tif")
norm = compute_normalization(image, mode="percentile")
def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""

REFERENCE = (
    COMMON
    + """
x = norm.apply(image.read((slice(None), slice(None))))
t = time.perf_counter()
predictor = Predictor.create(model, device="cpu", precision="fp32")
p = predict_whole(predictor, x, geometry=model.geometry)
np.save(out + "/reference.npy", p)
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mib": rss()}))
"""
)

MONAI = (
    COMMON
    + """
from monai.inferers import sliding_window_inference
t0 = time.perf_counter()
x = torch.from_numpy(norm.apply(image.read((slice(None), slice(None))))[None])
with torch.inference_mode():
    logits = sliding_window_inference(x, roi_size=(tile, tile), sw_batch_size=batch,
                                      predictor=model.module, overlap=overlap, mode="gaussian")
    p = torch.softmax(logits, dim=1)[0].numpy()
seconds = time.perf_counter() - t0
ref = np.load(out + "/reference.npy")
print(json.dumps({"seconds": seconds, "peak_rss_mib": rss(),
                  "max_abs_dev": float(np.abs(p - ref).max()),
                  "label_disagreement": float((p.argmax(0) != ref.argmax(0)).mean())}))
"""
)

TILESEG = (
    COMMON
    + """
import zarr
from pipeline.config import SegmentOptions
from pipeline.segment import segment_image
# tile = output tile; tileseg's window adds the halo (the model's own geometry)
opts = SegmentOptions(model=out + "/same.safetensors", tile=tile, batch_size=batch,
                      save_probabilities=True, probability_dtype="float32", overwrite=True)
r = segment_image(out + "/image.tif", out + "/tileseg.zarr", opts)
p = zarr.open_group(out + "/tileseg.zarr", mode="r")["0"][...]
ref = np.load(out + "/reference.npy")
print(json.dumps({"seconds": r.seconds, "peak_rss_mib": rss(),
                  "window": r.record["geometry"]["window"],
                  "max_abs_dev": float(np.abs(p - ref).max()),
                  "label_disagreement": float((p.argmax(0) != ref.argmax(0)).mean())}))
"""
)


def child(code: str, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=HERE.parent
    )
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--tile", type=int, default=1024, help="tileseg output tile / MONAI roi side")
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", default=str(HERE / "results" / "monai"))
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    args = (str(out), str(a.tile), str(a.overlap), str(a.batch_size))
    child(SETUP, str(out), str(a.size))
    ref = child(REFERENCE, *args)
    ours = child(TILESEG, *args)
    # MONAI with the same roi as tileseg's output tile, and with tileseg's full window
    monai_tile = child(MONAI, *args)
    window = str(ours["window"][0])
    monai_window = child(MONAI, str(out), window, str(a.overlap), str(a.batch_size))
    result = {
        "size": a.size, "tile": a.tile, "overlap": a.overlap, "batch_size": a.batch_size,
        "reference": ref, "tileseg": ours,
        f"monai_roi_{a.tile}": monai_tile, f"monai_roi_{window}": monai_window,
    }  # fmt: skip
    (out / "compare.json").write_text(json.dumps(result, indent=2))
    mp = a.size * a.size / 1e6
    print("| method | seconds | MP/s | peak RSS MiB | max |p - whole| | labels differing |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in ("tileseg", f"monai_roi_{a.tile}", f"monai_roi_{window}"):
        r = result[name]
        print(
            f"| {name} | {r['seconds']:.1f} | {mp / r['seconds']:.3f} | {r['peak_rss_mib']:.0f} "
            f"| {r['max_abs_dev']:.2e} | {r['label_disagreement']:.2e} |"
        )
    for name in (f"monai_roi_{a.tile}", f"monai_roi_{window}"):
        print(f"tileseg / {name} throughput: {result[name]['seconds'] / ours['seconds']:.2f}x")


if __name__ == "__main__":
    main()
