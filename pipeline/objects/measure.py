"""Per-object measurements of an instance labels image, block by block, into Parquet or CSV.

:func:`measure_objects` reads ``labels/<name>`` (from
:func:`pipeline.objects.instances.label_instances`),
the class labels and, optionally, the input image in blocks of output chunks. Each block task
reduces its pixels to *partial sums* per object (pixel count, coordinate sums, bounding box,
intensity sums per channel, pixel counts per class) and writes them to scratch files, bucketed by
object id. One reduce task per bucket then combines the partials of the objects in its id range
(an object cut by block borders is summed exactly, whatever the blocks) and writes one part of
the table; the driver only streams the parts into the final file. No task holds more than one
block or one bucket of objects, and no pixel data goes through the scheduler.

Columns (pixel units; ``*_um*`` columns in micrometres when the pixel size is known)::

    id, class, area, centroid_[z,]y,x, bbox_[z,]y,x_min, bbox_[z,]y,x_max (half-open: one past
    the last pixel, as skimage's regionprops), mean_intensity_c<k> per image channel,
    area_um2 / volume_um3, centroid_[z,]y,x_um, bbox_[z,]y,x_min_um, bbox_[z,]y,x_max_um

Units, descriptions and conventions are stored in the Parquet file
(:mod:`pipeline.objects.table_schema`).

``class`` is the object's majority class in ``labels/segmentation`` (0 only when all its pixels
are background there, e.g. for instances from thresholded probabilities).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.errors import TilesegError
from pipeline.io.readers import ImageSpec, LazyImage, cached_image
from pipeline.objects.table_schema import with_metadata
from pipeline.output.ngff import (
    LABELS_PATH,
    OutputLayout,
    labels_image_path,
    level_regions,
    open_array,
    read_layout,
)
from pipeline.runtime.execution import run_tasks

__all__ = ["MeasureSummary", "measure_objects", "table_note"]

_BUCKET_OBJECTS = 250_000  # objects per reduce task (and per part of the table)


@dataclass(frozen=True)
class MeasureSummary:
    """Per-slide counts of a measured instance image."""

    output: str
    name: str
    table: str
    format: str
    objects: int
    per_class: dict[int, int]
    foreground_area: int  # pixels (voxels in 3D) inside objects
    foreground_area_um2: float | None  # 2D, when the pixel size is known
    foreground_volume_um3: float | None  # 3D, when the voxel size is known
    pixel_size: tuple[float, ...] | None
    seconds: float
    columns: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """For the output's record: paths inside the output relative to it (they stay right
        when the output is moved), the output itself left out."""
        out = dict(self.__dict__)
        del out["output"]
        table = Path(self.table)
        if table.is_relative_to(self.output):
            out["table"] = os.fspath(table.relative_to(self.output))
        out["per_class"] = {str(k): v for k, v in self.per_class.items()}
        out["columns"] = list(self.columns)
        return out


@dataclass(frozen=True)
class _Plan:
    output: str
    name: str
    scratch: str
    shape: tuple[int, ...]
    classes: int  # class histogram width
    image: ImageSpec | None
    buckets: int
    largest: int  # largest id when ids are consecutive (range buckets), else 0 (modulo buckets)
    pixel_size: tuple[float, ...] | None
    note: str = "{}"  # JSON: the Parquet file's tileseg metadata

    def bucket(self, ids: np.ndarray) -> np.ndarray:
        if self.largest:
            return ((ids - 1) * self.buckets // self.largest).astype(np.int64)
        return (ids % np.uint64(self.buckets)).astype(np.int64)


def _partial(item: tuple[_Plan, int, tuple[slice, ...]]) -> dict[str, int]:
    plan, index, region = item
    # Opened afresh (not cached): the instances may have been relabelled since, as another dtype.
    source = Path(plan.output, labels_image_path(plan.name), "0")
    ids = zarr.open_array(source, mode="r", zarr_format=2)[region]
    fg = ids > 0
    if not fg.any():
        return {"pixels": 0}
    classes = open_array(plan.output, f"{LABELS_PATH}/0")[region][fg].astype(np.int64)
    values, inverse = np.unique(ids[fg], return_inverse=True)
    n = len(values)
    coords = [c + r.start for c, r in zip(np.nonzero(fg), region, strict=True)]
    order = np.argsort(inverse, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(inverse[order]) > 0])
    arrays: dict[str, np.ndarray] = {
        "id": values.astype(np.uint64),
        "area": np.bincount(inverse, minlength=n).astype(np.int64),
        "sum": np.stack([np.bincount(inverse, c.astype(np.float64), n) for c in coords], 1),
        "min": np.stack([np.minimum.reduceat(c[order], starts) for c in coords], 1),
        "max": np.stack([np.maximum.reduceat(c[order], starts) for c in coords], 1),
        "cls": np.bincount(
            inverse * plan.classes + np.minimum(classes, plan.classes - 1),
            minlength=n * plan.classes,
        ).reshape(n, plan.classes),
    }
    if plan.image is not None:
        pixels = cached_image(plan.image).read(region)[:, fg].astype(np.float64)
        arrays["intensity"] = np.stack([np.bincount(inverse, p, n) for p in pixels], 1)
    bucket = plan.bucket(values)
    for b in np.unique(bucket):
        sel = bucket == b
        path = Path(plan.scratch, f"{b}", f"{index}.npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **{k: v[sel] for k, v in arrays.items()})
        os.replace(tmp, path)
    return {"pixels": int(fg.sum())}


def _reduce(item: tuple[_Plan, int, str]) -> dict[str, Any]:
    plan, bucket, fmt = item
    directory = Path(plan.scratch, f"{bucket}")
    files = sorted(directory.glob("*.npz")) if directory.exists() else []
    if not files:
        return {"part": None, "objects": 0, "per_class": {}, "area": 0}
    parts = [dict(np.load(f)) for f in files]
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    ids, inverse = np.unique(cat["id"], return_inverse=True)
    n = len(ids)

    def total(values: np.ndarray) -> np.ndarray:
        out = np.zeros((n, *values.shape[1:]), values.dtype)
        np.add.at(out, inverse, values)
        return out

    area = total(cat["area"])
    lo = np.full((n, cat["min"].shape[1]), np.iinfo(np.int64).max, np.int64)
    hi = np.full_like(lo, -1)
    np.minimum.at(lo, inverse, cat["min"])
    np.maximum.at(hi, inverse, cat["max"])
    hist = total(cat["cls"])
    # Majority class among the object's foreground classes; 0 only if it has no other.
    fg_hist = hist[:, 1:]
    cls = np.where(fg_hist.sum(1) > 0, fg_hist.argmax(1) + 1, 0)
    centroid = total(cat["sum"]) / area[:, None]
    names = "zyx"[3 - len(plan.shape) :]
    columns: dict[str, np.ndarray] = {"id": ids, "class": cls.astype(np.int64), "area": area}
    for k, a in enumerate(names):
        columns[f"centroid_{a}"] = centroid[:, k]
    for k, a in enumerate(names):
        columns[f"bbox_{a}_min"] = lo[:, k]
    for k, a in enumerate(names):
        columns[f"bbox_{a}_max"] = hi[:, k] + 1
    if "intensity" in cat:
        mean = total(cat["intensity"]) / area[:, None]
        for c in range(mean.shape[1]):
            columns[f"mean_intensity_c{c}"] = mean[:, c]
    if plan.pixel_size:
        unit = "area_um2" if len(names) == 2 else "volume_um3"
        columns[unit] = area * float(np.prod(plan.pixel_size))
        for k, a in enumerate(names):
            columns[f"centroid_{a}_um"] = centroid[:, k] * plan.pixel_size[k]
        # Pixel i's centre lies at i * pixel size (NGFF): its edges half a pixel either side.
        for k, a in enumerate(names):
            columns[f"bbox_{a}_min_um"] = (lo[:, k] - 0.5) * plan.pixel_size[k]
        for k, a in enumerate(names):
            columns[f"bbox_{a}_max_um"] = (hi[:, k] + 0.5) * plan.pixel_size[k]
    part = Path(plan.scratch, "parts", f"{bucket:07d}.{fmt}")
    part.parent.mkdir(parents=True, exist_ok=True)
    _write_table(columns, part, fmt, header=True, note=json.loads(plan.note))
    classes, counts = np.unique(cls, return_counts=True)
    return {
        "part": os.fspath(part),
        "objects": n,
        "per_class": {int(c): int(k) for c, k in zip(classes, counts, strict=True)},
        "area": int(area.sum()),
        "columns": list(columns),
    }


def _write_table(
    columns: dict[str, np.ndarray], path: Path, fmt: str, *, header: bool, note: dict[str, Any]
) -> None:
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(with_metadata(pa.table(columns), note), path)
        return
    data = np.column_stack([np.asarray(v, dtype=object) for v in columns.values()])
    with open(path, "w", encoding="utf-8") as f:
        if header:
            f.write(",".join(columns) + "\n")
        for row in data:
            f.write(",".join(_csv(v) for v in row) + "\n")


def _csv(value: object) -> str:
    if isinstance(value, float | np.floating):
        return repr(float(value))
    return str(value)


def _concatenate(parts: list[str], table: Path, fmt: str) -> None:
    """Stream the parts into one file, one part in memory at a time."""
    tmp = table.with_name(table.name + ".tmp")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        writer = None
        try:
            for part in parts:
                t = pq.read_table(part)
                writer = writer or pq.ParquetWriter(tmp, t.schema)
                writer.write_table(t)
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            import pyarrow as pa

            pq.write_table(pa.table({"id": pa.array([], pa.uint64())}), tmp)
    else:
        with open(tmp, "w", encoding="utf-8") as out:
            for i, part in enumerate(parts):
                with open(part, encoding="utf-8") as f:
                    header = f.readline()
                    if i == 0:
                        out.write(header)
                    shutil.copyfileobj(f, out)
            if not parts:
                out.write("id\n")
    os.replace(tmp, table)


def table_note(
    layout: OutputLayout,
    *,
    name: str,
    pixel_size: Sequence[float] | None,
    image: LazyImage | None,
) -> dict[str, Any]:
    """The Parquet table's ``tileseg`` file metadata: what its rows describe and how."""
    return {
        "labels": labels_image_path(name),
        "segmentation": LABELS_PATH,
        "class_names": list(layout.names),
        "pixel_size_um": [float(p) for p in pixel_size] if pixel_size else None,
        "image": image.path if image is not None else None,
        "conventions": "pixel columns: indices of the segmented level, bbox half-open; "
        "*_um: NGFF physical coordinates (pixel i's centre at i * pixel size)",
    }


def measure_objects(
    output: str | os.PathLike[str],
    image: LazyImage | None,
    *,
    table_path: str | os.PathLike[str],
    name: str = "instances",
    format: str = "parquet",
    pixel_size: tuple[float, ...] | None = None,
    block_chunks: int = 2,
    scheduler: str | None = None,
    workers: int = 1,
) -> MeasureSummary:
    """Measure every object of ``labels/<name>`` and write the table to ``table_path``.

    Parameters
    ----------
    image
        The segmented image (same spatial shape as the output, i.e. the level that was
        segmented) for mean intensities per channel, or None for shape measurements only.
    format
        ``"parquet"`` (needs pyarrow) or ``"csv"``.
    pixel_size
        Micrometres per pixel (([z,] y, x)); default: the output's, else the image's, else none
        (no ``*_um`` columns).

    Returns the per-slide summary, also stored in ``labels/<name>/.zattrs["tileseg-measurements"]``.
    """
    started = time.perf_counter()
    output = os.fspath(Path(output).absolute())
    _check_format(format)
    layout = read_layout(output)
    info = _instances_info(output, name)
    pixel_size = _pixel_size(layout, image, pixel_size)
    plan = _plan(output, layout, info, name=name, image=image, pixel_size=pixel_size)
    table = Path(table_path)
    run = {"scheduler": scheduler, "workers": workers}
    try:
        regions = level_regions(layout, 0, chunks_per_region=block_chunks)
        items = [(plan, i, r) for i, r in enumerate(regions)]
        run_tasks(_partial, items, **run, name="measure-partial")
        items = [(plan, b, format) for b in range(plan.buckets)]
        reduced = run_tasks(_reduce, items, **run, name="measure-reduce")
        table.parent.mkdir(parents=True, exist_ok=True)
        _concatenate([r["part"] for r in reduced if r["part"]], table, format)
    finally:
        shutil.rmtree(plan.scratch, ignore_errors=True)
    summary = _summary(plan, layout, reduced, table=table, format=format, started=started)
    group = zarr.open_group(Path(output) / labels_image_path(name), mode="r+", zarr_format=2)
    group.attrs["tileseg-measurements"] = summary.to_dict()
    return summary


def _check_format(format: str) -> None:
    """Refuse a table format that is unknown, or whose writer is not installed."""
    if format not in ("parquet", "csv"):
        raise TilesegError("--table-format", f"must be 'parquet' or 'csv', not {format!r}")
    if format == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise TilesegError("--table-format", "parquet needs pyarrow (or use csv)") from None


def _instances_info(output: str, name: str) -> dict[str, Any]:
    """The ``tileseg-instances`` attributes of ``labels/<name>``, which must exist."""
    try:
        group = zarr.open_group(Path(output) / labels_image_path(name), mode="r", zarr_format=2)
        return dict(group.attrs.get("tileseg-instances", {}))
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise TilesegError(output, f"has no instance labels 'labels/{name}'") from None


def _pixel_size(
    layout: OutputLayout, image: LazyImage | None, pixel_size: tuple[float, ...] | None
) -> tuple[float, ...] | None:
    """The pixel size the table uses: the given one, else the output's, else the image's;
    the image, if any, must be the level that was segmented."""
    if image is not None and tuple(image.spatial_shape) != tuple(layout.spatial_shape):
        raise TilesegError(
            image.path,
            f"image shape {image.spatial_shape} differs from the output's {layout.spatial_shape} "
            "(pass the level that was segmented)",
        )
    pixel_size = pixel_size or layout.pixel_size or (image.pixel_size if image else None)
    if pixel_size is not None and len(pixel_size) != layout.ndim:
        raise TilesegError("--pixel-size", f"needs {layout.ndim} values, got {len(pixel_size)}")
    return pixel_size


def _plan(
    output: str,
    layout: OutputLayout,
    info: dict[str, Any],
    *,
    name: str,
    image: LazyImage | None,
    pixel_size: tuple[float, ...] | None,
) -> _Plan:
    """What the measuring tasks share, with a fresh scratch folder (stale ones removed)."""
    objects = int(info.get("objects", 0) or 0)
    consecutive = bool(info.get("consecutive", False))
    for stale in Path(output).glob(f".tileseg-measure-{name}-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    scratch = Path(output) / f".tileseg-measure-{name}-{uuid.uuid4().hex[:12]}"
    return _Plan(
        output=output,
        name=name,
        scratch=os.fspath(scratch),
        shape=layout.spatial_shape,
        classes=max(layout.classes, 2),
        image=image.spec if image is not None else None,
        buckets=max(1, math.ceil(objects / _BUCKET_OBJECTS)),
        largest=objects if consecutive else 0,
        pixel_size=tuple(float(p) for p in pixel_size) if pixel_size else None,
        note=json.dumps(table_note(layout, name=name, pixel_size=pixel_size, image=image)),
    )


def _summary(
    plan: _Plan,
    layout: OutputLayout,
    reduced: list[dict[str, Any]],
    *,
    table: Path,
    format: str,
    started: float,
) -> MeasureSummary:
    """The per-slide summary from the reduced buckets."""
    per_class: dict[int, int] = {}
    for r in reduced:
        for c, k in r["per_class"].items():
            per_class[c] = per_class.get(c, 0) + k
    area = sum(r["area"] for r in reduced)
    columns = next((tuple(r["columns"]) for r in reduced if r["part"]), ("id",))
    physical = area * float(np.prod(plan.pixel_size)) if plan.pixel_size else None
    return MeasureSummary(
        output=plan.output,
        name=plan.name,
        table=os.fspath(table.absolute()),
        format=format,
        objects=sum(r["objects"] for r in reduced),
        per_class=dict(sorted(per_class.items())),
        foreground_area=area,
        foreground_area_um2=physical if layout.ndim == 2 else None,
        foreground_volume_um3=physical if layout.ndim == 3 else None,
        pixel_size=plan.pixel_size,
        seconds=time.perf_counter() - started,
        columns=columns,
    )
