"""Confidence intervals for COCO AP by bootstrap over images (compare.py pairs two detection sets with it).

The image is the unit: a resample draws the evaluation's images with replacement. Re-running COCOeval per
resample would match every detection again; instead the per-image matching (COCO's evaluateImg for area
'all' and the largest maxDets) is done once, from the IoU matrices faster-coco-eval has already computed,
and each resample only re-accumulates precision with each detection weighted by how often its image was
drawn. With all weights 1 this reproduces COCOeval's AP and AP50 (tests/test_bootstrap.py), and on the same
draws it gives what a full COCOeval of the resampled dataset gives (duplicated images as new images).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

METHOD = "percentile bootstrap over images"
PAIRED_METHOD = "paired percentile bootstrap over images"
_EPS = np.spacing(1)  # as COCOeval.accumulate: precision = tp / (tp + fp + eps)
_CHUNK_ELEMENTS = 250_000  # resamples are processed in chunks of about this many (resample, detection) cells


@dataclass
class CategoryMatches:
    """One category's detections over all images, in COCOeval.accumulate's order (score descending, stable)."""

    det_image: np.ndarray  # (D,) index of each detection's image
    tp: np.ndarray  # (T, D) matched to a non-ignored ground truth at each IoU threshold
    ignored: np.ndarray  # (T, D) matched to an ignored (crowd) ground truth: neither TP nor FP
    gt_count: np.ndarray  # (N,) non-ignored ground truths per image
    runs: list | None = None  # per IoU threshold, what _runs finds (computed on first use)


@dataclass
class Matches:
    image_ids: list[int]
    names: list[str]  # category names, in the evaluator's category order
    categories: list[CategoryMatches]
    rec_thrs: np.ndarray


def image_matches(evaluator, names: dict[int, str]) -> Matches:
    """The per-image matching of an evaluator on which evaluate() has run (faster-coco-eval keeps it in C++)."""
    p = evaluator.params
    image_ids, category_ids = list(p.imgIds), list(p.catIds)
    lo, hi = p.areaRng[p.areaRngLbl.index("all")]
    thresholds = np.minimum(np.asarray(p.iouThrs, dtype=float), 1 - 1e-10)  # as pycocotools' evaluateImg
    gts = evaluator.gt_dataset.get_instances(image_ids, category_ids, True)
    dts = evaluator.dt_dataset.get_instances(image_ids, category_ids, True)
    categories = []
    for k, category_id in enumerate(category_ids):
        parts = [_match_image(gts[i][k], dts[i][k], evaluator.ious.get((image_id, category_id), []), thresholds,
                              p.maxDets[-1], lo, hi) for i, image_id in enumerate(image_ids)]
        scores = np.concatenate([part[0] for part in parts])
        order = np.argsort(-scores, kind="mergesort")
        det_image = np.concatenate([np.full(len(part[0]), i) for i, part in enumerate(parts)]).astype(np.intp)
        categories.append(CategoryMatches(
            det_image=det_image[order],
            tp=np.concatenate([part[1] for part in parts], axis=1)[:, order],
            ignored=np.concatenate([part[2] for part in parts], axis=1)[:, order],
            gt_count=np.array([part[3] for part in parts], dtype=np.int64)))
    return Matches([int(i) for i in image_ids], [names[int(c)] for c in category_ids], categories,
                   np.asarray(p.recThrs, dtype=float))


def _match_image(gts: list[dict], dts: list[dict], ious, thresholds: np.ndarray, max_det: int, lo: float,
                 hi: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """pycocotools' evaluateImg for one image and category: scores, TP and ignored flags (T, D), #non-ignored gt."""
    gt_ignore = np.array([bool(g.get("ignore", 0)) or not lo <= g["area"] <= hi for g in gts], dtype=bool)
    crowd = np.array([bool(g.get("iscrowd", 0)) for g in gts], dtype=bool)
    order = np.argsort([-d["score"] for d in dts], kind="mergesort")[:max_det]  # as computeIoU sorts them
    scores = np.array([dts[i]["score"] for i in order], dtype=float)
    outside = np.array([not lo <= float(dts[i]["area"]) <= hi for i in order], dtype=bool)
    n_thr, n_det = len(thresholds), len(order)
    tp = np.zeros((n_thr, n_det), dtype=bool)
    ignored = np.zeros((n_thr, n_det), dtype=bool)
    if n_det and len(gts):
        gt_order = np.argsort(gt_ignore, kind="mergesort")  # non-ignored first, as evaluateImg
        iou = np.asarray(ious, dtype=float)[:, gt_order]
        gt_ignore, crowd = gt_ignore[gt_order], crowd[gt_order]
        _greedy_match(iou, gt_ignore, crowd, thresholds, tp, ignored)
    matched = tp | ignored
    ignored |= ~matched & outside[None, :]  # unmatched detections outside the area range are ignored
    return scores, tp, ignored, int(np.count_nonzero(~gt_ignore))


def _greedy_match(iou: np.ndarray, gt_ignore: np.ndarray, crowd: np.ndarray, thresholds: np.ndarray,
                  tp: np.ndarray, ignored: np.ndarray) -> None:
    """COCO's greedy matching at all thresholds at once: each detection, best first, takes the free ground
    truth of highest IoU >= threshold (the last one on ties), non-ignored ones before ignored; crowds stay free."""
    candidate = iou >= thresholds.min()
    per_det, per_gt = candidate.sum(axis=1), candidate.sum(axis=0)
    # A detection whose one candidate is a regular ground truth that no other detection could take matches
    # it wherever the IoU allows, whatever the order; only the others need the greedy loop.
    col = candidate.argmax(axis=1)
    alone = (per_det == 1) & (per_gt[col] == 1) & ~gt_ignore[col]
    dets = np.flatnonzero(alone)
    tp[:, dets] = iou[dets, col[dets]][None, :] >= thresholds[:, None]
    rows = np.arange(len(thresholds))
    taken = np.zeros((len(thresholds), iou.shape[1]), dtype=bool)
    for d in np.flatnonzero((per_det > 0) & ~alone):
        cols = np.flatnonzero(candidate[d])
        values = iou[d, cols]
        free = (values[None, :] >= thresholds[:, None]) & ~taken[:, cols]
        preferred = free & ~gt_ignore[cols][None, :]
        free = np.where(preferred.any(axis=1, keepdims=True), preferred, free)
        key = np.where(free, values[None, :], -1.0)
        last = key.shape[1] - 1 - np.argmax(key[:, ::-1], axis=1)
        hit = key[rows, last] >= 0
        chosen = cols[last]
        tp[hit, d] = ~gt_ignore[chosen[hit]]
        ignored[hit, d] = gt_ignore[chosen[hit]]
        keep = hit & ~crowd[chosen]
        taken[rows[keep], chosen[keep]] = True


def draw_images(n_images: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n_images) image indices drawn with replacement; the same seed gives the same draws."""
    return np.random.default_rng(seed).integers(0, n_images, size=(resamples, n_images))


def bootstrap_values(matches: Matches, draws: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """AP, AP50 (resamples,) and per-class AP50 (resamples, K) per resample; draws=None: the point estimate.

    A category without non-ignored ground truth in a resample is NaN there and left out of AP, as COCO does.
    """
    n_images = len(matches.image_ids)
    if draws is None:
        draws = np.arange(n_images)[None, :]
    longest = max([len(c.det_image) for c in matches.categories] + [1])
    chunk = max(1, _CHUNK_ELEMENTS // longest)
    ap, ap50 = [], []
    for start in range(0, len(draws), chunk):
        part = draws[start:start + chunk]
        # How often each image was drawn, plus a zero column that _runs uses as padding.
        rows = np.arange(len(part))[:, None] * (n_images + 1)
        counts = np.bincount((rows + part).ravel(), minlength=len(part) * (n_images + 1))
        counts = counts.reshape(len(part), n_images + 1)
        curves = [_precision(category, counts, matches.rec_thrs) for category in matches.categories]
        ap.append(np.stack([q.mean(axis=(1, 2)) for q in curves], axis=1))
        ap50.append(np.stack([q[:, 0].mean(axis=1) for q in curves], axis=1))
    per_class_ap, per_class_ap50 = np.concatenate(ap), np.concatenate(ap50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "mean of empty slice": no category present -> NaN
        return {"AP": np.nanmean(per_class_ap, axis=1), "AP50": np.nanmean(per_class_ap50, axis=1),
                "per_class_AP50": per_class_ap50}


def _precision(category: CategoryMatches, counts: np.ndarray, rec_thrs: np.ndarray) -> np.ndarray:
    """COCO's interpolated precision (B, T, R) for each resample's image counts (B, N + 1; the last column 0);
    NaN where the resample has no ground truth of the category.

    Only the ends of runs of true positives are kept as points of the precision/recall curve: every other
    point has the recall of one of them and no more precision (within a run precision rises; a false or
    ignored detection adds no recall), whatever the weights, so the interpolated precision is unchanged.
    """
    n_resamples, (n_thr, _) = len(counts), category.tp.shape
    gt_count = counts[:, :-1] @ category.gt_count
    needed = _needed_true_positives(gt_count, rec_thrs)
    q = np.zeros((n_resamples, n_thr, len(rec_thrs)))
    runs = _runs(category, counts.shape[1] - 1)
    if any(run is not None for run in runs):
        # Detections up to each position (to the last point), each counted as often as its image was drawn;
        # gathering from the small counts array rather than a (B, D) one keeps the gathers in cache.
        last = max(run[2][-1] for run in runs if run is not None)
        seen = np.cumsum(np.take(counts, category.det_image[:last + 1], axis=1), axis=1)
    for t, run in enumerate(runs):
        if run is None:
            continue
        tp_images, run_end, end, ignored_images, ignored_before = run
        tp = np.take(np.cumsum(np.take(counts, tp_images, axis=1), axis=1), run_end, axis=1)
        scored = np.take(seen, end, axis=1)  # TP or FP up to each point: all, less the ignored ones
        if len(ignored_images) > 1:
            scored -= np.take(np.cumsum(np.take(counts, ignored_images, axis=1), axis=1), ignored_before, axis=1)
        q[:, t] = _interpolate(tp, scored, needed)
    q[gt_count == 0] = np.nan
    return q


def _runs(category: CategoryMatches, pad: int) -> list[tuple | None]:
    """Per IoU threshold (None: no true positive), computed once: the images of the true positives, the last
    one of each run of consecutive true positives, that run end's position, and the images of the ignored
    detections after `pad` (a zero column) with how many of them come before each run end."""
    if category.runs is None:
        category.runs = []
        for tp, ignored in zip(category.tp, category.ignored):
            tp_at, ignored_at = np.flatnonzero(tp), np.flatnonzero(ignored)
            if not tp_at.size:
                category.runs.append(None)
                continue
            run_end = np.flatnonzero(np.append(np.diff(tp_at) != 1, True))
            end = tp_at[run_end]
            category.runs.append((category.det_image[tp_at], run_end, end,
                                  np.append(pad, category.det_image[ignored_at]), np.searchsorted(ignored_at, end)))
    return category.runs


def _needed_true_positives(gt_count: np.ndarray, rec_thrs: np.ndarray) -> np.ndarray:
    """(B, R): the fewest true positives whose recall tp / gt_count (in floating point, as COCO computes it)
    reaches each recall threshold."""
    n = np.maximum(gt_count, 1).astype(float)[:, None]
    needed = np.ceil(rec_thrs[None, :] * n)
    for _ in range(2):  # the product may round across an integer; float division is monotone, so fix by +-1
        needed = np.where((needed - 1) / n >= rec_thrs, needed - 1, needed)
        needed = np.where(needed / n < rec_thrs, needed + 1, needed)
    return needed.astype(np.int64)


def _interpolate(tp: np.ndarray, scored: np.ndarray, needed: np.ndarray) -> np.ndarray:
    """Per row, at each recall threshold: the highest precision at that recall or more (0 if none reaches it),
    which is what COCO's right-to-left maximum followed by searchsorted(recall, thresholds, 'left') gives."""
    n_rows, n_points = tp.shape
    row_start = np.arange(n_rows)[:, None] * n_points
    # Rows are searched in one call: offsetting each row's (non-decreasing) counts keeps the whole array sorted.
    span = int(max(tp[:, -1].max(), needed.max())) + 1
    offsets = np.arange(n_rows)[:, None] * span
    first = np.searchsorted((tp + offsets).ravel(), (needed + offsets).ravel()).reshape(needed.shape) - row_start
    # first: per row and threshold, the first point with enough true positives (n_points: none has).
    # The highest precision from there to the next threshold's first point, then the running maximum from the
    # right. The extra last cell lets the last row's empty stretches index one past its end.
    precision = np.empty(n_rows * n_points + 1)
    np.divide(tp, scored + _EPS, out=precision[:-1].reshape(n_rows, n_points))
    precision[-1] = 0.0
    best = np.maximum.reduceat(precision, (first + row_start).ravel()).reshape(first.shape)
    best[first >= n_points] = 0.0
    return np.maximum.accumulate(best[:, ::-1], axis=1)[:, ::-1]


def interval(values: np.ndarray, level: float) -> list[float] | None:
    """Percentile interval of the finite values (None when there are none)."""
    finite = values[np.isfinite(values)]
    if not finite.size:
        return None
    low, high = np.percentile(finite, [50 * (1 - level), 50 * (1 + level)])
    return [float(low), float(high)]


def confidence_intervals(matches: Matches, draws: np.ndarray, level: float, seed: int) -> dict[str, Any]:
    """The `ci` entry of an evaluation result: AP, AP50 and per-class AP50 intervals."""
    values = bootstrap_values(matches, draws)
    return {"method": METHOD, "resamples": len(draws), "level": level, "seed": seed,
            "images": len(matches.image_ids), "AP": interval(values["AP"], level),
            "AP50": interval(values["AP50"], level),
            "per_class_AP50": {name: interval(values["per_class_AP50"][:, k], level)
                               for k, name in enumerate(matches.names)}}


def format_interval(ci: dict[str, Any], metric: str, value: float) -> str:
    """'AP50 0.612 (95% CI 0.571-0.650, percentile bootstrap over 100 images, 1000 resamples)'."""
    bounds = ci.get(metric)
    where = "n/a" if bounds is None else f"{bounds[0]:.3f}-{bounds[1]:.3f}"
    return (f"{metric} {value:.3f} ({ci['level']:.0%} CI {where}, percentile bootstrap over {ci['images']} images,"
            f" {ci['resamples']} resamples)")
