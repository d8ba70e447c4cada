"""`tileseg demo` end to end on a small slide: what it prints and the pictures it writes."""

from __future__ import annotations

import numpy as np
from skimage.io import imread

from pipeline.cli.main import main

# the shipped H&E model leaves 0.27 of its labelled pixels and 0.26 of its objects on the real
# slide low in haematoxylin; one that took the dermis' collagen for nuclei left 0.62 and 0.71
LOW_HEMATOXYLIN_MAX = 0.35


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
    check_large_nuclei(printed, tmp_path)
    check_real_he(printed, tmp_path)
    assert "napari" in printed
    assert (tmp_path / "segmentation.zarr" / "labels" / "segmentation" / "0").is_dir()
    for name, side in (("qc-overlay.png", 512), ("qc-real-nuclei.png", 512), ("qc-he.png", 1024)):
        picture = imread(tmp_path / name)
        assert picture.shape == (side, side, 3)
        assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 100  # an image, not a flat fill


def check_large_nuclei(printed: str, directory) -> None:
    """The large-nuclei case: ``--object-size auto`` finds their size and segments them, the
    model's own scale does not (it outlines their chromatin), and its QC picture."""
    size = printed.split("large nuclei size:")[1].split("\n")[0]
    estimated, true = float(size.split()[0]), float(size.split("truth")[1].split()[0])
    assert abs(estimated / true - 1) <= 0.25 and true > 60
    assert float(size.split("segmented at")[1].split()[0]) > 3  # input px per model px
    line = printed.split("large nuclei dice:")[1].split("\n")[0]
    dice, plain_dice = float(line.split()[0]), float(line.split("Dice")[1].split(",")[0])
    f1, plain_f1 = (float(part.split()[0].strip(";)")) for part in line.split("object F1")[1:])
    assert dice > 0.9 and f1 > 0.85
    assert plain_dice < dice - 0.1 and plain_f1 < 0.5
    picture = imread(directory / "qc-large-nuclei.png")
    assert picture.shape == (1024, 1024, 3)
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 100


def check_real_he(printed: str, directory) -> None:
    """The real H&E slide (no truth), segmented with the defaults: nuclei found, most of their
    pixels haematoxylin-rich, and its pictures: the whole slide and a full-resolution crop."""
    line = printed.split("real he nuclei:")[1].split("\n")[0]
    assert "he.safetensors" in line and int(line.split()[0]) > 1000
    proxy = printed.split("real he proxy:")[1].split("\n")[0]
    low, low_objects = float(proxy.split()[0]), float(proxy.split(",")[1].split()[0])
    covered = float(proxy.split(";")[1].split()[0])
    assert low < LOW_HEMATOXYLIN_MAX and low_objects < LOW_HEMATOXYLIN_MAX and covered > 0.5
    for name, shape in (
        ("qc-real-he.png", (1484, 1110, 3)),
        ("qc-real-he-crop.png", (600, 600, 3)),
    ):
        picture = imread(directory / name)
        assert picture.shape == shape
        assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 100
