"""Generated nuclei several times larger than the default model's, segmented with
``--object-size auto`` (:mod:`pipeline.engine.scale`) and, to show why, without it.

At its own scale the model sees the nuclei's chromatin texture, not the nuclei, and outlines
their bright spots; brought to the size it segments at it finds them whole. The image comes
from :func:`~pipeline.training.scale_eval.sized_config`, the generator of the held-out scale
bins, so the truth's object size is known.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from pipeline.config import SegmentOptions
from pipeline.engine.driver import segment_image
from pipeline.models import ModelSpec, load_model
from pipeline.objects.size import object_diameters, trained_object_size
from pipeline.output.qc import output_scores
from pipeline.synthetic.render import synthetic_pair
from pipeline.training.scale_eval import sized_config

__all__ = ["score_large_nuclei"]


def score_large_nuclei(
    directory: str | Path,
    *,
    size: int = 1024,
    diameter: float = 80.0,
    seed: int = 1,  # about 50 nuclei of median diameter 77 px in its 1024²
    options: SegmentOptions | None = None,
    compare: bool = True,
) -> dict[str, Any] | None:
    """Write a ``size``² image of generated nuclei about ``diameter`` px across into
    ``directory``, segment it as ``tileseg segment --object-size auto --instances watershed``
    does with ``options``, and score it against its truth.

    Parameters
    ----------
    compare
        Also segment it without ``--object-size`` (at the model's own scale) and score that.

    Returns
    -------
    dict or None
        ``true_diameter_px`` (median of the truth's objects), ``estimated_diameter_px``,
        ``trained_diameter_px``, ``target_diameter_px`` (the size the objects are brought to),
        ``input_px_per_model_px`` (the scale segmented at),
        ``foreground_dice``, ``object_f1`` (IoU 0.5), ``objects``, ``true_objects``, ``image``,
        ``output`` and, with ``compare``, ``unscaled`` (the same scores without
        ``--object-size``). None when the model records no trained object size: it cannot be
        run at another scale by object size.
    """
    options = replace(options or SegmentOptions(), instances="watershed", overwrite=True)
    if trained_object_size(load_model(ModelSpec.from_options(options))) is None:
        return None
    directory = Path(directory)
    image, truth = synthetic_pair((size, size), config=sized_config(diameter, seed=seed))
    path = directory / f"generated-large-nuclei-{size}.tif"
    tifffile.imwrite(path, image, tile=(256, 256), compression="zlib")
    out = directory / f"generated-large-nuclei-{size}.zarr"
    result = segment_image(path, out, replace(options, object_size="auto"))
    done = result.record["resample"]
    scores = {
        "true_diameter_px": float(np.median(object_diameters(truth))),
        "estimated_diameter_px": done["object_size_px"],
        "trained_diameter_px": done["trained_object_size_px"],
        "target_diameter_px": done["target_object_size_px"],
        "input_px_per_model_px": max(done["input_factor"]),
        **output_scores(out, truth),
        "image": str(path),
        "output": str(out),
    }
    if compare:
        unscaled = directory / f"generated-large-nuclei-{size}-unscaled.zarr"
        segment_image(path, unscaled, replace(options, object_size=None))
        scores["unscaled"] = output_scores(unscaled, truth)
    return scores
