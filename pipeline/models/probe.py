"""Geometry of a fully convolutional model known only as a function: probed with dummy inputs.

An external model (TorchScript, ONNX) says nothing about which input sizes it accepts, how much
smaller its output is, how far each output pixel sees, or at which period its pooling grid
repeats. Everything here finds that out by running the model on small dummy inputs (batch 1,
the model's input channels, float32):

* **Valid sizes.** Cubes of side 1, 2, 3, ... are run until, on every axis, three sizes in a
  row lose the same, smallest number of pixels (input minus output) at equal spacing. Sizes that
  lose more (a pooling floor dropped a pixel) or fail are not valid. This gives the smallest
  valid size, the period of valid sizes and the shrink per side (half the loss).
* **Alignment.** The period of valid sizes when it is above 1 (a U-Net that only accepts sizes
  its pooling divides); else the smallest shift of the input that shifts the output by the
  same amount (the pooling period of a model that pads internally).
* **Halo of a same-padded model.** Impulse responses with the model's own weights: a random
  plane of input (all pixels at one coordinate of one axis) is perturbed, and the output
  pixels that change at all mark how far the model sees, for every phase of the alignment
  period. Random inputs and perturbations of a whole plane keep ReLUs and max pooling from
  hiding the reach (a single pixel's gradient through max pooling would follow one path).

``Forward`` is any function from a (1, C, *spatial) float32 array to the (1, K, *out) output;
it raises (any exception) for sizes the model refuses.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import TilesegError
from pipeline.geometry import ModelGeometry

__all__ = [
    "MAX_PERIOD",
    "Forward",
    "SizeRule",
    "probe_alignment",
    "probe_geometry",
    "probe_halo",
    "probe_size_rule",
]

Forward = Callable[[np.ndarray], np.ndarray]

MAX_PERIOD = 64  # the largest pooling period looked for (a U-Net of depth 6)
MAX_SIDE = {2: 1024, 3: 128}  # largest cube side probed: ~1 M pixels per dummy input


@dataclass(frozen=True)
class SizeRule:
    """Valid input sizes ``size_min + k * size_step`` per axis, and the output's shrink."""

    size_min: tuple[int, ...]
    size_step: tuple[int, ...]
    shrink: tuple[int, ...]

    def valid_at_least(self, axis: int, n: int) -> int:
        """The smallest valid size of ``axis`` that is at least ``n``."""
        lo, step = self.size_min[axis], self.size_step[axis]
        return lo if n <= lo else lo + math.ceil((n - lo) / step) * step


def _run(forward: Forward, x: np.ndarray, ndim: int) -> np.ndarray | None:
    """The model's output for ``x``, or None when the model refuses this size."""
    try:
        y = np.asarray(forward(x))
    except Exception:  # a refused size surfaces as whatever the runtime raises
        return None
    if y.ndim != ndim + 2 or y.shape[0] != x.shape[0] or min(y.shape[2:], default=0) < 1:
        return None
    return y


def _settled(sizes: list[int], losses: list[int]) -> tuple[int, int, int] | None:
    """(size_min, step, loss) once the three last sizes of the smallest loss seen are equally
    spaced: a pooling floor only ever loses more, so the smallest loss is the valid one."""
    best = min(losses)
    valid = [s for s, loss in zip(sizes, losses, strict=True) if loss == best]
    if len(valid) < 3 or valid[-1] - valid[-2] != valid[-2] - valid[-3]:
        return None
    step = valid[-1] - valid[-2]
    if any((s - valid[0]) % step for s in valid):
        return None
    return valid[0], step, best


def _cube(forward: Forward, side: int, *, ndim: int, channels: int) -> np.ndarray | None:
    return _run(forward, np.zeros((1, channels) + (side,) * ndim, np.float32), ndim)


def _scan_start(forward: Forward, *, ndim: int, channels: int) -> int:
    """Where the size scan begins: the edge of the accepted sizes, found by doubling and
    bisection, which deep valid nets reach in a dozen probes instead of hundreds. Most models
    accept every size above their smallest (pooling floors odd sizes); where that is not so,
    the scan begins at a larger valid size, or at 1 when no power of two is accepted."""
    side = 8
    while side <= MAX_SIDE[ndim] and _cube(forward, side, ndim=ndim, channels=channels) is None:
        side *= 2
    if side > MAX_SIDE[ndim] or side == 8:
        return 1
    lo, hi = side // 2, side  # lo refused, hi accepted
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _cube(forward, mid, ndim=ndim, channels=channels) is None:
            lo = mid
        else:
            hi = mid
    return hi


def _next_side(side: int, accepted: list[int], losses: list[list[int]], rules: list) -> int:
    """The next cube side to try: once every unsettled axis has seen a whole period (two sizes
    of its smallest loss), only the size one period on can settle it."""
    ahead = []
    if not accepted:
        return side + 1
    for axis, rule in enumerate(rules):
        if rule is not None:
            continue
        best = min(losses[axis])
        valid = [s for s, loss in zip(accepted, losses[axis], strict=True) if loss == best]
        if len(valid) < 2 or best % 2:
            return side + 1
        ahead.append(2 * valid[-1] - valid[-2])
    return max(side + 1, min(ahead, default=side + 1))


def probe_size_rule(forward: Forward, *, ndim: int, channels: int, source: Any) -> SizeRule:
    """Find the valid input sizes and the shrink of ``forward`` with cube-shaped dummy inputs.

    Raises
    ------
    TilesegError
        When no size up to ``MAX_SIDE[ndim]`` is accepted or no period is found, naming the
        sizes tried.
    """
    accepted: list[int] = []
    losses: list[list[int]] = [[] for _ in range(ndim)]
    rules: list[tuple[int, int, int] | None] = [None] * ndim
    limit = MAX_SIDE[ndim]
    side = _scan_start(forward, ndim=ndim, channels=channels)
    while side <= limit:
        y = _cube(forward, side, ndim=ndim, channels=channels)
        if y is not None:
            accepted.append(side)
            for axis in range(ndim):
                losses[axis].append(side - y.shape[2 + axis])
                if rules[axis] is None and (side - y.shape[2 + axis]) % 2 == 0:
                    rules[axis] = _settled(accepted, losses[axis])
            if all(r is not None for r in rules) or side - accepted[0] > 3 * MAX_PERIOD:
                break
        side = _next_side(side, accepted, losses, rules)
    tried = f"cubes of side 1-{limit} px, {channels} channel(s), batch 1"
    if not accepted:
        raise TilesegError(source, f"the model accepted no input size ({tried})")
    if any(r is None for r in rules):
        raise TilesegError(
            source,
            f"no regular valid input sizes found: it accepted sides {accepted[0]}-"
            f"{accepted[-1]} but no three sizes in a row lost the same even number of pixels "
            f"({tried})",
        )
    size_min, step, loss = zip(*rules, strict=True)  # type: ignore[misc]
    return SizeRule(tuple(size_min), tuple(step), tuple(x // 2 for x in loss))


def _probe_shape(rule: SizeRule, axis: int, length: int) -> tuple[int, ...]:
    """A valid input shape: ``length`` (made valid) along ``axis``, the smallest valid size
    of at least 8 px on the others (their extent does not change the reach along ``axis``)."""
    return tuple(
        rule.valid_at_least(b, length if b == axis else 8) for b in range(len(rule.size_min))
    )


PROBE_INPUTS = 4  # random inputs at once: a path one input's ReLUs close, another's open


def _random_inputs(channels: int, shape: tuple[int, ...], *, seed: int) -> np.ndarray:
    """Random inputs of several offsets and scales (a batch of ``PROBE_INPUTS``)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, (PROBE_INPUTS, channels, *shape))
    offsets = np.array([0.0, 1.0, -1.0, 0.5])[:PROBE_INPUTS]
    scales = np.array([1.0, 0.5, 2.0, 4.0])[:PROBE_INPUTS]
    expand = (slice(None),) + (None,) * (1 + len(shape))
    return (x * scales[expand] + offsets[expand]).astype(np.float32)


def _batched(forward: Forward, x: np.ndarray) -> np.ndarray:
    """``forward`` of a batch, one input at a time where the model takes batch 1 only."""
    try:
        return np.asarray(forward(x))
    except Exception:  # a fixed batch size of 1 (some ONNX exports)
        return np.concatenate([np.asarray(forward(x[i : i + 1])) for i in range(len(x))])


def _changed_outputs(
    forward: Forward, x: np.ndarray, base: np.ndarray, *, axis: int, plane: int, seed: int
) -> np.ndarray:
    """Output coordinates along ``axis`` that change when the input plane at ``plane`` is
    perturbed (any bit, any channel, anywhere on the other axes)."""
    rng = np.random.default_rng(seed)
    xp = x.copy()
    index = [slice(None)] * x.ndim
    index[2 + axis] = plane
    xp[tuple(index)] += rng.normal(0.0, 4.0, xp[tuple(index)].shape).astype(np.float32)
    y = _batched(forward, xp)
    other = tuple(d for d in range(y.ndim) if d != 2 + axis)
    return np.flatnonzero(np.any(y != base, axis=other))


def _reach(
    forward: Forward, rule: SizeRule, *, axis: int, channels: int, planes: int, source: Any
) -> list[tuple[int, np.ndarray]]:
    """(perturbed plane, changed output pixels in input coordinates) for ``planes`` planes
    in the middle of an input grown until no response touches the output's border."""
    ndim, shrink = len(rule.size_min), rule.shrink[axis]
    length = 8 * planes + 2 * shrink + 64
    while True:
        shape = _probe_shape(rule, axis, length)
        if shape[axis] > 4 * MAX_SIDE[ndim]:
            raise TilesegError(
                source,
                f"the model's receptive field reaches beyond {shape[axis]} px on axis {axis}: "
                "pass --halo",
            )
        x = _random_inputs(channels, shape, seed=axis)
        base = _batched(forward, x)
        n_out, mid = base.shape[2 + axis], shape[axis] // 2
        found = []
        for j in range(planes):
            q = _changed_outputs(forward, x, base, axis=axis, plane=mid + j, seed=j)
            found.append((mid + j, q + shrink))
            if q.size and (q[0] == 0 or q[-1] == n_out - 1):
                break
        else:
            if not any(q.size for _, q in found):
                raise TilesegError(
                    source,
                    "no output pixel responds to its input (constant or dead model): cannot "
                    "measure the receptive field, pass --halo",
                )
            return found
        length = 2 * shape[axis]


def probe_halo(
    forward: Forward, rule: SizeRule, *, align: tuple[int, ...], channels: int, source: Any
) -> tuple[int, ...]:
    """The context each aligned tile needs per side, rounded up to the alignment.

    A tile starts at phase 0 of the alignment period and spans whole periods, so an output
    pixel of phase p lies p pixels inside the tile's start and (period - 1 - p) inside its end:
    what it sees beyond those is the halo it needs."""
    halo = []
    for axis, period in enumerate(align):
        need = 0
        for plane, outputs in _reach(
            forward, rule, axis=axis, channels=channels, planes=period, source=source
        ):
            for u in outputs.tolist():
                phase = u % period
                need = max(need, (u - plane) - phase, (plane - u) - (period - 1 - phase))
        halo.append(max(rule.shrink[axis], math.ceil(need / period) * period))
    return tuple(halo)


def probe_alignment(forward: Forward, rule: SizeRule, *, channels: int, source: Any) -> tuple:
    """The pooling period per axis: the step of valid sizes, or where every size is valid the
    smallest shift of the input (up to ``MAX_PERIOD``) that shifts the output alike."""
    align = []
    for axis, step in enumerate(rule.size_step):
        if step > 1:
            align.append(step)
            continue
        responses = _reach(forward, rule, axis=axis, channels=channels, planes=1, source=source)
        reach = max(abs(int(u) - plane) for plane, q in responses for u in q)
        period = _shift_period(
            forward, rule, axis=axis, channels=channels, margin=reach, source=source
        )
        align.append(period)
    return tuple(align)


def _shift_period(
    forward: Forward, rule: SizeRule, *, axis: int, channels: int, margin: int, source: Any
) -> int:
    margin += MAX_PERIOD  # a pixel's reach varies with its phase by less than a period
    shape = _probe_shape(rule, axis, 2 * margin + 2 * MAX_PERIOD + 2 * rule.shrink[axis])
    n = shape[axis]
    big = list(shape)
    big[axis] = n + MAX_PERIOD
    x = np.random.default_rng(7).normal(0.0, 1.0, (1, channels, *big)).astype(np.float32)
    y0 = np.asarray(forward(np.take(x, range(n), axis=2 + axis)))
    n_out = y0.shape[2 + axis]
    keep = range(margin, n_out - margin - MAX_PERIOD)
    scale = float(np.abs(y0).max()) or 1.0
    for t in range(1, MAX_PERIOD + 1):
        yt = np.asarray(forward(np.take(x, range(t, t + n), axis=2 + axis)))
        a = np.take(yt, keep, axis=2 + axis)
        b = np.take(y0, [k + t for k in keep], axis=2 + axis)
        if np.abs(a - b).max() <= 1e-5 * scale:
            return t
    raise TilesegError(
        source, f"no pooling period up to {MAX_PERIOD} found on axis {axis}: pass --align"
    )


def probe_geometry(
    forward: Forward,
    *,
    ndim: int,
    channels: int,
    source: Any,
    halo: int | None = None,
    align: int | None = None,
    force_halo: bool = False,
    reach_forward: Forward | None = None,
) -> tuple[ModelGeometry, dict[str, Any]]:
    """The tiler's geometry of ``forward`` and how each part was found (for the record).

    ``halo`` and ``align`` override what is probed; a halo smaller than the measured one is
    refused (tiles would not equal a whole-image pass) unless ``force_halo``.
    ``reach_forward``: the same network with every path open (see
    :func:`pipeline.models.files.open_paths`), whose receptive field is measured too, so that
    ReLUs the model's own weights close for the probe's inputs cannot hide part of it.
    """
    started = time.perf_counter()
    rule = probe_size_rule(forward, ndim=ndim, channels=channels, source=source)
    how: dict[str, Any] = {"sizes_from": "probe"}
    if align is not None:
        aligns, how["align_from"] = (int(align),) * ndim, "given"
    else:
        aligns = probe_alignment(forward, rule, channels=channels, source=source)
        how["align_from"] = "probe"
    rule = _whole_periods(rule, aligns)
    halos, how["halo_from"] = _halo(
        forward, rule, aligns, channels, source, halo, force_halo, reach_forward
    )
    how.update(
        halo=list(halos), align=list(aligns), shrink=list(rule.shrink),
        size_min=list(rule.size_min), size_step=list(rule.size_step),
    )  # fmt: skip
    how["probe_seconds"] = round(time.perf_counter() - started, 3)
    geometry = ModelGeometry(halos, aligns, rule.shrink, rule.size_min, rule.size_step)
    return geometry, how


def _whole_periods(rule: SizeRule, align: tuple[int, ...]) -> SizeRule:
    """A model that accepts every size but pools (it pads internally) gets inputs of whole
    periods only: then it never pads, in tiles or in a whole-image pass, and the two see the
    same (mirrored) context at the image's far end."""
    size_min, step = list(rule.size_min), list(rule.size_step)
    for axis, a in enumerate(align):
        if step[axis] == 1 and a > 1:
            size_min[axis], step[axis] = math.ceil(size_min[axis] / a) * a, a
    return SizeRule(tuple(size_min), tuple(step), rule.shrink)


def _halo(
    forward: Forward,
    rule: SizeRule,
    align: tuple[int, ...],
    channels: int,
    source: Any,
    halo: int | None,
    force: bool,
    reach_forward: Forward | None = None,
) -> tuple[tuple[int, ...], str]:
    if halo is not None and force:
        if halo < max(rule.shrink):
            raise TilesegError("--halo", f"halo {halo} is smaller than the model's shrink")
        return (int(halo),) * len(align), "given (forced)"
    if min(rule.shrink) > 0:
        # Valid convolutions: each output pixel sees exactly the input its window loses.
        measured, found = rule.shrink, "shrink"
    else:
        measured = probe_halo(forward, rule, align=align, channels=channels, source=source)
        found = "receptive field"
        if reach_forward is not None:
            opened = probe_halo(reach_forward, rule, align=align, channels=channels, source=source)
            measured = tuple(max(a, b) for a, b in zip(measured, opened, strict=True))
    if halo is None:
        return measured, found
    if any(halo < m for m in measured):
        raise TilesegError(
            "--halo",
            f"halo {halo} is smaller than the model's measured receptive field "
            f"{max(measured)} ({found}): tiles would not equal a whole-image pass "
            "(--force-halo to use it anyway)",
        )
    return (int(halo),) * len(align), "given"
