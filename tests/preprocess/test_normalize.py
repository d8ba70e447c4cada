"""Normalisation is decided once per image from a bounded sample."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from imagefiles import write_tiff
from profiles import examples

from pipeline.io.readers import open_image
from pipeline.preprocess import normalize
from pipeline.preprocess.normalize import Normalization, compute_normalization, percentiles_of


def test_percentiles_come_from_a_small_pyramid_level(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    image = rng.gamma(2.0, 50.0, (2, 256, 256)).astype(np.uint16)
    image[1] *= 3
    path = write_tiff(tmp_path / "p.ome.tif", image, axes="CYX", tile=(64, 64), pyramid_levels=2)
    monkeypatch.setattr(normalize, "SAMPLE_PIXELS", 64 * 64)
    norm = compute_normalization(open_image(path), mode="percentile", percentiles=(1, 99))
    assert "pyramid level 2" in norm.source
    small = image[:, ::4, ::4].reshape(2, -1).astype(np.float64)
    lo, hi = np.percentile(small, [1, 99], axis=1)
    np.testing.assert_allclose(norm.scale, 1 / (hi - lo))
    np.testing.assert_allclose(norm.offset, -lo / (hi - lo))
    out = norm.apply(image[:, :8, :8])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[1], image[1, :8, :8] * norm.scale[1] + norm.offset[1], rtol=1e-6)


def test_without_pyramid_windows_are_sampled(tmp_path, monkeypatch):
    image = np.tile(np.arange(600, dtype=np.uint16), (500, 1))
    path = write_tiff(tmp_path / "flat.tif", image, axes="YX", tile=(64, 64))
    monkeypatch.setattr(normalize, "SAMPLE_PIXELS", 1000)
    monkeypatch.setattr(normalize, "SAMPLE_WINDOW", 100)
    norm = compute_normalization(open_image(path), mode="percentile", percentiles=(0, 100))
    assert "sampled windows" in norm.source
    # windows spread over the whole width see (nearly) the full range 0..599
    lo, hi = -norm.offset[0] / norm.scale[0], -norm.offset[0] / norm.scale[0] + 1 / norm.scale[0]
    assert lo < 30 and hi > 570


def test_flat_channel_does_not_divide_by_zero(tmp_path):
    path = write_tiff(tmp_path / "c.tif", np.full((64, 64), 7, np.uint8), axes="YX", tile=None)
    norm = compute_normalization(open_image(path), mode="percentile")
    assert np.isfinite(norm.apply(np.full((1, 2, 2), 7, np.uint8))).all()


def test_none_and_fixed():
    x = np.array([[[1, 2]]], np.uint8)
    assert Normalization((1.0,), (0.0,), "none").apply(x).tolist() == [[[1.0, 2.0]]]
    fixed = Normalization((0.5,), (1.0,), "fixed").apply(x)
    assert fixed.tolist() == [[[1.5, 2.0]]]
    with pytest.raises(ValueError, match="normalize must be one of"):
        compute_normalization(None, mode="zscore")  # type: ignore[arg-type]


@settings(max_examples=examples(300), deadline=None)
@given(
    values=hnp.arrays(
        st.sampled_from(["uint8", "uint16", "uint32", "int16", "int32", "float32"]),
        st.tuples(st.integers(1, 3), st.integers(1, 300)),
        elements={"allow_nan": False, "allow_infinity": False},
    ),
    q=st.lists(st.floats(0, 100), min_size=1, max_size=3),
)
def test_percentiles_of_any_dtype_are_numpys_in_float64_bit_for_bit(values, q):
    """Unsigned integers skip the float64 copy (8- and 16-bit ones are counted, not
    partitioned); the result may not differ in any bit."""
    got = percentiles_of(values, tuple(q), axis=1)
    want = np.percentile(values.astype(np.float64), q, axis=1)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got.view(np.uint64), want.view(np.uint64))
    whole = percentiles_of(values, tuple(q))
    np.testing.assert_array_equal(whole, np.percentile(values.astype(np.float64), q))


def test_signed_and_float_values_are_interpolated_in_float64():
    """int16's b - a wraps for -30000 and 30000, float32 would round: both go through float64."""
    wide = np.array([-30000, 30000], np.int16)
    assert percentiles_of(wide, (50,))[0] == 0.0
    close = np.array([1.0, 1.0 + 2**-23], np.float32)
    assert percentiles_of(close, (30,))[0] == 1.0 + 0.3 * 2**-23


def test_percentiles_are_taken_over_finite_pixels_only():
    from pipeline.preprocess.normalize import finite_percentiles

    rng = np.random.default_rng(0)
    values = rng.random((3, 1000)).astype(np.float32)
    dirty = values.copy()
    dirty[0, :100] = np.nan
    dirty[1, 5] = np.inf
    dirty[1, 6] = -np.inf
    dirty[2, :] = np.nan
    got = finite_percentiles(dirty, (1.0, 99.8))
    assert np.array_equal(got[:, 0], np.percentile(values[0, 100:].astype(np.float64), (1, 99.8)))
    assert np.array_equal(
        got[:, 1], np.percentile(np.delete(values[1], [5, 6]).astype(np.float64), (1, 99.8))
    )
    assert got[:, 2].tolist() == [0.0, 1.0]  # nothing finite: any window is as good


@pytest.mark.parametrize("mode", ["none", "fixed", "percentile"])
def test_non_finite_pixels_become_zero_after_normalisation(mode):
    from pipeline.preprocess.normalize import Normalization

    x = np.array([[1.0, np.nan, np.inf, -np.inf, 2.0]], np.float32)
    norm = Normalization((0.5,), (0.25,), mode)
    out = norm.apply(x)
    finite = x[0, [0, 4]] if mode == "none" else x[0, [0, 4]] * 0.5 + 0.25
    assert out[0, [1, 2, 3]].tolist() == [0.0, 0.0, 0.0]
    assert np.array_equal(out[0, [0, 4]], finite)
