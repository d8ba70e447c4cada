"""The decoded-tile cache under TIFF reads: exact reads, each tile decoded once, bounded memory,
a rewritten file never served from old tiles, failures never kept."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from imagefiles import write_tiff

from pipeline import chunk_cache
from pipeline.chunk_cache import CHUNKS, DecodedChunks
from pipeline.errors import TilesegError
from pipeline.readers import open_image
from pipeline.segment import read_window

RNG = np.random.default_rng(7)


@pytest.fixture(autouse=True)
def fresh_cache():
    """Every test starts from an empty cache of the default capacity, and leaves one."""
    CHUNKS.clear()
    CHUNKS.capacity = chunk_cache.MIN_BYTES
    yield
    CHUNKS.clear()
    CHUNKS.capacity = chunk_cache.MIN_BYTES


def image_file(tmp_path, shape=(2, 192, 256), tile=(32, 32), name="img.ome.tif"):
    data = RNG.integers(0, 4096, size=shape, dtype=np.uint16)
    path = write_tiff(tmp_path / name, data, axes="CYX", tile=tile, compression="zlib")
    return data, path


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


def test_each_tile_is_decoded_once_for_a_raster_of_windows(tmp_path):
    data, path = image_file(tmp_path)
    image = open_image(path)
    for start, stop in windows((192, 256), tile=64, halo=10):
        np.testing.assert_array_equal(read_window(image, start, stop), mirrored(data, start, stop))
    # Every tile of each channel plane once, though the windows overlap the tiles.
    assert CHUNKS.decodes == 2 * (192 // 32) * (256 // 32)
    assert CHUNKS.hits > CHUNKS.decodes  # each tile reached by several windows
    image.close()


def test_concurrent_readers_decode_a_shared_tile_once(tmp_path):
    data, path = image_file(tmp_path)
    image = open_image(path)
    jobs = windows((192, 256), tile=64, halo=10) * 3
    with ThreadPoolExecutor(8) as pool:
        reads = list(pool.map(lambda w: read_window(image, *w), jobs))
    for (start, stop), got in zip(jobs, reads, strict=True):
        np.testing.assert_array_equal(got, mirrored(data, start, stop))
    assert CHUNKS.decodes == 2 * 48
    image.close()


@settings(max_examples=40, deadline=None)
@given(capacity_tiles=st.integers(0, 12), seed=st.integers(0, 2**16))
def test_reads_stay_exact_and_memory_bounded_while_evicting(tmp_path_factory, capacity_tiles, seed):
    tmp_path = tmp_path_factory.mktemp("evict")
    data, path = image_file(tmp_path, shape=(2, 96, 128))
    CHUNKS.clear()
    tile_bytes = 32 * 32 * 2  # a tile of one channel plane
    CHUNKS.capacity = capacity_tiles * tile_bytes
    image = open_image(path)
    rng = np.random.default_rng(seed)
    for _ in range(6):
        start = tuple(int(v) for v in rng.integers(-20, 100, size=2))
        stop = tuple(s + int(v) for s, v in zip(start, rng.integers(1, 60, size=2), strict=True))
        np.testing.assert_array_equal(read_window(image, start, stop), mirrored(data, start, stop))
        assert CHUNKS.nbytes <= CHUNKS.capacity
    image.close()


def test_file_rewritten_in_place_is_read_anew(tmp_path):
    first, path = image_file(tmp_path)
    image = open_image(path)
    np.testing.assert_array_equal(image.read((slice(0, 64), slice(0, 64))), first[:, :64, :64])
    image.close()
    second, same = image_file(tmp_path)  # the same path, written again at once
    assert same == path
    image = open_image(path)
    np.testing.assert_array_equal(image.read((slice(0, 64), slice(0, 64))), second[:, :64, :64])
    image.close()


def test_a_failed_decode_is_not_kept(tmp_path):
    data, path = image_file(tmp_path, shape=(1, 64, 64))
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
    chunk_cache.reserve(window=(1112, 1112), spatial_shape=(8192, 100_000), bytes_per_pixel=3)
    assert CHUNKS.capacity == (1112 + 512) * 100_000 * 3
    chunk_cache.reserve(window=(64, 64), spatial_shape=(256, 256), bytes_per_pixel=1)
    assert CHUNKS.capacity == (1112 + 512) * 100_000 * 3  # only grows
    chunk_cache.reserve(window=(9, 1112, 1112), spatial_shape=(9, 9000, 90_000), bytes_per_pixel=8)
    assert CHUNKS.capacity == chunk_cache.MAX_BYTES  # a band past the bound is cached in part


def test_a_chunk_larger_than_the_cache_is_not_kept():
    cache = DecodedChunks(capacity=100)
    cache.put("big", np.zeros(101, np.uint8))
    cache.put("small", np.zeros(60, np.uint8))
    cache.put("next", np.zeros(60, np.uint8))  # evicts "small", the least recently used
    assert cache.get("big") is None and cache.get("small") is None
    assert cache.get("next") is not None and cache.nbytes == 60
