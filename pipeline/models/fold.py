"""Batch norm folded into the convolution before it, for inference.

In eval mode a batch norm is a per-channel scale and shift of its input, so after a
convolution it can be folded into that convolution's weights and bias. What it saves is a
separate pass over every activation, which is memory-bound: 8-9% of the built-in U-Net's
forward on a CPU (bench/README.md), more where convolutions are fast. The folded network is
the same function; in float arithmetic it differs from the unfolded one in the last bits
(~1e-6 in the logits), like a change of memory layout. Tiles still equal one whole-image pass
of the same predictor bit for bit.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["fold_batch_norm"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _foldable(conv: nn.Module, norm: nn.Module) -> bool:
    return (
        type(conv) in _CONVS  # subclasses may do more than convolve
        and isinstance(norm, nn.modules.batchnorm._BatchNorm)
        and norm.running_mean is not None  # without running statistics it uses the batch's
        and norm.num_features == conv.out_channels
        and not (conv.training or norm.training)
    )


def fold_batch_norm(module: nn.Module) -> int:
    """Fold, in place, every eval-mode batch norm that directly follows a convolution inside
    an ``nn.Sequential`` (the only place where "follows" is certain) into that convolution.

    The norm is replaced by ``nn.Identity``, so indices and ``state_dict`` keys of the other
    layers stay. TorchScript modules are left as they are. Returns how many were folded.
    """
    if isinstance(module, torch.jit.ScriptModule):
        return 0
    folded = 0
    for seq in module.modules():
        # A subclass that overrides forward may not run its layers in order.
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        names = list(seq._modules)
        for first, second in pairwise(names):
            conv, norm = seq._modules[first], seq._modules[second]
            if conv is not None and norm is not None and _foldable(conv, norm):
                seq._modules[first] = fuse_conv_bn_eval(conv, norm)
                seq._modules[second] = nn.Identity()
                folded += 1
    return folded
