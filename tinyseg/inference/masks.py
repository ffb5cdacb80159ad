"""From the mask head's small probability maps to compressed RLEs, without full-size float masks.

torchvision pastes every M x M mask into a float (N, 1, H, W) tensor; for 100 detections on a
1000 x 1000 image that is 400 MB, which is then thresholded and transposed for pycocotools. Here each
mask is resized exactly as torchvision does (same padding, box expansion and bilinear sampling, so
the same pixels), thresholded inside its box, and written into one (H, W, N) uint8 Fortran-ordered
array that pycocotools encodes in a single call.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks


def paste_masks_binary(mask_probs: torch.Tensor, boxes: torch.Tensor, height: int, width: int,
                       thresh: float) -> np.ndarray:
    """(N, 1, M, M) probabilities + (N, 4) boxes in image pixels -> (H, W, N) uint8, Fortran order."""
    binary = np.zeros((height, width, mask_probs.shape[0]), dtype=np.uint8, order="F")
    for index, pasted in enumerate(_pasted_probabilities(mask_probs, boxes, height, width)):
        if pasted is not None:
            (top, bottom, left, right), probs = pasted
            binary[top:bottom, left:right, index] = (probs >= thresh).numpy()
    return binary


def paste_merged_binary(mask_probs: torch.Tensor, boxes: torch.Tensor, weights: torch.Tensor, height: int,
                        width: int, thresh: float) -> np.ndarray:
    """TTA's masks: row k of weights (K, N) mixes the N views' pasted probabilities into kept mask k,
    thresholded after mixing -> (H, W, K) uint8, Fortran order. Only the members' boxes are ever held
    at image scale, never a full-size float mask per view."""
    pasted = list(_pasted_probabilities(mask_probs, boxes, height, width))
    binary = np.zeros((height, width, weights.shape[0]), dtype=np.uint8, order="F")
    for index, row in enumerate(weights.float().cpu()):
        members = [(float(row[n]), pasted[n]) for n in row.nonzero().flatten().tolist() if pasted[n] is not None]
        if not members:
            continue
        regions = [region for _, (region, _) in members]  # (top, bottom, left, right) of each member
        top, left = min(r[0] for r in regions), min(r[2] for r in regions)
        bottom, right = max(r[1] for r in regions), max(r[3] for r in regions)
        mixed = torch.zeros(bottom - top, right - left)
        for weight, ((t, b, l, r), probs) in members:
            mixed[t - top:b - top, l - left:r - left] += weight * probs
        binary[top:bottom, left:right, index] = (mixed >= thresh).numpy()
    return binary


def _pasted_probabilities(mask_probs: torch.Tensor, boxes: torch.Tensor, height: int,
                          width: int) -> Iterator[tuple[tuple[int, int, int, int], torch.Tensor] | None]:
    """Each mask resized into its box as torchvision pastes it, one at a time: ((top, bottom, left, right),
    probabilities inside the image), or None for a box wholly outside it."""
    if mask_probs.shape[0] == 0:
        return
    padded, scale = expand_masks(mask_probs.float().cpu(), padding=1)
    for mask, box in zip(padded, expand_boxes(boxes.float().cpu(), scale).to(torch.int64).tolist()):
        x0, y0, x1, y1 = box
        box_width, box_height = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
        left, right, top, bottom = max(x0, 0), min(x1 + 1, width), max(y0, 0), min(y1 + 1, height)
        if left >= right or top >= bottom:
            yield None
            continue
        resized = F.interpolate(mask[None], size=(box_height, box_width), mode="bilinear", align_corners=False)[0, 0]
        yield (top, bottom, left, right), resized[top - y0:bottom - y0, left - x0:right - x0]


def encode_masks(masks: np.ndarray, channels_last: bool = False) -> list[dict]:
    """Compressed RLEs for binary masks, (N, H, W) or (H, W, N) with channels_last, in one pycocotools call."""
    from pycocotools import mask as mask_utils

    stacked = masks if channels_last else masks.transpose(1, 2, 0)
    if stacked.shape[2] == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(stacked.astype(np.uint8, copy=False)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles
