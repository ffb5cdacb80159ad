"""Pretrained weights: ImageNet for the backbone trunk, COCO for the whole detector, or a local file.

`imagenet`, `coco` and `coco-v2` go through torchvision's weights API, which downloads into the torch hub
cache. Without a network and without the cached file they fail at once with the exact path to put the
file at.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

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


def read_state_dict(path: str) -> dict:
    """A state dict from a file: plain, or under "state_dict"/"model" (training checkpoints), DDP prefix removed."""
    if not Path(path).is_file():
        raise BackboneWeightsError(f"model.init: weights file {path} not found (use imagenet, coco, coco-v2, none, "
                                   "or a path)")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise BackboneWeightsError(f"{path}: cannot be loaded as a plain state dict ({error})") from None
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict):
        raise BackboneWeightsError(f"{path}: expected a state dict, got {type(loaded).__name__}")
    return {key.removeprefix("module."): value for key, value in loaded.items()}


def trunk_state(state: dict) -> dict:
    """Trunk keys as a bare ResNet names them, from a ResNet's, a backbone's or a whole detector's state."""
    stripped = {}
    for key, value in state.items():
        for prefix in ("backbone.body.", "body."):
            key = key.removeprefix(prefix)
        stripped[key] = value
    return stripped


def detector_layout(state: dict) -> str | None:
    """The torchvision Mask R-CNN layout of a whole detector's state dict; None for anything else.

    maskrcnn_resnet50_fpn has a two-layer MLP box head and no norm in its FPN and mask head; _v2 has
    a four-conv box head. A tinyseg model with GroupNorm heads matches neither, so only its trunk is used.
    """
    if not any(k.startswith("backbone.body.") for k in state) or not any(k.startswith("roi_heads.") for k in state):
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
    state = upgrade_detector_keys(read_state_dict(init))
    return InitWeights(state, init, detector_layout(state))


def upgrade_detector_keys(state: dict) -> dict:
    """Older torchvision releases named the RPN conv `conv` and the mask head convs `mask_fcnN`.

    torchvision renames them on load (RPNHead/MaskRCNNHeads._load_from_state_dict); doing it here
    lets the key-by-key checks below see one naming.
    """
    renamed = {}
    for key, value in state.items():
        if key in ("rpn.head.conv.weight", "rpn.head.conv.bias"):
            key = key.replace("rpn.head.conv.", "rpn.head.conv.0.0.")
        elif key.startswith("roi_heads.mask_head.mask_fcn"):
            number, _, kind = key.removeprefix("roi_heads.mask_head.mask_fcn").partition(".")
            if number.isdigit():
                key = f"roi_heads.mask_head.{int(number) - 1}.0.{kind}"
        renamed[key] = value
    return renamed


def load_trunk_weights(trunk: nn.Module, backbone: str, weights: InitWeights) -> None:
    """Load ImageNet or file weights into the trunk; the classifier (fc) is not needed."""
    state = {k: v for k, v in trunk_state(weights.state).items() if not k.startswith("fc.")}
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
