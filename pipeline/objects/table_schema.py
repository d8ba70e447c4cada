"""What each column of the object table (:mod:`pipeline.objects.measure`) holds, stored with the
Parquet
table as field metadata (``unit``, ``description``) and file metadata (``tileseg``: pixel size,
label images, class names, conventions), so the file explains itself wherever it is opened.

Conventions: pixel columns are array indices of the segmented level (pixel ``i``'s centre is at
``i``); bounding boxes are half-open (``bbox_y_max`` is one past the last row, as Python slices
and skimage's ``regionprops``); ``*_um`` columns are in the output's NGFF physical space (pixel
``i``'s centre at ``i * pixel_size``), so a box's µm edges are ``(bbox - 0.5) * pixel_size``.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["column_info", "with_metadata"]

_AXIS = r"(?P<axis>[zyx])"
_RULES: list[tuple[str, str, str]] = [
    (r"id", "", "object id in the instance labels image (0 is background)"),
    (r"class", "", "majority class of the object's pixels in labels/segmentation "
     "(names: class_names in the file metadata)"),
    (r"area", "pixel", "pixels (voxels in 3D) in the object"),
    (rf"centroid_{_AXIS}", "pixel", "mean pixel index along {axis}"),
    (rf"bbox_{_AXIS}_min", "pixel", "first pixel index along {axis}"),
    (rf"bbox_{_AXIS}_max", "pixel", "one past the last pixel index along {axis} (half-open)"),
    (r"mean_intensity_c(?P<channel>\d+)", "input intensity",
     "mean input value of channel {channel} over the object"),
    (r"area_um2", "micrometer^2", "area: pixels x pixel area"),
    (r"volume_um3", "micrometer^3", "volume: voxels x voxel volume"),
    (rf"centroid_{_AXIS}_um", "micrometer", "centroid along {axis} x pixel size"),
    (rf"bbox_{_AXIS}_min_um", "micrometer", "low edge along {axis}: (bbox_{axis}_min - 0.5) x "
     "pixel size"),
    (rf"bbox_{_AXIS}_max_um", "micrometer", "high edge along {axis}: (bbox_{axis}_max - 0.5) x "
     "pixel size"),
]  # fmt: skip


def column_info(name: str) -> dict[str, str]:
    """``{"unit": ..., "description": ...}`` of a table column (empty for an unknown one)."""
    for pattern, unit, description in _RULES:
        match = re.fullmatch(pattern, name)
        if match:
            return {"unit": unit, "description": description.format(**match.groupdict())}
    return {}


def with_metadata(table: Any, note: dict[str, Any]) -> Any:
    """``table`` (a pyarrow Table) with each known column's unit and description as field
    metadata and ``note`` as the file's ``tileseg`` metadata."""
    import pyarrow as pa

    fields = [
        field.with_metadata(column_info(field.name)) if column_info(field.name) else field
        for field in table.schema
    ]
    schema = pa.schema(fields, metadata={"tileseg": json.dumps(note)})
    return pa.Table.from_arrays(table.columns, schema=schema)
