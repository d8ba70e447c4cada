"""A real fluorescence-nuclei image with ground truth, shipped to check how models generalise.

One 512² image of stained nuclei from the 2018 Data Science Bowl (BBBC038v1, CC0; Caicedo et al.,
Nature Methods 16, 2019) with its instance mask, as packaged by stardist (BSD-3-Clause). The
default model is trained on generated images only and never sees it, so its score here says
how far the generator's nuclei carry over to a real microscope.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import tifffile

from pipeline.config import SegmentOptions
from pipeline.engine.driver import segment_image
from pipeline.output.qc import output_scores

__all__ = ["IMAGE", "MASK", "score_real_nuclei"]

DATA = Path(__file__).parents[1] / "data"
IMAGE = DATA / "dsb2018-nuclei.tif"
MASK = DATA / "dsb2018-nuclei-mask.tif"


def score_real_nuclei(
    directory: str | Path, *, options: SegmentOptions | None = None
) -> dict[str, object]:
    """Segment the shipped real image into ``directory`` and score it against its mask.

    The image is segmented as ``tileseg segment`` would with ``options`` (default: the defaults),
    with watershed instances. Returns the foreground Dice and the object F1 at IoU 0.5.
    """
    out = Path(directory) / "dsb2018-nuclei.zarr"
    options = replace(options or SegmentOptions(), instances="watershed", overwrite=True)
    segment_image(IMAGE, out, options)
    truth = tifffile.imread(MASK)
    return {**output_scores(out, truth), "output": str(out)}
