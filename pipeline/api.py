"""The Python entry point: segment a file, a numpy array, a dask array or a zarr array.

An in-memory array is written once into a Zarr store beside the output
(``.NAME.input.zarr``), so that tasks read it window by window like any other input, on any
scheduler, and an interrupted call resumes like the command line does; the store is removed
once the output is complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import options_from_mapping
from pipeline.engine.driver import SegmentResult, segment_image
from pipeline.errors import TilesegError

__all__ = ["segment"]


def segment(
    image: str | os.PathLike[str] | Any,
    output: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | None = None,
    axes: str | None = None,
    progress: bool = False,
    **options: Any,
) -> SegmentResult:
    """Segment one image into an OME-Zarr output, exactly as ``tileseg segment`` does.

    Parameters
    ----------
    image
        A path (TIFF family, Zarr, OME-Zarr), or an array: numpy, dask or zarr.
    output
        The OME-Zarr directory to write (resumed or skipped as by the command line).
    model
        A model file; ``None``: the shipped default model.
    axes
        The array's axes (``YX``, ``CYX``, ``YXS``, ``ZYX``, ...); for arrays, required unless
        the array is 2D (``YX``). For files, as ``--axes``.
    progress
        Show a progress bar on stderr.
    **options
        Any option of ``tileseg segment`` by its config name (``tile=512``,
        ``instances="watershed"``, ``save_probabilities=True``, ...).

    Returns
    -------
    SegmentResult
        Shape, timings, the provenance record and where the output is.
    """
    settings = {**options, "model": None if model is None else os.fspath(model), "axes": axes}
    opts = options_from_mapping({k: v for k, v in settings.items() if v is not None})
    bar = _progress_bar() if progress else None
    if isinstance(image, str | os.PathLike):
        return segment_image(image, output, opts, progress=bar)
    store = _store_beside(output)
    _write_array(image, store, axes=axes)
    result = segment_image(store, output, opts, progress=bar)
    shutil.rmtree(store, ignore_errors=True)
    return result


def _store_beside(output: str | os.PathLike[str]) -> Path:
    out = Path(output).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.with_name(f".{out.name}.input.zarr")


def _write_array(array: Any, store: Path, *, axes: str | None) -> None:
    """Write ``array`` as a Zarr v3 array with dimension names (the same bytes every time, so
    an interrupted call resumes); a zarr array on a local store is copied too, with its own
    chunks."""
    import zarr

    ndim = len(getattr(array, "shape", ()))
    if axes is None and ndim != 2:
        raise TilesegError("axes", f"a {ndim}D array needs axes (e.g. axes='CYX')")
    axes = axes or "YX"
    if len(axes) != ndim:
        raise TilesegError("axes", f"axes {axes!r} do not match the array's {ndim} dimensions")
    chunks = getattr(array, "chunksize", None) or getattr(array, "chunks", None)
    if not isinstance(chunks, tuple) or len(chunks) != ndim:
        chunks = tuple(
            min(n, 1024 if ax in "YX" else 1) for ax, n in zip(axes, array.shape, strict=True)
        )
    dtype = np.dtype(array.dtype)
    target = zarr.create_array(
        store, shape=array.shape, chunks=chunks, dtype=dtype, dimension_names=list(axes),
        overwrite=True,
    )  # fmt: skip
    if hasattr(array, "compute") and hasattr(array, "store"):  # a dask array: block by block
        array.store(target, lock=False)
    else:
        for index in np.ndindex(*[-(-n // c) for n, c in zip(array.shape, chunks, strict=True)]):
            region = tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunks, strict=True))
            target[region] = np.asarray(array[region])


def _progress_bar():
    from tqdm import tqdm

    bar = tqdm(total=100, unit="%", bar_format="{percentage:3.0f}%|{bar}| {elapsed}<{remaining}")

    def update(done: int, total: int) -> None:
        bar.update(100 * done / total - bar.n)
        if done >= total:
            bar.close()

    return update
