"""The run report: PNG plots and a self-contained report.html, built from the files of a run directory.

Inputs: metrics.jsonl, config.yaml, and when the run had a val set val_gt.json, val_results.json and
val_detections.json. Every file is written atomically; the page embeds its images, so it can be mailed.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

from .engine.checkpoint import atomic_write, atomic_write_text  # noqa: E402
from .engine.logger import read_metrics  # noqa: E402
from .evaluation.coco_eval import image_f1  # noqa: E402

LOSS_KEYS = ("loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


def _save_figure(figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    atomic_write(path, lambda out: out.write(buffer.getvalue()))
    return path


def plot_losses(records: list[dict], path: Path) -> Path | None:
    train = [r for r in records if r.get("kind") == "train"]
    if not train:
        return None
    keys = [k for k in LOSS_KEYS if k in train[0]] + ["lr"]
    figure, axes = plt.subplots(len(keys), 1, figsize=(8, 1.9 * len(keys)), sharex=True)
    for axis, key in zip(axes, keys):
        axis.plot([r["iteration"] for r in train], [r[key] for r in train], lw=1)
        axis.set_ylabel(key.replace("loss_", ""), fontsize=8)
        axis.grid(alpha=0.3)
    axes[-1].set_xlabel("iteration")
    figure.suptitle("training losses and learning rate")
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


def plot_per_class(results: dict, path: Path) -> Path:
    per_class = results["segm"]["per_class_AP50"]
    names = list(per_class)
    values = [0.0 if v != v else v for v in per_class.values()]
    figure, axis = plt.subplots(figsize=(max(5, 0.45 * len(names) + 2), 3.5))
    axis.bar(range(len(names)), values, color="tab:blue")
    axis.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    axis.set_ylabel("segm AP50")
    axis.set_ylim(0, 1)
    axis.set_title("mask AP50 per class (val)")
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


def worst_images_gallery(gt: dict, detections: list[dict], image_dir: str, out_dir: Path, count: int = 6) -> list[tuple[Path, float]]:
    """Side-by-side ground truth | prediction for the val images with the lowest per-image F1."""
    from .visualize import draw_instances, save_png
    from .data.images import image_path, load_rgb

    f1 = image_f1(gt, detections)
    names = {c["id"]: c.get("name", str(c["id"])) for c in gt["categories"]}
    truths, found = defaultdict(list), defaultdict(list)
    for a in gt.get("annotations", []):
        truths[a["image_id"]].append(a)
    for d in detections:
        if d["score"] >= 0.5:
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
        summary = "<pre>" + html.escape("\n".join(results["segm"]["summary"])) + "</pre>"
        sections.append(_figure(plot_per_class(results, plots / "per_class_ap50.png"), "mask AP50 per class"))
        sections.append(_figure(plot_pr(results, plots / "pr_curves.png"), "mask precision-recall, IoU 0.5"))
        gt_path, detections_path = run_dir / "val_gt.json", run_dir / "val_detections.json"
        if gt_path.exists() and detections_path.exists():
            config = yaml.safe_load((run_dir / "config.yaml").read_text())
            image_dir = config["data"]["val_image_dir"] or config["data"]["image_dir"]
            gallery = worst_images_gallery(json.loads(gt_path.read_text()), json.loads(detections_path.read_text()),
                                           image_dir, plots)
            sections.append("<h2>Worst val images (left: ground truth, right: prediction, score &ge; 0.5)</h2>")
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
