"""Bootstrap intervals over images and the paired comparison (tinyseg/evaluation/bootstrap.py, compare.py)."""

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from conftest import run_cli
from tinyseg.evaluation import coco_eval
from tinyseg.evaluation.bootstrap import bootstrap_values, draw_images, image_matches, interval
from tinyseg.evaluation.compare import compare_detections

SIZE = 64


def synthetic_case(seed: int = 0, n_images: int = 15) -> tuple[dict, list[dict]]:
    """Boxes on small images, 2 categories (ids 3 and 7), one crowd region, an image without objects;
    detections near most objects (some twice, so matching has to choose), some wrong or stray, continuous scores."""
    rng = np.random.default_rng(seed)
    images, annotations, detections = [], [], []
    categories = [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]
    for image_id in range(1, n_images + 1):
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": SIZE, "width": SIZE})
        count = 0 if image_id == 5 else int(rng.integers(1, 5))
        for _ in range(count):
            box = _box(rng, 8, 28)
            category = int(rng.choice([3, 7]))
            crowd = int(image_id == 2 and not any(a["image_id"] == 2 for a in annotations))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": box, "area": box[2] * box[3], "iscrowd": crowd,
                                "segmentation": [_polygon(box)]})
            for _ in range(int(rng.choice([0, 1, 1, 1, 2]))):
                jitter = [box[0] + rng.uniform(-3, 3), box[1] + rng.uniform(-3, 3), box[2] * rng.uniform(0.8, 1.15),
                          box[3] * rng.uniform(0.8, 1.15)]
                wrong = rng.random() < 0.1
                detections.append(_detection(image_id, (10 - category) if wrong else category, jitter, rng))
        for _ in range(int(rng.integers(0, 3))):  # stray detections
            detections.append(_detection(image_id, int(rng.choice([3, 7])), _box(rng, 6, 20), rng))
    return {"images": images, "annotations": annotations, "categories": categories}, detections


def _box(rng, low: float, high: float) -> list[float]:
    w, h = rng.uniform(low, high, size=2)
    return [float(rng.uniform(0, SIZE - w)), float(rng.uniform(0, SIZE - h)), float(w), float(h)]


def _polygon(box: list[float]) -> list[float]:
    x, y, w, h = box
    return [x, y, x + w, y, x + w, y + h, x, y + h]


def _detection(image_id: int, category: int, box: list[float], rng) -> dict:
    x, y, w, h = (float(np.clip(v, 0, SIZE - 1)) for v in box)
    w, h = max(1.0, min(w, SIZE - x)), max(1.0, min(h, SIZE - y))
    rle = mask_utils.merge(mask_utils.frPyObjects([_polygon([x, y, w, h])], SIZE, SIZE))
    return {"image_id": image_id, "category_id": category, "score": float(rng.random()), "bbox": [x, y, w, h],
            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}}


def fast_matches(gt: dict, detections: list[dict], iou_type: str):
    coco_gt = coco_eval.ground_truth(gt)
    evaluator = coco_eval.matched_evaluator(coco_gt, coco_eval.usable_detections(detections, iou_type), iou_type)
    return image_matches(evaluator, coco_eval.category_names(gt))


def brute_force(gt: dict, detections: list[dict], iou_type: str, draw: np.ndarray) -> tuple[float, float, list[float]]:
    """A full pycocotools COCOeval of the resampled dataset: each drawn image is a new image (new id)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images = sorted(gt["images"], key=lambda i: i["id"])
    new_images, annotations, results = [], [], []
    for new_id, index in enumerate(np.sort(draw), start=1):
        old = images[index]
        new_images.append({**old, "id": new_id})
        annotations += [{**a, "id": len(annotations) + k + 1, "image_id": new_id}
                        for k, a in enumerate(a for a in gt["annotations"] if a["image_id"] == old["id"])]
        results += [{**d, "image_id": new_id} for d in detections if d["image_id"] == old["id"]]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {**gt, "images": new_images, "annotations": annotations}
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([{k: v for k, v in d.items() if not (k == "bbox" and iou_type == "segm")}
                                   for d in results])
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    precision = evaluator.eval["precision"][0, :, :, 0, -1]
    per_class = [float(np.mean(p[p > -1])) if (p > -1).any() else float("nan") for p in precision.T]
    return float(evaluator.stats[0]), float(evaluator.stats[1]), per_class


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_point_estimate_is_cocoeval(iou_type):
    """All weights 1: the re-accumulation from the per-image matching gives COCOeval's numbers exactly."""
    gt, detections = synthetic_case()
    expected = coco_eval.evaluate_detections(gt, detections, (iou_type,))[iou_type]
    point = bootstrap_values(fast_matches(gt, detections, iou_type))
    assert 0.2 < expected["stats"]["AP50"] < 0.95, "a case where matching decides something"
    assert point["AP"][0] == pytest.approx(expected["stats"]["AP"], abs=1e-12)
    assert point["AP50"][0] == pytest.approx(expected["stats"]["AP50"], abs=1e-12)
    np.testing.assert_allclose(point["per_class_AP50"][0], list(expected["per_class_AP50"].values()), atol=1e-12)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_resamples_equal_brute_force_cocoeval(iou_type):
    """On the same draws, every resample's AP, AP50 and per-class AP50 equal a full COCOeval (pycocotools) of
    the resampled dataset, duplicated images as new images; so the intervals are equal too."""
    gt, detections = synthetic_case()
    draws = draw_images(len(gt["images"]), 12, seed=3)
    fast = bootstrap_values(fast_matches(gt, detections, iou_type), draws)
    slow = [brute_force(gt, detections, iou_type, draw) for draw in draws]
    assert len({tuple(np.bincount(d, minlength=15)) for d in draws}) == 12 and max(np.bincount(draws[0])) > 1
    np.testing.assert_allclose(fast["AP"], [s[0] for s in slow], atol=1e-12)
    np.testing.assert_allclose(fast["AP50"], [s[1] for s in slow], atol=1e-12)
    np.testing.assert_allclose(fast["per_class_AP50"], [s[2] for s in slow], atol=1e-12)
    assert interval(fast["AP50"], 0.9) == pytest.approx(interval(np.array([s[1] for s in slow]), 0.9), abs=1e-12)


def test_evaluate_reports_intervals():
    gt, detections = synthetic_case()
    results = coco_eval.evaluate_detections(gt, detections, ("segm",), ci_resamples=200, ci_seed=1)
    ci, stats = results["segm"]["ci"], results["segm"]["stats"]
    assert (ci["method"], ci["resamples"], ci["level"], ci["seed"], ci["images"]) == (
        "percentile bootstrap over images", 200, 0.95, 1, 15)
    for metric in ("AP", "AP50"):
        low, high = ci[metric]
        assert low < stats[metric] < high
    assert set(ci["per_class_AP50"]) == {"a", "b"}
    again = coco_eval.evaluate_detections(gt, detections, ("segm",), ci_resamples=200, ci_seed=1)["segm"]["ci"]
    assert again == ci, "seeded: the same intervals every time"
    report = coco_eval.format_report(results)
    assert "(95% CI " in report and "percentile bootstrap over 15 images, 200 resamples" in report
    assert "ci" not in coco_eval.evaluate_detections(gt, detections, ("segm",))["segm"], "off by default here"


def test_compare_with_itself_shows_no_difference():
    gt, detections = synthetic_case()
    result = compare_detections(gt, detections, detections, "segm", resamples=200)
    for entry in [result["AP"], result["AP50"], *result["per_class_AP50"].values()]:
        assert entry["interval"] == [0.0, 0.0] and entry["difference"] == 0.0 and entry["share_B_better"] == 0.0
        assert entry["verdict"] == "no difference" and entry["text"].startswith("no difference shown")
    assert "95% interval 0.000 to 0.000" in result["AP50"]["text"]


def without_a_fifth(detections: list[dict], seed: int = 0) -> list[dict]:
    keep = np.random.default_rng(seed).permutation(len(detections))[: int(round(0.8 * len(detections)))]
    return [detections[i] for i in sorted(keep)]


def test_compare_with_a_fifth_of_detections_removed_says_worse():
    gt, detections = synthetic_case(n_images=30)
    result = compare_detections(gt, detections, without_a_fifth(detections), "segm", resamples=300)
    ap50 = result["AP50"]
    assert ap50["verdict"] == "worse" and ap50["interval"][1] < 0 and ap50["difference"] < 0
    assert ap50["text"].startswith(f"B is worse by {-ap50['difference']:.3f} AP50, 95% interval")
    assert ap50["share_B_better"] < 0.05


def test_cli_compare(tmp_path):
    gt, detections = synthetic_case(n_images=30)
    paths = {name: tmp_path / f"{name}.json" for name in ("gt", "a", "b")}
    for name, value in (("gt", gt), ("a", detections), ("b", without_a_fifth(detections))):
        paths[name].write_text(json.dumps(value))
    out = tmp_path / "comparison.json"
    result = run_cli("compare", "--gt", str(paths["gt"]), str(paths["a"]), str(paths["b"]), "--resamples", "300",
                     "--output", str(out))
    assert "B is worse by" in result.stdout and "paired percentile bootstrap over images" in result.stdout
    assert json.loads(out.read_text())["AP50"]["verdict"] == "worse"
