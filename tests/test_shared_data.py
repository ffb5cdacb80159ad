"""The real data in ../shared: the Tiny VOC layout end to end, and real RLE datasets read correctly."""

import json

from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from tinyseg.data.coco import load_coco

from tinyseg.data.rle import segmentation_to_rle
from tinyseg.data.check import check_dataset

from conftest import TINY, needs_shared, run_cli


def test_tinyvoc_sample_train_then_submit_on_real_test_set(tmp_path):
    root = needs_shared("tinyvoc")
    run = tmp_path / "run"
    run_cli("train", "--config", "seed", "--train-json", str(root / "pascal_train_sample.json"),
            "--image-dir", str(root / "train_sample"), "--output-dir", str(run), *TINY,
            "model.init=none", "solver.epochs=1", "data.val_fraction=0.2", "input.copies=1",
            "input.flipped_copies=0", "input.test_min_size=128")
    submission = tmp_path / "submission.json"
    run_cli("predict", "--checkpoint", str(run / "best.pt"), "--image-dir", str(root / "test_images"),
            "--images-json", str(root / "test.json"), "--output", str(submission), "--workers", "1",
            # a 1-epoch tiny model scores low: keep its few best guesses so the file has entries to check
            "--score-thresh", "0", "--max-detections", "3")
    result = run_cli("validate-submission", str(submission), "--images-json", str(root / "test.json"))
    assert "valid" in result.stdout
    entries = json.loads(submission.read_text())
    test = json.loads((root / "test.json").read_text())
    ids = {image["id"] for image in test["images"]}
    assert {e["image_id"] for e in entries} <= ids and {e["category_id"] for e in entries} <= set(range(1, 21))
    # pycocotools loads it against the real image list.
    gt = COCO()
    gt.dataset = {"images": test["images"], "categories": test["categories"], "annotations": []}
    gt.createIndex()
    assert entries, "with --score-thresh 0 every image keeps its best guesses"
    assert len(gt.loadRes(str(submission)).anns) == len(entries)


def test_nuclei_rle_areas_match_the_file():
    path = needs_shared("nuclei", "val.json")
    data = load_coco(path)
    checked = 0
    for record in data.images[:20]:
        for annotation in record.annotations:
            rle = segmentation_to_rle(annotation["segmentation"], record.height, record.width)
            assert abs(float(mask_utils.area(rle)) - annotation["area"]) <= 1
            checked += 1
    assert checked > 100


def test_check_data_on_real_sets():
    for parts in (("fruits_nuts", "trainval.json", "images"), ("tinyvoc", "pascal_train_sample.json", "train_sample")):
        root = needs_shared(parts[0])
        report, usable = check_dataset(str(root / parts[1]), str(root / parts[2]), 40_000_000)
        assert usable, report
        assert "instances per class" in report


def test_a_labelme_folder_is_an_image_list_for_validate_and_visualize(tmp_path):
    """predict and evaluate read a labelme folder; validate-submission and visualize said 'not found'."""
    folder = needs_shared("labelme_examples", "data_annotated")
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    result = run_cli("validate-submission", str(empty), "--images-json", str(folder))
    assert "valid (0 detections)" in result.stdout and "not checked" not in result.stdout
    overlays = tmp_path / "overlays"
    run_cli("visualize", "--gt", str(folder), "--image-dir", str(folder), "--output-dir", str(overlays), "--num", "2")
    assert len(list(overlays.glob("*.png"))) == 2
