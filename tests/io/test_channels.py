"""Channels by name or index: the file's names, the selection read as part of the image (by
every reader, level, view and process), and the one-line refusals."""

from __future__ import annotations

import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imagefiles import write_ome_zarr, write_tiff, write_zarr
from profiles import examples

from pipeline.errors import TilesegError
from pipeline.io.channels import auto_channel, nuclear_channels, select_channels
from pipeline.io.readers import open_image
from pipeline.io.resolution import at_scale

NAMES = ("FITC", "DAPI (405)", "Cy5")
WHOLE = (slice(None), slice(None))


def stack(shape=(3, 2, 40, 48), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4000, shape, dtype=np.uint16)


@pytest.fixture(params=["ome-tiff", "ome-zarr-0.4", "ome-zarr-0.5", "imagej"])
def named(request, tmp_path):
    """A CZYX image with three named channels, in each format that names channels."""
    data = stack()
    if request.param == "ome-tiff":
        path = write_tiff(tmp_path / "a.ome.tif", data, axes="CZYX", channel_names=NAMES,
                          pyramid_levels=1)  # fmt: skip
    elif request.param == "imagej":
        path = tmp_path / "a.tif"  # ImageJ stores planes channel-fastest, ZCYX, labels per plane
        tifffile.imwrite(path, data.transpose(1, 0, 2, 3), imagej=True,
                         metadata={"axes": "ZCYX", "Labels": list(NAMES) * 2})  # fmt: skip
    else:
        path = write_ome_zarr(
            tmp_path / "a.zarr", data, axes="CZYX", chunks=(1, 1, 16, 16), levels=2,
            version=request.param[-3:], channel_names=NAMES,
        )  # fmt: skip
    return path, data


def test_channel_names_come_from_the_file(named):
    path, _ = named
    with open_image(path) as image:
        assert image.channel_names == NAMES
        assert nuclear_channels(image) == [1]


def test_a_selection_reads_those_channels_in_the_order_given(named):
    path, data = named
    with open_image(path) as image:
        for chosen in [(1,), (2, 0), (0, 1), (1, 1)]:
            picked = image.with_channels(chosen)
            assert picked.n_channels == len(chosen)
            assert picked.channel_names == tuple(NAMES[c] for c in chosen)
            window = (slice(0, 2), slice(3, 37), slice(5, 41))
            np.testing.assert_array_equal(picked.read(window), data[list(chosen)][:, :, 3:37, 5:41])
            picked.close()


LAYOUTS = {
    # how the channel planes are stored: tiles, strips, one memory-mapped block, Zarr chunks
    # holding one plane or several, samples of RGB pixels
    "tiled": lambda p, a: write_tiff(p / "a.tif", a, axes="CYX", tile=(16, 16)),
    "strips": lambda p, a: write_tiff(p / "a.tif", a, axes="CYX", tile=None, rowsperstrip=7,
                                      compression="zlib"),
    "memmap": lambda p, a: write_tiff(p / "a.tif", a, axes="CYX", tile=None),
    "zarr": lambda p, a: write_zarr(p / "a.zarr", a, chunks=(1, 16, 16)),
    "zarr-planes": lambda p, a: write_zarr(p / "a.zarr", a, chunks=(2, 16, 16)),
    "rgb": lambda p, a: write_tiff(p / "a.tif", a[:3].transpose(1, 2, 0).astype(np.uint8),
                                   axes="YXS"),
}  # fmt: skip


@settings(max_examples=examples(30), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layout=st.sampled_from(sorted(LAYOUTS)),
    picks=st.lists(st.integers(0, 3), min_size=1, max_size=5),
    corner=st.tuples(st.integers(0, 40), st.integers(0, 40)),
    size=st.tuples(st.integers(0, 30), st.integers(0, 30)),
)
def test_any_selection_reads_those_planes_of_any_window(
    tmp_path_factory, layout, picks, corner, size
):
    data = stack((4, 50, 45), seed=len(picks))
    path = LAYOUTS[layout](tmp_path_factory.mktemp(layout), data)
    with open_image(path, axes="CYX" if layout.startswith("zarr") else None) as image:
        stored = image.read((slice(None), slice(None)))
        picks = [p % image.n_channels for p in picks]
        picked = image.with_channels(tuple(picks))
        (y, x), (h, w) = corner, size
        window = (slice(y, min(y + h, 50)), slice(x, min(x + w, 45)))
        np.testing.assert_array_equal(picked.read(window), stored[picks][:, window[0], window[1]])
        picked.close()


def test_by_name_or_index_case_insensitively(named):
    path, data = named
    with open_image(path) as image:
        cases = {"dapi (405)": [1], "DAPI": [1], "1": [1], "Cy5,FITC": [2, 0],
                 "2, 0": [2, 0]}  # fmt: skip
        for given, expected in cases.items():
            picked = select_channels(image, given)
            np.testing.assert_array_equal(picked.read((slice(None),) * 3), data[expected])


def test_the_selection_holds_at_every_level_and_resampled(tmp_path):
    data = stack((3, 64, 80))
    path = write_tiff(tmp_path / "a.ome.tif", data, axes="CYX", channel_names=NAMES,
                      pyramid_levels=2)  # fmt: skip
    with open_image(path) as image:
        picked = select_channels(image, "DAPI (405)")
        coarse = picked.at_level(2)
        assert coarse.spec.channels == (1,) and coarse.channel_names == ("DAPI (405)",)
        np.testing.assert_array_equal(coarse.read(WHOLE), data[1:2, ::4, ::4])
        resampled, _ = at_scale(picked, factor=1.5)
        whole, _ = at_scale(image, factor=1.5)
        assert resampled.n_channels == 1
        np.testing.assert_array_equal(resampled.read(WHOLE), whole.read(WHOLE)[1:2])


def test_a_pickled_selection_reads_it_in_another_thread_and_process(tmp_path):
    data = stack((3, 64, 80))
    path = write_tiff(tmp_path / "a.ome.tif", data, axes="CYX", channel_names=NAMES)
    with open_image(path) as image:
        picked = select_channels(image, "Cy5,DAPI (405)")
    copy = pickle.loads(pickle.dumps(picked))
    assert copy.spec == picked.spec and copy.channel_names == ("Cy5", "DAPI (405)")
    window = (slice(10, 50), slice(0, 33))
    expected = data[[2, 1], 10:50, 0:33]
    with ThreadPoolExecutor(1) as pool:
        np.testing.assert_array_equal(pool.submit(copy.read, window).result(), expected)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        np.testing.assert_array_equal(pool.submit(picked.read, window).result(), expected)
    picked.close()
    copy.close()


def test_rgb_samples_are_red_green_blue(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 255, (32, 40, 3), dtype=np.uint8)
    path = write_tiff(tmp_path / "rgb.tif", rgb, axes="YXS")
    with open_image(path) as image:
        assert image.channel_names == ("red", "green", "blue")
        for given, c in [("blue", 2), ("B", 2), ("g", 1), ("0", 0)]:
            picked = select_channels(image, given)
            assert picked.axes == "YXC" and picked.channel_names == (("red", "green", "blue")[c],)
            np.testing.assert_array_equal(picked.read(WHOLE)[0], rgb[..., c])
        assert select_channels(image, "0,1,2").axes == "YXS"  # all of them: RGB as it was


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        (
            "CD45",
            "--channels CD45: no channel named 'CD45' (channels: 0 FITC, 1 DAPI (405), 2 Cy5)",
        ),
        ("DAPI,7", "--channels DAPI,7: no channel 7 (channels: 0 FITC, 1 DAPI (405), 2 Cy5)"),
        ("C", "--channels C: no channel named 'C'"),
        ("1,7", "--channels 1,7: no channel 7 (channels: 0 FITC, 1 DAPI (405), 2 Cy5)"),
    ],
)
def test_unknown_names_and_indices_are_one_line_listing_the_channels(tmp_path, given, problem):
    path = write_tiff(tmp_path / "a.ome.tif", stack((3, 16, 16)), axes="CYX", channel_names=NAMES)
    with open_image(path) as image, pytest.raises(TilesegError) as info:
        select_channels(image, given)
    assert str(info.value).startswith(f"{path}: {problem}")
    assert "\n" not in str(info.value)


def test_a_name_of_several_channels_is_refused(tmp_path):
    names = ("DAPI 1", "DAPI 2")
    path = write_tiff(tmp_path / "a.ome.tif", stack((2, 16, 16)), axes="CYX", channel_names=names)
    with open_image(path) as image, pytest.raises(TilesegError) as info:
        select_channels(image, "dapi")
    assert str(info.value) == (
        f"{path}: --channels dapi: 'dapi' names several (channels: 0 DAPI 1, 1 DAPI 2); give "
        "channel names or indices"
    )
    with open_image(path) as image:
        assert select_channels(image, "dapi 2").spec.channels == (1,)


def test_auto_picks_the_one_nuclear_stain_or_refuses_listing_the_channels(tmp_path):
    cases = {
        ("FITC", "DAPI (405)", "Cy5"): 1,
        ("Hoechst33342", "CD45"): 0,
        ("CD3", "CD8", "DRAQ5"): 2,
        ("488", "SiR-DNA"): 1,
        ("PI", "GFP"): 0,
        ("nuclei", "membrane"): 0,
        ("TO-PRO-3", "x"): 0,
        ("FITC", "Cy5"): None,
        ("DAPI", "Hoechst"): None,
        ("", ""): None,
        ("PIEZO1", "Pink"): None,  # not inside a longer word
    }
    for k, (names, expected) in enumerate(cases.items()):
        path = write_tiff(tmp_path / f"{k}.ome.tif", stack((len(names), 16, 16)), axes="CYX",
                          channel_names=names if any(names) else None)  # fmt: skip
        with open_image(path) as image:
            if expected is not None:
                picked = auto_channel(image, requested=None, model_channels=1, model="m")
                assert picked.spec.channels == (expected,), names
                continue
            with pytest.raises(TilesegError) as info:
                auto_channel(image, requested=None, model_channels=1, model="m")
            message = str(info.value)
            if not any(names):
                assert "(0 (no name), 1 (no name))" in message
            assert message.startswith(f"{path}: {len(names)} channels (0 ")
            assert "choose it with --channels NAME|INDEX" in message and "\n" not in message


def test_a_chosen_count_the_model_does_not_take_is_one_line(tmp_path):
    path = write_tiff(tmp_path / "a.ome.tif", stack((3, 16, 16)), axes="CYX", channel_names=NAMES)
    with open_image(path) as image:
        picked = select_channels(image, "FITC,Cy5")
        with pytest.raises(TilesegError, match=r"--channels FITC,Cy5 chooses 2 channel\(s\) "
                           r"\(0 FITC, 2 Cy5\) but the model \(m\) takes 1$"):  # fmt: skip
            auto_channel(picked, requested="FITC,Cy5", model_channels=1, model="m")
        # a two-channel model: no choice made for it
        assert auto_channel(image, requested=None, model_channels=2, model="m") is image
