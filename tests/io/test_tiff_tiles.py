"""Tiles of a one-page TIFF level read straight from the file: the same values as tifffile's
Zarr store gives, for every layout it is used for; levels of several pages keep the store."""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest
import tifffile
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from imagefiles import write_jpeg_tables_tiff, write_svs, write_tiff
from profiles import examples

from pipeline.errors import TilesegError
from pipeline.io.chunk_cache import CHUNKS
from pipeline.io.readers import open_image
from pipeline.io.tiff_tiles import TiffTiles

LOSSLESS = [None, "zlib", "lzw", "zstd", "packbits"]
DTYPES = ["uint8", "uint16", "int16", "float32"]


def level_of(path, *, level: int = 0):
    tif = tifffile.TiffFile(path)
    return tif, tif.series[0].levels[level]


def through_store(path, index, *, level: int = 0) -> np.ndarray:
    """What tifffile's Zarr store reads at ``index`` (the path these tiles replace)."""
    with tifffile.TiffFile(path) as tif:
        store = tif.series[0].aszarr(level=level)
        return np.asarray(zarr.open_array(store, mode="r")[index])


def direct(path, *, level: int = 0) -> TiffTiles:
    tif, lv = level_of(path, level=level)
    with tif:
        tiles = TiffTiles.of(str(path), lv, namespace=("test", str(path), level))
    assert tiles is not None
    return tiles


@st.composite
def files(draw):
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    height, width = draw(st.integers(1, 90)), draw(st.integers(1, 90))
    samples = draw(st.sampled_from([0, 0, 3, 4]))  # 0: no sample axis
    planar = draw(st.sampled_from(["contig", "separate"])) if samples else None
    shape = (height, width) if not samples else (
        (height, width, samples) if planar == "contig" else (samples, height, width)
    )  # fmt: skip
    options = {
        "compression": draw(st.sampled_from(LOSSLESS)),
        "byteorder": draw(st.sampled_from(["<", ">"])),
        "photometric": "minisblack" if not samples else "rgb",
    }
    if samples:
        options["planarconfig"] = planar
        if samples == 4:
            options["extrasamples"] = ["unassalpha"]
    if options["compression"] in ("zlib", "lzw") and dtype.kind in "iu":
        options["predictor"] = draw(st.booleans())
    if draw(st.booleans()):
        options["tile"] = (draw(st.sampled_from([16, 32, 48])), draw(st.sampled_from([16, 32])))
    else:
        options["rowsperstrip"] = draw(st.integers(1, height))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    data = (rng.random(shape) * 1000 - (100 if dtype.kind in "if" else 0)).astype(dtype)
    starts = [draw(st.integers(0, n - 1)) for n in shape]
    index = tuple(slice(a, draw(st.integers(a + 1, n))) for a, n in zip(starts, shape, strict=True))
    return data, options, index


@settings(max_examples=examples(60), deadline=None)
@given(case=files())
def test_direct_tiles_read_what_the_store_reads(tmp_path_factory, case):
    data, options, index = case
    path = tmp_path_factory.mktemp("tiles") / "img.tif"
    tifffile.imwrite(path, data, **options)
    tif, lv = level_of(path)
    with tif:
        contiguous = lv.dataoffset is not None  # memory-mapped: never reaches the tiles
    if contiguous:
        return
    tiles = direct(path)
    try:
        assert tiles.shape == data.shape
        got = tiles[index]
        np.testing.assert_array_equal(got, data[index])
        np.testing.assert_array_equal(got, through_store(path, index))
        whole = tuple(slice(None) for _ in data.shape)
        np.testing.assert_array_equal(tiles[whole], data)
    finally:
        tiles.close()


def test_jpeg_tiles_decode_as_the_store_decodes_them(tmp_path):
    """Lossy, so compared with the store's decode (the same decoder, tables and header)."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (150, 200, 3), np.uint8)
    path = write_svs(tmp_path / "slide.svs", rgb, tile=64, levels=2)
    for level in (0, 1):
        tiles = direct(path, level=level)
        index = (slice(3, 101), slice(17, tiles.shape[1]), slice(None))
        np.testing.assert_array_equal(tiles[index], through_store(path, index, level=level))
        tiles.close()
    gray = write_tiff(tmp_path / "gray.tif", rgb[..., 0], axes="YX", tile=(32, 32),
                      compression="jpeg")  # fmt: skip
    tiles = direct(gray)
    whole = (slice(None), slice(None))
    np.testing.assert_array_equal(tiles[whole], through_store(gray, whole))
    tiles.close()


def test_jpeg_tiles_without_their_own_tables_decode_with_the_pages_tables(tmp_path):
    """Scanners store JPEG tiles abbreviated, their tables once in the page's JPEGTables tag;
    the tiles of a tifffile-written file carry their own tables and never need the tag."""
    rng = np.random.default_rng(2)
    gray = (rng.integers(0, 16, (70, 90)) * 16).astype(np.uint8)
    path = write_jpeg_tables_tiff(tmp_path / "tables.tif", gray, tile=(32, 32))
    image = open_image(path)
    assert isinstance(image._handle().array, TiffTiles)
    got = image.read((slice(None), slice(None)))[0]
    image.close()
    np.testing.assert_array_equal(got, through_store(path, (slice(None), slice(None))))
    assert np.abs(got.astype(int) - gray).mean() < 5  # JPEG is lossy


def test_missing_tiles_read_as_zero(tmp_path):
    def tiles():
        for k in range(16):
            yield None if k in (5, 15) else np.full((32, 32), k + 1, np.uint16)

    path = tmp_path / "sparse.tif"
    tifffile.imwrite(path, tiles(), shape=(100, 100), dtype=np.uint16, tile=(32, 32),
                     compression="zlib")  # fmt: skip
    t = direct(path)
    got = t[(slice(None), slice(None))]
    assert got[40, 40] == 0 and got[99, 99] == 0 and got[0, 0] == 1 and got[99, 0] == 13
    np.testing.assert_array_equal(got, through_store(path, (slice(None), slice(None))))
    t.close()


def test_one_page_levels_are_read_directly_and_several_pages_through_the_store(tmp_path):
    data = np.random.default_rng(0).integers(0, 999, (2, 64, 96), np.uint16)
    one = write_tiff(tmp_path / "one.ome.tif", data[0], axes="YX", tile=(32, 32),
                     compression="zlib", pyramid_levels=1)  # fmt: skip
    pages = write_tiff(tmp_path / "pages.ome.tif", data, axes="CYX", tile=(32, 32),
                       compression="zlib")  # fmt: skip
    for level in (0, 1):
        image = open_image(one, level=level)
        assert isinstance(image._handle().array, TiffTiles)
        step = 2**level
        np.testing.assert_array_equal(image.read((slice(None), slice(None)))[0],
                                      data[0, ::step, ::step])  # fmt: skip
        image.close()
    image = open_image(pages)
    assert not isinstance(image._handle().array, TiffTiles)
    np.testing.assert_array_equal(image.read((slice(None), slice(None))), data)
    tif, lv = level_of(pages)
    with tif:
        assert TiffTiles.of(str(pages), lv, namespace="x") is None
    image.close()


def test_each_tile_is_decoded_once_whatever_the_number_of_tiles_a_read_touches(tmp_path):
    """Unlike a Zarr read over tiny chunks, a read touching many tiles goes through the cache:
    reading them costs no call into zarr-python."""
    CHUNKS.clear()
    data = np.random.default_rng(0).integers(0, 999, (160, 160), np.uint16)
    path = write_tiff(tmp_path / "tiny.ome.tif", data, axes="YX", tile=(16, 16), compression="zlib")
    image = open_image(path)
    before = CHUNKS.decodes
    for _ in range(2):
        np.testing.assert_array_equal(image.read((slice(None), slice(None)))[0], data)
    assert CHUNKS.decodes - before == 100  # 10 x 10 tiles, once
    image.close()
    CHUNKS.clear()


def test_a_read_from_a_closed_handle_or_of_a_corrupt_tile_fails_clearly(tmp_path):
    data = np.random.default_rng(0).integers(0, 999, (64, 64), np.uint16)
    path = write_tiff(tmp_path / "img.ome.tif", data, axes="YX", tile=(32, 32), compression="zlib")
    tiles = direct(path)
    fd = tiles._fd
    del tiles
    gc.collect()
    with pytest.raises(OSError):  # a forgotten handle's descriptor is closed
        os.fstat(fd)
    tiles = direct(path)
    tiles.close()
    tiles.close()  # twice is fine
    with pytest.raises(ValueError, match="closed"):
        tiles.tile((0, 0))
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages.first.dataoffsets[1], tif.pages.first.databytecounts[1]
    raw = bytearray(path.read_bytes())
    raw[offset : offset + count] = b"\xff" * count
    path.write_bytes(bytes(raw))
    image = open_image(path)
    with pytest.raises(TilesegError, match=r"img\.ome\.tif: cannot read region y=0:64, x=0:64"):
        image.read((slice(None), slice(None)))
    np.testing.assert_array_equal(image.read((slice(32, 64), slice(0, 32)))[0], data[32:, :32])
    image.close()
