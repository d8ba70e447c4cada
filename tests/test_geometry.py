"""Tile geometry: coverage, alignment, valid windows, mirrored reads, cropping."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from profiles import examples

from pipeline.geometry import (
    ModelGeometry,
    apply_window,
    group_tiles,
    one_tile,
    padded_whole,
    plan_tiles,
    reflect_indices,
    window_read,
)


@st.composite
def geometries(draw, ndim=None):
    ndim = ndim or draw(st.sampled_from([2, 3]))
    align = draw(st.sampled_from([1, 2, 4, 8, 16]))
    shrink = draw(st.integers(0, 12))
    halo = shrink + draw(st.integers(0, 12))
    size_min = 2 * shrink + draw(st.integers(1, 40))
    step = draw(st.sampled_from([1, align]))
    return ModelGeometry.uniform(
        ndim, halo=halo, align=align, shrink=shrink, size_min=size_min, size_step=step
    )


@st.composite
def cases(draw):
    g = draw(geometries())
    chunk = draw(st.integers(1, 6)) * g.align[0]
    tile = chunk * draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 3 * tile + 5)) for _ in range(g.ndim))
    if g.ndim == 3:
        shape = (draw(st.integers(1, 9)), *shape[1:])
    return g, shape, tile, chunk


@settings(max_examples=examples(150), deadline=None)
@given(cases())
def test_tiles_cover_image_exactly_once(case):
    g, shape, tile, chunk = case
    grid = plan_tiles(shape, geometry=g, tile=(tile,) * g.ndim, chunk=(chunk,) * g.ndim)
    count = np.zeros(shape, np.int32)
    for t in grid.tiles():
        count[t.region] += 1
    assert (count == 1).all()
    assert len(grid) == len(list(grid.tiles()))


@settings(max_examples=examples(150), deadline=None)
@given(cases(), st.integers(1, 8))
def test_one_tile_covers_the_image_within_a_batch_of_windows(case, batch):
    """The whole image as one tile, where its window holds no more pixels than ``batch``
    windows of the tile asked for; otherwise None."""
    g, shape, tile, chunk = case
    tiles, chunks = (tile,) * g.ndim, (chunk,) * g.ndim
    found = one_tile(shape, geometry=g, tile=tiles, chunk=chunks, batch=batch)
    usual = np.prod([g.input_size(tile, axis) for axis in range(g.ndim)])
    covering = [-(-n // np.lcm(chunk, a)) * np.lcm(chunk, a) for n, a in zip(shape, g.align)]
    whole = plan_tiles(shape, geometry=g, tile=covering, chunk=chunks)
    if found is None:
        assert np.prod(whole.window) > batch * usual
        return
    grid = plan_tiles(shape, geometry=g, tile=found, chunk=chunks)  # a valid tile, no error
    assert len(grid) == 1 and np.prod(grid.window) <= batch * usual


@settings(max_examples=examples(150), deadline=None)
@given(cases())
def test_tiles_are_aligned_and_chunk_owned(case):
    g, shape, tile, chunk = case
    grid = plan_tiles(shape, geometry=g, tile=(tile,) * g.ndim, chunk=(chunk,) * g.ndim)
    for t in grid.tiles():
        for axis, (a, b, n) in enumerate(zip(t.start, t.stop, shape, strict=True)):
            assert a % g.align[axis] == 0
            assert a % chunk == 0  # a task owns whole chunks...
            assert b == n or b % chunk == 0  # ...up to the image edge


@settings(max_examples=examples(150), deadline=None)
@given(cases())
def test_windows_are_valid_model_inputs_with_full_halo(case):
    g, shape, tile, chunk = case
    grid = plan_tiles(shape, geometry=g, tile=(tile,) * g.ndim, chunk=(chunk,) * g.ndim)
    for t in grid.tiles():
        for axis in range(g.ndim):
            size = t.window_stop[axis] - t.window_start[axis]
            assert size == grid.window[axis]
            assert size >= g.size_min[axis] and (size - g.size_min[axis]) % g.size_step[axis] == 0
            # at least a full halo of context on both sides of every output pixel
            assert t.start[axis] - t.window_start[axis] >= g.halo[axis]
            assert t.window_stop[axis] - t.stop[axis] >= g.halo[axis]
            # the crop lies inside the model output
            assert t.crop[axis] + t.shape[axis] <= g.output_size(size, axis)


@settings(max_examples=examples(100), deadline=None)
@given(cases(), st.integers(0, 2**31 - 1))
def test_mirrored_window_through_shrinking_identity_model_returns_tile(case, seed):
    """Read each window (mirrored borders), apply a 'model' that crops ``shrink`` per side,
    crop the tile: the image comes back exactly."""
    g, shape, tile, chunk = case
    image = np.random.default_rng(seed).integers(0, 1000, shape)
    grid = plan_tiles(shape, geometry=g, tile=(tile,) * g.ndim, chunk=(chunk,) * g.ndim)
    out = np.full(shape, -1)
    for t in grid.tiles():
        plan = window_read(t.window_start, t.window_stop, shape)
        window = apply_window(image[plan.source], plan)
        model_out = window[tuple(slice(s, n - s) for s, n in zip(g.shrink, window.shape))]
        out[t.region] = model_out[t.crop_region]
    np.testing.assert_array_equal(out, image)


@settings(max_examples=examples(100), deadline=None)
@given(cases(), st.integers(0, 2**31 - 1))
def test_window_equals_numpy_reflect_padding(case, seed):
    g, shape, tile, chunk = case
    image = np.random.default_rng(seed).integers(0, 1000, shape)
    grid = plan_tiles(shape, geometry=g, tile=(tile,) * g.ndim, chunk=(chunk,) * g.ndim)
    for t in grid.tiles():
        plan = window_read(t.window_start, t.window_stop, shape)
        window = apply_window(image[plan.source], plan)
        pads = [
            (max(0, -a), max(0, b - n)) for a, b, n in zip(t.window_start, t.window_stop, shape)
        ]
        padded = np.pad(image, pads, mode="reflect")
        expected = padded[
            tuple(
                slice(a + lo, b + lo) for a, b, (lo, _) in zip(t.window_start, t.window_stop, pads)
            )
        ]
        np.testing.assert_array_equal(window, expected)


def test_padded_whole_gives_a_valid_input_covering_the_image():
    g = ModelGeometry.uniform(2, halo=92, align=16, shrink=92, size_min=188, size_step=16)
    (lo, hi), _ = padded_whole((100, 100), g)
    assert lo == 92 and 100 + lo + hi == g.input_size(100, 0)


@pytest.mark.parametrize("n", [1, 2, 3, 7])
@pytest.mark.parametrize("pad", [0, 1, 5, 20])
def test_reflect_indices_match_numpy_reflect(n, pad):
    a = np.arange(n) * 10
    np.testing.assert_array_equal(
        a[reflect_indices(-pad, n + pad + 2, n)], np.pad(a, (pad, pad + 2), mode="reflect")
    )


def test_inside_window_is_a_plain_slice():
    plan = window_read((2, 3), (5, 9), (10, 10))
    assert plan.take == (None, None)
    assert plan.source == (slice(2, 5), slice(3, 9))


def test_small_image_gets_one_shrunk_tile():
    g = ModelGeometry.uniform(2, halo=5, align=4, shrink=5, size_min=20, size_step=4)
    grid = plan_tiles((7, 30), geometry=g, tile=(64, 64), chunk=(32, 32))
    assert grid.grid_shape == (1, 1)
    assert grid.tile == (8, 32)
    assert grid.window == (20, 44)


def test_input_size_rounds_up_to_valid():
    g = ModelGeometry.uniform(2, halo=92, align=16, shrink=92, size_min=188, size_step=16)
    assert g.input_size(388, 0) == 572  # the U-Net paper's tile
    assert g.input_size(389, 0) == 588
    assert g.input_size(1, 0) == 188


@pytest.mark.parametrize(
    ("tile", "chunk"), [((48, 48), (32, 32)), ((30, 32), (10, 16)), ((0, 16), (16, 16))]
)
def test_bad_tiles_are_refused(tile, chunk):
    g = ModelGeometry.uniform(2, halo=4, align=16, shrink=0, size_min=16, size_step=16)
    with pytest.raises(ValueError, match="multiple"):
        plan_tiles((100, 100), geometry=g, tile=tile, chunk=chunk)


def test_inconsistent_geometry_is_refused():
    with pytest.raises(ValueError):
        ModelGeometry.uniform(2, halo=2, align=1, shrink=3, size_min=10, size_step=1)


def test_group_tiles_keeps_raster_order():
    g = ModelGeometry.uniform(2, halo=0, align=1, shrink=0, size_min=1, size_step=1)
    grid = plan_tiles((10, 10), geometry=g, tile=(4, 4), chunk=(2, 2))
    groups = group_tiles(grid, per_group=4)
    assert [len(x) for x in groups] == [4, 4, 1]
    assert [t.index for grp in groups for t in grp] == [t.index for t in grid.tiles()]
