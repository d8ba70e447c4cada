"""Options are declared once: the flags, the YAML keys, their checks and the docs' table agree."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from pipeline.cli.main import build_parser
from pipeline.config import SECTIONS, SegmentOptions, declared, options_from_mapping, options_table
from pipeline.errors import TilesegError

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_option_table_is_the_declared_one():
    text = (ROOT / "docs" / "cli.md").read_text()
    table = re.search(r"<!-- options:begin -->\n(.*?)<!-- options:end -->", text, re.S)
    assert table is not None and table.group(1) == options_table()


def test_every_option_has_one_flag_and_a_section():
    parser = build_parser()
    segment = parser._subparsers._group_actions[0].choices["segment"]
    dests = {action.dest for action in segment._actions}
    for f in fields(SegmentOptions):
        option = f.metadata["option"]
        assert option.section in SECTIONS and option.help
        assert f.name in dests


def test_each_default_passes_its_own_check():
    defaults = {name: f.default for name, (f, _) in declared().items()}
    assert options_from_mapping(defaults) == SegmentOptions()


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [("tile", 0, "must be >= 1"), ("tissue_threshold", 1.0, "must be >= 0 and < 1"),
     ("precision", "fp64", "must be one of"), ("device", "tpu", "cuda:N"),
     ("percentiles", [50, 10], "low < high"), ("mpp", 0, "pixel size")],
)  # fmt: skip
def test_bounds_and_choices_come_from_the_declaration(key, value, problem):
    with pytest.raises(TilesegError, match=re.escape(problem)):
        options_from_mapping({key: value})


# --------------------------------------------------------------------- YAML configs, one loader

NESTED = """\
model: {halo: 8, align: 4}
tiling: {tile: 512, chunk: 256}
compute:
  batch-size: 2
  device: cpu
tissue: {tissue: otsu, tissue_margin: 3}
execution:
"""


def test_sections_nest_the_options_of_their_flat_keys(tmp_path):
    from pipeline.config import load_config

    nested, flat = tmp_path / "nested.yaml", tmp_path / "flat.yaml"
    nested.write_text(NESTED)
    flat.write_text("halo: 8\nalign: 4\ntile: 512\nchunk: 256\nbatch_size: 2\ndevice: cpu\n"
                    "tissue: otsu\ntissue-margin: 3\n")  # fmt: skip
    options = options_from_mapping(load_config(nested), source=str(nested))
    assert options == options_from_mapping(load_config(flat), source=str(flat))
    assert options.tile == 512 and options.tissue == "otsu" and options.batch_size == 2
    # a file may also hold other commands' configs: `segment:` is ours, sections and all
    both = tmp_path / "both.yaml"
    both.write_text(
        "train: {epochs: 2}\nsegment:\n" + "".join(f"  {x}\n" for x in NESTED.split("\n"))
    )
    assert options_from_mapping(load_config(both), source=str(both)) == options


@pytest.mark.parametrize(
    ("text", "problem"),
    [("tiling: {device: cpu}\n", "tiling.device: not an option of section tiling"),
     ("compute: {colour: red}\n", "compute.colour: not an option of section compute"),
     ("tile: 256\ntiling: {tile: 512}\n", "tiling.tile: given twice"),
     ("colour: red\n", "unknown option 'colour'"),
     ("tiling: 512\n", "unknown option 'tiling'")],
)  # fmt: skip
def test_a_key_outside_its_section_or_unknown_is_one_line_naming_the_file(tmp_path, text, problem):
    from pipeline.config import load_config

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(TilesegError) as error:
        options_from_mapping(load_config(path), source=str(path))
    line = str(error.value)
    assert line.startswith(f"{path}: ") and problem in line and "\n" not in line


def test_train_and_directory_configs_use_the_same_loader(tmp_path):
    from flows.core import load_directory_config
    from pipeline.training.train import load_train_config

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("segment: {tile: 256}\ntrain: {epochs: 2, steps-per-epoch: 3}\n")
    config = load_train_config(recipe)
    assert (config.epochs, config.steps_per_epoch) == (2, 3)
    recipe.write_text("train: {epochs: 2, colour: red}\n")
    with pytest.raises(TilesegError, match=re.escape(f"{recipe}: unknown option 'colour'")):
        load_train_config(recipe)
    directory = tmp_path / "directory.yaml"
    directory.write_text("segment:\n  tiling: {tile: 256}\nrun: {retries: 0}\n")
    loaded = load_directory_config(directory)
    assert loaded.options.tile == 256 and loaded.run.retries == 0
    directory.write_text(NESTED)  # a plain segment options file, with sections
    assert load_directory_config(directory).options.tile == 512


def test_a_section_is_a_read_only_view_of_its_options():
    options = SegmentOptions(tile=512, device="cpu")
    tiling = options.section("tiling")
    assert tiling["tile"] == 512 and tiling["chunk"] is None
    assert list(tiling) == [k for k, (_, opt) in declared().items() if opt.section == "tiling"]
    assert options.section("compute")["device"] == "cpu"
    with pytest.raises(TypeError):
        tiling["tile"] = 256  # type: ignore[index]
    assert set().union(*(options.section(s) for s in SECTIONS)) == set(declared())
    with pytest.raises(ValueError, match="no section"):
        options.section("colour")
