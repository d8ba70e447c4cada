"""Readers: every supported format and axes layout, lazy window reads, pickling, errors."""

from __future__ import annotations

import mmap
import pickle
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from imagefiles import downsample, write_ome_zarr, write_svs, write_tiff, write_zarr
from profiles import examples

from pipeline.errors import TilesegError
from pipeline.io.readers import ImageSpec, LazyImage, find_images, image_stem, open_image

RNG = np.random.default_rng(1234)


def random_image(shape: tuple[int, ...], dtype: str = "uint16") -> np.ndarray:
    info = np.iinfo(dtype)
    return RNG.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


def canonical(array: np.ndarray, axes: str) -> np.ndarray:
    """``array`` (native ``axes``) in the readers' canonical (C, [Z,] Y, X) order."""
    axes = axes.replace("S", "C")
    if "C" not in axes:
        array, axes = array[np.newaxis], "C" + axes
    return np.transpose(array, [axes.index(ax) for ax in "CZYX" if ax in axes])


def full(image: LazyImage) -> tuple[slice, ...]:
    return tuple(slice(0, n) for n in image.spatial_shape)


def assert_one_line_error(excinfo: pytest.ExceptionInfo[TilesegError], path: Path, *words: str):
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: "), message
    for word in words:
        assert word in message, message


# ----------------------------------------------------------------------------------- TIFF

TIFF_CASES = [
    # axes, shape, dtype, options
    ("YX", (150, 200), "uint8", {}),
    ("YX", (150, 200), "uint16", {"tile": None, "compression": "zlib", "rowsperstrip": 16}),
    ("YX", (150, 200), "uint16", {"tile": None}),  # one uncompressed strip: memory-mapped
    ("YXS", (150, 200, 3), "uint8", {"compression": "zlib"}),
    ("CYX", (2, 150, 200), "uint16", {"compression": "zlib", "bigtiff": True}),
    ("ZYX", (4, 100, 90), "uint8", {"tile": None}),
    ("CZYX", (3, 4, 100, 90), "uint16", {"compression": "zlib", "bigtiff": True}),
    ("ZCYX", (4, 2, 100, 90), "uint16", {}),
    ("ZYX", (4, 100, 90), "uint16", {"ome": False}),  # shaped "QYX": guessed ZYX
    ("CZYX", (2, 3, 100, 90), "uint8", {"ome": False, "tile": None}),  # "QQYX": guessed CZYX
]


@pytest.mark.parametrize(("axes", "shape", "dtype", "options"), TIFF_CASES)
def test_tiff_axes_and_layouts(tmp_path, axes, shape, dtype, options):
    data = random_image(shape, dtype)
    path = write_tiff(tmp_path / "img.tif", data, axes=axes, **options)
    expected = canonical(data, axes)
    with open_image(path) as image:
        assert image.spec.format == "tiff"
        assert image.axes == axes
        assert image.shape == shape
        assert image.dtype == np.dtype(dtype)
        assert image.spatial_axes == ("ZYX" if "Z" in axes else "YX")
        assert image.n_channels == expected.shape[0]
        assert image.spatial_shape == expected.shape[1:]
        assert image.n_levels == 1
        whole = image.read(full(image))
        np.testing.assert_array_equal(whole, expected)
        window = (slice(3, 77), slice(50, 90))
        if image.spatial_axes == "ZYX":
            window = (slice(1, 3), *window)
        np.testing.assert_array_equal(image.read(window), expected[(slice(None), *window)])
    if options.get("bigtiff"):
        with tifffile.TiffFile(path) as tif:
            assert tif.is_bigtiff


def test_read_returns_new_contiguous_array(tmp_path):
    data = random_image((64, 80))
    path = write_tiff(tmp_path / "strip.tif", data, axes="YX", tile=None)  # memory-mapped path
    image = open_image(path)
    out = image.read((slice(0, 10), slice(0, 80)))
    assert type(out) is np.ndarray and out.flags.c_contiguous and out.flags.writeable
    base = out
    while base is not None:  # not a view of the memory map
        assert not isinstance(base, (np.memmap, mmap.mmap))
        base = getattr(base, "base", None)
    image.close()
    np.testing.assert_array_equal(out, data[np.newaxis, :10])


def test_pyramidal_ome_tiff_levels_and_pixel_size(tmp_path):
    data = random_image((2, 3, 160, 200))
    path = write_tiff(
        tmp_path / "pyr.ome.tif",
        data,
        axes="CZYX",
        compression="zlib",
        pyramid_levels=2,
        pixel_size=(2.0, 0.5, 0.25),
    )
    image = open_image(path)
    assert image.n_levels == 3
    assert image.spec.level_shapes == ((3, 160, 200), (3, 80, 100), (3, 40, 50))
    assert image.pixel_size == pytest.approx((2.0, 0.5, 0.25))
    for level in range(3):
        lvl = open_image(path, level=level)
        same = image.at_level(level)
        assert lvl.spec == same.spec
        assert lvl.level == level
        assert lvl.pixel_size == pytest.approx((2.0, 0.5 * 2**level, 0.25 * 2**level))
        expected = canonical(downsample(data, "CZYX", level), "CZYX")
        np.testing.assert_array_equal(lvl.read(full(lvl)), expected)
        window = (slice(1, 2), slice(5, 33), slice(7, 40))
        np.testing.assert_array_equal(same.read(window), expected[(slice(None), *window)])
        lvl.close()
        same.close()
    image.close()


def test_svs_jpeg_pyramid(tmp_path):
    y, x = np.mgrid[0:192, 0:256]
    smooth = np.stack([x % 256, y % 256, (x + y) // 2 % 256], axis=-1).astype(np.uint8)
    path = write_svs(tmp_path / "slide.svs", smooth, tile=64, mpp=0.25, levels=2)
    image = open_image(path)
    assert (image.axes, image.n_channels, image.n_levels) == ("YXS", 3, 2)
    assert image.spec.level_shapes == ((192, 256), (96, 128))
    assert image.pixel_size == pytest.approx((0.25, 0.25))
    window = (slice(30, 130), slice(60, 200))
    decoded = tifffile.imread(path)  # tifffile's own decoding of level 0, for an exact check
    np.testing.assert_array_equal(image.read(window), canonical(decoded, "YXS")[:, 30:130, 60:200])
    error = np.abs(image.read(window).astype(int) - canonical(smooth, "YXS")[:, 30:130, 60:200])
    assert error.mean() < 2 and error.max() < 40  # JPEG is lossy
    low = image.at_level(1)
    assert low.pixel_size == pytest.approx((0.5, 0.5))
    expected = canonical(downsample(smooth, "YXS", 1), "YXS").astype(int)
    assert np.abs(low.read(full(low)).astype(int) - expected).mean() < 2
    image.close()
    low.close()


def test_tiff_resolution_tags_and_imagej_units(tmp_path):
    data = random_image((64, 96), "uint8")
    plain = write_tiff(tmp_path / "res.tif", data, axes="YX", ome=False, pixel_size=(0.5, 0.25))
    assert open_image(plain).pixel_size == pytest.approx((0.5, 0.25))
    tifffile.imwrite(tmp_path / "dpi.tif", data, resolution=(72, 72), resolutionunit="INCH")
    assert open_image(tmp_path / "dpi.tif").pixel_size is None  # screen default, not a calibration
    tifffile.imwrite(tmp_path / "none.tif", data, resolution=(1, 1), resolutionunit="NONE")
    assert open_image(tmp_path / "none.tif").pixel_size is None
    stack = random_image((3, 64, 96), "uint8")
    tifffile.imwrite(
        tmp_path / "ij.tif",
        stack,
        imagej=True,
        resolution=(2.0, 4.0),  # pixels per unit, X then Y
        metadata={"axes": "ZYX", "unit": "nm", "spacing": 300.0},
    )
    ij = open_image(tmp_path / "ij.tif")
    assert ij.axes == "ZYX"
    assert ij.pixel_size == pytest.approx((0.3, 0.25e-3, 0.5e-3))


def test_ome_tiff_units_converted(tmp_path):
    data = random_image((64, 96), "uint8")
    meta = {"axes": "YX", "PhysicalSizeX": 250.0, "PhysicalSizeXUnit": "nm"}
    meta |= {"PhysicalSizeY": 0.001, "PhysicalSizeYUnit": "mm"}
    tifffile.imwrite(tmp_path / "u.ome.tif", data, ome=True, metadata=meta)
    assert open_image(tmp_path / "u.ome.tif").pixel_size == pytest.approx((1.0, 0.25))


def test_tiff_squeezes_singletons_and_reads_other_series(tmp_path):
    data = random_image((1, 2, 64, 96))
    path = tmp_path / "t.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(data, metadata={"axes": "TCYX"}, tile=(32, 32))
        tif.write(data[0, 0], metadata={"axes": "YX"})
    image = open_image(path)
    assert (image.axes, image.spec.store_axes) == ("CYX", "CYX")
    np.testing.assert_array_equal(image.read(full(image)), data[0])
    second = open_image(path, series=1)
    assert second.axes == "YX"
    np.testing.assert_array_equal(second.read(full(second)), data[0, :1])


# ----------------------------------------------------------------------------------- Zarr


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize(
    ("shape", "override", "native", "canonical_axes"),
    [
        ((70, 90), None, "YX", "YX"),
        ((70, 90, 3), None, "YXS", "YXS"),  # guessed RGB
        ((5, 70, 90), None, "ZYX", "ZYX"),  # guessed stack
        ((5, 70, 90), "CYX", "CYX", "CYX"),
        ((70, 90, 5), "YXC", "YXC", "YXC"),  # transposed on read
        ((2, 3, 70, 90), None, "CZYX", "CZYX"),
        ((3, 2, 70, 90), "zcyx", "ZCYX", "ZCYX"),
        ((1, 3, 70, 90), "TCYX", "CYX", "CYX"),  # singleton T squeezed
        ((3, 1, 70, 90), "CYX", "CYX", "CYX"),  # letters for the non-singleton dims only
    ],
)
def test_zarr_arrays(tmp_path, zarr_format, shape, override, native, canonical_axes):
    data = random_image(shape, "uint16")
    chunks = (1,) * (len(shape) - 2) + (32, 32)
    path = write_zarr(tmp_path / "a.zarr", data, chunks=chunks, zarr_format=zarr_format)
    image = open_image(path, axes=override)
    assert image.spec.format == "zarr"
    assert image.axes == native
    assert image.pixel_size is None
    squeezed = data.reshape([n for n in shape if n != 1])
    expected = canonical(squeezed, canonical_axes)
    np.testing.assert_array_equal(image.read(full(image)), expected)
    window = tuple(slice(n // 3, n - 1) for n in image.spatial_shape)
    np.testing.assert_array_equal(image.read(window), expected[(slice(None), *window)])
    np.testing.assert_array_equal(
        pickle.loads(pickle.dumps(image)).read(window), image.read(window)
    )


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_levels_axes_and_pixel_size(tmp_path, version):
    data = random_image((1, 2, 3, 100, 130), "uint8")
    path = write_ome_zarr(
        tmp_path / "img.ome.zarr",
        data,
        axes="TCZYX",
        chunks=(1, 1, 1, 32, 32),
        levels=3,
        pixel_size=(2000.0, 500.0, 250.0),
        unit="nanometer",
        version=version,
    )
    image = open_image(path)
    assert image.spec.format == "ome-zarr"
    assert (image.axes, image.shape, image.n_levels) == ("CZYX", (2, 3, 100, 130), 3)
    assert image.spec.level_shapes == ((3, 100, 130), (3, 50, 65), (3, 25, 33))
    assert image.pixel_size == pytest.approx((2.0, 0.5, 0.25))
    for level in range(3):
        lvl = image.at_level(level)
        assert lvl.spec.dataset == str(level)
        assert lvl.pixel_size == pytest.approx((2.0, 0.5 * 2**level, 0.25 * 2**level))
        expected = canonical(downsample(data[0], "CZYX", level), "CZYX")
        np.testing.assert_array_equal(lvl.read(full(lvl)), expected)
        window = (slice(0, 2), slice(3, 20), slice(10, 31))
        np.testing.assert_array_equal(lvl.read(window), expected[(slice(None), *window)])


def test_ome_zarr_without_units_is_micrometres_and_level_option(tmp_path):
    data = random_image((64, 80), "uint16")
    path = write_ome_zarr(tmp_path / "a.ome.zarr", data, axes="YX", chunks=(32, 32), levels=2)
    image = open_image(path, level=1)
    assert image.pixel_size == pytest.approx((2.0, 2.0))
    np.testing.assert_array_equal(image.read(full(image))[0], data[::2, ::2])


def test_bioformats2raw_layout_series(tmp_path):
    root = tmp_path / "b2r.ome.zarr"
    zarr.open_group(str(root), mode="w", zarr_format=2).attrs["bioformats2raw.layout"] = 3
    images = [random_image((40, 50), "uint8"), random_image((2, 30, 20), "uint8")]
    write_ome_zarr(root / "0", images[0], axes="YX", chunks=(16, 16))
    write_ome_zarr(root / "1", images[1], axes="CYX", chunks=(1, 16, 16))
    for series, (data, axes) in enumerate(zip(images, ["YX", "CYX"], strict=True)):
        image = open_image(root, series=series)
        assert image.spec.dataset == f"{series}/0"
        np.testing.assert_array_equal(image.read(full(image)), canonical(data, axes))
    with pytest.raises(TilesegError, match="series 2 requested but the file has 2 series"):
        open_image(root, series=2)


def test_zarr_dimension_names_give_axes(tmp_path):
    data = random_image((70, 90, 4), "uint8")
    path = tmp_path / "named.zarr"
    zarr.create_array(
        str(path), shape=data.shape, chunks=(32, 32, 4), dtype=data.dtype, dimension_names="yxc"
    )[...] = data
    image = open_image(path)
    assert image.axes == "YXC"  # named, so not guessed as RGBA "YXS"
    np.testing.assert_array_equal(image.read(full(image)), canonical(data, "YXC"))


def test_reads_ome_zarr_written_by_ome_zarr_py(tmp_path):
    with warnings.catch_warnings():  # ome-zarr warns about its own deprecations on import
        warnings.simplefilter("ignore", DeprecationWarning)
        ome_format = pytest.importorskip("ome_zarr.format")
        ome_writer = pytest.importorskip("ome_zarr.writer")
    data = random_image((2, 64, 80), "uint8")
    for name, fmt in [
        ("v04.ome.zarr", ome_format.FormatV04()),
        ("v05.ome.zarr", ome_format.FormatV05()),
    ]:
        root = zarr.open_group(str(tmp_path / name), mode="w", zarr_format=fmt.zarr_format)
        ome_writer.write_image(
            data,
            root,
            axes="cyx",
            fmt=fmt,
            scale_factors=[2],
            storage_options={"chunks": (1, 32, 32)},
        )
        image = open_image(tmp_path / name)
        assert (image.axes, image.n_levels, image.pixel_size) == ("CYX", 2, (1.0, 1.0))
        np.testing.assert_array_equal(image.read(full(image)), data)
        low = image.at_level(1)
        assert low.pixel_size == (2.0, 2.0)
        stored = zarr.open_array(str(tmp_path / name), path=low.spec.dataset, mode="r")[...]
        np.testing.assert_array_equal(low.read(full(low)), stored)


# ------------------------------------------------------------------ random windows (hypothesis)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    data = random_image((2, 200, 260))
    path = tmp_path_factory.mktemp("hyp") / "pyr.ome.tif"
    write_tiff(path, data, axes="CYX", tile=(32, 48), compression="zlib", pyramid_levels=1)
    zpath = write_zarr(path.parent / "z.zarr", data.transpose(1, 2, 0), chunks=(33, 40, 2))
    return data, path, zpath


@settings(max_examples=examples(60), deadline=None)
@given(st.data())
def test_random_windows_match_numpy(pyramid, data):
    array, path, zpath = pyramid
    level = data.draw(st.integers(0, 1))
    expected = downsample(array, "CYX", level)
    image = open_image(path, level=level)
    window = []
    for n in expected.shape[1:]:
        start = data.draw(st.integers(0, n))
        window.append(slice(start, data.draw(st.integers(start, n))))
    window = tuple(window)
    np.testing.assert_array_equal(image.read(window), expected[(slice(None), *window)])
    if level == 0:
        zimage = open_image(zpath, axes="YXC")
        np.testing.assert_array_equal(zimage.read(window), expected[(slice(None), *window)])
    image.close()


# -------------------------------------------------------------------- laziness and pickling


def test_pickle_roundtrip_is_just_the_spec(tmp_path):
    data = random_image((3, 90, 110))
    path = write_tiff(tmp_path / "p.tif", data, axes="CYX", compression="zlib")
    image = open_image(path)
    image.read((slice(0, 5), slice(0, 5)))  # has an open handle now
    blob = pickle.dumps(image)
    assert len(blob) < 1000
    clone = pickle.loads(blob)
    assert isinstance(clone, LazyImage) and clone.spec == image.spec
    np.testing.assert_array_equal(clone.read((slice(10, 50), slice(20, 90))), data[:, 10:50, 20:90])
    spec = pickle.loads(pickle.dumps(image.spec))
    assert isinstance(spec, ImageSpec) and spec == image.spec
    clone.close()
    image.close()


def test_from_spec_opens_lazily_and_close_reopens(tmp_path):
    data = random_image((64, 64))
    path = write_tiff(tmp_path / "l.tif", data, axes="YX")
    spec = open_image(path).spec
    moved = tmp_path / "gone.tif"
    path.rename(moved)
    lazy = LazyImage.from_spec(spec)  # no I/O yet
    with pytest.raises(TilesegError, match="no such file"):
        lazy.read((slice(0, 1), slice(0, 1)))
    moved.rename(path)
    with lazy:
        np.testing.assert_array_equal(lazy.read((slice(0, 64), slice(0, 64)))[0], data)
    # closed by the with-block; reading again reopens
    np.testing.assert_array_equal(lazy.read((slice(5, 9), slice(0, 3)))[0], data[5:9, :3])
    lazy.close()


def test_concurrent_reads_use_one_handle_per_thread(tmp_path):
    data = random_image((256, 256))
    path = write_tiff(tmp_path / "c.tif", data, axes="YX", compression="zlib", tile=(32, 32))
    image = open_image(path)
    main_handle = image._handle()
    barrier = threading.Barrier(4)

    def read(i: int) -> tuple[bool, int]:
        barrier.wait()
        ok = True
        for j in range(10):
            y, x = (17 * i + 31 * j) % 200, (29 * i + 7 * j) % 200
            window = (slice(y, y + 56), slice(x, x + 56))
            ok &= np.array_equal(image.read(window)[0], data[window])
        handle = image._handle()
        barrier.wait()  # keep every thread (and its handle) alive until all have read
        return ok, id(handle)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(read, range(4)))
    assert all(ok for ok, _ in results)
    assert len({h for _, h in results} | {id(main_handle)}) == 5
    # Handles of finished threads are released with the threads; only this thread's remains.
    assert list(image._handles) == [main_handle]
    image.close()
    assert not list(image._handles)


# -------------------------------------------------------------- reads touch only the window


def test_tiff_read_touches_only_intersecting_tiles(tmp_path):
    data = random_image((256, 256))
    path = write_tiff(tmp_path / "t.tif", data, axes="YX", tile=(64, 64), compression="zlib")
    window = (slice(50, 100), slice(100, 150))  # tile rows 0-1, tile columns 1-2
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        offsets, counts = page.dataoffsets, page.databytecounts
        assert len(offsets) == 16
    raw = bytearray(path.read_bytes())
    for index, (offset, count) in enumerate(zip(offsets, counts, strict=True)):
        row, col = divmod(index, 4)
        if not (row in (0, 1) and col in (1, 2)):
            raw[offset : offset + count] = b"\xff" * count  # not a valid zlib stream
    path.write_bytes(bytes(raw))

    image = open_image(path)
    np.testing.assert_array_equal(image.read(window)[0], data[window])
    np.testing.assert_array_equal(
        image.read((slice(0, 128), slice(64, 192)))[0], data[:128, 64:192]
    )
    with pytest.raises(TilesegError) as excinfo:
        image.read((slice(120, 130), slice(0, 10)))
    assert_one_line_error(excinfo, image.path, "cannot read region y=120:130, x=0:10")
    image.close()


def test_zarr_read_touches_only_intersecting_chunks(tmp_path):
    data = random_image((2, 120, 120))
    path = write_zarr(tmp_path / "z.zarr", data, chunks=(1, 40, 40))
    window = (slice(45, 75), slice(0, 30))  # chunk rows 1, chunk column 0
    chunk_files = [p for p in path.rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert len(chunk_files) == 2 * 3 * 3
    for chunk in chunk_files:
        _, _, y, x = chunk.relative_to(path).parts
        if (int(y), int(x)) != (1, 0):
            chunk.unlink()
    image = open_image(path, axes="CYX")
    np.testing.assert_array_equal(image.read(window), data[:, 45:75, 0:30])
    # a window touching a missing chunk is an error, not silent fill values...
    with pytest.raises(TilesegError, match=r"chunk .* is missing"):
        image.read((slice(0, 10), slice(0, 10)))
    # ...unless the caller says the store omits all-fill chunks on purpose
    lenient = open_image(path, axes="CYX", allow_missing_chunks=True)
    assert not lenient.read((slice(0, 10), slice(0, 10))).any()
    assert pickle.loads(pickle.dumps(lenient)).read((slice(0, 10), slice(0, 10))).shape[0] == 2


# ----------------------------------------------------------------------------------- errors


def test_error_missing_path(tmp_path):
    path = tmp_path / "nope.tif"
    with pytest.raises(TilesegError) as excinfo:
        open_image(path)
    assert_one_line_error(excinfo, path, "no such file or directory")


def test_error_directory_not_zarr(tmp_path):
    path = tmp_path / "empty.zarr"
    path.mkdir()
    with pytest.raises(TilesegError) as excinfo:
        open_image(path)
    assert_one_line_error(excinfo, path, "neither a Zarr array nor an OME-Zarr image")


def test_error_zarr_group_without_multiscales(tmp_path):
    path = tmp_path / "g.zarr"
    zarr.open_group(str(path), mode="w")
    with pytest.raises(TilesegError) as excinfo:
        open_image(path)
    assert_one_line_error(excinfo, path, "multiscales")


def test_error_unknown_format(tmp_path):
    path = tmp_path / "img.lif"  # Leica's LIF: read by neither back-end
    path.write_bytes(b"\x70\x00\x00\x00" + bytes(100))
    with pytest.raises(TilesegError) as excinfo:
        open_image(path)
    assert_one_line_error(excinfo, path, "unknown image format '.lif'", "PNG/JPEG")


def test_tiff_header_without_tiff_extension_is_accepted(tmp_path):
    data = random_image((32, 32))
    path = write_tiff(tmp_path / "img.tif", data, axes="YX")
    path = path.rename(tmp_path / "img.dat")
    np.testing.assert_array_equal(open_image(path).read((slice(0, 32),) * 2)[0], data)


@pytest.mark.parametrize(
    "content", [b"", b"II*\x00", b"not a tiff at all" * 10, b"MM\x00*\x00\x00"]
)
def test_error_corrupt_tiff_header(tmp_path, content):
    path = tmp_path / "bad.tif"
    path.write_bytes(content)
    with pytest.raises(TilesegError) as excinfo:
        open_image(path)
    assert_one_line_error(excinfo, path, "TIFF")


@pytest.mark.parametrize(
    "options",
    [
        {"compression": "zlib", "tile": (32, 32)},  # tiles cut off
        {"compression": "zlib", "pyramid_levels": 1},  # a pyramid level's tiles cut off
        {"tile": None},  # uncompressed strips, memory-mapped
    ],
)
def test_error_truncated_tiff_on_open(tmp_path, options, caplog):
    """A cut copy is refused when it is opened (not at the first task reaching the missing
    data), with one line of ours and none of tifffile's warnings."""
    path = write_tiff(tmp_path / "cut.tif", random_image((128, 128)), axes="YX", **options)
    with tifffile.TiffFile(path) as tif:
        first_data_byte = min(tif.pages.first.dataoffsets)
    raw = path.read_bytes()
    path.write_bytes(raw[: first_data_byte + (len(raw) - first_data_byte) // 3])
    level = 1 if "pyramid_levels" in options else 0
    with pytest.raises(TilesegError) as excinfo:
        open_image(path, level=level)
    assert_one_line_error(excinfo, path, "truncated TIFF file")
    assert not [r for r in caplog.records if r.name == "tifffile"]


def test_error_level_out_of_range(tmp_path):
    data = random_image((64, 64))
    path = write_tiff(tmp_path / "p.tif", data, axes="YX", tile=(32, 32), pyramid_levels=1)
    with pytest.raises(TilesegError) as excinfo:
        open_image(path, level=3)
    assert_one_line_error(excinfo, path, "level 3 requested but the image has 2 levels (0-1)")
    single = write_zarr(tmp_path / "s.zarr", data, chunks=(32, 32))
    with pytest.raises(TilesegError, match=r"level 1 requested but the image has 1 level \(0\)"):
        open_image(single, level=1)
    ome = write_ome_zarr(tmp_path / "o.ome.zarr", data, axes="YX", chunks=(32, 32), levels=2)
    with pytest.raises(TilesegError, match=r"level 2 requested but the image has 2 levels \(0-1\)"):
        open_image(ome).at_level(2)
    with pytest.raises(TilesegError, match="series 1 requested"):
        open_image(path, series=1)


def test_error_unsupported_axes(tmp_path):
    timelapse = random_image((3, 32, 32))
    path = tmp_path / "t.ome.tif"
    tifffile.imwrite(path, timelapse, ome=True, metadata={"axes": "TYX"})
    with pytest.raises(TilesegError) as excinfo:
        open_image(path)
    assert_one_line_error(excinfo, path, "unsupported axes TYX")
    five = write_zarr(tmp_path / "five.zarr", random_image((2, 2, 2, 8, 8)), chunks=(1, 1, 1, 8, 8))
    with pytest.raises(TilesegError, match="unsupported axes"):
        open_image(five)
    with pytest.raises(TilesegError, match="unsupported axes"):
        open_image(five, axes="TCZYX")
    with pytest.raises(TilesegError, match="unsupported axes"):
        open_image(tmp_path / "five.zarr", axes="CSZYX")  # two channel axes
    with pytest.raises(TilesegError, match="invalid axes"):
        open_image(five, axes="CCZYX")
    with pytest.raises(TilesegError, match="have 3 letters"):
        open_image(five, axes="ZYX")


def test_error_zero_size_image(tmp_path):
    path = write_zarr(tmp_path / "zero.zarr", np.zeros((0, 16), "uint8"), chunks=(8, 8))
    with pytest.raises(TilesegError) as excinfo:
        open_image(path)
    assert_one_line_error(excinfo, path, "zero-size image")


def test_error_corrupt_zarr_chunk(tmp_path):
    path = write_zarr(tmp_path / "z.zarr", random_image((64, 64)), chunks=(32, 32))
    chunk = next(p for p in path.rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(b"garbage")
    image = open_image(path)
    with pytest.raises(TilesegError) as excinfo:
        image.read((slice(0, 64), slice(0, 64)))
    assert_one_line_error(excinfo, image.path, "cannot read region y=0:64, x=0:64")


def test_invalid_region_is_a_value_error(tmp_path):
    image = open_image(write_zarr(tmp_path / "z.zarr", random_image((16, 16)), chunks=(8, 8)))
    for region in [(slice(0, 4),), (slice(0, 17), slice(0, 4)), (slice(0, 4, 2), slice(0, 4))]:
        with pytest.raises(ValueError):
            image.read(region)
    assert image.read((slice(3, 3), slice(0, 16))).shape == (1, 0, 16)


# ------------------------------------------------------------------------ directory helpers


def test_find_images_and_image_stem(tmp_path):
    for name in ["b.tif", "a.ome.tiff", "c.SVS", "d.btf", "e.tf8", ".hidden.tif", "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    for name in ["f.zarr", "g.ome.zarr", ".h.zarr", "plain_dir"]:
        (tmp_path / name).mkdir()
    (tmp_path / "x.zarr").write_bytes(b"")  # a file, not a Zarr directory
    found = [p.name for p in find_images(tmp_path)]
    assert found == ["a.ome.tiff", "b.tif", "c.SVS", "d.btf", "e.tf8", "f.zarr", "g.ome.zarr"]
    with pytest.raises(TilesegError, match="no such file"):
        find_images(tmp_path / "missing")
    with pytest.raises(TilesegError, match="not a directory"):
        find_images(tmp_path / "b.tif")

    assert image_stem("slide.ome.tif") == "slide"
    assert image_stem("/data/a.ome.zarr/") == "a"
    assert image_stem(Path("x.svs")) == "x"
    assert image_stem("scan.v2.OME.TIFF") == "scan.v2"
    assert image_stem("b.zarr") == "b"
    assert image_stem("weird.name") == "weird"


def test_explicit_singleton_z_is_kept(tmp_path):
    """A one-plane volume named ZYX stays 3-D (for 3-D models); unnamed singletons go."""
    data = np.arange(30, dtype=np.uint8).reshape(1, 5, 6)
    path = write_zarr(tmp_path / "v.zarr", data, chunks=(1, 5, 6))
    assert open_image(path, axes="ZYX").spatial_shape == (1, 5, 6)
    assert open_image(path).spatial_shape == (5, 6)
