"""COCO bbox and segm AP with faster-coco-eval (tested equal to pycocotools in tests/test_evaluation.py)."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..config import PredictConfig
from ..data.coco import DatasetError

log = logging.getLogger("tinyseg")

IOU_TYPES = ("bbox", "segm")
STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def evaluate_detections(gt: dict[str, Any], detections: list[dict], iou_types=IOU_TYPES,
                        allow_subset: bool = False, ci_resamples: int = 0, ci_level: float | None = None,
                        ci_seed: int | None = None) -> dict[str, Any]:
    """Score detections against a COCO ground-truth dict.

    Returns per IoU type: the 12 standard numbers (`stats`), the printed summary (`summary`) and
    AP50 per category (`per_class_AP50`, keyed by category name). Empty detections score 0.
    Detections of images that are not in `gt` are refused (a results file for another image set would
    otherwise score near 0 without a word), unless `allow_subset` drops them.
    With ci_resamples > 0 each IoU type also gets `ci`: intervals for AP, AP50 and per-class AP50 by
    bootstrap over images (evaluation/bootstrap.py); level and seed default to the config's `eval` section.
    """
    from .bootstrap import confidence_intervals, draw_images, image_matches

    results: dict[str, Any] = {}
    detections = detections_for_images(gt, detections, allow_subset)
    coco_gt = ground_truth(gt)
    level, seed = ci_settings(ci_level, ci_seed)
    n_images = len(coco_gt.getImgIds())
    draws = draw_images(n_images, ci_resamples, seed) if ci_resamples > 0 and n_images else None
    for iou_type in iou_types:
        usable = usable_detections(detections, iou_type)
        evaluator = matched_evaluator(coco_gt, usable, iou_type) if usable or draws is not None else None
        if not usable:
            results[iou_type] = _empty_result(gt)
        else:
            evaluator.accumulate()
            evaluator.summarize()
            stats = [float(v) for v in evaluator.stats[:12]]
            results[iou_type] = {
                "stats": dict(zip(STAT_NAMES, stats)),
                "summary": summary_lines(stats, evaluator.params.maxDets),
                "per_class_AP50": _per_class_ap50(evaluator, gt),
                "pr_curve_50": _pr_curves(evaluator, gt),
            }
        if draws is not None:
            matches = image_matches(evaluator, category_names(gt))
            results[iou_type]["ci"] = confidence_intervals(matches, draws, level, seed)
    return results


def ci_settings(level: float | None, seed: int | None) -> tuple[float, int]:
    """The interval level and seed, from the config's `eval` section where not given."""
    from ..config import EvalConfig

    defaults = EvalConfig()
    return (defaults.ci_level if level is None else level), (defaults.ci_seed if seed is None else seed)


def ground_truth(gt: dict[str, Any]):
    from faster_coco_eval import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(_with_areas(gt))


def category_names(gt: dict[str, Any]) -> dict[int, str]:
    return {c["id"]: c.get("name", str(c["id"])) for c in gt["categories"]}


def usable_detections(detections: list[dict], iou_type: str) -> list[dict]:
    """Fresh copies of the detections that can be scored as iou_type (loadRes writes into the dicts it gets)."""
    usable = [_copy(d) for d in detections if iou_type == "bbox" or "segmentation" in d]
    if len(usable) < len(detections):
        log.warning("%d of %d detection(s) have no 'segmentation' and score nothing in segm AP%s",
                    len(detections) - len(usable), len(detections),
                    "" if usable else " (a box-only results file? --iou-type bbox scores its boxes)")
    if iou_type == "bbox":
        return [_with_bbox(d) for d in usable]
    # As detectron2 does: without 'bbox', loadRes takes each detection's area from its mask
    # (with one, from its box), and the small/medium/large ranges use mask areas like the GT.
    for d in usable:
        d.pop("bbox", None)
    return usable


def matched_evaluator(coco_gt, usable: list[dict], iou_type: str):
    """A COCOeval_faster on which evaluate() (the per-image matching) has run."""
    from faster_coco_eval import COCOeval_faster

    coco_dt = coco_gt.loadRes(usable)
    evaluator = COCOeval_faster(coco_gt, coco_dt, iouType=iou_type, print_function=lambda *a, **k: None)
    evaluator.evaluate()
    return evaluator


class UnknownImagesError(DatasetError):
    """Detections for images that the ground truth does not have."""


def detections_for_images(gt: dict[str, Any], detections: list[dict], allow_subset: bool = False) -> list[dict]:
    """The detections whose image is in gt; any other image id is an error unless allow_subset."""
    for index, detection in enumerate(detections):
        problem = _detection_problem(detection)
        if problem:
            raise DatasetError(f"detections[{index}]: {problem}")
    image_ids = {image["id"] for image in gt["images"]}
    unknown = sorted({d.get("image_id") for d in detections if d.get("image_id") not in image_ids}, key=str)
    if unknown and not allow_subset:
        count = sum(d.get("image_id") not in image_ids for d in detections)
        raise UnknownImagesError(
            f"{count} detection(s) are for {len(unknown)} image id(s) that the ground truth does not have"
            f" (first: {', '.join(map(str, unknown[:5]))}); is this results file for another image set?"
            " Pass --allow-subset (allow_subset=True) to score only the detections of known images")
    category_ids = {category["id"] for category in gt.get("categories", [])}
    strangers = sorted({d["category_id"] for d in detections if d["category_id"] not in category_ids})
    if strangers and category_ids:  # COCOeval scores them as nothing, without a word
        count = sum(d["category_id"] not in category_ids for d in detections)
        log.warning("%d of %d detection(s) have category ids the ground truth does not have (%s; it has %s): they"
                    " score nothing. Label indices written instead of the file's category ids?", count,
                    len(detections), ", ".join(map(str, strangers[:8])), ", ".join(map(str, sorted(category_ids)[:8])))
    sizes = {image["id"]: (image["height"], image["width"]) for image in gt["images"]}
    return [_with_compressed_rle(d, index, sizes[d["image_id"]])
            for index, d in enumerate(detections) if d.get("image_id") in image_ids]


def _with_compressed_rle(detection: dict, index: int, size: tuple[int, int]) -> dict:
    """The detection with its polygons or uncompressed RLE as one compressed RLE, the only mask form
    COCO's loadRes reads; a compressed RLE of another size than its image is refused."""
    from ..data.rle import segmentation_to_rle

    segmentation = detection.get("segmentation")
    if segmentation is None:
        return detection
    if isinstance(segmentation, dict):
        if list(segmentation["size"]) != list(size):
            raise DatasetError(f"detections[{index}]: segmentation size {list(segmentation['size'])} differs from"
                               f" image {detection['image_id']}'s [{size[0]}, {size[1]}] (height, width)")
        if not isinstance(segmentation["counts"], list):
            return detection
    rle = segmentation_to_rle(segmentation, *size)
    return {**detection, "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}}


def _segmentation_problem(segmentation: Any) -> str | None:
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)
                and isinstance(counts, (str, bytes, list))):
            return None
    elif isinstance(segmentation, list) and segmentation and all(
            isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p) for p in segmentation):
        return None
    return ("'segmentation' must be an RLE {'size': [height, width], 'counts': ...} or polygons"
            f" [[x1, y1, x2, y2, x3, y3, ...], ...], got {str(segmentation)[:60]}")


def _detection_problem(detection: Any) -> str | None:
    """Why one result entry cannot be scored (checked first: a list id would crash deep in COCOeval)."""
    if not isinstance(detection, dict):
        return f"a result must be an object, got {type(detection).__name__}"
    for key in ("image_id", "category_id"):
        value = detection.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            return f"'{key}' must be an integer, got {type(value).__name__} {str(value)[:40]}"
    score = detection.get("score")
    if not isinstance(score, (int, float)) or isinstance(score, bool) or score != score:
        return f"'score' must be a number, got {str(score)[:40]}"
    if "segmentation" not in detection and "bbox" not in detection:
        return "needs a 'segmentation' (RLE) or a 'bbox'"
    return _segmentation_problem(detection["segmentation"]) if "segmentation" in detection else None


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

    from ..data.rle import segmentation_to_rle

    sizes = {image["id"]: (image["height"], image["width"]) for image in gt["images"]}
    given = [a.get("id") for a in gt.get("annotations", [])]
    # Ids past the largest given one: an id such as index + 1 could equal a real id, and COCOeval would
    # then score one of the two objects and lose the other.
    next_id = max((i for i in given if isinstance(i, int)), default=0) + 1
    annotations = []
    for annotation in gt.get("annotations", []):
        annotation = dict(annotation)
        if annotation.get("id") is None:
            annotation["id"], next_id = next_id, next_id + 1
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


def image_f1(gt: dict[str, Any], detections: list[dict], score_thresh: float = PredictConfig.overlay_score_thresh,
             iou: float = 0.5) -> dict[int, float]:
    """Per image, F1 of mask matches at IoU >= iou among detections scoring >= score_thresh (crowds ignored).

    A plain, readable per-image quality for finding the worst images; COCO AP stays the metric.
    """
    from collections import defaultdict

    from pycocotools import mask as mask_utils

    from ..data.rle import segmentation_to_rle

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
        ci = result.get("ci")
        if ci:
            from .bootstrap import format_interval

            lines += [format_interval(ci, metric, result["stats"][metric]) for metric in ("AP50", "AP")]
        lines.append(f"{'category':<20s} AP50" + (f"   {ci['level']:.0%} CI" if ci else ""))
        for name, value in result["per_class_AP50"].items():
            bounds = ci["per_class_AP50"].get(name) if ci else None
            span = f"   {bounds[0]:.3f}-{bounds[1]:.3f}" if bounds else ("   n/a" if ci else "")
            lines.append(f"{name:<20s} {'  n/a' if value != value else f'{value:.3f}'}{span}")
    return "\n".join(lines)


def read_detections(detections: str | Path | list[dict]) -> list[dict]:
    """A COCO results list, from a JSON file or given as a list."""
    from ..data.coco import read_json

    if not isinstance(detections, (str, Path)):
        return list(detections)
    found = read_json(str(detections))
    if not isinstance(found, list):
        raise DatasetError(f"{detections}: a detections file must hold a JSON list of results")
    return found


def note_images_without_detections(gt: dict[str, Any], detections: list[dict], source: str) -> None:
    """A results file made on part of the images scores the rest as missed; AP then drops without a word."""
    with_objects = {a["image_id"] for a in gt.get("annotations", []) if not a.get("iscrowd")}
    found = {d.get("image_id") for d in detections if isinstance(d, dict) and isinstance(d.get("image_id"), int)}
    missing = sorted(with_objects - found, key=str)
    if missing:
        log.warning("%s: %d of %d ground-truth image(s) with objects have no detection at all; they count as missed"
                    " (first: %s). A results file from a run on part of the images?", source, len(missing),
                    len(with_objects), ", ".join(map(str, missing[:5])))
