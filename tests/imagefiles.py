"""Helpers that write small real image files for tests.

Every writer produces a genuine file in the format the pipeline reads (TIFF/OME-TIFF/BigTIFF,
Aperio SVS, Zarr v2/v3 arrays, OME-Zarr NGFF 0.4/0.5), so the readers are exercised through
tifffile/zarr exactly as with user data. Pyramid levels are made by plain stride-2 subsampling of
the spatial axes, so a test can compute the expected pixels of level ``n`` as
``downsample(array, axes, n)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile
import zarr

__all__ = [
    "downsample",
    "write_ome_zarr",
    "write_svs",
    "write_tiff",
    "write_zarr",
]

_UNIT_NAMES = {"Z": "z", "Y": "y", "X": "x", "C": "c", "T": "t"}


def downsample(array: np.ndarray, axes: str, level: int) -> np.ndarray:
    """Return pyramid level ``level`` of ``array``: Y and X subsampled by ``2**level``.

    Z, C and S are kept at full size (as the pyramids written here do).
    """
    step = 2**level
    index = tuple(slice(None, None, step) if ax in "YX" else slice(None) for ax in axes)
    return np.ascontiguousarray(array[index])


def _check_axes(array: np.ndarray, axes: str) -> None:
    if len(axes) != array.ndim:
        raise ValueError(f"axes {axes!r} do not match array of shape {array.shape}")


def write_tiff(
    path: str | os.PathLike[str],
    array: np.ndarray,
    *,
    axes: str,
    tile: tuple[int, int] | None = (64, 64),
    compression: str | None = None,
    pyramid_levels: int = 0,
    ome: bool = True,
    pixel_size: Sequence[float] | None = None,
    bigtiff: bool = False,
    rowsperstrip: int | None = None,
    channel_names: Sequence[str] | None = None,
) -> Path:
    """Write ``array`` (with the given ``axes``, e.g. ``"YX"``, ``"YXS"``, ``"CZYX"``) as a TIFF.

    Parameters
    ----------
    tile
        Tile shape (multiples of 16); ``None`` writes strips (``rowsperstrip`` rows each).
    compression
        ``None``, ``"zlib"`` or ``"jpeg"`` (JPEG needs uint8 ``YX``/``YXS``).
    pyramid_levels
        Number of extra levels stored as SubIFDs, each halving Y and X.
    ome
        Write OME-XML metadata (axes, physical sizes). With ``ome=False`` the file is a
        "plain" TIFF: tifffile's JSON description records only the shape (tifffile reports the
        non-YX/S axes as ``Q``), and ``pixel_size`` (y, x) goes into XResolution/YResolution
        in centimetres.
    pixel_size
        Micrometres per pixel for the spatial axes, ``(y, x)`` or ``(z, y, x)``.
    channel_names
        One name per channel (the C axis), written as OME-XML ``Channel/@Name``.
    """
    path = Path(path)
    _check_axes(array, axes)
    rgb = axes.endswith("S")
    options: dict = {
        "photometric": "rgb" if rgb else "minisblack",
        "compression": compression,
    }
    if rgb:
        options["planarconfig"] = "contig"
    if tile is not None:
        options["tile"] = tuple(tile)
    elif rowsperstrip is not None:
        options["rowsperstrip"] = rowsperstrip
    if compression == "jpeg" and rgb:
        options["subsampling"] = (1, 1)  # no chroma subsampling: keeps JPEG errors small
    spatial = "".join(ax for ax in axes if ax in "ZYX")

    metadata: dict | None
    resolution = None
    if ome:
        metadata = {"axes": axes}
        if pixel_size is not None:
            for ax, size in zip(spatial, pixel_size, strict=True):
                metadata[f"PhysicalSize{ax}"] = float(size)
                metadata[f"PhysicalSize{ax}Unit"] = "µm"
        if channel_names is not None:
            metadata["Channel"] = {"Name": list(channel_names)}
    else:
        metadata = {}  # tifffile's JSON "shaped" description: keeps the shape, names no axes
        if pixel_size is not None:
            y_um, x_um = pixel_size[-2:]
            resolution = (1e4 / x_um, 1e4 / y_um)  # pixels per centimetre
            options["resolutionunit"] = "CENTIMETER"

    with tifffile.TiffWriter(path, bigtiff=bigtiff, ome=ome) as tif:
        tif.write(
            array,
            metadata=metadata,
            subifds=pyramid_levels or None,
            resolution=resolution,
            **options,
        )
        for level in range(1, pyramid_levels + 1):
            tif.write(
                downsample(array, axes, level),
                subfiletype=1,
                metadata=None,
                resolution=None
                if resolution is None
                else (resolution[0] / 2**level, resolution[1] / 2**level),
                **options,
            )
    return path


def write_svs(
    path: str | os.PathLike[str],
    rgb_array: np.ndarray,
    *,
    tile: int | tuple[int, int] = 64,
    mpp: float = 0.5,
    levels: int = 1,
    compression: str = "jpeg",
) -> Path:
    """Write an Aperio-SVS-like file: JPEG-tiled RGB pyramid with an Aperio ImageDescription
    (``compression="zlib"``: lossless tiles, for comparing decoders pixel for pixel).

    Layout (what tifffile's SVS parser expects): page 0 the full-resolution level, page 1 a small
    stripped thumbnail, then one tiled page per further level (each halving Y and X).
    ``MPP = mpp`` is written in the description.
    """
    path = Path(path)
    _check_axes(rgb_array, "YXS")
    if rgb_array.dtype != np.uint8 or rgb_array.shape[2] != 3:
        raise ValueError("write_svs needs a uint8 (Y, X, 3) array")
    tile = (tile, tile) if isinstance(tile, int) else tuple(tile)
    height, width = rgb_array.shape[:2]
    options = {"photometric": "rgb", "compression": compression, "metadata": None}
    if compression == "jpeg":
        options.update(compressionargs={"level": 95}, subsampling=(1, 1))
    with tifffile.TiffWriter(path) as tif:
        for level in range(levels):
            data = downsample(rgb_array, "YXS", level)
            description = (
                f"Aperio Image Library v12.0.0\r\n{width}x{height} [0,0 {width}x{height}] "
                f"({tile[1]}x{tile[0]}) JPEG/RGB Q=95"
                + (f"|AppMag = 20|MPP = {mpp}" if level == 0 else "")
            )
            tif.write(data, tile=tile, description=description, **options)
            if level == 0:
                thumb = downsample(rgb_array, "YXS", 2)
                tif.write(thumb, description="Aperio Image Library v12.0.0\r\nthumbnail", **options)
    return path


def write_jpeg_tables_tiff(
    path: str | os.PathLike[str], gray: np.ndarray, *, tile: tuple[int, int] = (32, 32)
) -> Path:
    """Write a uint8 ``YX`` image as JPEG tiles in abbreviated format, as Aperio and most
    scanners store them: each tile's stream lacks its quantization and Huffman tables, which
    the page's JPEGTables tag holds once for all tiles (tifffile's own writer repeats the
    tables in every tile, so decoding its files never needs the tag)."""
    import imagecodecs

    path = Path(path)
    _check_axes(gray, "YX")
    th, tw = tile
    padded = np.zeros((-(-gray.shape[0] // th) * th, -(-gray.shape[1] // tw) * tw), np.uint8)
    padded[: gray.shape[0], : gray.shape[1]] = gray
    tables: set[bytes] = set()
    streams = []
    for y in range(0, padded.shape[0], th):
        for x in range(0, padded.shape[1], tw):
            encoded = imagecodecs.jpeg8_encode(padded[y : y + th, x : x + tw], level=90)
            table, stream = _split_jpeg_tables(encoded)
            tables.add(table)
            streams.append(stream)
    if len(tables) != 1:
        raise ValueError("tiles were encoded with different tables")
    tifffile.imwrite(
        path,
        iter(streams),
        shape=gray.shape,
        dtype=np.uint8,
        tile=tile,
        compression="jpeg",
        photometric="minisblack",
        jpegtables=tables.pop(),
        metadata=None,
    )
    return path


def _split_jpeg_tables(jpeg: bytes) -> tuple[bytes, bytes]:
    """``(tables, stream)``: the DQT and DHT segments of a baseline JPEG as a tables-only
    stream (SOI, tables, EOI), and the JPEG without them."""
    assert jpeg[:2] == b"\xff\xd8"
    tables, rest, at = [], [], 2
    while jpeg[at + 1] != 0xDA:  # segments up to the start of scan
        end = at + 2 + int.from_bytes(jpeg[at + 2 : at + 4], "big")
        (tables if jpeg[at + 1] in (0xDB, 0xC4) else rest).append(jpeg[at:end])
        at = end
    if not tables:
        raise ValueError("a JPEG without tables to split off")
    return b"\xff\xd8" + b"".join(tables) + b"\xff\xd9", b"\xff\xd8" + b"".join(rest) + jpeg[at:]


def write_zarr(
    path: str | os.PathLike[str],
    array: np.ndarray,
    *,
    chunks: Sequence[int],
    zarr_format: int = 3,
) -> Path:
    """Write ``array`` as a plain Zarr array (a directory holding one array, no OME metadata)."""
    path = Path(path)
    z = zarr.create_array(
        store=str(path),
        shape=array.shape,
        chunks=tuple(chunks),
        dtype=array.dtype,
        zarr_format=zarr_format,
        fill_value=0,
    )
    z[...] = array
    return path


def write_ome_zarr(
    path: str | os.PathLike[str],
    array: np.ndarray,
    *,
    axes: str,
    chunks: Sequence[int],
    levels: int = 1,
    pixel_size: Sequence[float] | None = None,
    version: str = "0.4",
    unit: str = "micrometer",
    channel_names: Sequence[str] | None = None,
) -> Path:
    """Write an OME-Zarr image (one multiscales entry with ``levels`` datasets ``0``, ``1``, ...).

    ``version="0.4"`` writes NGFF 0.4 on Zarr v2 (``.zattrs``); ``version="0.5"`` writes NGFF 0.5
    on Zarr v3 (attributes under ``"ome"`` in ``zarr.json``). ``axes`` uses letters from
    ``TCZYX``; ``pixel_size`` is ``(y, x)`` or ``(z, y, x)`` in ``unit`` for level 0;
    ``channel_names`` become the ``omero`` metadata's channel labels.
    """
    path = Path(path)
    _check_axes(array, axes)
    if version not in ("0.4", "0.5"):
        raise ValueError(f"unsupported NGFF version {version!r}")
    zarr_format = 2 if version == "0.4" else 3
    root = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    spatial = [ax for ax in axes if ax in "ZYX"]
    base = dict.fromkeys(spatial, 1.0)
    if pixel_size is not None:
        base.update(zip(spatial, map(float, pixel_size), strict=True))

    axes_meta = []
    for ax in axes:
        entry = {"name": _UNIT_NAMES[ax]}
        entry["type"] = {"C": "channel", "T": "time"}.get(ax, "space")
        if ax in "ZYX":
            entry["unit"] = unit
        axes_meta.append(entry)

    datasets = []
    for level in range(levels):
        data = downsample(array, axes, level)
        root.create_array(
            str(level),
            shape=data.shape,
            chunks=tuple(min(c, s) for c, s in zip(chunks, data.shape, strict=True)),
            dtype=data.dtype,
            fill_value=0,
            chunk_key_encoding={"name": "v2", "separator": "/"} if zarr_format == 2 else None,
        )[...] = data
        scale = [base[ax] * (2**level if ax in "YX" else 1) if ax in base else 1.0 for ax in axes]
        datasets.append(
            {"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": scale}]}
        )

    multiscale: dict = {"axes": axes_meta, "datasets": datasets, "name": path.stem}
    extra = {}
    if channel_names is not None:
        extra["omero"] = {"channels": [{"label": n, "active": True} for n in channel_names]}
    if version == "0.4":
        multiscale["version"] = "0.4"
        root.attrs.update({"multiscales": [multiscale], **extra})
    else:
        root.attrs.update({"ome": {"version": "0.5", "multiscales": [multiscale], **extra}})
    return path
