"""``tileseg train``: train the built-in U-Net on image/mask pairs or on generated data.

The recipe (a :class:`TrainConfig`, usually a YAML file such as ``configs/train-default.yaml``)
fixes the data, the architecture, the schedule and the seed. Training draws random crops (lazily
read, augmented), holds out whole images (or the last rows of a single image) for validation,
stops early when the validation loss stops improving, keeps the best epoch's weights and writes
one ``.safetensors`` file whose metadata carries the config and the training record.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
import types
import typing
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import __version__
from pipeline.config import load_yaml_config
from pipeline.errors import TilesegError
from pipeline.io.channels import channel_listing
from pipeline.io.readers import LazyImage
from pipeline.models import ModelMetadata, UNet, UNetConfig, save_unet
from pipeline.objects.size import training_object_size
from pipeline.runtime.heap import keep_freed_memory
from pipeline.training.data import (
    CropGeometry,
    TrainPair,
    augment,
    draw_crops,
    file_pairs,
    heldout_dice,
    read_crop,
    split_pairs,
    synthetic_pairs,
)

__all__ = [
    "Augment",
    "HeldOut",
    "SyntheticData",
    "TrainConfig",
    "TrainResult",
    "config_from_mapping",
    "crop_geometry",
    "load_train_config",
    "train",
    "with_overrides",
]

DEFAULT_ARCH = {"depth": 3, "width": 16, "padding": "valid", "norm": "batch"}


@dataclass(frozen=True)
class SyntheticData:
    """Generated training pairs: ``images`` squares of ``size`` px, slide seeds from ``seed``."""

    kind: str = "fluorescence"
    images: int = 32
    size: int = 768
    seed: int = 1000
    vary: bool = True
    # real nuclei's texture and clutter (pipeline.training.data.varied_config): on every
    # varied image (true), or on this share of them, drawn per image
    textures: bool | float = False
    zoom: tuple[float, float] = (1.0, 1.0)  # scale augmentation: object size factor range

    def __post_init__(self) -> None:
        _require(self.kind in ("fluorescence", "he"), "kind: must be fluorescence or he")
        _require(self.images >= 2 and self.size >= 64, "images >= 2 and size >= 64 needed")
        _require(0.25 <= self.zoom[0] <= self.zoom[1] <= 4, "zoom: need 0.25 <= low <= high <= 4")
        _require(0 <= self.textures <= 1, "textures: true, false or a share in [0, 1]")


@dataclass(frozen=True)
class Augment:
    flip: bool = True
    rotate: bool = True
    gain: float = 0.3  # log-uniform intensity gain in exp(±gain)
    offset: float = 0.1  # additive offset in ±offset (normalised units)
    noise: float = 0.03  # Gaussian noise sd up to this

    def __post_init__(self) -> None:
        _require(min(self.gain, self.offset, self.noise) >= 0, "gain, offset, noise must be >= 0")


@dataclass(frozen=True)
class HeldOut:
    """Generated test images never trained on: default-parameter slides, seeds from ``seed``."""

    kind: str = "fluorescence"
    images: int = 8
    size: int = 512
    seed: int = 0
    scales: bool = False  # also score object sizes 8..128 px (pipeline.training.scale_eval)

    def __post_init__(self) -> None:
        _require(self.kind in ("fluorescence", "he"), "kind: must be fluorescence or he")
        _require(self.images >= 1 and self.size >= 64, "images >= 1 and size >= 64 needed")


@dataclass(frozen=True)
class TrainConfig:
    """A training recipe; see ``configs/train-default.yaml`` for what each option means."""

    model: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_ARCH))
    images: str | None = None
    masks: str | None = None
    axes: str | None = None
    level: int = 0
    allow_missing_chunks: bool = False
    # the images' channels the model is given, by name or index (as `tileseg segment --channels`)
    channels: str | None = None
    synthetic: SyntheticData | None = None
    heldout: HeldOut | None = None
    val_fraction: float = 0.2
    seed: int = 0
    epochs: int = 30
    steps_per_epoch: int = 40
    batch_size: int = 8
    crop: int = 160
    val_crops: int = 48
    lr: float = 0.002
    weight_decay: float = 0.0001
    patience: int = 5
    min_delta: float = 0.0
    percentiles: tuple[float, float] = (1.0, 99.8)
    # stain step fitted per image before the percentiles, as `tileseg segment --stain` does
    stain: str = "none"
    # two classes: touching instances' contact lines are background in the target
    # (pipeline.training.data.contact_lines), so touching objects come out separable
    gaps: bool = False
    augment: Augment = field(default_factory=Augment)
    device: str = "auto"
    # recorded in the model file: one name per class, and the pixel size (µm) of the training
    # images (default: theirs, when every image says and they agree)
    class_names: tuple[str, ...] | None = None
    pixel_size_um: float | None = None

    def __post_init__(self) -> None:
        try:
            unet = self.unet
        except (TypeError, ValueError) as exc:
            raise ValueError(f"model: {exc}") from None
        _require(unet.classes >= 2, "model: classes must be >= 2 (background + foreground)")
        _require((self.images is None) == (self.masks is None), "images and masks go together")
        _require(
            self.images is None or self.synthetic is None,
            "give images/masks or synthetic, not both",
        )
        _require(self.channels is None or self.images is not None, "channels: of images only")
        for name in ("epochs", "steps_per_epoch", "batch_size", "val_crops", "patience"):
            _require(getattr(self, name) >= 1, f"{name}: must be >= 1")
        _require(self.crop >= 2**unet.depth, f"crop: must be >= {2**unet.depth}")
        _require(0 < self.val_fraction < 1, "val_fraction: must be in (0, 1)")
        _require(self.lr > 0, "lr: must be > 0")
        _require(min(self.weight_decay, self.min_delta) >= 0, "weight_decay, min_delta: >= 0")
        _require(0 <= self.percentiles[0] < self.percentiles[1] <= 100, "percentiles: bad range")
        _require(
            self.stain in ("none", "hematoxylin", "normalize"),
            "stain: none, hematoxylin or normalize",
        )
        _require(
            self.device in ("auto", "cpu") or self.device.startswith("cuda"),
            "device: auto, cpu, cuda[:N]",
        )
        _require(
            self.class_names is None or len(self.class_names) == unet.classes,
            f"class_names: one name per class ({unet.classes}) needed",
        )
        _require(self.pixel_size_um is None or self.pixel_size_um > 0, "pixel_size_um: > 0")
        _require(not self.gaps or unet.classes == 2, "gaps: needs a two-class model")
        if self.heldout is not None:
            need = 3 if self.heldout.kind == "he" and self.stain != "hematoxylin" else 1
            _require(unet.in_channels == need, f"heldout: {self.heldout.kind} needs {need} channel")
        s, h = self.synthetic, self.heldout
        if s is not None and h is not None:
            overlap = range(max(s.seed, h.seed), min(s.seed + s.images, h.seed + h.images))
            _require(not overlap, "heldout: seeds overlap the training seeds")

    @property
    def unet(self) -> UNetConfig:
        """The architecture: ``model`` keys over the default model's (not UNetConfig's)."""
        return UNetConfig.from_dict({**DEFAULT_ARCH, **self.model})

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["model"] = self.unet.to_dict()
        data["percentiles"] = list(self.percentiles)
        if self.class_names is not None:
            data["class_names"] = list(self.class_names)
        return data


def _require(ok: bool, problem: str) -> None:
    if not ok:
        raise ValueError(problem)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Check ``value`` against a (simple) type hint; returns it in canonical form."""
    if isinstance(hint, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) > 1:  # the first kind that takes the value: bool | float takes true, 0.5
            for kind in kinds:
                try:
                    return _coerce(kind, value, key)
                except ValueError:
                    pass
            names = " or ".join(k.__name__ for k in kinds)
            raise ValueError(f"{key}: expected {names}, got {value!r}")
        (hint,) = kinds
    if is_dataclass(hint):
        return _from_mapping(hint, value, key + ".")
    origin = typing.get_origin(hint)
    if origin is tuple and typing.get_args(hint) == (str, Ellipsis):
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{key}: expected a list of names, got {value!r}")
        return tuple(value)
    if origin is tuple:
        n = len(typing.get_args(hint))
        if not isinstance(value, list | tuple) or len(value) != n:
            raise ValueError(f"{key}: expected a list of {n} numbers, got {value!r}")
        return tuple(_coerce(float, v, key) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, str):
        try:  # PyYAML reads exponents without a dot (1e-4) as strings
            return float(value)
        except ValueError:
            pass
    ok = isinstance(value, hint) and not (isinstance(value, bool) and hint is not bool)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise ValueError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def _from_mapping(cls: type, data: Any, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    for key in data:
        if key not in known:
            raise ValueError(f"unknown option {prefix + str(key)!r} (known: {', '.join(known)})")
    values = {k: _coerce(hints[k], v, prefix + k) for k, v in data.items()}
    try:
        return cls(**values)
    except ValueError as exc:
        raise ValueError(f"{prefix}{exc}") from None


def config_from_mapping(
    data: dict[str, Any], *, base: TrainConfig | None = None, source: str | None = None
) -> TrainConfig:
    """Apply a mapping of options (from YAML or flags) on top of ``base``; unknown keys and bad
    values are refused with a :class:`TilesegError` naming ``source``."""
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    merged = {f.name: getattr(base, f.name) for f in fields(TrainConfig)} if base else {}
    merged = {k: asdict(v) if is_dataclass(v) else v for k, v in merged.items()}
    try:
        return _from_mapping(TrainConfig, {**merged, **data})
    except ValueError as exc:
        raise TilesegError(source, str(exc)) from None


def load_train_config(path: str | os.PathLike[str]) -> TrainConfig:
    """Read a YAML recipe: a mapping of options, or one under a ``train:`` section."""
    return config_from_mapping(load_yaml_config(path, command="train"), source=os.fspath(path))


# ------------------------------------------------------------------------------ training


@dataclass
class TrainResult:
    path: Path
    record: dict[str, Any]


def crop_geometry(config: UNetConfig, crop: int) -> CropGeometry:
    """Training window for about ``crop`` output pixels per side: a valid U-Net's loss covers
    only the output (the window's centre); a same U-Net's covers the whole window."""
    g = config.geometry
    if config.padding == "same":
        size = math.ceil(crop / g.align[0]) * g.align[0]
        return CropGeometry(size, size)
    size = g.input_size(crop, 0)
    return CropGeometry(size, g.output_size(size, 0))


def _segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus soft Dice loss of the non-background classes (Dice is the metric)."""
    ce = F.cross_entropy(logits, target)
    probs = logits.softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = (0, *range(2, logits.dim()))
    inter = (probs * onehot).sum(dims)[1:]
    total = (probs + onehot).sum(dims)[1:]
    return ce + 1 - ((2 * inter + 1) / (total + 1)).mean()


def _batches(pairs, draws, crop, classes, bs, rng=None, aug=None, *, gaps=False):
    for i in range(0, len(draws), bs):
        xs, ys = [], []
        for k, origin in draws[i : i + bs]:
            x, y = read_crop(pairs[k], origin, crop, classes=classes, gaps=gaps)
            if rng is not None:
                x, y = augment(x, y, rng, **asdict(aug))
            xs.append(x)
            ys.append(y)
        yield torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def _evaluate(model: UNet, batches, device: torch.device) -> tuple[float, float]:
    """Mean loss and pooled foreground Dice (argmax > 0 against target > 0) over ``batches``."""
    model.eval()
    loss = n = inter = total = 0
    with torch.no_grad():
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss += float(_segmentation_loss(logits, y)) * len(x)
            n += len(x)
            pred, truth = logits.argmax(1) > 0, y > 0
            inter += int((pred & truth).sum())
            total += int(pred.sum()) + int(truth.sum())
    return loss / max(n, 1), 1.0 if total == 0 else 2 * inter / total


def _load_data(config: TrainConfig) -> tuple[list[TrainPair], dict[str, Any]]:
    if config.synthetic is not None:
        s = config.synthetic
        pairs = synthetic_pairs(
            images=s.images, size=s.size, seed=s.seed, vary=s.vary, kind=s.kind,
            percentiles=config.percentiles, textures=s.textures, zoom=s.zoom,
            stain=config.stain,
        )  # fmt: skip
        return pairs, {"source": "synthetic", **asdict(s)}
    if config.images is None or config.masks is None:
        raise TilesegError(
            "--images", "no training data: give --images and --masks, or --synthetic"
        )
    pairs = file_pairs(
        config.images, config.masks, percentiles=config.percentiles, axes=config.axes,
        level=config.level, allow_missing_chunks=config.allow_missing_chunks,
        stain=config.stain, channels=config.channels,
    )  # fmt: skip
    return pairs, {"source": "files", "images": config.images, "masks": config.masks}


def train(
    config: TrainConfig,
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train a U-Net with ``config`` and write it to ``out`` (``.safetensors``)."""
    from pipeline.models.inference import resolve_device

    started = time.perf_counter()
    out = _checked_out(Path(out), overwrite=overwrite)
    try:
        device = resolve_device(config.device)
    except (ValueError, RuntimeError) as exc:
        raise TilesegError("--device", str(exc)) from None
    unet = config.unet
    pairs, data = _load_data(config)
    _check_pairs(pairs, unet)
    train_pairs, val_pairs = split_pairs(pairs, fraction=config.val_fraction, seed=config.seed)
    object_size = training_object_size([p.mask for p in train_pairs])
    object_size["pixel_size"] = _pixel_size(train_pairs)
    data["train"] = [f"{p.name}[rows {p.rows[0]}:{p.rows[1]}]" for p in train_pairs]
    data["val"] = [f"{p.name}[rows {p.rows[0]}:{p.rows[1]}]" for p in val_pairs]

    torch.manual_seed(config.seed)
    if device.type == "cpu":
        keep_freed_memory()  # backward passes free and re-fault their activations too
    model = UNet(unet).to(device)
    fit = _fit(model, train_pairs, val_pairs, config, device=device, progress=progress)
    model.load_state_dict(fit.best_state)
    model.eval()
    record = _training_record(config, fit, data=data, object_size=object_size, device=device)
    if config.heldout is not None:
        h = config.heldout
        record["heldout"] = heldout_dice(
            model, kind=h.kind, images=h.images, size=h.size, seed=h.seed,
            percentiles=config.percentiles, device=device, stain=config.stain,
        )  # fmt: skip
        if h.scales and h.kind == "fluorescence" and unet.ndim == 2:
            record["heldout_scales"] = heldout_scales(model, object_size, device=device)
    record["seconds"] = round(time.perf_counter() - started, 1)
    model.cpu()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    save_unet(model, partial, training=record, metadata=_model_metadata(config, pairs))
    os.replace(partial, out)  # a reader (or the model cache) never sees a half-written file
    return TrainResult(out, record)


def _checked_out(out: Path, *, overwrite: bool) -> Path:
    if out.suffix != ".safetensors":
        raise TilesegError(out, "the model file name must end with .safetensors")
    if out.exists() and not overwrite:
        raise TilesegError(out, "already exists (use --overwrite to replace it)")
    return out


def _check_pairs(pairs: list[Any], unet: UNetConfig) -> None:
    for pair in pairs:
        channels = pair.normalization.channels(pair.image.n_channels)
        if channels != unet.in_channels or len(pair.image.spatial_shape) != unet.ndim:
            hint = ""
            if channels > unet.in_channels and isinstance(pair.image, LazyImage):
                hint = f" (channels: {channel_listing(pair.image)}; choose with --channels)"
            raise TilesegError(
                pair.image.path,
                f"{channels} channel(s), {len(pair.image.spatial_shape)}D, but the "
                f"model takes {unet.in_channels} channel(s), {unet.ndim}D{hint}",
            )


@dataclass(frozen=True)
class _Fit:
    """What the epochs gave: each epoch's row, the best one and its weights."""

    history: list[dict[str, float]]
    best: dict[str, Any]
    best_state: dict[str, Any]
    stopped: bool


def _fit(
    model: UNet,
    train_pairs: list[Any],
    val_pairs: list[Any],
    config: TrainConfig,
    *,
    device: torch.device,
    progress: bool,
) -> _Fit:
    """Train ``model`` epoch by epoch, keeping the weights of the best validation loss and
    stopping after ``patience`` epochs without improvement."""
    from tqdm import tqdm

    unet = config.unet
    crop = crop_geometry(unet, config.crop)
    rng = np.random.default_rng([config.seed, 1])
    val_draws = draw_crops(
        val_pairs, config.val_crops, crop, np.random.default_rng([config.seed, 2])
    )
    val_batches = list(
        _batches(val_pairs, val_draws, crop, unet.classes, config.batch_size, gaps=config.gaps)
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    total_steps = config.epochs * config.steps_per_epoch
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps, config.lr * 0.05)
    history: list[dict[str, float]] = []
    best: dict[str, Any] = {}
    best_state, stale, stopped = None, 0, False
    bar = tqdm(
        total=total_steps, desc="training", unit="step", disable=not progress, file=sys.stderr
    )
    try:
        for epoch in range(1, config.epochs + 1):
            model.train()
            draws = draw_crops(train_pairs, config.steps_per_epoch * config.batch_size, crop, rng)
            batches = _batches(
                train_pairs, draws, crop, unet.classes, config.batch_size, rng, config.augment,
                gaps=config.gaps,
            )  # fmt: skip
            losses = _epoch(
                model, batches, optimizer, schedule, device=device, bar=bar, epoch=epoch
            )
            val_loss, val_dice = _evaluate(model, val_batches, device)
            row = {
                "epoch": epoch,
                "train_loss": round(float(np.mean(losses)), 5),
                "val_loss": round(val_loss, 5),
                "val_dice": round(val_dice, 5),
            }
            history.append(row)
            bar.set_postfix(epoch=epoch, loss=row["train_loss"], val_dice=row["val_dice"])
            if best_state is None or val_loss < best["val_loss"] - config.min_delta:
                best, stale = row, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
                if stale >= config.patience:
                    stopped = True
                    break
    finally:
        bar.close()
    return _Fit(history, best, best_state, stopped)


def _epoch(
    model: UNet,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    *,
    device: torch.device,
    bar: Any,
    epoch: int,
) -> list[float]:
    """One epoch's optimiser steps; returns their losses."""
    losses = []
    for x, y in batches:
        loss = _segmentation_loss(model(x.to(device)), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.update()
        bar.set_postfix(epoch=epoch, loss=f"{np.mean(losses):.4f}", refresh=False)
    return losses


def _training_record(
    config: TrainConfig,
    fit: _Fit,
    *,
    data: dict[str, Any],
    object_size: dict[str, Any],
    device: torch.device,
) -> dict[str, Any]:
    """The model file's training record: versions, data, recipe and the epochs' results."""
    best = fit.best
    return {
        "tileseg": __version__,
        "torch": torch.__version__,
        "device": str(device),
        "data": data,
        "recipe": config.to_dict(),
        "normalization": {
            "mode": "percentile",
            "percentiles": list(config.percentiles),
            "stain": config.stain,
        },
        "epochs": len(fit.history),
        "best_epoch": best["epoch"],
        "stopped_early": fit.stopped,
        "train_loss": best["train_loss"],
        "val_loss": best["val_loss"],
        "val_dice": best["val_dice"],
        "history": fit.history,
        "object_size": object_size,
    }


def _model_metadata(config: TrainConfig, pairs: list[TrainPair]) -> ModelMetadata:
    """Class names from the recipe; the pixel size from the recipe, else the training images'
    in Y and X when every image has one and they agree (generated images have none)."""
    size = config.pixel_size_um
    if size is None:
        sizes = {getattr(p.image, "pixel_size", None) for p in pairs}
        if len(sizes) == 1 and None not in sizes:
            (known,) = sizes
            if len(set(known[-2:])) == 1:
                size = float(known[-1])
    return ModelMetadata(config.class_names, size)


def heldout_scales(
    model: UNet, object_size: dict[str, Any], *, device: torch.device
) -> dict[str, Any]:
    """:func:`pipeline.training.scale_eval.evaluate_scales` of a freshly trained model."""
    from pipeline.models import LoadedModel
    from pipeline.training.scale_eval import evaluate_scales

    info = {"training": {"object_size": object_size}}
    loaded = LoadedModel(model.eval(), model.config.geometry, None, None, "", "training", info)
    return evaluate_scales(loaded, device=str(device))


def _pixel_size(pairs: list[TrainPair]) -> list[float] | None:
    """The training images' pixel size when they all share one (files that record it)."""
    sizes = {getattr(p.image, "pixel_size", None) for p in pairs}
    if len(sizes) != 1 or None in sizes:
        return None
    return list(sizes.pop())


def with_overrides(config: TrainConfig, **flags: Any) -> TrainConfig:
    """``config`` with the given (not None) command-line values; ``images`` replaces
    ``synthetic`` data and ``synthetic=True`` replaces files (with default generation)."""
    given = {k: v for k, v in flags.items() if v is not None}
    if given.pop("synthetic", False):
        config = replace(
            config, images=None, masks=None, synthetic=config.synthetic or SyntheticData()
        )
    if "images" in given or "masks" in given:
        if "images" not in given or "masks" not in given:
            raise TilesegError("--images", "--images and --masks go together")
        config = replace(config, images=None, masks=None, synthetic=None)
    return config_from_mapping(given, base=config, source=None)
