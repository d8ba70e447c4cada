"""The no-truth measure of nuclei found on real H&E (pipeline.training.real_he), checked on
generated H&E where the truth is known: true nuclei are haematoxylin-rich, red cells and
collagen are not."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pipeline.synthetic.render import SyntheticConfig, synthetic_pair
from pipeline.training.real_he import he_proxy

TISSUE = {"collagen": 0.6, "red_cells": 1.5, "cytoplasm": 0.1, "eosin_spread": 0.3}


@pytest.fixture(scope="module")
def slide():
    return synthetic_pair((512, 512), config=SyntheticConfig(kind="he", seed=5, **TISSUE))


def test_true_nuclei_are_haematoxylin_rich(slide):
    rgb, truth = slide
    proxy = he_proxy(rgb, truth, mpp=0.5)
    # blur and pink around each nucleus' rim: a small share even for the truth
    assert proxy["low_hematoxylin_share"] < 0.25 and proxy["eosin_dominant_share"] < 0.2
    assert proxy["low_hematoxylin_objects"] < 0.15 and proxy["hematoxylin_covered"] > 0.9
    assert proxy["objects"] == len(np.unique(truth)) - 1
    areas = np.unique(truth[truth > 0], return_counts=True)[1]
    assert proxy["median_area_um2"] == pytest.approx(np.median(areas) * 0.25)


def test_red_cells_and_collagen_taken_for_nuclei_are_not(slide):
    rgb, truth = slide
    r, g, b = (rgb[..., c].astype(int) for c in range(3))
    red = (r > 150) & (g < 90) & (b < 130) & (truth == 0)  # red cells, bright pink collagen
    wrong, n = ndimage.label(red)
    assert n > 20
    proxy = he_proxy(rgb, wrong, mpp=0.5)
    assert proxy["low_hematoxylin_share"] > 0.9 and proxy["eosin_dominant_share"] > 0.9
    assert proxy["low_hematoxylin_objects"] > 0.9 and proxy["hematoxylin_covered"] < 0.05
    both = np.where(wrong > 0, wrong + int(truth.max()), truth)
    truth_only = he_proxy(rgb, truth, mpp=0.5)
    for key in ("low_hematoxylin_share", "eosin_dominant_share", "low_hematoxylin_objects"):
        assert he_proxy(rgb, both, mpp=0.5)[key] > truth_only[key] + 0.1


def test_density_is_per_mm2_of_tissue():
    rgb = np.full((400, 400, 3), 240, np.uint8)
    rgb[:200] = (200, 120, 170)  # pink tissue on the top half: 200 x 400 px of 1 µm = 0.08 mm²
    instances = np.zeros((400, 400), np.uint32)
    instances[10:20, 10:30], instances[50:60, 50:60] = 7, 9
    rgb[instances > 0] = (70, 50, 130)  # purple nuclei
    proxy = he_proxy(rgb, instances, mpp=1.0)
    assert proxy["objects"] == 2 and proxy["objects_per_mm2"] == pytest.approx(25.0)
    assert proxy["median_area_um2"] == pytest.approx(150.0)
    assert proxy["low_hematoxylin_share"] == 0.0
