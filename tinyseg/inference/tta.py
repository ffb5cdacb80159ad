"""Test-time augmentation: horizontal flip and extra scales, merged at the image's own scale.

Every view's detections are mapped back to the original pixels (the model's postprocess does the
scale; the flip is undone here). Then, per class, NMS picks the surviving boxes, and each survivor's
mask is the score-weighted mean of the masks of all views' detections that overlap it (box voting
for masks), which smooths the mask edges more than picking one view would.

The views keep the mask head's small probability maps ("mask_probs", as prediction without TTA does);
the merge returns the mixing weights, and inference/masks.py pastes each merged mask inside its
members' boxes only. Full-size float masks per view (100 of them per view on a 1000 x 1400 photo are
560 MB) made TTA's peak memory several times that of prediction without it.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import batched_nms, box_iou


def _unflip(output: dict[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
    boxes = output["boxes"].clone()
    boxes[:, 0], boxes[:, 2] = width - output["boxes"][:, 2], width - output["boxes"][:, 0]
    return {**output, "boxes": boxes, "mask_probs": output["mask_probs"].flip(-1)}


def merge_views(views: list[dict[str, torch.Tensor]], nms_thresh: float, max_detections: int) -> dict[str, torch.Tensor]:
    """The kept detections ("boxes", "scores", "labels") and, for their masks, every view's "mask_probs"
    and "mask_boxes" with "mask_weights" (kept x all: each row sums to 1)."""
    merged = {key: torch.cat([view[key] for view in views]) for key in ("boxes", "scores", "labels", "mask_probs")}
    keep = batched_nms(merged["boxes"], merged["scores"], merged["labels"], nms_thresh)[:max_detections]
    overlap = box_iou(merged["boxes"][keep], merged["boxes"]) >= nms_thresh
    same_class = merged["labels"][keep][:, None] == merged["labels"][None, :]
    weights = (overlap & same_class).float() * merged["scores"][None, :]
    weights = weights / weights.sum(dim=1, keepdim=True)
    return {"boxes": merged["boxes"][keep], "scores": merged["scores"][keep], "labels": merged["labels"][keep],
            "mask_probs": merged["mask_probs"], "mask_boxes": merged["boxes"], "mask_weights": weights}


@torch.no_grad()
def tta_forward(model: nn.Module, images: list[torch.Tensor], scales: list[int], flip: bool, nms_thresh: float,
                max_detections: int) -> list[dict[str, torch.Tensor]]:
    base, pasting = model.transform.min_size, model.transform.paste_masks
    per_image: list[list[dict]] = [[] for _ in images]
    try:
        model.transform.paste_masks = False  # views keep "mask_probs"
        for size in [None, *scales]:
            if size is not None:
                model.transform.min_size = (size,)
            for flipped in ([False, True] if flip else [False]):
                batch = [image.flip(-1) for image in images] if flipped else images
                for views, output, image in zip(per_image, model(batch), images):
                    views.append(_unflip(output, image.shape[-1]) if flipped else output)
    finally:
        model.transform.min_size, model.transform.paste_masks = base, pasting
    return [merge_views(views, nms_thresh, max_detections) for views in per_image]
