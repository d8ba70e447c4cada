"""Tissue masks: chunks with objects are never skipped; empty glass is."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from imagefiles import write_zarr
from scipy import ndimage

from pipeline.io.readers import open_image
from pipeline.preprocess.tissue import TissueMask, tissue_mask
from pipeline.synthetic.slides import SyntheticConfig, synthetic_pair, write_synthetic_slide

CHUNK = 64


def chunk_regions(shape):
    for y in range(0, shape[0], CHUNK):
        for x in range(0, shape[1], CHUNK):
            yield (slice(y, min(y + CHUNK, shape[0])), slice(x, min(x + CHUNK, shape[1])))


def check_mask(mask: TissueMask, truth: np.ndarray) -> float:
    """Every chunk holding a nucleus is covered; returns the share of chunks skipped."""
    skipped = 0
    regions = list(chunk_regions(truth.shape))
    for region in regions:
        covered = mask.covers(region)
        assert covered or not truth[region].any(), region
        skipped += not covered
    return skipped / len(regions)


@pytest.mark.parametrize("kind", ["fluorescence", "he"])
def test_tissue_slides_skip_glass_and_keep_every_nucleus(tmp_path, kind):
    config = SyntheticConfig(kind=kind, tissue_scale=300, seed=4)
    image, truth = synthetic_pair((1024, 1024), config=config)
    path = write_zarr(tmp_path / "slide.zarr", image, chunks=(256, 256, 3)[: image.ndim])
    mask = tissue_mask(open_image(path, axes="YXS" if kind == "he" else "YX"), max_side=128)
    assert mask.kind == ("brightfield" if kind == "he" else "fluorescence")
    assert mask.shape == (128, 128) and mask.level == 0 and mask.method == "otsu"
    assert 0.3 < mask.fraction < 0.95
    assert check_mask(mask, truth) > 0.05  # some chunks really are skipped
    assert len(pickle.dumps(mask)) < 4096  # small enough for task specs
    assert mask.to_dict()["fraction"] == mask.fraction and "bits" not in mask.to_dict()


@pytest.mark.parametrize("kind", ["fluorescence", "he"])
def test_all_tissue_is_all_covered(tmp_path, kind):
    config = SyntheticConfig(kind=kind, tissue=False, seed=2)
    image, _ = synthetic_pair((512, 512), config=config)
    path = write_zarr(tmp_path / "full.zarr", image, chunks=(256, 256, 3)[: image.ndim])
    mask = tissue_mask(open_image(path, axes="YXS" if kind == "he" else "YX"), max_side=64)
    assert mask.fraction == 1.0 and "two-class" in mask.note
    assert all(mask.covers(r) for r in chunk_regions((512, 512)))


def test_pyramid_level_is_used(tmp_path):
    config = SyntheticConfig(kind="he", tissue_scale=300, seed=4)
    path = tmp_path / "slide.ome.tif"
    write_synthetic_slide(path, shape=(1024, 1024), config=config, tile=256, levels=3, workers=1)
    _, truth = synthetic_pair((1024, 1024), config=config)
    mask = tissue_mask(open_image(path), max_side=256)
    assert mask.level == 2 and mask.shape == (256, 256)
    check_mask(mask, truth)


def test_covers_margin_off_switch_and_3d(tmp_path):
    bits = np.zeros((10, 10), bool)
    bits[4, 4] = True
    mask = TissueMask((100, 100), (10, 10), np.packbits(bits).tobytes(), 0.01, "fixed", "x")
    assert mask.covers((slice(40, 50), slice(40, 50)))
    assert mask.covers((slice(50, 60), slice(55, 60)))  # one mask pixel of margin
    assert not mask.covers((slice(60, 70), slice(40, 50)))
    assert not mask.covers((slice(0, 100), slice(70, 100)))
    assert not mask.covers((slice(40, 40), slice(40, 50)))  # empty region
    # --tissue-margin: image pixels of glass kept beyond the one mask pixel (tissue at 40..50)
    assert mask.covers((slice(65, 70), slice(40, 50)), margin=10)
    assert not mask.covers((slice(71, 80), slice(40, 50)), margin=10)
    assert mask.covers((slice(0, 10), slice(90, 100)), margin=40)
    off = tissue_mask(open_image(write_zarr(tmp_path / "z.zarr", bits, chunks=(5, 5)), axes="YX"),
                      method="none")  # fmt: skip
    assert off.fraction == 1 and off.covers((slice(0, 1), slice(0, 1)))
    volume = np.zeros((4, 64, 64), np.uint16)
    volume[1:3, 10:30, 20:50] = ndimage.gaussian_filter(np.full((2, 20, 30), 500.0), 1)
    volume += 100
    path = write_zarr(tmp_path / "vol.zarr", volume, chunks=(2, 32, 32))
    mask = tissue_mask(open_image(path, axes="ZYX"), max_side=32, smooth=0)
    assert mask.covers((slice(0, 4), slice(10, 20), slice(20, 30)))
    assert not mask.covers((slice(0, 4), slice(40, 64), slice(0, 64)))
    with pytest.raises(ValueError, match="method"):
        tissue_mask(open_image(path, axes="ZYX"), method="magic")


def test_fixed_threshold_is_otsus_mask_when_given_otsus_threshold(tmp_path):
    """``fixed`` applies the given threshold to the same feature Otsu thresholds: the mask
    follows the threshold, and is trusted (no two-class check)."""
    config = SyntheticConfig(tissue_scale=300, seed=4)
    image, _ = synthetic_pair((512, 512), config=config)
    lazy = open_image(write_zarr(tmp_path / "s.zarr", image, chunks=(256, 256)), axes="YX")
    otsu = tissue_mask(lazy, max_side=64)
    fixed = tissue_mask(lazy, method="fixed", threshold=otsu.threshold, max_side=64)
    assert fixed.method == "fixed" and fixed.threshold == otsu.threshold
    assert (fixed.mask == otsu.mask).all() and 0 < fixed.fraction < 1
    lower = tissue_mask(lazy, method="fixed", threshold=otsu.threshold / 2, max_side=64)
    assert lower.fraction > otsu.fraction and (lower.mask | ~otsu.mask).all()
    with pytest.raises(ValueError, match="needs a threshold"):
        tissue_mask(lazy, method="fixed")
    with pytest.raises(ValueError, match=r"level 3 not in 0\.\.0"):
        tissue_mask(lazy, level=3)
