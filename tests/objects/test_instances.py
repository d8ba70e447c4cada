"""Instance labels across chunk borders: equal to whole-image labelling up to renumbering."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from outputs import make_output, one_to_one
from profiles import examples
from scipy import ndimage

from pipeline.errors import TilesegError
from pipeline.objects.instances import SplitGrid, label_instances, watershed_split
from pipeline.resample import nearest_source
from pipeline.synthetic.slides import SyntheticConfig, synthetic_pair


def read(out: Path, name: str = "instances", level: int = 0) -> np.ndarray:
    return zarr.open_array(out / "labels" / name / str(level), mode="r")[...]


def whole_image_labels(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    return ndimage.label(mask, ndimage.generate_binary_structure(mask.ndim, connectivity))


@st.composite
def masks(draw, ndim: int):
    sizes = (4, 40) if ndim == 2 else (3, 12)
    shape = tuple(draw(st.integers(*sizes)) for _ in range(ndim))
    chunks = tuple(draw(st.integers(max(2, n // 6), n)) for n in shape)
    seed = draw(st.integers(0, 2**16))
    density = draw(st.floats(0.2, 0.7))
    rng = np.random.default_rng(seed)
    mask = rng.random(shape) < density
    if draw(st.booleans()):  # blobs rather than salt
        mask = ndimage.binary_dilation(rng.random(shape) < density / 8, iterations=2)
    connectivity = draw(st.integers(1, ndim))
    return mask, chunks, connectivity, draw(st.integers(1, 2))


def without_specks(mask: np.ndarray, connectivity: int, min_area: float) -> np.ndarray:
    labels, _ = whole_image_labels(mask, connectivity)
    keep = np.bincount(labels.ravel()) >= min_area
    keep[0] = False
    return keep[labels]


@pytest.mark.parametrize("ndim", [2, 3])
@settings(
    max_examples=examples(24),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(data=st.data())
def test_connected_components_equal_whole_image_labelling(ndim, data):
    """With ``min_area``, the components of fewer pixels are dropped exactly as a whole-image
    labelling drops them, whatever blocks they cross (the halo grows to hold them)."""
    mask, chunks, connectivity, block_chunks = data.draw(masks(ndim))
    min_area = data.draw(st.just(0) | st.integers(1, 60))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.zarr"
        make_output(out, mask.astype(np.uint8), chunks)
        summary = label_instances(
            out, connectivity=connectivity, block_chunks=block_chunks, min_area=min_area
        )
        got = read(out)
    expected, n = whole_image_labels(without_specks(mask, connectivity, min_area), connectivity)
    assert one_to_one(got, expected)
    assert summary.objects == n
    assert sorted(np.unique(got[got > 0])) == list(range(1, n + 1))  # consecutive ids


def corner_mask() -> np.ndarray:
    """Objects across chunk corners (chunks of 10), along faces and at the image border."""
    m = np.zeros((40, 50), bool)
    m[7:13, 9:11] = m[9:11, 7:13] = True  # a plus centred on the corner (10, 10)
    m[19, 19] = m[20, 20] = True  # touching only diagonally across the corner (20, 20)
    m[29, 30] = m[30, 29] = True  # the other diagonal, at the corner (30, 30)
    m[25:35, 25:28] = m[25:28, 25:45] = m[32:35, 25:45] = True  # a C crossing one face twice
    m[0:3, 40:50] = m[37:40, 0:12] = m[15:25, 49] = True  # along the image border
    m[30, 9:12] = m[29:32, 10] = True  # a small cross on a face (x = 10)
    return m


@pytest.mark.parametrize("connectivity", [1, 2])
def test_objects_across_chunk_corners_faces_and_image_borders(tmp_path, connectivity):
    mask = corner_mask()
    out = tmp_path / "out.zarr"
    make_output(out, mask.astype(np.uint8), (10, 10), pixel_size=(0.5, 0.5))
    summary = label_instances(out, connectivity=connectivity, block_chunks=1)
    got = read(out)
    expected, n = whole_image_labels(mask, connectivity)
    assert one_to_one(got, expected)
    assert summary.objects == n and summary.blocks == 20 and summary.rounds == 3
    # Pixels touching only diagonally across a chunk corner: two objects each, or one.
    for ys, xs in [([19, 20], [19, 20]), ([29, 30], [30, 29])]:
        assert len(np.unique(got[ys, xs])) == (2 if connectivity == 1 else 1)
    assert got.dtype == np.uint32
    # An NGFF labels image next to the segmentation, with a nearest-neighbour pyramid.
    group = zarr.open_group(out / "labels", mode="r")
    assert list(group.attrs["labels"]) == ["segmentation", "instances"]
    attrs = group["instances"].attrs
    scales = [
        d["coordinateTransformations"][0]["scale"] for d in attrs["multiscales"][0]["datasets"]
    ]
    assert scales == [[0.5, 0.5], [1.0, 1.0], [2.0, 2.0], [4.0, 4.0]]  # down to one chunk
    assert attrs["tileseg-instances"]["objects"] == n
    np.testing.assert_array_equal(read(out, level=1), got[::2, ::2])
    np.testing.assert_array_equal(read(out, level=3), got[::8, ::8])


def test_sparse_ids_and_chosen_classes(tmp_path):
    labels = corner_mask().astype(np.uint8)
    labels[:, 25:] *= 2  # class 2 on the right half
    out = tmp_path / "out.zarr"
    make_output(out, labels, (10, 10), classes=3)
    summary = label_instances(out, foreground_classes=(2,), consecutive=False, block_chunks=1)
    got = read(out)
    expected, n = whole_image_labels(labels == 2, 1)
    assert one_to_one(got, expected) and summary.objects == n
    assert got.max() > n  # block index in the high bits


def test_probability_source_and_3d_volume(tmp_path):
    rng = np.random.default_rng(3)
    p1 = ndimage.gaussian_filter(rng.random((12, 30, 26)), 1.0)
    p1 = (p1 - p1.min()) / (p1.max() - p1.min())
    out = tmp_path / "out.zarr"
    make_output(out, (p1 > 0.5).astype(np.uint8), (5, 8, 8), probabilities=np.stack([1 - p1, p1]))
    summary = label_instances(out, source="probabilities", threshold=0.6, connectivity=3)
    expected, n = whole_image_labels(p1 > 0.6, 3)
    assert one_to_one(read(out), expected) and summary.objects == n >= 2
    make_output(tmp_path / "none.zarr", np.zeros((8, 8), np.uint8), (4, 4))
    with pytest.raises(TilesegError, match="no probabilities"):
        label_instances(tmp_path / "none.zarr", source="probabilities")


def touching_pairs(shape: tuple[int, int], corners: list[tuple[int, int]]) -> np.ndarray:
    """Two overlapping disks (a "doublet") centred on each given point."""
    yy, xx = np.indices(shape)
    mask = np.zeros(shape, bool)
    for k, (y, x) in enumerate(corners):
        dy, dx = (4, 5) if k % 2 else (5, -4)
        mask |= (yy - y + dy) ** 2 + (xx - x + dx) ** 2 <= 7.5**2
        mask |= (yy - y - dy) ** 2 + (xx - x - dx) ** 2 <= 6.5**2
    return mask


def test_watershed_splits_doublets_across_chunk_corners(tmp_path):
    # Each doublet is centred on a chunk corner, so both halves lie in several blocks.
    corners = [(16, 16), (16, 48), (48, 32), (32, 64), (0, 40), (64, 0)]
    mask = touching_pairs((70, 75), corners)
    out = tmp_path / "out.zarr"
    make_output(out, mask.astype(np.uint8), (16, 16))
    summary = label_instances(out, watershed=True, min_distance=3, halo=32, block_chunks=1)
    expected = watershed_split(mask, min_distance=3)
    got = read(out)
    assert one_to_one(got, expected)
    _, n_cc = ndimage.label(mask)
    assert summary.objects == expected.max() > n_cc  # the doublets were split


@settings(max_examples=examples(5), deadline=None, derandomize=True)
@given(chunk=st.integers(12, 70), seed=st.integers(0, 1000))
def test_watershed_equals_whole_image_for_objects_within_the_halo(chunk, seed):
    config = SyntheticConfig(seed=seed, tissue=False, noise=False, density=8, doublets=0.5)
    _, truth = synthetic_pair((140, 150), config=config)
    mask = truth > 0
    cc, _ = ndimage.label(mask)
    extent = max(max(s.stop - s.start for s in sl) for sl in ndimage.find_objects(cc))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.zarr"
        make_output(out, mask.astype(np.uint8), (chunk, chunk))
        label_instances(out, watershed=True, min_distance=4, halo=extent, block_chunks=1)
        got = read(out)
        # A halo smaller than the objects: no guarantee of the split, but objects never
        # merge across components and every foreground pixel keeps a label.
        label_instances(out, watershed=True, min_distance=4, halo=4, block_chunks=1)
        small_halo = read(out)
    assert one_to_one(got, watershed_split(mask, min_distance=4))
    assert np.array_equal(small_halo > 0, mask)
    with tempfile.TemporaryDirectory() as tmp:  # specks left out before the split
        out = Path(tmp) / "out.zarr"
        make_output(out, mask.astype(np.uint8), (chunk, chunk))
        label_instances(out, watershed=True, min_distance=4, halo=extent, block_chunks=1,
                        min_area=120)  # fmt: skip
        cleaned = read(out)
    assert one_to_one(cleaned, watershed_split(without_specks(mask, 1, 120), min_distance=4))
    pairs = np.unique(np.stack([small_halo.ravel(), cc.ravel()]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1]  # each object inside one component


@settings(max_examples=examples(5), deadline=None, derandomize=True)
@given(
    factor=st.sampled_from([0.55, 1.5, 2.0]) | st.floats(0.5, 3.0),
    chunk=st.integers(12, 70),
    seed=st.integers(0, 1000),
)
def test_watershed_on_the_grid_labels_came_from_equals_its_split_brought_over(factor, chunk, seed):
    """Labels resampled from another grid by nearest neighbour, split on that grid: the
    whole-image watershed there, brought to the output's pixels the same way, across blocks."""
    config = SyntheticConfig(seed=seed, tissue=False, noise=False, density=8, doublets=0.5)
    _, truth = synthetic_pair((70, 75), config=config)
    coarse = truth > 0
    cc, _ = ndimage.label(coarse)
    extent = max(max(s.stop - s.start for s in sl) for sl in ndimage.find_objects(cc))
    shape = tuple(max(1, round(n * factor)) for n in coarse.shape)
    index = [nearest_source(0, m, factor, n) for m, n in zip(shape, coarse.shape, strict=True)]
    pick = np.ix_(*index)
    with tempfile.TemporaryDirectory() as tmp:
        out, grid = Path(tmp) / "out.zarr", Path(tmp) / "grid.zarr"
        make_output(grid, coarse.astype(np.uint8), (32, 32))
        make_output(out, coarse[pick].astype(np.uint8), (chunk, chunk))
        summary = label_instances(
            out, watershed=True, min_distance=4, halo=int(np.ceil((extent + 2) * factor)),
            block_chunks=1, split_on=SplitGrid(str(grid), (factor, factor)),
        )  # fmt: skip
        got = read(out)
        attrs = zarr.open_group(out / "labels" / "instances", mode="r").attrs
    assert one_to_one(got, watershed_split(coarse, min_distance=4)[pick])
    assert summary.objects == len(np.unique(got)) - 1
    assert attrs["tileseg-instances"]["split_on_factors"] == [factor, factor]
    with tempfile.TemporaryDirectory() as tmp:  # specks of 40 output px: 40 / factor² there
        out, grid = Path(tmp) / "out.zarr", Path(tmp) / "grid.zarr"
        make_output(grid, coarse.astype(np.uint8), (32, 32))
        make_output(out, coarse[pick].astype(np.uint8), (chunk, chunk))
        label_instances(
            out, watershed=True, min_distance=4, halo=int(np.ceil((extent + 2) * factor)),
            block_chunks=1, split_on=SplitGrid(str(grid), (factor, factor)), min_area=40,
        )  # fmt: skip
        cleaned = read(out)
    kept = without_specks(coarse, 1, 40 / factor**2)
    assert one_to_one(cleaned, watershed_split(kept, min_distance=4)[pick])


def test_empty_foreground_and_single_block(tmp_path):
    out = tmp_path / "out.zarr"
    make_output(out, np.zeros((9, 7), np.uint8), (16, 16))
    summary = label_instances(out)
    assert summary.objects == 0 and summary.blocks == 1 and summary.rounds == 0
    assert not read(out).any()
    with pytest.raises(TilesegError, match="name"):
        label_instances(out, name="segmentation")  # never replaces the class labels
