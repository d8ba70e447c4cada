"""``tileseg demo``: generate a synthetic slide with ground truth, segment it, report.

The slide is a tiled pyramidal OME-TIFF of fluorescence-like nuclei written block by block, so
the demo exercises the same path a real slide takes: lazy reads, overlap-tile inference, the
OME-Zarr output, a QC picture and a score against the truth. Then real and generated images:
a real fluorescence image with truth, generated H&E with truth, a real H&E slide without truth
(measured by a no-truth proxy), and nuclei larger than the model's.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import zarr

from pipeline.config import SegmentOptions
from pipeline.engine.driver import segment_image
from pipeline.io.readers import open_image
from pipeline.output.ngff import labels_image_path
from pipeline.output.qc import foreground_dice, overlay_png
from pipeline.synthetic.slides import SyntheticConfig, write_synthetic_slide
from pipeline.training.he_check import score_generated_he
from pipeline.training.large_nuclei import score_large_nuclei
from pipeline.training.real_he import CROP as REAL_HE_CROP
from pipeline.training.real_he import SLIDE as REAL_HE
from pipeline.training.real_he import score_real_he
from pipeline.training.real_nuclei import IMAGE as REAL_IMAGE
from pipeline.training.real_nuclei import score_real_nuclei

__all__ = ["run_demo"]


def run_demo(
    directory: str | Path = "demo-output",
    *,
    size: int = 8192,
    seed: int = 0,
    options: SegmentOptions | None = None,
    progress: bool = True,
) -> dict[str, object]:
    """Run the demo in ``directory``; returns the figures it prints."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    slide, truth = out / f"synthetic-{size}.ome.tif", out / f"synthetic-{size}-truth.zarr"
    stamp = out / f"synthetic-{size}.json"
    wanted = {"size": size, "seed": seed}
    if (
        not (slide.exists() and truth.exists() and stamp.exists())
        or json.loads(stamp.read_text()) != wanted
    ):
        t = time.perf_counter()
        print(f"Generating a {size}x{size} synthetic nuclei slide (seed {seed}) ...", flush=True)
        write_synthetic_slide(
            slide, shape=(size, size), config=SyntheticConfig(seed=seed), truth_path=truth,
            progress=progress,
        )  # fmt: skip
        stamp.write_text(json.dumps(wanted))
        print(f"  written in {time.perf_counter() - t:.1f} s: {slide}")

    result_path = out / "segmentation.zarr"
    options = options or SegmentOptions()
    from dataclasses import replace

    options = replace(options, overwrite=True)
    bar = _bar(progress)
    result = segment_image(slide, result_path, options, progress=bar)
    if hasattr(bar, "close"):
        bar.close()
    dice = foreground_dice(result_path, zarr.open_array(truth, mode="r"))
    qc = overlay_png(open_image(slide), result_path, out / "qc-overlay.png")
    # A real image the model never saw: the synthetic Dice alone would not say it generalises.
    real = score_real_nuclei(out, options=options)
    real_qc = overlay_png(
        open_image(REAL_IMAGE), real["output"], out / "qc-real-nuclei.png",
        labels=labels_image_path("instances"),
    )  # fmt: skip
    # H&E brightfield: with no --model the shipped H&E model, on Macenko-normalised RGB (no
    # installed package ships a real H&E image with or without truth: a generated one).
    he = score_generated_he(out, options=options)
    he_qc = overlay_png(
        open_image(he["image"]), he["output"], out / "qc-he.png",
        labels=labels_image_path("instances"),
    )  # fmt: skip
    real_he = _real_he_figures(out, options)
    large = _large_nuclei_figures(out, options)
    model = result.record["model"]
    figures = {
        "image": f"{size}x{size} px ({size * size / 1e6:.0f} MP)",
        "seconds": round(result.seconds, 1),
        "megapixels_per_second": round(result.megapixels_per_second, 2),
        "foreground_dice": round(dice, 4),
        "model": model["source"]
        + (" (UNTRAINED seeded weights)" if model.get("untrained") else ""),
        "real_nuclei_dice": f"{real['foreground_dice']:.3f} (DSB 2018 fluorescence, 512², "
        f"object F1 {real['object_f1']:.3f} at IoU 0.5)",
        "he_dice": f"{he['foreground_dice']:.3f} (generated H&E, 1024², {he['model']}, "
        f"stain {he['stain']}, object F1 {he['object_f1']:.3f} at IoU 0.5)",
        "output": str(result_path.absolute()),
        "qc_picture": str(qc.absolute()),
        "real_qc_picture": str(real_qc.absolute()),
        "he_qc_picture": str(he_qc.absolute()),
        **real_he,
        **large,
    }
    print()
    print("tileseg demo")
    for key, value in figures.items():
        print(f"  {key.replace('_', ' '):>22}: {value}")
    print()
    print("Open the result:")
    print(f"  napari --plugin napari-ome-zarr {result_path}   # the overview with its labels")
    print(f"  python -c \"import zarr; print(zarr.open_group('{result_path}').tree())\"")
    print(f"  QC picture: {qc}")
    return figures


def _real_he_figures(out: Path, options: SegmentOptions) -> dict[str, str]:
    """A real H&E slide (shipped, not annotated) segmented as ``tileseg segment`` would: what
    was found, the no-truth figures of :mod:`pipeline.training.real_he`, and QC pictures of the
    whole slide and of a full-resolution crop."""
    he = score_real_he(out, options=options)
    slide, labels = open_image(REAL_HE), labels_image_path("instances")
    whole = overlay_png(slide, he["output"], out / "qc-real-he.png", labels=labels)
    crop = overlay_png(
        slide, he["output"], out / "qc-real-he-crop.png", labels=labels, window=REAL_HE_CROP
    )
    return {
        "real_he_nuclei": f"{he['objects']} ({he['objects_per_mm2']:.0f} per mm² of tissue, "
        f"median {he['median_area_um2']:.0f} µm²; real H&E, 2220x2967, {he['model']})",
        "real_he_proxy": f"{he['low_hematoxylin_share']:.3f} of labelled pixels low in "
        f"haematoxylin, {he['low_hematoxylin_objects']:.3f} of objects; "
        f"{he['hematoxylin_covered']:.3f} of haematoxylin-rich tissue labelled (no truth: "
        "colour deconvolution)",
        "real_he_qc_picture": str(whole.absolute()),
        "real_he_crop_picture": str(crop.absolute()),
    }


def _large_nuclei_figures(out: Path, options: SegmentOptions) -> dict[str, str]:
    """Nuclei ~5x larger than the model's, segmented with ``--object-size auto`` and without:
    the estimated size, the scale segmented at, both scores, and the QC picture."""
    # The run without --object-size warns that the objects look large: say why it is made.
    print("Large nuclei: segmenting with --object-size auto, then without it ...", flush=True)
    big = score_large_nuclei(out, options=options)
    if big is None:
        return {"large_nuclei_dice": "not run: the model records no trained object size"}
    qc = overlay_png(
        open_image(big["image"]), big["output"], out / "qc-large-nuclei.png",
        labels=labels_image_path("instances"),
    )  # fmt: skip
    plain = big["unscaled"]
    return {
        "large_nuclei_size": f"{big['estimated_diameter_px']:.0f} px estimated (truth "
        f"{big['true_diameter_px']:.0f} px, model trained at {big['trained_diameter_px']:.0f} "
        f"px): segmented at {big['input_px_per_model_px']:.2f} input px per model px, "
        f"objects {big['target_diameter_px']:.0f} px there",
        "large_nuclei_dice": f"{big['foreground_dice']:.3f} (generated, 1024², --object-size "
        f"auto, object F1 {big['object_f1']:.3f}; without it: Dice "
        f"{plain['foreground_dice']:.3f}, object F1 {plain['object_f1']:.3f})",
        "large_qc_picture": str(qc.absolute()),
    }


def _bar(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    bar = tqdm(total=100, desc="segmenting", unit="%", file=sys.stderr)

    class _Progress:
        def __call__(self, done: int, total: int) -> None:
            bar.update(100 * done / total - bar.n)

        def close(self) -> None:
            bar.close()

    return _Progress()
