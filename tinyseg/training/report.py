"""The run report: PNG plots and a self-contained report.html, built from the files of a run directory.

Inputs: metrics.jsonl, config.yaml, and when the run had a val set val_gt.json, val_results.json and
val_detections.json. Every file is written atomically; the page embeds its images, so it can be mailed.
The plots: losses (raw values faint, an EMA on top) and learning rate, AP per evaluation, mask AP50 per
class (best first; bootstrap intervals when val_results.json has them), precision-recall curves, a
confusion matrix with a background row and column, and the worst val images.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

from ..config import config_from_dict  # noqa: E402
from ..runtime.files import atomic_write, atomic_write_text  # noqa: E402
from ..runtime.metrics_log import read_metrics  # noqa: E402
from ..evaluation.coco_eval import image_f1  # noqa: E402
from ..evaluation.confusion import confusion_matrix  # noqa: E402

LOSS_KEYS = ("loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
# The detections a reader would keep: drawn in the worst-images gallery and counted in the confusion
# matrix (AP itself uses every detection).


def _save_figure(figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    atomic_write(path, lambda out: out.write(buffer.getvalue()))
    return path


def smooth(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased (divided by 1 - weight^n) so the
    first points are not pulled towards 0. Non-finite values are skipped."""
    smoothed, average, count = [], 0.0, 0
    for value in values:
        if math.isfinite(value):
            average = average * weight + (1 - weight) * value
            count += 1
        smoothed.append(average / (1 - weight**count) if count else float("nan"))
    return smoothed


def smoothing_weight(points: int) -> float:
    """An average over about 5% of the logged points (at least 5): the trend of any run length."""
    return 1 - 1 / max(5.0, points / 20)


def plot_losses(records: list[dict], path: Path) -> Path | None:
    train = [r for r in records if r.get("kind") == "train"]
    if not train:
        return None
    keys = [k for k in LOSS_KEYS if k in train[0]] + ["lr"]
    weight = smoothing_weight(len(train))
    steps = [r["iteration"] for r in train]
    figure, axes = plt.subplots(len(keys), 1, figsize=(8, 1.9 * len(keys)), sharex=True)
    for axis, key in zip(axes, keys):
        values = [float(r.get(key, float("nan"))) for r in train]
        if key == "lr":  # a schedule, not a noisy measurement
            axis.plot(steps, values, lw=1.2, color="tab:green")
        else:
            axis.plot(steps, values, lw=1, color="tab:blue", alpha=0.3, label="raw")
            axis.plot(steps, smooth(values, weight), lw=1.6, color="tab:blue", label=f"EMA ({weight:.2f})")
        axis.set_ylabel(key.replace("loss_", ""), fontsize=8)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("iteration")
    figure.suptitle("training losses (faint: raw, line: smoothed) and learning rate")
    return _save_figure(figure, path)


def plot_ap(records: list[dict], path: Path) -> Path | None:
    val = [r for r in records if r.get("kind") == "val"]
    if not val:
        return None
    figure, axis = plt.subplots(figsize=(7, 3.5))
    for key in ("segm_AP50", "segm_AP", "bbox_AP50", "bbox_AP"):
        axis.plot([r["epoch"] for r in val], [r[key] for r in val], marker="o", label=key)
    axis.set_xlabel("epoch")
    axis.set_ylabel("COCO AP (val)")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    return _save_figure(figure, path)


def per_class_order(per_class: dict[str, float]) -> list[tuple[str, float]]:
    """Highest AP50 first (ties in file order); classes without a value (NaN: no val objects) last."""
    known = sorted(((n, v) for n, v in per_class.items() if v == v), key=lambda item: -item[1])
    return known + [(n, v) for n, v in per_class.items() if v != v]


def plot_per_class(results: dict, path: Path) -> Path:
    ordered = per_class_order(results["segm"]["per_class_AP50"])
    names = [n for n, _ in ordered]
    values = [v if v == v else 0.0 for _, v in ordered]
    ci = results["segm"].get("ci") or {}
    bounds = ci.get("per_class_AP50", {})
    # The interval as computed, [low, high], drawn on its own: a percentile interval need not contain the bar.
    shown = [(x, _bounds(bounds.get(n))) for x, n in enumerate(names) if _bounds(bounds.get(n))]
    figure, axis = plt.subplots(figsize=(max(5, 0.45 * len(names) + 2), 3.5))
    axis.bar(range(len(names)), values, color="tab:blue")
    if shown:
        axis.errorbar([x for x, _ in shown], [(lo + hi) / 2 for _, (lo, hi) in shown],
                      yerr=[(hi - lo) / 2 for _, (lo, hi) in shown], fmt="none", ecolor="0.25", capsize=3)
    for x, (_, v) in enumerate(ordered):
        if v != v:
            axis.text(x, 0.02, "n/a", ha="center", fontsize=7, color="0.4")
    axis.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    axis.set_ylabel("segm AP50")
    axis.set_ylim(0, 1)
    title = "mask AP50 per class (val)"
    if shown:
        title += f"\nwhiskers: {ci.get('level', 0.95):.0%} interval ({ci.get('method', 'bootstrap')})"
    axis.set_title(title)
    return _save_figure(figure, path)


def plot_confusion(matrix: np.ndarray, names: list[str], path: Path, score_thresh: float) -> Path:
    """Counts in the cells; colour is the share of the row (of a class's objects; of the false positives)."""
    size = len(names)
    totals = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    figure, axis = plt.subplots(figsize=(max(4.5, 0.45 * size + 2.5), max(4.0, 0.45 * size + 1.8)))
    image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    if size <= 30:  # beyond that the numbers no longer fit; the colours still read
        for (row, col), count in np.ndenumerate(matrix):
            if count:
                axis.text(col, row, str(count), ha="center", va="center", fontsize=7,
                          color="white" if shares[row, col] > 0.5 else "black")
    axis.set_xticks(range(size), names, rotation=60, ha="right", fontsize=8)
    axis.set_yticks(range(size), names, fontsize=8)
    axis.set_xlabel("predicted (background: missed objects)")
    axis.set_ylabel("ground truth (background: false positives)")
    axis.set_title(f"mask confusion at IoU 0.5, score \u2265 {score_thresh} (val)", fontsize=10)
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04, label="share of the row")
    return _save_figure(figure, path)


def plot_pr(results: dict, path: Path) -> Path | None:
    curves = results["segm"].get("pr_curve_50", {})
    if not curves.get("recall"):
        return None
    figure, axis = plt.subplots(figsize=(6, 4.5))
    for name, precision in curves["precision"].items():
        points = [(r, p) for r, p in zip(curves["recall"], precision) if p >= 0]
        if points:
            axis.plot(*zip(*points), lw=1.2, label=name)
    axis.set_xlabel("recall")
    axis.set_ylabel("precision")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.02)
    axis.set_title("mask precision-recall at IoU 0.5 (val)")
    axis.legend(fontsize=7, ncol=2)
    axis.grid(alpha=0.3)
    return _save_figure(figure, path)


def worst_images_gallery(gt: dict, detections: list[dict], image_dir: str, out_dir: Path, score_thresh: float,
                         count: int = 6) -> list[tuple[Path, float]]:
    """Side-by-side ground truth | prediction for the val images with the lowest per-image F1."""
    from ..inference.overlays import draw_instances, save_png
    from ..data.images import image_path, load_rgb

    f1 = image_f1(gt, detections, score_thresh=score_thresh)
    names = {c["id"]: c.get("name", str(c["id"])) for c in gt["categories"]}
    truths, found = defaultdict(list), defaultdict(list)
    for a in gt.get("annotations", []):
        truths[a["image_id"]].append(a)
    for d in detections:
        if d["score"] >= score_thresh:
            found[d["image_id"]].append(d)
    images = {i["id"]: i for i in gt["images"]}
    written = []
    for image_id in sorted(f1, key=lambda i: f1[i])[:count]:
        picture = load_rgb(image_path(image_dir, images[image_id]["file_name"]))
        left, right = draw_instances(picture, truths[image_id], names), draw_instances(picture, found[image_id], names)
        pair = Image.new("RGB", (picture.width * 2 + 8, picture.height), (255, 255, 255))
        pair.paste(left, (0, 0))
        pair.paste(right, (picture.width + 8, 0))
        path = out_dir / f"worst_{len(written) + 1}_{image_id}.png"
        save_png(pair, path)
        written.append((path, f1[image_id]))
    return written


def _embed(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _figure(path: Path | None, caption: str) -> str:
    if path is None:
        return ""
    return (f'<figure><img src="{_embed(path)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _bounds(value) -> tuple[float, float] | None:
    """[low, high] of a `ci` entry when both are finite numbers (the evaluation writes None when it has none)."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, (int, float)) and math.isfinite(v) for v in value):
        return float(value[0]), float(value[1])
    return None


def _intervals(results: dict) -> str:
    """AP and AP50 with their intervals, when the evaluation computed them (val_results.json 'ci')."""
    parts, note = [], ""
    for iou_type, result in results.items():
        ci = result.get("ci") if isinstance(result, dict) else None
        if not ci:
            continue
        values = []
        for key in ("AP", "AP50"):
            if key in result.get("stats", {}):
                bounds = _bounds(ci.get(key))
                where = f"[{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds else "[n/a]"
                values.append(f"{key} {result['stats'][key]:.3f} {where}")
        parts.append(f"{iou_type}: " + ", ".join(values))
        note = (f"{ci.get('level', 0.95):.0%} intervals: {ci.get('method', 'bootstrap')}, "
                f"{ci.get('resamples', '?')} resamples" + (f", {ci['images']} images" if "images" in ci else ""))
    return f"<p>{html.escape('; '.join(parts))} ({html.escape(note)})</p>" if parts else ""


def write_report(run_dir: Path) -> Path:
    """Write the plots under run_dir/plots and run_dir/report.html; returns the page's path."""
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    records = read_metrics(run_dir)
    sections = [_figure(plot_losses(records, plots / "losses.png"), "losses and learning rate per iteration"),
                _figure(plot_ap(records, plots / "ap.png"), "COCO AP per evaluation")]
    results_path = run_dir / "val_results.json"
    summary = ""
    if results_path.exists():
        results = json.loads(results_path.read_text())
        summary = _intervals(results) + "<pre>" + html.escape("\n".join(results["segm"]["summary"])) + "</pre>"
        sections.append(_figure(plot_per_class(results, plots / "per_class_ap50.png"), "mask AP50 per class"))
        sections.append(_figure(plot_pr(results, plots / "pr_curves.png"), "mask precision-recall, IoU 0.5"))
        gt_path, detections_path = run_dir / "val_gt.json", run_dir / "val_detections.json"
        if gt_path.exists() and detections_path.exists():
            gt, detections = json.loads(gt_path.read_text()), json.loads(detections_path.read_text())
            config = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
            thresh = config.predict.overlay_score_thresh
            matrix, names = confusion_matrix(gt, detections, score_thresh=thresh)
            sections.append(_figure(plot_confusion(matrix, names, plots / "confusion.png", thresh),
                                    f"mask confusion matrix, IoU 0.5, score >= {thresh}"))
            image_dir = config.data.val_image_dir or config.data.image_dir
            gallery = worst_images_gallery(gt, detections, image_dir, plots, thresh)
            sections.append("<h2>Worst val images (left: ground truth, right: prediction, "
                            f"score &ge; {thresh})</h2>")
            sections += [_figure(path, f"image F1 at IoU 0.5: {score:.2f}") for path, score in gallery]
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>tinyseg report: {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
figure{{display:inline-block;margin:0.5em}}img{{max-width:100%;border:1px solid #ccc}}
figcaption{{font-size:0.85em;color:#555}}pre{{background:#f6f6f6;padding:0.6em;font-size:0.8em}}</style>
</head><body><h1>tinyseg report: {html.escape(str(run_dir))}</h1>{summary}{''.join(s for s in sections if s)}
</body></html>"""
    atomic_write_text(run_dir / "report.html", page)
    return run_dir / "report.html"
