"""Users' label formats: labelme folders, YOLO segmentation datasets, VOC instance PNGs, CVAT's COCO quirk,
and COCO -> YOLO -> COCO; checked against labelme's own exports of the same annotations."""

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from tinyseg.data.coco import DatasetError
from tinyseg.data.rle import decode_masks, segmentation_to_rle
from tinyseg.data.formats import detect_format, inspect_dataset, load_dataset, to_coco
from tinyseg.data.formats.yolo_export import coco_to_yolo

from conftest import TINY, needs_shared, run_cli


def masks_by_image(data, crowd=False):
    """{image file's base name: [(category name, mask), ...]} in annotation order."""
    names = dict(zip(data.categories.category_ids, data.categories.names))
    return {Path(r.file_name).name: [(names[a["category_id"]], decode_masks(
        [segmentation_to_rle(a["segmentation"], r.height, r.width)], r.height, r.width)[0].astype(bool))
        for a in r.annotations if bool(a["iscrowd"]) == crowd] for r in data.images}


def iou(first, second):
    return (first & second).sum() / max((first | second).sum(), 1)


def assert_agree(first, second, threshold):
    assert first.keys() == second.keys()
    for image in first:
        assert [n for n, _ in first[image]] == [n for n, _ in second[image]], image
        for (name, a), (_, b) in zip(first[image], second[image]):
            assert iou(a, b) >= threshold, (image, name, iou(a, b))


def labelme_voc_raster(json_path):
    """What labelme2voc paints for a labelme file: PIL polygons (outline included) in shape order, later
    shapes over earlier ones; {instance: visible mask} for the non-ignore instances."""
    raw = json.loads(json_path.read_text())
    canvas = Image.new("I", (raw["imageWidth"], raw["imageHeight"]))
    keys = []
    for index, shape in enumerate(raw["shapes"]):
        key = (shape["label"], shape["group_id"] if shape["group_id"] is not None else f"shape {index}")
        keys += [key] if key not in keys else []
        ImageDraw.Draw(canvas).polygon([tuple(p) for p in shape["points"]], outline=keys.index(key) + 1,
                                       fill=keys.index(key) + 1)
    painted = np.asarray(canvas)
    return [(k[0], painted == i + 1) for i, k in enumerate(keys) if k[0] != "__ignore__"]


def test_labelme_and_voc_importers_agree_with_labelmes_own_exports():
    root = needs_shared("labelme_examples")
    labelme = load_dataset(root / "data_annotated")
    export = load_dataset(root / "data_dataset_coco" / "annotations.json")
    voc = load_dataset(root / "data_dataset_voc")
    assert detect_format(root / "data_annotated") == "labelme" and detect_format(root / "data_dataset_voc") == "voc"
    # Same polygons, same rasteriser: labelme's COCO export and ours are the same masks, same classes.
    assert_agree(masks_by_image(labelme), masks_by_image(export), 0.99)
    assert sum(len(v) for v in masks_by_image(labelme).values()) == 12
    # labelme's VOC PNGs are its own PIL raster (outline included, later shapes over earlier ones):
    # the VOC importer recovers every instance of it exactly.
    painted = {f"{p.stem}.jpg": labelme_voc_raster(p) for p in sorted((root / "data_annotated").glob("*.json"))}
    assert_agree(masks_by_image(voc), painted, 0.99)
    # Against the polygons, the PNGs differ by labelme's half-pixel outline and by occlusion (documented).
    assert_agree(masks_by_image(voc), masks_by_image(labelme), 0.9)
    # Both read labelme's __ignore__ region (VOC: void) as a crowd of the class it touches.
    for crowds in (masks_by_image(labelme, crowd=True), masks_by_image(voc, crowd=True)):
        assert {image: [n for n, _ in v] for image, v in crowds.items() if v} == {
            "2011_000003.jpg": ["person"], "2011_000006.jpg": ["person"]}
    # Ids: VOC from class_names.txt (the export's ids), labelme 1..K in sorted-name order.
    assert dict(zip(voc.categories.names, voc.categories.category_ids))["person"] == 15
    assert labelme.categories.names == ["bottle", "bus", "car", "chair", "person", "sofa"]
    assert labelme.categories.category_ids == [1, 2, 3, 4, 5, 6]


def test_coco_yolo_coco_round_trip_keeps_instances_and_ids(tmp_path):
    root = needs_shared("labelme_examples", "data_dataset_coco")
    # labelme's export lists its `_background_` placeholder as category 0; here a real class takes id 0.
    raw = json.loads((root / "annotations.json").read_text())
    raw["categories"][0]["name"] = "grass"
    raw["annotations"][0]["category_id"] = 0
    (tmp_path / "annotations.json").write_text(json.dumps(raw))
    source = load_dataset(tmp_path / "annotations.json")
    counts = coco_to_yolo(tmp_path / "annotations.json", root, tmp_path / "yolo")
    back = load_dataset(tmp_path / "yolo" / "data.yaml")
    assert counts == {"images": 3, "instances": 12, "categories": 21}
    assert back.categories.category_ids == source.categories.category_ids == list(range(21))  # 0 kept
    assert back.categories.names == source.categories.names
    assert sorted(r.file_name for r in back.images) == sorted(r.file_name for r in source.images)
    assert_agree(masks_by_image(back), masks_by_image(source), 0.95)


def test_labelmes_background_placeholder_is_not_a_class():
    """labelme's COCO export writes `_background_` as category 0: it was trained as a 21st VOC class."""
    root = needs_shared("labelme_examples", "data_dataset_coco")
    export = load_dataset(root / "annotations.json")
    assert export.categories.category_ids == list(range(1, 21)) and "_background_" not in export.categories.names
    assert any("'_background_' is labelme's placeholder" in p.message for p in export.problems)


def test_rle_masks_survive_the_yolo_round_trip(shapes, tmp_path):
    """Masks (RLE) are traced to one polygon per instance (parts and holes bridged) and come back."""
    source = load_dataset(shapes["train"])
    assert any(isinstance(a["segmentation"], dict) for r in source.images for a in r.annotations)
    coco_to_yolo(shapes["train"], shapes["images"], tmp_path)
    labels = sorted((tmp_path / "labels").glob("*.txt"))
    assert len(labels) == len(source.images) and (tmp_path / "images" / source.images[0].file_name).is_symlink()
    back = load_dataset(tmp_path / "data.yaml")
    assert back.categories.category_ids == [3, 7, 12]
    assert_agree(masks_by_image(back), masks_by_image(source), 0.95)
    with pytest.raises(DatasetError, match="already holds files"):
        coco_to_yolo(shapes["train"], shapes["images"], tmp_path)


def write_image(path, size=(40, 30), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def labelme_file(folder, stem, shapes, size=(40, 30), image=True, **extra):
    folder.mkdir(parents=True, exist_ok=True)
    if image:
        write_image(folder / f"{stem}.png", size)
    raw = {"version": "5.2.1", "flags": {}, "shapes": shapes, "imagePath": f"{stem}.png", "imageData": None,
           "imageHeight": size[1], "imageWidth": size[0], **extra}
    (folder / f"{stem}.json").write_text(json.dumps(raw))


def shape(label, points, kind="polygon", group_id=None):
    return {"label": label, "points": points, "group_id": group_id, "shape_type": kind, "flags": {}}


def test_labelme_shapes_groups_and_ignore(tmp_path):
    labelme_file(tmp_path, "a", [
        shape("dog", [[2, 2], [10, 2], [10, 10], [2, 10]], group_id=4),
        shape("dog", [[12, 2], [16, 6]], "rectangle", group_id=4),  # same label and group: one instance
        shape("cat", [[28, 20], [28, 26]], "circle"),
        shape("__ignore__", [[14, 4], [22, 4], [22, 12]]),  # overlaps the dog
        shape("__ignore__", [[33, 0], [39, 0], [39, 4]]),  # touches nothing: ignored for every class
        shape("cat", [[0, 28], [39, 28]], "line"),
    ])
    warnings = []
    coco, image_dir = to_coco(tmp_path, problems=warnings)
    assert image_dir == tmp_path and coco["images"][0]["file_name"] == "a.png"
    assert coco["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    objects = [a for a in coco["annotations"] if not a["iscrowd"]]
    assert [a["category_id"] for a in objects] == [2, 1]
    assert len(objects[0]["segmentation"]) == 2 and objects[0]["area"] == 64 + 16
    assert abs(objects[1]["area"] - np.pi * 36) < 0.08 * np.pi * 36
    crowds = [a["category_id"] for a in coco["annotations"] if a["iscrowd"]]
    assert crowds == [2, 1, 2]
    assert any("a line has no area" in str(w) and "a.json" in str(w) for w in warnings)


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    """labelme's embedded images are decoded into the user's cache: a test's own, here."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def files_in(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_labelme_embedded_image_and_bad_files(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (9, 9, 9)).save(buffer, format="PNG")
    labelme_file(tmp_path / "lm", "only", [shape("cat", [[1, 1], [9, 1], [9, 9]])], image=False,
                 imageData=base64.b64encode(buffer.getvalue()).decode("ascii"))
    data = load_dataset(tmp_path / "lm")
    assert not (tmp_path / "lm" / "only.png").exists() and data.images[0].file_name == "only.png"

    lm = tmp_path / "lm"
    labelme_file(lm, "lost", [shape("cat", [[1, 1], [9, 1], [9, 9]])], image=False)
    labelme_file(lm, "wide", [shape("cat", [[1, 1], [9, 1]])], size=(40, 30))
    raw = json.loads((lm / "wide.json").read_text())
    raw["imageWidth"] = 41
    (lm / "wide.json").write_text(json.dumps(raw))
    for stem in ("cut", "cut2"):  # check-data stopped at the first of these with nothing else listed
        (lm / f"{stem}.json").write_text('{"shapes": [')
    with pytest.raises(DatasetError) as error:
        load_dataset(lm)
    message = str(error.value)
    assert "lost.json: imagePath: image file not found" in message
    assert "wide.json: imageWidth/imageHeight: 41x30 differs" in message
    assert "cut.json: top level: not valid JSON" in message and "cut2.json: top level: not valid JSON" in message


def yolo_dataset(root, lines, val_lines=None):
    write_image(root / "images" / "train" / "a.png")
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "train" / "a.txt").write_text("\n".join(lines) + "\n")
    write_image(root / "images" / "train" / "empty.png")  # no label file: an image without objects
    split = {"train": "images/train", "val": "images/train"}
    if val_lines is not None:
        write_image(root / "images" / "val" / "v.png", seed=1)
        (root / "labels" / "val").mkdir(parents=True)
        (root / "labels" / "val" / "v.txt").write_text("\n".join(val_lines) + "\n")
        split["val"] = "images/val"
    (root / "data.yaml").write_text(yaml.safe_dump({"path": ".", **split, "names": {0: "cat", 1: "dog"}}))
    return root / "data.yaml"


def voc_folder(root, index, klass, photo_size):
    for sub, array in (("SegmentationObject", index), ("SegmentationClass", klass)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(array.astype(np.uint8))
        picture.putpalette([v for i in range(256) for v in (i, i, i)])  # an index PNG, as VOC's
        picture.save(root / sub / "x.png")
    write_image(root / "JPEGImages" / "x.jpg", photo_size)
    (root / "class_names.txt").write_text("_background_\ncat\ndog\n")


def test_voc_void_and_size_mismatch(tmp_path):
    index, klass = np.zeros((30, 40), int), np.zeros((30, 40), int)
    index[5:15, 5:15], klass[5:15, 5:15] = 1, 2  # a dog
    index[4, 4:16] = klass[4, 4:16] = 255  # void border on the dog
    index[25:28, 30:35] = klass[25:28, 30:35] = 255  # void touching nothing
    voc_folder(tmp_path / "ok", index, klass, (40, 30))
    coco, image_dir = to_coco(tmp_path / "ok")
    assert image_dir == tmp_path / "ok" / "JPEGImages"
    (dog, border, *anywhere) = coco["annotations"]
    assert (dog["category_id"], dog["iscrowd"], dog["area"]) == (2, 0, 100)
    assert (border["category_id"], border["iscrowd"], border["area"]) == (2, 1, 12)
    assert [(a["category_id"], a["iscrowd"], a["area"]) for a in anywhere] == [(1, 1, 15), (2, 1, 15)]

    voc_folder(tmp_path / "bad", index, klass, (41, 30))
    with pytest.raises(DatasetError, match=r"SegmentationObject/x.png: size: the PNG is 40x30, its photo .*x.jpg is 41x30"):
        to_coco(tmp_path / "bad")


def cvat_file(path, attributes=True):
    rle = mask_utils.encode(np.asfortranarray(np.pad(np.ones((6, 6), np.uint8), ((2, 2), (2, 2)))))
    annotation = {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": 36.0, "bbox": [2, 2, 6, 6],
                  "segmentation": {"size": [10, 10], "counts": rle["counts"].decode("ascii")}}
    if attributes:
        annotation["attributes"] = {"occluded": False}
    polygon = {"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [[0, 0, 2, 0, 2, 2]]}
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "height": 10, "width": 10}],
                                "categories": [{"id": 1, "name": "cell"}],
                                "annotations": [annotation] + ([] if attributes else [polygon])}))
    return path


def test_cvat_crowd_masks_warned_and_read_as_instances(tmp_path):
    data, problems = inspect_dataset(cvat_file(tmp_path / "cvat.json"))
    assert any("all 1 RLE masks are iscrowd=1" in str(p) and "crowd_rle_as_instances" in str(p) for p in problems)
    assert not data.images[0].has_instances
    fixed = load_dataset(tmp_path / "cvat.json", crowd_rle_as_instances=True)
    assert fixed.images[0].has_instances and not any("iscrowd=1" in str(p) for p in fixed.problems)
    # COCO's own convention (polygon objects, an RLE crowd) is not CVAT's quirk: no warning.
    _, problems = inspect_dataset(cvat_file(tmp_path / "coco.json", attributes=False))
    assert not any("iscrowd=1" in str(p) for p in problems)
    # check-data reads them as train would with data.crowd_rle_as_instances=true (no instance at all, else)
    from conftest import run_cli

    write_image(tmp_path / "a.png", size=(10, 10))
    for flag, code in (([], 1), (["--crowd-rle-as-instances"], 0)):
        assert run_cli("check-data", str(tmp_path / "cvat.json"), str(tmp_path), *flag, check=False).returncode == code


def test_convert_cli_summary_and_bad_input(tmp_path, capsys):
    from tinyseg.cli import main

    labelme_file(tmp_path / "lm", "a", [shape("cat", [[1, 1], [20, 1], [20, 20]]), shape("dog", [[25, 5], [35, 15]], "rectangle")])
    assert main(["convert", str(tmp_path / "lm"), "--output", str(tmp_path / "out.json")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(
        f"wrote {tmp_path / 'out.json'}: 1 images, 2 instances")
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["images"][0]["file_name"] == "a.png" and len(written["categories"]) == 2

    bad = yolo_dataset(tmp_path / "yolo", ["0 0.1 0.1 0.5 0.1 0.5"])
    result = run_cli("convert", str(bad), "--output", str(tmp_path / "y.json"), check=False)
    assert result.returncode == 1 and "a.txt: line 1: an odd number of coordinates" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "y.json").exists()
    # a folder as the COCO file was an IsADirectoryError traceback; a .json name for --to yolo became a folder
    for output, to, message in ((tmp_path / "lm", "coco", f"--output {tmp_path / 'lm'} is a folder"),
                                (tmp_path / "y.json", "yolo", "--to yolo writes a dataset folder")):
        result = run_cli("convert", str(tmp_path / "lm"), "--output", str(output), "--to", to, check=False)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "y.json").exists()


def synthetic_labelme_folder(folder, count=4):
    rng = np.random.default_rng(3)
    for index in range(count):
        pixels = rng.integers(0, 80, (96, 112, 3), dtype=np.uint8)
        x, y = int(rng.integers(5, 50)), int(rng.integers(5, 40))
        pixels[y:y + 40, x:x + 45] = (220, 60, 60)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"img{index}.png")
        labelme_file(folder, f"img{index}", [shape("box", [[x, y], [x + 45, y + 40]], "rectangle")], size=(112, 96),
                     image=False)


def test_train_takes_a_labelme_folder(tmp_path, capsys):
    """`tinyseg train --train-json <labelme folder>` (in-process: one process start with torch is slow here)."""
    from tinyseg.cli import main

    synthetic_labelme_folder(tmp_path / "labels")
    common = ["--config", "demo", "--train-json", str(tmp_path / "labels"), *TINY, "solver.max_iters=1",
              "solver.warmup_iters=1", "train.eval_every=0", "data.val_fraction=0"]
    assert main(["train", "--output-dir", str(tmp_path / "run"), *common]) == 0
    assert (tmp_path / "run" / "last.pt").is_file()
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["image_dir"] == str(tmp_path / "labels")

    (tmp_path / "labels" / "img0.png").unlink()
    capsys.readouterr()
    assert main(["train", "--output-dir", str(tmp_path / "run2"), *common]) == 1
    assert "img0.json: imagePath: image file not found" in capsys.readouterr().err
    assert not (tmp_path / "run2" / "last.pt").exists()


def test_check_data_and_evaluate_read_a_labelme_folder(tmp_path):
    from tinyseg.data.check import check_dataset
    from tinyseg.inference.jobs import load_ground_truth, score

    synthetic_labelme_folder(tmp_path, count=2)
    report, usable = check_dataset(str(tmp_path), "", 10**8)
    assert usable and f"dataset {tmp_path} (labelme) with images in {tmp_path}" in report
    truth = load_dataset(tmp_path).to_coco_dict()
    detections = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.9,
                   "segmentation": segmentation_to_rle(a["segmentation"], 96, 112)} for a in truth["annotations"]]
    for d in detections:
        d["segmentation"]["counts"] = d["segmentation"]["counts"].decode("ascii")
    results = score(load_ground_truth(str(tmp_path)), detections, ("segm",))
    assert results["segm"]["stats"]["AP50"] == pytest.approx(1.0)
