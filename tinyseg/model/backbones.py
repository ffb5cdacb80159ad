"""Backbones by name: a registry of trunk families, each handed to the same FPN.

A family registers a builder under its names (register_backbone). Given the name and the norm layer,
the builder returns a Trunk: the module, which of its direct children feed the FPN's four levels, their
channels, and its stages for model.trainable_layers. Everything else is shared by every family and done
here: the norm choice (model.norm), loading ImageNet or file weights into the trunk (weights.py), freezing
stages, and the FPN with its max-pool level. A new family is one file that registers its builder and is
imported by tinyseg/model/__init__.py; the detector does not change.

The ResNet/ResNeXt family is here; RegNet is in backbones_regnet.py.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import misc as misc_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..config import ConfigError, ModelConfig
from .weights import InitWeights, frozen_bn_eps, load_trunk_weights

NormLayer = Callable[[int], nn.Module]


def _same_key(key: str) -> str:
    return key


@dataclass(frozen=True)
class Trunk:
    """A built trunk and what the FPN and the freezing need to know of it.

    module: its direct children include `levels` (torchvision's IntermediateLayerGetter sees no deeper, and
    drops the children after the last level, such as a classifier).
    levels: the four children whose outputs become FPN levels "0".."3", at strides 4, 8, 16 and 32.
    channels: those outputs' channels.
    stages: parameter-name prefixes of each stage, deepest first. A pretrained trunk trains the first
    model.trainable_layers of them and freezes the rest; from scratch every stage trains.
    weights_key: a key of the state dict of torchvision's model of that name (its ImageNet weights, or a
    file of it) -> the key in `module`; must leave the module's own keys as they are (a tinyseg model's
    trunk comes in under those).
    """

    module: nn.Module
    levels: tuple[str, str, str, str]
    channels: tuple[int, int, int, int]
    stages: tuple[tuple[str, ...], ...]
    weights_key: Callable[[str], str] = _same_key


TrunkBuilder = Callable[[str, NormLayer], Trunk]

# model.backbone -> the builder of its trunk
BACKBONES: dict[str, TrunkBuilder] = {}


def register_backbone(*names: str) -> Callable[[TrunkBuilder], TrunkBuilder]:
    """Decorator: model.backbone=NAME builds its trunk with the decorated builder(NAME, norm_layer)."""

    def register(builder: TrunkBuilder) -> TrunkBuilder:
        for name in names:
            if name in BACKBONES:
                raise ValueError(f"backbone '{name}' is registered already (by {BACKBONES[name].__qualname__})")
            BACKBONES[name] = builder
        return builder

    return register


def check_backbone(cfg: ModelConfig) -> TrunkBuilder:
    if cfg.backbone not in BACKBONES:
        raise ConfigError(f"model.backbone '{cfg.backbone}' is not one of {', '.join(BACKBONES)}")
    return BACKBONES[cfg.backbone]


class FrozenBatchNorm2d(misc_ops.FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d that keeps its input's dtype.

    Under autocast the convolution hands over bf16/fp16, and torchvision's fp32 statistics promoted
    every activation back to fp32, to be cast down again by the next convolution.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype).reshape(1, -1, 1, 1) + bias.to(x.dtype).reshape(1, -1, 1, 1)


class RoiGroupNorm(nn.GroupNorm):
    """nn.GroupNorm for the RoI heads, whose ONNX export also runs on no rows: the exporter reshapes the
    rows to (N, groups, -1), which onnxruntime cannot size when N is 0, as in the mask head for an
    image without detections. Traced, one blank row is added and dropped again, which keeps the
    exporter's InstanceNormalization (a formulation without the reshape was slower; benchmarks/README.md).
    The backbone keeps nn.GroupNorm: it always sees one image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torchvision._is_tracing():
            return super().forward(x)
        rows = x.shape[0]
        return super().forward(torch.cat([x, x.new_zeros(1, *x.shape[1:])]))[:rows]


def norm_factory(norm: str, frozen_eps: float = 1e-5, roi_heads: bool = False) -> NormLayer:
    if norm == "frozen_bn":
        return FrozenBatchNorm2d if frozen_eps == 1e-5 else functools.partial(FrozenBatchNorm2d, eps=frozen_eps)
    if norm in ("bn", "syncbn"):
        return nn.BatchNorm2d  # syncbn: converted once the process group exists (runtime/distributed.py)
    if norm == "gn":
        # The largest group count up to 32 that divides the channels: RegNets have widths such as 104.
        group_norm = RoiGroupNorm if roi_heads else nn.GroupNorm
        return lambda channels: group_norm(math.gcd(32, channels), channels)
    raise ValueError(f"unknown norm '{norm}'")


def fpn_norm(arch: str, norm: str) -> NormLayer | None:
    if arch == "maskrcnn_resnet50_fpn_v2":
        return norm_factory(norm)
    # tinyseg: frozen statistics exist only for the pretrained trunk; maskrcnn_resnet50_fpn: no norm there
    return None if norm == "frozen_bn" or arch == "maskrcnn_resnet50_fpn" else norm_factory(norm)


class AmpBackboneWithFPN(BackboneWithFPN):
    """The trunk and FPN under autocast, features handed on in fp32.

    The heads decode boxes and compute losses: in bf16 a coordinate near 512 px has a resolution of
    2-4 px and exp() of box deltas overflows sooner (the likely cause of NaN losses in a whole-model
    bf16 trial). So only the convolution-heavy backbone runs in low precision.
    """

    amp_dtype: torch.dtype | None = None
    channels_last: bool = False

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.amp_dtype is None:
            return super().forward(x)
        with torch.autocast(x.device.type, dtype=self.amp_dtype):
            features = super().forward(x)
        return OrderedDict((name, f.float().contiguous()) for name, f in features.items())


def build_backbone(cfg: ModelConfig, arch: str, norm: str, trunk_weights: InitWeights | None = None
                   ) -> AmpBackboneWithFPN:
    """model.backbone's trunk with norm `norm` (resolved by the detector), its weights, and the FPN."""
    builder = check_backbone(cfg)
    eps, _ = frozen_bn_eps(cfg.init)  # from the weights, whatever the layout: a COCO_V1 trunk alone too
    trunk = builder(cfg.backbone, norm_factory(norm, eps))
    if len(trunk.levels) != 4 or len(trunk.channels) != 4:
        raise ValueError(f"backbone '{cfg.backbone}': its Trunk needs 4 levels and 4 channel counts "
                         f"(the anchors and RoI poolers expect FPN levels 0-3), got {trunk.levels}, {trunk.channels}")
    if trunk_weights is not None:
        load_trunk_weights(trunk.module, cfg.backbone, trunk_weights, trunk.weights_key)
    pretrained = cfg.init != "none"
    freeze_stages(trunk, cfg.trainable_layers if pretrained else len(trunk.stages))
    return AmpBackboneWithFPN(
        trunk.module,
        return_layers={child: str(level) for level, child in enumerate(trunk.levels)},
        in_channels_list=list(trunk.channels),
        out_channels=cfg.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=fpn_norm(arch, norm),
    )


def freeze_stages(trunk: Trunk, trainable: int) -> None:
    """Train the `trainable` deepest stages; every other parameter of the trunk is frozen."""
    prefixes = tuple(prefix for stage in trunk.stages[:max(0, trainable)] for prefix in stage)
    for name, parameter in trunk.module.named_parameters():
        if not name.startswith(prefixes):
            parameter.requires_grad_(False)


@register_backbone("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                   "resnext101_32x8d")
def resnet(name: str, norm_layer: NormLayer) -> Trunk:
    """torchvision's ResNet/ResNeXt; its four residual stages feed the FPN.

    Stages for model.trainable_layers, deepest first: layer4, layer3, layer2, layer1, then the stem
    (conv1 and bn1), so 5 trains everything.
    """
    model = getattr(torchvision.models, name)(weights=None, norm_layer=norm_layer)
    width = model.inplanes // 8  # layer1's output: 64 for BasicBlock trunks, 256 for Bottleneck ones
    return Trunk(model, levels=("layer1", "layer2", "layer3", "layer4"),
                 channels=(width, width * 2, width * 4, width * 8),
                 stages=(("layer4",), ("layer3",), ("layer2",), ("layer1",), ("conv1", "bn1")))
