"""The decoded-tile cache under TIFF reads: exact reads, each tile decoded once, bounded memory,
a rewritten file never served from old tiles, failures never kept."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tifffile
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from imagefiles import write_tiff, write_zarr
from profiles import examples

from pipeline.engine.tasks import read_window
from pipeline.errors import TilesegError
from pipeline.io import chunk_cache
from pipeline.io.chunk_cache import CHUNKS, DecodedChunks
from pipeline.io.readers import open_image

RNG = np.random.default_rng(7)


@pytest.fixture(autouse=True)
def fresh_cache():
    """Every test starts from an empty cache of the default capacity, and leaves one."""
    CHUNKS.clear()
    CHUNKS.capacity = chunk_cache.MIN_BYTES
    yield
    CHUNKS.clear()
    CHUNKS.capacity = chunk_cache.MIN_BYTES


# Channels as pages (read through tifffile's Zarr store) or as the samples of one page (its
# tiles read directly, pipeline/io/tiff_tiles.py): a tile holds one channel or all of them.
LAYOUTS = ("pages", "samples")


def image_file(tmp_path, shape=(2, 192, 256), tile=(32, 32), name="img.ome.tif", layout="pages"):
    if layout == "samples":
        shape = (3, *shape[1:])  # RGB
    data = RNG.integers(0, 4096, size=shape, dtype=np.uint16)
    if layout == "pages":
        path = write_tiff(tmp_path / name, data, axes="CYX", tile=tile, compression="zlib")
    else:
        rgb = np.moveaxis(data, 0, -1)
        path = write_tiff(tmp_path / name, rgb, axes="YXS", tile=tile, compression="zlib")
    return data, path


def planes(layout: str, data: np.ndarray) -> int:
    """Tiles per tile position: one per channel for pages, one for the samples of a page."""
    return data.shape[0] if layout == "pages" else 1


def windows(shape, *, tile, halo):
    """The windows of an overlap-tile raster over ``shape`` (mirrored past the border)."""
    return [
        ((y - halo, x - halo), (y + tile + halo, x + tile + halo))
        for y in range(0, shape[0], tile)
        for x in range(0, shape[1], tile)
    ]


def mirrored(data: np.ndarray, start, stop) -> np.ndarray:
    pad = max(-min(start), max(s - n for s, n in zip(stop, data.shape[1:], strict=True)), 0)
    padded = np.pad(data, [(0, 0), (pad, pad), (pad, pad)], mode="reflect")
    return padded[:, start[0] + pad : stop[0] + pad, start[1] + pad : stop[1] + pad]


def random_windows_are_exact(image, data: np.ndarray, *, seed: int, count: int = 6) -> None:
    """Windows anywhere, past the borders too, read exactly; the cache within its bound."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        start = tuple(int(v) for v in rng.integers(-20, max(data.shape[1:]) - 10, size=2))
        stop = tuple(s + int(v) for s, v in zip(start, rng.integers(1, 60, size=2), strict=True))
        np.testing.assert_array_equal(read_window(image, start, stop), mirrored(data, start, stop))
        assert CHUNKS.nbytes <= CHUNKS.capacity
    image.close()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_tile_is_decoded_once_for_a_raster_of_windows(tmp_path, layout):
    data, path = image_file(tmp_path, layout=layout)
    image = open_image(path)
    for start, stop in windows((192, 256), tile=64, halo=10):
        np.testing.assert_array_equal(read_window(image, start, stop), mirrored(data, start, stop))
    # Every tile once, though the windows overlap the tiles.
    assert CHUNKS.decodes == planes(layout, data) * (192 // 32) * (256 // 32)
    assert CHUNKS.hits > CHUNKS.decodes  # each tile reached by several windows
    image.close()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_concurrent_readers_decode_a_shared_tile_once(tmp_path, layout):
    data, path = image_file(tmp_path, layout=layout)
    image = open_image(path)
    jobs = windows((192, 256), tile=64, halo=10) * 3
    with ThreadPoolExecutor(8) as pool:
        reads = list(pool.map(lambda w: read_window(image, *w), jobs))
    for (start, stop), got in zip(jobs, reads, strict=True):
        np.testing.assert_array_equal(got, mirrored(data, start, stop))
    assert CHUNKS.decodes == planes(layout, data) * 48
    image.close()


@settings(max_examples=examples(40), deadline=None)
@given(
    capacity_tiles=st.integers(0, 12), seed=st.integers(0, 2**16), layout=st.sampled_from(LAYOUTS)
)
def test_reads_stay_exact_and_memory_bounded_while_evicting(
    tmp_path_factory, capacity_tiles, seed, layout
):
    tmp_path = tmp_path_factory.mktemp("evict")
    data, path = image_file(tmp_path, shape=(2, 96, 128), layout=layout)
    CHUNKS.clear()
    tile_bytes = 32 * 32 * 2 * (data.shape[0] // planes(layout, data))  # one tile of the file
    CHUNKS.capacity = capacity_tiles * tile_bytes
    random_windows_are_exact(open_image(path), data, seed=seed)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_file_rewritten_in_place_is_read_anew(tmp_path, layout):
    first, path = image_file(tmp_path, layout=layout)
    image = open_image(path)
    np.testing.assert_array_equal(image.read((slice(0, 64), slice(0, 64))), first[:, :64, :64])
    image.close()
    second, same = image_file(tmp_path, layout=layout)  # the same path, written again at once
    assert same == path
    image = open_image(path)
    np.testing.assert_array_equal(image.read((slice(0, 64), slice(0, 64))), second[:, :64, :64])
    image.close()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_failed_decode_is_not_kept(tmp_path, layout):
    data, path = image_file(tmp_path, shape=(2, 64, 64), layout=layout)
    raw = bytearray(path.read_bytes())
    image = open_image(path)
    np.testing.assert_array_equal(image.read((slice(0, 32), slice(0, 32))), data[:, :32, :32])
    image.close()
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages.first.dataoffsets[3], tif.pages.first.databytecounts[3]
    raw[offset : offset + count] = b"\xff" * count  # the last tile is no zlib stream any more
    path.write_bytes(bytes(raw))
    image = open_image(path)
    for _ in range(2):  # fails each time: the failure was not cached as a tile
        with pytest.raises(TilesegError, match="cannot read region"):
            image.read((slice(32, 64), slice(32, 64)))
    np.testing.assert_array_equal(image.read((slice(0, 32), slice(32, 64))), data[:, :32, 32:])
    image.close()


def test_capacity_grows_to_the_band_a_row_of_windows_reads():
    cache = DecodedChunks()
    cache.reserve(1)
    assert cache.capacity == chunk_cache.MIN_BYTES  # never below the minimum
    # a 1112-row window can touch 4 rows of 512-row tiles (it rarely starts on one)
    band = dict(window=(1112, 1112), spatial_shape=(8192, 100_000), bytes_per_pixel=3)
    chunk_cache.reserve(**band, tile_rows=512)
    assert CHUNKS.capacity == 4 * 512 * 100_000 * 3
    chunk_cache.reserve(window=(64, 64), spatial_shape=(256, 256), bytes_per_pixel=1, tile_rows=64)
    assert CHUNKS.capacity == 4 * 512 * 100_000 * 3  # only grows
    chunk_cache.reserve(**band, tile_rows=1024)
    assert CHUNKS.capacity == 3 * 1024 * 100_000 * 3
    chunk_cache.reserve(
        window=(9, 1112, 1112), spatial_shape=(9, 9000, 90_000), bytes_per_pixel=8, tile_rows=512
    )
    assert CHUNKS.capacity == chunk_cache.MAX_BYTES  # a band past the bound is cached in part


def test_a_chunk_larger_than_the_cache_is_not_kept():
    cache = DecodedChunks(capacity=100)
    cache.put("big", np.zeros(101, np.uint8))
    cache.put("small", np.zeros(60, np.uint8))
    cache.put("next", np.zeros(60, np.uint8))  # evicts "small", the least recently used
    assert cache.get("big") is None and cache.get("small") is None
    assert cache.get("next") is not None and cache.nbytes == 60


# ----------------------------------------------------------------------------- Zarr inputs


def zarr_file(tmp_path, shape=(3, 90, 130), chunks=(2, 32, 32), name="img.zarr"):
    data = RNG.integers(0, 4096, size=shape, dtype=np.uint16)
    return data, write_zarr(tmp_path / name, data, chunks=chunks)


@settings(max_examples=examples(40), deadline=None)
@given(capacity_chunks=st.integers(0, 10), seed=st.integers(0, 2**16))
def test_zarr_windows_are_exact_through_the_cache(tmp_path_factory, capacity_chunks, seed):
    """Channel chunks of 2 over 3 channels, edge chunks cut short, mirrored windows, evictions."""
    data, path = zarr_file(tmp_path_factory.mktemp("z"))
    CHUNKS.clear()
    CHUNKS.capacity = capacity_chunks * 2 * 32 * 32 * 2
    random_windows_are_exact(open_image(path, axes="CYX"), data, seed=seed)


def test_zarr_chunks_are_decoded_once_by_concurrent_readers(tmp_path):
    data, path = zarr_file(tmp_path, shape=(1, 96, 128), chunks=(1, 32, 32))
    image = open_image(path, axes="CYX")
    jobs = windows((96, 128), tile=32, halo=6) * 3
    with ThreadPoolExecutor(8) as pool:
        reads = list(pool.map(lambda w: read_window(image, *w), jobs))
    for (start, stop), got in zip(jobs, reads, strict=True):
        np.testing.assert_array_equal(got, mirrored(data, start, stop))
    assert CHUNKS.decodes == 3 * 4  # each chunk once
    image.close()


def test_zarr_squeezed_axes_and_a_rewrite_after_close(tmp_path):
    """A singleton axis read by index; a store rewritten while the image is closed is read
    anew (zarr's metadata does not change when only chunks do)."""
    first = RNG.integers(0, 255, size=(1, 40, 50), dtype=np.uint8)
    path = write_zarr(tmp_path / "s.zarr", first, chunks=(1, 16, 16))
    image = open_image(path, axes="TYX")
    assert image.spatial_axes == "YX"  # the singleton t is squeezed away: read by index
    np.testing.assert_array_equal(
        image.read((slice(3, 30), slice(10, 45)))[0], first[0, 3:30, 10:45]
    )
    image.close()
    second = first[:, ::-1, ::-1].copy()
    zarr.open_array(path, mode="r+")[...] = second  # only the chunks change
    np.testing.assert_array_equal(
        image.read((slice(3, 30), slice(10, 45)))[0], second[0, 3:30, 10:45]
    )
    image.close()


def test_chunk_shape_is_the_files_tile_along_each_spatial_axis(tmp_path):
    _, tiff = image_file(tmp_path, tile=(32, 48))
    _, zpath = zarr_file(tmp_path, chunks=(2, 16, 24))
    assert open_image(tiff).chunk_shape == (32, 48)
    assert open_image(zpath, axes="CYX").chunk_shape == (16, 24)
    flat = write_tiff(tmp_path / "flat.tif", np.zeros((20, 30), np.uint8), axes="YX", tile=None)
    assert open_image(flat).chunk_shape is None  # memory-mapped: nothing to decode


def test_zarr_reads_over_many_tiny_chunks_bypass_the_cache(tmp_path):
    data, path = zarr_file(tmp_path, shape=(1, 90, 130), chunks=(1, 4, 4))
    image = open_image(path, axes="CYX")
    np.testing.assert_array_equal(image.read((slice(0, 90), slice(0, 130))), data)  # 759 chunks
    assert CHUNKS.decodes == 0
    np.testing.assert_array_equal(image.read((slice(8, 36), slice(4, 32))), data[:, 8:36, 4:32])
    assert CHUNKS.decodes == 49  # 7 x 7 chunks: through the cache
    image.close()
