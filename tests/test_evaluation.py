"""faster-coco-eval gives the numbers pycocotools gives, on real detections of a trained model."""

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tinyseg.evaluation.coco_eval import STAT_NAMES, evaluate_detections
from tinyseg.inference.jobs import PredictJob, predict_checkpoint


@pytest.fixture(scope="module")
def detections(trained_run, tmp_path_factory):
    shapes = trained_run["shapes"]
    found, _ = predict_checkpoint(PredictJob(str(trained_run["run_dir"] / "best.pt"), str(shapes["images"]),
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
        from tinyseg.data.rle import segmentation_to_rle
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


def _square_gt(with_ids):
    from pycocotools import mask as mask_utils

    masks = np.zeros((2, 20, 20), dtype=np.uint8)
    masks[0, 2:8, 2:8] = 1
    masks[1, 12:18, 12:18] = 1
    rles = [mask_utils.encode(np.asfortranarray(m)) for m in masks]
    segmentations = [{"size": [20, 20], "counts": r["counts"].decode()} for r in rles]
    annotations = [{"image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": s} for s in segmentations]
    for annotation, given in zip(annotations, with_ids):
        if given is not None:
            annotation["id"] = given
    gt = {"images": [{"id": 1, "file_name": "a.png", "height": 20, "width": 20}], "annotations": annotations,
          "categories": [{"id": 1, "name": "thing"}]}
    detections = [{"image_id": 1, "category_id": 1, "score": 0.9, "segmentation": s} for s in segmentations]
    return gt, detections


def test_annotations_without_id_never_collide_with_given_ids():
    # The second object's given id 1 equals index + 1 of the first, which has none.
    gt, detections = _square_gt([None, 1])
    stats = evaluate_detections(gt, detections, ("segm",))["segm"]["stats"]
    assert stats["AP50"] == pytest.approx(1.0) and stats["AR100"] == pytest.approx(1.0)


def test_detections_for_unknown_images_are_refused():
    from tinyseg.evaluation.coco_eval import UnknownImagesError

    gt, detections = _square_gt([1, 2])
    stray = [{**d, "image_id": 77} for d in detections]
    with pytest.raises(UnknownImagesError, match="2 detection.*1 image id.*first: 77"):
        evaluate_detections(gt, detections + stray, ("segm",))
    subset = evaluate_detections(gt, detections + stray, ("segm",), allow_subset=True)
    assert subset["segm"]["stats"]["AP50"] == pytest.approx(1.0)
    from tinyseg.data.coco import DatasetError

    for bad, field in (({**detections[0], "image_id": [1]}, "'image_id' must be an integer, got list"),
                       ({**detections[0], "score": "high"}, "'score' must be a number"), ("x", "must be an object")):
        with pytest.raises(DatasetError, match=field) as error:
            evaluate_detections(gt, [detections[1], bad], ("segm",))
        assert "detections[1]" in str(error.value)


def test_detections_with_category_ids_the_ground_truth_lacks_are_flagged(caplog):
    """Label indices instead of the file's ids: AP 0 without a word, before."""
    gt, detections = _square_gt([1, 2])
    with caplog.at_level("WARNING", logger="tinyseg"):
        results = evaluate_detections(gt, [{**d, "category_id": 0} for d in detections], ("segm",))
    assert results["segm"]["stats"]["AP50"] == 0
    assert "2 of 2 detection(s) have category ids the ground truth does not have (0; it has 1)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="tinyseg"):
        evaluate_detections(gt, detections, ("segm",))
    assert "category ids" not in caplog.text


def test_cli_evaluate_refuses_a_results_file_for_other_images(tmp_path):
    from conftest import run_cli

    gt, detections = _square_gt([1, 2])
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps([{**d, "image_id": 5} for d in detections]))
    result = run_cli("evaluate", "--gt", str(tmp_path / "gt.json"), "--detections", str(tmp_path / "dt.json"),
                     check=False)
    assert result.returncode == 1 and "image id" in result.stderr and "Traceback" not in result.stderr


def test_polygon_and_uncompressed_rle_detections_score_as_their_compressed_rle(caplog):
    """COCO's loadRes reads compressed RLEs only: polygons and list counts crashed deep inside it before."""
    from tinyseg.data.coco import DatasetError

    gt, detections = _square_gt([1, 2])
    polygons = [{**detections[0], "segmentation": [[2, 2, 8, 2, 8, 8, 2, 8]]},
                {**detections[1], "segmentation": [[12, 12, 18, 12, 18, 18, 12, 18]]}]
    uncompressed = [{**detections[0], "segmentation": {"size": [20, 20], "counts": [42, 6, 14, 6, 14, 6, 14, 6, 14,
                                                                                     6, 14, 6, 252]}}]
    for found in (polygons, uncompressed + detections[1:]):
        stats = evaluate_detections(gt, found, ("segm",))["segm"]["stats"]
        assert stats["AP50"] == pytest.approx(1.0)
    for bad, field in (({**detections[0], "segmentation": "x"}, "'segmentation' must be an RLE"),
                       ({**detections[0], "segmentation": [[1, 2, 3]]}, "or polygons"),
                       ({**detections[0], "segmentation": {**detections[0]["segmentation"], "size": [10, 20]}},
                        r"segmentation size \[10, 20\] differs from image 1's \[20, 20\]"),
                       ({**detections[0], "segmentation": {"size": [10, 20], "counts": [200]}},
                        r"segmentation size \[10, 20\] differs")):
        with pytest.raises(DatasetError, match=field) as error:
            evaluate_detections(gt, [detections[1], bad], ("segm",))
        assert "detections[1]" in str(error.value)
    boxes = [{k: v for k, v in d.items() if k != "segmentation"} | {"bbox": [2, 2, 6, 6]} for d in detections]
    with caplog.at_level("WARNING", logger="tinyseg"):
        evaluate_detections(gt, boxes, ("segm",))
    assert "2 of 2 detection(s) have no 'segmentation'" in caplog.text and "--iou-type bbox" in caplog.text


def test_a_results_file_for_part_of_the_images_is_flagged(tmp_path, caplog):
    """Images left out of a results file count as missed: AP fell without a word, in evaluate and compare."""
    from tinyseg.api import compare, evaluate

    gt, detections = _square_gt([1, 2])
    gt["images"].append({**gt["images"][0], "id": 2, "file_name": "b.png"})
    gt["annotations"].append({**gt["annotations"][1], "id": 3, "image_id": 2})
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    everywhere = detections + [{**detections[1], "image_id": 2}]
    with caplog.at_level("WARNING", logger="tinyseg"):
        evaluate(tmp_path / "gt.json", everywhere, iou_types=("segm",), ci_resamples=0)
    assert "no detection" not in caplog.text
    with caplog.at_level("WARNING", logger="tinyseg"):
        evaluate(tmp_path / "gt.json", detections, iou_types=("segm",), ci_resamples=0)
        compare(tmp_path / "gt.json", everywhere, detections, resamples=10)
    message = "1 of 2 ground-truth image(s) with objects have no detection at all; they count as missed (first: 2)"
    assert caplog.text.count(message) == 2 and "detections B (a list): " + message in caplog.text
    from tinyseg.data.coco import DatasetError

    with pytest.raises(DatasetError, match="'image_id' must be an integer"):  # not "unhashable type: 'list'"
        evaluate(tmp_path / "gt.json", [{**detections[0], "image_id": [1]}], iou_types=("segm",), ci_resamples=0)
