"""Polygons of objects in a 2D label image, exact to the pixel edges.

An object's outline is the union of its pixels' squares: pixel ``(row, col)`` is the square
``[col, col + 1] x [row, row + 1]`` in ``(x, y)`` coordinates (QuPath's and GDAL's pixel-corner
convention), so the polygon's area is the object's pixel count exactly, holes are kept, and
objects touching only at a pixel corner come out as a MultiPolygon. The union is built from one
rectangle per run of pixels along a row (a few dozen for a nucleus) with GEOS (shapely 2), and
collinear vertices are removed; rings are oriented as RFC 7946 asks (exteriors
counter-clockwise, holes clockwise, in x-right/y-up terms).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import shapely

__all__ = ["mask_polygon", "scaled"]


def mask_polygon(mask: np.ndarray, *, origin: Sequence[int] = (0, 0)) -> shapely.Geometry:
    """The pixel-edge outline of the True pixels of a 2D mask.

    Parameters
    ----------
    mask
        (rows, columns) booleans, e.g. ``labels[bbox] == object_id``.
    origin
        ``(row, column)`` of ``mask[0, 0]`` in the whole image: the polygon is in the image's
        pixel coordinates.

    Returns
    -------
    A Polygon (or MultiPolygon) whose area equals ``mask.sum()``; an empty polygon for an
    empty mask.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"polygons need a 2D mask, got {mask.ndim}D")
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), np.int8)
    padded[:, 1:-1] = mask
    step = np.diff(padded, axis=1)
    rows, starts = np.nonzero(step == 1)  # row-major: each row's runs in order
    _, stops = np.nonzero(step == -1)
    y0, x0 = int(origin[0]), int(origin[1])
    runs = shapely.box(starts + x0, rows + y0, stops + x0, rows + y0 + 1)
    outline = shapely.simplify(shapely.union_all(runs), 0)  # drops collinear vertices only
    return shapely.orient_polygons(outline)


def scaled(geometry: shapely.Geometry, factors: Sequence[float]) -> shapely.Geometry:
    """``geometry`` with x and y multiplied by ``factors`` (``(y, x)``: an image's downsample,
    to put polygons traced on a pyramid level onto level 0)."""
    fy, fx = (float(f) for f in factors)
    if fy == fx == 1.0:
        return geometry
    return shapely.transform(geometry, lambda xy: xy * np.array([fx, fy]))
