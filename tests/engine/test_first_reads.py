"""The first row of windows is decoded into the decoded-tile cache while the normalisation is
decided (``driver._first_reads_beside``): the first batch's reads find their tiles decoded,
and the output is the same."""

from __future__ import annotations

import time

import numpy as np
from imagefiles import write_tiff
from outputs import chunk_files

import pipeline.engine.driver
from pipeline.config import SegmentOptions
from pipeline.engine.driver import segment_image
from pipeline.io.chunk_cache import CHUNKS


def test_the_first_row_is_decoded_while_the_normalisation_is_decided(tmp_path, model, monkeypatch):
    image = np.random.default_rng(5).integers(0, 4000, (300, 260), dtype=np.uint16)
    slide = write_tiff(tmp_path / "a.tif", image, axes="YX", tile=(32, 32))
    options = SegmentOptions(model=model, tile=64, chunk=32)
    segment_image(slide, tmp_path / "reference.zarr", options)
    real, seen = pipeline.engine.driver.compute_normalization, []

    def compute_normalization(*args, **kwargs):
        deadline = time.monotonic() + 20
        while not CHUNKS.decodes and time.monotonic() < deadline:
            time.sleep(0.005)
        seen.append(CHUNKS.decodes)  # before its own sample is read
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline.engine.driver, "compute_normalization", compute_normalization)
    CHUNKS.clear()
    out = tmp_path / "out.zarr"
    segment_image(slide, out, options)
    assert len(seen) == 1 and seen[0] > 0
    assert chunk_files(out) == chunk_files(tmp_path / "reference.zarr")
