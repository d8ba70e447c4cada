"""Objects as polygons for QuPath (GeoJSON) and for GeoPandas and GIS tools (GeoParquet).

:func:`export_objects` traces every object of the merged instance labels (``labels/instances``)
into a polygon exact to its pixel edges (:mod:`pipeline.objects.polygons`), with the object's row of
the
measurement table (:mod:`pipeline.objects.measure`) as its properties, and writes:

- ``OUTPUT.zarr/objects.geojson``: a FeatureCollection QuPath imports as detections
  (``objectType`` "detection", ``classification`` with the class's name and colour, the table's
  columns as ``measurements``);
- ``OUTPUT.zarr/objects.geoparquet``: GeoParquet 1.1, one row per object with the table's
  columns and a WKB ``geometry`` column; CRS null (an engineering, pixel frame), and the
  pixel size, downsample and source noted in the file's ``tileseg`` metadata.

Coordinates are pixel edges of **level 0 of the input** (x = column, y = row), so the polygons lie
on the original slide in QuPath even when a coarser ``--level`` was segmented; the table's own
columns stay in pixels of the segmented level.

Work is split by object id: each task reads its objects' rows of the table (ids in one range),
groups them by the block of chunks their bounding box starts in, reads once per group the
region those boxes cover, and traces each object from its own bounding-box crop of the whole
label image, so an object spanning chunks is one polygon. A task holds a block plus the largest
object's extent and its part of the output; the parts are streamed into the final files in id
order. No pixel data goes through the scheduler.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.config import EXPORTS
from pipeline.errors import TilesegError
from pipeline.io.readers import LazyImage
from pipeline.objects.measure import measure_objects, table_note
from pipeline.objects.table_schema import with_metadata
from pipeline.output import chunk_writer
from pipeline.output.label_classes import class_color
from pipeline.output.ngff import labels_image_path, read_layout
from pipeline.runtime.execution import run_tasks

__all__ = ["EXPORTS", "ExportSummary", "check_export", "export_objects", "export_segmentation"]

SUFFIX = {"geojson": "geojson", "geoparquet": "geoparquet"}
_TASK_OBJECTS = 20_000  # objects per task (and per part of the output)
_BLOCK_CHUNKS = 2  # objects are grouped by the block of chunks their bounding box starts in


@dataclass(frozen=True)
class ExportSummary:
    """What :func:`export_objects` wrote."""

    files: dict[str, str]  # format -> file name, relative to the output
    objects: int
    downsample: tuple[float, float]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "downsample": list(self.downsample)}


@dataclass(frozen=True)
class _Plan:
    output: str
    name: str
    table: str
    scratch: str
    formats: tuple[str, ...]
    block: tuple[int, int]
    downsample: tuple[float, float]
    class_names: tuple[str, ...]


def check_export(path: str | os.PathLike[str], *, ndim: int) -> None:
    """Refuse an export that cannot be made (before any work starts): a 3D image, or no
    shapely (the ``export`` extra)."""
    if ndim != 2:
        raise TilesegError(path, f"--export: object polygons need a 2D image, this one is {ndim}D")
    try:
        import shapely  # noqa: F401
    except ImportError:
        raise TilesegError("--export", "needs shapely: pip install 'tileseg[export]'") from None


def export_objects(
    output: str | os.PathLike[str],
    *,
    table: str | os.PathLike[str],
    formats: tuple[str, ...],
    downsample: tuple[float, float] = (1.0, 1.0),
    pixel_size: tuple[float, float] | None = None,
    name: str = "instances",
    scheduler: str | None = None,
    workers: int = 1,
) -> ExportSummary:
    """Write ``OUTPUT/objects.<format>`` for each of ``formats`` (:data:`EXPORTS`).

    Parameters
    ----------
    table
        The Parquet measurement table of ``labels/<name>``
        (:func:`pipeline.objects.measure.measure_objects`).
    downsample
        ``(y, x)`` size of a pixel of the segmented level in level-0 pixels of the input.
    pixel_size
        Micrometres per pixel ``(y, x)`` of the segmented level (default: the output's, when
        known); noted in the GeoParquet metadata, at level 0.
    """
    started = time.perf_counter()
    output = os.fspath(Path(output).absolute())
    unknown = [f for f in formats if f not in EXPORTS]
    if unknown or not formats:
        raise TilesegError("--export", f"must be among {', '.join(EXPORTS)}, got {unknown}")
    layout = read_layout(output)
    check_export(output, ndim=layout.ndim)
    pixel_size = pixel_size or layout.pixel_size
    for stale in Path(output).glob(f".tileseg-export-{name}-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    scratch = Path(output) / f".tileseg-export-{name}-{uuid.uuid4().hex[:12]}"
    plan = _Plan(
        output=output, name=name, table=os.fspath(table), scratch=os.fspath(scratch),
        formats=tuple(formats), block=tuple(c * _BLOCK_CHUNKS for c in layout.chunks),
        downsample=(float(downsample[0]), float(downsample[1])), class_names=layout.names,
    )  # fmt: skip
    try:
        items = [(plan, i, lo, hi) for i, (lo, hi) in enumerate(_id_ranges(plan.table))]
        parts = run_tasks(
            _trace_part, items, scheduler=scheduler, workers=workers, name="export-polygons"
        )
        files = {}
        for fmt in plan.formats:
            target = Path(output) / f"objects.{SUFFIX[fmt]}"
            if fmt == "geojson":
                _join_geojson(parts, target)
            else:
                _join_geoparquet(parts, target, _geo_metadata(plan, parts, pixel_size))
            files[fmt] = target.name
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return ExportSummary(
        files=files,
        objects=sum(p["objects"] for p in parts),
        downsample=plan.downsample,
        seconds=time.perf_counter() - started,
    )


def export_segmentation(
    output: str | os.PathLike[str],
    image: LazyImage,
    *,
    formats: tuple[str, ...],
    table: str | os.PathLike[str] | None,
    scheduler: str | None = None,
    workers: int = 1,
    downsample: tuple[float, ...] | None = None,
) -> ExportSummary:
    """:func:`export_objects` for a segmentation of ``image`` (the level that was segmented):
    polygons on level 0 of its file, with the rows of ``table`` (the measurement table, Parquet
    or CSV) or, without one, of a table of shape measurements made for the export and removed
    after (the input is not read again for intensities). ``downsample``: one label pixel in
    level-0 pixels, where ``image``'s levels do not say it (a resampled image)."""
    if downsample is None:
        shapes = zip(image.level_shapes[0], image.spatial_shape, strict=True)
        downsample = tuple(n0 / n for n0, n in shapes)
    pixel_size = image.pixel_size
    run = {"scheduler": scheduler, "workers": workers}
    if table is not None and Path(table).suffix == ".parquet":
        return export_objects(
            output, table=table, formats=formats, downsample=downsample, pixel_size=pixel_size,
            **run,
        )  # fmt: skip
    scratch = Path(output) / ".tileseg-export-table.parquet"
    try:
        if table is not None:
            _csv_to_parquet(Path(table), scratch, output=output, image=image)
        else:
            measure_objects(
                output, None, table_path=scratch, format="parquet", pixel_size=pixel_size, **run
            )
        return export_objects(
            output, table=scratch, formats=formats, downsample=downsample, pixel_size=pixel_size,
            **run,
        )  # fmt: skip
    finally:
        scratch.unlink(missing_ok=True)


def _csv_to_parquet(csv: Path, target: Path, *, output: str, image: LazyImage) -> None:
    """The CSV table as Parquet, batch by batch, with the units and notes a Parquet table has."""
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet as pq

    note = table_note(
        read_layout(output), name="instances", pixel_size=image.pixel_size, image=image
    )
    writer = None
    try:
        with pyarrow.csv.open_csv(csv) as reader:
            for batch in reader:
                table = with_metadata(pa.Table.from_batches([batch]), note)
                writer = writer or pq.ParquetWriter(target, table.schema)
                writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    if writer is None:  # a header only: no objects
        pq.write_table(with_metadata(pyarrow.csv.read_csv(csv), note), target)


def _id_ranges(table: str) -> list[tuple[int, int]]:
    """Id ranges ``[lo, hi)`` of about :data:`_TASK_OBJECTS` objects each, from the table's
    row-group statistics (its rows are sorted by id)."""
    import pyarrow.parquet as pq

    metadata = pq.ParquetFile(table).metadata
    column = metadata.schema.names.index("id")
    ranges = []
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        stats = group.column(column).statistics
        if group.num_rows == 0 or stats is None or not stats.has_min_max:
            continue
        lo, hi = int(stats.min), int(stats.max) + 1
        n = math.ceil(group.num_rows / _TASK_OBJECTS)
        edges = [lo + (hi - lo) * k // n for k in range(n + 1)]
        ranges.extend((a, b) for a, b in itertools.pairwise(edges) if b > a)
    return ranges


def _trace_part(item: tuple[_Plan, int, int, int]) -> dict[str, Any]:
    """Trace the objects with ids in ``[lo, hi)`` and write their part of each format."""
    import pyarrow.parquet as pq
    import shapely

    from pipeline.objects.polygons import mask_polygon, scaled

    plan, index, lo, hi = item
    rows = pq.read_table(plan.table, filters=[("id", ">=", lo), ("id", "<", hi)])
    columns = {k: rows.column(k).to_numpy() for k in rows.column_names}
    n = rows.num_rows
    geometries = np.empty(n, dtype=object)
    # Opened afresh: the instances may have been relabelled since, as another dtype.
    source = Path(plan.output, labels_image_path(plan.name), "0")
    labels = zarr.open_array(source, mode="r", zarr_format=2)
    lo_y, lo_x = columns["bbox_y_min"], columns["bbox_x_min"]
    hi_y, hi_x = columns["bbox_y_max"], columns["bbox_x_max"]
    block = (lo_y // plan.block[0]) * (labels.shape[1] // plan.block[1] + 1) + lo_x // plan.block[1]
    for b in np.unique(block):
        members = np.flatnonzero(block == b)
        y0, x0 = int(lo_y[members].min()), int(lo_x[members].min())
        region = (slice(y0, int(hi_y[members].max())), slice(x0, int(hi_x[members].max())))
        data = chunk_writer.read(labels, region)
        for i in members:
            crop = data[lo_y[i] - y0 : hi_y[i] - y0, lo_x[i] - x0 : hi_x[i] - x0]
            outline = mask_polygon(crop == columns["id"][i], origin=(lo_y[i], lo_x[i]))
            geometries[i] = scaled(outline, plan.downsample)
        del data
    out: dict[str, Any] = {"objects": n, "index": index}
    if n:
        bounds = shapely.total_bounds(geometries)
        out["bbox"] = [float(v) for v in bounds]
        out["types"] = sorted(set(shapely.get_type_id(geometries).tolist()))
    Path(plan.scratch).mkdir(parents=True, exist_ok=True)
    for fmt in plan.formats:
        part = Path(plan.scratch, f"{index:07d}.{fmt}")
        if fmt == "geojson":
            _write_features(part, columns, geometries, plan.class_names)
        else:
            table = rows.append_column("geometry", _wkb(geometries))
            pq.write_table(table, part)
        out[fmt] = os.fspath(part)
    return out


def _wkb(geometries: np.ndarray):
    import pyarrow as pa
    import shapely

    wkb = shapely.to_wkb(geometries, flavor="iso") if len(geometries) else []
    return pa.array(wkb, pa.binary())


def _write_features(
    path: Path, columns: dict[str, np.ndarray], geometries: np.ndarray, names: tuple[str, ...]
) -> None:
    """QuPath detections, one JSON object per line, each followed by a comma but the last."""
    import shapely

    texts = shapely.to_geojson(geometries) if len(geometries) else []
    keys = list(columns)
    with open(path, "w", encoding="utf-8") as f:
        for i, geometry in enumerate(texts):
            cls = int(columns["class"][i])
            properties: dict[str, Any] = {"objectType": "detection", "name": str(columns["id"][i])}
            if 0 < cls < len(names):
                properties["classification"] = {"name": names[cls], "color": class_color(cls)[:3]}
            properties["measurements"] = {k: _number(columns[k][i]) for k in keys}
            sep = ",\n" if i < len(texts) - 1 else "\n"
            f.write(
                f'{{"type":"Feature","geometry":{geometry},"properties":{json.dumps(properties)}}}'
                + sep
            )


def _number(value: Any) -> float | int | None:
    """A JSON number (JSON has no NaN: a mean over non-finite pixels is null)."""
    if isinstance(value, np.integer):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None


def _join_geojson(parts: list[dict[str, Any]], target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        out.write('{"type":"FeatureCollection","features":[\n')
        first = True
        for part in parts:
            if not part["objects"]:
                continue
            if not first:
                out.write(",")
            with open(part["geojson"], encoding="utf-8") as f:
                shutil.copyfileobj(f, out)
            first = False
        out.write("]}\n")
    os.replace(tmp, target)


_TYPE_NAMES = {3: "Polygon", 6: "MultiPolygon"}


def _geo_metadata(
    plan: _Plan, parts: list[dict[str, Any]], pixel_size: tuple[float, float] | None
) -> dict[bytes, bytes]:
    """GeoParquet 1.1 ``geo`` metadata (CRS null: pixel coordinates, not a place on Earth) and
    what the coordinates are, in ``tileseg``."""
    boxes = np.array([p["bbox"] for p in parts if p["objects"]]).reshape(-1, 4)
    types = sorted({_TYPE_NAMES[t] for p in parts if p["objects"] for t in p["types"]})
    column: dict[str, Any] = {
        "encoding": "WKB",
        "geometry_types": types,
        "crs": None,
        "orientation": "counterclockwise",
    }
    if len(boxes):
        column["bbox"] = [*boxes[:, :2].min(0).tolist(), *boxes[:, 2:].max(0).tolist()]
    geo = {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": column}}
    level0 = None
    if pixel_size is not None:
        level0 = [p / d for p, d in zip(pixel_size, plan.downsample, strict=True)]
    import pyarrow.parquet as pq

    table_note = json.loads((pq.read_schema(plan.table).metadata or {}).get(b"tileseg", b"{}"))
    note = {
        **table_note,
        "coordinates": "pixel edges of level 0 of the input image: x = column, y = row",
        "geometry_pixel_size_um": level0,  # (y, x) µm per level-0 pixel; null when unknown
        "downsample": list(plan.downsample),
        "source": labels_image_path(plan.name),
        "table_units": "pixels of the segmented level (columns *_um: micrometres)",
    }
    return {b"geo": json.dumps(geo).encode(), b"tileseg": json.dumps(note).encode()}


def _join_geoparquet(
    parts: list[dict[str, Any]], target: Path, metadata: dict[bytes, bytes]
) -> None:
    import pyarrow.parquet as pq

    tmp = target.with_name(target.name + ".tmp")
    writer = None
    try:
        for part in parts:
            if not part["objects"]:
                continue
            table = pq.read_table(part["geoparquet"])
            if writer is None:
                schema = table.schema.with_metadata({**(table.schema.metadata or {}), **metadata})
                writer = pq.ParquetWriter(tmp, schema)
            writer.write_table(table.replace_schema_metadata(writer.schema.metadata))
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        import pyarrow as pa

        empty = pa.table({"id": pa.array([], pa.uint64()), "geometry": pa.array([], pa.binary())})
        pq.write_table(empty.replace_schema_metadata(metadata), tmp)
    os.replace(tmp, target)
