"""COCO bbox and segm AP with faster-coco-eval (tested equal to pycocotools in tests/test_evaluation.py)."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np

IOU_TYPES = ("bbox", "segm")
STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def evaluate_detections(gt: dict[str, Any], detections: list[dict], iou_types=IOU_TYPES) -> dict[str, Any]:
    """Score detections against a COCO ground-truth dict.

    Returns per IoU type: the 12 standard numbers (`stats`), the printed summary (`summary`) and
    AP50 per category (`per_class_AP50`, keyed by category name). Empty detections score 0.
    """
    from faster_coco_eval import COCO, COCOeval_faster

    results: dict[str, Any] = {}
    image_ids = {image["id"] for image in gt["images"]}
    detections = [d for d in detections if d["image_id"] in image_ids]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(_with_areas(gt))
    for iou_type in iou_types:
        # Fresh copies each pass: loadRes writes numpy boxes and areas into the dicts it is given.
        usable = [_copy(d) for d in detections if iou_type == "bbox" or "segmentation" in d]
        if not usable:
            results[iou_type] = _empty_result(gt)
            continue
        if iou_type == "bbox":
            usable = [_with_bbox(d) for d in usable]
        else:
            # As detectron2 does: without 'bbox', loadRes takes each detection's area from its mask
            # (with one, from its box), and the small/medium/large ranges use mask areas like the GT.
            for d in usable:
                d.pop("bbox", None)
        coco_dt = coco_gt.loadRes(usable)
        evaluator = COCOeval_faster(coco_gt, coco_dt, iouType=iou_type, print_function=lambda *a, **k: None)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        stats = [float(v) for v in evaluator.stats[:12]]
        results[iou_type] = {
            "stats": dict(zip(STAT_NAMES, stats)),
            "summary": summary_lines(stats, evaluator.params.maxDets),
            "per_class_AP50": _per_class_ap50(evaluator, gt),
            "pr_curve_50": _pr_curves(evaluator, gt),
        }
    return results


def summary_lines(stats: list[float], max_dets: list[int]) -> list[str]:
    """The 12 standard lines, formatted as pycocotools prints them."""
    rows = [("AP", "0.50:0.95", "all", -1), ("AP", "0.50", "all", -1), ("AP", "0.75", "all", -1),
            ("AP", "0.50:0.95", "small", -1), ("AP", "0.50:0.95", "medium", -1), ("AP", "0.50:0.95", "large", -1),
            ("AR", "0.50:0.95", "all", 0), ("AR", "0.50:0.95", "all", 1), ("AR", "0.50:0.95", "all", -1),
            ("AR", "0.50:0.95", "small", -1), ("AR", "0.50:0.95", "medium", -1), ("AR", "0.50:0.95", "large", -1)]
    lines = []
    for (kind, iou, area, dets), value in zip(rows, stats):
        title = "Average Precision" if kind == "AP" else "Average Recall"
        lines.append(f" {title:<18} ({kind}) @[ IoU={iou:<9} | area={area:>6s} | maxDets={max_dets[dets]:>3d} ] = {value:0.3f}")
    return lines


def _with_areas(gt: dict[str, Any]) -> dict[str, Any]:
    """COCO's evaluation uses annotation areas for the size ranges and crowd handling; fill them if absent."""
    from pycocotools import mask as mask_utils

    from ..data.coco import segmentation_to_rle

    sizes = {image["id"]: (image["height"], image["width"]) for image in gt["images"]}
    annotations = []
    for index, annotation in enumerate(gt.get("annotations", [])):
        annotation = dict(annotation)
        if annotation.get("id") is None:
            annotation["id"] = index + 1
        if "area" not in annotation or "bbox" not in annotation:
            rle = segmentation_to_rle(annotation["segmentation"], *sizes[annotation["image_id"]])
            annotation.setdefault("area", float(mask_utils.area(rle)))
            annotation.setdefault("bbox", [float(v) for v in mask_utils.toBbox(rle)])
        annotation.setdefault("iscrowd", 0)
        annotations.append(annotation)
    return {**gt, "annotations": annotations}


def _copy(detection: dict) -> dict:
    copied = dict(detection)
    if isinstance(copied.get("segmentation"), dict):
        copied["segmentation"] = dict(copied["segmentation"])
    return copied


def _with_bbox(detection: dict) -> dict:
    if "bbox" in detection:
        return detection
    from pycocotools import mask as mask_utils

    rle = dict(detection["segmentation"])
    return {**detection, "bbox": [float(v) for v in mask_utils.toBbox(rle)]}


def _per_class_ap50(evaluator, gt: dict[str, Any]) -> dict[str, float]:
    precision = evaluator.eval["precision"]  # [iou, recall, category, area, max_dets]
    names = {c["id"]: c.get("name", str(c["id"])) for c in gt["categories"]}
    per_class = {}
    for k, category_id in enumerate(evaluator.params.catIds):
        values = precision[0, :, k, 0, -1]
        values = values[values > -1]
        per_class[names[category_id]] = float(np.mean(values)) if values.size else float("nan")
    return per_class


def _pr_curves(evaluator, gt: dict[str, Any]) -> dict[str, Any]:
    """Precision at the 101 COCO recall points, IoU 0.5, all areas, 100 detections: per class."""
    precision = evaluator.eval["precision"]
    names = {c["id"]: c.get("name", str(c["id"])) for c in gt["categories"]}
    curves = {names[cid]: [float(v) for v in precision[0, :, k, 0, -1]] for k, cid in enumerate(evaluator.params.catIds)}
    return {"recall": [float(r) for r in evaluator.params.recThrs], "precision": curves}


def image_f1(gt: dict[str, Any], detections: list[dict], score_thresh: float = 0.5, iou: float = 0.5) -> dict[int, float]:
    """Per image, F1 of mask matches at IoU >= iou among detections scoring >= score_thresh (crowds ignored).

    A plain, readable per-image quality for finding the worst images; COCO AP stays the metric.
    """
    from collections import defaultdict

    from pycocotools import mask as mask_utils

    from ..data.coco import segmentation_to_rle

    sizes = {image["id"]: (image["height"], image["width"]) for image in gt["images"]}
    truths, found = defaultdict(list), defaultdict(list)
    for a in gt.get("annotations", []):
        if not a.get("iscrowd", 0):
            truths[a["image_id"]].append(a)
    for d in detections:
        if d["score"] >= score_thresh:
            found[d["image_id"]].append(d)
    scores = {}
    for image_id, (height, width) in sizes.items():
        gts, dts = truths[image_id], sorted(found[image_id], key=lambda d: -d["score"])
        if not gts and not dts:
            scores[image_id] = 1.0
            continue
        matched = 0
        if gts and dts:
            g_rles = [segmentation_to_rle(a["segmentation"], height, width) for a in gts]
            d_rles = [segmentation_to_rle(d["segmentation"], height, width) for d in dts]
            ious = mask_utils.iou(d_rles, g_rles, [0] * len(g_rles))
            used = set()
            for i, d in enumerate(dts):
                candidates = [(ious[i][j], j) for j, a in enumerate(gts)
                              if j not in used and a["category_id"] == d["category_id"] and ious[i][j] >= iou]
                if candidates:
                    used.add(max(candidates)[1])
                    matched += 1
        scores[image_id] = 2 * matched / (len(gts) + len(dts))
    return scores


def _empty_result(gt: dict[str, Any]) -> dict[str, Any]:
    return {"stats": {name: 0.0 for name in STAT_NAMES}, "summary": ["(no detections)"],
            "per_class_AP50": {c.get("name", str(c["id"])): 0.0 for c in gt["categories"]},
            "pr_curve_50": {"recall": [], "precision": {}}}


def format_report(results: dict[str, Any]) -> str:
    lines = []
    for iou_type, result in results.items():
        lines.append(f"== {iou_type} ==")
        lines += result["summary"]
        lines.append(f"{'category':<20s} AP50")
        for name, value in result["per_class_AP50"].items():
            lines.append(f"{name:<20s} {'  n/a' if value != value else f'{value:.3f}'}")
    return "\n".join(lines)
