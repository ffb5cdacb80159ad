"""COCO mask encodings: polygons, uncompressed and compressed RLE, and the binary masks they stand for."""

from __future__ import annotations

from typing import Any

import numpy as np


def compressed_rle_counts(counts: str) -> list[int] | None:
    """The run lengths of a COCO compressed RLE string (pycocotools' rleFrString), or None if malformed:
    pycocotools accepts any string here and fails only when the mask is decoded, in the first batch."""
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(counts):
                return None  # the last number is cut off
            code = ord(counts[position]) - 48
            if not 0 <= code < 64:
                return None
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            position, shift = position + 1, shift + 5
            if not more and code & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> dict:
    """One compressed RLE for a polygon list (parts merged), an uncompressed RLE or a compressed one."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    counts = segmentation["counts"]
    return {"size": list(segmentation["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def decode_mask(rle: dict, height: int, width: int) -> np.ndarray:
    """One (H, W) bool mask from a compressed RLE."""
    return decode_masks([rle], height, width)[0].astype(bool)


def decode_masks(rles: list[dict], height: int, width: int) -> np.ndarray:
    """(N, H, W) uint8 masks from compressed RLEs, decoded in one call.

    faster-coco-eval decodes rather than pycocotools: under numpy 2 every pycocotools decode fails once
    inside numpy and is retried after a DeprecationWarning, and an exception raised while that warning
    is emitted (a Ctrl-C arriving then, or warnings as errors) surfaces as a TypeError instead.
    """
    from faster_coco_eval.core import mask as rle_codec

    if not rles:
        return np.zeros((0, height, width), dtype=np.uint8)
    return np.ascontiguousarray(rle_codec.decode(rles).transpose(2, 0, 1))
