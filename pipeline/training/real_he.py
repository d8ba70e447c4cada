"""A real H&E slide without annotation, and a measure of nuclei found on it that needs no truth.

The slide is a 2220 x 2967 region of OpenSlide's CMU-1 Aperio test slide (skin, 0.499 µm per
pixel, CC0; ``pipeline/data/README.md``). No package ships an annotated real H&E image, so
what a model finds here is judged by a *proxy*, not a score against truth: colour
deconvolution with the fixed Ruifrok-Johnston stain vectors (scikit-image's ``rgb2hed``,
independent of the per-slide fit that segmentation uses) gives each pixel a haematoxylin and
an eosin amount, and nuclei are where haematoxylin is. A model that labels eosin-pink collagen,
red cells or cytoplasm as nuclei puts labels on pixels with little haematoxylin; one that
misses nuclei leaves haematoxylin-rich tissue unlabelled. Neither figure is an error rate:
nucleoli, pale (vesicular) nuclei and blur lower a real nucleus' haematoxylin too, and dark
keratin or mucin raise it outside nuclei.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import zarr
from scipy import ndimage

from pipeline.config import SegmentOptions
from pipeline.engine.driver import segment_image
from pipeline.io.readers import open_image
from pipeline.output.ngff import labels_image_path

__all__ = ["CROP", "SLIDE", "he_proxy", "score_real_he", "stain_amounts"]

SLIDE = Path(__file__).parents[1] / "data" / "cmu-small-region.svs"
CROP = (slice(1700, 2300), slice(1000, 1600))  # epidermis, a hair follicle, dermal collagen
_TISSUE_OD = 0.15  # Macenko's beta: optical density below it in every channel is glass
_CLIP_PERCENTILE = 99.5  # the darkest specks (ink, folds) would drag Otsu's split up


def stain_amounts(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Haematoxylin and eosin amounts of an 8-bit ``(Y, X, 3)`` RGB image by Ruifrok-Johnston
    deconvolution, and its tissue mask (optical density above 0.15 in some channel)."""
    from skimage.color import rgb2hed

    hed = rgb2hed(rgb)
    od = -np.log((rgb.astype(np.float32) + 1) / 256)
    return hed[..., 0], hed[..., 1], od.max(axis=-1) > _TISSUE_OD


def he_proxy(rgb: np.ndarray, instances: np.ndarray, *, mpp: float) -> dict[str, float]:
    """No-truth figures of nuclei ``instances`` found on an 8-bit ``(Y, X, 3)`` H&E image.

    Haematoxylin-rich is above Otsu's threshold of the tissue's haematoxylin (clipped at its
    99.5th percentile), a property of the image alone, the same for every model.

    Returns
    -------
    dict
        ``low_hematoxylin_share``: labelled pixels that are not haematoxylin-rich;
        ``eosin_dominant_share``: labelled pixels with more eosin than haematoxylin;
        ``low_hematoxylin_objects``: objects whose median pixel is not haematoxylin-rich;
        ``hematoxylin_covered``: haematoxylin-rich tissue pixels that are labelled;
        ``objects``, ``objects_per_mm2`` (of tissue), ``median_area_um2`` and the
        ``hematoxylin_threshold``.
    """
    from skimage.filters import threshold_otsu

    h, e, tissue = stain_amounts(rgb)
    tissue_h = h[tissue]
    threshold = float(
        threshold_otsu(np.minimum(tissue_h, np.percentile(tissue_h, _CLIP_PERCENTILE)))
    )
    rich = h >= threshold
    labelled = instances > 0
    ids, areas = np.unique(instances[labelled], return_counts=True)
    medians = np.asarray(ndimage.median(h, instances, index=ids)) if len(ids) else np.zeros(0)
    n_labelled = max(int(labelled.sum()), 1)
    tissue_mm2 = float(tissue.sum()) * mpp * mpp / 1e6
    return {
        "low_hematoxylin_share": float((labelled & ~rich).sum() / n_labelled),
        "eosin_dominant_share": float((labelled & (e > h)).sum() / n_labelled),
        "low_hematoxylin_objects": float((medians < threshold).mean()) if len(ids) else 0.0,
        "hematoxylin_covered": float(labelled[rich & tissue].mean()),
        "objects": len(ids),
        "objects_per_mm2": len(ids) / tissue_mm2 if tissue_mm2 else 0.0,
        "median_area_um2": float(np.median(areas)) * mpp * mpp if len(ids) else 0.0,
        "hematoxylin_threshold": threshold,
    }


def score_real_he(
    directory: str | Path, *, options: SegmentOptions | None = None
) -> dict[str, object]:
    """Segment the shipped real H&E slide into ``directory`` as ``tileseg segment`` does with
    ``options`` (default: the defaults, which pick the H&E model) and watershed instances, and
    measure the instances with :func:`he_proxy`.

    Returns
    -------
    dict
        The proxy figures, the ``output`` path, the ``model`` file's name and how it was
        ``chosen``.
    """
    out = Path(directory) / "cmu-small-region.zarr"
    options = replace(options or SegmentOptions(), instances="watershed", overwrite=True)
    record = segment_image(SLIDE, out, options).record
    image = open_image(SLIDE)
    rgb = np.moveaxis(image.read(tuple(slice(0, n) for n in image.spatial_shape)), 0, -1)
    instances = np.asarray(zarr.open_array(out / labels_image_path("instances") / "0", mode="r"))
    return {
        **he_proxy(rgb, instances, mpp=float(image.pixel_size[-1])),
        "output": str(out),
        "model": Path(record["model"]["source"]).name,
        "chosen": record["model"]["chosen"],
    }
