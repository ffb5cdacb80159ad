"""The submission: exact format, the file's category ids, the validator, and pycocotools loading it."""

import json

import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from tinyseg.runtime.checkpoint import CheckpointError
from tinyseg.inference.jobs import PredictJob, predict_checkpoint
from tinyseg.inference import submission as submission_module
from tinyseg.inference.submission import (check_submission, validate_submission, write_image_list,
                                          write_submission)

from conftest import decodes_with_pycocotools


@pytest.fixture(scope="module")
def submission(trained_run, tmp_path_factory):
    shapes = trained_run["shapes"]
    out = tmp_path_factory.mktemp("submission") / "submission.json"
    found, _ = predict_checkpoint(PredictJob(str(trained_run["run_dir"] / "best.pt"), str(shapes["images"]),
                                             str(shapes["test"]), num_workers=0, progress=False))
    write_submission(out, found.results)
    return out


def test_validator_reads_the_image_list_predict_writes(trained_run, submission, tmp_path):
    """predict without --images-json writes ids and names only: the validator raised KeyError 'height'."""
    test = json.loads(trained_run["shapes"]["test"].read_text())
    listed = tmp_path / "submission.images.json"
    write_image_list(listed, [(image["id"], image["file_name"]) for image in test["images"]])
    assert validate_submission(submission, listed) == []
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(test["images"]))
    assert validate_submission(submission, as_list) == [
        f"{as_list}: the top level must be an object with an \"images\" list, got list"]



def test_check_reads_the_image_list_once_and_says_whether_categories_were_checked(
        trained_run, submission, tmp_path, monkeypatch):
    """The CLI read the list a second time to say so: a labelme folder was converted twice."""
    reads = []
    read = submission_module.read_image_list
    monkeypatch.setattr(submission_module, "read_image_list", lambda path: reads.append(path) or read(path))
    test = trained_run["shapes"]["test"]
    found = check_submission(submission, test)
    assert (found.problems, found.categories_checked, reads) == ([], True, [test])
    assert found.detections == len(json.loads(submission.read_text())) > 0
    listed = tmp_path / "submission.images.json"
    write_image_list(listed, [(image["id"], image["file_name"]) for image in json.loads(test.read_text())["images"]])
    assert check_submission(submission, listed).categories_checked is False

@decodes_with_pycocotools  # as the tutorial scripts / the grader do
def test_format_and_category_ids_round_trip(trained_run, submission):
    entries = json.loads(submission.read_text())
    assert entries
    test = json.loads(trained_run["shapes"]["test"].read_text())
    sizes = {i["id"]: [i["height"], i["width"]] for i in test["images"]}
    for entry in entries:
        assert list(entry) == ["image_id", "score", "category_id", "segmentation"]
        assert isinstance(entry["segmentation"]["counts"], str)
        assert entry["segmentation"]["size"] == sizes[entry["image_id"]]
        assert mask_utils.decode({**entry["segmentation"], "counts": entry["segmentation"]["counts"].encode()}).shape == tuple(sizes[entry["image_id"]])
    # The file's ids are 3, 7 and 12; internal labels 1..3 must never leak out.
    assert {e["category_id"] for e in entries} <= {3, 7, 12}
    assert {e["category_id"] for e in entries} & {7, 12}


def test_valid_submission_passes_and_pycocotools_loads_it(trained_run, submission):
    assert validate_submission(submission, trained_run["shapes"]["test"]) == []
    gt = COCO(str(trained_run["shapes"]["test_gt"]))
    results = gt.loadRes(str(submission))
    assert len(results.anns) == len(json.loads(submission.read_text()))


def test_validator_lists_each_problem(trained_run, submission, tmp_path):
    entries = json.loads(submission.read_text())[:4]
    entries[0]["image_id"] = 424242
    entries[1]["category_id"] = 1
    entries[2]["segmentation"]["size"] = [1, 1]
    del entries[3]["score"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(entries + [{"image_id": entries[1]["image_id"], "score": 0.5, "category_id": 3,
                                          "segmentation": {**entries[1]["segmentation"], "counts": "garbage!!"}}]))
    problems = validate_submission(bad, trained_run["shapes"]["test"])
    text = "\n".join(problems)
    assert "entry 0: image_id 424242" in text
    assert "entry 1: category_id 1" in text
    assert "entry 2: RLE size [1, 1]" in text
    assert "entry 3: missing score" in text
    assert "entry 4: RLE counts do not decode" in text


def test_checkpoint_with_other_classes_is_refused(trained_run, tmp_path):
    test = json.loads(trained_run["shapes"]["test"].read_text())
    test["categories"] = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    other = tmp_path / "other.json"
    other.write_text(json.dumps(test))
    with pytest.raises(CheckpointError, match="different class set"):
        predict_checkpoint(PredictJob(str(trained_run["run_dir"] / "best.pt"), str(trained_run["shapes"]["images"]),
                                      str(other), num_workers=0, progress=False))


def test_unreadable_and_missing_images_are_reported_not_dropped(trained_run, tmp_path):
    import shutil

    from conftest import run_cli

    shapes = trained_run["shapes"]
    folder = tmp_path / "images"
    shutil.copytree(shapes["images"], folder)
    test = json.loads(shapes["test"].read_text())
    broken, missing = test["images"][0]["file_name"], test["images"][1]["file_name"]
    (folder / broken).write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (folder / missing).unlink()
    out = tmp_path / "submission.json"
    result = run_cli("predict", "--checkpoint", str(trained_run["run_dir"] / "best.pt"), "--image-dir", str(folder),
                     "--images-json", str(shapes["test"]), "--output", str(out), "--workers", "0", check=False)
    assert result.returncode == 1
    assert "2 image(s) could not be read" in result.stderr and broken in result.stderr and missing in result.stderr
    predicted = {e["image_id"] for e in json.loads(out.read_text())}
    assert test["images"][0]["id"] not in predicted and predicted  # the others were still predicted
