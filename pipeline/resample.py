"""One resampling rule for reading an image at another pixel size, window by window. Pure.

An output pixel ``j`` of an axis resampled by ``factor`` (output pixel size / input pixel size;
> 1 is coarser) is centred on input coordinate ``c = (j + 0.5) * factor - 0.5`` and is the
normalised sum of the input pixels ``k`` within the kernel's support around it, weighted by a
triangle (linear interpolation) stretched by ``max(1, factor)``: antialiased when reducing,
plain linear interpolation when enlarging. Input pixels outside the image are mirrored
(numpy's ``reflect``, as the model's windows are).

Everything about an output pixel — its taps, their order, their weights — depends only on
``j``, never on the window it is computed in, and taps are summed in one fixed order: any window
of the resampled image equals that window of the whole image resampled at once, bit for bit.
So a window of the resampled image is read from the input span :meth:`Resampling.source_span`
(the window plus the kernel's support) and tiles at the new pixel size stay exact. No I/O, no
torch: the rule serves any feature that resamples (``--mpp``, object sizes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.geometry import mirror

__all__ = ["Resampling", "nearest_source", "resample_axis"]


@dataclass(frozen=True)
class Resampling:
    """Resampling of one axis of ``in_size`` pixels by ``factor`` (output / input pixel size).

    Parameters
    ----------
    factor
        Output pixel size over input pixel size, > 0.
    in_size
        Input extent along the axis.
    """

    factor: float
    in_size: int

    def __post_init__(self) -> None:
        if not (self.factor > 0 and math.isfinite(self.factor)):
            raise ValueError(f"resampling factor must be positive, not {self.factor}")
        if self.in_size < 1:
            raise ValueError(f"input size must be >= 1, not {self.in_size}")

    @property
    def out_size(self) -> int:
        """Output extent: the input's length in output pixels, rounded, at least 1."""
        return max(1, round(self.in_size / self.factor))

    @property
    def support(self) -> float:
        """Half-width of the kernel in input pixels."""
        return max(1.0, self.factor)

    @property
    def n_taps(self) -> int:
        """Input pixels per output pixel (some with weight 0): the same for every pixel."""
        return math.floor(2 * self.support) + 1

    def taps(self, out_start: int, out_stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Input indices (mirrored into the image) and float32 weights, each ``(n, n_taps)``,
        of output pixels ``out_start:out_stop``; each row's weights sum to 1."""
        j = np.arange(out_start, out_stop, dtype=np.float64)[:, None]
        centre = (j + 0.5) * self.factor - 0.5
        first = np.floor(centre - self.support) + 1
        k = first + np.arange(self.n_taps, dtype=np.float64)[None, :]
        weights = np.maximum(0.0, 1.0 - np.abs(k - centre) / self.support)
        weights /= weights.sum(axis=1, keepdims=True)
        return mirror(k.astype(np.int64), self.in_size), weights.astype(np.float32)

    def source_span(self, out_start: int, out_stop: int) -> tuple[int, int]:
        """The input pixels ``[lo, hi)`` that output pixels ``out_start:out_stop`` read."""
        if out_stop <= out_start:
            return 0, 0
        index, _ = self.taps(out_start, out_stop)
        return int(index.min()), int(index.max()) + 1


def resample_axis(
    data: np.ndarray, axis: int, rule: Resampling, out_start: int, out_stop: int, *, offset: int
) -> np.ndarray:
    """Output pixels ``out_start:out_stop`` along ``axis`` of ``data``, which holds input
    pixels ``offset:offset + data.shape[axis]`` (at least :meth:`Resampling.source_span`).
    Returns float32; the taps are summed in their fixed order."""
    index, weights = rule.taps(out_start, out_stop)
    index = index - offset
    if index.size and (index.min() < 0 or index.max() >= data.shape[axis]):
        raise ValueError("data does not cover the taps of the requested output pixels")
    shape = list(data.shape)
    shape[axis] = out_stop - out_start
    along = [n if k == axis else 1 for k, n in enumerate(shape)]
    out = np.zeros(shape, np.float32)
    for t in range(index.shape[1]):
        tap = np.take(data, index[:, t], axis=axis).astype(np.float32, copy=False)
        tap *= weights[:, t].reshape(along)
        out += tap
    return out


def nearest_source(start: int, stop: int, factor: float, source_size: int) -> np.ndarray:
    """For pixels ``start:stop`` of a fine grid, the pixel of a grid ``factor`` times coarser
    (one of its pixels spans ``factor`` fine ones, edges aligned) whose area holds each one's
    centre, clipped to ``[0, source_size)``: nearest-neighbour resampling back from the grid
    :class:`Resampling` makes. Depends only on the pixel, never on the window asked for."""
    i = np.arange(start, stop, dtype=np.float64)
    j = np.floor((i + 0.5) / factor).astype(np.int64)
    return np.clip(j, 0, source_size - 1)
