"""Every level of every image of an output is valid NGFF 0.4 and lies where its pixels came from:
the root image has as many levels as its labels, and each level's coordinate transformations map
its pixel centres onto the level-0 pixels it was made of."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import zarr
from hypothesis import given
from hypothesis import strategies as st
from imagefiles import write_tiff
from modelfiles import threshold_model
from ome_zarr_models.v04 import Image, ImageLabel

import pipeline.engine.driver
from pipeline.config import SegmentOptions
from pipeline.engine.driver import segment_image
from pipeline.output.label_classes import class_names
from pipeline.output.ngff import LABELS_PATH, OutputLayout, Overview, overview_factor, read_layout

PIXEL = (0.5, 0.25)  # anisotropic: an axis swapped anywhere shows


@given(
    shape=st.lists(st.integers(1, 3000), min_size=2, max_size=3),
    chunk=st.integers(1, 600),
    max_pixels=st.integers(1, 1 << 14),
)
def test_the_overview_has_as_many_levels_as_the_labels_each_on_level_0_pixels(
    shape, chunk, max_pixels
):
    factor = overview_factor(shape, max_pixels=max_pixels)
    layout = OutputLayout(
        tuple(shape), (chunk,) * len(shape), 2, "|u1", overview=Overview(1, "|u1", factor)
    )
    levels, overview = layout.levels, layout.overview_levels
    assert len(overview) == len(levels)  # NGFF: an image-label's datasets match the image's
    for k, shape_k in enumerate(overview):
        scale = layout.overview_scale(k)
        assert scale == [s * factor for s in layout.scale(k)]
        # The last pixel of each axis is a level-0 pixel inside the image.
        for axis, n in enumerate(shape_k[1:]):
            last = (n - 1) * scale[axis]  # in level-0 pixels (pixel size 1)
            assert last == int(last) and last < shape[axis]
            assert n * scale[axis] >= shape[axis]  # and the level covers the whole image


@given(level=st.integers(0, 8), pixel=st.floats(0.1, 4.0))
def test_a_mean_level_is_centred_on_the_pixels_it_averages(level, pixel):
    layout = OutputLayout((100, 100), (16, 16), 2, "|u1", "<f4", pixel_size=(pixel, pixel))
    shift = layout.mean_translation(level)
    scale = layout.scale(level)
    for i in (0, 1, 7):
        averaged = np.arange(i * 2**level, (i + 1) * 2**level) * pixel
        assert i * scale[-1] + shift[-1] == pytest.approx(averaged.mean())


@pytest.fixture
def slide(tmp_path, monkeypatch):
    """A 200 x 150 slide of noise with an 8x overview (max 900 px): 5 label levels at chunk 16,
    labels that differ from pixel to pixel (any misplaced level shows)."""
    monkeypatch.setattr(
        pipeline.engine.driver, "overview_factor", partial(overview_factor, max_pixels=900)
    )
    image = np.random.default_rng(0).integers(0, 255, (200, 150), dtype=np.uint8)
    path = write_tiff(tmp_path / "a.tif", image, axes="YX", tile=(32, 32), pixel_size=PIXEL)
    return path, image, threshold_model(tmp_path / "m.safetensors", level=0.5)


def _spatial(dataset: dict, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    scale, shift = np.ones(ndim), np.zeros(ndim)
    for t in dataset["coordinateTransformations"]:
        if t["type"] == "scale":
            scale = np.asarray(t["scale"][-ndim:], float)
        else:
            shift = np.asarray(t["translation"][-ndim:], float)
    return scale, shift


def _levels(group: zarr.Group, ndim: int = 2):
    """(array, level-0 pixel index of each pixel centre per axis) of every level of an image."""
    for dataset in group.attrs["multiscales"][0]["datasets"]:
        array = group[dataset["path"]]
        scale, shift = _spatial(dataset, ndim)
        centres = [
            (np.arange(n) * s + t) / p
            for n, s, t, p in zip(array.shape[-ndim:], scale, shift, PIXEL)
        ]
        yield np.asarray(array[...]), centres


def _whole(centres: list[np.ndarray]) -> tuple[np.ndarray, ...]:
    for c in centres:
        np.testing.assert_allclose(c, np.round(c), atol=1e-9)  # on a level-0 pixel
    return np.ix_(*(np.round(c).astype(int) for c in centres))


def test_default_output_levels_are_valid_and_aligned(tmp_path, slide):
    path, image, model = slide
    out = tmp_path / "out.zarr"
    segment_image(path, out, SegmentOptions(model=model, tile=32, chunk=16, instances="connected"))
    root = zarr.open_group(out, mode="r")
    Image.from_zarr(root)
    for name in ("segmentation", "instances"):
        ImageLabel.from_zarr(root[f"labels/{name}"])
        assert len(root[f"labels/{name}"].attrs["multiscales"][0]["datasets"]) == 5
    assert len(root.attrs["multiscales"][0]["datasets"]) == 5  # as many as its labels
    labels0 = np.asarray(root[LABELS_PATH]["0"][...])
    for data, centres in _levels(root):  # every 8 * 2**k-th pixel of the input
        np.testing.assert_array_equal(data[0], image[_whole(centres)])
    for name in ("segmentation", "instances"):
        own0 = np.asarray(root[f"labels/{name}"]["0"][...])
        for data, centres in _levels(root[f"labels/{name}"]):
            np.testing.assert_array_equal(data, own0[_whole(centres)])
    assert 0.2 < labels0.mean() < 0.8
    image_label = root[LABELS_PATH].attrs["image-label"]
    assert [p["class"] for p in image_label["properties"]] == ["background", "foreground"]
    assert [c["label-value"] for c in image_label["colors"]] == [0, 1]
    assert "colors" not in root["labels/instances"].attrs["image-label"]  # left to the viewer


def test_probability_levels_are_valid_and_centred_on_their_means(tmp_path, slide):
    path, _, model = slide
    out = tmp_path / "out.zarr"
    options = SegmentOptions(
        model=model, tile=32, chunk=16, save_probabilities=True, probability_dtype="float32"
    )
    segment_image(path, out, options)
    root = zarr.open_group(out, mode="r")
    Image.from_zarr(root)
    ImageLabel.from_zarr(root[LABELS_PATH])
    datasets = root.attrs["multiscales"][0]["datasets"]
    assert len(datasets) == len(root[LABELS_PATH].attrs["multiscales"][0]["datasets"]) == 5
    p0 = np.asarray(root["0"][...], np.float64)
    for k, (data, centres) in enumerate(_levels(root)):
        side = 2**k
        # Interior pixels (no edge padding): the mean of the side x side level-0 pixels
        # centred where the transformations put the pixel.
        inner = [np.flatnonzero(c + (side - 1) / 2 < n) for c, n in zip(centres, p0.shape[1:])]
        for i in inner[0][:: max(1, len(inner[0]) // 5)]:
            for j in inner[1][:: max(1, len(inner[1]) // 5)]:
                starts = [c - (side - 1) / 2 for c in (centres[0][i], centres[1][j])]
                assert starts == [round(v) for v in starts]  # the first averaged pixel
                y0, x0 = (round(v) for v in starts)
                expected = p0[:, y0 : y0 + side, x0 : x0 + side].mean(axis=(1, 2))
                np.testing.assert_allclose(data[:, i, j], expected, atol=1e-5)
    labels0 = np.asarray(root[LABELS_PATH]["0"][...])
    for data, centres in _levels(root[LABELS_PATH]):
        np.testing.assert_array_equal(data, labels0[_whole(centres)])
    channels = root.attrs["omero"]["channels"]
    assert [c["label"] for c in channels] == list(class_names(2))
    assert read_layout(out).class_names == ("background", "foreground")


def test_class_names_default_and_declared():
    assert class_names(1) == class_names(2) == ("background", "foreground")
    assert class_names(4) == ("background", "class 1", "class 2", "class 3")
    assert class_names(3, ["bg", "tumour", "stroma"]) == ("bg", "tumour", "stroma")
    assert class_names(3, ["only two", "names"]) == ("background", "class 1", "class 2")


@pytest.mark.parametrize("dtype", ["|u1", "<u2", "<f4", "<f2", "|b1", "<i4"])
def test_an_output_array_is_made_as_the_files_zarr_makes_for_it(tmp_path, dtype):
    """A new output's metadata is written directly (``ngff._new_array``, ``_new_group``), not
    through zarr: byte for byte what zarr writes."""
    from pipeline.output.ngff import _new_array, _new_group, create_array

    group = zarr.open_group(tmp_path / "zarr", mode="w", zarr_format=2)
    create_array(group, "a", (3, 100, 70), (3, 32, 32), dtype)
    _new_group(tmp_path / "own")
    _new_array(tmp_path / "own" / "a", (3, 100, 70), (3, 32, 32), dtype)
    for name in (".zgroup", ".zattrs", "a/.zarray", "a/.zattrs"):
        assert (tmp_path / "own" / name).read_bytes() == (tmp_path / "zarr" / name).read_bytes()
    zarr.open_group(tmp_path / "own", mode="r+", zarr_format=2).attrs["k"] = [1.5]
    assert zarr.open_array(tmp_path / "own" / "a", mode="r")[2, 99, 69] == 0
