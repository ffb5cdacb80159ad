"""The report's plots people read: smoothed losses, sorted per-class AP50 with intervals, the confusion
matrix; built from a hand-made run directory (no training)."""

import json
import math

import pytest
from matplotlib.container import BarContainer, ErrorbarContainer

import tinyseg.training.report as report
from tinyseg.config import Config
from tinyseg.data.rle import segmentation_to_rle
from tinyseg.evaluation.coco_eval import evaluate_detections


def test_smoothing_is_debiased_and_skips_non_finite_values():
    assert report.smooth([4.0, 4.0, 4.0], 0.9) == pytest.approx([4.0, 4.0, 4.0])  # no pull towards 0
    smoothed = report.smooth([0.0, float("nan"), 10.0], 0.5)
    assert smoothed[0] == 0.0 and smoothed[1] == 0.0
    assert smoothed[2] == pytest.approx((0.5 * 10.0) / (1 - 0.25))  # (0.5*0 + 0.5*10 after 0*0.5) / (1 - 0.5^2)
    assert math.isnan(report.smooth([float("nan")], 0.5)[0])
    assert report.smoothing_weight(10) == pytest.approx(0.8)
    assert report.smoothing_weight(2000) == pytest.approx(0.99)


def test_per_class_order_best_first_and_unknown_last():
    order = report.per_class_order({"a": 0.2, "b": float("nan"), "c": 0.9, "d": 0.2})
    assert [name for name, _ in order] == ["c", "a", "d", "b"]


def _rle(segmentation, image):
    rle = segmentation_to_rle(segmentation, image["height"], image["width"])
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


@pytest.fixture
def run_dir(shapes, tmp_path):
    """A run directory as training leaves it: every ground-truth object found once, one of them as
    the wrong class, and one false positive; val_results.json with bootstrap intervals."""
    gt = json.loads(shapes["val"].read_text())
    images = {i["id"]: i for i in gt["images"]}
    annotations = gt["annotations"]
    categories = sorted(c["id"] for c in gt["categories"])
    wrong = annotations[0]
    other = next(c for c in categories if c != wrong["category_id"])
    detections = [{"image_id": a["image_id"], "category_id": other if a is wrong else a["category_id"],
                   "score": 0.9, "segmentation": _rle(a["segmentation"], images[a["image_id"]])}
                  for a in annotations]
    first = gt["images"][0]
    detections.append({"image_id": first["id"], "category_id": categories[0], "score": 0.8,
                       "segmentation": _rle([[0, 0, 8, 0, 8, 8, 0, 8]], first)})
    results = evaluate_detections(gt, detections)
    names = list(results["segm"]["per_class_AP50"])
    results["segm"]["ci"] = {"method": "bootstrap over images", "resamples": 200, "level": 0.95,
                             "AP": [0.41, 0.52], "AP50": [0.61, 0.73],
                             "per_class_AP50": {n: [0.25, 0.95] for n in names}}
    results["bbox"]["ci"] = {**results["segm"]["ci"], "AP": None}  # no finite resample: the evaluation writes None
    records = [{"kind": "train", "epoch": 1, "iteration": i, "lr": 0.01, "loss": 2.0 / i, "loss_mask": 1.0 / i,
                "time": 1.0e9 + i} for i in range(1, 30)]
    records.append({"kind": "val", "epoch": 1, "iteration": 29, "segm_AP50": 0.7, "segm_AP": 0.5,
                    "bbox_AP50": 0.6, "bbox_AP": 0.4})
    config = Config()
    config.data.image_dir = str(shapes["images"])
    (tmp_path / "config.yaml").write_text(config.to_yaml())
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "val_gt.json").write_text(json.dumps(gt))
    (tmp_path / "val_detections.json").write_text(json.dumps(detections))
    (tmp_path / "val_results.json").write_text(json.dumps(results))
    return {"dir": tmp_path, "gt": gt, "wrong": wrong, "other": other, "results": results}


def test_report_draws_the_new_plots_and_writes_the_intervals(run_dir):
    page = report.write_report(run_dir["dir"]).read_text()
    for name in ("losses.png", "per_class_ap50.png", "confusion.png"):
        assert (run_dir["dir"] / "plots" / name).stat().st_size > 1000, name
    assert "confusion matrix" in page
    assert "segm: AP 0." in page and "[0.410, 0.520]" in page and "[0.610, 0.730]" in page
    assert "95% intervals: bootstrap over images, 200 resamples" in page
    assert "bbox: AP 0." in page and "[n/a]" in page


def test_report_without_intervals_shows_none(run_dir):
    results = run_dir["results"]
    del results["segm"]["ci"], results["bbox"]["ci"]
    (run_dir["dir"] / "val_results.json").write_text(json.dumps(results))
    assert "resamples" not in report.write_report(run_dir["dir"]).read_text()


def test_per_class_bars_are_sorted_with_interval_error_bars(run_dir, monkeypatch):
    figures = []
    monkeypatch.setattr(report, "_save_figure", lambda figure, path: figures.append(figure) or path)
    results = run_dir["results"]
    expected = [n for n, _ in report.per_class_order(results["segm"]["per_class_AP50"])]
    results["segm"]["ci"]["per_class_AP50"][expected[-1]] = None  # a class with no interval: no whisker
    report.plot_per_class(results, run_dir["dir"] / "bars.png")
    axis = figures[0].axes[0]
    assert [t.get_text() for t in axis.get_xticklabels()] == expected
    bars = next(c for c in axis.containers if isinstance(c, BarContainer))
    heights = [bar.get_height() for bar in bars]
    assert heights == sorted(heights, reverse=True)
    # Each class's whisker runs from its interval's low end to its high end (here below the top bar's 1.0).
    whiskers = next(c for c in axis.containers if isinstance(c, ErrorbarContainer)).lines[2][0].get_segments()
    assert len(whiskers) == len(expected) - 1
    assert [y for _, y in whiskers[0]] == pytest.approx([0.25, 0.95])


def test_confusion_plot_counts_the_hand_made_errors(run_dir, monkeypatch):
    from tinyseg.evaluation.confusion import confusion_matrix

    gt, detections = run_dir["gt"], json.loads((run_dir["dir"] / "val_detections.json").read_text())
    matrix, names = confusion_matrix(gt, detections)
    ids = sorted(c["id"] for c in gt["categories"])
    row, col = ids.index(run_dir["wrong"]["category_id"]), ids.index(run_dir["other"])
    assert matrix[row, col] == 1
    assert matrix[-1].sum() == 1 and matrix[:, -1].sum() == 0  # one false positive, nothing missed
    assert matrix.sum() == len(gt["annotations"]) + 1
    figures = []
    monkeypatch.setattr(report, "_save_figure", lambda figure, path: figures.append(figure) or path)
    report.plot_confusion(matrix, names, run_dir["dir"] / "confusion.png", 0.5)
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in figures[0].axes[0].texts}
    assert texts[(row, col)] == "1" and (len(names) - 1, len(names) - 1) not in texts
