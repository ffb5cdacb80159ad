"""faster-coco-eval gives the numbers pycocotools gives, on real detections of a trained model."""

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tinyseg.evaluation.coco_eval import STAT_NAMES, evaluate_detections
from tinyseg.inference.run import PredictJob, run_predict


@pytest.fixture(scope="module")
def detections(trained_run, tmp_path_factory):
    shapes = trained_run["shapes"]
    out = tmp_path_factory.mktemp("eval") / "detections.json"
    found = run_predict(PredictJob(str(trained_run["run_dir"] / "best.pt"), str(shapes["images"]), str(out),
                                   str(shapes["test"]), num_workers=0, progress=False))
    assert found.results and not found.errors
    return found.results


def pycocotools_stats(gt: dict, detections: list[dict], iou_type: str) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        # Segm results without 'bbox', as detectron2 passes them, so detection areas come from masks.
        coco_dt = coco_gt.loadRes([{k: v for k, v in d.items() if not (k == "bbox" and iou_type == "segm")}
                                   for d in detections])
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return list(evaluator.stats)


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_equal_to_pycocotools(trained_run, detections, iou_type):
    gt = json.loads(trained_run["shapes"]["test_gt"].read_text())
    ours = evaluate_detections(gt, detections, (iou_type,))[iou_type]["stats"]
    reference = pycocotools_stats(gt, detections, iou_type)
    assert ours["AP50"] > 0, "a trained model should find something; equal zeros would prove little"
    np.testing.assert_allclose([ours[name] for name in STAT_NAMES], reference, atol=1e-9)


def test_crowd_regions_are_ignored_like_coco(trained_run, detections):
    """Marking ground truth as crowd changes both evaluators the same way."""
    gt = json.loads(trained_run["shapes"]["test_gt"].read_text())
    for annotation in gt["annotations"][::3]:
        annotation["iscrowd"] = 1
        from tinyseg.data.coco import segmentation_to_rle
        image = next(i for i in gt["images"] if i["id"] == annotation["image_id"])
        rle = segmentation_to_rle(annotation["segmentation"], image["height"], image["width"])
        annotation["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
    ours = evaluate_detections(gt, detections, ("segm",))["segm"]["stats"]
    reference = pycocotools_stats(gt, detections, "segm")
    np.testing.assert_allclose([ours[name] for name in STAT_NAMES], reference, atol=1e-9)


def test_no_detections_scores_zero(trained_run):
    gt = json.loads(trained_run["shapes"]["test_gt"].read_text())
    result = evaluate_detections(gt, [], ("segm",))
    assert result["segm"]["stats"]["AP50"] == 0.0
