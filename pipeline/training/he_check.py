"""Generated H&E brightfield, segmented as ``tileseg segment`` segments it (with no ``--model``:
the shipped H&E model on the Macenko-normalised RGB, :mod:`pipeline.preprocess.stain`; with the
default fluorescence model: its haematoxylin channel) and scored against the generator's truth."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import tifffile

from pipeline.config import SegmentOptions
from pipeline.engine.driver import segment_image
from pipeline.output.qc import output_scores
from pipeline.synthetic.render import SyntheticConfig, synthetic_pair

__all__ = ["score_generated_he"]


def score_generated_he(
    directory: str | Path,
    *,
    size: int = 1024,
    seed: int = 5,  # half of its 1024² is tissue, with ~1000 nuclei
    options: SegmentOptions | None = None,
) -> dict[str, object]:
    """Write a ``size``² generated H&E image (an RGB TIFF) into ``directory``, segment it as
    ``tileseg segment`` does with ``options`` and watershed instances, and score it against
    its truth.

    Returns
    -------
    dict
        ``foreground_dice``, ``object_f1`` (at IoU 0.5), ``image`` and ``output`` paths, the
        ``model`` and how it was ``chosen``, and the ``stain`` step taken.
    """
    directory = Path(directory)
    rgb, truth = synthetic_pair((size, size), config=SyntheticConfig(kind="he", seed=seed))
    image = directory / f"generated-he-{size}.tif"
    tifffile.imwrite(image, rgb, photometric="rgb", tile=(256, 256), compression="zlib")
    out = directory / f"generated-he-{size}.zarr"
    options = replace(options or SegmentOptions(), instances="watershed", overwrite=True)
    record = segment_image(image, out, options).record
    stain = record["normalization"].get("stain")
    return {
        **output_scores(out, truth),
        "image": str(image),
        "output": str(out),
        "model": Path(record["model"]["source"]).name,
        "chosen": record["model"]["chosen"],
        "stain": "none" if stain is None else stain["step"],
    }
