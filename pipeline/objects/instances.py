"""Instance labels from a segmentation output: one object, one id, across every chunk border.

:func:`label_instances` turns the foreground of an output (class labels > 0, chosen classes, or a
probability threshold) into an NGFF labels image ``labels/<name>`` of object ids, block by block:

1. **Label** (one task per block of output chunks): label the block's foreground on its own
   (connected components, or a distance-transform watershed on the block plus a halo). Ids are
   ``block_index << shift | local_id``: globally unique without any offsets, so blocks never wait
   for each other. The ids go to a scratch array, and the block's boundary planes (two inside
   and, for the watershed, two just outside) to thin "face" arrays (1 px thick chunks), so the
   merge below reads only face planes, never whole blocks.
2. **Merge** (a tree reduction, ``log2(blocks per axis)`` rounds): at round ``L`` one task per
   super-block of ``2^L`` blocks per axis reads the face planes on the cross between its
   ``2^ndim`` children, turns adjacent (or, for the watershed, coinciding) foreground pixels of
   different blocks into id pairs, maps them to the children's representatives and joins them with
   :func:`scipy.sparse.csgraph.connected_components`; the smallest id of a group is its root. It
   writes its merge map (representative -> root) and passes up only the ids on its *outer* faces.
   Every cross-block adjacency lies on exactly one such cross, so each face plane is read once,
   a task holds only the ids on the faces of its super-block (its surface, not its volume), and no
   task ever holds the whole graph: the largest one, the root, holds the ids on one cross through
   the image. Rounds are sequential; tasks within a round run in parallel.
3. **Count** (one cheap task per block, no pixels): ids of the block that some ancestor's merge
   map sends elsewhere are not roots; the rest get consecutive numbers. The per-block root counts
   are the only thing summed in the driver (one integer per block).
4. **Write** (one task per block): map each id through the merge maps of the block's ``log2``
   ancestors to its root and, optionally, to its consecutive number, and write whole chunks of
   ``labels/<name>/0``; then the pyramid is built level by level as for the segmentation.

Guarantees
----------
Connected components (``watershed=False``): the result equals ``scipy.ndimage.label`` of the
whole foreground with the same ``connectivity`` (1: faces, ``ndim``: full), up to renumbering —
exactly, for any image, block and chunk size (tested with hypothesis in 2D and 3D, including
objects across chunk corners and image borders).

Watershed (``watershed=True``): each block is split on its window ``block ± halo`` (clipped to the
image). For every foreground component whose bounding box is at most ``halo`` px along each axis,
the result equals :func:`watershed_split` on the whole image up to renumbering: every block it
touches sees the whole component plus the one-pixel rim that fixes its distance transform, and
peaks, markers and flooding are computed per component, so every block splits it identically and
the pieces are joined one-to-one across faces. A larger component is never merged with another
one; its pieces are joined wherever two blocks' splits overlap (it may come out less split).

Steps 2 and 3, and the plan that every task gets, are in :mod:`pipeline.objects._merge`; this
module labels the blocks (step 1), writes the labels image (step 4) and drives the run.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from scipy import ndimage

from pipeline.errors import TilesegError
from pipeline.objects._merge import (
    Criteria,
    _ancestor_maps,
    _apply,
    _count,
    _load,
    _merge,
    _Plan,
    _save_npy,
    _save_npz,
)
from pipeline.output.ngff import (
    LABELS_PATH,
    OutputLayout,
    create_array,
    create_labels_image,
    downsample_labels_region,
    forget_arrays,
    labels_image_path,
    level_regions,
    open_array,
    read_layout,
)
from pipeline.runtime.execution import run_tasks

__all__ = ["InstanceSummary", "SplitGrid", "label_instances", "watershed_split"]


@dataclass(frozen=True)
class InstanceSummary:
    """What :func:`label_instances` reports."""

    output: str
    name: str
    objects: int  # number of objects (the largest id when ``consecutive``)
    dtype: str
    blocks: int
    rounds: int  # merge rounds of the tree reduction
    edges: int  # cross-block id pairs found on block faces
    seconds: float
    watershed: bool
    consecutive: bool
    split_on_factors: list[float] | None = None  # the grid split on, in output px per pixel

    def to_dict(self) -> dict[str, object]:
        """For the output's record: without the output's own path (stale once it is moved)."""
        return {k: v for k, v in self.__dict__.items() if k != "output"}


# ----------------------------------------------------------------------------- labelling


@dataclass(frozen=True)
class SplitGrid:
    """The grid an output's labels were resampled from, for the watershed to split on.

    An output segmented at another scale and written on the input's grid (``--labels-at
    input``) holds the model grid's labels brought over by nearest neighbour: blocky outlines
    at other distances. Its objects are split where they were segmented, at the size the model
    knows (``--min-distance`` in that grid's pixels), and the split comes over the same way.

    Attributes
    ----------
    path
        An array group holding the labels (and probabilities, if the output has them) on that
        grid, as an output holds its own.
    factors
        One of its pixels in output pixels, per spatial axis (as
        :func:`pipeline.resample.nearest_source` takes it).
    """

    path: str
    factors: tuple[float, ...]


def _structure(ndim: int, connectivity: int) -> np.ndarray:
    return ndimage.generate_binary_structure(ndim, connectivity)


def watershed_split(
    mask: np.ndarray, *, min_distance: int = 7, connectivity: int = 1
) -> np.ndarray:
    """Split touching objects of a boolean mask by a watershed of its distance transform.

    Markers are the local maxima of the Euclidean distance transform found per connected
    component (``peak_local_max`` with ``labels``, at least ``min_distance`` apart), so a
    component's split depends only on the component (and the one-pixel rim around it), never on
    its neighbours or on where a window cuts the image; flooding follows a strict order
    (distance, then raster position) for the same reason. Returns int64 labels, 0 = background.
    """
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    structure = _structure(mask.ndim, connectivity)
    components, n = ndimage.label(mask, structure)
    if n == 0:
        return np.zeros(mask.shape, np.int64)
    distance = ndimage.distance_transform_edt(mask)
    peaks = peak_local_max(
        distance, min_distance=max(1, min_distance), labels=components, exclude_border=False
    )
    seeds = np.zeros(mask.shape, bool)
    seeds[tuple(peaks.T)] = True
    markers, _ = ndimage.label(seeds, structure)
    # Flood by a strict order: descending distance, ties by raster position. skimage breaks ties
    # of equal priority by push order, which with equal-distance peaks (distances are square
    # roots of integers: ties are common) depends on the other objects in the window; a unique
    # rank makes each component's flooding depend on the component alone.
    inside = np.flatnonzero(mask)
    order = np.argsort(-distance.ravel()[inside], kind="stable")
    rank = np.zeros(mask.size, np.float64)
    rank[inside[order]] = np.arange(1, len(inside) + 1)
    out = watershed(rank.reshape(mask.shape), markers, mask=mask, connectivity=connectivity)
    return out.astype(np.int64, copy=False)


def _foreground(plan: _Plan, window: tuple[slice, ...], *, path: str | None = None) -> np.ndarray:
    """The foreground of ``window`` of the output (of the array group ``path`` on its grid)."""
    rule, path = plan.criteria, path or plan.output
    if rule.source == "labels":
        classes = open_array(path, f"{LABELS_PATH}/0")[window]
        if rule.foreground_classes is None:
            return classes > 0
        return np.isin(classes, rule.foreground_classes)
    p = open_array(path, "0")[(slice(None), *window)].astype(np.float32)
    if plan.classes == 1:  # one sigmoid class: its probability is the foreground's
        q = p[0]
    elif rule.foreground_classes is None:
        q = 1 - p[0]
    else:
        q = p[list(rule.foreground_classes)].sum(axis=0)
    return q > rule.threshold


def _without_specks(mask: np.ndarray, rule: Criteria) -> np.ndarray:
    """``mask`` without its connected components of fewer than ``rule.min_area`` pixels."""
    if rule.min_area <= 0:
        return mask
    components, _ = ndimage.label(mask, _structure(mask.ndim, rule.connectivity))
    keep = np.bincount(components.ravel()) >= rule.min_area
    keep[0] = False
    return keep[components]


def _label_block(item: tuple[_Plan, tuple[int, ...]]) -> dict[str, int]:
    plan, coords = item
    rule, region = plan.criteria, plan.region(0, coords)
    # a halo shows the block every speck that touches it whole, and the watershed its objects
    halo = rule.halo if rule.watershed or rule.min_area > 0 else 0
    window = tuple(
        slice(max(0, r.start - halo), min(n, r.stop + halo))
        for r, n in zip(region, plan.shape, strict=True)
    )
    if rule.watershed:
        extended = _split(plan, window)
    else:
        mask = _without_specks(_foreground(plan, window), rule)
        extended, _ = ndimage.label(mask, _structure(plan.ndim, rule.connectivity))
    crop = tuple(
        slice(r.start - w.start, r.stop - w.start) for r, w in zip(region, window, strict=True)
    )
    # Consecutive local ids for what the block owns; ids seen only in the halo become 0.
    present = np.unique(extended[crop])
    present = present[present > 0]
    lookup = np.zeros(int(extended.max()) + 1, np.uint64)
    index = int(np.ravel_multi_index(coords, plan.grid))
    lookup[present] = (np.uint64(index) << np.uint64(plan.shift)) | np.arange(
        1, len(present) + 1, dtype=np.uint64
    )
    ids = lookup[extended]
    open_array(plan.scratch, "labels")[region] = ids[crop]
    sides: dict[str, np.ndarray] = {}
    for d in range(plan.ndim):
        planes = []
        for pos in (region[d].start - 1, region[d].start, region[d].stop - 1, region[d].stop):
            inside = window[d].start <= pos < window[d].stop
            sl = list(crop)
            sl[d] = pos - window[d].start if inside else crop[d].start
            planes.append(ids[tuple(sl)] if inside else np.zeros_like(ids[tuple(sl)]))
        other = list(region)
        other[d] = slice(4 * coords[d], 4 * coords[d] + 4)
        open_array(plan.scratch, f"faces-{d}")[tuple(other)] = np.stack(planes, axis=d)
        for side, pair in enumerate((planes[:2], planes[2:])):
            keys = np.unique(np.concatenate([p.ravel() for p in pair]))
            keys = keys[keys > 0]
            sides[f"k{d}{side}"] = sides[f"r{d}{side}"] = keys
    _save_npz(plan.path("sides", 0, f"{index}.npz"), sides)
    return {"block": index, "labels": len(present)}


def _split(plan: _Plan, window: tuple[slice, ...]) -> np.ndarray:
    """:func:`watershed_split` of ``window``'s foreground: on the output's grid, or on the grid
    its labels came from (``plan.split_on``), brought to the window by nearest neighbour."""
    rule, grid = plan.criteria, plan.split_on
    if grid is None:
        mask = _without_specks(_foreground(plan, window), rule)
        return watershed_split(mask, min_distance=rule.min_distance, connectivity=rule.connectivity)
    from pipeline.resample import nearest_source

    shape = open_array(grid.path, f"{LABELS_PATH}/0").shape
    index = [
        nearest_source(w.start, w.stop, f, n)
        for w, f, n in zip(window, grid.factors, shape, strict=True)
    ]
    # At the image's edges the grid's own edge rows belong to the window too: an enlarged
    # grid's row 0 lies under no input pixel's centre, yet it is part of the objects there.
    source = tuple(
        slice(0 if w.start == 0 else int(ix[0]), n if w.stop == m else int(ix[-1]) + 1)
        for w, ix, n, m in zip(window, index, shape, plan.shape, strict=True)
    )
    mask = _without_specks(_foreground(plan, source, path=grid.path), rule)
    split = watershed_split(mask, min_distance=rule.min_distance, connectivity=rule.connectivity)
    return split[np.ix_(*(ix - s.start for ix, s in zip(index, source, strict=True)))]


# ----------------------------------------------------------------------------- writing


def _write_block(item: tuple[_Plan, tuple[int, ...], bool, str]) -> dict[str, int]:
    plan, coords, consecutive, dtype = item
    region = plan.region(0, coords)
    ids = open_array(plan.scratch, "labels")[region]
    values, inverse = np.unique(ids, return_inverse=True)
    for merge in _ancestor_maps(plan, coords):
        values = _apply(merge, values)
    if consecutive:
        offsets = _load(str(plan.path("offsets.npy")))
        owner = (values >> np.uint64(plan.shift)).astype(np.int64)
        local = values & np.uint64((1 << plan.shift) - 1)
        final = np.zeros(len(values), np.uint64)
        for b in np.unique(owner[values > 0]):
            sel = (owner == b) & (values > 0)
            nonroots = _load(str(plan.path("nonroots", f"{b}.npy")))
            rank = local[sel] - np.searchsorted(nonroots, local[sel]).astype(np.uint64)
            final[sel] = np.uint64(offsets[b]) + rank
        values = final
    out = values[inverse.reshape(ids.shape)].astype(dtype)
    # Opened afresh, not from the per-process cache: a rerun may have recreated the array with
    # another dtype, and a distributed worker would still hold the old handle.
    target = Path(plan.output, labels_image_path(plan.name), "0")
    zarr.open_array(target, mode="r+", zarr_format=2)[region] = out
    return {"objects": int(np.count_nonzero(values))}


def _pyramid(item: tuple[str, str, int, tuple[slice, ...]]) -> None:
    output, name, level, region = item
    downsample_labels_region(output, name, level, region)


# ----------------------------------------------------------------------------- driver


def label_instances(
    output: str | os.PathLike[str],
    *,
    source: str = "labels",
    foreground_classes: tuple[int, ...] | None = None,
    threshold: float = 0.5,
    connectivity: int = 1,
    watershed: bool = False,
    min_distance: int = 7,
    halo: int = 64,
    min_area: int = 0,
    block_chunks: int = 2,
    consecutive: bool = True,
    name: str = "instances",
    split_on: SplitGrid | None = None,
    scheduler: str | None = None,
    workers: int = 1,
) -> InstanceSummary:
    """Label the objects of a segmentation output and write them as ``labels/<name>``.

    Parameters
    ----------
    output
        A tileseg output (``OUTPUT.zarr``).
    source
        ``"labels"``: foreground where the class labels are in ``foreground_classes`` (default:
        any class > 0). ``"probabilities"``: where the summed probability of
        ``foreground_classes`` (default: 1 - background; a one-class model's own) > ``threshold``.
    connectivity
        1 (faces) to ndim (faces, edges and corners), as for ``scipy.ndimage``.
    watershed
        Split touching objects (:func:`watershed_split` with ``min_distance``) on each block
        plus ``halo`` px; exact for objects at most ``halo`` px across (see the module doc).
    min_area
        Connected components of the foreground smaller than this many output pixels are
        left out as specks (on the grid split on, the same area there). Exact at any area:
        the blocks' halo grows to hold any speck whole.
    block_chunks
        Output chunks per block side in the labelling and writing tasks.
    consecutive
        Number the objects 1..N (else the sparse ids ``block << shift | local`` are kept).
    split_on
        The grid the output's labels were resampled from by nearest neighbour: the watershed
        splits there (``min_distance`` in its pixels; ``halo`` stays in output pixels) and the
        split is brought over the same way. Exact, as on the output's grid, for objects at most
        ``halo`` output px across less one pixel of that grid.

    Returns the summary; the labels image records the same in ``.zattrs["tileseg-instances"]``.
    """
    started = time.perf_counter()
    output = os.fspath(Path(output).absolute())
    layout = read_layout(output)
    factors = split_on.factors if watershed and split_on is not None else (1.0,)
    floor = min_area / math.prod(factors)  # in pixels of the grid the foreground is read on
    if min_area > 0:  # a speck spans at most its area in pixels, in output px at most this
        halo = max(halo, math.ceil(floor * max(factors)) + 1)
    criteria = Criteria(
        source=source,
        foreground_classes=tuple(map(int, foreground_classes)) if foreground_classes else None,
        threshold=float(threshold), connectivity=int(connectivity), watershed=bool(watershed),
        min_distance=int(min_distance), halo=int(halo), min_area=floor,
    )  # fmt: skip
    plan = _plan(output, layout, criteria, block_chunks=block_chunks, name=name)
    if watershed and split_on is not None:  # read by tasks, wherever they run
        grid = replace(split_on, path=os.fspath(Path(split_on.path).absolute()))
        plan = replace(plan, split_on=grid)
    _create_scratch(plan)
    try:
        objects, dtype, edges = _label(
            plan, layout, consecutive=consecutive, run={"scheduler": scheduler, "workers": workers}
        )
    finally:
        forget_arrays(plan.scratch)
        _load.cache_clear()
        shutil.rmtree(plan.scratch, ignore_errors=True)
    return _finish(
        plan, objects=objects, dtype=dtype, edges=edges, consecutive=consecutive, started=started
    )


def _finish(
    plan: _Plan, *, objects: int, dtype: str, edges: int, consecutive: bool, started: float
) -> InstanceSummary:
    """Record how the labels were made on the labels image; the summary."""
    summary = InstanceSummary(
        output=plan.output, name=plan.name, objects=objects, dtype=dtype,
        blocks=int(np.prod(plan.grid)), rounds=plan.rounds, edges=edges,
        seconds=time.perf_counter() - started, watershed=plan.criteria.watershed,
        consecutive=consecutive,
        split_on_factors=list(plan.split_on.factors) if plan.split_on else None,
    )  # fmt: skip
    path = Path(plan.output) / labels_image_path(plan.name)
    group = zarr.open_group(path, mode="r+", zarr_format=2)
    group.attrs["tileseg-instances"] = {
        **_attrs(plan, consecutive=consecutive), "objects": objects,
        "split_on_factors": summary.split_on_factors,
    }  # fmt: skip
    return summary


def _plan(
    output: str, layout: OutputLayout, criteria: Criteria, *, block_chunks: int, name: str
) -> _Plan:
    """Check the criteria against the output and plan the blocks, with a fresh scratch name
    (stale scratch folders removed)."""
    source, connectivity = criteria.source, criteria.connectivity
    if source not in ("labels", "probabilities"):
        raise TilesegError(
            "--instances-source", f"must be 'labels' or 'probabilities', not {source!r}"
        )
    if source == "probabilities" and not layout.probability_dtype:
        raise TilesegError(output, "has no probabilities (segment with --save-probabilities)")
    if not 1 <= connectivity <= layout.ndim:
        raise TilesegError("--connectivity", f"must be 1..{layout.ndim}, not {connectivity}")
    block = tuple(
        min(c * block_chunks, n) for c, n in zip(layout.chunks, layout.spatial_shape, strict=True)
    )
    grid = tuple(-(-n // b) for n, b in zip(layout.spatial_shape, block, strict=True))
    shift = max(1, int(np.prod(block)).bit_length())
    if shift + max(1, int(np.prod(grid)).bit_length()) > 63:
        raise TilesegError(output, "too many blocks for 64-bit ids (use larger chunks)")
    if name == LABELS_PATH.split("/")[-1] or not name or "/" in name or name.startswith("."):
        raise TilesegError("--name", f"invalid labels image name {name!r}")
    for stale in Path(output).glob(f".tileseg-instances-{name}-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    # A fresh scratch name per run: workers cache merge maps by path.
    scratch = Path(output) / f".tileseg-instances-{name}-{uuid.uuid4().hex[:12]}"
    return _Plan(
        output=output, name=name, scratch=os.fspath(scratch), shape=layout.spatial_shape,
        block=block, grid=grid, shift=shift, classes=layout.classes, criteria=criteria,
    )  # fmt: skip


def _create_scratch(plan: _Plan) -> None:
    """The scratch arrays: block-local labels and the labels on each block face."""
    group = zarr.open_group(plan.scratch, mode="w", zarr_format=2)
    create_array(group, "labels", plan.shape, plan.block, "uint64")
    for d in range(plan.ndim):
        shape = list(plan.shape)
        chunks = list(plan.block)
        shape[d], chunks[d] = 4 * plan.grid[d], 1
        create_array(group, f"faces-{d}", shape, chunks, "uint64")
    forget_arrays(plan.scratch)


def _label(
    plan: _Plan, layout: OutputLayout, *, consecutive: bool, run: dict[str, Any]
) -> tuple[int, str, int]:
    """Label the blocks, merge them across faces and write the labels image with its
    pyramid; the number of objects, the labels' dtype and the merged edges."""
    blocks = list(np.ndindex(*plan.grid))
    labelled = run_tasks(_label_block, [(plan, c) for c in blocks], **run, name="instances-label")
    edges = 0
    for level in range(1, plan.rounds + 1):
        items = [(plan, level, c) for c in np.ndindex(*plan.tier_grid(level))]
        edges += sum(
            r["edges"] for r in run_tasks(_merge, items, **run, name=f"instances-merge-{level}")
        )
    counts = [r["labels"] for r in labelled]
    items = [(plan, c, n) for c, n in zip(blocks, counts, strict=True)]
    roots = [r["roots"] for r in run_tasks(_count, items, **run, name="instances-count")]
    roots = np.array(roots, np.int64)
    objects = int(roots.sum())
    if consecutive:
        offsets = np.concatenate([[0], np.cumsum(roots)[:-1]]).astype(np.uint64)
        _save_npy(plan.path("offsets.npy"), offsets)
        largest = objects
    else:
        largest = ((len(blocks) - 1) << plan.shift) | max([*counts, 0])
    dtype = "uint32" if largest < 2**32 else "uint64"
    create_labels_image(plan.output, plan.name, layout, dtype)
    items = [(plan, c, consecutive, dtype) for c in blocks]
    run_tasks(_write_block, items, **run, name="instances-write")
    image_layout = OutputLayout(
        layout.spatial_shape, layout.chunks, 0, dtype, None, layout.pixel_size
    )
    for level in range(1, len(image_layout.levels)):
        jobs = [(plan.output, plan.name, level, r) for r in level_regions(image_layout, level)]
        run_tasks(_pyramid, jobs, **run, name="instances-pyramid")
    return objects, dtype, edges


def _attrs(plan: _Plan, *, consecutive: bool) -> dict[str, Any]:
    """How the labels were made, as the labels image records it."""
    made = asdict(plan.criteria)
    return {
        **made, "foreground_classes": list(made["foreground_classes"] or []),
        "consecutive": consecutive,
    }  # fmt: skip
