"""Turn a trained model into a faster inference model, with the same detections.

A frozen BatchNorm is a fixed per-channel affine map, so conv -> FrozenBN equals one conv with
scaled weights and a bias. Folding saves a multiply and an add per layer, and under bf16 autocast it
saves more: FrozenBN's fp32 statistics promote the conv's bf16 output to fp32, so every layer paid
two full-size dtype conversions. What each of these steps is worth: benchmarks/README.md, "Each speed-up
alone".
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.ops.misc import FrozenBatchNorm2d

from .backbones import AmpBackboneWithFPN
from .detector import InferenceAmp, set_precision


def prepare_for_inference(model: nn.Module, amp_dtype: torch.dtype | None, channels_last: bool) -> nn.Module:
    """Fold frozen BatchNorm, switch autocast on, and keep the autocast parts' weights in amp_dtype.

    Only for a model that will not be trained again: the weights change form (not values).
    """
    fold_frozen_batchnorm(model.backbone.body)
    set_precision(model, amp_dtype, channels_last)  # which leaves GroupNorm models on a CPU contiguous
    if model.backbone.channels_last:
        conv_heads_channels_last(model)
    if amp_dtype is not None:
        cast_autocast_weights(model, amp_dtype)
    return model.eval()


def conv_heads_channels_last(model: nn.Module) -> None:
    """The RPN and mask heads in channels-last layout, as set_precision puts the backbone.

    oneDNN's bf16 kernels (the mask head's transposed conv above all) are much faster with channels-last
    weights, for identical detections (benchmarks/README.md, "Each speed-up alone").
    """
    for head in (model.rpn.head, model.roi_heads.mask_head, model.roi_heads.mask_predictor):
        if head is not None:
            head.to(memory_format=torch.channels_last)


@torch.no_grad()
def cast_autocast_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Store conv and linear weights of the autocast regions (set_precision) in the autocast dtype.

    Autocast casts fp32 weights on every call (its cache lives for one context), which for
    R50-FPN was 25M parameters per image. Normalisation layers stay fp32, as autocast runs them.
    """
    regions = [m for m in model.modules()
               if isinstance(m, (AmpBackboneWithFPN, InferenceAmp)) and m.amp_dtype is not None]
    for region in regions:
        for module in region.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                module.to(dtype)


@torch.no_grad()
def fold_frozen_batchnorm(model: nn.Module) -> int:
    """Fold every FrozenBatchNorm2d that directly follows a Conv2d sibling; returns how many were folded.

    Relies on registration order matching the forward order, which holds for torchvision's ResNets
    (conv1/bn1, conv2/bn2, ..., downsample = Sequential(conv, bn)).
    """
    folded = 0
    for parent in list(model.modules()):
        previous: tuple[str, nn.Module] | None = None
        for name, child in list(parent.named_children()):
            if isinstance(child, FrozenBatchNorm2d) and previous and isinstance(previous[1], nn.Conv2d):
                _fold(previous[1], child)
                setattr(parent, name, nn.Identity())
                folded += 1
            previous = (name, child)
    return folded


def _fold(conv: nn.Conv2d, norm: FrozenBatchNorm2d) -> None:
    weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean, norm.running_var,
                                        norm.eps, norm.weight, norm.bias)
    conv.weight = weight
    conv.bias = bias
