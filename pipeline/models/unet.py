"""The built-in U-Net (2D or 3D) and its geometry, known analytically.

``padding="valid"`` is the network of the U-Net paper: unpadded 3x3 convolutions, 2x2 max
pooling, 2x2 up-convolutions and centre-cropped skip connections, so the output is smaller than
the input by exactly the halo. ``padding="same"`` zero-pads the convolutions; the output has the
input's size and the halo is the receptive-field reach, rounded up to the pooling period.

Only per-channel normalisation (BatchNorm, used in eval mode at inference) is offered: anything
that pools statistics over space (instance/group/layer norm) would make a tile's output depend on
the tile, and tiling would no longer be exact.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from typing import Any

import torch
from torch import nn

from pipeline.geometry import ModelGeometry

__all__ = [
    "NORMS",
    "PADDINGS",
    "UNet",
    "UNetConfig",
    "seeded_unet",
    "unet_geometry",
    "valid_output_size",
]

PADDINGS = ("valid", "same")
NORMS = ("batch", "none")


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the built-in U-Net."""

    ndim: int = 2
    in_channels: int = 1
    classes: int = 2
    depth: int = 4
    width: int = 32
    padding: str = "valid"
    norm: str = "batch"

    def __post_init__(self) -> None:
        problems = []
        if self.ndim not in (2, 3):
            problems.append(f"ndim must be 2 or 3, not {self.ndim}")
        if self.in_channels < 1 or self.classes < 1 or self.width < 1:
            problems.append("in_channels, classes and width must be >= 1")
        if not 0 <= self.depth <= 6:
            problems.append(f"depth must be 0..6, not {self.depth}")
        if self.padding not in PADDINGS:
            problems.append(f"padding must be one of {PADDINGS}, not {self.padding!r}")
        if self.norm not in NORMS:
            problems.append(f"norm must be one of {NORMS}, not {self.norm!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown U-Net config keys {unknown}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @cached_property
    def geometry(self) -> ModelGeometry:
        return unet_geometry(self)


def valid_output_size(config: UNetConfig, size: int) -> int | None:
    """Output size for an input of ``size`` pixels along one axis, or None if not accepted."""
    d = config.depth
    if config.padding == "same":
        return size if size > 0 and size % 2**d == 0 else None
    n = size
    for _ in range(d):
        n -= 4
        if n <= 0 or n % 2:
            return None
        n //= 2
    n -= 4
    if n <= 0:
        return None
    for _ in range(d):
        n = 2 * n - 4
        if n <= 0:
            return None
    return n


def _same_halo(depth: int) -> int:
    """Context needed on each side of an aligned tile for the 'same'-padded U-Net.

    Dependency intervals are carried backwards through the network in each level's own pixel
    units: a 3x3 conv widens by 1, pooled pixel j reads [2j, 2j+1], up-convolved pixel j reads
    floor(j/2). How far a pixel reaches depends on its phase p modulo 2**depth; a tile starts
    at phase 0 and spans whole periods, so a pixel of phase p lies p pixels inside the tile's
    start and (period - 1 - p) inside its end."""

    def encoder_out(level: int, lo: int, hi: int) -> tuple[int, int]:
        return level_in(level, lo - 2, hi + 2)

    def level_in(level: int, lo: int, hi: int) -> tuple[int, int]:
        return (lo, hi) if level == 0 else encoder_out(level - 1, 2 * lo, 2 * hi + 1)

    def decoder_out(level: int, lo: int, hi: int) -> tuple[int, int]:
        if level == depth:
            return level_in(depth, lo - 2, hi + 2)
        lo, hi = lo - 2, hi + 2
        skip = encoder_out(level, lo, hi)
        up = decoder_out(level + 1, lo // 2, hi // 2)
        return min(skip[0], up[0]), max(skip[1], up[1])

    period, need = 2**depth, 0
    for p in range(period):
        lo, hi = decoder_out(0, p, p)
        need = max(need, (p - lo) - p, (hi - p) - (period - 1 - p))
    return need


def unet_geometry(config: UNetConfig) -> ModelGeometry:
    """Halo, alignment, shrink and valid input sizes of a built-in U-Net."""
    align = 2**config.depth
    if config.padding == "same":
        # A halo that is a multiple of the period keeps every window a valid (divisible) size.
        halo = math.ceil(_same_halo(config.depth) / align) * align
        return ModelGeometry.uniform(
            config.ndim, halo=halo, align=align, shrink=0, size_min=align, size_step=align
        )
    size_min = next(n for n in range(1, 64 * align) if valid_output_size(config, n))
    out = valid_output_size(config, size_min)
    assert out is not None
    shrink = (size_min - out) // 2
    return ModelGeometry.uniform(
        config.ndim, halo=shrink, align=align, shrink=shrink, size_min=size_min, size_step=align
    )


class _Block(nn.Sequential):
    def __init__(self, cin: int, cout: int, *, config: UNetConfig) -> None:
        conv = nn.Conv2d if config.ndim == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if config.ndim == 2 else nn.BatchNorm3d
        pad = 1 if config.padding == "same" else 0
        layers: list[nn.Module] = []
        for c in (cin, cout):
            layers.append(conv(c, cout, 3, padding=pad, bias=config.norm == "none"))
            if config.norm == "batch":
                layers.append(norm(cout))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


def _center_crop(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    for dim in range(2, x.dim()):
        x = x.narrow(dim, (x.size(dim) - like.size(dim)) // 2, like.size(dim))
    return x


class _Up(nn.Module):
    """Up-convolve, concatenate the centre-cropped skip connection, two convolutions."""

    def __init__(self, cin: int, cout: int, *, config: UNetConfig) -> None:
        super().__init__()
        upconv = nn.ConvTranspose2d if config.ndim == 2 else nn.ConvTranspose3d
        self.up = upconv(cin, cout, 2, stride=2)
        self.block = _Block(2 * cout, cout, config=config)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        return self.block(torch.cat([_center_crop(skip, x), x], dim=1))


class UNet(nn.Module):
    """U-Net returning per-class logits of shape (N, classes, *spatial)."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        w, d = config.width, config.depth
        pool = nn.MaxPool2d if config.ndim == 2 else nn.MaxPool3d
        conv = nn.Conv2d if config.ndim == 2 else nn.Conv3d
        self.pool = pool(2)
        self.encoders = nn.ModuleList()
        cin = config.in_channels
        for level in range(d):
            self.encoders.append(_Block(cin, w * 2**level, config=config))
            cin = w * 2**level
        self.bottom = _Block(cin, w * 2**d, config=config)
        self.decoders = nn.ModuleList(
            [_Up(w * 2 ** (level + 1), w * 2**level, config=config) for level in reversed(range(d))]
        )
        self.head = conv(w, config.classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        for k, decoder in enumerate(self.decoders):
            x = decoder(x, skips[len(skips) - 1 - k])
        return self.head(x)


def seeded_unet(config: UNetConfig, *, seed: int = 0) -> UNet:
    """A U-Net with deterministic random weights (for tests and the untrained fallback)."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = UNet(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()
