"""ImageNet (or user-supplied) weights for the backbone trunk.

`imagenet` goes through torchvision's weights API, which downloads into the torch hub cache. Without a
network and without the cached file it fails at once with the exact path to put the file at.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn


class BackboneWeightsError(RuntimeError):
    """Backbone weights that cannot be had or do not fit."""


def imagenet_weights(backbone: str):
    import torchvision

    return torchvision.models.get_model_weights(backbone).DEFAULT


def cached_weights_path(backbone: str) -> Path:
    url = imagenet_weights(backbone).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def imagenet_state_dict(backbone: str, timeout_s: float = 20.0) -> dict:
    weights = imagenet_weights(backbone)
    cached = cached_weights_path(backbone)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)  # a dead network should fail in seconds, not hang a job
    try:
        return weights.get_state_dict(progress=not cached.exists())
    except Exception as error:  # URLError, socket errors, a half-downloaded file
        raise BackboneWeightsError(
            f"could not get the ImageNet weights for {backbone} ({weights}) from {weights.url}: {error}.\n"
            f"Without network, download that file on another machine and put it at {cached}\n"
            f"(or set TORCH_HOME), or pass model.init=/path/to/{backbone}.pth, or model.init=none to train from scratch."
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def file_state_dict(path: str) -> dict:
    if not Path(path).is_file():
        raise BackboneWeightsError(f"model.init: weights file {path} not found (use imagenet, none, or a path)")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise BackboneWeightsError(f"{path}: cannot be loaded as a plain state dict ({error})") from None
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict):
        raise BackboneWeightsError(f"{path}: expected a state dict, got {type(loaded).__name__}")
    prefixes = ("module.", "backbone.body.", "body.")
    stripped = {}
    for key, value in loaded.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
        stripped[key] = value
    return stripped


def load_trunk_weights(trunk: nn.Module, backbone: str, init: str) -> None:
    """Load ImageNet or file weights into the trunk; the classifier (fc) is not needed."""
    state = imagenet_state_dict(backbone) if init == "imagenet" else file_state_dict(init)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = trunk.state_dict()
    # FrozenBatchNorm has no num_batches_tracked; GroupNorm has no running statistics.
    usable = {k: v for k, v in state.items() if k in own}
    missing = [k for k in own if k not in usable and not k.startswith("fc.")]
    if missing and not all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in missing):
        source = "ImageNet" if init == "imagenet" else init
        raise BackboneWeightsError(f"{source} weights do not fit {backbone}: missing {missing[:5]}"
                                   f"{' ...' if len(missing) > 5 else ''}")
    wrong = [k for k, v in usable.items() if v.shape != own[k].shape]
    if wrong:
        raise BackboneWeightsError(f"weights for {backbone} have wrong shapes at {wrong[:5]}")
    trunk.load_state_dict(usable, strict=False)
