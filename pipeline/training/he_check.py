"""Generated H&E brightfield, segmented by the default (fluorescence) nuclei model through its
haematoxylin channel (:mod:`pipeline.preprocess.stain`) and scored against the generator's truth."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import tifffile
import zarr

from pipeline.config import SegmentOptions
from pipeline.engine.driver import segment_image
from pipeline.output.ngff import labels_image_path
from pipeline.output.qc import foreground_dice, instance_f1
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
    ``tileseg segment`` does with ``options`` (``--stain auto``: its haematoxylin) and
    watershed instances, and score it against its truth.

    Returns
    -------
    dict
        ``foreground_dice``, ``object_f1`` (at IoU 0.5), ``image`` and ``output`` paths.
    """
    directory = Path(directory)
    rgb, truth = synthetic_pair((size, size), config=SyntheticConfig(kind="he", seed=seed))
    image = directory / f"generated-he-{size}.tif"
    tifffile.imwrite(image, rgb, photometric="rgb", tile=(256, 256), compression="zlib")
    out = directory / f"generated-he-{size}.zarr"
    options = replace(options or SegmentOptions(), instances="watershed", overwrite=True)
    segment_image(image, out, options)
    instances = zarr.open_array(out / labels_image_path("instances") / "0", mode="r")
    objects = instance_f1(np.asarray(instances), truth)
    return {
        "foreground_dice": foreground_dice(out, truth),
        "object_f1": objects["f1"],
        "image": str(image),
        "output": str(out),
    }
