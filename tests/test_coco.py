import json
import warnings

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from tinyseg.data.coco import CategoryMap, DatasetError, inspect_coco, load_coco

from tinyseg.data.rle import decode_masks, segmentation_to_rle

from conftest import needs_shared


def test_real_sample_polygons_match_pycocotools_and_areas():
    sample = needs_shared("tinyvoc", "pascal_train_sample.json")
    data = load_coco(sample)
    raw = json.loads(sample.read_text())
    assert len(data.images) == 10 and sum(len(r.annotations) for r in data.images) == 23
    multi_part = 0
    for record in data.images:
        for annotation in record.annotations:
            rle = segmentation_to_rle(annotation["segmentation"], record.height, record.width)
            reference = mask_utils.merge(mask_utils.frPyObjects(annotation["segmentation"], record.height, record.width))
            ours, theirs = decode_masks([rle, reference], record.height, record.width)
            assert np.array_equal(ours, theirs)
            # The file's areas were computed from the same polygons: they agree to the pixel.
            assert abs(float(mask_utils.area(rle)) - annotation["area"]) <= 0.01 * annotation["area"] + 2
            multi_part += len(annotation["segmentation"]) > 1
    assert multi_part > 0, "the sample has multi-part polygons; they must be read"
    assert data.categories.category_ids == list(range(1, 21))
    assert len(raw["images"]) == len(data.images)


def test_rle_compressed_and_uncompressed_decode_alike():
    mask = np.zeros((20, 30), dtype=np.uint8)
    mask[3:9, 4:20] = 1
    compressed = mask_utils.encode(np.asfortranarray(mask))
    counts = []  # uncompressed column-major run lengths, starting with zeros
    flat, value, run = mask.flatten(order="F"), 0, 0
    for pixel in flat:
        if pixel == value:
            run += 1
        else:
            counts.append(run)
            value, run = pixel, 1
    counts.append(run)
    for segmentation in ({"size": [20, 30], "counts": compressed["counts"].decode()},
                         {"size": [20, 30], "counts": counts}):
        decoded = decode_masks([segmentation_to_rle(segmentation, 20, 30)], 20, 30)
        assert np.array_equal(decoded[0], mask)


def test_category_map_round_trips_non_contiguous_ids():
    categories = CategoryMap.from_categories([{"id": 12, "name": "c"}, {"id": 3, "name": "a"}, {"id": 7, "name": "b"}])
    assert [categories.category_to_label(i) for i in (3, 7, 12)] == [1, 2, 3]
    assert [categories.label_to_category(l) for l in (1, 2, 3)] == [3, 7, 12]
    assert categories.num_classes == 4
    assert CategoryMap.from_dict(categories.to_dict()).category_ids == [3, 7, 12]


def _coco(**changes):
    base = {
        "images": [{"id": 1, "file_name": "a.png", "height": 10, "width": 10}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [1, 1, 3, 3],
                         "segmentation": [[1, 1, 4, 1, 4, 4, 1, 4]]}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    base.update(changes)
    return base


def _annotation(**changes):
    return [{**_coco()["annotations"][0], **changes}]


BAD = {
    "unknown image": (_coco(annotations=_annotation(image_id=99)), "unknown image_id 99"),
    "unknown category": (_coco(annotations=_annotation(category_id=5)), "unknown category_id 5"),
    "two points": (_coco(annotations=_annotation(segmentation=[[1, 1, 4, 4]])), "fewer than 3 points"),
    "odd coordinates": (_coco(annotations=_annotation(segmentation=[[1, 1, 4, 1, 4]])), "odd number"),
    "nan coordinate": (_coco(annotations=_annotation(segmentation=[[1, 1, 4, float("nan"), 4, 4]])), "NaN"),
    "zero box": (_coco(annotations=_annotation(bbox=[1, 1, 0, 3])), "zero-size"),
    "negative box": (_coco(annotations=_annotation(bbox=[1, 1, -2, 3])), "zero-size or negative"),
    "rle size": (_coco(annotations=_annotation(segmentation={"size": [5, 5], "counts": "25"})), "RLE size"),
    "duplicate image": (_coco(images=_coco()["images"] * 2), "duplicate image id"),
    # per-class AP50 is keyed by name: one of the two classes vanished from every table before
    "duplicate category name": (_coco(categories=[{"id": 1, "name": "thing"}, {"id": 4, "name": "thing"}]),
                                "categories[1] id=4: name 'thing' is also category id 1's"),
    "duplicate annotation": (_coco(annotations=_annotation() * 2), "duplicate annotation id"),
    "traversal": (_coco(images=[{"id": 1, "file_name": "../x.png", "height": 10, "width": 10}]), "leaves the image"),
    "absolute": (_coco(images=[{"id": 1, "file_name": "/etc/passwd", "height": 10, "width": 10}]), "leaves the image"),
    "no size": (_coco(images=[{"id": 1, "file_name": "a.png"}]), "height and width"),
    "missing images": ({"annotations": [], "categories": []}, "images: missing"),
    "list image_id": (_coco(annotations=_annotation(image_id=[1])), "'image_id' must be an integer, got list"),
    "dict category_id": (_coco(annotations=_annotation(category_id={"id": 1})), "'category_id' must be an integer"),
    "list annotation id": (_coco(annotations=_annotation(id=[1])), "'id' must be an integer, got list"),
    "list image id": (_coco(images=[{"id": [1], "file_name": "a.png", "height": 10, "width": 10}]),
                      "needs an integer 'id'"),
    "string counts list": (_coco(annotations=_annotation(segmentation={"size": [10, 10], "counts": ["50", "50"]})),
                           "non-negative integers"),
    "negative counts": (_coco(annotations=_annotation(segmentation={"size": [10, 10], "counts": [150, -50]})),
                        "non-negative integers"),
    "garbage compressed counts": (_coco(annotations=_annotation(segmentation={"size": [10, 10], "counts": "zzzz~~~~"})),
                                  "not a valid COCO RLE string"),
    "short compressed counts": (_coco(annotations=_annotation(segmentation={"size": [10, 10], "counts": "25"})),
                                "compressed RLE counts sum to"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_json_names_file_and_entry(tmp_path, case):
    content, message = BAD[case]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(DatasetError) as error:
        load_coco(path)
    assert str(path) in str(error.value) and message in str(error.value)


def test_not_an_object_and_not_json(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(DatasetError, match="expected a JSON object"):
        load_coco(path)
    path.write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_coco(path)


def test_recoveries_are_warnings(tmp_path):
    path = tmp_path / "warn.json"
    path.write_text(json.dumps(_coco(annotations=_annotation(segmentation=[]) + [
        {**_annotation()[0], "id": 2, "bbox": [5, 5, 20, 20]}])))
    data, problems = inspect_coco(path)
    assert data is not None
    messages = [p.message for p in problems]
    assert any("empty segmentation; annotation skipped" in m for m in messages)
    assert any("outside" in m and "clipped" in m for m in messages)
    assert len(data.images[0].annotations) == 1


def test_masks_cached_up_front_are_not_converted_again(shapes, monkeypatch):
    import tinyseg.data.dataset as dataset_module
    from tinyseg.data.dataset import InstanceDataset

    data = load_coco(shapes["train"])
    dataset = InstanceDataset(data.images, shapes["images"], data.categories)
    dataset.cache_masks()
    assert len(dataset._rle_cache) == len(data.images)

    def refuse(*args):
        raise AssertionError("a cached image's polygons were converted again")

    monkeypatch.setattr(dataset_module, "segmentation_to_rle", refuse)
    image, target = dataset[0]
    expected = sum(1 for a in data.images[0].annotations if not a.get("iscrowd", 0))
    assert target["masks"].shape == (expected, *image.shape[-2:])


def test_compressed_counts_parser_agrees_with_pycocotools():
    from tinyseg.data.rle import compressed_rle_counts

    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = np.asfortranarray((rng.random((23, 31)) > 0.7).astype(np.uint8))
        encoded = mask_utils.encode(mask)
        runs = compressed_rle_counts(encoded["counts"].decode())
        assert sum(runs) == 23 * 31 and min(runs) >= 0
        # Re-encoding the parsed runs gives back pycocotools' string.
        assert mask_utils.frPyObjects({"size": [23, 31], "counts": runs}, 23, 31)["counts"] == encoded["counts"]


def test_garbage_rle_is_refused_before_training_not_in_the_first_batch(shapes, tmp_path):
    from conftest import run_cli

    data = json.loads(shapes["train"].read_text())
    image = data["images"][0]
    data["annotations"][0]["segmentation"] = {"size": [image["height"], image["width"]], "counts": "zzzz~~~~"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    check = run_cli("check-data", str(bad), str(shapes["images"]), check=False)
    assert check.returncode == 1 and "annotations[0]" in check.stdout and "RLE" in check.stdout
    train = run_cli("train", "--config", "demo", "--train-json", str(bad), "--image-dir", str(shapes["images"]),
                    "--output-dir", str(tmp_path / "run"), check=False)
    assert train.returncode == 1 and "annotations[0]" in train.stderr and "Traceback" not in train.stderr
    assert not (tmp_path / "run" / "last.pt").exists()


def test_categories_without_instances_are_listed(tmp_path):
    content = _coco(categories=[{"id": 1, "name": "thing"}, {"id": 4, "name": "ghost"}, {"id": 9, "name": "crowd"}])
    content["annotations"].append({**_annotation()[0], "id": 2, "category_id": 9, "iscrowd": 1})
    path = tmp_path / "cats.json"
    path.write_text(json.dumps(content))
    data, problems = inspect_coco(path)
    warnings = [p for p in problems if "no (non-crowd) instance" in p.message]
    assert len(warnings) == 1 and warnings[0].severity == "warning"
    assert "2 of 3 categories" in warnings[0].message and "4 ghost" in warnings[0].message
    assert "9 crowd" in warnings[0].message and "1 thing" not in warnings[0].message
    from tinyseg.data.check import check_dataset

    report, usable = check_dataset(str(path), str(tmp_path), 10**8)
    assert "1 warning" in report and "4 ghost" in report


def test_masks_decode_when_warnings_raise():
    """pycocotools' decode goes through numpy 2's deprecated __array__ retry: a warning that raises there
    (warnings as errors, or a Ctrl-C arriving while it is emitted) broke training with a TypeError."""
    mask = np.zeros((12, 9), dtype=np.uint8)
    mask[3:8, 2:6] = 1
    rle = segmentation_to_rle({"size": [12, 9], "counts": mask_utils.encode(np.asfortranarray(mask))["counts"].decode()},
                              12, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoded = decode_masks([rle, rle], 12, 9)
    assert decoded.shape == (2, 12, 9) and np.array_equal(decoded[1], mask)
