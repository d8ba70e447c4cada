"""Segmenting at a pixel size (``--mpp``): one resampling rule, exact window by window."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from exactness import check, make_model, reference, run
from hypothesis import given, settings
from hypothesis import strategies as st
from imagefiles import write_tiff

from pipeline.cli.main import main
from pipeline.geometry import mirror
from pipeline.io.readers import open_image
from pipeline.io.resolution import at_pixel_size, pick_level
from pipeline.models import UNetConfig
from pipeline.output.ngff import LABELS_PATH, read_record
from pipeline.resample import Resampling, nearest_source, resample_axis

factors = st.sampled_from([0.5, 0.75, 1.0, 1.3, 2.0, 2.5, 4.0]) | st.floats(0.3, 6.0)


def resample_whole(image: np.ndarray, factors: tuple[float, ...]) -> np.ndarray:
    """A (C, y, x) array resampled at once: the whole-image side of every comparison."""
    out = image
    for axis, f in enumerate(factors):
        rule = Resampling(f, image.shape[axis + 1])
        out = resample_axis(out, axis + 1, rule, 0, rule.out_size, offset=0)
    return out


@settings(max_examples=60, deadline=None)
@given(factor=factors, size=st.integers(1, 60), data=st.data())
def test_a_window_equals_that_window_of_the_whole(factor, size, data):
    rule = Resampling(factor, size)
    values = data.draw(st.lists(st.floats(-1e3, 1e3, width=32), min_size=size, max_size=size))
    x = np.asarray(values, np.float32)[None]
    whole = resample_axis(x, 1, rule, 0, rule.out_size, offset=0)
    start = data.draw(st.integers(0, rule.out_size - 1))
    stop = data.draw(st.integers(start + 1, rule.out_size))
    lo, hi = rule.source_span(start, stop)
    part = resample_axis(x[:, lo:hi], 1, rule, start, stop, offset=lo)
    np.testing.assert_array_equal(part, whole[:, start:stop])


@settings(max_examples=40, deadline=None)
@given(factor=factors, size=st.integers(1, 40))
def test_weights_are_a_partition_of_unity_and_factor_one_is_identity(factor, size):
    rule = Resampling(factor, size)
    index, weights = rule.taps(0, rule.out_size)
    assert index.min() >= 0 and index.max() < size
    np.testing.assert_allclose(weights.sum(axis=1), 1, rtol=1e-6)
    x = np.arange(size, dtype=np.float32)[None] * 3 + 7
    constant = resample_axis(np.full((1, size), 5, np.float32), 1, rule, 0, rule.out_size, offset=0)
    np.testing.assert_allclose(constant, 5, rtol=1e-6)
    same = Resampling(1.0, size)
    np.testing.assert_array_equal(resample_axis(x, 1, same, 0, size, offset=0), x)


def test_reducing_is_antialiased():
    """A pattern finer than the output pixels averages out instead of aliasing."""
    stripes = np.tile(np.array([0, 100], np.float32), 64)[None]
    rule = Resampling(4.0, stripes.shape[1])
    out = resample_axis(stripes, 1, rule, 0, rule.out_size, offset=0)
    interior = out[0, 1:-1]
    np.testing.assert_allclose(interior, 50, atol=1e-3)


def test_mirror_reflects_like_numpy():
    for size in (1, 2, 5):
        padded = np.pad(np.arange(size), 3 * size, mode="reflect" if size > 1 else "edge")
        np.testing.assert_array_equal(mirror(np.arange(-3 * size, 4 * size), size), padded)


def test_the_nearest_finer_level_is_read():
    sizes = [0.25, 0.5, 1.0, 2.0]
    assert [pick_level(sizes, t) for t in (0.1, 0.25, 0.4, 0.5, 0.9, 1.0, 3.0)] == [
        0, 0, 0, 1, 1, 2, 3,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    rng = np.random.default_rng(26)
    image = (rng.random((210, 170)) * 4000).astype(np.uint16)
    path = write_tiff(tmp_path_factory.mktemp("mpp") / "s.ome.tif", image, axes="YX", tile=(32, 32),
                      compression="zlib", pixel_size=(0.5, 0.5), pyramid_levels=2)  # fmt: skip
    return path, image


@settings(max_examples=15, deadline=None)
@given(mpp=st.sampled_from([0.35, 0.7, 1.25, 2.6]), data=st.data())
def test_a_resampled_image_reads_any_window_as_the_whole(slide, mpp, data):
    path, _ = slide
    resampled, record = at_pixel_size(open_image(path), mpp)
    stored = open_image(path, level=record["level"])
    whole = resample_whole(stored.read((slice(None), slice(None))), tuple(record["factor"]))
    whole = np.clip(np.rint(whole), 0, 65535).astype(np.uint16)
    h, w = resampled.spatial_shape
    assert whole.shape[1:] == (h, w) and resampled.pixel_size == (mpp, mpp)
    y0, x0 = data.draw(st.integers(0, h - 1)), data.draw(st.integers(0, w - 1))
    y1, x1 = data.draw(st.integers(y0 + 1, h)), data.draw(st.integers(x0 + 1, w))
    np.testing.assert_array_equal(
        resampled.read((slice(y0, y1), slice(x0, x1))), whole[:, y0:y1, x0:x1]
    )


@pytest.mark.parametrize(
    ("mpp", "level", "tile", "threads"), [(0.8, 0, 32, False), (1.6, 1, 64, True)]
)
def test_tiles_at_mpp_equal_one_whole_image_pass(tmp_path, slide, mpp, level, tile, threads):
    """Also with a batch's windows read by parallel threads, as on a GPU."""
    path, _ = slide
    model = make_model(tmp_path, UNetConfig(depth=2, width=4, padding="valid", classes=2))
    out = tmp_path / "out.zarr"
    probabilities, labels = run(
        path, out, model=model, tile=tile, chunk=32, mpp=mpp, parallel_io=threads
    )
    record = read_record(out)
    assert record["resample"]["level"] == level and record["resample"]["mpp"] == mpp
    stored = open_image(path, level=level)
    whole = resample_whole(stored.read((slice(None), slice(None))), record["resample"]["factor"])
    whole = np.clip(np.rint(whole), 0, 65535).astype(np.uint16)
    check(probabilities, labels, reference(model, whole))
    # Labels at the model's pixel size, and the NGFF scale says so.
    root = zarr.open_group(out, mode="r")
    assert root[f"{LABELS_PATH}/0"].shape == whole.shape[1:]
    label_attrs = root[LABELS_PATH].attrs.asdict()
    scale = label_attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]
    assert scale["scale"][-2:] == [mpp, mpp]


def test_mpp_without_a_pixel_size_is_one_line(tmp_path, capsys):
    path = write_tiff(tmp_path / "plain.tif", np.zeros((64, 64), np.uint8), axes="YX", ome=False)
    assert main(["segment", str(path), str(tmp_path / "o.zarr"), "--mpp", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tileseg: error: ") and "does not say its pixel size" in err[-1]


@settings(max_examples=40, deadline=None)
@given(factor=factors, size=st.integers(1, 300), data=st.data())
def test_nearest_source_is_per_pixel_and_tiles_the_fine_grid(factor, size, data):
    """Labels brought back to the input's grid: each input pixel takes the model-grid pixel
    whose area holds its centre, whichever window it is computed in."""
    coarse = Resampling(factor, size).out_size
    whole = nearest_source(0, size, factor, coarse)
    start = data.draw(st.integers(0, size - 1))
    stop = data.draw(st.integers(start + 1, size))
    np.testing.assert_array_equal(nearest_source(start, stop, factor, coarse), whole[start:stop])
    assert whole.min() >= 0 and whole.max() < coarse and (np.diff(whole) >= 0).all()
    if factor == 2.0:  # whole pixels: each coarse pixel spans two fine ones
        np.testing.assert_array_equal(whole, np.minimum(np.arange(size) // 2, coarse - 1))
