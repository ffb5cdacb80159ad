"""Simple Copy-Paste (Ghiasi et al., CVPR 2021): paste a random subset of one image's instances onto another.

Applied to a loaded batch, between images of the same size (large-scale jitter makes every crop the
same size; other pairs are left alone). Pasted pixels hide what was under them: occluded parts are cut
from the destination's masks, instances hidden entirely are dropped, and boxes are recomputed.
"""

from __future__ import annotations

import torch

from .dataset import finalize_target


def copy_paste(images: list[torch.Tensor], targets: list[dict], probability: float,
               min_visible_pixels: int = 4) -> tuple[list[torch.Tensor], list[dict]]:
    if probability <= 0 or len(images) < 2:
        return images, targets
    images, targets = list(images), list(targets)
    originals = [(image, dict(target)) for image, target in zip(images, targets)]
    for index in range(len(images)):
        source_image, source = originals[(index + 1) % len(images)]
        if torch.rand(()) >= probability or source_image.shape != images[index].shape or not len(source["labels"]):
            continue
        chosen = torch.rand(len(source["labels"])) < 0.5
        if not chosen.any():
            chosen[torch.randint(len(chosen), ())] = True
        pasted_masks = source["masks"][chosen]
        alpha = pasted_masks.amax(dim=0).bool()
        images[index] = torch.where(alpha, source_image, images[index])
        kept_masks = targets[index]["masks"] & ~alpha
        visible = kept_masks.flatten(1).sum(dim=1) >= min_visible_pixels
        merged = {
            "masks": torch.cat([kept_masks[visible], pasted_masks]),
            "labels": torch.cat([targets[index]["labels"][visible], source["labels"][chosen]]),
            "image_id": targets[index]["image_id"],
        }
        targets[index] = finalize_target(merged)
    return images, targets
