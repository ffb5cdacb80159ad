"""torchvision's RegNetX and RegNetY (Radosavovic et al., 2020) as FPN trunks.

torchvision nests the four stages in `trunk_output`; the FPN's IntermediateLayerGetter sees only direct
children, so the trunk here is the stem and the stages side by side: stem, block1, block2, block3, block4,
which are also its state-dict keys (backbone.body.block1.block1-0...). torchvision's own keys
(ImageNet weights, a file of torchvision's model) come in through Trunk.weights_key.
"""

from __future__ import annotations

from collections import OrderedDict

import torchvision
from torch import nn

from .backbones import NormLayer, Trunk, register_backbone

STAGES = ("block1", "block2", "block3", "block4")


def _flat_key(key: str) -> str:
    return key.removeprefix("trunk_output.")


@register_backbone("regnet_x_400mf", "regnet_x_800mf", "regnet_x_1_6gf", "regnet_x_3_2gf",
                   "regnet_y_400mf", "regnet_y_800mf", "regnet_y_1_6gf", "regnet_y_3_2gf")
def regnet(name: str, norm_layer: NormLayer) -> Trunk:
    """Stages for model.trainable_layers, deepest first: block4, block3, block2, block1, then the stem,
    as ResNet's layer4..layer1 and conv1/bn1 (the same strides), so 5 trains everything."""
    model = getattr(torchvision.models, name)(weights=None, norm_layer=norm_layer)
    stages = OrderedDict(model.trunk_output.named_children())
    body = nn.Sequential(OrderedDict([("stem", model.stem), *stages.items()]))
    return Trunk(body, levels=STAGES, channels=tuple(stage_width(stages[s]) for s in STAGES),
                 stages=tuple((s,) for s in reversed(STAGES)) + (("stem",),), weights_key=_flat_key)


def stage_width(stage: nn.Module) -> int:
    """A stage's output channels: its last convolution's (each block ends in the 1x1 conv `f.c`)."""
    return [m for m in stage.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
