"""benchmarks/peers/ultralytics_seg.py: its conversions (COCO -> one YOLO dataset for both splits, Ultralytics'
Results -> COCO results that `tinyseg evaluate` scores) and one one-epoch run of the whole script. Skips
without the benchmark-only `ultralytics` package (pip install -e ".[peers]")."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("ultralytics") is None:
    pytest.skip("needs the benchmark-only ultralytics package (pip install -e \".[peers]\")", allow_module_level=True)
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "peers" / "ultralytics_seg.py"


@pytest.fixture(scope="module")
def peer():
    # Importing ultralytics replaces PIL's Image.open for the whole process (ultralytics/utils/patches.py);
    # the other tests must see Pillow's own, so it is imported only here and put back afterwards.
    from PIL import Image

    pillow_open = Image.open
    spec = importlib.util.spec_from_file_location("ultralytics_seg", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    Image.open = pillow_open


def _gt_as_results(gt_path: str, category_ids: list[int]) -> list:
    """Each val image's ground truth as an Ultralytics Results, the way predict(retina_masks=True) gives it."""
    import torch
    from faster_coco_eval import COCO  # not pycocotools: its decode warns under numpy 2 (an error here)
    from ultralytics.engine.results import Results

    coco = COCO(gt_path)
    results = []
    for image_id in sorted(coco.getImgIds()):
        info = coco.imgs[image_id]
        anns = [a for a in coco.imgToAnns[image_id] if not a.get("iscrowd")]
        masks = np.stack([coco.annToMask(a) for a in anns]) if anns else np.zeros((0, info["height"], info["width"]))
        rows = []
        for rank, (ann, mask) in enumerate(zip(anns, masks)):
            ys, xs = np.nonzero(mask)
            rows.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, 0.9 - 0.01 * rank,
                         category_ids.index(ann["category_id"])])
        image = np.zeros((info["height"], info["width"], 3), np.uint8)
        names = dict(enumerate(str(c) for c in category_ids))
        results.append((image_id, Results(image, path=info["file_name"], names=names,
                                          boxes=torch.tensor(rows, dtype=torch.float32).reshape(-1, 6),
                                          masks=torch.from_numpy(masks.astype(np.float32)))))
    return results


def test_yolo_dataset_keeps_both_splits_and_category_ids(peer, shapes, tmp_path):
    from tinyseg.data.formats import load_dataset

    data_yaml, ids = peer.prepare_dataset(shapes["train"], shapes["val"], shapes["images"], tmp_path / "yolo")
    assert ids == [3, 7, 12]
    for split in ("train", "val"):
        expected = load_dataset(shapes[split], fmt="coco")
        back = load_dataset(data_yaml, fmt="yolo", split=split)  # the combined data.yaml, read as Ultralytics would
        assert len(back.images) == len(expected.images)
        assert back.categories.category_ids == [3, 7, 12]
        count = lambda data: sorted(a["category_id"] for r in data.images for a in r.annotations if not a.get("iscrowd"))  # noqa: E731
        assert count(back) == count(expected)


def test_results_become_coco_results_that_tinyseg_scores(peer, shapes, tmp_path):
    from tinyseg.api import evaluate

    ids = [3, 7, 12]
    detections = [d for image_id, result in _gt_as_results(shapes["val"], ids)
                  for d in peer.results_to_coco(result, image_id, ids)]
    assert {d["category_id"] for d in detections} <= set(ids) and detections
    path = tmp_path / "results.json"
    path.write_text(json.dumps(detections))
    metrics = evaluate(shapes["val"], str(path), ci_resamples=0)
    assert metrics["segm"]["stats"]["AP"] == pytest.approx(1.0)
    assert metrics["bbox"]["stats"]["AP50"] == pytest.approx(1.0)


def test_results_without_detections_or_at_model_resolution(peer):
    import torch
    from ultralytics.engine.results import Results

    empty = Results(np.zeros((40, 50, 3), np.uint8), path="a.png", names={0: "x"},
                    boxes=torch.zeros((0, 6)), masks=None)
    assert peer.results_to_coco(empty, 1, [5]) == []
    small = Results(np.zeros((40, 50, 3), np.uint8), path="a.png", names={0: "x"},
                    boxes=torch.tensor([[1.0, 1.0, 9.0, 9.0, 0.5, 0.0]]), masks=torch.ones((1, 20, 25)))
    with pytest.raises(ValueError, match="retina_masks"):
        peer.results_to_coco(small, 1, [5])


@pytest.mark.slow
def test_one_epoch_run_skips_ultralytics_own_validation_and_is_scored_by_tinyseg(shapes, tmp_path):
    """The whole script for real (a subprocess: it sets Ultralytics' environment before importing it), one
    epoch on the shapes images: Ultralytics' validation after the last epoch and in final_eval, which
    OOM-killed its defaults setting on nuclei, must not run; tinyseg scores the last weights."""
    import subprocess
    import sys

    out = tmp_path / "result.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--train-json", str(shapes["train"]), "--val-json",
                             str(shapes["val"]), "--image-dir", str(shapes["images"]), "--budget-min", "1",
                             "--epochs", "1", "--setting", "short", "--imgsz", "64", "--workers", "0",
                             "--run-dir", str(tmp_path / "run"), "--json", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "Validating" not in log and "mAP50-95)" not in log, log[-3000:]  # Ultralytics' validator's banner
    scored = json.loads(out.read_text())
    assert scored["optimizer_steps"] >= 1 and scored["iterations"] >= 1
    assert scored["val_images"] == 4 and (scored["detections"] == 0 or 0 <= scored["segm_AP50"] <= 1)
