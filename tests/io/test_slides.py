"""OpenSlide back-end: real files read by OpenSlide and by tifffile agree pixel for pixel; the
choice of back-end, directory discovery, associated images and bad slides."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from imagefiles import downsample, write_svs, write_tiff
from outputs import chunk_files
from PIL import Image

import pipeline
from pipeline.cli.main import main
from pipeline.config import SegmentOptions
from pipeline.engine.driver import segment_image
from pipeline.errors import TilesegError
from pipeline.io.chunk_cache import CHUNKS
from pipeline.io.readers import choose_reader, find_images, image_stem, open_image
from pipeline.io.slides import associated_images, composite_rgba
from pipeline.models import UNetConfig, save_unet, seeded_unet
from pipeline.output.ngff import read_record

RGB = np.random.default_rng(22).integers(0, 256, (300, 410, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An Aperio-style SVS and a generic tiled TIFF, both lossless (zlib) so that the two
    back-ends' decoders must agree exactly."""
    d = tmp_path_factory.mktemp("slides")
    svs = write_svs(d / "aperio.svs", RGB, tile=64, levels=3, mpp=0.25, compression="zlib")
    tif = write_tiff(d / "generic.tif", RGB, axes="YXS", tile=(64, 64), compression="zlib",
                     ome=False)  # fmt: skip
    return {"svs": svs, "tif": tif}


def full(image):
    return tuple(slice(0, n) for n in image.spatial_shape)


@pytest.mark.parametrize("kind", ["svs", "tif"])
def test_openslide_and_tifffile_read_the_same_pixels(files, kind):
    path = files[kind]
    assert choose_reader(path) == "tifffile"
    by_tifffile = open_image(path)
    by_openslide = open_image(path, reader="openslide")
    assert (by_tifffile.reader, by_openslide.reader) == ("tifffile", "openslide")
    assert by_openslide.level_shapes == by_tifffile.level_shapes
    assert by_openslide.pixel_size == by_tifffile.pixel_size
    for level in range(by_tifffile.n_levels):
        a, b = by_tifffile.at_level(level), by_openslide.at_level(level)
        assert b.reader == "openslide" and b.axes == "YXS"
        expected = np.moveaxis(downsample(RGB, "YXS", level), -1, 0)
        np.testing.assert_array_equal(a.read(full(a)), expected)
        np.testing.assert_array_equal(b.read(full(b)), expected)


@settings(max_examples=25, deadline=None)
@given(y0=st.integers(0, 299), x0=st.integers(0, 409), h=st.integers(0, 300),
       w=st.integers(0, 410))  # fmt: skip
def test_any_window_equals_the_same_window_of_the_whole(files, y0, x0, h, w):
    image = open_image(files["svs"], reader="openslide")
    region = (slice(y0, min(y0 + h, 300)), slice(x0, min(x0 + w, 410)))
    np.testing.assert_array_equal(image.read(region), np.moveaxis(RGB[region], -1, 0))


def test_each_cache_tile_is_decoded_once(files):
    CHUNKS.clear()
    image = open_image(files["svs"], reader="openslide")
    for _ in range(2):
        for y in range(0, 300, 50):
            image.read((slice(y, min(y + 90, 300)), slice(0, 410)))
    tiles = image.chunk_shape
    assert CHUNKS.decodes == -(-300 // tiles[0]) * -(-410 // tiles[1])


def test_associated_images_are_rgb_arrays(files):
    images = associated_images(files["svs"])
    np.testing.assert_array_equal(images["thumbnail"], downsample(RGB, "YXS", 2))


def test_transparent_pixels_composite_over_the_background():
    rgba = np.array([[[10, 20, 30, 255], [200, 100, 50, 0], [255, 0, 128, 128]]], np.uint8)
    out = composite_rgba(rgba, (255, 255, 255))
    expected = np.round((rgba[..., :3] * (rgba[..., 3:] / 255)) + 255 * (1 - rgba[..., 3:] / 255))
    np.testing.assert_array_equal(out, expected.astype(np.uint8))
    assert out[0, 1].tolist() == [255, 255, 255]


def test_vendor_extensions_go_to_openslide_and_directories_find_them(tmp_path):
    for name in ("a.ndpi", "b.mrxs", "c.scn", "d.bif", "e.vms", "f.svslide", "x.tif"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "b").mkdir()  # MIRAX data folder: part of b.mrxs, not a slide
    (tmp_path / "b" / "Slidedat.ini").write_text("[GENERAL]\n")
    dicom = tmp_path / "dicom-slide"
    dicom.mkdir()
    (dicom / "level-0.dcm").write_bytes(b"")
    (tmp_path / "loose.dcm").write_bytes(b"")  # one file of a series: found with its folder
    found = [p.name for p in find_images(tmp_path)]
    assert found == ["a.ndpi", "b.mrxs", "c.scn", "d.bif", "dicom-slide", "e.vms",
                     "f.svslide", "x.tif"]  # fmt: skip
    assert choose_reader(tmp_path / "a.ndpi") == "openslide"
    assert choose_reader(dicom) == "openslide"
    assert image_stem(tmp_path / "a.ndpi") == "a" and image_stem(dicom) == "dicom-slide"


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("bad.ndpi", b"not a slide at all", "not a slide format OpenSlide reads"),
        ("bad.xyz", b"not a slide at all", "unknown image format '.xyz'"),
        ("folder/bad.dcm", b"DICM" * 64, "not a slide format OpenSlide reads"),
    ],
)
def test_bad_slides_are_one_line(tmp_path, name, content, problem):
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content)
    target = path.parent if name.startswith("folder/") else path
    with pytest.raises(TilesegError) as excinfo:
        open_image(target)
    message = str(excinfo.value)
    assert "\n" not in message and message.startswith(f"{target}: ") and problem in message


def test_corrupt_tile_data_names_the_region(tmp_path):
    path = write_svs(tmp_path / "s.svs", RGB, tile=64, compression="zlib")
    data = bytearray(path.read_bytes())
    # The middle of the file lies in some tile's deflate stream.
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    image = open_image(path, reader="openslide")
    with pytest.raises(TilesegError, match=r"s\.svs: cannot read region y=0:300, x=0:410"):
        image.read(full(image))


def rgb_model(tmp_path):
    path = tmp_path / "rgb.safetensors"
    save_unet(seeded_unet(UNetConfig(depth=2, width=4, in_channels=3, classes=2), seed=0), path)
    return str(path)


def test_a_slide_read_by_openslide_segments_as_by_tifffile(tmp_path, files, monkeypatch):
    model = rgb_model(tmp_path)
    options = SegmentOptions(model=model, tile=64, chunk=64)
    segment_image(files["svs"], tmp_path / "tifffile.zarr", options)
    assert read_record(tmp_path / "tifffile.zarr")["reader"] == "tifffile"
    monkeypatch.setattr("pipeline.io.readers.TIFFFILE_VENDORS", frozenset())  # Aperio too
    segment_image(files["svs"], tmp_path / "openslide.zarr", options)
    record = read_record(tmp_path / "openslide.zarr")
    assert record["reader"] == "openslide" and record["status"] == "complete"
    assert chunk_files(tmp_path / "openslide.zarr") == chunk_files(tmp_path / "tifffile.zarr")


def test_directory_run_fails_a_bad_slide_alone(tmp_path, files, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "good.svs").write_bytes(files["svs"].read_bytes())
    (src / "broken.ndpi").write_bytes(b"II*\x00 cut short")
    out = tmp_path / "out"
    args = ["segment", str(src), str(out), "--model", rgb_model(tmp_path), "--tile", "64",
            "--chunk", "64", "--no-progress"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "broken.ndpi" in err and "Traceback" not in err
    assert read_record(out / "good.zarr")["status"] == "complete"
    assert read_record(out / "broken.zarr") is None


# ------------------------------------------------ OpenSlide's own test slides (tests/data)

FIXTURES = Path(__file__).parents[1] / "data" / "openslide"


@pytest.mark.parametrize("name", ["small.svs", "boxes.tiff"])
def test_real_slides_read_the_same_through_both_back_ends(name):
    """A real Aperio SVS (JPEG tiles) and a generic pyramidal TIFF: pixel for pixel, every
    level, with the pixel size and pyramid each back-end reads."""
    by_tifffile = open_image(FIXTURES / name)
    by_openslide = open_image(FIXTURES / name, reader="openslide")
    assert by_tifffile.reader == "tifffile"
    assert by_openslide.level_shapes == by_tifffile.level_shapes
    assert by_openslide.pixel_size == pytest.approx(by_tifffile.pixel_size)
    for level in range(by_tifffile.n_levels):
        a, b = by_tifffile.at_level(level), by_openslide.at_level(level)
        np.testing.assert_array_equal(b.read(full(b)), a.read(full(a)))


def test_a_real_generic_tiff_reads_as_its_png():
    image = open_image(FIXTURES / "boxes.tiff", reader="openslide")
    png = np.asarray(Image.open(FIXTURES / "boxes.png").convert("RGB"))
    np.testing.assert_array_equal(np.moveaxis(image.read(full(image)), 0, -1), png)


def test_a_real_dicom_slide_reads_as_the_svs_it_was_made_from(tmp_path):
    folder = tmp_path / "dicom"
    folder.mkdir()
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        shutil.copy(FIXTURES / name, folder / name)
    svs = open_image(FIXTURES / "small.svs")
    for target in (folder, folder / "boxes_0.dcm"):
        dicom = open_image(target)
        assert dicom.reader == "openslide" and dicom.pixel_size == pytest.approx((0.499, 0.499))
        np.testing.assert_array_equal(dicom.read(full(dicom)), svs.read(full(svs)))
    assert find_images(tmp_path) == [folder]


def test_real_unreadable_and_unopenable_slides_are_one_line(tmp_path, capsys):
    for reader in ("tifffile", "openslide"):
        image = open_image(FIXTURES / "unreadable.svs", reader=reader)
        with pytest.raises(TilesegError, match=r"unreadable\.svs: cannot read region y=0:16"):
            image.read(full(image))
    with pytest.raises(TilesegError, match=r"OpenSlide cannot read the slide .*compression"):
        open_image(FIXTURES / "unopenable.tiff", reader="openslide")
    shutil.copy(FIXTURES / "unreadable.svs", tmp_path / "unreadable.svs")
    out = tmp_path / "out.zarr"
    assert main(["segment", str(tmp_path / "unreadable.svs"), str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("tileseg: error: ") and "cannot read region" in err[-1]


def test_a_dicom_folder_is_one_slide_for_the_cli(tmp_path):
    """Not a directory of images: one output, read through OpenSlide, its H&E-like RGB
    through the haematoxylin channel into a one-channel model."""
    folder = tmp_path / "dicom"
    folder.mkdir()
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        shutil.copy(FIXTURES / name, folder / name)
    model = tmp_path / "grey.safetensors"
    save_unet(seeded_unet(UNetConfig(depth=1, width=4, in_channels=1, classes=2), seed=0), model)
    out = tmp_path / "out.zarr"
    args = ["segment", str(folder), str(out), "--model", str(model), "--tile", "16",
            "--chunk", "16", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    record = read_record(out)
    assert record["status"] == "complete" and record["reader"] == "openslide"
    assert record["normalization"]["stain"]["method"] == "ruifrok-johnston"  # 256 px: too few


# ------------------------------------------------ a real H&E slide shipped with the package

CMU = Path(pipeline.__file__).parent / "data" / "cmu-small-region.svs"


def test_the_shipped_he_slide_reads_the_same_through_both_back_ends():
    """A 2220 x 2967 region of OpenSlide's CMU-1 Aperio slide (JPEG tiles, 20x): every level
    equal pixel for pixel, its MPP as the scanner wrote it, its thumbnail as tifffile reads it."""
    by_tifffile = open_image(CMU)
    by_openslide = open_image(CMU, reader="openslide")
    assert (by_tifffile.reader, by_openslide.reader) == ("tifffile", "openslide")
    assert by_tifffile.level_shapes == by_openslide.level_shapes
    assert by_tifffile.level_shapes[0] == (2967, 2220)
    for image in (by_tifffile, by_openslide):
        assert image.pixel_size == pytest.approx((0.499, 0.499))
    for level in range(by_tifffile.n_levels):
        a, b = by_tifffile.at_level(level), by_openslide.at_level(level)
        pixels = a.read(full(a))
        assert pixels.shape == (3, *a.spatial_shape) and pixels.dtype == np.uint8
        np.testing.assert_array_equal(b.read(full(b)), pixels)
    thumbnail = associated_images(CMU)["thumbnail"]
    with tifffile.TiffFile(CMU) as tif:
        np.testing.assert_array_equal(thumbnail, tif.pages[1].asarray())
