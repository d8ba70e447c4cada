"""Multichannel fluorescence into a model of fewer channels: ``--channels`` by name or index,
the nuclear stain picked for a one-channel model, exact like any run, recorded and in the
fingerprint; an RGB fluorescence composite is not taken for H&E."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from exactness import check, make_model, reference, run
from imagefiles import write_ome_zarr, write_tiff
from PIL import Image

from pipeline.cli.main import main
from pipeline.config import SegmentOptions
from pipeline.engine.driver import expected_fingerprint
from pipeline.io.readers import open_image
from pipeline.models import UNetConfig
from pipeline.output.ngff import LABELS_PATH, read_record
from pipeline.preprocess.stain import is_brightfield, stain_step
from pipeline.synthetic.render import SyntheticConfig, synthetic_pair

AUTO = "auto: named as a nuclear stain"


@pytest.fixture(scope="module")
def nuclei():
    """A fluorescence field of nuclei (uint16) and its instance labels."""
    return synthetic_pair((192, 192), config=SyntheticConfig(kind="fluorescence", seed=5))


@pytest.fixture
def two(tmp_path, nuclei):
    """An OME-TIFF of channels FITC (another pattern) and DAPI (the nuclei), and a
    one-channel file of the DAPI pixels alone."""
    dapi = nuclei[0].astype(np.uint16)
    fitc = np.random.default_rng(0).integers(0, 3000, dapi.shape, dtype=np.uint16)
    two = write_tiff(tmp_path / "two.ome.tif", np.stack([fitc, dapi]), axes="CYX",
                     channel_names=["FITC", "DAPI"])  # fmt: skip
    alone = write_tiff(tmp_path / "dapi.tif", dapi, axes="YX")
    return two, alone


def segment(*args: object) -> int:
    return main(["segment", *map(str, args), "--no-progress", "--save-probabilities",
                 "--probability-dtype", "float32"])  # fmt: skip


def arrays(output) -> tuple[np.ndarray, np.ndarray]:
    root = zarr.open_group(output, mode="r")
    return root["0"][...], root[f"{LABELS_PATH}/0"][...]


def test_the_nuclear_stain_by_name_index_or_auto_is_the_one_channel_file(
    tmp_path, two, nuclei, capsys
):
    """The default model on two channels: DAPI is picked, and every way of choosing it gives
    the pixels of a run on a file holding DAPI alone (normalisation, object-size check and
    all), recorded as chosen."""
    path, alone = two
    assert segment(alone, tmp_path / "alone.zarr") == 0
    expected = arrays(tmp_path / "alone.zarr")
    assert segment(path, tmp_path / "auto.zarr") == 0
    record = read_record(tmp_path / "auto.zarr")
    assert record["channels"] == {"indices": [1], "names": ["DAPI"], "chosen": AUTO}
    assert read_record(tmp_path / "alone.zarr")["channels"] is None
    for got, want in zip(arrays(tmp_path / "auto.zarr"), expected, strict=True):
        np.testing.assert_array_equal(got, want)
    assert segment(path, tmp_path / "named.zarr", "--channels", "dapi") == 0
    assert read_record(tmp_path / "named.zarr")["channels"]["chosen"] == "--channels dapi"
    for got, want in zip(arrays(tmp_path / "named.zarr"), expected, strict=True):
        np.testing.assert_array_equal(got, want)
    # The same channel by index is the same output: found complete, not redone
    capsys.readouterr()
    assert segment(path, tmp_path / "named.zarr", "--channels", "1") == 0
    assert capsys.readouterr().out.strip().endswith("(skipped)")
    # Another channel is another output: refused without --overwrite
    assert segment(path, tmp_path / "named.zarr", "--channels", "FITC") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different input, model or configuration" in err[0]
    found, true = expected[1] > 0, nuclei[1] > 0
    assert 2 * (found & true).sum() / (found.sum() + true.sum()) > 0.8


def test_the_fingerprint_is_the_channels_read(two):
    path, _ = two
    options = SegmentOptions()
    auto = expected_fingerprint(path, options)
    by_name = expected_fingerprint(path, SegmentOptions(channels="DAPI"))
    by_index = expected_fingerprint(path, SegmentOptions(channels="1"))
    other = expected_fingerprint(path, SegmentOptions(channels="FITC"))
    assert auto == by_name == by_index != other


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        (["--channels", "CD45"], "--channels CD45: no channel named 'CD45' (channels: 0 FITC, "
         "1 DAPI); give channel names or indices"),
        (["--channels", "2"], "--channels 2: no channel 2 (channels: 0 FITC, 1 DAPI)"),
        (["--channels", "FITC,DAPI"], "--channels FITC,DAPI chooses 2 channel(s) (0 FITC, "
         "1 DAPI) but the model"),
        (["--channels", "DAPI", "--model", "{model2}"], "--channels DAPI chooses 1 channel(s) "
         "(1 DAPI) but the model"),
    ],
)  # fmt: skip
def test_bad_channels_are_one_line(tmp_path, two, capsys, flags, problem):
    path, _ = two
    model2 = make_model(tmp_path, UNetConfig(in_channels=2, depth=1, width=2, padding="same"))
    flags = [f.format(model2=model2) for f in flags]
    assert main(["segment", str(path), str(tmp_path / "o.zarr"), "--no-progress", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tileseg: error: {path}: {problem}"), err
    assert not (tmp_path / "o.zarr").exists()


def test_more_channels_than_a_model_takes_are_listed(tmp_path, capsys):
    data = np.random.default_rng(2).integers(0, 3000, (3, 64, 64), dtype=np.uint16)
    path = write_tiff(tmp_path / "m.tif", data, axes="CYX", ome=False)
    model2 = make_model(tmp_path, UNetConfig(in_channels=2, depth=1, width=2, padding="same"))
    flags = ["--model", model2, "--axes", "CYX", "--no-progress"]
    assert main(["segment", str(path), str(tmp_path / "o.zarr"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(
        "expects 2 (channels: 0 (no name), 1 (no name), 2 (no name); choose with --channels "
        "NAME|INDEX,...)"
    ), err
    assert main(["segment", str(path), str(tmp_path / "o.zarr"), *flags, "--channels", "2,0"]) == 0
    assert read_record(tmp_path / "o.zarr")["channels"]["indices"] == [2, 0]
    # the overview (a small image's is the image) holds the channels chosen
    np.testing.assert_array_equal(zarr.open_group(tmp_path / "o.zarr")["0"][...], data[[2, 0]])


def test_no_nuclear_stain_is_one_line_asking_for_channels(tmp_path, capsys):
    data = np.random.default_rng(2).integers(0, 3000, (3, 96, 96), dtype=np.uint16)
    path = write_ome_zarr(tmp_path / "m.zarr", data, axes="CYX", chunks=(1, 32, 32),
                          version="0.5", channel_names=["CD3", "CD8", "CD20"])  # fmt: skip
    assert main(["segment", str(path), str(tmp_path / "o.zarr"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"{path}: 3 channels (0 CD3, 1 CD8, 2 CD20) and the model" in err[0]
    assert err[0].endswith("none is named as a nuclear stain (DAPI, Hoechst, DRAQ5, ...); "
                           "choose it with --channels NAME|INDEX")  # fmt: skip


@pytest.mark.parametrize(
    ("ndim", "in_channels", "chosen", "indices"),
    [(2, 1, "Hoechst", [1]), (2, 2, "cy5,0", [2, 0]), (3, 1, None, [1])],
)
def test_tiled_equals_whole_image_on_the_channels_chosen(
    tmp_path, ndim, in_channels, chosen, indices
):
    """Exactness holds on the channels chosen: tiled runs over the file's channel planes
    equal one pass over those channels in memory."""
    config = UNetConfig(ndim=ndim, in_channels=in_channels, depth=1, width=2, padding="valid")
    model = make_model(tmp_path, config, seed=3)
    shape = (3, 12, 40, 44) if ndim == 3 else (3, 70, 90)
    image = np.random.default_rng(4).normal(size=shape).astype(np.float32)
    names = ["FITC", "Hoechst 33342" if ndim == 2 else "DAPI", "Cy5"]
    if ndim == 3:
        path = write_ome_zarr(tmp_path / "in.zarr", image, axes="CZYX", chunks=(1, 5, 16, 16),
                              channel_names=names)  # fmt: skip
        tile, chunk = 16, 8
    else:
        path = write_tiff(tmp_path / "in.ome.tif", image, axes="CYX", channel_names=names)
        tile, chunk = 32, 16
    options = {} if chosen is None else {"channels": chosen}
    probs, labels = run(path, tmp_path / "out.zarr", model=model, tile=tile, chunk=chunk,
                        **options)  # fmt: skip
    check(probs, labels, reference(model, image[indices]))
    assert read_record(tmp_path / "out.zarr")["channels"]["indices"] == indices


def test_rgb_fluorescence_is_not_haematoxylin(tmp_path, nuclei, capsys):
    """DAPI in the blue of an RGB picture, on a dark background: not brightfield, so no colour
    deconvolution; the one-channel model asks which channel, and takes blue by name or index."""
    blue = (nuclei[0].astype(np.float64) / nuclei[0].max() * 255).astype(np.uint8)
    rgb = np.stack([blue // 8, np.zeros_like(blue), blue], axis=-1)
    path = tmp_path / "fluo.png"
    Image.fromarray(rgb).save(path)
    with open_image(path) as image:
        assert not is_brightfield(image)
        assert stain_step("auto", image, 1) is None and stain_step("auto", image, 3) is None
    assert main(["segment", str(path), str(tmp_path / "o.zarr"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 channels (0 red, 1 green, 2 blue) and the model" in err[0]
    assert "--channels NAME|INDEX" in err[0]
    assert segment(path, tmp_path / "blue.zarr", "--channels", "blue") == 0
    record = read_record(tmp_path / "blue.zarr")
    assert record["channels"]["names"] == ["blue"] and record["normalization"].get("stain") is None
    assert segment(path, tmp_path / "two.zarr", "--channels", "2") == 0
    for got, want in zip(arrays(tmp_path / "two.zarr"), arrays(tmp_path / "blue.zarr"),
                         strict=True):  # fmt: skip
        np.testing.assert_array_equal(got, want)
    found, true = arrays(tmp_path / "blue.zarr")[1] > 0, nuclei[1] > 0
    assert 2 * (found & true).sum() / (found.sum() + true.sum()) > 0.8


def test_the_qc_picture_shows_the_channels_segmented(tmp_path, two):
    """A directory run's QC picture of a run with no overview (probabilities at the root) is
    drawn from the input's channels the run read, not from the file's first channels."""
    from flows.core import SlideJob, qc_path, write_qc
    from pipeline.output.qc import overlay_png

    path, _ = two
    out = tmp_path / "out" / "two.zarr"
    assert segment(path, out, "--channels", "DAPI") == 0
    png = write_qc(SlideJob(path, out), SegmentOptions(channels="DAPI"))
    with open_image(path) as image:  # DAPI chosen by hand
        expected = overlay_png(image.with_channels((1,)), out, tmp_path / "dapi.png", max_side=1024)
    assert png == str(qc_path(SlideJob(path, out)))
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(expected)))
