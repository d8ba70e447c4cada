"""The output: an OME-Zarr (NGFF 0.4, Zarr v2, '/'-separated chunks) holding the label image as
a multiscale NGFF labels image, and as the root image either the class probabilities (on
request) or an overview of the input, so that a viewer opening the output finds an image and
its labels.

Layout of ``OUTPUT.zarr``::

    .zattrs            {"tileseg": provenance + status}, "multiscales", "omero" (display hints)
    0, 1, ...          probabilities pyramid (c, [z,] y, x), when saved
    0, 1, ...          else: the overview, every f-th pixel of the input (c, [z,] y, x), and
                       its every 2nd, 4th, ... pixel in y and x (as many levels as the labels)
    labels/.zattrs     {"labels": ["segmentation"]}
    labels/segmentation/0, 1, ...   label pyramid ([z,] y, x)

Every level of every image maps its pixel centres to the same physical space (NGFF ``scale`` and
``translation``): labels and the overview subsample (pixel ``i`` of level ``k`` is level-0 pixel
``i * 2**k``, no translation); probability levels are 2x2 means, so level ``k`` is shifted by
``(2**k - 1) / 2`` level-0 pixels. The labels image carries ``properties`` with each class's
name; instance labels carry no colour table (one colour per object id is left to the viewer).

Writers only ever write whole chunks of arrays that already exist (created up front by
:func:`create_output`), so concurrent tasks need no locks and never read-modify-write.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import zarr

from pipeline.errors import TilesegError
from pipeline.output import chunk_writer
from pipeline.output.label_classes import class_color, class_names, hex_color

__all__ = [
    "LABELS_PATH",
    "LABEL_NAME",
    "MODEL_GRID",
    "NGFF_VERSION",
    "OVERVIEW_NAME",
    "OutputLayout",
    "Overview",
    "build_output",
    "create_array",
    "create_labels_image",
    "create_output",
    "downsample_labels_region",
    "downsample_region",
    "forget_arrays",
    "half_region",
    "labels_image_path",
    "level_regions",
    "levels_in_tasks",
    "mark_complete",
    "mark_failed",
    "model_grid_path",
    "next_level",
    "open_array",
    "overview_factor",
    "place_output",
    "read_layout",
    "read_record",
    "set_overview_display",
    "upsample_region",
    "write_region",
]

NGFF_VERSION = "0.4"
LABEL_NAME = "segmentation"
LABELS_PATH = f"labels/{LABEL_NAME}"
OVERVIEW_NAME = "overview"
# Labels (and probabilities) on the model's grid, when they are written on the input's: a
# hidden Zarr group the inference tasks write and the upsampling reads; removed once complete.
MODEL_GRID = ".tileseg/model-grid"
_RGB = ["FF0000", "00FF00", "0000FF"]
_CHANNEL_COLORS = ["00FFFF", "FF00FF", "FFFF00", "00FF00", "FF0000", "0000FF"]
_COMPRESSOR = numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.BITSHUFFLE)
# The overview is a viewer's copy of the input, written on a CPU after the tasks: lz4 encodes it
# ~2x faster than zstd, for ~10 % more bytes on a few megapixels.
_OVERVIEW_COMPRESSOR = numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)


OVERVIEW_PIXELS = 1 << 22  # per channel: 2048 x 2048 in 2D, 161^3 in 3D


@dataclass(frozen=True)
class Overview:
    """The root image of an output without probabilities: every ``factor``-th pixel of the input
    along each spatial axis, in the input's dtype (see ``pipeline/output/overview.py``)."""

    channels: int
    dtype: str
    factor: int

    def shape(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        return (self.channels, *(-(-n // self.factor) for n in spatial_shape))


def overview_factor(spatial_shape: Sequence[int], *, max_pixels: int = OVERVIEW_PIXELS) -> int:
    """The smallest power of two whose subsampling of ``spatial_shape`` has at most
    ``max_pixels`` pixels (1 for small images: their overview is the image)."""
    factor = 1
    while math.prod(-(-n // factor) for n in spatial_shape) > max_pixels:
        factor *= 2
    return factor


@dataclass(frozen=True)
class OutputLayout:
    """Shapes, chunks and dtypes of every array of one output."""

    spatial_shape: tuple[int, ...]
    chunks: tuple[int, ...]
    classes: int
    label_dtype: str
    probability_dtype: str | None = None
    pixel_size: tuple[float, ...] | None = None
    overview: Overview | None = None
    class_names: tuple[str, ...] = ()  # empty: the defaults of ``label_classes.class_names``
    # Level 0's scale when the pixel size is not known but is not the input's pixel either
    # (labels on the grid of a resampled input): in input pixels, without a unit.
    scale_base: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.overview is not None and self.probability_dtype:
            raise ValueError("the root image is the probabilities or the overview, not both")

    @property
    def ndim(self) -> int:
        return len(self.spatial_shape)

    @property
    def levels(self) -> list[tuple[int, ...]]:
        """Spatial shape of each pyramid level: y and x halve (z is kept) until they fit a chunk."""
        shapes = [self.spatial_shape]
        while any(n > c for n, c in zip(shapes[-1][-2:], self.chunks[-2:], strict=True)):
            *z, y, x = shapes[-1]
            shapes.append((*z, math.ceil(y / 2), math.ceil(x / 2)))
        return shapes

    def level_chunks(self, level: int) -> tuple[int, ...]:
        return tuple(min(c, n) for c, n in zip(self.chunks, self.levels[level], strict=True))

    @property
    def base_scale(self) -> tuple[float, ...]:
        """Level 0's scale: the pixel size (µm), else :attr:`scale_base`, else 1 per axis."""
        return self.pixel_size or self.scale_base or (1.0,) * self.ndim

    def scale(self, level: int) -> list[float]:
        base = self.base_scale
        factor = [1] * (self.ndim - 2) + [2**level, 2**level]
        return [float(b) * f for b, f in zip(base, factor, strict=True)]

    def mean_translation(self, level: int) -> list[float]:
        """Offset of a 2x2-mean level: its pixel ``i`` is the mean of level-0 pixels
        ``i * 2**level ... (i + 1) * 2**level - 1``, centred ``(2**level - 1) / 2`` past
        pixel ``i * 2**level`` (in physical units)."""
        base = self.base_scale
        shift = [0.0] * (self.ndim - 2) + [(2**level - 1) / 2] * 2
        return [float(b) * s for b, s in zip(base, shift, strict=True)]

    @property
    def names(self) -> tuple[str, ...]:
        """One name per class (the model's, else the defaults)."""
        return class_names(self.classes, self.class_names or None)

    @property
    def overview_shape(self) -> tuple[int, ...]:
        assert self.overview is not None
        return self.overview.shape(self.spatial_shape)

    @property
    def overview_chunks(self) -> tuple[int, ...]:
        return self.overview_level_chunks(0)

    @property
    def overview_levels(self) -> list[tuple[int, ...]]:
        """Shape of each overview level: as many as the label pyramid has (NGFF: an image and
        its labels have the same number of datasets), each halving y and x of the one below
        (every second pixel), as the label levels do."""
        shapes = [self.overview_shape]
        for _ in range(1, len(self.levels)):
            *lead, y, x = shapes[-1]
            shapes.append((*lead, -(-y // 2), -(-x // 2)))
        return shapes

    def overview_level_chunks(self, level: int) -> tuple[int, ...]:
        shape = self.overview_levels[level]
        return (shape[0], *(min(c, n) for c, n in zip(self.chunks, shape[1:], strict=True)))

    def overview_scale(self, level: int) -> list[float]:
        assert self.overview is not None
        return [s * self.overview.factor for s in self.scale(level)]


def _axes(ndim: int, *, channel: bool, unit: str | None) -> list[dict[str, str]]:
    axes = [{"name": "c", "type": "channel"}] if channel else []
    for name in "zyx"[3 - ndim :]:
        axis = {"name": name, "type": "space"}
        if unit:
            axis["unit"] = unit
        axes.append(axis)
    return axes


def _multiscales(
    layout: OutputLayout,
    *,
    name: str,
    channel: bool,
    scales: Sequence[Sequence[float]] | None = None,
    kind: str | None = None,
    translations: Sequence[Sequence[float]] | None = None,
    **extra: Any,
) -> list[dict[str, Any]]:
    """NGFF ``multiscales`` with one dataset per entry of ``scales`` (spatial scales; default:
    the pyramid levels of ``layout``) and, where given and not zero, its ``translations``;
    ``kind`` defaults to "mean" with channels (probabilities) and "nearest" without (labels)."""
    unit = "micrometer" if layout.pixel_size else None
    if scales is None:
        scales = [layout.scale(level) for level in range(len(layout.levels))]
    lead = [1.0] if channel else []
    datasets = []
    for k, s in enumerate(scales):
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": lead + list(s)}]
        if translations is not None and any(translations[k]):
            shift = [0.0] * len(lead) + list(translations[k])
            transforms.append({"type": "translation", "translation": shift})
        datasets.append({"path": str(k), "coordinateTransformations": transforms})
    return [
        {
            "version": NGFF_VERSION,
            "name": name,
            "axes": _axes(layout.ndim, channel=channel, unit=unit),
            "datasets": datasets,
            "type": kind or ("mean" if channel else "nearest"),
            **extra,
        }
    ]


def create_output(
    path: str | os.PathLike[str],
    layout: OutputLayout,
    *,
    overwrite: bool,
    attrs: dict[str, Any],
    subdirs: Sequence[str] = (),
    model_grid: OutputLayout | None = None,
) -> None:
    """Create every array and all NGFF metadata (and the empty ``subdirs``, and with
    ``model_grid`` the level 0 arrays of the labels on the model's grid, :data:`MODEL_GRID`);
    the data is written later, chunk by chunk.

    The output is built under a hidden name beside ``path`` and renamed into place whole, so a
    run killed meanwhile leaves either no output (the same command starts afresh) or a complete
    skeleton with its record (the same command resumes), never a group it would refuse.
    """
    building = build_output(
        path, layout, overwrite=overwrite, subdirs=subdirs, model_grid=model_grid
    )
    place_output(building, path, attrs=attrs)


def build_output(
    path: str | os.PathLike[str],
    layout: OutputLayout,
    *,
    overwrite: bool,
    subdirs: Sequence[str] = (),
    model_grid: OutputLayout | None = None,
) -> Path:
    """The first half of :func:`create_output`: every array and the NGFF metadata, under a
    hidden name beside ``path`` (returned), without the record. It needs only the layout, so
    it can be built while what the record holds is still being decided."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise TilesegError(path, "output already exists (use --overwrite to replace it)")
    for stale in path.parent.glob(f".{path.name}.creating-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    building = path.with_name(f".{path.name}.creating-{uuid.uuid4().hex[:12]}")
    _create_skeleton(building, layout, {})
    for sub in subdirs:
        (building / sub).mkdir(parents=True)
    if model_grid is not None:
        _create_model_grid(building / MODEL_GRID, model_grid)
    return building


def place_output(
    building: str | os.PathLike[str], path: str | os.PathLike[str], *, attrs: dict[str, Any]
) -> None:
    """The second half of :func:`create_output`: the record written into the hidden
    ``building`` and the whole renamed to ``path`` (replacing what is there)."""
    path = Path(path)
    root = Path(building) / ".zattrs"
    _write_json(root, {**json.loads(root.read_text()), "tileseg": {**attrs, "status": "running"}})
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    Path(building).rename(path)


def _create_skeleton(path: Path, layout: OutputLayout, attrs: dict[str, Any]) -> None:
    root: dict[str, Any] = {}
    _new_group(path / "labels", {"labels": [LABEL_NAME]})
    seg = path / LABELS_PATH
    for level, shape in enumerate(layout.levels):
        _new_array(seg / str(level), shape, layout.level_chunks(level), layout.label_dtype)
        if layout.probability_dtype:
            chunks = (layout.classes, *layout.level_chunks(level))
            _new_array(
                path / str(level), (layout.classes, *shape), chunks, layout.probability_dtype
            )
    names = layout.names
    _new_group(
        seg,
        {
            "multiscales": _multiscales(layout, name=LABEL_NAME, channel=False),
            "image-label": {
                "version": NGFF_VERSION,
                "colors": [{"label-value": k, "rgba": class_color(k)} for k in range(len(names))],
                "properties": [{"label-value": k, "class": n} for k, n in enumerate(names)],
                **_source(layout),
            },
        },
    )
    if layout.probability_dtype:
        levels = range(len(layout.levels))
        root["multiscales"] = _multiscales(
            layout, name="probabilities", channel=True,
            translations=[layout.mean_translation(k) for k in levels],
        )  # fmt: skip
        root["omero"] = _probability_channels(names[: layout.classes])
    elif layout.overview is not None:
        dtype = layout.overview.dtype
        for level, shape in enumerate(layout.overview_levels):
            _new_array(
                path / str(level), shape, layout.overview_level_chunks(level), dtype,
                compressor=_OVERVIEW_COMPRESSOR,
            )  # fmt: skip
        root["multiscales"] = _overview_multiscales(layout)
    root["tileseg"] = {**attrs, "status": "running"}
    _new_group(path, root)


def _create_model_grid(path: Path, layout: OutputLayout) -> None:
    _new_group(path)
    _new_group(path / "labels")
    seg = path / LABELS_PATH
    _new_group(seg)
    _new_array(seg / "0", layout.spatial_shape, layout.level_chunks(0), layout.label_dtype)
    if layout.probability_dtype:
        chunks = (layout.classes, *layout.level_chunks(0))
        shape = (layout.classes, *layout.spatial_shape)
        _new_array(path / "0", shape, chunks, layout.probability_dtype)


# A new output's metadata is written as the files zarr writes for it (Zarr v2, zarr's JSON
# indent): through zarr's asynchronous store each of its ~20 files costs a round trip of
# milliseconds, and the output's arrays are made before every run's first write.
def _write_json(path: Path, data: Any) -> None:
    path.write_bytes(json.dumps(data, indent=2, allow_nan=True).encode())


def _new_group(path: Path, attrs: dict[str, Any] | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    _write_json(path / ".zgroup", {"zarr_format": 2})
    _write_json(path / ".zattrs", attrs or {})


def _new_array(
    path: Path,
    shape: Sequence[int],
    chunks: Sequence[int],
    dtype: str,
    *,
    compressor: numcodecs.abc.Codec = _COMPRESSOR,
) -> None:
    """An array as :func:`create_array` makes it (zero fill, the output's compressor unless
    another is given, ``/``-separated chunk keys)."""
    path.mkdir(parents=True)
    meta = {
        "shape": [int(n) for n in shape],
        "chunks": [int(c) for c in chunks],
        "dtype": np.dtype(dtype).str,
        "fill_value": np.zeros((), dtype).item(),
        "order": "C",
        "filters": None,
        "dimension_separator": "/",
        "compressor": compressor.get_config(),
        "zarr_format": 2,
    }
    _write_json(path / ".zarray", meta)
    _write_json(path / ".zattrs", {})


def model_grid_path(path: str | os.PathLike[str]) -> str:
    """Where an output keeps its labels on the model's grid while they are upsampled."""
    return os.path.join(os.fspath(path), MODEL_GRID)


def upsample_region(
    path: str | os.PathLike[str],
    layout: OutputLayout,
    region: Sequence[slice],
    *,
    source_shape: Sequence[int],
    factors: Sequence[float],
    levels: int = 0,
) -> None:
    """Write one chunk-aligned region of level 0 of the labels (and probabilities) on the
    input's grid, each pixel the model-grid pixel under its centre (nearest neighbour, so
    labels stay the argmax of the probabilities and are never blended), and the ``levels``
    pyramid levels above it the region owns (:func:`levels_in_tasks`).

    ``source_shape`` is the model grid's spatial shape; one of its pixels spans ``factors``
    input pixels per axis.
    """
    from pipeline.resample import nearest_source

    index = [
        nearest_source(s.start, s.stop, f, n)
        for s, f, n in zip(region, factors, source_shape, strict=True)
    ]
    src = tuple(slice(int(ix[0]), int(ix[-1]) + 1) for ix in index)
    pick = np.ix_(*(ix - s.start for ix, s in zip(index, src, strict=True)))
    grid = model_grid_path(path)
    labels = chunk_writer.read(open_array(grid, _label_array_name(0)), src)[pick]
    probabilities = None
    if layout.probability_dtype:
        stored = chunk_writer.read(open_array(grid, "0"), (slice(None), *src))
        probabilities = stored[(slice(None), *pick)]
    region = tuple(region)
    for level in range(levels + 1):
        if level:
            labels, probabilities = next_level(labels, probabilities, layout=layout)
            region = half_region(region)
        write_region(path, region, np.ascontiguousarray(labels), _contiguous(probabilities),
                     level=level)  # fmt: skip


def _contiguous(a: np.ndarray | None) -> np.ndarray | None:
    return None if a is None else np.ascontiguousarray(a)


def _probability_channels(names: Sequence[str]) -> dict[str, Any]:
    """NGFF ``omero`` hints for the probabilities: one channel per class, named after it, shown
    over 0..1 in the class's colour (the background's hidden)."""
    window = {"min": 0.0, "max": 1.0, "start": 0.0, "end": 1.0}
    channels = [
        {"label": name, "color": hex_color(k) if k else "FFFFFF", "window": window,
         "active": k > 0}
        for k, name in enumerate(names)
    ]  # fmt: skip
    return {"channels": channels, "rdefs": {"model": "color"}}


def _overview_multiscales(layout: OutputLayout) -> list[dict[str, Any]]:
    assert layout.overview is not None
    factor = layout.overview.factor
    scales = [layout.overview_scale(k) for k in range(len(layout.overview_levels))]
    return _multiscales(
        layout, name=OVERVIEW_NAME, channel=True, scales=scales,
        kind="nearest", metadata={"method": "tileseg.overview", "kwargs": {"factor": factor}},
    )  # fmt: skip


def set_overview_display(
    path: str | os.PathLike[str], windows: Sequence[tuple[float, float]], *, rgb: bool
) -> None:
    """NGFF ``omero`` rendering hints for the overview: a colour and a contrast window per
    channel (viewers otherwise stretch a uint16 image over its whole range, or guess RGB)."""
    root = zarr.open_group(path, mode="r+", zarr_format=2)
    dtype = np.dtype(root["0"].dtype)
    info = np.iinfo(dtype) if dtype.kind in "iu" else None
    colors = _RGB if rgb else ["FFFFFF"] if len(windows) == 1 else _CHANNEL_COLORS
    channels = []
    for k, (start, end) in enumerate(windows):
        lo, hi = (float(info.min), float(info.max)) if info else (float(start), float(end))
        channels.append(
            {
                "label": "RGB"[k] if rgb else f"channel {k}",
                "color": colors[k % len(colors)],
                "window": {"min": lo, "max": hi, "start": float(start), "end": float(end)},
                "active": True,
            }
        )
    root.attrs["omero"] = {"channels": channels, "rdefs": {"model": "color"}}


def _source(layout: OutputLayout) -> dict[str, Any]:
    """A labels image's link to the image it labels: the output root, an NGFF image holding
    the probabilities or the overview (outputs made before the overview may have neither:
    then no link is given)."""
    root_image = layout.probability_dtype or layout.overview is not None
    return {"source": {"image": "../../"}} if root_image else {}


def create_array(group: zarr.Group, name: str, shape, chunks, dtype: str) -> None:
    """Create one output array: zero fill, the output's compressor, ``/``-separated chunk keys."""
    group.create_array(
        name,
        shape=tuple(shape),
        chunks=tuple(chunks),
        dtype=dtype,
        fill_value=0,
        compressors=_COMPRESSOR,
        chunk_key_encoding={"name": "v2", "separator": "/"},
    )


_arrays: dict[tuple[str, str], zarr.Array] = {}
_arrays_lock = threading.Lock()


def open_array(path: str | os.PathLike[str], name: str) -> zarr.Array:
    """Open an output array once per process (metadata never changes after creation)."""
    key = (os.fspath(path), name)
    with _arrays_lock:
        if key not in _arrays:
            _arrays[key] = zarr.open_array(Path(path) / name, mode="r+", zarr_format=2)
        return _arrays[key]


def forget_arrays(path: str | os.PathLike[str]) -> None:
    """Drop cached handles of an output (after it is replaced)."""
    with _arrays_lock:
        for key in [k for k in _arrays if k[0] == os.fspath(path)]:
            del _arrays[key]


def _label_array_name(level: int) -> str:
    return f"{LABELS_PATH}/{level}"


def write_region(
    path: str | os.PathLike[str],
    region: Sequence[slice],
    labels: np.ndarray,
    probabilities: np.ndarray | None,
    *,
    level: int = 0,
) -> None:
    """Write one chunk-aligned region of labels (and probabilities) at a pyramid level."""
    chunk_writer.write(open_array(path, _label_array_name(level)), tuple(region), labels)
    if probabilities is not None:
        chunk_writer.write(open_array(path, str(level)), (slice(None), *region), probabilities)


def level_regions(layout: OutputLayout, level: int, *, chunks_per_region: int = 4) -> list:
    """Chunk-aligned regions covering a pyramid level, a few chunks per side each."""
    shape = layout.levels[level]
    step = tuple(c * chunks_per_region for c in layout.level_chunks(level))
    grid = [range(0, n, s) for n, s in zip(shape, step, strict=True)]
    regions = []
    for start in np.ndindex(*(len(g) for g in grid)):
        origin = [g[i] for g, i in zip(grid, start, strict=True)]
        regions.append(
            tuple(slice(o, min(o + s, n)) for o, s, n in zip(origin, step, shape, strict=True))
        )
    return regions


def downsample_region(
    path: str | os.PathLike[str], layout: OutputLayout, level: int, region: Sequence[slice]
) -> None:
    """Compute one region of pyramid ``level`` from the stored level - 1 (:func:`next_level`)."""
    src = [slice(s.start, s.stop) for s in region[:-2]] + [
        slice(2 * s.start, 2 * s.stop) for s in region[-2:]
    ]
    labels = chunk_writer.read(open_array(path, _label_array_name(level - 1)), tuple(src))
    probabilities = None
    if layout.probability_dtype:
        probabilities = chunk_writer.read(open_array(path, str(level - 1)), (slice(None), *src))
    labels, probabilities = next_level(labels, probabilities, layout=layout)
    write_region(path, region, labels, probabilities, level=level)


def next_level(
    labels: np.ndarray, probabilities: np.ndarray | None, *, layout: OutputLayout
) -> tuple[np.ndarray, np.ndarray | None]:
    """The next pyramid level of a region that starts on even y and x: labels by taking every
    second pixel (labels must never be blended), probabilities by 2x2 means of the stored
    (already cast) values, cast again."""
    if probabilities is not None:
        mean = _mean2(probabilities.astype(np.float32))
        probabilities = mean.astype(layout.probability_dtype)
    return labels[..., ::2, ::2], probabilities


def half_region(region: Sequence[slice]) -> tuple[slice, ...]:
    """The region at the next pyramid level: y and x halved (rounding up, as the levels do)."""
    *lead, y, x = region
    halve = [slice(-(-s.start // 2), -(-s.stop // 2)) for s in (y, x)]
    return (*lead, *halve)


def levels_in_tasks(layout: OutputLayout, regions: Sequence[Sequence[slice]]) -> int:
    """How many pyramid levels above 0 the tasks can write themselves, each task from the tiles
    it infers: those at which every tile's region still starts on an even pixel and covers
    whole chunks of that level (or reaches the level's end), so no chunk has two writers.
    The rest follow after the tasks, from the level below."""
    fused = 0
    regions = [tuple(r) for r in regions]
    for level in range(1, len(layout.levels)):
        shape, chunks = layout.levels[level], layout.level_chunks(level)
        below = regions
        regions = [half_region(r) for r in below]
        for prev, region in zip(below, regions, strict=True):
            if any(s.start % 2 for s in prev[-2:]):
                return fused
            for s, c, n in zip(region, chunks, shape, strict=True):
                if s.start % c or (s.stop % c and s.stop != n):
                    return fused
        fused = level
    return fused


def _mean2(p: np.ndarray) -> np.ndarray:
    """2x2 mean over the last two axes; an odd edge row/column is averaged with itself."""
    pad = [(0, 0)] * (p.ndim - 2) + [(0, p.shape[-2] % 2), (0, p.shape[-1] % 2)]
    p = np.pad(p, pad, mode="edge")
    return 0.25 * (p[..., ::2, ::2] + p[..., 1::2, ::2] + p[..., ::2, 1::2] + p[..., 1::2, 1::2])


def mark_complete(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Written last: an output without ``status == "complete"`` is not finished."""
    root = zarr.open_group(path, mode="r+", zarr_format=2)
    root.attrs["tileseg"] = {**record, "status": "complete"}


def mark_failed(path: str | os.PathLike[str], problem: str) -> None:
    """Record why a run stopped; the output stays unfinished (and resumable)."""
    root = zarr.open_group(path, mode="r+", zarr_format=2)
    root.attrs["tileseg"] = {**dict(root.attrs["tileseg"]), "status": "failed", "error": problem}


def read_record(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The provenance record of an output, or None when there is no readable output there."""
    try:
        root = zarr.open_group(path, mode="r", zarr_format=2)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError):
        return None
    record = root.attrs.get("tileseg")
    return dict(record) if isinstance(record, dict) else None


# ----------------------------------------------------------------------------- more label images


def read_layout(path: str | os.PathLike[str]) -> OutputLayout:
    """The layout of an existing output, read back from its arrays and NGFF metadata."""
    try:
        root = zarr.open_group(path, mode="r", zarr_format=2)
        seg = root[LABELS_PATH]
        level0 = seg["0"]
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError, ValueError) as exc:
        raise TilesegError(path, f"not a tileseg output ({exc})") from None
    root_image = (root.attrs.get("multiscales") or [{}])[0]
    probabilities = root_image.get("name") == "probabilities" and "0" in root
    overview = None
    if root_image.get("name") == OVERVIEW_NAME and "0" in root:
        factor = int(root_image.get("metadata", {}).get("kwargs", {}).get("factor", 1))
        overview = Overview(int(root["0"].shape[0]), root["0"].dtype.str, factor)
    if probabilities:
        classes = int(root["0"].shape[0])
    else:  # the colour table has one entry per class (at least two)
        classes = len(seg.attrs.get("image-label", {}).get("colors", [])) or 2
    properties = seg.attrs.get("image-label", {}).get("properties", [])
    names = tuple(str(p.get("class", "")) for p in properties)
    datasets = seg.attrs.get("multiscales", [{}])[0].get("datasets", [])
    pixel_size = scale_base = None
    axes = seg.attrs.get("multiscales", [{}])[0].get("axes", [])
    scale = None
    if datasets:
        scale = tuple(float(s) for s in datasets[0]["coordinateTransformations"][0]["scale"])
    if scale is not None and any(a.get("unit") for a in axes):
        pixel_size = scale
    elif scale is not None and any(s != 1 for s in scale):
        scale_base = scale
    return OutputLayout(
        spatial_shape=tuple(level0.shape),
        chunks=tuple(level0.chunks),
        classes=classes,
        label_dtype=level0.dtype.str,
        probability_dtype=root["0"].dtype.str if probabilities else None,
        pixel_size=pixel_size,
        overview=overview,
        class_names=names if len(names) == max(classes, 2) else (),
        scale_base=scale_base,
    )


def labels_image_path(name: str) -> str:
    return f"labels/{name}"


def create_labels_image(
    path: str | os.PathLike[str],
    name: str,
    layout: OutputLayout,
    dtype: str,
    *,
    attrs: dict[str, Any] | None = None,
) -> None:
    """Add (or replace) the NGFF labels image ``labels/<name>`` with the pyramid of ``layout``.

    Its arrays are created empty (fill 0 = background) and written later, whole chunks at a
    time, like the segmentation. ``name`` is appended to ``labels/.zattrs["labels"]``.
    """
    if name == LABEL_NAME or not name or "/" in name:
        raise ValueError(f"invalid labels image name {name!r}")
    root = zarr.open_group(path, mode="r+", zarr_format=2)
    labels = root.require_group("labels")
    if name in labels:
        del labels[name]
    forget_arrays(path)
    group = labels.create_group(name)
    for level, shape in enumerate(layout.levels):
        create_array(group, str(level), shape, layout.level_chunks(level), dtype)
    group.attrs.update(
        {
            "multiscales": _multiscales(layout, name=name, channel=False),
            "image-label": {"version": NGFF_VERSION, **_source(layout)},
            **(attrs or {}),
        }
    )
    names = list(labels.attrs.get("labels", []))
    if name not in names:
        labels.attrs["labels"] = [*names, name]


def downsample_labels_region(
    path: str | os.PathLike[str], name: str, level: int, region: Sequence[slice]
) -> None:
    """Compute one chunk-aligned region of level ``level`` of ``labels/<name>`` from the level
    below by taking every second pixel in y and x (as :func:`downsample_region`)."""
    src = [slice(s.start, s.stop) for s in region[:-2]] + [
        slice(2 * s.start, 2 * s.stop) for s in region[-2:]
    ]
    # Opened afresh (not cached): a labels image may be recreated with another dtype.
    base = Path(path) / labels_image_path(name)
    data = zarr.open_array(base / str(level - 1), mode="r", zarr_format=2)[tuple(src)]
    zarr.open_array(base / str(level), mode="r+", zarr_format=2)[tuple(region)] = data[
        ..., ::2, ::2
    ]
