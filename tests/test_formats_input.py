"""Bad label files in every format (docs/bad-input.md's format rows), check-data's report of them, and what
reading leaves alone: the dataset's folder (labelme's embedded images) and repeated conversions."""

import base64
import json
import io
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tinyseg.data.coco import DatasetError
from tinyseg.data.rle import segmentation_to_rle
from tinyseg.data.formats import inspect_dataset, load_dataset
from test_formats import (cache_in_tmp, files_in, labelme_file, shape, synthetic_labelme_folder,  # noqa: F401
                          voc_folder, yolo_dataset)


def test_reading_embedded_labelme_images_writes_nothing_into_the_dataset(tmp_path, cache_in_tmp):
    """check-data, train and evaluate read the embedded image from the cache; only convert writes it, next to
    its output."""
    from tinyseg.data.images import image_path, load_rgb
    from tinyseg.data.check import check_dataset

    lm = tmp_path / "lm"
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (9, 99, 9)).save(buffer, format="PNG")
    labelme_file(lm, "only", [shape("cat", [[1, 1], [9, 1], [9, 9]])], image=False,
                 imageData=base64.b64encode(buffer.getvalue()).decode("ascii"))
    labelme_file(lm / "sub", "disk", [shape("cat", [[1, 1], [9, 1], [9, 9]])])
    before = files_in(lm)
    data, problems = inspect_dataset(lm)
    report, usable = check_dataset(str(lm), "", 10**8)
    assert usable and files_in(lm) == before and not (lm / "only.png").exists()
    assert Path(data.image_dir).parent == cache_in_tmp / "tinyseg" / "labelme"
    assert any("1 image(s) only embedded" in str(p) and "nothing is written" in str(p) for p in problems)
    pixels = {r.file_name: np.asarray(load_rgb(image_path(data.image_dir, r.file_name))) for r in data.images}
    assert set(pixels) == {"only.png", "sub/disk.png"} and (pixels["only.png"] == (9, 99, 9)).all()
    assert (pixels["sub/disk.png"] == np.asarray(Image.open(lm / "sub" / "disk.png"))).all()
    assert load_dataset(lm).image_dir == data.image_dir  # same content, same cache folder

    from tinyseg.cli import main

    assert main(["convert", str(lm), "--output", str(tmp_path / "out" / "x.json")]) == 0
    written = tmp_path / "out" / "x_images"
    assert (written / "only.png").is_file() and not (written / "only.png").is_symlink()
    assert (written / "sub" / "disk.png").resolve() == (lm / "sub" / "disk.png").resolve()
    assert load_dataset(tmp_path / "out" / "x.json").images[0].file_name == "only.png"
    assert main(["convert", str(lm), "--to", "yolo", "--output", str(tmp_path / "yolo")]) == 0
    copied = tmp_path / "yolo" / "images" / "only.png"
    assert copied.is_file() and not copied.is_symlink() and files_in(lm) == before


def two_labelme_files_for_one_image(root):
    labelme_file(root, "a", [shape("cat", [[1, 1], [9, 1], [9, 9]])])
    labelme_file(root, "b", [shape("cat", [[1, 1], [9, 1], [9, 9]])], image=False, imagePath="a.png")
    return root


def labelme_case(*shapes, names=None):
    def make(root):
        labelme_file(root, "a", list(shapes))
        if names is not None:
            (root / "labels.txt").write_bytes(names)
        return root
    return make


def yolo_case(change=None, files=None):
    """The YOLO dataset of yolo_dataset, its YAML changed by `change`, and {path: bytes} written over it."""
    def make(root):
        path = yolo_dataset(root, ["0 0.1 0.1 0.5 0.1 0.5 0.5"])
        config = yaml.safe_load(path.read_text())
        if change:
            change(config)
            path.write_text(yaml.safe_dump(config))
        for name, content in (files or {}).items():
            (root / name).write_bytes(content)
        return path
    return make


def voc_case(change):
    def make(root):
        index, klass = np.zeros((30, 40), int), np.zeros((30, 40), int)
        index[5:15, 5:15], klass[5:15, 5:15] = 1, 2
        voc_folder(root, index, klass, (40, 30))
        change(root)
        return root
    return make


def voc_rgb(root):
    Image.new("RGB", (40, 30)).save(root / "SegmentationObject" / "x.png")


def voc_recolour(values):
    def change(root):
        klass = np.zeros((30, 40), np.uint8)
        klass[5:15, 5:10], klass[5:15, 10:15] = values
        picture = Image.fromarray(klass)
        picture.putpalette([v for i in range(256) for v in (i, i, i)])
        picture.save(root / "SegmentationClass" / "x.png")
    return change


def voc_split_list(root):
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_bytes(b"x\n\xe9t\xe9\n")


POLYGON = [[1, 1], [9, 1], [9, 9]]
BAD_INPUT = {  # docs/bad-input.md's format rows: (make the dataset, split, the file and entry the error names)
    "two labelme JSONs, one image": (two_labelme_files_for_one_image, "", r"b\.json: imagePath: .*a\.png is also the image of .*a\.json"),
    "label not in labels.txt": (labelme_case(shape("dog", POLYGON), names=b"__ignore__\ncat\n"), "",
                                r"a\.json: shapes\[0\] \(dog\): label 'dog' is not in the class names file"),
    "bad group_id": (labelme_case(shape("cat", POLYGON, group_id="x")), "",
                     r"a\.json: shapes\[0\] \(cat\): group_id must be an integer or null, got 'x'"),
    "unknown shape_type": (labelme_case(shape("cat", POLYGON, "ellipse")), "",
                           r"a\.json: shapes\[0\] \(cat\): shape_type 'ellipse' is not one of"),
    "polygon of 2 points": (labelme_case(shape("cat", POLYGON[:2])), "",
                            r"a\.json: shapes\[0\] \(cat\): a polygon needs at least 3 points, got 2"),
    "points not number pairs": (labelme_case(shape("cat", [[1, 1], [9, "x"], [9, 9]])), "",
                                r"a\.json: shapes\[0\] \(cat\): 'points' must be a list of \[x, y\] number pairs"),
    "non-UTF-8 labels.txt": (labelme_case(shape("cat", POLYGON), names=b"cat\n\xe9"), "",
                             r"labels\.txt: line 2: not UTF-8 text \(byte 0xe9\)"),
    "YAML without names": (yolo_case(lambda c: c.pop("names")), "", r"data\.yaml: names: missing"),
    "names keys of mixed types": (yolo_case(lambda c: c.update(names={0: "cat", "one": "dog"})), "",
                                  r"data\.yaml: names: the keys must be the class indices 0\.\.1, got 0, 'one'"),
    "a name that is not a string": (yolo_case(lambda c: c.update(names=["cat", None])), "",
                                    r"data\.yaml: names\[1\]: a class name must be a string, got None"),
    "YAML without the split": (yolo_case(), "test", r"data\.yaml: no 'test' split \(it has: train, val\)"),
    "split folder missing": (yolo_case(lambda c: c.update(train="images/gone")), "",
                             r"data\.yaml: train: 'images/gone' not found"),
    "YOLO polygon of 1 point": (yolo_case(files={"labels/train/a.txt": b"0 0.1 0.1\n"}), "",
                                r"labels/train/a\.txt: line 1: a polygon needs at least 3 points, got 1"),
    "non-UTF-8 label file": (yolo_case(files={"labels/train/a.txt": b"0 0.1 0.1 0.5 0.1 0.5 0.5\n\xff 0.1\n"}), "",
                             r"labels/train/a\.txt: line 2: not UTF-8 text \(byte 0xff\)"),
    "non-UTF-8 image list": (yolo_case(lambda c: c.update(train="train.txt"), {"train.txt": b"images/train/\xe9.png\n"}),
                             "", r"data/train\.txt: line 1: not UTF-8"),
    "VOC RGB PNG": (voc_case(voc_rgb), "", r"SegmentationObject/x\.png: file: a RGB PNG; VOC masks are palette"),
    "VOC object without class": (voc_case(voc_recolour((0, 0))), "",
                                 r"SegmentationObject/x\.png: object 1: has no class in SegmentationClass"),
    "VOC object of two classes": (voc_case(voc_recolour((1, 2))), "",
                                  r"SegmentationObject/x\.png: object 1: spans several classes .*\[1, 2\]"),
    "VOC photo missing": (voc_case(lambda root: (root / "JPEGImages" / "x.jpg").unlink()), "",
                          r"SegmentationObject/x\.png: JPEGImages: no photo x\.jpg"),
    "VOC split list not UTF-8": (voc_case(voc_split_list), "train",
                                 r"ImageSets/Segmentation/train\.txt: line 2: not UTF-8 text \(byte 0xe9\)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_format_input_names_the_file_and_entry(case, tmp_path, capsys):
    make, split, expected = BAD_INPUT[case]
    source = make(tmp_path / "data")
    with pytest.raises(DatasetError, match=expected):
        load_dataset(source, split=split)
    # and on the command line: one error, exit 1, no traceback (the CLI prints DatasetError as it is)
    from tinyseg.cli import main

    args = ["convert", str(source), "--output", str(tmp_path / "out.json")] + (["--split", split] if split else [])
    assert main(args) == 1
    assert re.search(expected, capsys.readouterr().err) and not (tmp_path / "out.json").exists()


def test_check_data_reports_statistics_and_every_problem_of_bad_labels(tmp_path, capsys):
    """check-data on labelme / YOLO labels with errors: the statistics of what could be read and all the
    errors (35, past load_dataset's 30), not a truncated error pointing at check-data itself."""
    from tinyseg.cli import main

    shapes = [shape("cat", [[1, 1], [20, 1], [20, 20]])] + [shape("cat", [[1, 1], [5, 5]]) for _ in range(35)]
    labelme_file(tmp_path / "lm", "a", shapes)
    assert main(["check-data", str(tmp_path / "lm")]) == 1
    report = capsys.readouterr().out
    assert "images: 1 (0 without annotations)" in report and "instances: 1 (0 crowd)" in report
    assert "problems: 35 error(s)" in report and "a.json: shapes[35] (cat): a polygon needs at least 3" in report
    assert "for the full list" not in report and report.rstrip().endswith("NOT usable: fix the errors above")

    bad = yolo_dataset(tmp_path / "yolo", ["0 0.1 0.1 0.5 0.1 0.5 0.5", "7 0.1 0.1 0.5 0.1 0.5 0.5"])
    (tmp_path / "yolo" / "labels" / "train" / "empty.txt").write_bytes(b"\xff\n")
    assert main(["check-data", str(bad)]) == 1
    report = capsys.readouterr().out
    assert "images: 2 (1 without annotations)" in report and "problems: 2 error(s)" in report
    assert "a.txt: line 2: class 7 is past" in report and "empty.txt: line 1: not UTF-8" in report


def test_evaluate_with_a_checkpoint_converts_the_labels_once(tmp_path, monkeypatch, capsys):
    """evaluate --checkpoint on a labelme folder: its images, the ids to predict and the scoring come from
    one conversion (the prediction itself is replaced: no model here)."""
    from tinyseg.cli import main
    from tinyseg.data.formats import labelme
    import torch

    from tinyseg.config import Config
    from tinyseg.data.coco import CategoryMap
    from tinyseg.inference import jobs
    from tinyseg.inference.predictor import LoadedModel, Predictions

    synthetic_labelme_folder(tmp_path / "gt", count=2)
    conversions, real = [], labelme.to_coco
    monkeypatch.setattr(labelme, "to_coco", lambda *args: conversions.append(args) or real(*args))
    truth = load_dataset(tmp_path / "gt").to_coco_dict()
    loaded = LoadedModel(None, CategoryMap.from_categories(truth["categories"]), Config(), torch.device("cpu"))

    def predict(model, categories, device, predict, entries, image_dir, *args):
        assert image_dir == str(tmp_path / "gt") and len(entries) == 2
        rles = [segmentation_to_rle(a["segmentation"], 96, 112) for a in truth["annotations"]]
        return Predictions([{"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.9,
                             "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}}
                            for a, rle in zip(truth["annotations"], rles)])

    monkeypatch.setattr(jobs, "load_job_model", lambda job: loaded)
    monkeypatch.setattr(jobs, "predict_entries", predict)
    conversions.clear()
    assert main(["evaluate", "--gt", str(tmp_path / "gt"), "--checkpoint", "unused.pt", "--iou-type", "segm",
                 "--output", str(tmp_path / "evaluation.json")]) == 0
    assert len(json.loads((tmp_path / "evaluation.detections.json").read_text())) == len(truth["annotations"])
    assert len(conversions) == 1 and "Average Precision" in capsys.readouterr().out
