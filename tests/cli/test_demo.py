"""`tileseg demo` end to end on a small slide: what it prints and the pictures it writes."""

from __future__ import annotations

import numpy as np
from skimage.io import imread

from pipeline.cli.main import main


def test_demo_reports_scores_and_writes_qc_pictures(tmp_path, capsys):
    assert main(["demo", "--dir", str(tmp_path), "--size", "512", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "512x512 px" in printed
    dice = float(printed.split("foreground dice:")[1].split()[0])
    assert dice > 0.9
    real = float(printed.split("real nuclei dice:")[1].split()[0])
    assert real > 0.9
    he = float(printed.split("he dice:")[1].split()[0])
    assert he > 0.9
    assert "he.safetensors, stain normalize" in printed  # picked for RGB brightfield
    assert "napari" in printed
    assert (tmp_path / "segmentation.zarr" / "labels" / "segmentation" / "0").is_dir()
    for name, side in (("qc-overlay.png", 512), ("qc-real-nuclei.png", 512), ("qc-he.png", 1024)):
        picture = imread(tmp_path / name)
        assert picture.shape == (side, side, 3)
        assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 100  # an image, not a flat fill
