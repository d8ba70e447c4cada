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
