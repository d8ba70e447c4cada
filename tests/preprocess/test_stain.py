"""H&E brightfield into one-channel nuclei models: colour deconvolution fitted once per slide."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import zarr
from exactness import check, make_model, reference, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from imagefiles import write_tiff
from profiles import examples
from skimage.color import hed_from_rgb, rgb2hed

from pipeline.cli.main import main
from pipeline.config import SegmentOptions, options_from_mapping
from pipeline.engine.driver import expected_fingerprint, segment_image
from pipeline.errors import TilesegError
from pipeline.io.readers import open_image
from pipeline.models import UNetConfig
from pipeline.models.files import DEFAULT_MODEL
from pipeline.output.ngff import LABELS_PATH, read_record
from pipeline.preprocess.normalize import compute_normalization
from pipeline.preprocess.stain import (
    MACENKO_REFERENCE,
    StainMap,
    StainNormalizer,
    fit_normalizer,
    fit_stain,
    slide_stain,
    stain_step,
)
from pipeline.synthetic.render import _EOSIN, _HEMA, SyntheticConfig, synthetic_pair

FIXED = StainMap(
    weights=tuple(float(w) for w in hed_from_rgb[:, 0]),
    white=(255.0, 255.0, 255.0),
    vectors=(),
    method="ruifrok-johnston",
)


@settings(max_examples=30, deadline=None)
@given(
    image=arrays(np.uint8, st.tuples(st.just(3), st.integers(1, 24), st.integers(1, 24))),
    data=st.data(),
)
def test_the_stain_map_is_per_pixel(image, data):
    """A window's haematoxylin is that window of the whole image's, bit for bit."""
    _, h, w = image.shape
    y0, x0 = data.draw(st.integers(0, h - 1)), data.draw(st.integers(0, w - 1))
    y1, x1 = data.draw(st.integers(y0 + 1, h)), data.draw(st.integers(x0 + 1, w))
    whole = FIXED.apply(image)
    window = FIXED.apply(np.ascontiguousarray(image[:, y0:y1, x0:x1]))
    np.testing.assert_array_equal(window, whole[:, y0:y1, x0:x1])
    # The lookup tables hold what the direct float arithmetic gives.
    direct = FIXED.apply(image.astype(np.float32))
    np.testing.assert_allclose(whole, direct, rtol=1e-5, atol=1e-5)


def test_fixed_vectors_give_scikit_images_haematoxylin():
    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    ours = FIXED.apply(np.moveaxis(rgb, -1, 0))[0]
    # Ours is -log((I + 1) / 256); rgb2hed takes log(I) / log(1e-6) of what it is given, and
    # clips negative amounts to 0.
    theirs = rgb2hed((rgb + 1.0) / 256.0)[..., 0] * -np.log(1e-6)
    np.testing.assert_allclose(np.maximum(ours, 0), theirs, rtol=1e-4, atol=1e-4)
    assert (ours < 0).any()  # the comparison covered both signs


def unit(v):
    return np.asarray(v, np.float64) / np.linalg.norm(v)


def test_macenko_finds_the_stains_the_renderer_used():
    rgb, _ = synthetic_pair((384, 384), config=SyntheticConfig(kind="he", seed=3))
    stain = fit_stain(np.moveaxis(rgb, -1, 0).reshape(3, -1), dtype=np.dtype(np.uint8))
    assert stain.method == "macenko"
    h, e = unit(stain.vectors[0]), unit(stain.vectors[1])
    assert h @ unit(_HEMA) > 0.99
    assert e @ unit(_EOSIN) > 0.95


def test_too_little_tissue_falls_back_to_fixed_vectors():
    glass = np.full((3, 1000), 250, np.uint8)
    stain = fit_stain(glass, dtype=np.dtype(np.uint8))
    assert stain.method == "ruifrok-johnston"
    np.testing.assert_allclose(stain.weights, hed_from_rgb[:, 0])


@pytest.fixture
def he_slide(tmp_path):
    rgb, truth = synthetic_pair((230, 190), config=SyntheticConfig(kind="he", seed=5))
    path = write_tiff(tmp_path / "he.tif", rgb, axes="YXS", tile=(64, 64), compression="zlib")
    return path, rgb, truth


@pytest.mark.parametrize(("tile", "chunk", "threads"), [(32, 32, False), (64, 32, True)])
def test_tiles_equal_one_whole_image_pass_on_he(tmp_path, he_slide, tile, chunk, threads):
    path, rgb, _ = he_slide
    model = make_model(tmp_path, UNetConfig(depth=2, width=4, padding="valid", classes=2))
    probabilities, labels = run(
        path, tmp_path / "out.zarr", model=model, tile=tile, chunk=chunk, parallel_io=threads
    )
    assert read_record(tmp_path / "out.zarr")["normalization"]["stain"]["method"] == "macenko"
    image = open_image(path)
    stain = slide_stain(image, "auto", 1)
    normalised = compute_normalization(image, mode="none", stain=stain).apply(
        np.moveaxis(rgb, -1, 0)
    )
    check(probabilities, labels, reference(model, normalised))


def test_default_model_finds_nuclei_in_generated_he(tmp_path):
    """The shipped fluorescence model on the haematoxylin channel of generated H&E."""
    rgb, truth = synthetic_pair((512, 512), config=SyntheticConfig(kind="he", seed=11))
    path = write_tiff(tmp_path / "he.tif", rgb, axes="YXS", tile=(128, 128), compression="zlib")
    options = SegmentOptions(model=str(DEFAULT_MODEL), tile=256, chunk=256)
    segment_image(path, tmp_path / "out.zarr", options)
    labels = zarr.open_group(tmp_path / "out.zarr", mode="r")[f"{LABELS_PATH}/0"][...]
    found, true = labels > 0, truth > 0
    dice = 2 * (found & true).sum() / (found.sum() + true.sum())
    assert dice > 0.9, dice


def test_stain_none_on_rgb_and_hematoxylin_on_grey_are_one_line(tmp_path, he_slide, capsys):
    grey = write_tiff(tmp_path / "grey.tif", np.zeros((64, 64), np.uint8), axes="YX")
    for target, flags, problem in [
        (
            he_slide[0],
            ["--stain", "none", "--model", str(DEFAULT_MODEL)],
            "3 channels (0 red, 1 green, 2 blue) and the model",
        ),
        (
            grey,
            ["--stain", "hematoxylin"],
            "--stain hematoxylin needs an RGB image, this one has 1 channel(s)",
        ),
        (
            grey,
            ["--stain", "normalize"],
            "--stain normalize needs an RGB image, this one has 1 channel(s)",
        ),
    ]:
        assert (
            main(["segment", str(target), str(tmp_path / "o.zarr"), "--no-progress", *flags]) == 2
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert "Traceback" not in "\n".join(err) and problem in err[-1], err
    with pytest.raises(
        TilesegError, match="stain: must be one of auto, hematoxylin, normalize, none"
    ):
        options_from_mapping({"stain": "blue"})


# ------------------------------------------------------------------ stain normalisation (RGB)


def normalizer_for(rgb: np.ndarray) -> StainNormalizer:
    return fit_normalizer(np.moveaxis(rgb, -1, 0).reshape(3, -1), dtype=np.dtype(np.uint8))


@pytest.fixture(scope="module")
def he_normalizer():
    rgb, _ = synthetic_pair((256, 256), config=SyntheticConfig(kind="he", seed=3))
    return normalizer_for(rgb)


@settings(max_examples=examples(30), deadline=None)
@given(
    image=arrays(np.uint8, st.tuples(st.just(3), st.integers(1, 40), st.integers(1, 40))),
    data=st.data(),
)
def test_the_stain_normalizer_is_per_pixel(he_normalizer, image, data):
    """A window's normalised pixels are that window of the whole image's, bit for bit, for
    lookup-table (uint8) and float input alike."""
    _, h, w = image.shape
    y0, x0 = data.draw(st.integers(0, h - 1)), data.draw(st.integers(0, w - 1))
    y1, x1 = data.draw(st.integers(y0 + 1, h)), data.draw(st.integers(x0 + 1, w))
    for x in (image, image.astype(np.float32)):
        whole = he_normalizer.apply(x)
        window = he_normalizer.apply(x[:, y0:y1, x0:x1])  # a strided view, as tiles may be
        np.testing.assert_array_equal(window, whole[:, y0:y1, x0:x1])
    direct = he_normalizer.apply(image.astype(np.float64))
    np.testing.assert_allclose(he_normalizer.apply(image), direct, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize(
    "vectors",
    [None, ((0.55, 0.75, 0.37), (0.20, 0.85, 0.48)), ((0.70, 0.66, 0.26), (0.10, 0.98, 0.17))],
)
def test_normalised_slides_have_the_reference_stains(vectors):
    """Macenko's method: the normalised slide's own fit finds the reference vectors and the
    reference maximum concentrations, whatever stains the slide had."""
    config = SyntheticConfig(kind="he", seed=3, stain_vectors=vectors, stain_amounts=(0.8, 1.2))
    rgb, _ = synthetic_pair((384, 384), config=config)
    normalizer = normalizer_for(rgb)
    assert normalizer.method == "macenko"
    out = np.clip(np.rint(normalizer.apply(np.moveaxis(rgb, -1, 0))), 0, 255).astype(np.uint8)
    again = fit_normalizer(out.reshape(3, -1), dtype=np.dtype(np.uint8))
    for found, ref in zip(again.vectors, MACENKO_REFERENCE["vectors"], strict=True):
        assert unit(found) @ unit(ref) > 0.99
    np.testing.assert_allclose(
        again.max_concentrations, MACENKO_REFERENCE["max_concentrations"], rtol=0.08
    )


def test_glass_alone_keeps_the_reference_maxima():
    glass = np.full((3, 1000), 250, np.uint8)
    normalizer = fit_normalizer(glass, dtype=np.dtype(np.uint8))
    assert normalizer.method == "ruifrok-johnston"
    assert normalizer.max_concentrations == MACENKO_REFERENCE["max_concentrations"]
    assert np.isfinite(normalizer.apply(glass[:, :, None])).all()


def test_auto_normalises_rgb_brightfield_into_an_rgb_model_only(he_slide, tmp_path):
    image = open_image(he_slide[0])
    assert stain_step("auto", image, 3) == "normalize"
    assert stain_step("auto", image, 1) == "hematoxylin"
    assert stain_step("none", image, 3) is None
    dark = write_tiff(tmp_path / "dark.tif", 255 - he_slide[1], axes="YXS")
    assert stain_step("auto", open_image(dark), 3) is None  # a dark background: fluorescence


@settings(
    max_examples=examples(10),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    shape=st.tuples(st.integers(40, 150), st.integers(40, 150)),
    origin=st.tuples(st.integers(0, 400), st.integers(0, 400)),
    chunk=st.sampled_from([16, 32]),
    tiles=st.integers(1, 2),
    batch_size=st.integers(1, 3),
    threads=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_tiles_equal_one_whole_image_pass_with_stain_normalisation(
    shape, origin, chunk, tiles, batch_size, threads, seed
):
    """Normalisation fitted once per slide into an RGB model: tiled == one whole-image pass."""
    config = SyntheticConfig(kind="he", seed=seed % 7, jpeg=80 if seed % 2 else 0)
    rgb, _ = synthetic_pair(shape, config=config, origin=origin)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = write_tiff(tmp / "he.tif", rgb, axes="YXS", tile=(32, 32), compression="zlib")
        unet = UNetConfig(in_channels=3, depth=2, width=4, padding="valid", classes=2)
        model = make_model(tmp, unet, seed)
        probabilities, labels = run(
            path, tmp / "out.zarr", model=model, tile=chunk * tiles, chunk=chunk,
            batch_size=batch_size, parallel_io=threads,
        )  # fmt: skip
        recorded = read_record(tmp / "out.zarr")["normalization"]["stain"]
        image = open_image(path)
        stain = slide_stain(image, "auto", 3)
        assert recorded == stain.to_dict() and recorded["step"] == "normalize"
        normalised = compute_normalization(image, mode="none", stain=stain).apply(
            np.moveaxis(rgb, -1, 0)
        )
        check(probabilities, labels, reference(model, normalised))


def test_the_stain_step_is_part_of_the_fingerprint(tmp_path, he_slide):
    path = he_slide[0]
    model = make_model(tmp_path, UNetConfig(in_channels=3, depth=1, width=2, classes=2))
    prints = {
        stain: expected_fingerprint(path, SegmentOptions(model=model, stain=stain))
        for stain in ("auto", "normalize", "none")
    }
    assert prints["auto"] != prints["none"]


@pytest.mark.parametrize("in_channels", [1, 3])  # haematoxylin; stain normalisation
def test_a_run_reads_the_slides_sample_once(tmp_path, he_slide, monkeypatch, in_channels):
    """The brightfield check, the stain fit and the percentiles take one sample, read once;
    the same slide opened again is sampled again."""
    from pipeline.preprocess import normalize

    real, reads = normalize._read_sample, []

    def read_sample(image):
        reads.append(image.path)
        return real(image)

    monkeypatch.setattr(normalize, "_read_sample", read_sample)
    model = make_model(tmp_path, UNetConfig(in_channels=in_channels, depth=1, width=2))
    result = segment_image(he_slide[0], tmp_path / "out.zarr", SegmentOptions(model=model))
    assert result.record["normalization"]["stain"]["step"] == (
        "normalize" if in_channels == 3 else "hematoxylin"
    )
    assert len(reads) == 1
    first, _ = normalize.sample_pixels(open_image(he_slide[0]))
    again, _ = normalize.sample_pixels(open_image(he_slide[0]))
    assert len(reads) == 3 and not first.flags.writeable
    np.testing.assert_array_equal(first, again)
