"""Augmentation recipes, kept apart from the training loop (as torchvision's references/detection does).

All geometric ops run through torchvision.transforms.v2 on image, boxes and masks together; the
dataset then recomputes boxes from the transformed masks and drops instances cut to nothing.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from ..config import InputConfig


def train_transforms(cfg: InputConfig) -> v2.Compose:
    ops: list = []
    if cfg.lsj:
        size = cfg.lsj_size
        ops += [
            v2.ScaleJitter(target_size=(size, size), scale_range=tuple(cfg.lsj_scale), antialias=True),
            v2.RandomCrop((size, size), pad_if_needed=True, fill=0),
        ]
    else:
        # The model's own resize is switched off in training (see model/detector.py), so the sizes
        # chosen here are the sizes the network sees: multi-scale when min_size lists several.
        ops.append(v2.RandomShortestSize(min_size=list(cfg.min_size), max_size=cfg.max_size, antialias=True))
    if cfg.hflip_prob > 0:
        ops.append(v2.RandomHorizontalFlip(cfg.hflip_prob))
    if cfg.photometric:
        ops.append(v2.RandomPhotometricDistort(p=0.5))
    ops.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(ops)


def eval_transforms() -> v2.Compose:
    # Evaluation images keep their size: the model resizes to input.test_min_size and maps
    # its outputs back to the original pixels.
    return v2.Compose([v2.ToDtype(torch.float32, scale=True)])
