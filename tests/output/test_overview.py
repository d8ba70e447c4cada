"""The overview: the root image of an output without probabilities, so that a viewer opening the
output finds an image under its labels; read from the input's pyramid where it has one."""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import replace
from functools import partial

import numpy as np
import pytest
import zarr
from hypothesis import given
from hypothesis import strategies as st
from imagefiles import write_ome_zarr, write_svs, write_tiff, write_zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import OMERO, Label, Multiscales, Reader
from ome_zarr_models.v04 import Image
from outputs import chunk_files

import pipeline.engine.driver
import pipeline.engine.tasks
import pipeline.output.overview
from pipeline.config import SegmentOptions
from pipeline.engine.driver import segment_image
from pipeline.io.readers import open_image
from pipeline.models import UNetConfig, save_unet, seeded_unet
from pipeline.output.ngff import LABELS_PATH, overview_factor, read_layout, read_record
from pipeline.output.overview import OverviewSource, overview_source, read_overview
from pipeline.output.provenance import done_dir


class Killed(Exception):
    pass


@given(
    shape=st.lists(st.integers(1, 5000), min_size=2, max_size=3),
    max_pixels=st.integers(1, 1 << 16),
)
def test_overview_factor_is_the_smallest_power_of_two_that_fits(shape, max_pixels):
    factor = overview_factor(shape, max_pixels=max_pixels)
    assert factor & (factor - 1) == 0  # a power of two: it lies on the label pyramid's grid
    assert math.prod(-(-n // factor) for n in shape) <= max_pixels
    if factor > 1:
        assert math.prod(-(-n // (factor // 2)) for n in shape) > max_pixels


def _overview(image, factor: int) -> np.ndarray:
    source = overview_source(image, factor=factor)
    shape = tuple(-(-n // factor) for n in image.spatial_shape)
    return read_overview(source, tuple(slice(0, n) for n in shape)), source


@pytest.mark.parametrize("factor", [1, 2, 4, 8, 64])
def test_overview_of_an_image_without_pyramid_is_every_factorth_pixel(
    tmp_path, factor, monkeypatch
):
    # Reads of at most 1000 source pixels: many blocks, each a different part of the image.
    monkeypatch.setattr(pipeline.output.overview, "READ_PIXELS", 1000)
    image = np.random.default_rng(0).integers(0, 60000, (203, 150), dtype=np.uint16)
    path = write_tiff(tmp_path / "a.tif", image, axes="YX", tile=(32, 32), compression="zlib")
    with open_image(path) as lazy:
        data, source = _overview(lazy, factor)
    assert source.level == 0
    np.testing.assert_array_equal(data, image[None, ::factor, ::factor])


def test_overview_of_a_volume_and_of_an_rgb_image(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline.output.overview, "READ_PIXELS", 500)
    volume = np.random.default_rng(1).random((9, 40, 33)).astype(np.float32)
    with open_image(write_zarr(tmp_path / "v.zarr", volume, chunks=(4, 16, 16)), axes="ZYX") as v:
        data, _ = _overview(v, 4)
    np.testing.assert_array_equal(data, volume[None, ::4, ::4, ::4])
    rgb = np.random.default_rng(2).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    with open_image(write_tiff(tmp_path / "rgb.tif", rgb, axes="YXS", tile=(32, 32))) as lazy:
        data, _ = _overview(lazy, 2)
    np.testing.assert_array_equal(data, np.moveaxis(rgb, -1, 0)[:, ::2, ::2])


@pytest.mark.parametrize("factor, level", [(2, 1), (4, 2), (8, 2), (16, 2)])
def test_overview_is_read_from_the_coarsest_pyramid_level_fine_enough(tmp_path, factor, level):
    # Level k of these files is every 2**k-th pixel: the overview must equal the image's own
    # every factor-th pixel, read from level log2(factor) or the coarsest there is.
    image = np.random.default_rng(3).integers(0, 255, (301, 257), dtype=np.uint8)
    path = write_tiff(tmp_path / "p.ome.tif", image, axes="YX", tile=(32, 32), pyramid_levels=2)
    with open_image(path) as lazy:
        assert lazy.n_levels == 3
        data, source = _overview(lazy, factor)
    assert source.level == level
    np.testing.assert_array_equal(data, image[None, ::factor, ::factor])


def test_overview_of_a_slide_opened_at_a_level_and_of_an_ome_zarr(tmp_path):
    rgb = np.random.default_rng(4).integers(0, 255, (256, 320, 3), dtype=np.uint8)
    svs = write_svs(tmp_path / "s.svs", rgb, tile=64, levels=3)
    with open_image(svs) as full, open_image(svs, level=1) as half:
        expected, _ = _overview(full, 8)  # the same pixels of the slide, from level 2
        data, source = _overview(half, 4)
        with half.at_level(2) as level2:  # JPEG: the file's own pixels, not rgb's
            own = level2.read((slice(0, 64), slice(0, 80)))
        np.testing.assert_array_equal(data, own[:, ::2, ::2])
    assert source.level == 2 and source.image_shape == (128, 160)
    np.testing.assert_array_equal(data, expected)
    volume = np.random.default_rng(5).integers(0, 9, (6, 64, 48), dtype=np.uint16)
    ome = write_ome_zarr(tmp_path / "v.ome.zarr", volume, axes="ZYX", chunks=(2, 16, 16), levels=3)
    with open_image(ome) as lazy:
        data, source = _overview(lazy, 4)
    assert source.level == 2  # z is kept by the levels: their z pixel is the image's own
    np.testing.assert_array_equal(data, volume[None, ::4, ::4, ::4])


def test_an_output_without_probabilities_opens_as_image_with_labels(tmp_path, model):
    rgb = np.random.default_rng(6).integers(0, 255, (200, 150, 3), dtype=np.uint8)
    slide = write_tiff(tmp_path / "rgb.tif", rgb, axes="YXS", tile=(32, 32), pixel_size=(0.5, 0.5))
    out = tmp_path / "out.zarr"
    unet = UNetConfig(depth=2, width=4, padding="same", classes=2, in_channels=3)
    save_unet(seeded_unet(unet, seed=0), tmp_path / "rgb.safetensors")
    options = SegmentOptions(model=str(tmp_path / "rgb.safetensors"), tile=64, chunk=32)
    segment_image(slide, out, options)

    nodes = list(Reader(parse_url(str(out)))())  # what napari-ome-zarr does with OUTPUT.zarr
    image = nodes[0]
    assert {type(s) for s in image.specs} >= {Multiscales, OMERO}
    np.testing.assert_array_equal(np.asarray(image.data[0]), np.moveaxis(rgb, -1, 0))
    assert image.metadata["channel_names"] == ["R", "G", "B"]
    assert image.metadata["contrast_limits"] == [[0, 255]] * 3
    labels = next(n for n in nodes if any(isinstance(s, Label) for s in n.specs))
    assert len(labels.data) == 4  # the label pyramid, found from the root
    assert image.metadata["coordinateTransformations"][0][0]["scale"] == [1.0, 0.5, 0.5]
    Image.from_zarr(zarr.open_group(out, mode="r"))  # valid NGFF 0.4 (raises if not)
    root = zarr.open_group(out, mode="r")
    assert root[LABELS_PATH].attrs["image-label"]["source"] == {"image": "../../"}
    assert read_layout(out).overview.factor == 1 and read_layout(out).probability_dtype is None


def test_a_large_image_gets_a_subsampled_overview_with_its_scale(tmp_path, model, monkeypatch):
    small = partial(overview_factor, max_pixels=900)
    monkeypatch.setattr(pipeline.engine.driver, "overview_factor", small)
    image = np.random.default_rng(7).integers(0, 4000, (160, 130), dtype=np.uint16)
    slide = write_tiff(tmp_path / "a.tif", image, axes="YX", tile=(32, 32), pixel_size=(0.25, 0.25))
    out = tmp_path / "out.zarr"
    segment_image(slide, out, SegmentOptions(model=model, tile=64, chunk=16))
    root = zarr.open_group(out, mode="r")
    np.testing.assert_array_equal(root["0"][...], image[None, ::8, ::8])  # 20 x 17 <= 900
    assert root["0"].chunks == (1, 16, 16)
    multiscale = root.attrs["multiscales"][0]
    assert multiscale["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 2.0, 2.0]
    window = root.attrs["omero"]["channels"][0]["window"]
    expected = np.percentile(image[::8, ::8].astype(np.float64), [1.0, 99.8])
    assert (window["start"], window["end"]) == pytest.approx(tuple(expected))
    assert (window["min"], window["max"]) == (0, 65535)
    assert read_record(out)["timings"]["overview_wall"] > 0
    from pipeline.output.qc import overview_thumbnail

    assert overview_thumbnail(out, max_side=64) is None  # coarser than asked: the input is read
    np.testing.assert_array_equal(overview_thumbnail(out, max_side=16), image[None, ::16, ::16])


def test_a_run_killed_while_writing_the_overview_resumes_to_the_same_output(
    tmp_path, model, monkeypatch
):
    small = partial(overview_factor, max_pixels=900)
    monkeypatch.setattr(pipeline.engine.driver, "overview_factor", small)
    image = np.random.default_rng(8).integers(0, 255, (200, 180), dtype=np.uint8)
    slide = write_tiff(tmp_path / "a.tif", image, axes="YX", tile=(32, 32))
    options = SegmentOptions(model=model, tile=32, chunk=8)
    segment_image(slide, tmp_path / "reference.zarr", options)
    real, calls = pipeline.engine.driver.write_overview_block, []

    def killed_at_the_third(*args):
        calls.append(args)
        if len(calls) == 3:
            raise Killed
        return real(*args)

    out = tmp_path / "out.zarr"
    monkeypatch.setattr(pipeline.engine.driver, "write_overview_block", killed_at_the_third)
    with pytest.raises(Killed):
        segment_image(slide, out, options)
    assert read_record(out)["status"] == "running"
    assert "omero" not in zarr.open_group(out, mode="r").attrs
    done = sorted(p.name for p in done_dir(out).iterdir() if p.name.startswith("overview-"))
    assert len(done) == 2  # the killed block left no marker
    monkeypatch.setattr(pipeline.engine.driver, "write_overview_block", real)
    calls.clear()
    segment_image(slide, out, options)
    assert read_record(out)["status"] == "complete"
    assert chunk_files(out) == chunk_files(tmp_path / "reference.zarr")


def test_the_overview_is_written_after_the_tasks_only_in_a_local_cpu_run_on_few_cores():
    from pipeline.config import SERIAL_CORES
    from pipeline.engine.driver import overview_alongside
    from pipeline.runtime.resolved import resolve_runtime

    local = resolve_runtime(SegmentOptions(device="cpu"))
    assert not overview_alongside(replace(local, cores=SERIAL_CORES))
    remote = SegmentOptions(device="cpu", scheduler="tcp://head:8786")
    assert overview_alongside(resolve_runtime(remote))
    assert overview_alongside(replace(local, cores=SERIAL_CORES + 1))  # a core to spare for it


def _small_overview_slide(tmp_path, monkeypatch, seed: int):
    monkeypatch.setattr(
        pipeline.engine.driver, "overview_factor", partial(overview_factor, max_pixels=900)
    )
    image = np.random.default_rng(seed).integers(0, 255, (200, 180), dtype=np.uint8)
    return write_tiff(tmp_path / "a.tif", image, axes="YX", tile=(32, 32))


def _last_task_waits(monkeypatch, wait) -> list[str]:
    """The last inference task to finish calls ``wait()`` before its done marker is written;
    the names of those that waited (one, once the run has got there)."""
    real, waited = pipeline.engine.tasks.mark_done, []

    def mark_done(output, name, summary=None):
        names = [p.name for p in done_dir(output).iterdir() if p.name.startswith("tiles-")]
        if name.startswith("tiles-") and len(names) == _task_count(output) - 1:
            waited.append(name)
            wait()
        real(output, name, summary)

    monkeypatch.setattr(pipeline.engine.tasks, "mark_done", mark_done)
    return waited


def _task_count(output) -> int:
    record, shape = read_record(output), read_layout(output).spatial_shape
    tile = record["geometry"]["tile"]
    tiles = math.prod(math.ceil(n / t) for n, t in zip(shape, tile, strict=True))
    return math.ceil(tiles / (record["run"]["batch_size"] * record["run"]["batches_per_task"]))


def test_an_overview_alongside_the_tasks_is_written_while_they_run(tmp_path, model, monkeypatch):
    """The last inference task waits for an overview block: written after the tasks, it
    would never come. The output is the one written in turn."""
    slide = _small_overview_slide(tmp_path, monkeypatch, seed=9)
    options = SegmentOptions(model=model, tile=32, chunk=8)
    segment_image(slide, tmp_path / "in-turn.zarr", options)
    written = threading.Event()
    real_block = pipeline.engine.driver.write_overview_block

    def block(*args):
        real_block(*args)
        written.set()

    def wait():
        assert written.wait(timeout=20), "no overview block was written while the tasks ran"

    monkeypatch.setattr(pipeline.engine.driver, "write_overview_block", block)
    waited = _last_task_waits(monkeypatch, wait)
    monkeypatch.setattr(pipeline.engine.driver, "overview_alongside", lambda runtime: True)
    out = tmp_path / "alongside.zarr"
    segment_image(slide, out, options)
    assert len(waited) == 1
    assert read_record(out)["status"] == "complete"
    assert chunk_files(out) == chunk_files(tmp_path / "in-turn.zarr")
    windows = [
        zarr.open_group(p, mode="r").attrs["omero"] for p in (out, tmp_path / "in-turn.zarr")
    ]
    assert windows[0] == windows[1]


def test_with_every_task_started_at_once_the_overview_starts_with_them(
    tmp_path, model, monkeypatch
):
    """Two tasks on two task threads: no task starts after the first ones, so the overview
    does not wait for one to finish (each task waits for an overview block here)."""
    slide = _small_overview_slide(tmp_path, monkeypatch, seed=12)
    written, real_block = threading.Event(), pipeline.engine.driver.write_overview_block
    real_mark_done = pipeline.engine.tasks.mark_done

    def block(*args):
        real_block(*args)
        written.set()

    def mark_done(output, name, summary=None):
        if name.startswith("tiles-"):
            assert written.wait(timeout=20), "the overview waited for a task to finish"
        real_mark_done(output, name, summary)

    monkeypatch.setattr(pipeline.engine.driver, "write_overview_block", block)
    monkeypatch.setattr(pipeline.engine.tasks, "mark_done", mark_done)
    monkeypatch.setattr(pipeline.engine.driver, "overview_alongside", lambda runtime: True)
    out = tmp_path / "out.zarr"
    segment_image(slide, out, SegmentOptions(model=model, tile=32, chunk=8, batch_size=21,
                                             workers=2))  # fmt: skip
    assert _task_count(out) == 2
    assert read_record(out)["status"] == "complete"


def test_an_overview_alongside_dask_threads_of_the_tasks_gives_the_same_output(
    tmp_path, model, monkeypatch
):
    """Two threaded Dask computations at once, the tasks' and the overview's (a local GPU run's
    two task threads)."""
    slide = _small_overview_slide(tmp_path, monkeypatch, seed=11)
    options = SegmentOptions(model=model, tile=32, chunk=8, workers=2)
    segment_image(slide, tmp_path / "in-turn.zarr", options)
    monkeypatch.setattr(pipeline.engine.driver, "overview_alongside", lambda runtime: True)
    segment_image(slide, tmp_path / "alongside.zarr", options)
    assert chunk_files(tmp_path / "alongside.zarr") == chunk_files(tmp_path / "in-turn.zarr")


@pytest.mark.parametrize("failing", ["tasks", "overview"])
def test_a_failure_beside_the_overview_leaves_nothing_being_written(
    tmp_path, model, monkeypatch, failing
):
    """Whichever fails, the other has finished when the error is raised, and the output is not
    complete: a resumed run redoes what is left."""
    slide = _small_overview_slide(tmp_path, monkeypatch, seed=10)
    real_block, real_mark_done = (
        pipeline.engine.driver.write_overview_block,
        pipeline.engine.tasks.mark_done,
    )
    running, started = [], threading.Event()

    def block(*args):
        running.append(1)
        started.set()
        time.sleep(0.2)  # still writing when the tasks fail, unless waited for
        try:
            if failing == "overview":
                raise Killed
            real_block(*args)
        finally:
            running.pop()

    def wait():
        if failing == "tasks":
            assert started.wait(timeout=20)
            raise Killed

    monkeypatch.setattr(pipeline.engine.driver, "write_overview_block", block)
    _last_task_waits(monkeypatch, wait)
    monkeypatch.setattr(pipeline.engine.driver, "overview_alongside", lambda runtime: True)
    out = tmp_path / "out.zarr"
    options = SegmentOptions(model=model, tile=32, chunk=8)
    with pytest.raises(Killed):
        segment_image(slide, out, options)
    assert not running
    assert read_record(out)["status"] == "running"
    monkeypatch.setattr(pipeline.engine.driver, "write_overview_block", real_block)
    monkeypatch.setattr(pipeline.engine.tasks, "mark_done", real_mark_done)
    segment_image(slide, out, options)
    assert read_record(out)["status"] == "complete"


def test_an_output_begun_before_overviews_resumes_without_one(tmp_path, model):
    """An interrupted output made by a version without overviews has no root image to write
    into: the resumed run finishes it as it was begun."""
    image = np.random.default_rng(9).integers(0, 255, (96, 96), dtype=np.uint8)
    slide = write_tiff(tmp_path / "a.tif", image, axes="YX", tile=(32, 32))
    options = SegmentOptions(model=model, tile=32, chunk=32)
    out = tmp_path / "out.zarr"
    segment_image(slide, out, options)
    reference = chunk_files(out)
    # What such a version left: no root image, no link to it, a task and the record to do.
    root = zarr.open_group(out, mode="r+", zarr_format=2)
    del root["0"]
    for key in ("multiscales", "omero"):
        del root.attrs[key]
    seg = root[LABELS_PATH]
    seg.attrs["image-label"] = {k: v for k, v in seg.attrs["image-label"].items() if k != "source"}
    root.attrs["tileseg"] = {**root.attrs["tileseg"], "status": "running"}
    for marker in done_dir(out).iterdir():
        if marker.name.startswith(("overview-", "tiles-0000003")):
            marker.unlink()
    pipeline.output.ngff.forget_arrays(out)

    segment_image(slide, out, options)
    assert read_record(out)["status"] == "complete"
    assert read_layout(out).overview is None and "0" not in zarr.open_group(out, mode="r")
    assert chunk_files(out) == {k: v for k, v in reference.items() if not k.startswith("0/")}
    assert "source" not in json.loads((out / LABELS_PATH / ".zattrs").read_text())["image-label"]


def test_probabilities_stay_the_root_image(tmp_path, model):
    image = np.random.default_rng(10).integers(0, 255, (64, 64), dtype=np.uint8)
    slide = write_tiff(tmp_path / "a.tif", image, axes="YX", tile=(32, 32))
    out = tmp_path / "out.zarr"
    options = SegmentOptions(model=model, tile=32, chunk=32, save_probabilities=True)
    segment_image(slide, out, options)
    layout = read_layout(out)
    assert layout.overview is None and layout.probability_dtype == "<f2"
    root = zarr.open_group(out, mode="r")
    assert root.attrs["multiscales"][0]["name"] == "probabilities"
    channels = root.attrs["omero"]["channels"]  # one per class, named after it
    assert [c["label"] for c in channels] == ["background", "foreground"]
    with pytest.raises(ValueError, match="not both"):
        replace(layout, overview=pipeline.output.ngff.Overview(1, "|u1", 1))


def test_overview_source_indices_stay_inside_the_level():
    source = OverviewSource(None, 1, (50, 33), (100, 65), 4)  # type: ignore[arg-type]
    assert source.indices(1, 0, 17).max() == 32 and source.indices(0, 0, 25)[-1] == 48


def test_display_windows_of_a_float_overview_skip_what_is_not_finite(tmp_path):
    from pipeline.output.ngff import OutputLayout, Overview, create_output, open_array
    from pipeline.output.overview import finish_overview

    layout = OutputLayout((40, 30), (16, 16), 2, "|u1", overview=Overview(2, "<f4", 1))
    create_output(tmp_path / "o.zarr", layout, overwrite=False, attrs={})
    data = np.linspace(0, 1, 2 * 40 * 30, dtype=np.float32).reshape(2, 40, 30)
    data[0, :5] = np.nan
    data[1] = np.nan
    open_array(tmp_path / "o.zarr", "0")[...] = data
    finish_overview(tmp_path / "o.zarr", rgb=False)
    windows = [c["window"] for c in zarr.open_group(tmp_path / "o.zarr").attrs["omero"]["channels"]]
    expected = np.percentile(data[0][np.isfinite(data[0])], [1.0, 99.8])
    assert (windows[0]["start"], windows[0]["end"]) == pytest.approx(tuple(expected))
    assert (windows[1]["start"], windows[1]["end"]) == (0.0, 1.0)


def test_qc_pictures_are_drawn_on_the_overview_without_reading_the_input(tmp_path, model):
    from skimage.io import imread

    from pipeline.output.qc import overlay_png, overview_thumbnail, thumbnail

    image = np.random.default_rng(11).integers(0, 255, (256, 192), dtype=np.uint8)
    slide = write_tiff(tmp_path / "a.ome.tif", image, axes="YX", tile=(32, 32), pyramid_levels=2)
    out, with_p = tmp_path / "out.zarr", tmp_path / "p.zarr"
    segment_image(slide, out, SegmentOptions(model=model, tile=32, chunk=32))
    segment_image(slide, with_p, SegmentOptions(model=model, tile=32, chunk=32,
                                                save_probabilities=True))  # fmt: skip
    with open_image(slide) as lazy:
        for side in (256, 128, 64):  # the overview is the whole image: any side is served
            np.testing.assert_array_equal(
                overview_thumbnail(out, max_side=side), thumbnail(lazy, max_side=side)
            )
        assert overview_thumbnail(out, max_side=100).shape == (1, 86, 64)  # every third pixel
        from_input = overlay_png(lazy, with_p, tmp_path / "from-input.png", max_side=64)
    assert overview_thumbnail(with_p, max_side=64) is None  # its root holds probabilities
    slide.unlink()  # the input is gone: the overview still gives the picture
    from_overview = overlay_png(None, out, tmp_path / "from-overview.png", max_side=64)
    np.testing.assert_array_equal(imread(from_overview), imread(from_input))
    with pytest.raises(ValueError, match="no overview"):
        overlay_png(None, with_p, tmp_path / "none.png")


def test_a_qc_window_is_drawn_at_full_resolution(tmp_path, model):
    from skimage.io import imread
    from skimage.segmentation import find_boundaries

    from pipeline.output.qc import overlay_png

    image = np.random.default_rng(12).integers(0, 255, (256, 192), dtype=np.uint8)
    slide = write_tiff(tmp_path / "a.ome.tif", image, axes="YX", tile=(32, 32), pyramid_levels=2)
    out = tmp_path / "out.zarr"
    segment_image(slide, out, SegmentOptions(model=model, tile=32, chunk=32))
    stored = zarr.open_array(out / "labels" / "segmentation" / "0", mode="r+")
    stored[:] = 0
    stored[50:80, 20:60] = 1  # one object, partly in the window
    window = (slice(40, 140), slice(30, 110))
    with open_image(slide) as lazy:
        picture = imread(overlay_png(lazy, out, tmp_path / "window.png", window=window))
    assert picture.shape == (100, 80, 3)
    edges = find_boundaries(np.asarray(stored)[window], mode="inner")
    assert edges.sum() == 2 * 30 + 28  # cut by the window's left side: 3 of its sides in it
    red = (np.array([255, 60, 60], np.float32) / 255.0 * 255).astype(np.uint8)  # label 1's colour
    np.testing.assert_array_equal(picture[edges], np.broadcast_to(red, (edges.sum(), 3)))
    with pytest.raises(ValueError, match="window"):
        overlay_png(None, out, tmp_path / "none.png", window=window)
