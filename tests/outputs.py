"""Fake segmentation outputs (no model): real OME-Zarr files holding given class labels."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr

from pipeline.output.ngff import (
    LABELS_PATH,
    OutputLayout,
    _mean2,
    create_output,
    forget_arrays,
    open_array,
)
from pipeline.output.provenance import done_dir


def make_output(
    path: Path,
    labels: np.ndarray,
    chunks: tuple[int, ...],
    *,
    classes: int = 2,
    probabilities: np.ndarray | None = None,
    pixel_size: tuple[float, ...] | None = None,
) -> OutputLayout:
    """Write ``labels`` (and ``probabilities``, (classes, ...)) as level 0 of a new output."""
    layout = OutputLayout(
        spatial_shape=labels.shape,
        chunks=tuple(min(c, n) for c, n in zip(chunks, labels.shape)),
        classes=classes,
        label_dtype="|u1",
        probability_dtype="<f4" if probabilities is not None else None,
        pixel_size=pixel_size,
    )
    create_output(path, layout, overwrite=True, attrs={})
    forget_arrays(path)
    open_array(path, f"{LABELS_PATH}/0")[...] = labels.astype(np.uint8)
    if probabilities is not None:
        open_array(path, "0")[...] = probabilities.astype(np.float32)
    return layout


def one_to_one(a: np.ndarray, b: np.ndarray) -> bool:
    """True when the nonzero labels of a and b are the same partition (labels renumbered)."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def chunk_files(output: Path) -> dict[str, bytes]:
    """Every array chunk of an output (metadata and markers excluded), by relative path."""
    files = {}
    for path in sorted(output.rglob("*")):
        rel = path.relative_to(output)
        if path.is_file() and not path.name.startswith(".") and ".tileseg" not in rel.parts:
            files[str(rel)] = path.read_bytes()
    return files


def assert_pyramid_from_level_below(out: Path) -> int:
    """Every pyramid level above 0 holds exactly what is computed from the stored level below
    it (every second label, 2x2 means of the stored probabilities), whoever wrote it. Returns
    the number of levels above 0."""
    root = zarr.open_group(out, mode="r")
    k = 1
    while f"{LABELS_PATH}/{k}" in root:
        below, here = root[f"{LABELS_PATH}/{k - 1}"][...], root[f"{LABELS_PATH}/{k}"][...]
        np.testing.assert_array_equal(here, below[..., ::2, ::2])
        if str(k) in root:
            p = root[str(k - 1)][...]
            np.testing.assert_array_equal(
                root[str(k)][...], _mean2(p.astype(np.float32)).astype(p.dtype)
            )
        k += 1
    return k - 1


def wait_for_done_tasks(
    out: Path, count: int, *, running: Callable[[], bool], timeout: float = 120
) -> None:
    """Wait until ``count`` inference tasks of the run writing ``out`` are marked done (to kill
    it mid-run), the run still ``running()`` all the while."""
    markers = done_dir(out)
    deadline = time.monotonic() + timeout
    while not (markers.exists() and len(list(markers.glob("tiles-*"))) >= count):
        assert running(), "the run finished before it could be killed"
        assert time.monotonic() < deadline, f"{count} tasks not done within {timeout} s"
        time.sleep(0.01)
