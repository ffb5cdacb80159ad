"""The evaluation jobs of throughput.py: pycocotools (the reference) and tinyseg on one result set."""

from __future__ import annotations

import json
from pathlib import Path

def shifted_detections(gt_json: str | Path) -> tuple[dict, list[dict]]:
    """Ground truth (nuclei val in throughput.py) and a realistic result set: each instance shifted a
    little, a tenth of them missed, random scores."""
    import contextlib
    import io

    import numpy as np
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    gt = json.loads(Path(gt_json).read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
    rng = np.random.default_rng(0)
    detections = []
    for annotation in gt["annotations"]:
        if rng.random() < 0.1:
            continue
        mask = np.roll(coco.annToMask(annotation), tuple(rng.integers(-2, 3, size=2)), axis=(0, 1))
        rle = mask_utils.encode(np.asfortranarray(mask))
        rle["counts"] = rle["counts"].decode()
        detections.append({"image_id": annotation["image_id"], "category_id": annotation["category_id"],
                           "score": float(rng.random()), "segmentation": rle})
    return gt, detections


def reference_evaluate(gt: dict, detections: list[dict]) -> list[float]:
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes([dict(d) for d in detections]), "segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats]


def tinyseg_evaluate(gt: dict, detections: list[dict]) -> list[float]:
    from tinyseg.evaluation.coco_eval import STAT_NAMES, evaluate_detections

    stats = evaluate_detections(gt, detections, ("segm",))["segm"]["stats"]
    return [stats[name] for name in STAT_NAMES]
