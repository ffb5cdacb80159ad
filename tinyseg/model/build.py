"""Mask R-CNN + FPN on a torchvision ResNet/ResNeXt trunk, initialised from ImageNet, a file, or nothing."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torchvision
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import misc as misc_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..config import ConfigError, ModelConfig
from .roi_pool import ParallelMultiScaleRoIAlign
from .weights import load_trunk_weights

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d")


def resolve_norm(cfg: ModelConfig) -> str:
    if cfg.norm != "auto":
        return cfg.norm
    # Frozen statistics only make sense when they came from pretraining; from scratch the
    # normalisation has to learn, and GroupNorm does so at batch size 2 (He et al., 2019).
    return "gn" if cfg.init == "none" else "frozen_bn"


class FrozenBatchNorm2d(misc_ops.FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d that keeps its input's dtype.

    Under autocast the convolution hands over bf16/fp16, and torchvision's fp32 statistics promoted
    every activation back to fp32, to be cast down again by the next convolution.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype).reshape(1, -1, 1, 1) + bias.to(x.dtype).reshape(1, -1, 1, 1)


def norm_factory(norm: str):
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm in ("bn", "syncbn"):
        return nn.BatchNorm2d  # syncbn: converted once the process group exists (engine/distributed.py)
    if norm == "gn":
        return lambda channels: nn.GroupNorm(math.gcd(32, channels), channels)
    raise ValueError(f"unknown norm '{norm}'")


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


def _to_float(value):
    if isinstance(value, torch.Tensor):
        return value.float()
    return type(value)(_to_float(v) for v in value)


class InferenceAmp:
    """Mixin for the heads: in eval mode the module runs under autocast and hands back fp32.

    In inference the heads cost more than the backbone (R50-FPN, 512 px, 100 detections: box and mask
    heads 3.2 s vs backbone 1.6 s per 7 images on 2 CPU cores). Their outputs are cast to fp32 before
    any box decoding, NMS or mask pasting. Training keeps the heads in fp32 (see AmpBackboneWithFPN).
    """

    amp_dtype: torch.dtype | None = None

    def __call__(self, *args, **kwargs):
        if self.amp_dtype is None or self.training or not args:
            return super().__call__(*args, **kwargs)
        with torch.autocast(_first_tensor(args).device.type, dtype=self.amp_dtype):
            return _to_float(super().__call__(*args, **kwargs))


def _first_tensor(values) -> torch.Tensor:
    value = values[0]
    return value if isinstance(value, torch.Tensor) else _first_tensor(value)


class AmpRPNHead(InferenceAmp, RPNHead):
    pass


class AmpMaskHeads(InferenceAmp, MaskRCNNHeads):
    pass


class AmpMaskPredictor(InferenceAmp, MaskRCNNPredictor):
    pass


class DetectionTransform(GeneralizedRCNNTransform):
    """torchvision's normalise/batch/postprocess, but no resize in training: the data presets size the images.

    With paste_masks False, inference outputs keep the mask head's (N, 1, M, M) probabilities as
    "mask_probs" (boxes in image pixels) instead of full-size "masks"; inference/masks.py pastes
    them straight into binary masks.
    """

    paste_masks: bool = True

    def postprocess(self, result, image_shapes, original_image_sizes):
        if self.training or self.paste_masks:
            return super().postprocess(result, image_shapes, original_image_sizes)
        for output, size, original_size in zip(result, image_shapes, original_image_sizes):
            output["boxes"] = resize_boxes(output["boxes"], size, original_size)
            if "masks" in output:
                output["mask_probs"] = output.pop("masks")
        return result

    def resize(self, image, target=None):
        if self.training:
            return image, target
        if torchvision._is_tracing():
            return self._traced_resize(image), target
        return super().resize(image, target)

    def _traced_resize(self, image: torch.Tensor) -> torch.Tensor:
        # For ONNX export: resize to an explicit output size. torchvision's traced path hands ONNX a
        # scale, and onnxruntime then sampled some sizes differently from eager PyTorch (375x500 at
        # scale 0.256 was off by whole pixels); an explicit size samples as eager PyTorch does.
        shape = torch._shape_as_tensor(image)[-2:].to(torch.float32)
        scale = torch.minimum(self.min_size[-1] / shape.min(), self.max_size / shape.max())
        size = torch.floor(shape * scale + 1e-4).to(torch.int64)
        resized = torch.nn.functional.interpolate(image[None], size=(size[0], size[1]), mode="bilinear",
                                                  align_corners=False)
        return resized[0]


def build_backbone(cfg: ModelConfig) -> AmpBackboneWithFPN:
    if cfg.backbone not in BACKBONES:
        raise ConfigError(f"model.backbone '{cfg.backbone}' is not one of {', '.join(BACKBONES)}")
    import torchvision

    norm = resolve_norm(cfg)
    trunk = getattr(torchvision.models, cfg.backbone)(weights=None, norm_layer=norm_factory(norm))
    pretrained = cfg.init != "none"
    if pretrained:
        load_trunk_weights(trunk, cfg.backbone, cfg.init)
    trainable = max(0, min(5, cfg.trainable_layers)) if pretrained else 5
    stages = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable]
    if trainable == 5:
        stages.append("bn1")
    for name, parameter in trunk.named_parameters():
        if all(not name.startswith(stage) for stage in stages):
            parameter.requires_grad_(False)
    stage_channels = trunk.inplanes // 8  # 64 for BasicBlock trunks, 256 for Bottleneck ones
    backbone = AmpBackboneWithFPN(
        trunk,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=[stage_channels * 2**i for i in range(4)],
        out_channels=cfg.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=None if norm == "frozen_bn" else norm_factory(norm),
    )
    return backbone


class DropoutMLPHead(InferenceAmp, nn.Module):
    """torchvision's TwoMLPHead with optional dropout after each hidden layer."""

    def __init__(self, in_channels: int, representation: int, dropout: float):
        super().__init__()
        self.fc6 = nn.Linear(in_channels, representation)
        self.fc7 = nn.Linear(representation, representation)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(torch.relu(self.fc6(x.flatten(start_dim=1))))
        return self.dropout(torch.relu(self.fc7(x)))


def build_model(cfg: ModelConfig, num_classes: int, test_min_size: int = 800, test_max_size: int = 1333,
                score_thresh: float = 0.05, max_detections: int = 100, nms_thresh: float = 0.5) -> MaskRCNN:
    """A Mask R-CNN whose class count (background included) comes from the data."""
    backbone = build_backbone(cfg)
    channels = cfg.fpn_channels
    norm = resolve_norm(cfg)
    head_norm = None if norm == "frozen_bn" else norm_factory(norm)
    mask_layers = [channels] * 4
    mask_head: nn.Module = AmpMaskHeads(channels, mask_layers, 1, norm_layer=head_norm)
    if cfg.mask_head_dropout > 0:
        mask_head = nn.Sequential(OrderedDict(heads=mask_head, dropout=nn.Dropout2d(cfg.mask_head_dropout)))
    resolution = 7
    if len(cfg.anchor_sizes) != 5:
        raise ConfigError(f"model.anchor_sizes needs 5 sizes (one per FPN level), got {cfg.anchor_sizes}")
    anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
    model = MaskRCNN(
        backbone,
        num_classes=None,
        rpn_anchor_generator=anchors,
        box_head=DropoutMLPHead(channels * resolution**2, cfg.box_head_dim, cfg.box_head_dropout),
        box_predictor=FastRCNNPredictor(cfg.box_head_dim, num_classes),
        box_roi_pool=ParallelMultiScaleRoIAlign(["0", "1", "2", "3"], resolution, sampling_ratio=2),
        mask_roi_pool=ParallelMultiScaleRoIAlign(["0", "1", "2", "3"], 14, sampling_ratio=2),
        mask_head=mask_head,
        rpn_head=AmpRPNHead(channels, anchors.num_anchors_per_location()[0]),
        mask_predictor=AmpMaskPredictor(mask_layers[-1], mask_layers[-1], num_classes),
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_score_thresh=score_thresh,
        box_nms_thresh=nms_thresh,
        box_detections_per_img=max_detections,
    )
    model.transform = DetectionTransform(test_min_size, test_max_size, model.transform.image_mean,
                                         model.transform.image_std)
    return model


def set_inference_options(model: MaskRCNN, min_size: int, max_size: int, score_thresh: float,
                          max_detections: int, nms_thresh: float) -> None:
    model.transform.min_size = (min_size,)
    model.transform.max_size = max_size
    model.roi_heads.score_thresh = score_thresh
    model.roi_heads.detections_per_img = max_detections
    model.roi_heads.nms_thresh = nms_thresh


def set_precision(model: MaskRCNN, amp_dtype: torch.dtype | None, channels_last: bool) -> None:
    """Autocast for the backbone (training and inference) and the heads (inference only)."""
    model.backbone.amp_dtype = amp_dtype
    for module in model.modules():
        if isinstance(module, InferenceAmp):
            module.amp_dtype = amp_dtype
    model.backbone.channels_last = channels_last
    if channels_last:
        model.backbone.to(memory_format=torch.channels_last)

