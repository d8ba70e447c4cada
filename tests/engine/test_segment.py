"""``tileseg segment`` end to end: CLI contract, output format, configs, errors, Dask cluster."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given
from hypothesis import strategies as st
from imagefiles import write_tiff, write_zarr
from modelfiles import save_tied_softmax_model, threshold_model
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Multiscales, Reader
from outputs import assert_pyramid_from_level_below, chunk_files

from pipeline.cli.main import main
from pipeline.config import SegmentOptions
from pipeline.engine.driver import segment_image
from pipeline.geometry import ModelGeometry, plan_tiles
from pipeline.models import ModelSpec, UNetConfig, load_model, save_unet, seeded_unet
from pipeline.models.files import file_sha256
from pipeline.models.inference import LEGACY_AUTO_LAYOUT
from pipeline.output.ngff import LABELS_PATH, read_record
from pipeline.output.provenance import done_dir
from pipeline.runtime.cores import usable_cores

SMALL = UNetConfig(depth=2, width=4, padding="valid", classes=3)
GEOMETRY = ModelGeometry.uniform(2, halo=0, align=1, shrink=0, size_min=1, size_step=1)


@pytest.fixture
def model_config():
    return SMALL


@pytest.fixture
def slide(tmp_path):
    rng = np.random.default_rng(0)
    image = (rng.random((300, 260)) * 4000).astype(np.uint16)
    path = tmp_path / "slide.ome.tif"
    write_tiff(path, image, axes="YX", tile=(64, 64), compression="zlib", pixel_size=(0.5, 0.5))
    return path, image


def test_cli_segment_writes_a_readable_ome_zarr(tmp_path, slide, model, capsys):
    out = tmp_path / "out.zarr"
    args = ["segment", str(slide[0]), str(out), "--model", model, "--tile", "128", "--chunk", "64"]
    assert main([*args, "--save-probabilities", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "300x260 px" in printed and "MP/s" in printed

    root = zarr.open_group(out, mode="r")
    labels = root[f"{LABELS_PATH}/0"]
    assert labels.shape == (300, 260) and labels.dtype == np.uint8 and labels.chunks == (64, 64)
    assert set(np.unique(labels[...])) <= {0, 1, 2}
    probs = root["0"]
    assert probs.shape == (3, 300, 260) and probs.dtype == np.float16
    np.testing.assert_allclose(probs[...].astype(np.float32).sum(0), 1.0, atol=3e-3)

    # pyramid: labels halve by taking every other pixel until a level fits one chunk
    assert [root[f"{LABELS_PATH}/{k}"].shape for k in range(4)] == [
        (300, 260), (150, 130), (75, 65), (38, 33),
    ]  # fmt: skip
    np.testing.assert_array_equal(root[f"{LABELS_PATH}/1"][...], labels[...][::2, ::2])

    # provenance, written last
    record = read_record(out)
    assert record["status"] == "complete"
    assert record["model"]["sha256"] == file_sha256(model)
    assert record["config"]["tile"] == 128 and record["tiles"] == 9
    assert record["timings"]["infer"] > 0

    # ome-zarr-py reads the labels image with its pyramid and pixel size
    nodes = list(Reader(parse_url(str(out / LABELS_PATH)))())
    label_node = next(n for n in nodes if any(isinstance(s, Label) for s in n.specs))
    assert any(isinstance(s, Multiscales) for s in label_node.specs)
    assert len(label_node.data) == 4
    scale = label_node.metadata["coordinateTransformations"][0][0]["scale"]
    assert scale == [0.5, 0.5]
    image_nodes = list(Reader(parse_url(str(out)))())
    assert image_nodes[0].data[0].shape == (3, 300, 260)
    assert root[LABELS_PATH].attrs["image-label"]["source"] == {"image": "../../"}

    # without probabilities the root image is the overview (here the image itself: it is small)
    bare = tmp_path / "bare.zarr"
    assert main([*args[:2], str(bare), *args[3:], "--no-progress"]) == 0
    label_attrs = zarr.open_group(bare, mode="r")[LABELS_PATH].attrs.asdict()
    assert label_attrs["image-label"]["source"] == {"image": "../../"}
    nodes = list(Reader(parse_url(str(bare)))())
    np.testing.assert_array_equal(np.asarray(nodes[0].data[0]), slide[1][None])
    assert any(isinstance(s, Label) for n in nodes for s in n.specs)


def test_config_file_and_flag_precedence(tmp_path, slide, model):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {model}\ntile: 256\nchunk: 128\nnormalize: none\nbatch-size: 2\n"
                      "save_probabilities: true\n")  # fmt: skip
    out = tmp_path / "out.zarr"
    args = ["segment", str(slide[0]), str(out), "--config", str(config), "--tile", "128"]
    assert main([*args, "--no-save-probabilities"]) == 0
    record = read_record(out)["config"]
    assert (record["tile"], record["chunk"], record["normalize"], record["batch_size"]) == (
        128, 128, "none", 2,
    )  # fmt: skip
    assert record["save_probabilities"] is False
    assert zarr.open_group(out, mode="r").attrs["multiscales"][0]["name"] == "overview"


def test_layout_and_folding_flags_reach_the_run(tmp_path, slide, model):
    out = tmp_path / "out.zarr"
    args = ["segment", str(slide[0]), str(out), "--model", model, "--tile", "128", "--no-progress"]
    assert main([*args, "--channels-last", "off", "--fold-norm", "off"]) == 0
    record = read_record(out)
    assert (record["config"]["channels_last"], record["config"]["fold_norm"]) == ("off", "off")
    assert (record["run"]["channels_last"], record["run"]["fold_norm"]) == ("off", "off")


def test_on_and_off_in_a_config_file_mean_on_and_off(tmp_path):
    """YAML 1.1 reads ``on``/``off``/``yes``/``no`` as booleans; the auto|on|off options take
    them as the words they look like."""
    from pipeline.config import load_config, options_from_mapping

    config = tmp_path / "run.yaml"
    for word, value in (
        ("on", "on"),
        ("off", "off"),
        ("yes", "on"),
        ("no", "off"),
        ("auto", "auto"),
    ):
        config.write_text(f"channels_last: {word}\nfold_norm: {word}\n")
        options = options_from_mapping(load_config(config), source=str(config))
        assert (options.channels_last, options.fold_norm) == (value, value)


@pytest.mark.parametrize("flag", ["compile", "allow_missing_chunks", "save_probabilities",
                                  "overwrite"])  # fmt: skip
def test_on_off_flags_leave_the_config_file_in_force_unless_given(flag):
    from pipeline.cli.main import build_parser

    option = "--" + flag.replace("_", "-")
    parse = build_parser().parse_args
    assert getattr(parse(["segment", "a.tif", "b.zarr"]), flag) is None
    assert getattr(parse(["segment", "a.tif", "b.zarr", option]), flag) is True
    assert (
        getattr(parse(["segment", "a.tif", "b.zarr", option.replace("--", "--no-")]), flag) is False
    )


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def truncated(directory):
    whole = (directory / "slide.ome.tif").read_bytes()
    (directory / "cut.tif").write_bytes(whole[: len(whole) // 2])
    return directory / "cut.tif"


def pickled(directory) -> str:
    path = directory / "checkpoint.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    return str(path)


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (lambda d: (str(d / "missing.tif"), []), "missing.tif: no such file"),
        (lambda d: (d / "junk.tif").write_bytes(b"II*\x00garbage") and (str(d / "junk.tif"), []),
         "junk.tif"),
        (lambda d: (str(d / "slide.ome.tif"), ["--tile", "90"]), "the model's alignment"),
        (lambda d: (str(d / "slide.ome.tif"), ["--tile", "128", "--chunk", "96"]),
         "multiple of the output chunk"),
        (lambda d: (str(d / "slide.ome.tif"), ["--model", str(d / "nope.safetensors")]),
         "model file not found"),
        (lambda d: (str(d / "slide.ome.tif"), ["--level", "5"]), "level"),
        (lambda d: (str(d / "slide.ome.tif"), ["--device", "cuda:7"]), "--device"),
        (lambda d: (str(truncated(d)), []), "cut.tif"),
        (lambda d: (str(d / "slide.ome.tif"), ["--axes", "ZYX"]), "axes"),
        (lambda d: (str(d / "slide.ome.tif"), ["--model", pickled(d)]), "not a TorchScript"),
        (lambda d: (str(d / "slide.ome.tif"), ["--tissue", "otsu", "--tissue-level", "7"]),
         "slide.ome.tif: tissue mask: level 7 not in"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_exit_2(tmp_path, slide, model, capsys, setup, expected):
    target, extra = setup(tmp_path)
    out = tmp_path / "out.zarr"
    model_args = [] if "--model" in extra else ["--model", model]
    code = main(["segment", target, str(out), "--no-progress", *model_args, *extra])
    assert code == 2
    line = one_error_line(capsys)
    assert line.startswith("tileseg: error: ") and expected in line
    assert read_record(out) is None or read_record(out)["status"] != "complete"


def test_bad_config_is_refused(tmp_path, slide, capsys):
    config = tmp_path / "bad.yaml"
    for text, expected in [
        ("tile: 256\ncolour: red\n", "unknown option 'colour'"),
        ("tile: big\n", "tile: expected int"),
        ("normalize: zscore\n", "normalize: must be one of"),
        ("tile: [1\n", "invalid YAML"),
        ("batch_size: lots\n", "batch_size: must be a number or auto"),
        ("prefetch: -1\n", "prefetch: must be >= 0"),
        ("prefetch: soon\n", "prefetch: must be a number or auto"),
        ("channels_last: sometimes\n", "channels_last: must be one of"),
        ("fold_norm: always\n", "fold_norm: must be one of"),
        ("compile: 1\n", "compile: expected bool"),
        ("tissue: fixed\n", "tissue: fixed needs a threshold"),
        ("tissue: otsu\ntissue_threshold: 0.2\n", "a fixed one needs --tissue fixed"),
        ("tissue_threshold: 1.5\n", "tissue_threshold: must be >= 0 and < 1"),
        ("tissue_margin: -4\n", "tissue_margin: must be >= 0"),
    ]:
        config.write_text(text)
        args = ["segment", str(slide[0]), str(tmp_path / "o.zarr"), "--config", str(config)]
        assert main(args) == 2
        line = one_error_line(capsys)
        assert str(config) in line and expected in line


def test_how_the_work_runs_does_not_change_a_byte(tmp_path, slide, model, monkeypatch):
    """Prefetch depth, tiles per task and `--batch-size auto` (4 on the CPU) run the same
    batches: identical chunks. Prefetch only decides how the work runs, so a finished output
    is not redone for it; `auto` is recorded with the batch size it resolved to."""
    monkeypatch.setattr(
        "pipeline.runtime.worker.MIN_TASKS", 1
    )  # several batches per task, small image
    base = ["segment", str(slide[0])]
    opts = ["--model", model, "--tile", "32", "--chunk", "32", "--save-probabilities",
            "--no-progress"]  # fmt: skip
    first, second = tmp_path / "first.zarr", tmp_path / "second.zarr"
    assert main([*base, str(first), *opts, "--batch-size", "auto", "--prefetch", "0"]) == 0
    record = read_record(first)
    assert record["config"]["batch_size"] == "auto" and record["run"]["batch_size"] == 4
    assert record["run"]["batches_per_task"] == 4  # 90 tiles: 23 batches, 6 tasks
    assert record["timings"]["stall"] >= 0

    assert main([*base, str(first), *opts, "--batch-size", "auto", "--prefetch", "3"]) == 0
    assert read_record(first)["finished"] == record["finished"]  # skipped, not redone

    args = ["--batch-size", "4", "--prefetch", "2", "--batches-per-task", "1"]
    assert main([*base, str(second), *opts, *args]) == 0
    assert chunk_files(second) == chunk_files(first)

    # A batch's windows read and its tiles written by parallel threads, as on a GPU.
    monkeypatch.setattr("pipeline.runtime.worker.parallel_io", lambda device: True)
    third = tmp_path / "third.zarr"
    assert main([*base, str(third), *opts, "--batch-size", "4"]) == 0
    assert chunk_files(third) == chunk_files(first)


def test_a_local_run_streams_its_tasks_through_one_pipeline(tmp_path, slide, model, monkeypatch):
    """One task at a time (the CPU default): the tasks' batches go through one read / infer /
    write stream, so a task's first read and its last write overlap its neighbours'
    inference. Each task is marked done and reported once its tiles are written, and the
    chunks are those of tasks run one by one by Dask's threads."""
    import pipeline.engine.tasks

    streams, marked, progress = [], [], []
    run_stages, mark_done = pipeline.engine.tasks.run_stages, pipeline.engine.tasks.mark_done

    def stream(items, **kwargs):
        streams.append(len(items))
        return run_stages(items, **kwargs)

    def mark(output, name, *args):
        marked.append(name)
        return mark_done(output, name, *args)

    monkeypatch.setattr("pipeline.engine.tasks.run_stages", stream)
    monkeypatch.setattr("pipeline.engine.tasks.mark_done", mark)
    options = SegmentOptions(model=model, tile=32, chunk=32, batch_size=4, save_probabilities=True)
    out = tmp_path / "stream.zarr"
    segment_image(slide[0], out, options, progress=lambda done, total: progress.append(done))
    tasks = sorted(p.name for p in done_dir(out).glob("tiles-*"))
    assert streams == [23] and len(tasks) == 23  # 90 tiles: 23 batches, one task each
    assert marked == tasks
    assert progress == sorted(progress) and len(progress) == 23 and progress[-1] == 300 * 260

    streams.clear()
    threads = tmp_path / "threads.zarr"
    segment_image(slide[0], threads, dataclasses.replace(options, workers=2))
    assert streams == [1] * 23  # a stream per task
    assert chunk_files(threads) == chunk_files(out)


@pytest.mark.parametrize(
    ("tile", "chunk", "in_tasks"),
    [(64, 64, 0), (128, 64, 1), (256, 64, 2), (128, 32, 2)],
)
def test_tasks_write_the_pyramid_levels_they_own(tmp_path, model, tile, chunk, in_tasks):
    """Where a tile covers whole chunks of a level (the last tile of a row reaches the level's
    end), its task writes that level; the rest follow from the level below. The result is the
    same either way, odd sides (301 x 259: halved rounding up) included."""
    image = (np.random.default_rng(3).random((301, 259)) * 4000).astype(np.uint16)
    path = write_tiff(tmp_path / "odd.tif", image, axes="YX", tile=(64, 64), compression="zlib")
    out = tmp_path / "out.zarr"
    options = SegmentOptions(model=model, tile=tile, chunk=chunk, save_probabilities=True)
    segment_image(path, out, options)
    assert read_record(out)["run"]["levels_in_tasks"] == in_tasks
    assert assert_pyramid_from_level_below(out) > in_tasks


@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 700), st.integers(1, 700)),
    tile_chunks=st.tuples(st.integers(1, 3), st.sampled_from([1, 2, 4, 8]), st.integers(1, 3)),
    chunk=st.sampled_from([16, 32, 64]),
)
def test_levels_in_tasks_give_each_chunk_one_writer(shape, tile_chunks, chunk):
    """At every level the tasks write, each chunk lies inside one tile's region at that level,
    and the tiles' regions cover the level."""
    from pipeline.output.ngff import OutputLayout, half_region, levels_in_tasks

    chunks = tuple(min(c, n) for c, n in zip((1, chunk, chunk), shape, strict=True))
    tile = tuple(n * c for n, c in zip(tile_chunks, (1, chunk, chunk), strict=True))
    layout = OutputLayout(spatial_shape=shape, chunks=chunks, classes=2, label_dtype="|u1")
    regions = [
        tuple(slice(o, min(o + t, n)) for o, t, n in zip(origin, tile, shape, strict=True))
        for origin in np.ndindex(*(-(-n // t) for n, t in zip(shape, tile, strict=True)))
        for origin in [tuple(i * t for i, t in zip(origin, tile, strict=True))]
    ]

    def one_writer_per_chunk(level: int, regions) -> bool:
        if any(s.start % 2 for r in regions for s in r[-2:]):
            return False  # every second pixel of this region is not every second of the image
        regions = [half_region(r) for r in regions]
        owner = np.full(layout.levels[level], -1)
        for i, region in enumerate(regions):
            assert (owner[region] == -1).all()  # regions never overlap
            owner[region] = i
        assert (owner >= 0).all()  # and cover the level
        step = layout.level_chunks(level)
        blocks = np.ndindex(*(-(-n // c) for n, c in zip(owner.shape, step, strict=True)))
        return all(
            len(np.unique(owner[tuple(slice(i * c, (i + 1) * c) for i, c in zip(b, step))])) == 1
            for b in blocks
        )

    fused = levels_in_tasks(layout, regions)
    for level in range(1, len(layout.levels)):
        ok = one_writer_per_chunk(level, regions)
        assert ok == (level <= fused)  # fused is the last level at which it holds
        if level > fused:
            break
        regions = [half_region(r) for r in regions]


def test_resumed_auto_batch_size_is_the_one_the_run_started_with(tmp_path, slide, model):
    from pipeline.engine.driver import plan
    from pipeline.io.readers import open_image
    from pipeline.runtime.worker import resolve_batch_size

    out = tmp_path / "out.zarr"
    options = SegmentOptions(model=model, tile=64, chunk=64, batch_size="auto")
    segment_image(slide[0], out, options)
    root = zarr.open_group(out, mode="r+", zarr_format=2)
    root.attrs["tileseg"] = {**root.attrs["tileseg"], "run": {"batch_size": 3}}
    image = open_image(slide[0])
    loaded = load_model(ModelSpec(model))
    grid = plan(image, loaded, options)
    args = (options, ModelSpec(model), image, grid)
    resumed = read_record(out)["run"]
    numerics = {"channels_last": "on", "fold_norm": "on"}
    assert resolve_batch_size(*args, resumed=resumed, numerics=numerics) == 3
    assert resolve_batch_size(*args, resumed=None, numerics=numerics) == 4


@pytest.mark.parametrize(("key", "legacy"), [("channels_last", LEGACY_AUTO_LAYOUT),
                                            ("fold_norm", "off")])  # fmt: skip
def test_a_resumed_run_keeps_the_numerics_of_the_run_it_continues(
    tmp_path, slide, model, key, legacy
):
    """The layout and batch-norm folding change the last bits of a float result: a resumed
    run's tasks must run as its done tasks ran, also for outputs begun before the setting was
    recorded (then: channels-last on CUDA only, so off on this CPU; no folding)."""
    options = SegmentOptions(model=model, tile=64, chunk=64, save_probabilities=True,
                             probability_dtype="float32", batch_size=2)  # fmt: skip
    plain = tmp_path / "plain.zarr"
    segment_image(slide[0], plain, dataclasses.replace(options, **{key: "off"}))
    out = tmp_path / "out.zarr"
    segment_image(slide[0], out, options)
    assert read_record(out)["run"][key] == "on"

    def probabilities(path):
        return zarr.open_group(path, mode="r")["0"][...]

    expected_plain, expected_on = probabilities(plain), probabilities(out)
    assert not np.array_equal(expected_plain, expected_on)  # else this test could not fail
    for recorded, expected in (({key: "on"}, "on"), ({}, legacy)):
        sorted(done_dir(out).iterdir())[-1].unlink()  # one task left to do: a partial run
        root = zarr.open_group(out, mode="r+", zarr_format=2)
        run = {k: v for k, v in root.attrs["tileseg"]["run"].items() if k != key}
        root.attrs["tileseg"] = {**root.attrs["tileseg"], "status": "running",
                                 "run": {**run, **recorded}}  # fmt: skip
        result = segment_image(slide[0], out, options)
        assert result.resumed_tasks > 0
        assert read_record(out)["run"][key] == expected
        got = probabilities(out)
        redone = got != expected_on
        if expected == "on":
            assert not redone.any()
        else:  # the redone task's tiles, and only they, are those of the plain setting
            assert redone.any()
            np.testing.assert_array_equal(got[redone], expected_plain[redone])


@pytest.mark.parametrize("save_probabilities", [False, True])
def test_a_resumed_run_takes_labels_from_where_the_run_it_continues_took_them(
    tmp_path, slide, save_probabilities
):
    """Labels are the argmax of the logits; outputs begun when they were that of the
    probabilities (no ``labels_from`` in the record) resume so. The model's logits differ by
    1e-8, which the softmax rounds to a tie: the two give other labels everywhere."""
    model = save_tied_softmax_model(tmp_path / "tied.safetensors", classes=2)
    options = SegmentOptions(model=model, tile=64, chunk=64, batch_size=2,
                             save_probabilities=save_probabilities)  # fmt: skip
    out = tmp_path / "out.zarr"
    segment_image(slide[0], out, options)
    assert read_record(out)["run"]["labels_from"] == "logits"

    def labels():
        return zarr.open_group(out, mode="r")[f"{LABELS_PATH}/0"][...]

    assert np.all(labels() == 1)
    for recorded, expected in (({"labels_from": "logits"}, 1), ({}, 0)):
        sorted(done_dir(out).iterdir())[-1].unlink()  # one task left to do: a partial run
        root = zarr.open_group(out, mode="r+", zarr_format=2)
        run = {k: v for k, v in root.attrs["tileseg"]["run"].items() if k != "labels_from"}
        root.attrs["tileseg"] = {**root.attrs["tileseg"], "status": "running",
                                 "run": {**run, **recorded}}  # fmt: skip
        result = segment_image(slide[0], out, options)
        assert result.resumed_tasks > 0
        got = labels()
        assert read_record(out)["run"]["labels_from"] == ("logits" if expected else "probabilities")
        if expected:
            assert np.all(got == 1)
        else:  # the redone task's tiles, and only they, took labels from the probabilities
            assert 0 < (got == 0).sum() < got.size


@given(tiles=st.integers(1, 3000), batch=st.integers(1, 16), most=st.integers(1, 8))
def test_small_images_get_enough_tasks(tiles, batch, most):
    from pipeline.runtime.worker import MIN_TASKS, batches_per_task

    grid = plan_tiles((tiles * 8, 8), geometry=GEOMETRY, tile=(8, 8), chunk=(8, 8))
    per_task = batches_per_task(SegmentOptions(batches_per_task=most), grid, batch)
    batches = -(-tiles // batch)
    tasks = -(-batches // per_task)
    assert 1 <= per_task <= most
    assert tasks >= min(MIN_TASKS, batches)
    if per_task < most:  # lowered only as far as needed
        assert batches // (per_task + 1) < MIN_TASKS


def test_channel_mismatch_is_refused(tmp_path, model, capsys):
    rgb = np.zeros((64, 64, 3), np.uint8)
    write_tiff(tmp_path / "rgb.tif", rgb, axes="YXS", tile=None)
    args = ["segment", str(tmp_path / "rgb.tif"), str(tmp_path / "o.zarr"), "--model", model]
    # Dark RGB is not brightfield: no stain step, and no channel named as a nuclear stain
    # (tests/engine/test_multichannel.py); the same with --stain none
    for flags in (["--stain", "none"], []):
        assert main([*args, *flags]) == 2
        assert "3 channels (0 red, 1 green, 2 blue) and the model" in one_error_line(capsys)
    rgb16 = np.zeros((64, 64, 3), np.uint16)  # not 8-bit brightfield: left as it is
    write_tiff(tmp_path / "rgb.tif", rgb16, axes="YXS", tile=None)
    assert main(args) == 2
    assert "3 channels (0 red, 1 green, 2 blue) and the model" in one_error_line(capsys)
    model3 = tmp_path / "m3.safetensors"
    save_unet(seeded_unet(UNetConfig(in_channels=2, depth=1, width=2), seed=0), model3)
    assert main([*args[:-1], str(model3)]) == 2  # a model of 2 channels: no choice made for it
    assert "image has 3 channel(s) but the model" in one_error_line(capsys)


def test_existing_output_is_skipped_or_refused_or_overwritten(tmp_path, slide, model, capsys):
    out = tmp_path / "out.zarr"
    args = ["segment", str(slide[0]), str(out), "--model", model, "--no-progress"]
    assert main(args) == 0
    first = read_record(out)
    assert main(args) == 0  # same input, model and config: nothing to do
    assert "(skipped)" in capsys.readouterr().out
    assert read_record(out)["finished"] == first["finished"]
    assert main([*args, "--tile", "128"]) == 2  # another config must not mix with this output
    assert "different input, model or configuration" in one_error_line(capsys)
    assert main([*args, "--tile", "128", "--overwrite"]) == 0
    assert read_record(out)["config"]["tile"] == 128
    other = tmp_path / "other-model.safetensors"
    save_unet(seeded_unet(SMALL, seed=1), other)
    assert main([*args, "--tile", "128", "--model", str(other)]) == 2  # another model
    assert "different input, model or configuration" in one_error_line(capsys)
    (tmp_path / "other.zarr").mkdir()
    assert main(["segment", str(slide[0]), str(tmp_path / "other.zarr"), "--model", model]) == 2
    assert "not a tileseg output" in one_error_line(capsys)


def test_directory_input_isolates_a_corrupt_slide(tmp_path, model, capsys):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a.tif", "b.ome.tif"):
        write_tiff(src / name, rng.integers(0, 255, (70, 90)).astype(np.uint8), axes="YX")
    good = (src / "a.tif").read_bytes()
    (src / "c.tif").write_bytes(good[: len(good) // 3])  # truncated
    out = tmp_path / "out"
    assert main(["segment", str(src), str(out), "--model", model, "--no-progress"]) == 2
    assert "c.tif" in capsys.readouterr().err
    assert read_record(out / "a.zarr")["status"] == "complete"
    assert read_record(out / "b.zarr")["status"] == "complete"
    assert read_record(out / "c.zarr") is None


def test_default_model_runs_without_model_option(tmp_path, slide):
    out = tmp_path / "out.zarr"
    result = segment_image(slide[0], out, SegmentOptions(tile=512, chunk=256))
    assert result.record["model"]["source"] in ("builtin:seeded",) or result.record["model"][
        "source"
    ].endswith("default.safetensors")
    assert read_record(out)["status"] == "complete"


def test_3d_volume(tmp_path):
    config = UNetConfig(ndim=3, depth=1, width=2, padding="same", classes=2)
    model = tmp_path / "m3.safetensors"
    save_unet(seeded_unet(config), model)
    volume = np.random.default_rng(0).random((10, 40, 30)).astype(np.float32)
    write_zarr(tmp_path / "vol.zarr", volume, chunks=(5, 16, 16))
    out = tmp_path / "out.zarr"
    opts = SegmentOptions(model=str(model), tile=16, chunk=8, axes="ZYX")
    segment_image(tmp_path / "vol.zarr", out, opts)
    root = zarr.open_group(out, mode="r")
    assert root[f"{LABELS_PATH}/0"].shape == (10, 40, 30)
    assert root[f"{LABELS_PATH}/0"].chunks == (8, 8, 8)
    assert root[f"{LABELS_PATH}/1"].shape == (10, 20, 15)  # z is not downsampled


@pytest.mark.slow
def test_distributed_cluster_with_processes_gives_identical_output(tmp_path, slide, model):
    import dask
    from distributed import LocalCluster

    # A CPU forward's last bits depend on its thread count (oneDNN and MKL split sums by
    # thread), so the local run is a fresh process with the threads an inference task takes
    # on each of the two workers: half the cores (pipeline/runtime/cores.py), where Dask's nanny
    # starts them with one (OMP_NUM_THREADS=1, MKL_NUM_THREADS=1, ...).
    environ = dask.config.get("distributed.nanny.pre-spawn-environ")
    assert str(environ.get("OMP_NUM_THREADS")) == "1"
    share = str(max(1, usable_cores() // 2))
    threads = {k: share for k in environ if k.endswith("_NUM_THREADS")}
    args = ["--model", model, "--tile", "128", "--chunk", "64", "--save-probabilities"]
    subprocess.run(
        [sys.executable, "-m", "pipeline", "segment", str(slide[0]), str(tmp_path / "local.zarr"),
         *args, "--batch-size", "1", "--no-progress"],
        env={**os.environ, **threads}, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    base = SegmentOptions(model=model, tile=128, chunk=64, save_probabilities=True, batch_size=1)
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        from dataclasses import replace

        opts = replace(base, scheduler=cluster.scheduler_address)
        result = segment_image(slide[0], tmp_path / "cluster.zarr", opts)
    assert result.record["config"]["scheduler"] == cluster.scheduler_address
    a = zarr.open_group(tmp_path / "local.zarr", mode="r")
    b = zarr.open_group(tmp_path / "cluster.zarr", mode="r")
    for name in (f"{LABELS_PATH}/0", f"{LABELS_PATH}/2", "0", "1"):
        np.testing.assert_array_equal(a[name][...], b[name][...])
    assert json.dumps(read_record(tmp_path / "cluster.zarr")["geometry"]) == json.dumps(
        read_record(tmp_path / "local.zarr")["geometry"]
    )


def test_resources_flag_reaches_the_tasks_on_a_cluster(tmp_path, slide, model):
    """``--resources GPU=0.5`` is what inference tasks ask of the cluster's workers: a worker
    with GPU=1 runs them, and the record keeps it."""
    from clusters import TaskRestrictions
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=None, resources={"GPU": 1}) as cluster:  # fmt: skip
        plugin = TaskRestrictions(cluster.scheduler, ("run_block",))
        cluster.scheduler.add_plugin(plugin)
        out = tmp_path / "out.zarr"
        code = main(["segment", str(slide[0]), str(out), "--model", model, "--tile", "128",
                     "--chunk", "64", "--scheduler", cluster.scheduler_address,
                     "--resources", "GPU=0.5", "--no-progress"])  # fmt: skip
    assert code == 0 and read_record(out)["status"] == "complete"
    assert read_record(out)["config"]["resources"] == {"GPU": 0.5}
    assert plugin.seen and all(r == {"GPU": 0.5} for r in plugin.seen.values())


def test_unreachable_scheduler_is_one_line_and_writes_nothing(tmp_path, slide, model, capsys):
    import socket

    import dask

    with socket.socket() as sock:  # a port nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    out = tmp_path / "out.zarr"
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        code = main(["segment", str(slide[0]), str(out), "--model", model,
                     "--scheduler", address, "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert err.startswith(f"tileseg: error: {address}: cannot connect to the Dask scheduler")
    assert not out.exists() or (read_record(out) or {}).get("status") != "complete"


def test_tissue_skipping_instances_and_table(tmp_path):
    """Tiles without tissue are skipped and written as background; objects get ids across
    chunk borders and a table; all of it is recorded."""
    from pipeline.synthetic.render import SyntheticConfig, synthetic_pair

    model = threshold_model(tmp_path / "threshold.safetensors", level=0.35)
    config = SyntheticConfig(seed=4, tissue_fraction=0.4, tissue_scale=300.0, dtype="uint8")
    image, truth = synthetic_pair((512, 512), config=config)
    path = write_tiff(tmp_path / "t.tif", image, axes="YX", tile=(64, 64), pyramid_levels=2)
    out = tmp_path / "out.zarr"
    args = ["segment", str(path), str(out), "--model", model, "--tile", "128", "--chunk", "64"]
    extra = ["--tissue", "otsu", "--instances", "connected", "--table", "csv"]
    assert main([*args, *extra, "--save-probabilities", "--no-progress"]) == 0
    record = read_record(out)
    assert record["run"]["levels_in_tasks"] == 1  # skipped tiles too write their level 1
    assert assert_pyramid_from_level_below(out) == 3
    assert 0 < record["tissue"]["fraction"] < 0.9
    assert record["instances"]["objects"] > 0
    assert record["table"]["objects"] == record["instances"]["objects"]
    assert (out / "objects.csv").read_text().count("\n") == record["table"]["objects"] + 1

    root = zarr.open_group(out, mode="r")
    labels, probs = root[f"{LABELS_PATH}/0"][...], root["0"][...]
    instances = root["labels/instances/0"][...]
    assert instances.shape == labels.shape and ((instances > 0) == (labels > 0)).all()
    # some 64-px tiles were skipped: all background, probability of background exactly 1
    skipped = [
        (y, x)
        for y in range(0, 512, 64)
        for x in range(0, 512, 64)
        if (probs[0, y : y + 64, x : x + 64] == 1).all()
    ]
    assert skipped
    for y, x in skipped:
        assert not labels[y : y + 64, x : x + 64].any()
        assert not truth[y : y + 64, x : x + 64].any()  # no nucleus was lost
    assert "instances" in root["labels"].attrs["labels"]


def test_tissue_threshold_level_and_margin_reach_the_mask(tmp_path):
    """``--tissue fixed --tissue-threshold`` with Otsu's own threshold skips the same tiles;
    a margin as wide as the image skips none; the level the mask is made from is recorded."""
    from pipeline.synthetic.render import SyntheticConfig, synthetic_pair

    model = threshold_model(tmp_path / "threshold.safetensors", level=0.35)
    config = SyntheticConfig(seed=4, tissue_fraction=0.4, tissue_scale=300.0, dtype="uint8")
    image, _ = synthetic_pair((512, 512), config=config)
    path = write_tiff(tmp_path / "t.tif", image, axes="YX", tile=(64, 64), pyramid_levels=2)
    args = ["--model", model, "--tile", "64", "--chunk", "64", "--no-progress"]

    def run(name: str, *extra: str) -> dict:
        assert main(["segment", str(path), str(tmp_path / name), *args, *extra]) == 0
        return read_record(tmp_path / name)

    otsu = run("otsu.zarr", "--tissue", "otsu", "--tissue-level", "1")
    assert otsu["tissue"]["level"] == 1 and otsu["tissue"]["shape"] == [256, 256]
    inferred = otsu["timings"]["tiles_inferred"]
    assert 0 < inferred < 64
    threshold = str(otsu["tissue"]["threshold"])
    fixed = run("fixed.zarr", "--tissue", "fixed", "--tissue-threshold", threshold,
                "--tissue-level", "1")  # fmt: skip
    assert fixed["tissue"]["method"] == "fixed"
    assert fixed["timings"]["tiles_inferred"] == inferred
    wide = run("wide.zarr", "--tissue", "otsu", "--tissue-margin", "512")
    assert wide["timings"]["tiles_inferred"] == 64 and wide["config"]["tissue_margin"] == 512


def test_instance_threshold_and_min_distance_reach_the_instances(tmp_path):
    from pipeline.synthetic.render import SyntheticConfig, synthetic_pair

    model = threshold_model(tmp_path / "threshold.safetensors", level=0.35)
    image, _ = synthetic_pair((256, 256), config=SyntheticConfig(seed=5, dtype="uint8"))
    path = write_tiff(tmp_path / "t.tif", image, axes="YX", tile=(64, 64))
    options = [
        "--model", model, "--tile", "64", "--chunk", "64", "--save-probabilities",
        "--probability-dtype", "float32", "--instances", "watershed", "--no-progress",
    ]  # fmt: skip
    objects = {}
    for threshold, distance in ((0.2, 2), (0.2, 40), (0.9, 2)):
        out = tmp_path / f"{threshold}-{distance}.zarr"
        extra = ["--instance-threshold", str(threshold), "--min-distance", str(distance)]
        assert main(["segment", str(path), str(out), *options, *extra]) == 0
        root = zarr.open_group(out, mode="r")
        instances, probs = root["labels/instances/0"][...], root["0"][...]
        np.testing.assert_array_equal(instances > 0, 1 - probs[0] > threshold)
        objects[threshold, distance] = read_record(out)["instances"]["objects"]
        assert read_record(out)["config"]["min_distance"] == distance
    assert objects[0.2, 2] > objects[0.2, 40]  # close peaks split touching nuclei
    assert objects[0.9, 2] != objects[0.2, 2]


@pytest.mark.parametrize(
    "flags, problem",
    [
        (["--instance-threshold", "0.5"], "needs --instances and --save-probabilities"),
        (["--instances", "connected", "--instance-threshold", "0.5"], "needs --instances"),
        (["--instances", "connected", "--save-probabilities", "--instance-threshold", "1.5"],
         "between 0 and 1"),
        (["--instances", "watershed", "--min-distance", "0"], "must be >= 1"),
    ],
)  # fmt: skip
def test_bad_instance_options_are_refused(tmp_path, slide, model, flags, problem, capsys):
    out = tmp_path / "out.zarr"
    assert main(["segment", str(slide[0]), str(out), "--model", model, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and problem in err
    assert not out.exists()


def test_a_failing_torch_compile_is_one_line(tmp_path, slide, model, monkeypatch, capsys):
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: Broken())
    out = tmp_path / "out.zarr"
    args = ["segment", str(slide[0]), str(out), "--model", model, "--compile", "--no-progress"]
    assert main(args) == 2
    line = one_error_line(capsys)
    assert line.startswith("tileseg: error: --compile: torch.compile failed (RuntimeError: ")
    assert "No working C++ compiler" in line and "more detail" not in line
    assert read_record(out)["status"] != "complete"


def test_out_of_gpu_memory_is_one_line_naming_the_batch_size(tmp_path, slide, model, capsys,
                                                             monkeypatch):  # fmt: skip
    """Running out of device memory (raised here where a GPU would raise it) says what to
    change, in one line, and leaves the output not complete."""
    from pipeline.models.inference import Predictor

    def out_of_memory(self, batch, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Predictor, "predict", out_of_memory)
    out = tmp_path / "out.zarr"
    args = ["segment", str(slide[0]), str(out), "--model", model, "--tile", "64", "--chunk",
            "64", "--batch-size", "3", "--no-progress"]  # fmt: skip
    assert main(args) == 2
    line = one_error_line(capsys)
    assert line.startswith("tileseg: error: --batch-size: out of memory on cpu with batches of 3")
    assert "smaller --batch-size" in line and "--overwrite" in line
    assert read_record(out)["status"] != "complete"


@pytest.mark.parametrize(
    ("given", "cores", "extra", "expected"),
    [
        ("auto", 2, {}, 0),  # the forward's threads take every core: the stages in turn
        ("auto", 4, {}, 0),
        ("auto", 8, {}, 2),  # a core to spare for reading and writing
        ("auto", 2, {"workers": 2}, 2),
        ("auto", 2, {"scheduler": "tcp://somewhere:8786"}, 2),
        (3, 2, {}, 3),
        (0, 8, {}, 0),
    ],
)
def test_prefetch_auto_is_serial_on_a_cpu_of_few_cores(given, cores, extra, expected, monkeypatch):
    from pipeline.runtime.resolved import resolve_runtime
    from pipeline.runtime.worker import resolve_prefetch

    monkeypatch.setattr("pipeline.runtime.resolved.usable_cores", lambda: cores)
    options = SegmentOptions(prefetch=given, device="cpu", **extra)
    assert resolve_prefetch(options.prefetch, resolve_runtime(options)) == expected


def test_prefetch_takes_a_number_or_auto(tmp_path, slide, model):
    out = tmp_path / "out.zarr"
    args = ["segment", str(slide[0]), str(out), "--model", model, "--no-progress"]
    assert main([*args, "--prefetch", "auto"]) == 0
    assert read_record(out)["config"]["prefetch"] == "auto"


def test_example_config_lists_every_option_at_its_default():
    from dataclasses import fields, replace
    from pathlib import Path

    from pipeline.config import load_config, resolve_options

    path = Path(__file__).parents[2] / "configs" / "segment.yaml"
    assert set(load_config(path)) == {f.name for f in fields(SegmentOptions)}
    options = resolve_options(config=path, flags={})
    # the file spells out the 2D tile and chunk that the defaults compute
    assert options.tile_and_chunk(2) == SegmentOptions().tile_and_chunk(2)
    assert replace(options, tile=None, chunk=None) == SegmentOptions()


@pytest.mark.parametrize(
    "argv, problem",
    [
        (["segment", "a.tif", "b.zarr", "--batch-size", "x"], "expected a number or auto"),
        (["segment", "a.tif", "b.zarr", "--prefetch", "soon"], "expected a number or auto"),
        (["segment", "a.tif"], "the following arguments are required: output"),
        (["segmnt", "a.tif", "b.zarr"], "invalid choice: 'segmnt'"),
        (["segment", "a.tif", "b.zarr", "--tissue", "maybe"], "argument --tissue: invalid choice"),
        (["segment", "a.tif", "b.zarr", "--resources", "GPU"], "expected NAME=N, e.g. GPU=1"),
    ],
)
def test_usage_errors_are_one_line(argv, problem, capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and problem in err and "--help" in err


def test_a_small_image_is_one_tile_without_tile_given(tmp_path, model):
    """Without ``--tile`` an image whose one window holds no more pixels than a batch of
    default windows is one forward pass (no halo computed between tiles), labelled exactly as
    the default tiling labels it; a smaller batch keeps the default tile."""
    image = np.random.default_rng(3).integers(0, 4000, (1536, 2048), dtype=np.uint16)
    path = write_tiff(tmp_path / "slide.tif", image, axes="YX", tile=(256, 256))
    runs = {
        "default": SegmentOptions(model=model),
        "tile 1024": SegmentOptions(model=model, tile=1024),
        "batch 1": SegmentOptions(model=model, batch_size=1),
    }
    tiles, labels = {}, {}
    for name, options in runs.items():
        out = tmp_path / f"{name}.zarr"
        tiles[name] = segment_image(path, out, options).record["geometry"]["tile"]
        labels[name] = zarr.open_group(out, mode="r")[f"{LABELS_PATH}/0"][...]
    assert tiles == {"default": [1536, 2048], "tile 1024": [1024, 1024], "batch 1": [1024, 1024]}
    np.testing.assert_array_equal(labels["default"], labels["tile 1024"])
    np.testing.assert_array_equal(labels["default"], labels["batch 1"])
