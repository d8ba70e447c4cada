"""Tests of the synthetic slide generator (pipeline.synthetic.render, pipeline.synthetic.slides)."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import tifffile
import zarr
from scipy import ndimage
from skimage.measure import regionprops as _regionprops

from pipeline.synthetic.render import SyntheticConfig, render_block, synthetic_pair
from pipeline.synthetic.slides import pyramid_shapes, write_synthetic_slide

# a dense, all-tissue region: statistics do not depend on where the tissue field happens to be
DENSE = SyntheticConfig(seed=3, tissue=False)


def regionprops(labels):
    # ids are sparse (derived from cell coordinates): make them dense for skimage
    return _regionprops(np.unique(labels, return_inverse=True)[1].reshape(labels.shape))


def _stitch(cfg, origin, shape, ys, xs, scale=1):
    """Render a region cut at rows ``ys`` and columns ``xs`` block by block and stitch it."""
    image = labels = None
    for y0, y1 in itertools.pairwise(ys):
        for x0, x1 in itertools.pairwise(xs):
            img, lab = render_block(
                cfg, origin=(origin[0] + y0, origin[1] + x0), shape=(y1 - y0, x1 - x0), scale=scale
            )
            if image is None:
                image = np.zeros(shape + img.shape[2:], img.dtype)
                labels = np.zeros(shape, lab.dtype)
            image[y0:y1, x0:x1], labels[y0:y1, x0:x1] = img, lab
    return image, labels


# H&E tissue that is not nuclei: collagen bundles, red cells, cytoplasm, vacuoles, patchy eosin
HE_TISSUE = {"collagen": 0.5, "red_cells": 1.5, "cytoplasm": 0.2, "vacuoles": 0.8,
             "eosin_spread": 0.4}  # fmt: skip


@pytest.mark.parametrize("kind", ["fluorescence", "he", "he-tissue"])
@pytest.mark.parametrize("scale", [1, 2])
def test_block_grid_independence(kind, scale):
    # truth always; the image too once the (block-seeded) noise is switched off
    knobs = HE_TISSUE if kind == "he-tissue" else {}
    cfg = dataclasses.replace(DENSE, kind=kind.removesuffix("-tissue"), noise=False, **knobs)
    origin, shape = (700, 900), (300, 300)
    image, labels = render_block(cfg, origin=origin, shape=shape, scale=scale)
    assert len(np.unique(labels)) > 10
    assert set(labels[149].tolist()) & set(labels[150].tolist()) - {0}  # objects cross the cuts
    for ys, xs in [([0, 150, 300], [0, 150, 300]), ([0, 37, 211, 300], [0, 120, 181, 300])]:
        got_image, got_labels = _stitch(cfg, origin, shape, ys, xs, scale)
        np.testing.assert_array_equal(got_labels, labels)
        np.testing.assert_array_equal(got_image, image)


def test_noise_is_deterministic_and_seeded():
    a = synthetic_pair((256, 256), config=DENSE, origin=(512, 512))
    b = synthetic_pair((256, 256), config=DENSE, origin=(512, 512))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    other = synthetic_pair((256, 256), config=dataclasses.replace(DENSE, seed=4), origin=(512, 512))
    assert not np.array_equal(a[1], other[1])
    assert not np.array_equal(a[0], other[0])
    clean = synthetic_pair(
        (256, 256), config=dataclasses.replace(DENSE, noise=False), origin=(512, 512)
    )
    np.testing.assert_array_equal(clean[1], a[1])  # noise never touches the truth
    assert 0 < np.abs(clean[0].astype(float) - a[0]).mean() < 0.2 * a[0].mean()


def test_object_statistics():
    image, labels = synthetic_pair((1024, 1024), config=DENSE)
    assert image.dtype == np.uint16 and labels.dtype == np.uint32
    fg = labels > 0
    assert 0.1 < fg.mean() < 0.5
    assert 300 < len(np.unique(labels)) < 3000
    assert image[fg].mean() > 2 * image[~fg].mean()  # nuclei are bright
    props = [p for p in regionprops(labels) if min(p.bbox[:2]) > 0 and max(p.bbox[2:]) < 1024]
    radii = np.array([np.sqrt(p.area / np.pi) for p in props])
    assert radii.max() <= 14 * 1.15
    assert 4 < np.median(radii) < 14
    # touching or slightly overlapping pairs: distinct labels in 4-adjacent pixels
    pairs = set()
    for a, b in [(labels[1:], labels[:-1]), (labels[:, 1:], labels[:, :-1])]:
        touch = (a != b) & (a > 0) & (b > 0)
        pairs |= {tuple(sorted(p)) for p in zip(a[touch], b[touch], strict=True)}
    assert len(pairs) >= 20


def test_radius_range_respected():
    cfg = SyntheticConfig(
        seed=1,
        tissue=False,
        radius=(6, 9),
        aspect=1.0,
        irregularity=0.0,
        doublets=0.0,
        separation=1.05,
    )
    _, labels = synthetic_pair((512, 512), config=cfg)
    props = [p for p in regionprops(labels) if min(p.bbox[:2]) > 0 and max(p.bbox[2:]) < 512]
    radii = np.array([np.sqrt(p.area / np.pi) for p in props])
    assert len(radii) > 50
    assert radii.min() >= 6 * 0.9 and radii.max() <= 9 * 1.1
    assert radii.max() - radii.min() > 1.5  # sizes vary


def test_ids_unique_per_object():
    _, near = synthetic_pair((512, 512), config=DENSE)
    _, far = synthetic_pair((512, 512), config=DENSE, origin=(20000, 30000))
    ids_near, ids_far = set(np.unique(near)) - {0}, set(np.unique(far)) - {0}
    assert ids_near and ids_far and not ids_near & ids_far
    # one id = one blob: overlaps may nibble at an object but (almost) never split it
    dense = np.unique(near, return_inverse=True)[1].reshape(near.shape)
    slices = ndimage.find_objects(dense)
    split = sum(ndimage.label(dense[sl] == i)[1] > 1 for i, sl in enumerate(slices, 1) if sl)
    assert split <= 0.02 * len(slices)
    assert near.max() < 2**24  # ids stay compact near the slide origin


def test_tissue_regions():
    cfg = SyntheticConfig(seed=0, tissue=True)
    image, labels = render_block(cfg, origin=(0, 0), shape=(512, 512), scale=16)
    empty = image < np.percentile(image, 3) + 15  # dark, object-free background
    assert 0.02 < empty.mean() < 0.7
    assert (labels[empty] > 0).mean() < 0.01
    assert (labels > 0).mean() > 0.05


def test_he_variant():
    cfg = SyntheticConfig(kind="he", seed=2, tissue=False, dtype="uint16")
    image, labels = synthetic_pair((512, 512), config=cfg)
    assert image.dtype == np.uint8 and image.shape == (512, 512, 3)
    rgb = image.reshape(-1, 3).astype(float)
    nuc, bg = rgb[labels.ravel() > 0], rgb[labels.ravel() == 0]
    assert nuc.sum(1).mean() < bg.sum(1).mean() - 100  # darker
    assert (nuc[:, 2] - nuc[:, 0]).mean() > (bg[:, 2] - bg[:, 0]).mean() + 20  # bluer
    assert bg[:, 1].mean() < bg[:, 0].mean() - 20  # pink background: green absorbed by eosin
    # empty (white) regions exist at slide scale and hold no nuclei
    image, labels = render_block(
        dataclasses.replace(cfg, tissue=True), origin=(0, 0), shape=(512, 512), scale=16
    )
    white = image.min(axis=2) > 215
    assert 0.02 < white.mean() < 0.7
    assert (labels[white] > 0).mean() < 0.01


def test_uint8_fluorescence():
    image, labels = synthetic_pair((256, 256), config=dataclasses.replace(DENSE, dtype="uint8"))
    assert image.dtype == np.uint8
    assert image[labels > 0].mean() > 2 * image[labels == 0].mean()
    assert (image == 255).mean() < 0.01


def test_pyramid_shapes():
    assert pyramid_shapes((8192, 8192)) == [(8192 >> k,) * 2 for k in range(5)]
    assert pyramid_shapes((1500, 1100)) == [(1500, 1100), (750, 550)]
    assert pyramid_shapes((1500, 1100), 3) == [(1500, 1100), (750, 550), (375, 275)]
    assert pyramid_shapes((800, 900)) == [(800, 900)]


def test_config_validation():
    with pytest.raises(ValueError, match="kind"):
        SyntheticConfig(kind="brightfield")
    with pytest.raises(ValueError, match="dtype"):
        SyntheticConfig(dtype="float32")
    with pytest.raises(ValueError):
        SyntheticConfig(cell=16)
    assert hash(SyntheticConfig(radius=[4, 14])) == hash(SyntheticConfig())


def test_write_slide(tmp_path):
    path, truth = tmp_path / "slide.ome.tif", tmp_path / "truth.ome.tif"
    cfg = SyntheticConfig(seed=5, tissue=False)
    write_synthetic_slide(
        path, shape=(1500, 1100), config=cfg, tile=256, truth_path=truth, pixel_size=0.25
    )
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and tif.is_bigtiff
        series = tif.series[0]
        assert series.shape == (1500, 1100) and series.dtype == np.uint16
        assert [lv.shape for lv in series.levels] == [(1500, 1100), (750, 550)]
        page = tif.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (256, 256)
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert 'PhysicalSizeX="0.25"' in tif.ome_metadata
        assert 'PhysicalSizeY="0.25"' in tif.ome_metadata
        level0 = series.levels[0].asarray()
        level1 = series.levels[1].asarray()
    with tifffile.TiffFile(truth) as tif:
        labels = tif.series[0].asarray()
        assert tif.pages[0].is_tiled
    expected = render_block(cfg, origin=(0, 0), shape=(1500, 1100))[1]
    np.testing.assert_array_equal(labels, expected)
    assert level0[labels > 0].mean() > 2 * level0[labels == 0].mean()
    down = level0.reshape(750, 2, 550, 2).mean(axis=(1, 3))
    assert np.corrcoef(down.ravel(), level1.ravel().astype(float))[0, 1] > 0.9


def test_write_slide_he_zarr_truth(tmp_path):
    path, truth = tmp_path / "he.ome.tif", tmp_path / "truth.zarr"
    cfg = SyntheticConfig(kind="he", seed=6)
    write_synthetic_slide(
        path, shape=(600, 500), config=cfg, tile=128, truth_path=truth, levels=2, compression=None
    )
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        assert series.shape == (600, 500, 3) and series.dtype == np.uint8
        assert [lv.shape for lv in series.levels] == [(600, 500, 3), (300, 250, 3)]
        assert tif.pages[0].photometric == tifffile.PHOTOMETRIC.RGB
    labels = zarr.open_array(truth, mode="r")
    assert labels.chunks == (128, 128) and labels.dtype == np.uint32
    np.testing.assert_array_equal(labels[:], render_block(cfg, origin=(0, 0), shape=(600, 500))[1])


def test_appearance_knobs_change_the_pixels_not_the_truth():
    """Chromocentres, nucleoli, defocus and background ramps are drawn on the same nuclei."""
    plain = synthetic_pair((256, 256), config=DENSE)
    knobs = dataclasses.replace(DENSE, spots=4.0, nucleoli=0.6, defocus=0.3, gradient=1.0)
    real = synthetic_pair((256, 256), config=knobs)
    np.testing.assert_array_equal(real[1], plain[1])
    fg = plain[1] > 0
    # bright spots: the brightest nuclear pixels stand further above the typical one
    spread = [np.percentile(im[fg], 99.5) / np.median(im[fg]) for im in (plain[0], real[0])]
    assert spread[1] > 1.3 * spread[0]
    assert real[0][~fg].mean() > plain[0][~fg].mean()  # the background ramp adds light


def test_varied_training_slides_with_textures_and_zoom():
    from pipeline.training.data import varied_config

    plain = varied_config(1001)
    assert (plain.spots, plain.nucleoli, plain.texture_scale) == (0.0, 0.0, 1.0)
    rich = varied_config(1001, textures=True, zoom=(0.7, 1.45))
    f = rich.radius[1] / plain.radius[1]
    assert 0.7 <= f <= 1.45 and rich.radius[0] / plain.radius[0] == pytest.approx(f)
    assert rich.cell >= 2 * rich.separation * rich.radius[1]
    assert rich.photons == plain.photons  # the original draws keep their values
    spots = [varied_config(s, textures=True).spots for s in range(1000, 1040)]
    assert 0 < sum(s > 0 for s in spots) < 40  # chromocentres in some images, not all


def test_he_knobs_change_the_colours_not_the_truth():
    """Stain vectors and amounts, glass brightness and JPEG compression: other pixels, the
    same nuclei, and still a pure function of the configuration."""
    base = dataclasses.replace(DENSE, kind="he")
    plain = synthetic_pair((128, 128), config=base)
    knobs = dataclasses.replace(
        base,
        stain_vectors=((0.56, 0.72, 0.41), (0.22, 0.80, 0.56)),
        stain_amounts=(1.3, 0.6),
        white=225.0,
        jpeg=70,
    )
    changed = synthetic_pair((128, 128), config=knobs)
    np.testing.assert_array_equal(changed[1], plain[1])
    assert np.abs(changed[0].astype(int) - plain[0]).mean() > 5
    np.testing.assert_array_equal(synthetic_pair((128, 128), config=knobs)[0], changed[0])
    nuclei = plain[1] > 0  # more haematoxylin: darker nuclei
    assert changed[0][nuclei].mean() < plain[0][nuclei].mean()
    with pytest.raises(ValueError, match="jpeg"):
        dataclasses.replace(base, jpeg=101)
    with pytest.raises(ValueError, match="stain_vectors"):
        dataclasses.replace(base, stain_vectors=((1.0, 0.0, 0.0),))


def test_varied_he_slides_draw_stains_and_compression():
    from pipeline.training.data import varied_config

    configs = [varied_config(s, kind="he") for s in range(1000, 1020)]
    assert len({c.stain_vectors for c in configs}) == 20
    assert 0 < sum(c.jpeg > 0 for c in configs) < 20
    fluorescence = varied_config(1001)
    assert varied_config(1001, kind="he").photons == fluorescence.photons  # same earlier draws
    assert fluorescence.stain_vectors is None and fluorescence.jpeg == 0


def test_he_tissue_that_is_not_nuclei_stays_out_of_the_truth():
    """Collagen bundles, red cells, cytoplasm and vacuoles change the pixels; the truth only
    loses the nuclei that the dermis thins out; red cells are red, bundles pink."""
    base = dataclasses.replace(DENSE, kind="he", seed=5, noise=False)
    plain_image, plain = synthetic_pair((512, 512), config=base)
    rich = dataclasses.replace(base, **HE_TISSUE)
    image, labels = synthetic_pair((512, 512), config=rich)
    np.testing.assert_array_equal(synthetic_pair((512, 512), config=rich)[0], image)
    kept = set(np.unique(labels).tolist())
    assert kept < set(np.unique(plain).tolist())  # fewer nuclei, none new
    assert np.abs(image.astype(int) - plain_image).mean() > 5
    red = (image[..., 0] > 150) & (image[..., 1] < 90) & (image[..., 2] < 130)
    assert red.mean() > 0.002 and (labels[red] > 0).mean() < 0.2
    assert red.sum() > 20 * ((plain_image[..., 0] > 150) & (plain_image[..., 1] < 90)
                             & (plain_image[..., 2] < 130)).sum()  # fmt: skip
    # no knob, no change: the default H&E slide is drawn as before
    zero = dataclasses.replace(base, **dict.fromkeys(HE_TISSUE, 0.0))
    np.testing.assert_array_equal(synthetic_pair((512, 512), config=zero)[0], plain_image)
    with pytest.raises(ValueError, match="collagen"):
        dataclasses.replace(base, collagen=1.5)
