"""Format back-ends for :mod:`pipeline.io.readers`: TIFF family (via tifffile) and Zarr/OME-Zarr.

Each back-end inspects one pyramid level of one image and returns a :class:`Probe` (what the file
says: stored shape, dtype, detected axes letters, level shapes, physical pixel size) together with
an open :class:`ArrayHandle` whose ``array[index]`` decodes only the tiles/strips/chunks the index
touches. Interpretation of the axes (squeezing, guessing, transposing) is left to
:mod:`pipeline.io.readers`, so both back-ends stay format-only.

Every problem with the input is raised as :class:`~pipeline.errors.TilesegError`.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import weakref
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import zarr

from pipeline.errors import TilesegError
from pipeline.io._tiff_guards import GuardedArray, GuardedStore, check_not_truncated, tifffile_logs
from pipeline.io.chunk_cache import CachedStore
from pipeline.io.tiff_tiles import TiffTiles

__all__ = [
    "ArrayHandle",
    "Probe",
    "check_index",
    "open_tiff",
    "open_zarr",
    "reason",
    "reopen_zarr_array",
]

# Micrometres per unit, keyed by the spellings used by OME-XML (UnitsLength), NGFF (UDUNITS names)
# and ImageJ. Lower-cased on lookup.
_UNIT_UM = {
    "µm": 1.0,
    "um": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "micrometer": 1.0,
    "micrometre": 1.0,
    "\\u00b5m": 1.0,  # ImageJ writes the escape sequence literally
    "nm": 1e-3,
    "nanometer": 1e-3,
    "nanometre": 1e-3,
    "pm": 1e-6,
    "picometer": 1e-6,
    "å": 1e-4,
    "angstrom": 1e-4,
    "mm": 1e3,
    "millimeter": 1e3,
    "millimetre": 1e3,
    "cm": 1e4,
    "centimeter": 1e4,
    "centimetre": 1e4,
    "m": 1e6,
    "meter": 1e6,
    "metre": 1e6,
    "in": 25400.0,
    "inch": 25400.0,
}

# TIFF ResolutionUnit -> micrometres (NONE is deliberately absent: no physical meaning).
_RESUNIT_UM = {
    tifffile.RESUNIT.INCH: 25400.0,
    tifffile.RESUNIT.CENTIMETER: 1e4,
    tifffile.RESUNIT.MILLIMETER: 1e3,
    tifffile.RESUNIT.MICROMETER: 1.0,
}

# Screen/print defaults (72, 96, 300 dpi, or a missing tag read as 1 dpi) are written by many
# generic tools; no microscope image is calibrated in inches that coarse, and trusting such a value
# would make downstream rescaling silently wrong.
_MIN_CALIBRATED_DPI = 1000.0

# Aperio ImageDescription: "Aperio Image Library ...|AppMag = 20|MPP = 0.4990|..."
_SVS_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)")

# Any value > 1 makes tifffile's ZarrTiffStore decode chunks with asyncio.to_thread. Otherwise
# decoding runs inline on zarr's single event-loop thread, serialising every reader thread.
_THREADED_DECODE = 2


def unit_to_um(unit: object, default: float | None = 1.0) -> float | None:
    """Micrometres per ``unit``; ``default`` when no unit is given, None when it is unknown."""
    if unit is None or unit == "":
        return default
    return _UNIT_UM.get(str(unit).strip().lower())


def reason(exc: BaseException) -> str:
    """One-line description of an exception for a user-facing message."""
    name = type(exc).__name__
    if name == "error":  # struct.error, zlib.error, ...: the bare name says nothing
        name = f"{type(exc).__module__}.error"
    text = str(exc).strip()
    return f"{name}: {text}" if text else name


@dataclass
class Probe:
    """What a back-end found for one level of one image (before axes are interpreted)."""

    format: str  # "tiff" | "zarr" | "ome-zarr" | "openslide" | "pillow"
    shape: tuple[int, ...]  # shape of the stored array at the requested level
    dtype: np.dtype
    axes: str | None  # one letter per stored dimension; None when the format has no axes
    level_shapes: list[tuple[int, ...]]  # stored shape of every level, level 0 first
    pixel_size: dict[str, float] = field(default_factory=dict)  # µm per axis letter ...
    pixel_size_level: int = 0  # ... at this level (scaled by shape ratios for other levels)
    dataset: str = ""  # path of the level's array inside a Zarr group
    channel_names: tuple[str, ...] = ()  # the file's name of each channel, where it says


class ArrayHandle:
    """An open array of one image level; ``array[index]`` reads and decodes only what it touches.

    The underlying file is closed by :meth:`close` or, at the latest, when the handle is
    garbage-collected (so forgotten handles never leak file descriptors or ResourceWarnings).
    """

    def __init__(self, array: Any, closer: Callable[[], object] | None = None) -> None:
        self.array = array
        self._finalizer = None if closer is None else weakref.finalize(self, closer)

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()


def check_index(path: str | os.PathLike[str], what: str, index: int, count: int) -> None:
    """Raise the standard 'level 3 requested but the image has 2 levels (0-1)' error."""
    if 0 <= index < count:
        return
    noun = what if count == 1 or what == "series" else f"{what}s"
    valid = "0" if count == 1 else f"0-{count - 1}"
    owner = "file" if what == "series" else "image"
    raise TilesegError(
        path, f"{what} {index} requested but the {owner} has {count} {noun} ({valid})"
    )


# --------------------------------------------------------------------------------------- TIFF


def open_tiff(
    path: str, level: int, series: int, *, check_truncation: bool = True
) -> tuple[Probe, ArrayHandle]:
    """Probe and open level ``level`` of series ``series`` of a TIFF/BigTIFF/OME-TIFF/SVS file.

    ``check_truncation`` parses every page of the file (:func:`check_not_truncated`); a reopen
    of a file already opened so (in each reader thread or worker process) skips it."""
    # tifffile logs what it skips while parsing (a tag whose value lies past the end of a cut
    # file, ...) as warnings of its own; collected here, so the user sees one line, ours.
    with tifffile_logs() as skipped:
        try:
            tif = tifffile.TiffFile(path)
        except OSError as exc:
            raise TilesegError(path, f"cannot open file: {exc.strerror or reason(exc)}") from exc
        except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct.error, ...
            raise TilesegError(path, f"not a valid TIFF file ({reason(exc)})") from exc
    try:
        if check_truncation:
            check_not_truncated(path, tif, skipped)
        return _probe_tiff(path, tif, level, series), _tiff_handle(path, tif, level, series)
    except TilesegError:
        tif.close()
        raise
    except Exception as exc:  # corrupt IFDs or tags surface lazily, while parsing series
        tif.close()
        raise TilesegError(path, f"cannot parse TIFF structure ({reason(exc)})") from exc


def _probe_tiff(path: str, tif: tifffile.TiffFile, level: int, series: int) -> Probe:
    if not tif.series:
        raise TilesegError(path, "TIFF file contains no image")
    check_index(path, "series", series, len(tif.series))
    tseries = tif.series[series]
    levels = tseries.levels
    check_index(path, "level", level, len(levels))
    this = levels[level]
    if this.dtype is None:
        raise TilesegError(path, "unsupported TIFF sample format")
    return Probe(
        format="tiff",
        shape=tuple(this.shape),
        dtype=np.dtype(this.dtype),
        axes=this.axes,
        level_shapes=[tuple(lv.shape) for lv in levels],
        pixel_size=_tiff_pixel_size(tif, tseries, series),
        channel_names=_tiff_channel_names(tif, tseries, series),
    )


def _tiff_handle(path: str, tif: tifffile.TiffFile, level: int, series: int) -> ArrayHandle:
    tseries = tif.series[series]
    this = tseries.levels[level]
    if this.dataoffset is not None and this.transform is None and this.dtype is not None:
        # Uncompressed, contiguous data: memory-map it. Through the zarr store an image stored as
        # a single strip would be decoded whole for every window.
        dtype = np.dtype(tif.byteorder + this.dtype.char)
        tif.close()  # (a cut file was refused by check_not_truncated)
        return ArrayHandle(np.memmap(path, dtype, "r", this.dataoffset, tuple(this.shape)))
    namespace = _file_version(path, this, series, level)
    tiles = TiffTiles.of(path, this, namespace=namespace)
    if tiles is not None:  # one page: its tiles read directly (see pipeline/io/tiff_tiles.py)
        tif.close()  # parsed; the tiles hold their own descriptor
        return ArrayHandle(tiles, tiles.close)
    store = tseries.aszarr(level=level, maxworkers=_THREADED_DECODE)
    store = GuardedStore(CachedStore(store, namespace=namespace))
    return ArrayHandle(GuardedArray(zarr.open_array(store, mode="r")), tif.close)


def _file_version(path: str, level: Any, series: int, level_index: int) -> tuple:
    """What names the decoded tiles of one level of one version of a file. A file rewritten in
    place within the clock's granularity keeps its mtime; its tiles' compressed sizes differ."""
    stat = os.stat(path)
    first = level.pages[0]
    counts = zlib.crc32(np.asarray(first.databytecounts, np.int64).tobytes()) if first else 0
    return (os.path.abspath(path), stat.st_ino, stat.st_mtime_ns, stat.st_size, series,
            level_index, counts)  # fmt: skip


def _tiff_pixel_size(tif: tifffile.TiffFile, tseries: Any, series: int) -> dict[str, float]:
    """µm per pixel of level 0, keyed by axis letter; empty when the file does not say."""
    if tif.is_ome and tif.ome_metadata:
        sizes = _ome_xml_pixel_size(tif.ome_metadata, series)
        if sizes:
            return sizes
    page = tseries.levels[0].keyframe
    if tif.is_svs:
        match = _SVS_MPP.search(page.description or "")
        mpp = float(match.group(1)) if match else 0.0
        if mpp > 0:
            return {"Y": mpp, "X": mpp}
    imagej = tif.imagej_metadata if tif.is_imagej else None
    unit_um = _RESUNIT_UM.get(page.resolutionunit)
    if imagej:  # ImageJ writes ResolutionUnit NONE and the real unit in its description
        unit_um = unit_to_um(imagej.get("unit"), default=None) or unit_um
    sizes: dict[str, float] = {}
    if unit_um is None or 282 not in page.tags or 283 not in page.tags:
        return sizes
    xres, yres = page.resolution
    if xres > 0 and yres > 0:
        if page.resolutionunit == tifffile.RESUNIT.INCH and not imagej:
            if min(xres, yres) < _MIN_CALIBRATED_DPI:
                return sizes
        sizes = {"Y": unit_um / yres, "X": unit_um / xres}
        spacing = (imagej or {}).get("spacing")
        if isinstance(spacing, (int, float)) and spacing > 0:
            sizes["Z"] = float(spacing) * unit_um
    return sizes


def _ome_pixels(xml: str, series: int) -> ET.Element | None:
    """The ``Pixels`` element of image ``series`` of an OME-XML document."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    images = [el for el in root if el.tag.rsplit("}", 1)[-1] == "Image"]
    if series >= len(images):
        return None
    return next((el for el in images[series] if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)


def _tiff_channel_names(tif: tifffile.TiffFile, tseries: Any, series: int) -> tuple[str, ...]:
    """Channel names from OME-XML ``Channel/@Name`` or ImageJ's labels; () where none."""
    if tif.is_ome and tif.ome_metadata:
        pixels = _ome_pixels(tif.ome_metadata, series)
        if pixels is None:
            return ()
        channels = [el for el in pixels if el.tag.rsplit("}", 1)[-1] == "Channel"]
        if any(el.get("SamplesPerPixel", "1").strip() != "1" for el in channels):
            return ()  # an RGB channel: its samples are the image's channels, named apart
        return _named(el.get("Name") for el in channels)
    imagej = tif.imagej_metadata if tif.is_imagej else None
    count = int((imagej or {}).get("channels") or 0)
    labels = (imagej or {}).get("Labels")
    if count > 1 and "C" in tseries.axes and isinstance(labels, list) and len(labels) >= count:
        return _named(labels[:count])  # ImageJ's planes run channel-fastest
    return ()


def _named(names: Any) -> tuple[str, ...]:
    """Names as given, '' for a missing one; () when none is named at all."""
    out = tuple("" if n is None else str(n).strip() for n in names)
    return out if any(out) else ()


def _ome_xml_pixel_size(xml: str, series: int) -> dict[str, float]:
    pixels = _ome_pixels(xml, series)
    if pixels is None:
        return {}
    sizes = {}
    for ax in "ZYX":
        value = pixels.get(f"PhysicalSize{ax}")
        factor = unit_to_um(pixels.get(f"PhysicalSize{ax}Unit"))  # OME default unit is µm
        try:
            size = float(value) * factor if value is not None and factor else 0.0
        except ValueError:
            size = 0.0
        if size > 0:
            sizes[ax] = size
    return sizes


# --------------------------------------------------------------------------------------- Zarr


def _read_json(path: str, file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TilesegError(path, f"invalid Zarr metadata in {file.name} ({reason(exc)})") from exc
    if not isinstance(data, dict):
        raise TilesegError(path, f"invalid Zarr metadata in {file.name} (not a JSON object)")
    return data


def _zarr_node(path: str, directory: Path) -> tuple[str, int, dict[str, Any]] | None:
    """(node type "array"/"group", zarr format, attributes) of a Zarr directory, None if none."""
    if (directory / "zarr.json").is_file():
        meta = _read_json(path, directory / "zarr.json")
        attrs = meta.get("attributes") or {}
        return str(meta.get("node_type")), 3, attrs if isinstance(attrs, dict) else {}
    attrs = _read_json(path, directory / ".zattrs") if (directory / ".zattrs").is_file() else {}
    if (directory / ".zarray").is_file():
        return "array", 2, attrs
    if (directory / ".zgroup").is_file():
        return "group", 2, attrs
    return None


def reopen_zarr_array(path: str, dataset: str, *, allow_missing: bool = False) -> ArrayHandle:
    """Open the array ``dataset`` ('' for the root) of a Zarr directory, read-only.

    zarr reads a chunk missing from the store as the fill value, with no setting to make that
    an error. An input image with a missing chunk is far more often a broken copy or an
    interrupted conversion than an intentionally empty area, and segmenting fill values would
    silently produce background, so reads fail on missing chunks unless ``allow_missing``
    (zarr-python 3 omits all-fill chunks when writing: such arrays need it).
    """
    try:
        array = zarr.open_array(store=path, mode="r", path=dataset)
    except Exception as exc:  # zarr raises many types for missing/corrupt metadata
        where = f"array '{dataset}'" if dataset else "array"
        raise TilesegError(path, f"cannot open Zarr {where} ({reason(exc)})") from exc
    return ArrayHandle(array if allow_missing else _ChunkChecked(array, Path(path) / dataset))


class MissingChunkError(LookupError):
    pass


class _ChunkChecked:
    """A Zarr array whose reads fail on chunks that are missing from the (local) store."""

    def __init__(self, array: Any, directory: Path) -> None:
        self._array = array
        self._directory = directory
        self.shape = tuple(array.shape)
        self.dtype = array.dtype
        # keys name shards when the array is sharded, chunks otherwise
        self._grid = tuple(getattr(array, "shards", None) or array.chunks)

    def __getattr__(self, name: str) -> Any:  # metadata, attrs, chunks, ... of the array
        return getattr(self._array, name)

    def __getitem__(self, index: tuple[Any, ...]) -> Any:
        ranges = []
        for sel, n, c in zip(index, self.shape, self._grid, strict=True):
            if isinstance(sel, slice):
                start, stop, _ = sel.indices(n)
                if stop <= start:
                    return self._array[index]
                ranges.append(range(start // c, (stop - 1) // c + 1))
            else:
                ranges.append((int(sel) // c,))
        for coords in itertools.product(*ranges):
            key = self._array.metadata.encode_chunk_key(coords)
            if not (self._directory / key).exists():
                raise MissingChunkError(
                    f"chunk {key!r} is missing from the store (an incomplete copy or "
                    "conversion?); use --allow-missing-chunks if it is meant to read as fill"
                )
        return self._array[index]


def _dimension_letters(array: Any, attrs: dict[str, Any]) -> str | None:
    """Axes from Zarr v3 ``dimension_names`` or xarray's v2 ``_ARRAY_DIMENSIONS``, if letters."""
    names = getattr(array.metadata, "dimension_names", None) or attrs.get("_ARRAY_DIMENSIONS")
    if not isinstance(names, (list, tuple)) or len(names) != len(array.shape):
        return None
    if not all(isinstance(n, str) and len(n) == 1 and n.isalpha() for n in names):
        return None  # e.g. "lat"/"lon": not image axes, fall back to the shape-based guess
    letters = "".join(names).upper()
    return letters if len(set(letters)) == len(letters) else None


def open_zarr(
    path: str, level: int, series: int, *, allow_missing: bool = False
) -> tuple[Probe, ArrayHandle]:
    """Probe and open a plain Zarr array or one level of an OME-Zarr image (NGFF 0.1-0.5)."""
    node = _zarr_node(path, Path(path))
    if node is None:
        raise TilesegError(
            path,
            "directory is neither a Zarr array nor an OME-Zarr image "
            "(no zarr.json, .zarray or .zgroup)",
        )
    kind, _, attrs = node
    if kind == "array":
        check_index(path, "series", series, 1)
        check_index(path, "level", level, 1)
        handle = reopen_zarr_array(path, "", allow_missing=allow_missing)
        shape = tuple(handle.array.shape)
        dtype = np.dtype(handle.array.dtype)
        axes = _dimension_letters(handle.array, attrs)
        return Probe("zarr", shape, dtype, axes, [shape]), handle
    if kind != "group":
        raise TilesegError(path, f"unknown Zarr node type {kind!r}")

    ome = attrs.get("ome") if isinstance(attrs.get("ome"), dict) else attrs  # NGFF 0.5 vs <=0.4
    prefix = ""
    if "multiscales" not in ome and "bioformats2raw.layout" in ome:
        # bioformats2raw: one image group per series, named 0, 1, ...
        count = sum(1 for p in Path(path).iterdir() if p.name.isdigit() and p.is_dir())
        check_index(path, "series", series, count)
        prefix = f"{series}/"
        sub = _zarr_node(path, Path(path) / str(series))
        ome = sub[2] if sub else {}
        ome = ome.get("ome") if isinstance(ome.get("ome"), dict) else ome
        series = 0
    multiscales = ome.get("multiscales")
    if not isinstance(multiscales, list) or not multiscales:
        raise TilesegError(
            path, "Zarr group without OME-NGFF 'multiscales' metadata (not an OME-Zarr image)"
        )
    check_index(path, "series", series, len(multiscales))
    try:
        probe, handle = _open_multiscale(
            path, multiscales[series], prefix, level, allow_missing=allow_missing
        )
        probe.channel_names = _omero_labels(ome)
        return probe, handle
    except TilesegError:
        raise
    except Exception as exc:  # malformed metadata: wrong types, missing keys
        raise TilesegError(path, f"invalid OME-Zarr metadata ({reason(exc)})") from exc


def _omero_labels(ome: dict[str, Any]) -> tuple[str, ...]:
    """NGFF ``omero.channels[].label`` (transitional metadata, in 0.4 and 0.5 alike)."""
    omero = ome.get("omero")
    channels = omero.get("channels") if isinstance(omero, dict) else None
    if not isinstance(channels, list):
        return ()
    return _named(c.get("label") if isinstance(c, dict) else None for c in channels)


def _open_multiscale(
    path: str, multiscale: dict[str, Any], prefix: str, level: int, *, allow_missing: bool
) -> tuple[Probe, ArrayHandle]:
    datasets = multiscale.get("datasets") or []
    if not datasets:
        raise TilesegError(path, "OME-Zarr multiscales metadata lists no datasets")
    check_index(path, "level", level, len(datasets))
    handles = [
        reopen_zarr_array(path, prefix + str(ds["path"]), allow_missing=allow_missing)
        for ds in datasets
    ]
    level_shapes = [tuple(h.array.shape) for h in handles]
    handle = handles[level]
    ndim = len(level_shapes[level])

    names: list[str] = []
    units: list[object] = []
    for ax in multiscale.get("axes") or []:
        if isinstance(ax, str):  # NGFF 0.3: a list of names
            ax = {"name": ax}
        kind = ax.get("type")
        name = str(ax.get("name", "?"))
        letter = {"channel": "C", "time": "T"}.get(kind) or (
            name.upper() if len(name) == 1 else "?"
        )
        names.append(letter)
        units.append(ax.get("unit"))
    if not names and ndim == 5:  # NGFF 0.1/0.2 had no axes and were always 5-D TCZYX
        names, units = list("TCZYX"), [None] * 5
    if names and len(names) != ndim:
        raise TilesegError(
            path, f"invalid OME-Zarr metadata ({len(names)} axes for a {ndim}-D array)"
        )
    axes = "".join(names) or None

    pixel_size: dict[str, float] = {}
    if axes is not None:
        scale = np.ones(ndim)
        for transforms in (
            datasets[level].get("coordinateTransformations"),
            multiscale.get("coordinateTransformations"),
        ):
            for tr in transforms or []:
                if tr.get("type") == "scale" and len(tr.get("scale", ())) == ndim:
                    scale = scale * np.asarray(tr["scale"], dtype=float)
        for letter, unit, value in zip(axes, units, scale, strict=True):
            factor = unit_to_um(unit)  # NGFF without a unit: assume micrometres
            if letter in "ZYX" and factor is not None and value > 0:
                pixel_size[letter] = float(value) * factor
    for other in handles:
        if other is not handle:
            other.close()
    probe = Probe(
        format="ome-zarr",
        shape=level_shapes[level],
        dtype=np.dtype(handle.array.dtype),
        axes=axes,
        level_shapes=level_shapes,
        pixel_size=pixel_size,
        pixel_size_level=level,
        dataset=prefix + str(datasets[level]["path"]),
    )
    return probe, handle
