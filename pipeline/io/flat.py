"""Plain raster images (PNG, JPEG, BMP, GIF, WebP) through Pillow: fields of view, exported
crops and screenshots of slides, the images a lab has besides its slides.

These formats are neither tiled nor pyramidal, so a file is decoded whole, once per process
(read-only, shared by the threads that read it), and refused above :data:`MAX_PIXELS`: an image
that large belongs in a tiled (OME-)TIFF. Pixel sizes are not read: JPEG's and most PNGs' dots
per inch are a screen's, not a microscope's (``--mpp`` then says the image has no pixel size).
"""

from __future__ import annotations

import os
import warnings
from functools import lru_cache

import numpy as np

from pipeline.errors import TilesegError
from pipeline.io.formats import ArrayHandle, Probe, check_index, reason
from pipeline.io.slides import composite_rgba

__all__ = ["FLAT_SUFFIXES", "MAX_PIXELS", "open_flat"]

FLAT_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
MAX_PIXELS = 2**28  # 268 megapixels: ~0.8 GB of RGB decoded at once
_WHITE = (255, 255, 255)  # transparent pixels are composited onto glass


def open_flat(path: str, level: int) -> tuple[Probe, ArrayHandle]:
    """Open a plain raster image (its only level) as a decoded, read-only array.

    Raises
    ------
    TilesegError
        For a level other than 0, a file Pillow cannot decode, a mode with no microscopy
        meaning, or more than :data:`MAX_PIXELS` pixels.
    """
    check_index(path, "level", level, 1)
    array = _decoded(os.fspath(path), os.stat(path).st_mtime_ns)
    probe = Probe(
        format="pillow",
        shape=tuple(array.shape),
        dtype=array.dtype,
        axes="YX" if array.ndim == 2 else "YXS",
        level_shapes=[tuple(array.shape)],
    )
    return probe, ArrayHandle(array)


@lru_cache(maxsize=4)
def _decoded(path: str, mtime_ns: int) -> np.ndarray:
    """The pixels of ``path`` as it was at ``mtime_ns`` (a rewritten file is decoded again)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # the size is judged below, against our own limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise TilesegError(
                        path,
                        f"{image.height}x{image.width} px is too large to decode whole: "
                        "convert it to a tiled (OME-)TIFF",
                    )
                array = _pixels(path, image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise TilesegError(path, f"cannot decode the image: {reason(exc)}") from None
    array.setflags(write=False)
    return array


def _pixels(path: str, image) -> np.ndarray:
    """The image's pixels: grey as ``(Y, X)``, colour as RGB ``(Y, X, 3)``."""
    mode = image.mode
    if mode in ("L", "I;16", "I;16B", "I;16L", "I", "F"):
        return np.array(image)
    if mode == "1":
        return np.array(image, dtype=np.uint8) * np.uint8(255)
    if mode == "RGB":
        return np.array(image)
    if mode in ("P", "PA", "LA", "RGBA", "La", "RGBa"):
        return composite_rgba(np.array(image.convert("RGBA")), _WHITE)
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return np.array(image.convert("RGB"))
    raise TilesegError(path, f"unsupported image mode {mode!r}")
