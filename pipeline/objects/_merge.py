"""The merge half of instance labelling: block ids joined into objects across block faces.

Holds the plan that every task of :func:`pipeline.objects.instances.label_instances` gets
(:class:`_Plan`:
image and block geometry, the tree of super-blocks, the scratch folder, the labelling options),
the scratch-file writers, and steps 2 and 3 of the algorithm described in
:mod:`pipeline.objects.instances`:

- :func:`_merge`, one task per super-block of a round of the tree reduction: the id pairs across
  the face planes on the cross between its children (:func:`_pairs`), joined with
  :func:`scipy.sparse.csgraph.connected_components` into its merge map (representative -> the
  smallest id of its group), and the ids it passes up on its outer faces;
- :func:`_apply` and :func:`_ancestor_maps`: an id's root through the merge maps of a block's
  ancestors (used by the count below and by the write tasks);
- :func:`_count`, one task per block: its ids that are not roots, for consecutive numbering.

Nothing here reads whole blocks of pixels: only face planes and small ``.npy``/``.npz`` files in
the scratch folder. Task functions stay at module level, where Dask pickles them by path.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.output.ngff import open_array

if TYPE_CHECKING:
    from pipeline.objects.instances import SplitGrid


@dataclass(frozen=True)
class Criteria:
    """What makes an object: the foreground rule, the connectivity and the watershed split
    (the options of :func:`pipeline.objects.instances.label_instances` that shape every task)."""

    source: str
    foreground_classes: tuple[int, ...] | None
    threshold: float
    connectivity: int
    watershed: bool
    min_distance: int
    halo: int
    min_area: float = 0.0  # specks left out: px of the grid the foreground is read on


@dataclass(frozen=True)
class _Plan:
    """Everything a task needs; small and picklable."""

    output: str
    name: str
    scratch: str
    shape: tuple[int, ...]
    block: tuple[int, ...]
    grid: tuple[int, ...]  # blocks per axis
    shift: int  # local ids use the low ``shift`` bits
    classes: int
    criteria: Criteria
    split_on: SplitGrid | None = None  # the grid the watershed splits on, if not the output's

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def rounds(self) -> int:
        return max((math.ceil(math.log2(g)) if g > 1 else 0) for g in self.grid)

    def tier_grid(self, level: int) -> tuple[int, ...]:
        return tuple(-(-g // 2**level) for g in self.grid)

    def region(self, level: int, coords: tuple[int, ...]) -> tuple[slice, ...]:
        """Pixel region of super-block ``coords`` of round ``level`` (level 0: one block)."""
        span = [b * 2**level for b in self.block]
        return tuple(
            slice(c * s, min((c + 1) * s, n))
            for c, s, n in zip(coords, span, self.shape, strict=True)
        )

    def path(self, *parts: object) -> Path:
        return Path(self.scratch).joinpath(*map(str, parts))


# ----------------------------------------------------------------------------- scratch files


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # a rerun task never leaves a half-written file behind


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- merging


def _children(plan: _Plan, level: int, coords: tuple[int, ...]) -> list[tuple[int, ...]]:
    below = plan.tier_grid(level - 1)
    ranges = [[c for c in (2 * s, 2 * s + 1) if c < g] for s, g in zip(coords, below, strict=True)]
    return list(itertools.product(*ranges))


def _pairs(plan: _Plan, planes: np.ndarray, d: int) -> np.ndarray:
    """Id pairs (k, 2) across one boundary from its four planes (hi_in, hi_out of the lower
    block row, lo_out, lo_in of the upper one, stacked on axis 0)."""
    hi_in, hi_out, lo_out, lo_in = planes
    if plan.criteria.watershed:  # the same pixel, labelled by both blocks
        a = np.concatenate([hi_out.ravel(), hi_in.ravel()])
        b = np.concatenate([lo_in.ravel(), lo_out.ravel()])
    else:  # neighbouring pixels across the boundary, as allowed by the connectivity
        parts_a, parts_b = [], []
        for delta in itertools.product((-1, 0, 1), repeat=plan.ndim - 1):
            if 1 + sum(map(abs, delta)) > plan.criteria.connectivity:
                continue
            sa = tuple(
                slice(1, None) if t > 0 else slice(None, -1) if t < 0 else slice(None)
                for t in delta
            )
            sb = tuple(
                slice(None, -1) if t > 0 else slice(1, None) if t < 0 else slice(None)
                for t in delta
            )
            parts_a.append(hi_in[sa].ravel())
            parts_b.append(lo_in[sb].ravel())
        a, b = np.concatenate(parts_a), np.concatenate(parts_b)
    keep = (a > 0) & (b > 0)
    pairs = np.stack([a[keep], b[keep]], axis=1)
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


def _block_coords(plan: _Plan, ids: np.ndarray) -> np.ndarray:
    index = (ids >> np.uint64(plan.shift)).astype(np.int64)
    return np.stack(np.unravel_index(index, plan.grid), axis=-1)


def _merge(item: tuple[_Plan, int, tuple[int, ...]]) -> dict[str, int]:
    plan, level, coords = item
    children = _children(plan, level, coords)
    below = plan.tier_grid(level - 1)
    maps = {
        c: np.load(plan.path("sides", level - 1, f"{np.ravel_multi_index(c, below)}.npz"))
        for c in children
    }
    keys = np.concatenate(
        [m[f"k{d}{s}"] for m in maps.values() for d in range(plan.ndim) for s in (0, 1)]
    )
    reps = np.concatenate(
        [m[f"r{d}{s}"] for m in maps.values() for d in range(plan.ndim) for s in (0, 1)]
    )
    keys, first = np.unique(keys, return_index=True)
    reps = reps[first]

    region = plan.region(level, coords)
    lo_block = np.array(coords) * 2**level
    hi_block = np.minimum(lo_block + 2**level, plan.grid)
    all_pairs = [np.zeros((0, 2), np.uint64)]
    for d in range(plan.ndim):
        i = (2 * coords[d] + 1) * 2 ** (level - 1) - 1  # last block row of the first child
        if i + 1 >= plan.grid[d] or i + 1 >= hi_block[d]:
            continue  # one child along d: no cross here
        sel = [
            slice(max(0, r.start - 1), min(n, r.stop + 1))
            for r, n in zip(region, plan.shape, strict=True)
        ]
        sel[d] = slice(4 * i + 2, 4 * i + 6)
        planes = open_array(plan.scratch, f"faces-{d}")[tuple(sel)]
        pairs = _pairs(plan, np.moveaxis(planes, d, 0), d)
        # Pairs found in the one-pixel margin may belong to other super-blocks: theirs.
        inside = np.ones(len(pairs), bool)
        for col in (0, 1):
            bc = _block_coords(plan, pairs[:, col])
            inside &= np.all((bc >= lo_block) & (bc < hi_block), axis=1)
        all_pairs.append(pairs[inside])
    pairs = np.concatenate(all_pairs)
    pos = np.searchsorted(keys, pairs)
    if len(pairs) and (
        np.any(pos >= len(keys)) or np.any(keys[np.minimum(pos, len(keys) - 1)] != pairs)
    ):
        raise AssertionError("face id missing from the children's side maps")  # a bug, not input
    pairs = reps[pos] if len(pairs) else pairs
    nodes, inverse = np.unique(pairs, return_inverse=True)
    inverse = inverse.reshape(pairs.shape)
    n = len(nodes)
    graph = coo_matrix((np.ones(len(pairs), np.int8), (inverse[:, 0], inverse[:, 1])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    root = np.full(component.max() + 1 if n else 0, np.iinfo(np.uint64).max, np.uint64)
    np.minimum.at(root, component, nodes)
    roots = root[component] if n else nodes
    moved = roots != nodes
    merge = np.stack([nodes[moved], roots[moved]])  # sorted by key, as nodes are
    index = int(np.ravel_multi_index(coords, plan.tier_grid(level)))
    _save_npy(plan.path("merge", level, f"{index}.npy"), merge)

    sides: dict[str, np.ndarray] = {}
    for d in range(plan.ndim):
        for s in (0, 1):
            edge = min(2 * coords[d] + 1, below[d] - 1) if s else 2 * coords[d]
            ks = [maps[c][f"k{d}{s}"] for c in children if c[d] == edge]
            rs = [maps[c][f"r{d}{s}"] for c in children if c[d] == edge]
            sides[f"k{d}{s}"] = np.concatenate(ks)
            sides[f"r{d}{s}"] = _apply(merge, np.concatenate(rs))
    _save_npz(plan.path("sides", level, f"{index}.npz"), sides)
    return {"edges": len(pairs), "merged": int(moved.sum())}


def _apply(merge: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Map ids through a sorted (2, m) merge map; ids not in it are unchanged."""
    if not merge.shape[1] or not len(ids):
        return ids
    pos = np.minimum(np.searchsorted(merge[0], ids), merge.shape[1] - 1)
    hit = merge[0][pos] == ids
    return np.where(hit, merge[1][pos], ids)


@lru_cache(maxsize=256)
def _load(path: str) -> np.ndarray:
    return np.load(path)


def _ancestor_maps(plan: _Plan, coords: tuple[int, ...]) -> list[np.ndarray]:
    maps = []
    for level in range(1, plan.rounds + 1):
        up = tuple(c >> level for c in coords)
        index = int(np.ravel_multi_index(up, plan.tier_grid(level)))
        maps.append(_load(str(plan.path("merge", level, f"{index}.npy"))))
    return maps


# ----------------------------------------------------------------------------- numbering


def _count(item: tuple[_Plan, tuple[int, ...], int]) -> dict[str, int]:
    plan, coords, labels = item
    index = int(np.ravel_multi_index(coords, plan.grid))
    keys = np.concatenate([m[0] for m in _ancestor_maps(plan, coords)] + [np.zeros(0, np.uint64)])
    mine = keys[(keys >> np.uint64(plan.shift)) == np.uint64(index)]
    local = np.unique(mine & np.uint64((1 << plan.shift) - 1))
    _save_npy(plan.path("nonroots", f"{index}.npy"), local)
    return {"block": index, "roots": labels - len(local)}
