"""Whole-slide images through OpenSlide: vendor formats read window by window, like any TIFF.

OpenSlide (the optional ``wsi`` extra: ``openslide-python`` with the ``openslide-bin`` wheel)
reads what scanners write — Hamamatsu ``.ndpi``/``.vms``/``.vmu``, 3DHISTECH MIRAX ``.mrxs``,
Leica ``.scn``, Ventana ``.bif``, Sakura ``.svslide``, Philips TIFF, DICOM-WSI — with their
pyramids, microns per pixel and associated images (label, macro, thumbnail). A level is
presented as an RGB ``(y, x, 3)`` uint8 array (axes ``YXS``) whose ``[index]`` assembles the
cache tiles the window touches (:func:`pipeline.io.chunk_cache.read_chunks`): each cache tile is
one ``read_region`` call at a fixed place on a fixed grid, so a pixel is always decoded by the
same call, whichever window asks for it, and each tile is decoded about once per run.

OpenSlide returns premultiplied ARGB (openslide-python un-premultiplies it): areas the scanner
never imaged are transparent. They are composited over the slide's background colour
(``openslide.background-color``, white when unset) in integer arithmetic, so the RGB pixels are
the same on every machine.
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import TilesegError
from pipeline.io.chunk_cache import read_chunks
from pipeline.io.formats import ArrayHandle, Probe, check_index

__all__ = [
    "OPENSLIDE_SUFFIXES",
    "SlideTiles",
    "associated_images",
    "available",
    "composite_rgba",
    "detect_vendor",
    "dicom_folder_file",
    "open_slide",
]

# Formats read through OpenSlide by default (tifffile reads Aperio SVS and generic TIFF).
OPENSLIDE_SUFFIXES = (
    ".ndpi", ".vms", ".vmu", ".mrxs", ".scn", ".bif", ".svslide", ".czi", ".dcm"
)
# OpenSlide vendors whose TIFF-based files tifffile reads as well as OpenSlide does.
TIFFFILE_VENDORS = frozenset({"aperio", "generic-tiff"})
_DEFAULT_TILE = 512  # cache tile side when the level does not say its tile size
_MIN_TILE = 256  # vendor tiles smaller than this are read several at a time


def available() -> bool:
    """Whether OpenSlide (the ``wsi`` extra) can be imported."""
    try:
        import openslide  # noqa: F401
    except ImportError:
        return False
    return True


def detect_vendor(path: str) -> str | None:
    """OpenSlide's name for the format of ``path`` (``"aperio"``, ``"philips"``, ...), or
    ``None`` when OpenSlide is not installed or does not read it."""
    if not available():
        return None
    import openslide

    try:
        return openslide.OpenSlide.detect_format(path)
    except Exception:  # unreadable files: the back-end that opens them says why
        return None


def dicom_folder_file(directory: str | os.PathLike[str]) -> str | None:
    """The first ``.dcm`` file of a DICOM-WSI folder (OpenSlide finds the series' other
    files beside it), or ``None`` when the folder holds none."""
    files = sorted(
        p for p in Path(directory).iterdir() if p.is_file() and p.name.lower().endswith(".dcm")
    )
    return os.fspath(files[0]) if files else None


def _openslide_module(path: str) -> Any:
    try:
        import openslide
    except ImportError:
        raise TilesegError(
            path,
            "this slide format is read through OpenSlide: install the 'wsi' extra "
            "(pip install 'tileseg[wsi]')",
        ) from None
    return openslide


def _open(path: str) -> Any:
    openslide = _openslide_module(path)
    target = dicom_folder_file(path) if os.path.isdir(path) else path
    if target is None:
        raise TilesegError(path, "directory holds no .dcm file (not a DICOM whole-slide image)")
    try:
        return openslide.OpenSlide(target)
    except openslide.OpenSlideUnsupportedFormatError:
        raise TilesegError(path, "not a slide format OpenSlide reads") from None
    except openslide.OpenSlideError as exc:
        raise TilesegError(path, f"OpenSlide cannot read the slide ({exc})") from None
    except OSError as exc:
        raise TilesegError(path, f"cannot open file: {exc.strerror or exc}") from None


def composite_rgba(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """RGB of non-premultiplied RGBA ``(..., 4)`` uint8 pixels over an opaque background,
    rounded to nearest in integer arithmetic (the same bytes on every machine)."""
    alpha = rgba[..., 3:4].astype(np.uint32)
    if alpha.min(initial=255) == 255:
        return np.ascontiguousarray(rgba[..., :3])
    rgb = rgba[..., :3].astype(np.uint32)
    bg = np.asarray(background, np.uint32)
    out = (rgb * alpha + bg * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


def _background(properties: Any) -> tuple[int, int, int]:
    text = str(properties.get("openslide.background-color") or "FFFFFF")
    try:
        value = int(text, 16)
    except ValueError:
        value = 0xFFFFFF
    return (value >> 16) & 255, (value >> 8) & 255, value & 255


def _tile_side(properties: Any, level: int) -> tuple[int, int]:
    """Cache tile (rows, columns): the level's own tile size, in multiples of at least
    :data:`_MIN_TILE`, so a cache tile is whole vendor tiles where the level says them."""
    sides = []
    for key in ("height", "width"):
        try:
            side = int(properties.get(f"openslide.level[{level}].tile-{key}") or 0)
        except ValueError:
            side = 0
        side = side or _DEFAULT_TILE
        sides.append(side * -(-_MIN_TILE // side))
    return sides[0], sides[1]


class SlideTiles:
    """An array-like over one level of an OpenSlide slide: ``shape`` ``(y, x, 3)``, ``dtype``
    uint8, ``chunks`` (the cache tile) and ``tiles[index]`` for slices without step or ints."""

    def __init__(self, slide: Any, level: int, *, namespace: Hashable) -> None:
        width, height = slide.level_dimensions[level]
        self.shape = (int(height), int(width), 3)
        self.dtype = np.dtype(np.uint8)
        self.chunks = (*_tile_side(slide.properties, level), 3)
        self.namespace = namespace
        self._slide = slide
        self._level = level
        self._downsample = float(slide.level_downsamples[level])
        self._background = _background(slide.properties)

    def close(self) -> None:
        self._slide.close()

    def __getitem__(self, index: tuple[Any, ...]) -> np.ndarray:
        return read_chunks(self, index, namespace=self.namespace, decode=self.tile)

    def tile(self, coords: tuple[int, ...]) -> np.ndarray:
        """The cache tile at grid position ``coords``, cut at the level's end."""
        (ty, tx, _), (th, tw, _) = coords, self.chunks
        y, x = ty * th, tx * tw
        h, w = min(th, self.shape[0] - y), min(tw, self.shape[1] - x)
        # read_region takes level-0 coordinates; OpenSlide divides them by the downsample.
        origin = (round(x * self._downsample), round(y * self._downsample))
        region = self._slide.read_region(origin, self._level, (w, h))
        return composite_rgba(np.asarray(region), self._background)


def _pixel_size(properties: Any) -> dict[str, float]:
    sizes = {}
    for ax in "YX":
        try:
            value = float(properties.get(f"openslide.mpp-{ax.lower()}") or 0)
        except ValueError:
            value = 0.0
        if value > 0:
            sizes[ax] = value
    return sizes if len(sizes) == 2 else {}


def open_slide(path: str, level: int) -> tuple[Probe, ArrayHandle]:
    """Probe and open level ``level`` of a slide through OpenSlide.

    Returns
    -------
    (Probe, ArrayHandle)
        As :func:`pipeline.io.formats.open_tiff` does; the probe's format is ``"openslide"``.

    Raises
    ------
    TilesegError
        When OpenSlide is not installed, does not read the file, or the level is out of range.
    """
    slide = _open(path)
    try:
        check_index(path, "level", level, slide.level_count)
        stat = os.stat(path)
        namespace = ("openslide", os.path.abspath(path), stat.st_ino, stat.st_mtime_ns, level)
        tiles = SlideTiles(slide, level, namespace=namespace)
        probe = Probe(
            format="openslide",
            shape=tiles.shape,
            dtype=tiles.dtype,
            axes="YXS",
            level_shapes=[(int(h), int(w), 3) for w, h in slide.level_dimensions],
            pixel_size=_pixel_size(slide.properties),
        )
    except BaseException:
        slide.close()
        raise
    return probe, ArrayHandle(tiles, tiles.close)


def associated_images(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The slide's associated images (``label``, ``macro``, ``thumbnail``, ...) as RGB
    ``(y, x, 3)`` uint8 arrays, composited like the slide's pixels."""
    slide = _open(os.fspath(path))
    try:
        background = _background(slide.properties)
        return {
            name: composite_rgba(np.asarray(image.convert("RGBA")), background)
            for name, image in slide.associated_images.items()
        }
    finally:
        slide.close()
