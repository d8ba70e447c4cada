"""Running a model on batches of tiles, and the whole-image reference pass.

The model returns logits (N, C, *spatial). Probabilities are the softmax over C (the sigmoid
when C == 1); labels are the argmax of the logits (logit > 0 when C == 1), so no softmax is
computed unless probabilities are saved. That is the argmax of the probabilities too, except
where the softmax rounds two different logits to one probability; outputs begun by versions
that took labels from the probabilities resume so (``labels_from`` in the record).

On CUDA the batch travels through pinned host memory with non-blocking copies, the model may
run in channels-last layout, under autocast and compiled, and only what is kept comes back:
labels as one byte per pixel and probabilities only when they are saved, in their saved dtype.
"""

from __future__ import annotations

import copy
import math
import threading
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import CHANNELS_LAST, FOLD_NORM, PRECISION
from pipeline.geometry import ModelGeometry, padded_whole
from pipeline.models import LoadedModel
from pipeline.models.fold import fold_batch_norm
from pipeline.models.planes import module_ndim

__all__ = [
    "CPU_BATCH_SIZE",
    "LEGACY_AUTO_LAYOUT",
    "LEGACY_LABELS_FROM",
    "TASKS_PER_GPU",
    "Prediction",
    "Predictor",
    "auto_batch_size",
    "batch_size_from_memory",
    "label_dtype",
    "predict_whole",
    "resolve_channels_last",
    "resolve_device",
    "resolve_fold_norm",
    "resolve_precision",
    "worker_device",
]

CPU_BATCH_SIZE = 4  # CPU throughput is flat in batch size; memory is not


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
    if precision not in PRECISION:
        raise ValueError(f"precision must be one of {PRECISION}, not {precision!r}")
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "auto":
        # bf16 keeps fp32's range (no overflow in fp16's 65504), but only from compute
        # capability 8.0 (Ampere) is it native: before, torch emulates it, slower than fp32.
        native = torch.cuda.get_device_capability(device) >= (8, 0)
        return torch.bfloat16 if native else torch.float16
    return torch.float16 if precision == "fp16" else torch.bfloat16


LEGACY_AUTO_LAYOUT = "cuda"  # ``auto`` of outputs begun when it meant channels-last on CUDA only


def resolve_channels_last(channels_last: str, device: torch.device) -> bool:
    """Channels-last is the default on every device. On CUDA it feeds tensor cores without
    layout transposes; on the CPU oneDNN's NHWC kernels run the built-in U-Nets 1.2-1.8x
    faster than NCHW (bench/README.md). Either layout is exact: tiles equal one whole-image
    pass in the same layout, bit for bit. The two layouts differ from each other in the last
    bits (~1e-6), so a resumed run keeps the layout of the run it continues
    (``LEGACY_AUTO_LAYOUT`` for outputs begun when ``auto`` meant CUDA only)."""
    if channels_last == LEGACY_AUTO_LAYOUT:
        return device.type == "cuda"
    if channels_last not in CHANNELS_LAST:
        raise ValueError(f"channels_last must be one of {CHANNELS_LAST}, not {channels_last!r}")
    return channels_last != "off"


def resolve_fold_norm(fold_norm: str) -> bool:
    """Batch norm is folded into the convolutions by default (``pipeline/models/fold.py``):
    the same function, one memory pass less per norm, different in the last bits. A resumed
    run keeps the setting of the run it continues (outputs begun before it: off)."""
    if fold_norm not in FOLD_NORM:
        raise ValueError(f"fold_norm must be one of {FOLD_NORM}, not {fold_norm!r}")
    return fold_norm != "off"


def _strict_fp32() -> None:
    """fp32 means IEEE fp32: cuDNN otherwise runs float32 convolutions in TF32 (10-bit
    mantissa), whose rounding differs with the algorithm cuDNN picks per shape, so tiles and
    a whole-image pass would disagree far beyond float rounding. Process-wide, like the flag."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    else:  # torch before 2.9
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def _memory_format(ndim: int) -> torch.memory_format:
    return torch.channels_last if ndim == 4 else torch.channels_last_3d


_slots: dict[int, int] = {}
_slots_lock = threading.Lock()


def worker_device(device: str) -> str:
    """The device for the calling worker thread: with several GPUs and a device of ``auto`` or
    ``cuda``, the threads of a local run are spread over the GPUs in turn (threads on one GPU
    share its one model)."""
    if device not in ("auto", "cuda") or not torch.cuda.is_available():
        return device
    count = torch.cuda.device_count()
    if count < 2:
        return device
    with _slots_lock:
        slot = _slots.setdefault(threading.get_ident(), len(_slots) % count)
    return f"cuda:{slot}"


class Prediction:
    """Host results for a batch: labels (N, *out) and, when kept, probabilities (N, C, *out).

    On CUDA they may still be on their way when ``predict`` returns: the copies are queued
    behind the forward, and reading them (in a writer thread) waits for them. The inference
    thread meanwhile queues the next batch, so the GPU never idles on a host round trip.
    """

    def __init__(
        self,
        labels: np.ndarray,
        probabilities: np.ndarray | None,
        *,
        label_dtype: np.dtype,
        ready: torch.cuda.Event | None = None,
    ) -> None:
        self._labels, self._probabilities = labels, probabilities
        self._label_dtype, self._ready = label_dtype, ready
        self._lock = threading.Lock()
        self._done = False

    def wait(self) -> None:
        with self._lock:
            if self._done:
                return
            if self._ready is not None:
                self._ready.synchronize()
            self._labels = self._labels.astype(self._label_dtype, copy=False)
            self._done = True

    @property
    def labels(self) -> np.ndarray:
        self.wait()
        return self._labels

    @property
    def probabilities(self) -> np.ndarray | None:
        self.wait()
        return self._probabilities


@dataclass
class Predictor:
    """A model placed on a device, turning float32 input batches into labels/probabilities."""

    model: LoadedModel
    device: torch.device
    autocast: torch.dtype | None = None
    channels_last: bool = False
    module: torch.nn.Module | None = None  # the model's module on the device (a copy)
    compiled: torch.nn.Module | None = None  # torch.compile of ``module``, when asked for
    batch_size: int | None = None  # compiled runs pad short batches to this (one shape)

    @classmethod
    def create(
        cls,
        model: LoadedModel,
        *,
        device: str = "auto",
        precision: str = "auto",
        channels_last: str = "auto",
        fold_norm: str = "auto",
        compile: bool = False,
        batch_size: int | None = None,
    ) -> Predictor:
        dev = resolve_device(device)
        cl = resolve_channels_last(channels_last, dev)
        fold = resolve_fold_norm(fold_norm)
        module = model.module
        if dev.type != "cpu" or cl or fold:
            # The loaded model is shared per process: each predictor gets its own copy.
            module = copy.deepcopy(module).to(dev)
            if fold:
                fold_batch_norm(module)
            if cl:
                module = module.to(memory_format=_memory_format(2 + module_ndim(model)))
        autocast = resolve_precision(precision, dev)
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True  # every batch has the same shape
            if autocast is None:
                _strict_fp32()
        compiled = torch.compile(module, dynamic=False) if compile else None
        return cls(model, dev, autocast, cl, module, compiled, batch_size)

    def __post_init__(self) -> None:
        if self.module is None:
            self.module = self.model.module.to(self.device)

    # -- host <-> device -------------------------------------------------------------------

    def batch_buffer(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, np.ndarray]:
        """An empty float32 host batch, pinned on CUDA, and its numpy view: readers fill the
        view in place, so a batch is copied once on its way to the device, not three times."""
        x = torch.empty(shape, dtype=torch.float32, pin_memory=self.device.type == "cuda")
        return x, x.numpy()

    def stage(self, batch: np.ndarray) -> torch.Tensor:
        """A host batch ready for an asynchronous copy (pinned on CUDA), for callers that hold
        a plain numpy batch (the engine's readers fill :meth:`batch_buffer` instead)."""
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        return x.pin_memory() if self.device.type == "cuda" else x

    def _to_device(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = batch if isinstance(batch, torch.Tensor) else self.stage(batch)
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=_memory_format(x.ndim))
        return x

    def _to_host(
        self, tensors: list[torch.Tensor]
    ) -> tuple[list[np.ndarray], torch.cuda.Event | None]:
        """Host arrays of ``tensors`` and, on CUDA, the event after which they are filled
        (pinned buffers, asynchronous copies; the arrays keep their buffers alive)."""
        if self.device.type != "cuda":
            return [t.numpy() for t in tensors], None
        host = []
        for t in tensors:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            buf.copy_(t, non_blocking=True)
            host.append(buf)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        return [h.numpy() for h in host], ready

    # -- forward ---------------------------------------------------------------------------

    def _forward(self, x: torch.Tensor, *, eager: bool = False) -> torch.Tensor:
        n = x.shape[0]
        module = self.module if eager or self.compiled is None else self.compiled
        if module is self.compiled and self.batch_size and n < self.batch_size:
            # A compiled module is specialised to one shape: pad the last short batch.
            pad = x.new_zeros((self.batch_size - n, *x.shape[1:]))
            x = torch.cat([x, pad])
            if self.channels_last:  # cat returns the default layout: a new shape to compile
                x = x.contiguous(memory_format=_memory_format(x.ndim))
        with torch.inference_mode():
            if self.autocast is not None:
                with torch.autocast(self.device.type, dtype=self.autocast):
                    y = module(x)
            else:
                y = module(x)
        return y[:n].float()

    def logits(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Raw model output (N, C, *out) as float32 on the device."""
        return self._forward(self._to_device(batch))

    def predict(
        self,
        batch: np.ndarray | torch.Tensor,
        *,
        label_dtype: np.dtype | str = np.uint8,
        probability_dtype: np.dtype | str | None = None,
        labels_from: str = "logits",
    ) -> Prediction:
        """Labels and (when ``probability_dtype`` is given) probabilities of a (N, Cin, *window)
        batch, computed on the device; only those cross back to the host (asynchronously on
        CUDA: see :class:`Prediction`). ``labels_from`` is one of :data:`LABELS_FROM`."""
        label_dtype = np.dtype(label_dtype)
        if labels_from not in LABELS_FROM:
            raise ValueError(f"labels_from must be one of {LABELS_FROM}, not {labels_from!r}")
        with torch.inference_mode():
            logits = self.logits(batch)
            wanted = probability_dtype is not None or labels_from == "probabilities"
            p = _probabilities(logits) if wanted else None
            # uint8 labels travel as uint8; wider ones as int32 (torch has few uint16 ops).
            wide = torch.uint8 if label_dtype.itemsize == 1 else torch.int32
            if labels_from == "logits":
                labels = _labels(logits, threshold=0.0, dtype=wide)
            else:
                labels = _labels(p, threshold=0.5, dtype=wide)
            keep = [labels]
            if probability_dtype is not None:
                keep.append(p.to(_TORCH_FLOATS[np.dtype(probability_dtype).name]))
            host, ready = self._to_host(keep)
        probabilities = host[1] if len(host) > 1 else None
        return Prediction(host[0], probabilities, label_dtype=label_dtype, ready=ready)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities (N, C, *out) as float32 numpy for a (N, Cin, *window) batch."""
        return self.predict(batch, probability_dtype=np.float32).probabilities

    def probe_memory(self, window: tuple[int, ...], in_channels: int) -> tuple[int, int]:
        """Bytes of device memory a forward needs: (fixed, per tile), measured with batches of
        one and three windows on the eager module (a compiled one would compile twice more).

        Each shape runs once unmeasured first: cuDNN's autotuning (``benchmark``) tries
        algorithms with workspaces of their own at a shape's first forward, which would make
        the peaks, and their difference, arbitrary. A tile costs at least its input window
        (twice: as copied and in the model's layout) and its float32 output."""
        dev = self.device
        counts, peaks = (1, 3), []
        for n in counts:
            shape = (n, in_channels, *window)
            for measured in (False, True):
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
                x = self._to_device(torch.zeros(shape, device=dev))
                y = _probabilities(self._forward(x, eager=True))
                classes = y.shape[1]
                del x, y
                torch.cuda.synchronize(dev)
                if measured:
                    peaks.append(torch.cuda.max_memory_allocated(dev) - base)
        pixels = math.prod(window)
        floor = 4 * pixels * (2 * in_channels + classes)
        per_tile = max((peaks[1] - peaks[0]) // (counts[1] - counts[0]), floor)
        return max(peaks[0] - per_tile, 0), per_tile


_TORCH_FLOATS = {"float16": torch.float16, "float32": torch.float32}


# Where labels come from: the logits, or (outputs begun by earlier versions) the probabilities.
LABELS_FROM = ("logits", "probabilities")
LEGACY_LABELS_FROM = "probabilities"  # what an output's record without ``labels_from`` used


def _labels(y: torch.Tensor, *, threshold: float, dtype: torch.dtype) -> torch.Tensor:
    """Labels from logits (``threshold`` 0) or probabilities (0.5) of shape (N, C, *out)."""
    return (y[:, 0] > threshold).to(dtype) if y.shape[1] == 1 else _argmax(y, dtype=dtype)


def _argmax(p: torch.Tensor, *, dtype: torch.dtype) -> torch.Tensor:
    """``argmax`` over axis 1, the first maximum on ties (as numpy), one pass per class:
    torch.argmax over a non-innermost axis is ~30x slower on the CPU than this."""
    if p.shape[1] == 2:  # one comparison: 7x faster than the loop
        return (p[:, 1] > p[:, 0]).to(dtype)
    best = p[:, 0].clone()
    labels = torch.zeros(best.shape, dtype=dtype, device=p.device)
    for c in range(1, p.shape[1]):
        labels.masked_fill_(p[:, c] > best, c)  # in place: boolean indexing is slower
        torch.maximum(best, p[:, c], out=best)
    return labels


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


TASKS_PER_GPU = 2  # a local run keeps two tasks in flight per GPU (see pipeline.runtime.resolved)


def batch_size_from_memory(
    *, free_bytes: int, fixed_bytes: int, per_tile_bytes: int, fraction: float = 0.8,
    limit: int = 16,
) -> int:  # fmt: skip
    """The largest batch whose forward fits in ``fraction`` of the free device memory (the rest
    is headroom for the allocator), between 1 and ``limit``. Beyond ~16 windows of a million
    pixels a GPU is saturated: larger batches only make tasks coarser."""
    usable = int(free_bytes * fraction) - fixed_bytes
    return int(min(max(usable // max(per_tile_bytes, 1), 1), limit))


def auto_batch_size(
    predictor: Predictor, *, window: tuple[int, ...], in_channels: int, limit: int = 16
) -> int:
    """The batch size for ``--batch-size auto``: from free GPU memory on CUDA, else fixed.
    The memory is shared by the forwards of ``TASKS_PER_GPU`` tasks in flight."""
    if predictor.device.type != "cuda":
        return CPU_BATCH_SIZE
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(predictor.device)
    fixed, per_tile = predictor.probe_memory(window, in_channels)
    torch.cuda.empty_cache()
    return batch_size_from_memory(
        free_bytes=free // TASKS_PER_GPU, fixed_bytes=fixed, per_tile_bytes=per_tile, limit=limit
    )


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
