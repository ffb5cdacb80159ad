"""Mask R-CNN + FPN on a registered trunk (backbones.py), initialised from ImageNet, COCO, a file, or nothing.

Two layouts: tinyseg's own (any trunk, FPN and head widths, norm chosen by model.norm), and torchvision's
maskrcnn_resnet50_fpn / maskrcnn_resnet50_fpn_v2, built tensor for tensor so that their COCO weights
load whole (model.arch; auto picks the layout of the weights).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
import torchvision
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

from ..config import ConfigError, InputConfig, ModelConfig, PredictConfig
from .backbones import build_backbone, check_backbone, norm_factory
from .roi_pool import GatherMultiScaleRoIAlign
from .weights import (COCO_INITS, TORCHVISION_ARCHS, InitWeights, frozen_bn_eps, load_detector_weights,
                      read_init_weights)

log = logging.getLogger("tinyseg")


def resolve_norm(cfg: ModelConfig, arch: str = "tinyseg") -> str:
    if cfg.norm != "auto":
        return cfg.norm
    # Frozen statistics only make sense when they came from pretraining; from scratch the
    # normalisation has to learn, and GroupNorm does so at batch size 2 (He et al., 2019).
    # torchvision's layouts have BatchNorm weights, so from scratch they train BatchNorm, as torchvision does.
    if cfg.init != "none":
        return "frozen_bn"
    return "bn" if arch in TORCHVISION_ARCHS else "gn"


def resolve_arch(cfg: ModelConfig, weights: InitWeights | None = None) -> str:
    if cfg.arch != "auto":
        return cfg.arch
    if cfg.init in COCO_INITS:
        return COCO_INITS[cfg.init]
    return weights.detector if weights is not None and weights.detector else "tinyseg"


def check_arch(cfg: ModelConfig, arch: str, norm: str) -> None:
    """torchvision's layouts fix what their weights' shapes fix; anything else set against them is refused."""
    if arch not in TORCHVISION_ARCHS:
        return
    fixed = {"backbone": "resnet50", "fpn_channels": 256, "box_head_dim": 1024, "mask_head_convs": 4,
             "mask_head_channels": 256}
    built = {key: getattr(cfg, key) for key in fixed} | {"mask_head_channels": mask_head_width(cfg)}
    for key, value in fixed.items():
        if built[key] != value:
            raise ConfigError(f"model.arch={arch} (model.init={cfg.init}) needs model.{key}={value}, "
                              f"got {getattr(cfg, key)}; or set model.arch=tinyseg to load only the backbone trunk")
    allowed = ("frozen_bn", "bn", "syncbn")
    if norm not in allowed:
        raise ConfigError(f"model.arch={arch} has BatchNorm weights: model.norm must be auto or one of "
                          f"{', '.join(allowed)}, got {norm}")


def mask_head_width(cfg: ModelConfig) -> int:
    return cfg.mask_head_channels or cfg.fpn_channels  # 0 = as wide as the FPN, Mask R-CNN's layout


def check_detector_init_allowed(cfg: ModelConfig, weights: InitWeights | None) -> None:
    if cfg.allow_detector_init or (cfg.init not in COCO_INITS and not (weights and weights.detector)):
        return
    what = f"torchvision's COCO-trained {COCO_INITS[cfg.init]}" if cfg.init in COCO_INITS else "a whole Mask R-CNN"
    raise ConfigError(f"model.init={cfg.init} loads {what}, and this config has model.allow_detector_init=false "
                      "(as the tinyvoc preset: its homework allows ImageNet-pretrained backbones only, no "
                      "COCO-pretrained detectors); use model.init=imagenet, or model.allow_detector_init=true where "
                      "your rules allow it")


def _to_float(value):
    if isinstance(value, torch.Tensor):
        return value.float()
    return type(value)(_to_float(v) for v in value)


class InferenceAmp:
    """Mixin for the heads: in eval mode the module runs under autocast and hands back fp32.

    In inference the heads can cost more than the backbone (100 detections per image: box and mask heads
    run per RoI; benchmarks/README.md, "Each speed-up alone"). Their outputs are cast to fp32 before
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


class AmpConvFCHead(InferenceAmp, FastRCNNConvFCHead):
    pass


class DetectionTransform(GeneralizedRCNNTransform):
    """torchvision's normalise/batch/postprocess, but no resize in training: data/augment.py sizes the images.

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


def build_model(cfg: ModelConfig, num_classes: int, *, load_weights: bool = True, test: InputConfig | None = None,
                predict: PredictConfig | None = None) -> MaskRCNN:
    """A Mask R-CNN whose class count (background included) comes from the data.

    load_weights=False builds the same model without reading model.init's weights (a checkpoint fills
    it). model.arch "auto" is replaced by the layout built, so that a run's saved config rebuilds it
    when model.init's file is no longer there. test, predict: the inference settings
    (apply_inference_settings); None = the config's defaults.
    """
    check_backbone(cfg)  # before reading any weights for it
    weights = None
    if load_weights:
        check_detector_init_allowed(cfg, None)  # before downloading anything
        check_arch(cfg, resolve_arch(cfg), resolve_norm(cfg, resolve_arch(cfg)))
        weights = read_init_weights(cfg.init, cfg.backbone)
        check_detector_init_allowed(cfg, weights)
    arch = resolve_arch(cfg, weights)  # a file's layout is known once it is read
    norm = resolve_norm(cfg, arch)
    check_arch(cfg, arch, norm)
    whole = weights is not None and weights.detector is not None and arch in TORCHVISION_ARCHS
    if whole and list(cfg.anchor_sizes) != [32, 64, 128, 256, 512]:
        log.warning("model.anchor_sizes=%s: the pretrained RPN learnt anchors of 32-512 px; it adapts, but its "
                    "first proposals will be off", cfg.anchor_sizes)
    if weights is not None and weights.detector and not whole:
        log.info("model.init=%s: a whole Mask R-CNN, but model.arch=%s: loading its backbone trunk only",
                 cfg.init, arch)
    if weights is not None and norm == "frozen_bn" and cfg.init != "imagenet":
        log.info("model.init=%s: frozen BatchNorm eps %g (%s)", cfg.init, *frozen_bn_eps(cfg.init))
    backbone = build_backbone(cfg, arch, norm, None if whole else weights)
    channels = cfg.fpn_channels
    if arch in TORCHVISION_ARCHS:
        head_norm = norm_factory(norm, roi_heads=True) if arch == "maskrcnn_resnet50_fpn_v2" else None
    else:
        head_norm = None if norm == "frozen_bn" else norm_factory(norm, roi_heads=True)
    mask_layers = [mask_head_width(cfg)] * cfg.mask_head_convs
    mask_head: nn.Module = AmpMaskHeads(channels, mask_layers, 1, norm_layer=head_norm)
    if cfg.mask_head_dropout > 0:
        mask_head = nn.Sequential(OrderedDict(heads=mask_head, dropout=nn.Dropout2d(cfg.mask_head_dropout)))
    resolution = 7
    if len(cfg.anchor_sizes) != 5:
        raise ConfigError(f"model.anchor_sizes needs 5 sizes (one per FPN level), got {cfg.anchor_sizes}")
    anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
    v2 = arch == "maskrcnn_resnet50_fpn_v2"
    box_head: nn.Module
    if v2:  # four 3x3 convs with norm and one FC, as torchvision's _v2 (Li et al., 2021)
        box_head = AmpConvFCHead((channels, resolution, resolution), [channels] * 4, [cfg.box_head_dim],
                                 norm_layer=head_norm)
        if cfg.box_head_dropout > 0:
            box_head.append(nn.Dropout(cfg.box_head_dropout))  # no parameters: the weights' keys stay put
    else:
        box_head = DropoutMLPHead(channels * resolution**2, cfg.box_head_dim, cfg.box_head_dropout)
    model = MaskRCNN(
        backbone,
        num_classes=None,
        rpn_anchor_generator=anchors,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(cfg.box_head_dim, num_classes),
        box_roi_pool=GatherMultiScaleRoIAlign(["0", "1", "2", "3"], resolution, sampling_ratio=2),
        mask_roi_pool=GatherMultiScaleRoIAlign(["0", "1", "2", "3"], 14, sampling_ratio=2),
        mask_head=mask_head,
        rpn_head=AmpRPNHead(channels, anchors.num_anchors_per_location()[0], conv_depth=2 if v2 else 1),
        mask_predictor=AmpMaskPredictor(mask_layers[-1], mask_layers[-1], num_classes),
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
    )
    model.transform = DetectionTransform(model.transform.min_size, model.transform.max_size,
                                         model.transform.image_mean, model.transform.image_std)
    apply_inference_settings(model, test or InputConfig(), predict or PredictConfig())
    if whole:
        log.info("model.init=%s: %s", cfg.init, load_detector_weights(model, weights, arch, num_classes))
    cfg.arch = arch
    return model


def apply_inference_settings(model: MaskRCNN, test: InputConfig, predict: PredictConfig) -> MaskRCNN:
    """The one place where the config's inference settings reach a model: test size, thresholds, count.

    TTA's settings stay in `predict` and are read by inference/tta.py, which restores the model it changes.
    """
    model.transform.min_size = (test.test_min_size,)
    model.transform.max_size = test.test_max_size
    model.roi_heads.score_thresh = predict.score_thresh
    model.roi_heads.detections_per_img = predict.max_detections
    model.roi_heads.nms_thresh = predict.nms_thresh
    return model


def set_precision(model: MaskRCNN, amp_dtype: torch.dtype | None, channels_last: bool) -> None:
    """Autocast for the backbone (training and inference) and the heads (inference only); the backbone
    channels-last where asked and where it pays: not for a GroupNorm model on a CPU, where GroupNorm is
    slow channels-last, in training as in prediction (benchmarks/README.md, "Each speed-up alone" and the
    Zen 4 section's training levers)."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    channels_last = channels_last and not (on_cpu and any(isinstance(m, nn.GroupNorm) for m in model.modules()))
    model.backbone.amp_dtype = amp_dtype
    for module in model.modules():
        if isinstance(module, InferenceAmp):
            module.amp_dtype = amp_dtype
    model.backbone.channels_last = channels_last
    if channels_last:
        model.backbone.to(memory_format=torch.channels_last)

