"""Overlap-tile geometry: which output tiles exist, which input window each one needs.

Pure: no I/O, no torch. Everything is in image pixel coordinates of the spatial axes
(``YX`` or ``ZYX``); channels never appear here.

The rules that make tiled inference identical to one pass over the whole image:

* every output tile gets ``halo`` pixels of context on each side, taken from the image extended
  by mirroring (numpy ``reflect`` mode, see :func:`reflect_indices`);
* tile origins are multiples of the model's ``align`` (2**depth for a U-Net), so every tile sees
  the pooling grid in the same phase as a whole-image pass;
* the model input is a size the model accepts (for valid-convolution models only some sizes
  are); surplus output beyond the tile is cropped, the tile is never shifted.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ModelGeometry",
    "Tile",
    "TileGrid",
    "WindowRead",
    "apply_window",
    "group_tiles",
    "mirror",
    "one_tile",
    "padded_whole",
    "plan_tiles",
    "reflect_indices",
    "window_read",
]


@dataclass(frozen=True)
class ModelGeometry:
    """What the tiler must know about a fully convolutional model, per spatial axis.

    Attributes
    ----------
    halo
        Context pixels needed on each side of an output pixel for it to be exact.
    align
        Tile origins must be multiples of this (the pooling period, 2**depth for a U-Net).
    shrink
        The model's output is smaller than its input by this many pixels on each side
        (0 for 'same'-padded models; equal to the halo for 'valid' U-Nets).
    size_min, size_step
        Valid model input sizes are ``size_min + k * size_step`` for k >= 0.
    """

    halo: tuple[int, ...]
    align: tuple[int, ...]
    shrink: tuple[int, ...]
    size_min: tuple[int, ...]
    size_step: tuple[int, ...]

    def __post_init__(self) -> None:
        n = len(self.halo)
        fields = (self.align, self.shrink, self.size_min, self.size_step)
        if n not in (2, 3) or any(len(f) != n for f in fields):
            raise ValueError(f"geometry needs 2 or 3 spatial axes of equal length, got {self}")
        for h, a, s, lo, st in zip(self.halo, *fields, strict=True):
            if not (a >= 1 and st >= 1 and 0 <= s <= h and lo - 2 * s >= 1):
                raise ValueError(f"inconsistent model geometry {self}")

    @property
    def ndim(self) -> int:
        return len(self.halo)

    def input_size(self, out: int, axis: int) -> int:
        """Smallest valid model input whose output covers ``out`` pixels plus the halo."""
        need = out + 2 * self.halo[axis]
        lo, step = self.size_min[axis], self.size_step[axis]
        return lo if need <= lo else lo + math.ceil((need - lo) / step) * step

    def output_size(self, size: int, axis: int) -> int:
        return size - 2 * self.shrink[axis]

    @classmethod
    def uniform(
        cls, ndim: int, *, halo: int, align: int, shrink: int, size_min: int, size_step: int
    ) -> ModelGeometry:
        """The same geometry on every spatial axis."""
        values = (halo, align, shrink, size_min, size_step)
        return cls(*((v,) * ndim for v in values))


@dataclass(frozen=True)
class Tile:
    """One output tile and the input window that produces it.

    ``start``/``stop`` bound the output region in the image (clipped to the image);
    ``window_start``/``window_stop`` bound the model input and may lie outside the image
    (mirrored there). ``crop`` is where the output region begins inside the model output.
    """

    index: tuple[int, ...]
    start: tuple[int, ...]
    stop: tuple[int, ...]
    window_start: tuple[int, ...]
    window_stop: tuple[int, ...]
    crop: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.start, self.stop, strict=True))

    @property
    def region(self) -> tuple[slice, ...]:
        """The output region as slices into the image."""
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop, strict=True))

    @property
    def crop_region(self) -> tuple[slice, ...]:
        """The output region as slices into the model output."""
        return tuple(slice(c, c + n) for c, n in zip(self.crop, self.shape, strict=True))


@dataclass(frozen=True)
class TileGrid:
    """The tiling of one image: regular tiles of ``tile`` pixels, all with the same window size."""

    image_shape: tuple[int, ...]
    tile: tuple[int, ...]
    chunk: tuple[int, ...]
    window: tuple[int, ...]
    geometry: ModelGeometry

    @property
    def grid_shape(self) -> tuple[int, ...]:
        return tuple(math.ceil(n / t) for n, t in zip(self.image_shape, self.tile, strict=True))

    def __len__(self) -> int:
        return math.prod(self.grid_shape)

    def tile_at(self, index: Sequence[int]) -> Tile:
        g = self.geometry
        start = tuple(i * t for i, t in zip(index, self.tile, strict=True))
        stop = tuple(
            min(s + t, n) for s, t, n in zip(start, self.tile, self.image_shape, strict=True)
        )
        w0 = tuple(s - h for s, h in zip(start, g.halo, strict=True))
        w1 = tuple(a + w for a, w in zip(w0, self.window, strict=True))
        crop = tuple(h - s for h, s in zip(g.halo, g.shrink, strict=True))
        return Tile(tuple(index), start, stop, w0, w1, crop)

    def tiles(self) -> Iterator[Tile]:
        """All tiles in raster order (last axis fastest)."""
        for index in np.ndindex(*self.grid_shape):
            yield self.tile_at(index)


def plan_tiles(
    image_shape: Sequence[int],
    *,
    geometry: ModelGeometry,
    tile: Sequence[int],
    chunk: Sequence[int],
) -> TileGrid:
    """Tile an image for a model.

    Parameters
    ----------
    image_shape
        Spatial shape of the image.
    geometry
        The model's geometry.
    tile
        Requested output tile size per axis; must be a multiple of both ``chunk`` and the model's
        ``align`` so that tasks own whole output chunks and every tile origin is aligned.
    chunk
        Output chunk size per axis.

    Along an axis shorter than the tile there is a single tile, shrunk to the image (rounded up
    to the alignment) so that small images do not pay for a full tile.
    """
    shape = tuple(int(n) for n in image_shape)
    tile = tuple(int(t) for t in tile)
    chunk = tuple(int(c) for c in chunk)
    if not (len(shape) == len(tile) == len(chunk) == geometry.ndim):
        raise ValueError(f"image {shape}, tile {tile}, chunk {chunk} and model disagree on ndim")
    if any(n < 1 for n in shape):
        raise ValueError(f"empty image shape {shape}")
    for t, c, a in zip(tile, chunk, geometry.align, strict=True):
        if t < 1 or c < 1 or t % c or t % a:
            raise ValueError(f"tile {t} must be a positive multiple of chunk {c} and alignment {a}")
    eff = tuple(
        min(t, math.ceil(n / a) * a) for t, n, a in zip(tile, shape, geometry.align, strict=True)
    )
    window = tuple(geometry.input_size(t, axis) for axis, t in enumerate(eff))
    return TileGrid(shape, eff, chunk, window, geometry)


def one_tile(
    image_shape: Sequence[int],
    *,
    geometry: ModelGeometry,
    tile: Sequence[int],
    chunk: Sequence[int],
    batch: int,
) -> tuple[int, ...] | None:
    """A tile covering the whole image, where its one window holds no more input pixels than a
    batch of ``batch`` windows of ``tile``; else None.

    A small image is then one forward pass, computing no halo between its tiles, within the
    memory a batch of default tiles takes. The tile is a multiple of ``chunk`` and of the
    model's alignment on every axis, as :func:`plan_tiles` requires.
    """
    side = tuple(
        math.ceil(n / (step := math.lcm(c, a))) * step
        for n, c, a in zip(image_shape, chunk, geometry.align, strict=True)
    )
    covered = plan_tiles(image_shape, geometry=geometry, tile=side, chunk=chunk).window
    usual = (geometry.input_size(t, axis) for axis, t in enumerate(tile))
    return side if math.prod(covered) <= batch * math.prod(usual) else None


def group_tiles(grid: TileGrid, *, per_group: int) -> list[list[Tile]]:
    """Split the tiles into consecutive raster-order groups of at most ``per_group`` tiles."""
    tiles = list(grid.tiles())
    return [tiles[i : i + per_group] for i in range(0, len(tiles), max(1, per_group))]


def mirror(index: np.ndarray, size: int) -> np.ndarray:
    """Indices reflected into ``[0, size)`` as numpy's ``reflect`` pads (edge not repeated),
    any number of times over. An axis of length 1 is constant."""
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    folded = np.mod(index, period)
    return np.where(folded < size, folded, period - folded)


def reflect_indices(start: int, stop: int, extent: int) -> np.ndarray:
    """Source indices of positions ``start..stop-1`` of an axis of length ``extent`` mirrored
    (:func:`mirror`), so windows larger than the image are defined too."""
    return mirror(np.arange(start, stop, dtype=np.int64), extent)


@dataclass(frozen=True)
class WindowRead:
    """How to read one window: a box inside the image, then per-axis index maps into it.

    ``take`` is ``None`` on axes where the window lies inside the image (a plain slice suffices).
    """

    source: tuple[slice, ...]
    take: tuple[np.ndarray | None, ...]


def window_read(start: Sequence[int], stop: Sequence[int], extent: Sequence[int]) -> WindowRead:
    """Plan the read of a (possibly out-of-image) window with mirrored borders."""
    source, take = [], []
    for a, b, n in zip(start, stop, extent, strict=True):
        if 0 <= a and b <= n:
            source.append(slice(a, b))
            take.append(None)
            continue
        idx = reflect_indices(a, b, n)
        lo, hi = int(idx.min()), int(idx.max()) + 1
        source.append(slice(lo, hi))
        take.append(idx - lo)
    return WindowRead(tuple(source), tuple(take))


def apply_window(box: np.ndarray, plan: WindowRead, *, first_spatial_axis: int = 0) -> np.ndarray:
    """Expand a box read at ``plan.source`` into the mirrored window."""
    out = box
    for k, idx in enumerate(plan.take):
        if idx is not None:
            out = np.take(out, idx, axis=first_spatial_axis + k)
    return out


def padded_whole(shape: Sequence[int], geometry: ModelGeometry) -> tuple[tuple[int, int], ...]:
    """Reflect-padding (before, after) that turns a whole image into one valid model input whose
    output, cropped at ``halo - shrink``, covers the image. Used for the whole-image reference."""
    pads = []
    for axis, n in enumerate(shape):
        size = geometry.input_size(n, axis)
        pads.append((geometry.halo[axis], size - n - geometry.halo[axis]))
    return tuple(pads)
