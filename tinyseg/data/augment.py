"""Every train-time augmentation, built from the config in one place (as torchvision's references/detection
keeps its presets apart from the training loop).

Three kinds, returned together by `build`:

- `SampleTransform`, one image at a time in the loader workers: the flipped copies (the reference
  solution's "original + copy + horizontally flipped copy"), then the torchvision.transforms.v2 pipeline
  (multi-scale resize or large-scale jitter, flip, photometric) on image, boxes and masks together. Its
  draws come from the global torch RNG, which the dataset seeds per sample from (seed, epoch, index).
- `Mosaic` (data/mosaic.py), in the dataset, since it loads images beyond the one sampled: four in one.
- `BatchTransform`, on a loaded batch, for augmentations that mix the batch's images: Simple Copy-Paste
  today, and the place for mixup. Each batch draws from its own `torch.Generator` seeded from (seed, epoch,
  batch index, rank), never from the global RNG: the model's own draws stay untouched, a run resumed
  mid-epoch repeats every batch exactly, and DDP ranks draw differently from each other.

The dataset then recomputes boxes from the transformed masks and drops instances cut to nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..config import InputConfig
from .dataset import finalize_target
from .mosaic import Mosaic

BatchOp = Callable[[list, list, torch.Generator], tuple[list, list]]
BATCH_AUGMENTATION, MODEL = 0, 1  # the streams batch_seed keeps apart


def batch_seed(seed: int, epoch: int, batch_index: int, rank: int, stream: int) -> int:
    """One well-spread seed from the batch's coordinates (numpy's SeedSequence mixes them; negative config
    seeds wrap around). Seeding from these instead of carrying a generator's state along makes every batch's
    draws independent of what ran before it: a resume anywhere, and each DDP rank, repeat them exactly."""
    keys = [seed % 2**64, epoch, batch_index, rank, stream]
    return int(np.random.SeedSequence(keys).generate_state(1, np.uint64)[0])


class SampleTransform:
    """(image, target, copy index) -> (image, target): copy k is mirrored when k < flipped_copies, then the
    random pipeline runs on every copy."""

    def __init__(self, pipeline: v2.Compose, flipped_copies: int = 0):
        self.pipeline = pipeline
        self.flipped_copies = flipped_copies

    def __call__(self, image: torch.Tensor, target: dict, copy: int = 0) -> tuple[torch.Tensor, dict]:
        if copy < self.flipped_copies:
            # The functional flip, not RandomHorizontalFlip(p=1): that one would still take a draw from
            # the RNG and shift every later draw of the pipeline.
            image = F.horizontal_flip(image)
            target = {**target, "masks": F.horizontal_flip(target["masks"]),
                      "boxes": F.horizontal_flip(target["boxes"])}
        return self.pipeline(image, target)


def sample_pipeline(cfg: InputConfig) -> v2.Compose:
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
        ops += photometric_jitter(cfg.channel_permutation)
    ops.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(ops)


def photometric_jitter(channel_permutation: bool) -> list:
    """torchvision's RandomPhotometricDistort (SSD's ranges, each part with p 0.5) from public transforms, with its
    channel shuffle only when asked for: a shuffle makes a purple fig out of a brown date. Contrast always comes
    before saturation and hue (torchvision draws that order)."""
    parts = [v2.ColorJitter(brightness=(0.875, 1.125)), v2.ColorJitter(contrast=(0.5, 1.5)),
             v2.ColorJitter(saturation=(0.5, 1.5)), v2.ColorJitter(hue=(-0.05, 0.05))]
    if channel_permutation:
        parts.append(v2.RandomChannelPermutation())
    return [v2.RandomApply([part], p=0.5) for part in parts]


@dataclass
class CopyPaste:
    """Simple Copy-Paste (Ghiasi et al., CVPR 2021): paste a random subset of the next image's instances
    onto each image of the batch, with `probability`.

    Only between images of the same size (large-scale jitter makes every crop the same size; other pairs
    are left alone). Pasted pixels hide what was under them: occluded parts are cut from the destination's
    masks, instances hidden entirely are dropped, and boxes are recomputed.
    """

    probability: float
    min_visible_pixels: int = 4

    def __call__(self, images: list, targets: list, generator: torch.Generator) -> tuple[list, list]:
        if self.probability <= 0 or len(images) < 2:
            return images, targets
        images, targets = list(images), list(targets)
        originals = list(zip(images, targets))
        for index in range(len(images)):
            source_image, source = originals[(index + 1) % len(images)]
            if (torch.rand((), generator=generator) >= self.probability
                    or source_image.shape != images[index].shape or not len(source["labels"])):
                continue
            chosen = torch.rand(len(source["labels"]), generator=generator) < 0.5
            if not chosen.any():
                chosen[torch.randint(len(chosen), (), generator=generator)] = True
            pasted_masks = source["masks"][chosen]
            alpha = pasted_masks.amax(dim=0).bool()
            images[index] = torch.where(alpha, source_image, images[index])
            kept_masks = targets[index]["masks"] & ~alpha
            visible = kept_masks.flatten(1).sum(dim=1) >= self.min_visible_pixels
            targets[index] = finalize_target({
                "masks": torch.cat([kept_masks[visible], pasted_masks]),
                "labels": torch.cat([targets[index]["labels"][visible], source["labels"][chosen]]),
                "image_id": targets[index]["image_id"],
            })
        return images, targets


class BatchTransform:
    """(images, targets, epoch, batch index) -> (images, targets): the batch-level ops in order, all drawing
    from one generator seeded for this batch on this rank. With no ops, the batch passes through."""

    def __init__(self, ops: list[BatchOp], seed: int = 0, rank: int = 0):
        self.ops = ops
        self.seed = seed
        self.rank = rank

    def generator(self, epoch: int, batch_index: int) -> torch.Generator:
        return torch.Generator().manual_seed(batch_seed(self.seed, epoch, batch_index, self.rank, BATCH_AUGMENTATION))

    def __call__(self, images, targets, epoch: int, batch_index: int) -> tuple[list, list]:
        images, targets = list(images), list(targets)
        if not self.ops:
            return images, targets
        generator = self.generator(epoch, batch_index)
        for op in self.ops:
            images, targets = op(images, targets, generator)
        return images, targets


class TrainAugmentation(NamedTuple):
    sample: SampleTransform
    batch: BatchTransform
    mosaic: Mosaic | None  # the dataset's: it needs images beyond the one sampled


def build(cfg: InputConfig, seed: int = 0, rank: int = 0) -> TrainAugmentation:
    """The training run's augmentation from `input.*`: the per-sample transform for the dataset and the
    batch transform for the training loop."""
    ops: list[BatchOp] = []
    if cfg.copy_paste_prob > 0:
        ops.append(CopyPaste(cfg.copy_paste_prob))
    mosaic = Mosaic(cfg.mosaic_prob, tuple(cfg.mosaic_scale)) if cfg.mosaic_prob > 0 else None
    return TrainAugmentation(SampleTransform(sample_pipeline(cfg), cfg.flipped_copies),
                             BatchTransform(ops, seed, rank), mosaic)
