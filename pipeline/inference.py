"""Running a model on batches of tiles, and the whole-image reference pass.

The model returns logits (N, C, *spatial). Probabilities are the softmax over C (the sigmoid
when C == 1); labels are the argmax (p > 0.5 when C == 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.geometry import ModelGeometry, padded_whole
from pipeline.models import LoadedModel

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(device: str) -> torch.device:
    """``auto`` picks the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} requested but there are {torch.cuda.device_count()}")
    return dev


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain float32 (always on CPU: exactness first)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if device.type != "cuda" or precision == "fp32":
        return None
    return torch.float16 if precision == "fp16" else torch.bfloat16


@dataclass
class Predictor:
    """A model placed on a device, turning float32 input batches into probabilities."""

    model: LoadedModel
    device: torch.device
    autocast: torch.dtype | None = None

    @classmethod
    def create(cls, model: LoadedModel, *, device: str = "auto", precision: str = "auto"):
        dev = resolve_device(device)
        model.module.to(dev)
        return cls(model, dev, resolve_precision(precision, dev))

    def logits(self, batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(batch).to(self.device, non_blocking=True)
        with torch.inference_mode():
            if self.autocast is not None:
                with torch.autocast(self.device.type, dtype=self.autocast):
                    y = self.model.module(x)
            else:
                y = self.model.module(x)
        return y.float()

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities (N, C, *out) as float32 numpy for a (N, Cin, *window) batch."""
        y = self.logits(batch)
        with torch.inference_mode():
            p = torch.sigmoid(y) if y.shape[1] == 1 else torch.softmax(y, dim=1)
        return p.cpu().numpy()


def labels_from_probabilities(p: np.ndarray, *, dtype: np.dtype | str = np.uint8) -> np.ndarray:
    """Class labels from (C, *spatial) probabilities."""
    if p.shape[0] == 1:
        return (p[0] > 0.5).astype(dtype)
    return np.argmax(p, axis=0).astype(dtype)


def label_dtype(classes: int) -> np.dtype:
    return np.dtype(np.uint8 if classes <= 256 else np.uint16)


def predict_whole(
    predictor: Predictor, image: np.ndarray, *, geometry: ModelGeometry
) -> np.ndarray:
    """The reference: one forward pass over the whole (C, *spatial) float32 image, mirror-padded
    by the halo (and up to a valid size), cropped back to the image. Returns (K, *spatial)."""
    spatial = image.shape[1:]
    # numpy's own reflect mode, not the tiler's index maps: the reference stays independent.
    pads = ((0, 0), *padded_whole(spatial, geometry))
    padded = np.pad(image, pads, mode="reflect")
    probs = predictor.probabilities(padded[None].astype(np.float32, copy=False))[0]
    crop = tuple(
        slice(h - s, h - s + n)
        for h, s, n in zip(geometry.halo, geometry.shrink, spatial, strict=True)
    )
    return probs[(slice(None), *crop)]
