"""The predictor: labels/probabilities on the device, layouts, batch sizing, device choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from modelfiles import save_tied_softmax_model

from pipeline.config import SegmentOptions
from pipeline.models import ModelSpec, UNetConfig, load_model, save_unet, seeded_unet
from pipeline.models.inference import (
    CPU_BATCH_SIZE,
    LEGACY_AUTO_LAYOUT,
    Predictor,
    auto_batch_size,
    batch_size_from_memory,
    resolve_channels_last,
    resolve_precision,
    worker_device,
)
from pipeline.runtime.resolved import resolve_runtime


def labels_from_probabilities(p: np.ndarray) -> np.ndarray:
    """The definition, in numpy: argmax over classes (first on ties), p > 0.5 for one class."""
    return (p[0] > 0.5).astype(np.uint8) if p.shape[0] == 1 else np.argmax(p, 0).astype(np.uint8)


def labels_from_logits(y: np.ndarray) -> np.ndarray:
    return (y[0] > 0).astype(np.uint8) if y.shape[0] == 1 else np.argmax(y, 0).astype(np.uint8)


def loaded(tmp_path, **config):
    path = tmp_path / "m.safetensors"
    save_unet(seeded_unet(UNetConfig(depth=2, width=4, **config), seed=0), path)
    return load_model(ModelSpec(str(path)))


def batch(model, n=2, extra=8, seed=0):
    side = model.geometry.size_min[0] + extra
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 1, side, side)).astype(np.float32)


@pytest.mark.parametrize("classes", [1, 2, 3])
def test_labels_on_the_device_match_their_definition(tmp_path, classes):
    model = loaded(tmp_path, classes=classes)
    predictor = Predictor.create(model, device="cpu")
    x = batch(model)
    out = predictor.predict(x, probability_dtype="float32")
    assert out.labels.dtype == np.uint8 and out.probabilities.dtype == np.float32
    logits = predictor.logits(x).numpy()
    np.testing.assert_array_equal(out.labels, np.stack([labels_from_logits(y) for y in logits]))
    legacy = predictor.predict(x, labels_from="probabilities").labels
    expected = np.stack([labels_from_probabilities(p) for p in out.probabilities])
    np.testing.assert_array_equal(legacy, expected)
    np.testing.assert_array_equal(out.probabilities, predictor.probabilities(x))
    # Only what is kept comes back: no probabilities unless asked, in the asked dtype.
    assert predictor.predict(x).probabilities is None
    half = predictor.predict(x, probability_dtype="float16").probabilities
    np.testing.assert_array_equal(half, out.probabilities.astype(np.float16))
    wide = predictor.predict(x, label_dtype=np.uint16).labels
    assert wide.dtype == np.uint16 and np.array_equal(wide, out.labels)


def test_channels_last_gives_the_same_result(tmp_path):
    model = loaded(tmp_path, classes=2, padding="valid")
    x = batch(model, n=3)
    plain = Predictor.create(model, device="cpu", channels_last="off")
    cl = Predictor.create(model, device="cpu", channels_last="on")
    assert cl.channels_last and not plain.channels_last
    assert cl.module is not model.module  # the shared, cached model is left as it was
    assert next(model.module.parameters()).is_contiguous()
    a, b = plain.predict(x, probability_dtype="float32"), cl.predict(x, probability_dtype="float32")
    assert np.abs(a.probabilities - b.probabilities).max() < 1e-5


def test_channels_last_is_the_default_on_every_device():
    for device in (torch.device("cpu"), torch.device("cuda")):
        assert resolve_channels_last("auto", device) and resolve_channels_last("on", device)
        assert not resolve_channels_last("off", device)
    # Outputs begun when auto meant CUDA only resume with that.
    assert not resolve_channels_last(LEGACY_AUTO_LAYOUT, torch.device("cpu"))
    assert resolve_channels_last(LEGACY_AUTO_LAYOUT, torch.device("cuda"))
    with pytest.raises(ValueError, match="channels_last"):
        resolve_channels_last("yes", torch.device("cpu"))


def test_auto_precision_is_bf16_only_where_the_gpu_has_it(monkeypatch):
    """bf16 from compute capability 8.0 (Ampere); before it torch emulates it: fp16 there."""
    cuda = torch.device("cuda")
    for capability, expected in [((7, 0), torch.float16), ((7, 5), torch.float16),
                                 ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)]:  # fmt: skip
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, c=capability: c)
        assert resolve_precision("auto", cuda) is expected
        assert resolve_precision("bf16", cuda) is torch.bfloat16  # asked for: as asked
    assert resolve_precision("fp16", cuda) is torch.float16
    assert (
        resolve_precision("fp32", cuda) is None
        and resolve_precision("auto", torch.device("cpu")) is None
    )


class _ShapeRecorder(torch.nn.Module):
    """Stands in for a compiled module: records the inputs it is given."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module, self.inputs = module, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append((tuple(x.shape), x.is_contiguous(memory_format=torch.channels_last)))
        return self.module(x)


def test_a_short_batch_reaches_a_compiled_module_in_its_one_shape_and_layout(tmp_path):
    """A compiled module is specialised to one shape and memory layout: the last, short batch
    is padded to the batch size and kept channels-last (else it would compile again)."""
    model = loaded(tmp_path, classes=2, in_channels=3)  # one channel: every layout is both
    plain = Predictor.create(model, device="cpu", channels_last="on")
    recorder = _ShapeRecorder(plain.module)
    compiled = Predictor(model, plain.device, None, True, plain.module, recorder, batch_size=4)
    x = np.repeat(batch(model, n=2), 3, axis=1)
    out = compiled.predict(x, probability_dtype="float32")
    assert recorder.inputs == [((4, *x.shape[1:]), True)]
    assert out.probabilities.shape[0] == 2
    np.testing.assert_allclose(
        out.probabilities, plain.predict(x, probability_dtype="float32").probabilities, atol=1e-6
    )


@given(
    free=st.integers(0, 2**40),
    fixed=st.integers(0, 2**34),
    per_tile=st.integers(1, 2**34),
    limit=st.integers(1, 128),
)
def test_batch_size_from_memory_is_the_largest_that_fits(free, fixed, per_tile, limit):
    n = batch_size_from_memory(
        free_bytes=free, fixed_bytes=fixed, per_tile_bytes=per_tile, fraction=0.8, limit=limit
    )
    usable = int(free * 0.8)
    assert 1 <= n <= limit
    if n > 1:
        assert fixed + n * per_tile <= usable
    if n < limit:
        assert fixed + (n + 1) * per_tile > usable


def test_cpu_batch_size_and_devices(tmp_path):
    predictor = Predictor.create(loaded(tmp_path, classes=2), device="cpu")
    assert auto_batch_size(predictor, window=(64, 64), in_channels=1) == CPU_BATCH_SIZE
    assert worker_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        assert worker_device("auto") == "auto"
        # workers not given: one local task at a time on the CPU (a forward uses every core)
        assert resolve_runtime(SegmentOptions()).workers == 1
    assert resolve_runtime(SegmentOptions(device="cpu")).workers == 1


@pytest.mark.parametrize("classes", [1, 2, 3])
def test_labels_come_from_the_logits_unless_asked_for_from_the_probabilities(tmp_path, classes):
    model = load_model(
        ModelSpec(save_tied_softmax_model(tmp_path / "m.safetensors", classes=classes))
    )
    predictor = Predictor.create(model, device="cpu")
    x = batch(model)
    out = predictor.predict(x, probability_dtype="float32")
    assert np.all(out.labels == classes - (classes > 1))  # the last logit is the largest
    tied = out.probabilities[:, -1] == (0.5 if classes == 1 else out.probabilities[:, 0])
    assert tied.all()  # else this test could not fail
    legacy = predictor.predict(x, labels_from="probabilities", probability_dtype="float32")
    assert np.all(legacy.labels == 0)
    np.testing.assert_array_equal(legacy.probabilities, out.probabilities)
    assert np.array_equal(predictor.predict(x).labels, out.labels)  # saved or not: the same
    with pytest.raises(ValueError, match="labels_from"):
        predictor.predict(x, labels_from="softmax")


@given(classes=st.integers(2, 6), seed=st.integers(0, 2**16))
def test_device_argmax_takes_the_first_maximum_like_numpy(classes, seed):
    from pipeline.models.inference import _argmax

    rng = np.random.default_rng(seed)
    # Few distinct values: many ties.
    p = torch.from_numpy(rng.integers(0, 3, (2, classes, 7, 5)).astype(np.float32))
    np.testing.assert_array_equal(_argmax(p, dtype=torch.int32).numpy(), p.numpy().argmax(1))
