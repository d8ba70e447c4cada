"""Plain PNG/JPEG images (pipeline/io/flat.py): real files that scikit-image ships, read as
Pillow decodes them, segmented exactly, and refused in one line when broken."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import skimage
import tifffile
from exactness import check, make_model, reference, run
from PIL import Image

from pipeline.cli.main import main
from pipeline.errors import TilesegError
from pipeline.io import flat
from pipeline.io.readers import choose_reader, find_images, open_image
from pipeline.models import UNetConfig
from pipeline.output.provenance import read_record

DATA = Path(skimage.__file__).parent / "data"


@pytest.mark.parametrize(
    ("name", "channels"), [("coins.png", 1), ("astronaut.png", 3), ("retina.jpg", 3)]
)
def test_real_png_and_jpeg_read_as_pillow_decodes_them(name, channels):
    path = DATA / name
    expected = np.asarray(Image.open(path))
    image = open_image(path)
    assert (image.reader, image.n_channels, image.level_shapes) == (
        "pillow", channels, ((expected.shape[0], expected.shape[1]),)
    )  # fmt: skip
    assert image.pixel_size is None  # a JPEG's or PNG's dpi is a screen's
    window = (slice(17, 140), slice(5, 201))
    got = image.read(window)
    want = expected[window] if channels == 1 else np.moveaxis(expected[window], -1, 0)
    np.testing.assert_array_equal(got.reshape(want.shape), want)
    # a worker reopens it from its spec
    again = pickle.loads(pickle.dumps(image))
    np.testing.assert_array_equal(again.read(window), got)


def test_modes_sixteen_bit_palette_and_transparency(tmp_path):
    grey = (np.arange(40 * 30, dtype=np.uint16) * 50).reshape(40, 30)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    image = open_image(tmp_path / "g16.png")
    assert image.dtype == np.uint16
    np.testing.assert_array_equal(image.read((slice(None), slice(None)))[0], grey)

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[:4, ..., 3], rgba[4:, ..., 3] = 200, 255, 0  # red; bottom half clear
    Image.fromarray(rgba).save(tmp_path / "a.png")
    rgb = open_image(tmp_path / "a.png").read((slice(None), slice(None)))
    assert rgb.shape == (3, 8, 8)
    assert rgb[:, 0, 0].tolist() == [200, 0, 0] and rgb[:, 7, 7].tolist() == [255, 255, 255]

    Image.fromarray(rgba[..., :3]).convert("P").save(tmp_path / "p.png")
    assert open_image(tmp_path / "p.png").n_channels == 3


def test_a_png_segments_exactly_as_the_same_pixels_in_a_tiff(tmp_path):
    pixels = np.asarray(Image.open(DATA / "coins.png"))
    tifffile.imwrite(tmp_path / "coins.tif", pixels)
    model = make_model(tmp_path, UNetConfig(ndim=2, in_channels=1, classes=2, depth=2, width=4))
    options = {"model": model, "tile": 96}
    probs, labels = run(DATA / "coins.png", tmp_path / "png.zarr", **options)
    probs_tif, labels_tif = run(tmp_path / "coins.tif", tmp_path / "tif.zarr", **options)
    np.testing.assert_array_equal(probs, probs_tif)
    np.testing.assert_array_equal(labels, labels_tif)
    check(probs, labels, reference(model, pixels[None]))


def test_a_broken_png_is_one_line_and_exit_2_and_works_once_fixed(tmp_path, capsys):
    good = DATA / "coins.png"
    broken = tmp_path / "cut.png"
    broken.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(TilesegError) as excinfo:
        open_image(broken)
    message = str(excinfo.value)
    assert message.startswith(f"{broken}: cannot decode the image") and "\n" not in message
    out = tmp_path / "out.zarr"
    args = ["segment", str(broken), str(out), "--no-progress", "--tile", "128"]
    assert main(args) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"tileseg: error: {message}"]
    assert not out.exists()
    broken.write_bytes(good.read_bytes())
    assert main(args) == 0
    assert read_record(out)["status"] == "complete"


def test_too_many_pixels_to_decode_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(flat, "MAX_PIXELS", 1000)
    flat._decoded.cache_clear()
    with pytest.raises(TilesegError, match=r"303x384 px is too large .* tiled \(OME-\)TIFF"):
        open_image(DATA / "coins.png")
    flat._decoded.cache_clear()


def test_directories_find_plain_images(tmp_path):
    for name in ["a.png", "b.JPG", "c.jpeg", "d.tif", "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in find_images(tmp_path)] == ["a.png", "b.JPG", "c.jpeg", "d.tif"]
    assert choose_reader(tmp_path / "b.JPG") == "pillow"
