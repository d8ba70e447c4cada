"""Lazy, window-by-window access to large microscopy and whole-slide images.

:func:`open_image` is the single entry point. It recognises tiled/strip TIFF and BigTIFF,
pyramidal (OME-)TIFF, Aperio SVS, plain Zarr v2/v3 arrays and OME-Zarr images (NGFF 0.4 on
Zarr v2, NGFF 0.5 on Zarr v3), vendor slides through OpenSlide (:mod:`pipeline.io.slides`) and
plain PNG/JPEG images (:mod:`pipeline.io.flat`, decoded whole), and returns a
:class:`LazyImage`. Nothing is decoded until :meth:`LazyImage.read` is called, and a read
decodes only the tiles, strips or chunks that intersect the requested window (TIFF through
tifffile's Zarr store, or a memory map for uncompressed contiguous data).

Every image is presented in one canonical layout, ``(C, [Z,] Y, X)``: RGB samples become
channels, singleton axes (T=1, ...) are dropped, and other native orders are transposed on read.

A :class:`LazyImage` pickles as its small :class:`ImageSpec`; the receiving process (e.g. a Dask
worker) reopens the file on first read. Open file handles are kept per thread, since tifffile
handles must not be shared between threads.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import TilesegError
from pipeline.io.chunk_cache import read_chunks
from pipeline.io.flat import FLAT_SUFFIXES, open_flat
from pipeline.io.formats import ArrayHandle, Probe, open_tiff, open_zarr, reason, reopen_zarr_array
from pipeline.io.slides import (
    OPENSLIDE_SUFFIXES,
    TIFFFILE_VENDORS,
    detect_vendor,
    dicom_folder_file,
    open_slide,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "TIFF_SUFFIXES",
    "ImageSpec",
    "LazyImage",
    "cached_image",
    "choose_reader",
    "find_images",
    "image_stem",
    "open_image",
]

TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".tf8")
IMAGE_SUFFIXES = (*TIFF_SUFFIXES, *OPENSLIDE_SUFFIXES, *FLAT_SUFFIXES, ".zarr")
# The files of a DICOM-WSI series are one slide: found as the folder that holds them.
_FOUND_SUFFIXES = tuple(s for s in IMAGE_SUFFIXES if s not in (".dcm", ".zarr"))
_READERS = {
    "tiff": "tifffile", "zarr": "zarr", "ome-zarr": "zarr", "openslide": "openslide",
    "pillow": "pillow",
}  # fmt: skip
# Longest first, so "x.ome.tif" loses ".ome.tif" rather than just ".tif".
_STEM_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.btf", ".ome.tf8", ".ome.zarr", *IMAGE_SUFFIXES)
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

_CHANNEL = "CS"  # C: channels, S: samples of RGB(A) pixels; both become the canonical C axis
_SUPPORTED = set("CSZYX")
_GENERIC = set("QI")  # tifffile's letters for dimensions of unknown meaning
_SUPPORTED_TEXT = "YX, YXS, CYX, ZYX or CZYX (in any order)"


@dataclass(frozen=True)
class ImageSpec:
    """Everything needed to reopen and read one level of one image; small and picklable.

    The first fields are public. ``store_axes``/``store_shape`` (the stored array including the
    singleton axes that are squeezed away), ``dataset`` (the level's array inside an OME-Zarr
    group) and ``axes_override`` (the caller's ``axes=``, kept for :meth:`LazyImage.at_level`)
    are implementation details.
    """

    path: str
    format: str  # "tiff" | "zarr" | "ome-zarr" | "openslide" | "pillow"
    level: int
    series: int
    axes: str  # native axes after squeezing, e.g. "YX", "YXS", "CYX", "ZYX", "CZYX", "ZCYX"
    shape: tuple[int, ...]  # native shape, same order as axes
    dtype: str  # numpy dtype str, native byte order
    level_shapes: tuple[tuple[int, ...], ...]  # spatial ([Z,] Y, X) shape of every level
    # µm per spatial axis at this level; None unless known for every spatial axis
    pixel_size: tuple[float, ...] | None
    store_axes: str = ""
    store_shape: tuple[int, ...] = ()
    dataset: str = ""
    axes_override: str | None = None
    allow_missing_chunks: bool = False
    # Read at another pixel size (pipeline/io/resolution.py): output / stored pixel size per
    # spatial axis, and the stored level's spatial shape; ``shape`` is then the resampled one.
    resample: tuple[float, ...] | None = None
    source_shape: tuple[int, ...] = ()
    # The file's name of each channel ('' where it names none), and the channels read, in the
    # order given (None: all of them); :meth:`LazyImage.with_channels`.
    channel_names: tuple[str, ...] = ()
    channels: tuple[int, ...] | None = None


class LazyImage:
    """One level of an image, read window by window in canonical ``(C, [Z,] Y, X)`` order.

    Create with :func:`open_image` (validates the file) or :meth:`from_spec` (opens nothing).
    An image may read only some of the file's channels (``spec.channels``,
    :meth:`with_channels`): every property and read then shows those channels only.
    """

    def __init__(self, spec: ImageSpec, _handle: ArrayHandle | None = None) -> None:
        self.spec = spec
        self._lock = threading.Lock()
        self._local = threading.local()
        self._handles: weakref.WeakSet[ArrayHandle] = weakref.WeakSet()
        # Names this opening's decoded Zarr chunks in the cache; a reopen after close() may
        # find the store rewritten, so it gets a new one.
        self._version = object()
        axes = spec.axes
        self._channel_axis = next((ax for ax in axes if ax in _CHANNEL), None)
        canonical = [ax for ax in (self._channel_axis or "") + "ZYX" if ax in axes]
        self._perm = tuple(axes.index(ax) for ax in canonical)
        if _handle is not None:
            self._adopt(_handle)

    @classmethod
    def from_spec(cls, spec: ImageSpec) -> LazyImage:
        """A lazy image for ``spec``; the file is opened on the first :meth:`read`."""
        if spec.resample is not None:
            from pipeline.io.resolution import ResampledImage

            return ResampledImage(spec)
        return cls(spec)

    def __reduce__(self) -> tuple[Any, ...]:
        # Only the spec travels; handles are per process and per thread.
        return (type(self), (self.spec,))

    def __dask_tokenize__(self) -> object:
        return (type(self).__qualname__, self.spec)

    # -- properties -------------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self.spec.path

    @property
    def format(self) -> str:
        return self.spec.format

    @property
    def reader(self) -> str:
        """The back-end that reads the file: ``"tifffile"``, ``"openslide"`` or ``"zarr"``."""
        return _READERS[self.spec.format]

    @property
    def axes(self) -> str:
        """Native axes after squeezing; RGB samples (``S``) read as other than red, green,
        blue are channels (``C``)."""
        if self._channel_axis == "S" and self.spec.channels is not None:
            return self.spec.axes.replace("S", "C")
        return self.spec.axes

    @property
    def shape(self) -> tuple[int, ...]:
        """Native shape, same order as :attr:`axes` (the channels read, where selected)."""
        if self._channel_axis is None or self.spec.channels is None:
            return self.spec.shape
        shape = list(self.spec.shape)
        shape[self.spec.axes.index(self._channel_axis)] = len(self.spec.channels)
        return tuple(shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.spec.dtype)

    @property
    def level(self) -> int:
        return self.spec.level

    @property
    def n_levels(self) -> int:
        return len(self.spec.level_shapes)

    @property
    def level_shapes(self) -> tuple[tuple[int, ...], ...]:
        return self.spec.level_shapes

    @property
    def pixel_size(self) -> tuple[float, ...] | None:
        return self.spec.pixel_size

    @property
    def spatial_axes(self) -> str:
        return "ZYX" if "Z" in self.spec.axes else "YX"

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.spec.shape[self.spec.axes.index(ax)] for ax in self.spatial_axes)

    @property
    def n_channels(self) -> int:
        """Channels of each read: those selected, else all of the file's."""
        if self.spec.channels is not None:
            return len(self.spec.channels)
        return self.file_channels

    @property
    def file_channels(self) -> int:
        """Channels of the file (of the image without a channel selection)."""
        if self._channel_axis is None:
            return 1
        return self.spec.shape[self.spec.axes.index(self._channel_axis)]

    @property
    def channel_names(self) -> tuple[str, ...]:
        """The name of each channel read ('' where the file names none): the file's own
        (OME-XML, NGFF ``omero`` labels, ImageJ labels), red, green and blue for the samples
        of RGB pixels."""
        names = self.file_channel_names
        if self.spec.channels is None:
            return names
        return tuple(names[c] for c in self.spec.channels)

    @property
    def file_channel_names(self) -> tuple[str, ...]:
        """The name of each of the file's channels (:attr:`channel_names` of all of them)."""
        return _file_channel_names(self.spec, self._channel_axis, self.file_channels)

    def with_channels(self, channels: tuple[int, ...] | None) -> LazyImage:
        """The same image reading the file's channels ``channels`` (indices, in the order
        given; None: all of them); opened on its first read.

        Raises
        ------
        ValueError
            For an index outside the file's channels (a caller bug: users' choices are
            checked by :func:`pipeline.io.channels.select_channels`).
        """
        spec = dataclasses.replace(self.spec, channels=_selection(self.spec, channels))
        return LazyImage.from_spec(spec)

    def __repr__(self) -> str:
        return (
            f"LazyImage({self.path!r}, format={self.format!r}, level={self.level}, "
            f"axes={self.axes!r}, shape={self.shape}, dtype={self.dtype})"
        )

    # -- reading ----------------------------------------------------------------------------
    def read(self, spatial_region: tuple[slice, ...]) -> np.ndarray:
        """Return the window as a new array in canonical ``(C, [Z,] Y, X)`` order.

        Parameters
        ----------
        spatial_region
            One slice per spatial axis (:attr:`spatial_axes`) with
            ``0 <= start <= stop <= extent`` and no step. ``None`` bounds mean 0 / the extent.

        Returns
        -------
        numpy.ndarray
            Shape ``(n_channels, [z,] y, x)``, dtype :attr:`dtype` (native byte order); C is 1
            when the image has no channel axis.

        Raises
        ------
        ValueError
            For a malformed or out-of-bounds region (a caller bug).
        TilesegError
            When the file cannot be reopened or the data in the window cannot be decoded.
        """
        return self._read_stored(self._check_region(spatial_region))

    def _read_stored(self, region: tuple[slice, ...]) -> np.ndarray:
        """:meth:`read` of a checked region of the stored level."""
        by_axis = dict(zip(self.spatial_axes, region, strict=True))
        handle = self._handle()
        try:
            parts = [self._read_index(handle, by_axis, c) for c in self._channel_reads()]
        except MemoryError:
            raise
        except Exception as exc:  # codec errors, short reads of truncated files, ...
            where = ", ".join(
                f"{ax.lower()}={s.start}:{s.stop}"
                for ax, s in zip(self.spatial_axes, region, strict=True)
            )
            raise TilesegError(self.path, f"cannot read region {where}: {reason(exc)}") from exc
        if len(parts) == 1:
            data = parts[0]
        else:
            data = np.concatenate(parts, axis=self.spec.axes.index(self._channel_axis or "C"))
        data = data.transpose(self._perm)
        if self._channel_axis is None:
            data = data[np.newaxis]
        if self.spec.channels is not None and self._channel_axis != "C":
            data = data[list(self.spec.channels)]  # samples of RGB pixels: picked once read
        return np.ascontiguousarray(data, dtype=self.dtype)

    def _channel_reads(self) -> list[slice]:
        """The channel planes each read takes: all of them, or the selected ones in runs of
        consecutive planes, so that only those are decoded. The samples of RGB pixels share
        their tiles: read together, the selected ones picked after."""
        selected = self.spec.channels
        if selected is None or self._channel_axis != "C":
            return [slice(None)]
        runs: list[slice] = []
        for c in selected:
            if runs and runs[-1].stop == c:
                runs[-1] = slice(runs[-1].start, c + 1)
            else:
                runs.append(slice(c, c + 1))
        return runs

    def _read_index(
        self, handle: ArrayHandle, by_axis: dict[str, slice], channels: slice
    ) -> np.ndarray:
        """The stored array's window (squeezed axes dropped) for the channel planes
        ``channels``."""
        index = []
        for ax, size in zip(self.spec.store_axes, self.spec.store_shape, strict=True):
            if ax in by_axis:
                index.append(by_axis[ax])
            elif ax == self._channel_axis:
                index.append(channels)
            else:  # a squeezed singleton axis
                assert size == 1
                index.append(0)
        if self.spec.format == "zarr":
            data = read_chunks(handle.array, tuple(index), namespace=self._version)
        else:  # TIFF: decoded tiles are kept by its store (see formats.py); memmaps need none
            data = handle.array[tuple(index)]
        # A memory-mapped window is a view of the file: copy it, so callers get a new array
        # that stays valid after close().
        return np.array(data) if isinstance(data, np.memmap) else np.asarray(data)

    @property
    def chunk_shape(self) -> tuple[int, ...] | None:
        """The file's tile/chunk extent along each spatial axis, or ``None`` (memory-mapped)."""
        chunks = getattr(self._handle().array, "chunks", None)
        if chunks is None:
            return None
        by_axis = dict(zip(self.spec.store_axes, chunks, strict=True))
        return tuple(int(by_axis[ax]) for ax in self.spatial_axes)

    def _check_region(self, region: tuple[slice, ...]) -> tuple[slice, ...]:
        region = tuple(region)
        extents = self.spatial_shape
        if len(region) != len(extents):
            raise ValueError(
                f"expected {len(extents)} slices for axes {self.spatial_axes}, got {len(region)}"
            )
        out = []
        for ax, s, n in zip(self.spatial_axes, region, extents, strict=True):
            if not isinstance(s, slice) or s.step not in (None, 1):
                raise ValueError(f"region for axis {ax} must be a slice without step, got {s!r}")
            start = 0 if s.start is None else int(s.start)
            stop = n if s.stop is None else int(s.stop)
            if not 0 <= start <= stop <= n:
                raise ValueError(f"region {start}:{stop} for axis {ax} outside 0:{n}")
            out.append(slice(start, stop))
        return tuple(out)

    # -- handles ----------------------------------------------------------------------------
    def _adopt(self, handle: ArrayHandle) -> None:
        with self._lock:
            self._local.handle = handle
            self._handles.add(handle)

    def _handle(self) -> ArrayHandle:
        handle = getattr(self._local, "handle", None)
        if handle is None:
            handle = _reopen(self.spec)
            self._adopt(handle)
        return handle

    def close(self) -> None:
        """Close the file handles of every thread; a later :meth:`read` reopens the file."""
        with self._lock:
            handles = list(self._handles)
            self._handles = weakref.WeakSet()
            self._local = threading.local()  # other threads lose their stale handles too
            self._version = object()
        for handle in handles:
            handle.close()

    def __enter__(self) -> LazyImage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def at_level(self, level: int) -> LazyImage:
        """The same image (same series, axes override and channels) at pyramid level
        ``level``."""
        spec = self.spec
        return open_image(
            spec.path, level=level, axes=spec.axes_override, series=spec.series,
            allow_missing_chunks=spec.allow_missing_chunks, reader=self.reader,
            channels=spec.channels,
        )  # fmt: skip


_SAMPLE_NAMES = ("red", "green", "blue", "alpha")


def _file_channel_names(spec: ImageSpec, channel_axis: str | None, count: int) -> tuple[str, ...]:
    if spec.channel_names:
        return spec.channel_names
    if channel_axis == "S" and count in (3, 4):
        return _SAMPLE_NAMES[:count]
    return ("",) * count


def _selection(spec: ImageSpec, channels: Sequence[int] | None) -> tuple[int, ...] | None:
    """``channels`` checked against the file's channels; None for all of them in order."""
    if channels is None:
        return None
    channel_axis = next((ax for ax in spec.axes if ax in _CHANNEL), None)
    count = spec.shape[spec.axes.index(channel_axis)] if channel_axis else 1
    selected = tuple(int(c) for c in channels)
    if not selected or not all(0 <= c < count for c in selected):
        raise ValueError(f"channels {selected} outside the image's {count} channel(s)")
    return None if selected == tuple(range(count)) else selected


def _reopen(spec: ImageSpec) -> ArrayHandle:
    """Open a handle for ``spec`` (e.g. in a new thread or process) and check it still matches."""
    if not os.path.exists(spec.path):
        raise TilesegError(spec.path, "no such file or directory")
    if spec.format == "tiff":
        # The first open checked the whole file; a changed file shows in its shape, below.
        probe, handle = open_tiff(spec.path, spec.level, spec.series, check_truncation=False)
        shape = probe.shape
    elif spec.format == "openslide":
        probe, handle = open_slide(spec.path, spec.level)
        shape = probe.shape
    elif spec.format == "pillow":
        probe, handle = open_flat(spec.path, spec.level)
        shape = probe.shape
    else:
        handle = reopen_zarr_array(spec.path, spec.dataset, allow_missing=spec.allow_missing_chunks)
        shape = tuple(handle.array.shape)
    if shape != spec.store_shape:
        handle.close()
        raise TilesegError(spec.path, "the file changed after it was opened (shape differs)")
    return handle


# ----------------------------------------------------------------------------- open_image


def open_image(
    path: str | os.PathLike[str],
    *,
    level: int = 0,
    axes: str | None = None,
    series: int = 0,
    allow_missing_chunks: bool = False,
    reader: str | None = None,
    channels: Sequence[int] | None = None,
) -> LazyImage:
    """Open an image file, slide or Zarr directory lazily.

    Parameters
    ----------
    path
        A TIFF-family file (``.tif``, ``.tiff``, ``.ome.tif``, ``.btf``, ``.tf8``, ``.svs``; any
        file with a TIFF header is accepted), a slide OpenSlide reads (:mod:`pipeline.io.slides`;
        a DICOM-WSI folder or one of its files), a Zarr array / OME-Zarr directory, or a
        plain PNG, JPEG, BMP, GIF or WebP image (:mod:`pipeline.io.flat`).
    level
        Pyramid level, 0 = full resolution.
    axes
        Axes letters of the stored array (e.g. ``"ZYX"``, ``"YXC"``), overriding what the file
        says or the guess for formats without axes. Either one letter per stored dimension or
        one per non-singleton dimension. Plain Zarr arrays use their single-letter dimension
        names if they have them, otherwise a guess from the shape: 2-D -> YX, 3-D with a last
        dimension of 3 or 4 -> YXS, other 3-D -> ZYX, 4-D -> CZYX. Unnamed TIFF dimensions
        (tifffile's Q/I) are guessed the same way: one is Z, two are C then Z.
    series
        TIFF series, OME-Zarr multiscales entry, or bioformats2raw image.
    allow_missing_chunks
        Read chunks missing from a Zarr store as the fill value instead of failing (for arrays
        written with zarr-python 3's default of omitting all-fill chunks).
    reader
        ``"tifffile"``, ``"openslide"``, ``"zarr"`` or ``"pillow"``; default:
        :func:`choose_reader`, with OpenSlide as the fallback for a TIFF that tifffile cannot parse.
    channels
        Read only these of the file's channels, in this order (:meth:`LazyImage.with_channels`;
        an index outside them is a ``ValueError``).

    Raises
    ------
    TilesegError
        For a missing path, an unknown or corrupt format, a level/series out of range,
        unsupported axes or a zero-size image.
    """
    shown = os.fspath(path)
    if not os.path.exists(shown):
        raise TilesegError(shown, "no such file or directory")
    chosen = reader or choose_reader(shown)
    if chosen == "openslide":
        probe, handle = open_slide(shown, level)
    elif chosen == "pillow":
        probe, handle = open_flat(shown, level)
    elif chosen == "zarr":
        probe, handle = open_zarr(shown, level, series, allow_missing=allow_missing_chunks)
    elif chosen == "tifffile":
        probe, handle = _open_tiff_or_slide(shown, level, series, fallback=reader is None)
    else:
        raise ValueError(f"unknown reader {reader!r}")
    try:
        spec = _make_spec(shown, probe, level, series, axes)
        spec = dataclasses.replace(spec, allow_missing_chunks=allow_missing_chunks)
        spec = dataclasses.replace(spec, channels=_selection(spec, channels))
    except BaseException:
        handle.close()
        raise
    return LazyImage(spec, handle)


def choose_reader(path: str | os.PathLike[str]) -> str:
    """The back-end for ``path``: ``"zarr"`` for Zarr/OME-Zarr directories, ``"openslide"``
    for vendor slide formats (by extension, a DICOM-WSI folder, or a TIFF whose vendor
    OpenSlide recognises, such as Philips), ``"tifffile"`` for the TIFF family (OME-TIFF,
    Aperio SVS, generic and multichannel TIFF), ``"pillow"`` for plain PNG/JPEG/BMP/GIF/WebP
    images.

    Raises
    ------
    TilesegError
        For a missing path or a file that neither back-end reads.
    """
    shown = os.fspath(path)
    p = Path(shown)
    if not p.exists():
        raise TilesegError(shown, "no such file or directory")
    if p.is_dir():
        if not _zarr_metadata(p) and dicom_folder_file(p) is not None:
            return "openslide"
        return "zarr"
    if not p.is_file():
        raise TilesegError(shown, "not a regular file or directory")
    name = p.name.lower()
    if name.endswith(OPENSLIDE_SUFFIXES):
        return "openslide"
    if name.endswith(FLAT_SUFFIXES):
        return "pillow"
    tiff = name.endswith(TIFF_SUFFIXES) or _has_tiff_header(shown)
    vendor = detect_vendor(shown)
    if vendor is not None and vendor not in TIFFFILE_VENDORS:
        return "openslide"
    if tiff:
        return "tifffile"
    if vendor is not None:
        return "openslide"
    raise TilesegError(
        shown,
        f"unknown image format {''.join(p.suffixes[-2:]) or '(no extension)'!r}: expected "
        "TIFF/OME-TIFF/BigTIFF/SVS, a slide format OpenSlide reads, a Zarr/OME-Zarr directory "
        "or a PNG/JPEG/BMP image",
    )


def _zarr_metadata(path: Path) -> bool:
    return any((path / name).exists() for name in (".zgroup", ".zarray", "zarr.json"))


def _open_tiff_or_slide(
    path: str, level: int, series: int, *, fallback: bool
) -> tuple[Probe, ArrayHandle]:
    """tifffile, or OpenSlide where tifffile cannot parse a file OpenSlide recognises (a cut
    file is refused as such, never handed over)."""
    try:
        return open_tiff(path, level, series)
    except TilesegError as exc:
        unparsed = exc.problem.startswith(("not a valid TIFF", "cannot parse TIFF", "unsupported"))
        if not (fallback and unparsed and detect_vendor(path) is not None):
            raise
    return open_slide(path, level)


def _has_tiff_header(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) in _TIFF_MAGIC
    except OSError as exc:
        raise TilesegError(path, f"cannot open file: {exc.strerror or reason(exc)}") from exc


def _make_spec(path: str, probe: Probe, level: int, series: int, axes: str | None) -> ImageSpec:
    shape = probe.shape
    if 0 in shape or not shape:
        raise TilesegError(path, f"zero-size image (shape {shape})")
    store_axes = _resolve_axes(path, probe.axes, shape, axes)
    # A singleton Z or C the caller named explicitly stays (a 3D model on a one-plane volume).
    named = set(axes.upper()) & set("ZC") if axes else set()
    keep = [i for i, ax in enumerate(store_axes) if ax in named or not _squeezed(ax, shape[i])]
    native = "".join(store_axes[i] for i in keep)
    _check_supported(path, native, store_axes, shape)

    spatial = [store_axes.index(ax) for ax in "ZYX" if ax in native]
    level_shapes = tuple(tuple(s[i] for i in spatial) for s in probe.level_shapes)
    pixel_size = None
    if all(ax in probe.pixel_size for ax in "ZYX" if ax in native):
        ref, this = level_shapes[probe.pixel_size_level], level_shapes[level]
        pixel_size = tuple(
            probe.pixel_size[store_axes[i]] * ref[k] / this[k] for k, i in enumerate(spatial)
        )
    return ImageSpec(
        path=os.path.abspath(path),  # lets workers with another working directory reopen it
        format=probe.format,
        level=level,
        series=series,
        axes=native,
        shape=tuple(shape[i] for i in keep),
        dtype=probe.dtype.newbyteorder("=").str,
        level_shapes=level_shapes,
        pixel_size=pixel_size,
        store_axes=store_axes,
        store_shape=tuple(shape),
        dataset=probe.dataset,
        axes_override=axes,
        channel_names=_named_channels(probe, store_axes, shape, native),
    )


def _named_channels(
    probe: Probe, store_axes: str, shape: tuple[int, ...], native: str
) -> tuple[str, ...]:
    """The file's channel names, where it gives one for each channel of the image (of its C
    axis, or its one channel)."""
    if "S" in native or not probe.channel_names:
        return ()
    count = shape[store_axes.index("C")] if "C" in store_axes else 1
    return tuple(probe.channel_names) if len(probe.channel_names) == count else ()


def _squeezed(ax: str, size: int) -> bool:
    return size == 1 and ax not in "YX"


def _resolve_axes(
    path: str, detected: str | None, shape: tuple[int, ...], override: str | None
) -> str:
    """One letter per stored dimension: the caller's override, the file's axes, or a guess."""
    ndim = len(shape)
    if override is not None:
        letters = override.strip().upper()
        if not letters.isalpha() or len(set(letters)) != len(letters):
            raise TilesegError(path, f"invalid axes {override!r}: use distinct letters like 'ZYX'")
        if len(letters) == ndim:
            return letters
        big = [i for i, n in enumerate(shape) if n != 1]
        if len(letters) == len(big):  # letters for the non-singleton dimensions only
            out = ["Q"] * ndim
            for i, ax in zip(big, letters, strict=True):
                out[i] = ax
            return "".join(out)
        raise TilesegError(
            path, f"axes {override!r} have {len(letters)} letters but the image shape is {shape}"
        )
    if detected is None:
        guess = {2: "YX", 4: "CZYX"}.get(ndim)
        if ndim == 3:
            guess = "YXS" if shape[-1] in (3, 4) else "ZYX"
        if guess is None:
            raise TilesegError(
                path,
                f"unsupported axes: cannot guess the axes of a {ndim}-D array {shape}; "
                "pass the axes explicitly",
            )
        return guess
    # Dimensions tifffile could not name (plain multi-page or shaped TIFF): the same guess as
    # for plain arrays — one unnamed dimension is Z, two are C then Z.
    axes = list(detected)
    unnamed = [i for i, ax in enumerate(axes) if ax in _GENERIC and shape[i] != 1]
    free = [ax for ax in ("CZ" if len(unnamed) > 1 else "ZC") if ax not in detected]
    if "S" in detected and "C" in free:
        free.remove("C")
    if len(unnamed) <= len(free):
        for i, ax in zip(unnamed, free, strict=False):
            axes[i] = ax
    return "".join(axes)


def _check_supported(path: str, native: str, store_axes: str, store_shape: tuple[int, ...]) -> None:
    channel = [ax for ax in native if ax in _CHANNEL]
    if (
        not set(native) <= _SUPPORTED
        or "Y" not in native
        or "X" not in native
        or len(channel) > 1
        or len(set(native)) != len(native)
    ):
        raise TilesegError(
            path,
            f"unsupported axes {store_axes} (shape {store_shape}): need {_SUPPORTED_TEXT} after "
            "dropping singleton axes; pass axes= to override",
        )


# ------------------------------------------------------------------------ directory helpers


def find_images(directory: str | os.PathLike[str]) -> list[Path]:
    """Sorted images directly inside ``directory``: TIFF-family files, plain PNG/JPEG images,
    slide files OpenSlide reads (a MIRAX ``.mrxs``, not its data folder), ``*.zarr``
    directories and DICOM-WSI folders (a folder of ``.dcm`` files is one slide).

    Hidden entries (names starting with ``.``) are skipped; subdirectories are not searched.
    """
    d = Path(directory)
    if not d.exists():
        raise TilesegError(d, "no such file or directory")
    if not d.is_dir():
        raise TilesegError(d, "not a directory")
    found = []
    for p in d.iterdir():
        name = p.name.lower()
        if name.startswith("."):
            continue
        if p.is_dir():
            if name.endswith(".zarr") or (
                not _zarr_metadata(p) and dicom_folder_file(p) is not None
            ):
                found.append(p)
        elif p.is_file() and name.endswith(_FOUND_SUFFIXES):
            found.append(p)
    return sorted(found)


def image_stem(path: str | os.PathLike[str]) -> str:
    """File name without its image extension: ``slide.ome.tif`` -> ``slide``, ``a.zarr`` -> ``a``.

    Directory paths may end with a separator.
    """
    name = Path(os.fspath(path).rstrip("/\\")).name
    lower = name.lower()
    for suffix in _STEM_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return Path(name).stem or name


# Per-process cache: a worker opens each image once, not per task or tile.
_cached: dict[str, LazyImage] = {}
_cached_lock = threading.Lock()


def cached_image(spec: ImageSpec) -> LazyImage:
    """This process's lazy image for ``spec``, opened once (a replaced file is reopened)."""
    try:
        stamp = os.stat(spec.path).st_mtime_ns
    except OSError:
        stamp = None
    key = f"{spec!r}@{stamp}"
    with _cached_lock:
        if key not in _cached:
            _cached[key] = LazyImage.from_spec(spec)
        return _cached[key]
