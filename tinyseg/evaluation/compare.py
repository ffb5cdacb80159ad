"""Paired comparison of two detection sets on the same images: B - A in AP, AP50 and per-class AP50.

Both sets are scored on the same bootstrap draws of images, so the interval is that of the difference
itself: what the two models share (the hard images, the easy ones) cancels out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def compare_files(gt_json: str | Path, detections_a: str | Path | list[dict], detections_b: str | Path | list[dict],
                  iou_type: str = "segm", resamples: int | None = None, level: float | None = None,
                  seed: int | None = None, allow_subset: bool = False, fmt: str = "auto") -> dict[str, Any]:
    """compare_detections with the ground truth and the detections read from files (or given as lists)."""
    from ..data.formats import load_dataset, val_split
    from .coco_eval import note_images_without_detections, read_detections

    gt = load_dataset(str(gt_json), fmt=fmt, split=val_split(str(gt_json), fmt)).to_coco_dict()
    found = [read_detections(d) for d in (detections_a, detections_b)]
    names = [str(d) if isinstance(d, (str, Path)) else f"detections {side} (a list)"
             for d, side in zip((detections_a, detections_b), "AB")]
    for detections, name in zip(found, names):
        note_images_without_detections(gt, detections, name)
    result = compare_detections(gt, found[0], found[1], iou_type, resamples, level, seed, allow_subset)
    result["A"], result["B"] = (str(d) if isinstance(d, (str, Path)) else "(list)" for d in (detections_a, detections_b))
    return result



def compare_detections(gt: dict[str, Any], detections_a: list[dict], detections_b: list[dict],
                       iou_type: str = "segm", resamples: int | None = None, level: float | None = None,
                       seed: int | None = None, allow_subset: bool = False) -> dict[str, Any]:
    """B - A by paired bootstrap over images; resamples, level and seed default to the config's `eval` section.

    Returns {"method", "iou_type", "resamples", "level", "seed", "images", "AP", "AP50", "per_class_AP50":
    {name: ...}}, each comparison {"A", "B", "difference", "interval" (of B - A), "share_B_better",
    "verdict" (better | worse | no difference), "text"}.
    """
    from ..config import EvalConfig
    from .bootstrap import PAIRED_METHOD, bootstrap_values, draw_images, image_matches
    from .coco_eval import (category_names, ci_settings, detections_for_images, ground_truth, matched_evaluator,
                            usable_detections)

    resamples = EvalConfig().ci_resamples if resamples is None else resamples
    if resamples < 1:
        raise ValueError(f"a paired comparison needs resamples >= 1, got {resamples}")
    level, seed = ci_settings(level, seed)
    coco_gt, names = ground_truth(gt), category_names(gt)
    matches = []
    for detections in (detections_a, detections_b):
        detections = detections_for_images(gt, detections, allow_subset)
        evaluator = matched_evaluator(coco_gt, usable_detections(detections, iou_type), iou_type)
        matches.append(image_matches(evaluator, names))
    draws = draw_images(len(matches[0].image_ids), resamples, seed)
    point = [bootstrap_values(m) for m in matches]
    drawn = [bootstrap_values(m, draws) for m in matches]
    result: dict[str, Any] = {"method": PAIRED_METHOD, "iou_type": iou_type, "resamples": resamples,
                              "level": level, "seed": seed, "images": len(matches[0].image_ids)}
    for metric in ("AP", "AP50"):
        result[metric] = _difference(point[0][metric][0], point[1][metric][0], drawn[0][metric], drawn[1][metric],
                                     level, metric)
    result["per_class_AP50"] = {
        name: _difference(point[0]["per_class_AP50"][0, k], point[1]["per_class_AP50"][0, k],
                          drawn[0]["per_class_AP50"][:, k], drawn[1]["per_class_AP50"][:, k], level, "AP50")
        for k, name in enumerate(matches[0].names)}
    return result


def _difference(a: float, b: float, drawn_a: np.ndarray, drawn_b: np.ndarray, level: float,
                metric: str) -> dict[str, Any]:
    from .bootstrap import interval

    differences = drawn_b - drawn_a
    bounds = interval(differences, level)
    finite = differences[np.isfinite(differences)]
    share = float(np.mean(finite > 0)) if finite.size else None
    point = float(b - a) if np.isfinite(b - a) else None
    if bounds is None or point is None:
        verdict, text = "no difference", f"no difference shown ({metric} not defined: no ground truth)"
    elif bounds[0] > 0:
        verdict = "better"
        text = f"B is better by {_f(point)} {metric}, {level:.0%} interval {_f(bounds[0])} to {_f(bounds[1])}"
    elif bounds[1] < 0:
        verdict = "worse"
        text = f"B is worse by {_f(-point)} {metric}, {level:.0%} interval {_f(-bounds[1])} to {_f(-bounds[0])}"
    else:
        verdict = "no difference"
        text = (f"no difference shown (B-A = {_f(point)} {metric}, {level:.0%} interval {_f(bounds[0])}"
                f" to {_f(bounds[1])})")
    return {"A": _number(a), "B": _number(b), "difference": point, "interval": bounds, "share_B_better": share,
            "verdict": verdict, "text": text}


def _f(value: float) -> str:
    return f"{value + 0.0:.3f}".replace("-0.000", "0.000")


def _number(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def format_comparison(result: dict[str, Any]) -> str:
    """The lines `tinyseg compare` prints."""
    lines = [f"B ({result.get('B', 'B')}) against A ({result.get('A', 'A')}), {result['iou_type']}:"
             f" {result['method']}, {result['images']} images, {result['resamples']} resamples, seed {result['seed']}"]
    rows = [(metric, result[metric]) for metric in ("AP50", "AP")]
    rows += [(f"AP50 {name}", value) for name, value in result["per_class_AP50"].items()]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        scores = f"A {_score(value['A'])}, B {_score(value['B'])}"
        ahead = "" if value["share_B_better"] is None else f"; B ahead in {value['share_B_better']:.1%} of resamples"
        lines.append(f"{label:<{width}s}  {scores}: {value['text']}{ahead}")
    return "\n".join(lines)


def _score(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
