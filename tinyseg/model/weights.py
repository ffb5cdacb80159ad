"""Pretrained weights: ImageNet for the backbone trunk, COCO for the whole detector, or a local file.

`imagenet`, `coco` and `coco-v2` go through torchvision's weights API, which downloads into the torch hub
cache. Without a network and without the cached file they fail at once with the exact path to put the
file at.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from ..runtime.checkpoint import FORMAT as CHECKPOINT_FORMAT

log = logging.getLogger("tinyseg")

# model.init value -> the torchvision detector whose COCO weights it loads
COCO_INITS = {"coco": "maskrcnn_resnet50_fpn", "coco-v2": "maskrcnn_resnet50_fpn_v2"}
TORCHVISION_ARCHS = tuple(COCO_INITS.values())
# Their shapes follow the class count, and their rows mean COCO's 91 classes: they always start afresh.
CLASS_SPECIFIC = ("roi_heads.box_predictor.cls_score.", "roi_heads.box_predictor.bbox_pred.",
                  "roi_heads.mask_predictor.mask_fcn_logits.")


class BackboneWeightsError(RuntimeError):
    """Pretrained weights that cannot be had or do not fit."""


@dataclass
class InitWeights:
    state: dict[str, torch.Tensor]
    source: str  # for messages: what the weights are, or the file they came from
    detector: str | None  # the torchvision Mask R-CNN layout when they are a whole detector's weights


def imagenet_weights(backbone: str):
    import torchvision

    if backbone not in torchvision.models.list_models():
        # a family registered outside torchvision (model/backbones.py): its weights can only be a file
        raise BackboneWeightsError(f"model.init=imagenet: torchvision has no ImageNet weights for model.backbone="
                                   f"{backbone}; use model.init=/path/to/weights.pth or model.init=none")
    return torchvision.models.get_model_weights(backbone).DEFAULT


def coco_weights(init: str):
    from torchvision.models import detection

    if init == "coco":
        return detection.MaskRCNN_ResNet50_FPN_Weights.COCO_V1  # box AP 37.9, mask AP 34.6
    return detection.MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1  # box AP 47.4, mask AP 41.8


def hub_cache_path(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def cached_weights_path(backbone: str) -> Path:
    return hub_cache_path(imagenet_weights(backbone).url)


def download_state_dict(weights, what: str, instead: str, timeout_s: float = 20.0) -> dict:
    cached = hub_cache_path(weights.url)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)  # a dead network should fail in seconds, not hang a job
    try:
        return weights.get_state_dict(progress=not cached.exists(), check_hash=True)
    except Exception as error:  # URLError, socket errors, a half-downloaded file
        raise BackboneWeightsError(
            f"could not get {what} ({weights}) from {weights.url}: {error}.\n"
            f"Without network, download that file on another machine and put it at {cached}\n"
            f"(or set TORCH_HOME), or pass {instead}."
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def imagenet_state_dict(backbone: str, timeout_s: float = 20.0) -> dict:
    return download_state_dict(imagenet_weights(backbone), f"the ImageNet weights for {backbone}",
                               f"model.init=/path/to/{backbone}.pth, or model.init=none to train from scratch",
                               timeout_s)


def coco_state_dict(init: str, timeout_s: float = 20.0) -> dict:
    weights = coco_weights(init)
    name = os.path.basename(urlparse(weights.url).path)
    return download_state_dict(weights, f"torchvision's COCO-trained {COCO_INITS[init]}",
                               f"model.init=/path/to/{name} (that same file, from anywhere), or model.init=imagenet "
                               "to start from an ImageNet backbone only", timeout_s)


def load_weights_file(path: str):
    if not Path(path).is_file():
        raise BackboneWeightsError(f"model.init: weights file {path} not found (use imagenet, coco, coco-v2, none, "
                                   "or a path)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise BackboneWeightsError(f"{path}: cannot be loaded as a plain state dict ({error})") from None


def is_tinyseg_checkpoint(loaded) -> bool:
    return isinstance(loaded, dict) and loaded.get("format") == CHECKPOINT_FORMAT


def read_state_dict(path: str, loaded=None) -> dict:
    """A state dict from a file: plain, or under "state_dict"/"model" (training checkpoints), DDP prefix removed."""
    if loaded is None:
        loaded = load_weights_file(path)
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict):
        raise BackboneWeightsError(f"{path}: expected a state dict, got {type(loaded).__name__}")
    return {key.removeprefix("module."): value for key, value in loaded.items()}


def trunk_state(state: dict) -> dict:
    """Trunk keys as the bare trunk names them, from a trunk's, a backbone's or a whole detector's state."""
    stripped = {}
    for key, value in state.items():
        for prefix in ("backbone.body.", "body."):
            key = key.removeprefix(prefix)
        stripped[key] = value
    return stripped


def detector_layout(state: dict) -> str | None:
    """The torchvision Mask R-CNN layout of a whole detector's state dict; None for anything else.

    Both are a ResNet-50 (3-4-6-3 Bottleneck blocks of width 64) with a 256-channel FPN; any other trunk
    or width is not theirs, whatever its heads. maskrcnn_resnet50_fpn has a two-layer MLP box head and
    no norm in its FPN and mask head; _v2 has a four-conv box head. A tinyseg model with frozen BatchNorm
    and R50/256/1024 has v1's tensors exactly, so only its checkpoint's marker tells it apart
    (read_init_weights); one with GroupNorm heads matches neither.
    """
    if not any(k.startswith("backbone.body.") for k in state) or not any(k.startswith("roi_heads.") for k in state):
        return None
    shapes = {"backbone.body.layer4.2.conv3.weight": (2048, 512, 1, 1),
              "backbone.fpn.inner_blocks.3.0.weight": (256, 2048, 1, 1)}
    if any(k not in state or tuple(state[k].shape) != shape for k, shape in shapes.items()):
        return None
    if "backbone.body.layer3.6.conv1.weight" in state:  # ResNet-101 and -152 have 23 and 36 blocks there
        return None
    if "roi_heads.box_head.0.0.weight" in state:
        return "maskrcnn_resnet50_fpn_v2"
    normed = ("roi_heads.mask_head.0.1.weight", "backbone.fpn.inner_blocks.0.1.weight")
    if "roi_heads.box_head.fc6.weight" in state and not any(k in state for k in normed):
        return "maskrcnn_resnet50_fpn"
    return None


def read_init_weights(init: str, backbone: str) -> InitWeights | None:
    if init == "none":
        return None
    if init == "imagenet":
        return InitWeights(imagenet_state_dict(backbone), f"ImageNet {backbone}", None)
    if init in COCO_INITS:
        state = upgrade_detector_keys(coco_state_dict(init))
        return InitWeights(state, f"torchvision's COCO {COCO_INITS[init]} ({coco_weights(init)})", COCO_INITS[init])
    loaded = load_weights_file(init)
    if is_tinyseg_checkpoint(loaded):
        # tinyseg's own run: its trunk, as before whole-detector loading existed. Its heads learnt its
        # classes; and it is the user's training, not a COCO-pretrained detector (model.allow_detector_init).
        # The weights that were evaluated: the EMA's when the run kept one (as the Predictor does).
        which = "ema" if isinstance(loaded.get("ema"), dict) else "model"
        state = {k.removeprefix("module."): v for k, v in loaded[which].items()}
        log.info("model.init=%s: a tinyseg checkpoint: loading the backbone trunk of its %s weights", init,
                 "EMA" if which == "ema" else "model")
        return InitWeights(state, init, None)
    state = upgrade_detector_keys(read_state_dict(init, loaded))
    return InitWeights(state, init, detector_layout(state))


def frozen_bn_eps(init: str) -> tuple[float, str]:
    """The eps of frozen BatchNorm for model.init's weights, and why.

    torchvision's COCO_V1 maskrcnn_resnet50_fpn weights were trained with eps 0, and torchvision sets
    it back for those weights only (maskrcnn_resnet50_fpn: overwrite_eps(model, 0.0) when weights ==
    COCO_V1). Its ImageNet backbones, the v2 weights and a model trained with weights=None use 1e-5. A
    file is taken for the COCO_V1 weights by the name torchvision downloads them under. Decided from
    the setting alone, so a checkpoint's config rebuilds the same model without the file.
    """
    coco_v1 = os.path.basename(urlparse(coco_weights("coco").url).path)
    if init == "coco":
        return 0.0, "torchvision's COCO_V1 weights were trained with eps 0"
    if Path(init).name == coco_v1:
        return 0.0, f"{coco_v1} is torchvision's COCO_V1 file by its name, trained with eps 0"
    return 1e-5, f"eps 0 only for torchvision's COCO_V1 weights (model.init=coco, or a file named {coco_v1})"


def upgrade_detector_keys(state: dict) -> dict:
    """Older torchvision releases (the COCO_V1 file among them) named the RPN conv `conv`, the mask head
    convs `mask_fcnN` and the FPN convs `inner_blocks.N` / `layer_blocks.N` (no `.0` of a conv-norm block).

    torchvision renames them on load (RPNHead/MaskRCNNHeads/FeaturePyramidNetwork._load_from_state_dict,
    state dicts of _version < 2); doing it here lets the key-by-key checks below see one naming.
    """
    renamed = {}
    for key, value in state.items():
        if key in ("rpn.head.conv.weight", "rpn.head.conv.bias"):
            key = key.replace("rpn.head.conv.", "rpn.head.conv.0.0.")
        elif key.startswith("roi_heads.mask_head.mask_fcn"):
            number, _, kind = key.removeprefix("roi_heads.mask_head.mask_fcn").partition(".")
            if number.isdigit():
                key = f"roi_heads.mask_head.{int(number) - 1}.0.{kind}"
        elif key.startswith(("backbone.fpn.inner_blocks.", "backbone.fpn.layer_blocks.")):
            blocks, number, kind = key.rsplit(".", 2)
            if blocks.endswith(("inner_blocks", "layer_blocks")) and number.isdigit():
                key = f"{blocks}.{number}.0.{kind}"
        renamed[key] = value
    return renamed


def load_trunk_weights(trunk: nn.Module, backbone: str, weights: InitWeights,
                       weights_key: Callable[[str], str] | None = None) -> None:
    """Load ImageNet or file weights into the trunk; the classifier (fc) is not needed.

    weights_key: torchvision's key for the model -> the trunk's, where the trunk arranges torchvision's
    modules differently (Trunk.weights_key, model/backbones.py).
    """
    state = {k: v for k, v in trunk_state(weights.state).items() if not k.startswith("fc.")}
    if weights_key is not None:
        state = {weights_key(k): v for k, v in state.items()}
    own = trunk.state_dict()
    # FrozenBatchNorm has no num_batches_tracked; GroupNorm has no running statistics.
    usable = {k: v for k, v in state.items() if k in own}
    missing = [k for k in own if k not in usable and not k.startswith("fc.")]
    if missing and not all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in missing):
        source = "ImageNet" if weights.source.startswith("ImageNet") else weights.source
        raise BackboneWeightsError(f"{source} weights do not fit {backbone}: missing {missing[:5]}"
                                   f"{' ...' if len(missing) > 5 else ''}")
    wrong = [k for k, v in usable.items() if v.shape != own[k].shape]
    if wrong:
        raise BackboneWeightsError(f"weights for {backbone} have wrong shapes at {wrong[:5]}")
    trunk.load_state_dict(usable, strict=False)


def torchvision_key(key: str) -> str:
    # mask_head_dropout wraps the mask head as Sequential(heads=..., dropout=...)
    return key.replace("roi_heads.mask_head.heads.", "roi_heads.mask_head.", 1)


def load_detector_weights(model: nn.Module, weights: InitWeights, arch: str, num_classes: int) -> str:
    """Every tensor of a torchvision Mask R-CNN but the class-specific ones; returns the line to log.

    Refuses a state dict that leaves any other tensor of the model unset, or that holds tensors the
    model has no place for: either means it is not the layout `arch` names.
    """
    own = model.state_dict()
    loaded, kept, missing, wrong = {}, [], [], []
    for key, value in own.items():
        if key.startswith(CLASS_SPECIFIC):
            kept.append(key)
            continue
        source = torchvision_key(key)
        if source not in weights.state:
            # A counter, not a weight: FrozenBN files have none, trainable BatchNorm starts it at 0.
            if not key.endswith("num_batches_tracked"):
                missing.append(source)
        elif weights.state[source].shape != value.shape:
            wrong.append(f"{source} {tuple(weights.state[source].shape)} vs {tuple(value.shape)}")
        else:
            loaded[key] = weights.state[source]
    used = {torchvision_key(k) for k in own}
    extra = [k for k in weights.state if k not in used and not k.endswith("num_batches_tracked")]
    problems = [f"{name} {items[:3]}{' ...' if len(items) > 3 else ''}"
                for name, items in (("missing", missing), ("wrong shapes", wrong), ("unexpected", extra)) if items]
    if problems:
        raise BackboneWeightsError(f"{weights.source}: not a torchvision {arch} state dict "
                                   f"(model.arch={arch}): {'; '.join(problems)}")
    model.load_state_dict(loaded, strict=False)
    counters = sum(k.endswith("num_batches_tracked") for k in weights.state) - sum(
        k.endswith("num_batches_tracked") for k in loaded)
    skipped = f"; {counters} BatchNorm batch counters skipped (frozen norms keep none)" if counters else ""
    return (f"loaded {len(loaded)} tensors from {weights.source}; re-initialised {len(kept)} class-specific "
            f"tensors (box classifier, box regressor, mask logits) for {num_classes - 1} classes + background{skipped}")
