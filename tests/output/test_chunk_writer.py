"""Whole chunks written straight to their files: the same files, byte for byte, as zarr's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from profiles import examples

from pipeline.output import chunk_writer
from pipeline.output.chunk_writer import ChunkWriter
from pipeline.output.ngff import _COMPRESSOR


def create(path: Path, shape, chunks, dtype, *, fill_value=0, **kwargs) -> zarr.Array:
    """An array as the output's are made (ngff._create), or with the options given."""
    options = {"compressors": _COMPRESSOR, "chunk_key_encoding": {"name": "v2", "separator": "/"}}
    return zarr.create_array(
        path, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill_value, zarr_format=2,
        **{**options, **kwargs},
    )  # fmt: skip


def files(root: Path) -> dict[str, bytes]:
    """Every chunk file under an array, by key (the metadata is not written here)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".z")
    }


@st.composite
def writes(draw):
    """An array's shape, chunks and dtype, then a few chunk-aligned regions and their data,
    some of it all zero (chunks not stored) and -0.0 (stored: zarr compares bits)."""
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 40), min_size=ndim, max_size=ndim)))
    chunks = tuple(draw(st.integers(1, 16)) for _ in shape)
    dtype = np.dtype(draw(st.sampled_from(["|u1", "<u2", "<u4", "<i4", "<f2", "<f4", "<f8"])))
    steps = []
    for _ in range(draw(st.integers(1, 3))):
        region = []
        for n, c in zip(shape, chunks, strict=True):
            count = -(-n // c)
            first = draw(st.integers(0, count - 1))
            last = draw(st.integers(first + 1, count))
            region.append(slice(first * c, min(last * c, n)))
        kind = draw(st.sampled_from(["random", "zero", "sparse", "negative zero"]))
        steps.append((tuple(region), kind, draw(st.integers(0, 2**32 - 1))))
    return shape, chunks, dtype, steps


def data_for(region, dtype: np.dtype, kind: str, seed: int) -> np.ndarray:
    shape = tuple(s.stop - s.start for s in region)
    rng = np.random.default_rng(seed)
    if dtype.kind == "f":
        data = rng.normal(size=shape).astype(dtype)
    else:
        data = rng.integers(0, min(np.iinfo(dtype).max, 1000), size=shape).astype(dtype)
    if kind == "zero":
        data[...] = 0
    elif kind == "sparse":
        data[rng.random(shape) < 0.9] = 0
    elif kind == "negative zero":
        data[...] = -0.0 if dtype.kind == "f" else 0
    return data


@settings(
    max_examples=examples(60),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(case=writes())
def test_chunks_written_directly_are_zarrs_files_byte_for_byte(tmp_path_factory, case):
    shape, chunks, dtype, steps = case
    tmp = tmp_path_factory.mktemp("chunks")
    by_zarr = create(tmp / "zarr", shape, chunks, dtype)
    direct = create(tmp / "direct", shape, chunks, dtype)
    writer = ChunkWriter.of(direct)
    assert writer is not None
    for region, kind, seed in steps:  # later regions overwrite earlier ones, zeros delete
        data = data_for(region, dtype, kind, seed)
        by_zarr[region] = data
        writer.write(region, data)
        assert files(tmp / "direct") == files(tmp / "zarr")
    np.testing.assert_array_equal(direct[...], by_zarr[...])


@settings(
    max_examples=examples(60),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(case=writes(), data=st.data())
def test_regions_read_from_the_chunk_files_are_zarrs_values(tmp_path_factory, case, data):
    """Any region, on the chunk grid or off it, of chunks stored and not (all zero)."""
    shape, chunks, dtype, steps = case
    array = create(tmp_path_factory.mktemp("read") / "a", shape, chunks, dtype)
    for region, kind, seed in steps:
        array[region] = data_for(region, dtype, kind, seed)
    for _ in range(3):
        region = []
        for n in shape:
            start = data.draw(st.integers(0, n))
            region.append(slice(start, data.draw(st.integers(start, n))))
        region = tuple(region)
        got = chunk_writer.read(array, region)
        want = array[region]
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))  # -0.0 too


def test_a_region_with_a_step_is_refused_for_reading(tmp_path):
    reader = ChunkWriter.of(create(tmp_path / "a", (10, 8), (4, 4), "|u1"))
    with pytest.raises(ValueError, match="has a step"):
        reader.read((slice(0, 8, 2), slice(None)))


def test_arrays_zarr_must_write_are_read_by_zarr(tmp_path):
    array = create(tmp_path / "fill", (8, 8), (4, 4), "<u2", fill_value=7)
    array[:4, :4] = 1
    got = chunk_writer.read(array, (slice(2, 8), slice(0, 8)))
    np.testing.assert_array_equal(got, array[2:8])
    assert (got[2:] == 7).all()  # the fill value, not 0


def test_arrays_zarr_must_write_are_written_by_zarr(tmp_path):
    """Another fill value, filters, zarr v3, empty chunks stored: zarr writes them."""
    data = np.arange(64, dtype=np.uint16).reshape(8, 8)
    stored = create(tmp_path / "empty", (8, 8), (4, 4), "<u2", config={"write_empty_chunks": True})
    cases = {
        "fill": create(tmp_path / "fill", (8, 8), (4, 4), "<u2", fill_value=7),
        "v3": zarr.create_array(tmp_path / "v3", shape=(8, 8), chunks=(4, 4), dtype="<u2"),
        "filters": create(tmp_path / "filters", (8, 8), (4, 4), "<u2",
                          filters=[__import__("numcodecs").Delta(dtype="<u2")]),
        "empty chunks stored": stored,
    }  # fmt: skip
    for name, array in cases.items():
        assert ChunkWriter.of(array) is None, name
        chunk_writer.write(array, (slice(0, 8), slice(4, 8)), data[:, 4:])
        np.testing.assert_array_equal(array[:, 4:], data[:, 4:])
        assert not array[:, :4].any() or name == "fill"


@pytest.mark.parametrize(
    "region", [(slice(2, 8), slice(0, 8)), (slice(0, 6), slice(0, 8)), (slice(0, 8, 2),) * 2]
)
def test_a_region_off_the_chunk_grid_is_refused(tmp_path, region):
    writer = ChunkWriter.of(create(tmp_path / "a", (10, 8), (4, 4), "|u1"))
    shape = tuple(len(range(*s.indices(n))) for s, n in zip(region, (10, 8), strict=True))
    with pytest.raises(ValueError, match="not chunk-aligned"):
        writer.write(region, np.ones(shape, np.uint8))
    assert not files(tmp_path / "a")  # nothing written
