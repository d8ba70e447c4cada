"""Quality-control pictures and scores computed block by block from an output.

Nothing here holds a full-resolution image in memory: thumbnails come from the output's overview,
or from a pyramid level of the input (or strided block reads), and scores accumulate over
chunk-sized blocks.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import zarr

from pipeline.io.readers import LazyImage
from pipeline.output.ngff import LABELS_PATH, labels_image_path, read_layout, read_record

__all__ = [
    "foreground_dice",
    "instance_f1",
    "output_scores",
    "overlay_png",
    "overview_thumbnail",
    "thumbnail",
]

_FILL = np.array(
    [[0, 0, 0], [255, 60, 60], [60, 220, 60], [70, 130, 255], [255, 200, 0], [200, 70, 255]],
    np.float32,
)


def thumbnail(image: LazyImage, *, max_side: int = 2048, block: int = 2048) -> np.ndarray:
    """A (C, y, x) view of a 2D image whose longer side is at most ``max_side``: the smallest
    pyramid level that is large enough, subsampled by striding, read in blocks."""
    level = image.level
    for k, shape in enumerate(image.level_shapes):
        if max(shape[-2:]) >= max_side or k == 0:
            level = k
    lazy = image.at_level(level) if level != image.level else image
    h, w = lazy.spatial_shape[-2:]
    step = max(1, math.ceil(max(h, w) / max_side))
    rows = []
    for y in range(0, h, block - block % step):
        cols = []
        for x in range(0, w, block - block % step):
            box = lazy.read((slice(y, min(y + block, h)), slice(x, min(x + block, w))))
            cols.append(box[:, ::step, ::step])
        rows.append(np.concatenate(cols, axis=2))
    return np.concatenate(rows, axis=1)


def overview_thumbnail(output: str | os.PathLike[str], *, max_side: int) -> np.ndarray | None:
    """Like :func:`thumbnail`, from the output's overview (its root image) instead of the input:
    nothing of the input is read again. None when the root holds no 2D overview, or one smaller
    than ``max_side`` that is not the whole image."""
    layout = read_layout(output)
    if layout.overview is None or layout.ndim != 2:
        return None
    overview = zarr.open_array(Path(output) / "0", mode="r", zarr_format=2)
    longest = max(overview.shape[-2:])
    if longest < max_side and layout.overview.factor != 1:
        return None
    step = max(1, math.ceil(longest / max_side))
    return np.asarray(overview[:, ::step, ::step])


def _to_rgb(image: np.ndarray) -> np.ndarray:
    """Contrast-stretched float RGB in [0, 1] from (C, y, x)."""
    x = image.astype(np.float32)
    lo, hi = np.percentile(x, [1, 99.5])
    x = np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1)
    if x.shape[0] >= 3:
        return np.moveaxis(x[:3], 0, -1)
    return np.repeat(x[0][..., None], 3, axis=-1)


def _resize_nearest(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    ys = (np.arange(shape[0]) * labels.shape[0] / shape[0]).astype(np.int64)
    xs = (np.arange(shape[1]) * labels.shape[1] / shape[1]).astype(np.int64)
    return labels[np.ix_(ys, xs)]


def overlay_png(
    image: LazyImage | None,
    output: str | os.PathLike[str],
    png: str | os.PathLike[str],
    *,
    max_side: int = 2048,
    alpha: float = 0.45,
    labels: str = LABELS_PATH,
    window: tuple[slice, slice] | None = None,
) -> Path:
    """Write a downsampled picture of the image with the labels painted over it.

    The picture of the image is the output's overview where it is fine enough
    (:func:`overview_thumbnail`), else it is read from ``image`` (the input).
    ``labels``: the labels image to paint, e.g. ``"labels/instances"`` (neighbouring objects
    then differ in colour unless their ids differ by a multiple of the palette's five).
    ``window``: a (y, x) window of the input at full resolution instead (``image`` needed),
    the labels of level 0 over it. ``image`` is read in the channels the run of ``output``
    read (its record's ``channels``) unless it already reads chosen ones."""
    pyramid = zarr.open_group(output, mode="r")[labels]
    if image is not None:
        image = _as_segmented(image, output)
    if window is not None:
        if image is None:
            raise ValueError(f"{output}: a window is read from the image, and none was given")
        thumb = _to_rgb(image.read(window))
        return _paint(thumb, np.asarray(pyramid["0"][window]), png, alpha)
    small = overview_thumbnail(output, max_side=max_side)
    if small is None:
        if image is None:
            raise ValueError(f"{output}: no overview to draw on, and no image given")
        small = thumbnail(image, max_side=max_side)
    thumb = _to_rgb(small)
    levels = sorted(int(k) for k in pyramid.array_keys())
    # the smallest label level at least as large as the thumbnail
    level = max([k for k in levels if pyramid[str(k)].shape[-2] >= thumb.shape[0]] or [levels[0]])
    return _paint(thumb, _resize_nearest(pyramid[str(level)][...], thumb.shape[:2]), png, alpha)


def _as_segmented(image: LazyImage, output: str | os.PathLike[str]) -> LazyImage:
    """``image`` reading the channels the run of ``output`` chose, where it chose some."""
    chosen = ((read_record(output) or {}).get("channels") or {}).get("indices")
    if chosen is None or image.spec.channels is not None:
        return image
    return image.with_channels(tuple(chosen))


def _paint(thumb: np.ndarray, ids: np.ndarray, png: str | os.PathLike[str], alpha: float) -> Path:
    """Labels ``ids`` over the float RGB picture ``thumb``, outlined, written as a PNG."""
    from skimage.io import imsave
    from skimage.segmentation import find_boundaries

    fg = ids > 0
    # ids 1, 2, ... cycle through the palette's colours; 0 (its black) stays background
    colours = _FILL[np.where(fg, 1 + (ids.astype(np.int64) - 1) % (len(_FILL) - 1), 0)] / 255.0
    rgb = np.where(fg[..., None], (1 - alpha) * thumb + alpha * colours, thumb)
    edges = find_boundaries(ids, mode="inner")[..., None]
    rgb = np.where(edges, colours, rgb)
    png = Path(png)
    imsave(png, (rgb * 255).astype(np.uint8), check_contrast=False)
    return png


def foreground_dice(
    output: str | os.PathLike[str], truth: zarr.Array | np.ndarray, *, block: int = 2048
) -> float:
    """Dice of foreground (label > 0) between an output's labels and a truth array, blockwise."""
    labels = zarr.open_group(output, mode="r")[f"{LABELS_PATH}/0"]
    if tuple(labels.shape) != tuple(truth.shape):
        raise ValueError(f"labels {labels.shape} and truth {truth.shape} differ in shape")
    inter = total = 0
    for y in range(0, labels.shape[0], block):
        for x in range(0, labels.shape[1], block):
            region = (slice(y, y + block), slice(x, x + block))
            a = np.asarray(labels[region]) > 0
            b = np.asarray(truth[region]) > 0
            inter += int(np.count_nonzero(a & b))
            total += int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if total == 0 else 2.0 * inter / total


def instance_f1(pred: np.ndarray, truth: np.ndarray, *, iou: float = 0.5) -> dict[str, float]:
    """Object-level F1: a predicted and a true object match when their IoU exceeds ``iou``.

    For ``iou >= 0.5`` a match is one-to-one by construction (two objects cannot both overlap
    a third by more than half of their union), so counting the pairs above the threshold is the
    matching. Background is 0 in both; ids need not be consecutive.
    """
    if iou < 0.5:
        raise ValueError(f"iou {iou} < 0.5 would need an assignment step")
    if pred.shape != truth.shape:
        raise ValueError(f"labels {pred.shape} and truth {truth.shape} differ in shape")
    p, t = pred.ravel(), truth.ravel()
    p_ids, p_area = np.unique(p[p > 0], return_counts=True)
    t_ids, t_area = np.unique(t[t > 0], return_counts=True)
    both = (p > 0) & (t > 0)
    pairs, inter = np.unique(np.stack([p[both], t[both]]), axis=1, return_counts=True)
    union = (
        p_area[np.searchsorted(p_ids, pairs[0])] + t_area[np.searchsorted(t_ids, pairs[1])] - inter
    )
    matched = int(np.count_nonzero(inter / union > iou))
    n_pred, n_true = len(p_ids), len(t_ids)
    f1 = 1.0 if n_pred + n_true == 0 else 2 * matched / (n_pred + n_true)
    return {"f1": f1, "matched": matched, "predicted": n_pred, "true": n_true}


def output_scores(output: str | os.PathLike[str], truth: np.ndarray) -> dict[str, float]:
    """Foreground Dice of an output's labels and object F1 (IoU 0.5) of its instances (run with
    ``--instances``) against the instance labels ``truth``."""
    instances = zarr.open_array(Path(output) / labels_image_path("instances") / "0", mode="r")
    objects = instance_f1(np.asarray(instances), truth)
    return {
        "foreground_dice": foreground_dice(output, truth),
        "object_f1": objects["f1"],
        "objects": objects["predicted"],
        "true_objects": objects["true"],
    }
