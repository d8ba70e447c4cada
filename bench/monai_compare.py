"""tileseg against MONAI's ``sliding_window_inference`` on the same model and image.

Both predict class probabilities for one generated fluorescence image with the same U-Net: the
shipped default's architecture (depth 3, width 16) but 'same'-padded, since MONAI's inferer needs
output size == input size (``--depth`` changes the depth). The reference is one float32 forward
pass on the CPU over the whole image, mirror-padded by the halo, in tileseg's default layout
(channels-last): what tileseg promises to equal. MONAI runs three times: roi = tileseg's output
tile with the module as loaded (how it is called) and "tuned" as tileseg runs a model (batch
norm folded into the convolutions, the module in channels-last, which MONAI's windows then
follow, and on the CPU freed memory kept in the heap: ``pipeline/runtime/heap.py``), and roi =
tileseg's whole window (the same cost per forward).
Each contender runs in its own child process so its peak memory is its own. On CUDA both run
in the precision tileseg picks there (autocast bf16), and both are timed warm (after one
untimed run): CUDA start-up and cuDNN autotuning would otherwise swamp a small image.

Usage: ``python bench/monai_compare.py [--size 2048] [--tile 1024] [--overlap 0.25]``
(needs ``pip install monai``; not a tileseg dependency). ``bench/run.py`` runs it as one part.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from children import run_child

HERE = Path(__file__).resolve().parent

SETUP = """
import sys, numpy as np, tifffile
from pipeline.models import UNetConfig, save_unet, seeded_unet
from pipeline.synthetic.render import SyntheticConfig, synthetic_pair
out, size, depth = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
config = UNetConfig(depth=depth, width=16, padding="same")
save_unet(seeded_unet(config, seed=0), out + "/same.safetensors")
image, _ = synthetic_pair((size, size), config=SyntheticConfig(seed=3))
tifffile.imwrite(out + "/image.tif", image, tile=(256, 256), compression="zlib")
print("{}")
"""

COMMON = """
import json, sys, time
import numpy as np, tifffile, torch
from pipeline.models.inference import Predictor, predict_whole, resolve_device, resolve_precision
from pipeline.models import ModelSpec, load_model
from pipeline.preprocess.normalize import compute_normalization
from pipeline.io.readers import open_image
out, tile, overlap, batch = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
device = resolve_device(sys.argv[5])
model = load_model(ModelSpec(out + "/same.safetensors"))
image = open_image(out + "/image.tif")
norm = compute_normalization(image, mode="percentile")
def deviation(p):
    import os
    if not os.path.exists(out + "/reference.npy"):  # too large an image for a whole forward
        return {}
    ref = np.load(out + "/reference.npy")
    return {"max_abs_dev": float(np.abs(p - ref).max()),
            "label_disagreement": float((p.argmax(0) != ref.argmax(0)).mean())}
"""

REFERENCE = (
    COMMON
    + """
x = norm.apply(image.read((slice(None), slice(None))))
t = time.perf_counter()
predictor = Predictor.create(model, device="cpu", precision="fp32")
p = predict_whole(predictor, x, geometry=model.geometry)
np.save(out + "/reference.npy", p)
print(json.dumps({"seconds": time.perf_counter() - t, **peak_memory()}))
"""
)

MONAI = (
    COMMON
    + """
from monai.inferers import sliding_window_inference
module = model.module.to(device).eval()
if sys.argv[6] == "tuned":  # tileseg's settings: MONAI's windows follow the weights' layout
    from pipeline.models.fold import fold_batch_norm
    fold_batch_norm(module)  # this child's own copy of the model
    module = module.to(memory_format=torch.channels_last)
    if device.type == "cpu":
        from pipeline.runtime.heap import keep_freed_memory
        keep_freed_memory()
autocast = resolve_precision("auto", device)  # what tileseg runs in on this device
def run():
    x = torch.from_numpy(norm.apply(image.read((slice(None), slice(None))))[None]).to(device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=autocast,
                                                enabled=autocast is not None):
        logits = sliding_window_inference(x, roi_size=(tile, tile), sw_batch_size=batch,
                                          predictor=lambda w: module(w).float(),  # blend in fp32
                                          overlap=overlap, mode="gaussian")
        return torch.softmax(logits.float(), dim=1)[0].cpu().numpy()
if device.type == "cuda":
    run()
t0 = time.perf_counter()
p = run()
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "precision": str(autocast or "float32"),
                  "layout": sys.argv[6], **peak_memory(), **deviation(p)}))
"""
)

TILESEG = (
    COMMON
    + """
import zarr
from pipeline.config import SegmentOptions
from pipeline.engine.driver import segment_image
# tile = output tile; tileseg's window adds the halo (the model's own geometry)
opts = SegmentOptions(model=out + "/same.safetensors", tile=tile, batch_size=batch,
                      device=str(device), save_probabilities=True, probability_dtype="float32",
                      overwrite=True)
if device.type == "cuda":
    segment_image(out + "/image.tif", out + "/tileseg.zarr", opts)
r = segment_image(out + "/image.tif", out + "/tileseg.zarr", opts)
p = zarr.open_group(out + "/tileseg.zarr", mode="r")["0"][...]
print(json.dumps({"seconds": r.seconds, "window": r.record["geometry"]["window"],
                  "precision": str(resolve_precision("auto", device) or "float32"),
                  **peak_memory(), **deviation(p)}))
"""
)


def compare(
    out: Path,
    *,
    size: int,
    tile: int,
    overlap: float = 0.25,
    batch_size: int,
    device: str,
    depth: int = 3,
    reference_max: int = 4096,
) -> dict:
    """Reference, tileseg, and MONAI with roi = tileseg's output tile and = its whole window.

    The reference (one float32 forward over the whole image, for the deviations) needs ~20
    bytes per pixel per feature channel, so it is skipped above ``reference_max`` px a side:
    the deviations come from borders and blending, which larger images only repeat."""
    out = out.resolve()  # children run in the repository root
    out.mkdir(parents=True, exist_ok=True)
    (out / "reference.npy").unlink(missing_ok=True)
    run_child(SETUP, str(out), str(size), str(depth))
    args = (str(out), str(tile), str(overlap), str(batch_size), device)
    ref, _ = run_child(REFERENCE, *args) if size <= reference_max else ({"skipped": True}, None)
    ours, _ = run_child(TILESEG, *args)
    # The same roi as tileseg's output tile (same overlap setting), as a user calls it (the
    # module as loaded) and tuned as tileseg runs a model (batch norm folded, channels-last; on
    # the CPU freed memory kept in the heap); then tileseg's full window (the same cost per
    # forward).
    monai_tile, _ = run_child(MONAI, *args, "plain")
    monai_tile_tuned, _ = run_child(MONAI, *args, "tuned")
    window = ours["window"][0]
    monai_window, _ = run_child(MONAI, str(out), str(window), *args[2:], "plain")
    return {
        "size": size, "depth": depth, "tile": tile, "window": window, "overlap": overlap,
        "batch_size": batch_size, "device": device, "reference": ref, "tileseg": ours,
        f"monai_roi_{tile}": monai_tile, f"monai_roi_{tile}_tuned": monai_tile_tuned,
        f"monai_roi_{window}": monai_window,
    }  # fmt: skip


def table(result: dict) -> list[str]:
    """The comparison as Markdown lines."""
    mp = result["size"] ** 2 / 1e6
    tile = result["tile"]
    names = ("tileseg", f"monai_roi_{tile}", f"monai_roi_{tile}_tuned",
             f"monai_roi_{result['window']}")  # fmt: skip
    names = tuple(name for name in names if name in result)  # older results lack one
    cuda = "peak_cuda_mib" in result["tileseg"]
    lines = [
        "| method | seconds | MP/s | peak RSS MiB |" + (" peak CUDA MiB |" if cuda else "")
        + " max \\|p − whole\\| | labels differing |",
        "| --- | --- | --- | --- |" + (" --- |" if cuda else "") + " --- | --- |",
    ]  # fmt: skip
    for name in names:
        r = result[name]
        gpu = f" {r.get('peak_cuda_mib', 0):.0f} |" if cuda else ""
        dev = "| ".join(
            f"{r[k]:.2e} " if k in r else "n/a (no reference) "
            for k in ("max_abs_dev", "label_disagreement")
        )
        lines.append(
            f"| {name} | {r['seconds']:.2f} | {mp / r['seconds']:.3f} | {r['peak_rss_mib']:.0f} |"
            f"{gpu} {dev}|"
        )
    ours = result["tileseg"]["seconds"]
    for name in names[1:]:
        lines.append(f"tileseg / {name} throughput: {result[name]['seconds'] / ours:.2f}x")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--tile", type=int, default=1024, help="tileseg output tile / MONAI roi side")
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--depth", type=int, default=3, help="U-Net depth (width 16, same padding)")
    p.add_argument(
        "--reference-max",
        type=int,
        default=4096,
        help="largest side with a whole-image reference forward (deviations)",
    )
    p.add_argument("--out", default=str(HERE / "results" / "monai"))
    a = p.parse_args()
    out = Path(a.out)
    result = compare(out, size=a.size, tile=a.tile, overlap=a.overlap, batch_size=a.batch_size,
                     device=a.device, depth=a.depth, reference_max=a.reference_max)  # fmt: skip
    (out / "compare.json").write_text(json.dumps(result, indent=2))
    print("\n".join(table(result)))


if __name__ == "__main__":
    main()
