"""A mask confusion matrix at one IoU, with a background row and column: which classes get mixed up.

COCO AP says how good the ranking is; this says what the errors are. Rows are the ground-truth class,
columns the predicted class; the last row and column are background: [background, c] counts
detections of class c that match no object (false positives), [c, background] objects of class c
that no detection matches (missed). [background, background] stays 0.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from ..config import PredictConfig


def confusion_matrix(gt: dict[str, Any], detections: list[dict], score_thresh: float = PredictConfig.overlay_score_thresh,
                     iou_thresh: float = 0.5) -> tuple[np.ndarray, list[str]]:
    """(K+1) x (K+1) counts over the images of `gt`, and the K+1 row/column names (categories by id, then
    'background').

    Detections scoring below score_thresh are dropped. Within an image, pairs of (detection, object)
    are matched regardless of class, highest mask IoU first, each detection and object used once, only
    pairs with IoU >= iou_thresh (Ultralytics' ConfusionMatrix keeps each detection's best object first,
    which can leave a pair unmatched that this greedy order matches). Crowd objects are not counted; as
    COCOeval does, a detection left unmatched that lies mostly inside a crowd region (intersection over
    the detection's area >= iou_thresh) is ignored rather than called a false positive.
    """
    from pycocotools import mask as mask_utils

    from ..data.rle import segmentation_to_rle

    categories = sorted(gt["categories"], key=lambda c: c["id"])
    index = {c["id"]: k for k, c in enumerate(categories)}
    background = len(categories)
    matrix = np.zeros((background + 1, background + 1), dtype=np.int64)
    truths, crowds, found = defaultdict(list), defaultdict(list), defaultdict(list)
    for a in gt.get("annotations", []):
        (crowds if a.get("iscrowd", 0) else truths)[a["image_id"]].append(a)
    for d in detections:
        if d["score"] >= score_thresh:
            found[d["image_id"]].append(d)
    for image in gt["images"]:
        height, width = image["height"], image["width"]
        gts, dts = truths[image["id"]], found[image["id"]]
        g_rles = [segmentation_to_rle(a["segmentation"], height, width) for a in gts]
        d_rles = [segmentation_to_rle(d["segmentation"], height, width) for d in dts]
        unmatched_gt, unmatched_dt = set(range(len(gts))), set(range(len(dts)))
        if gts and dts:
            ious = np.asarray(mask_utils.iou(d_rles, g_rles, [0] * len(g_rles))).reshape(len(dts), len(gts))
            rows, cols = np.nonzero(ious >= iou_thresh)
            # Stable sort on -IoU: ties keep (detection, object) order, so the result is deterministic.
            for i, j in sorted(zip(rows.tolist(), cols.tolist()), key=lambda p: -ious[p[0], p[1]]):
                if i in unmatched_dt and j in unmatched_gt:
                    unmatched_dt.discard(i)
                    unmatched_gt.discard(j)
                    matrix[index[gts[j]["category_id"]], index[dts[i]["category_id"]]] += 1
        for j in unmatched_gt:
            matrix[index[gts[j]["category_id"]], background] += 1
        left = sorted(unmatched_dt)
        if left and crowds[image["id"]]:
            c_rles = [segmentation_to_rle(a["segmentation"], height, width) for a in crowds[image["id"]]]
            # iscrowd=1 makes pycocotools divide by the detection's area: the share of it inside the crowd.
            inside = np.asarray(mask_utils.iou([d_rles[i] for i in left], c_rles, [1] * len(c_rles)))
            left = [i for i, row in zip(left, inside.reshape(len(left), len(c_rles))) if row.max() < iou_thresh]
        for i in left:
            matrix[background, index[dts[i]["category_id"]]] += 1
    names = [c.get("name", str(c["id"])) for c in categories] + ["background"]
    return matrix, names
