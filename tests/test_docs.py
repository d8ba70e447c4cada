"""The user documents stay user documents: short, and without dated history."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_readme_is_short():
    assert (ROOT / "README.md").stat().st_size <= 12 * 1024


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_documents_carry_no_dates_or_work_log(path):
    text = path.read_text()
    assert not re.findall(r"\b20\d\d-\d\d-\d\d\b", text)
    assert not re.findall(r"\b(?:this|previous|earlier|next) session\b", text, re.I)
