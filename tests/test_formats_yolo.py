"""YOLO segmentation datasets as Ultralytics lays them out: labels, splits, paths, and what a YAML gets wrong."""

import pytest
import yaml

from tinyseg.data.coco import DatasetError
from tinyseg.data.formats import load_dataset
from test_formats import yolo_dataset


def test_yolo_labels_and_bad_lines(tmp_path):
    good = yolo_dataset(tmp_path / "good", ["1 0.1 0.1 0.5 0.1 0.5 0.5 0.1 0.5"])
    data = load_dataset(good)
    assert [r.file_name for r in data.images] == ["a.png", "empty.png"]
    (annotation,) = data.images[0].annotations
    assert annotation["category_id"] == 2 and annotation["segmentation"][0][:4] == [4.0, 3.0, 20.0, 3.0]
    assert annotation["area"] == 16 * 12

    bad = yolo_dataset(tmp_path / "bad", ["0 0.1 0.1 0.5 0.1 0.5 0.5", "0 0.1 0.1 0.5 0.1 0.5", "2 0.1 0.1 0.5 0.1 0.5 0.5",
                                          "0 0.5 0.5 0.2 0.2", "0 10 10 200 10 200 200"])
    with pytest.raises(DatasetError) as error:
        load_dataset(bad)
    message = str(error.value)
    assert "a.txt: line 2: an odd number of coordinates (5)" in message
    assert "a.txt: line 3: class 2 is past the 2 names" in message
    assert "line 4: 4 numbers is a detection box" in message and "line 5: coordinates must be normalised" in message
    assert "line 1" not in message


def test_yolo_nc_mismatch_orphan_labels_and_a_folder_listed_twice(tmp_path):
    """Each went by without a word: the images of a folder listed twice were trained twice under one id each, a
    label file without its image was dropped, and an nc that disagrees with names was ignored."""
    from tinyseg.data.formats import inspect_dataset

    path = yolo_dataset(tmp_path, ["0 0.1 0.1 0.5 0.1 0.5 0.5"])
    (tmp_path / "labels" / "train" / "gone.txt").write_text("1 0.1 0.1 0.5 0.1 0.5 0.5\n")
    (tmp_path / "labels" / "train" / "classes.txt").write_text("cat\ndog\n")  # labelImg's, not an orphan
    config = {**yaml.safe_load(path.read_text()), "train": ["images/train", "images/train"]}
    path.write_text(yaml.safe_dump(config))
    data, problems = inspect_dataset(path)
    assert [r.file_name for r in data.images] == ["a.png", "empty.png"]
    orphans = [str(p) for p in problems if "label file" in str(p)]
    assert orphans == [f"{path}: train: 1 label file(s) have no image and are not read (first:"
                       f" {tmp_path / 'labels' / 'train' / 'gone.txt'})"]
    path.write_text(yaml.safe_dump({**config, "nc": 3}))
    with pytest.raises(DatasetError, match="nc is 3 but names lists 2 classes"):
        load_dataset(path)


def test_yolo_dataset_given_by_a_relative_path_finds_its_labels(tmp_path, monkeypatch):
    path = yolo_dataset(tmp_path / "ds", ["1 0.1 0.1 0.5 0.1 0.5 0.5 0.1 0.5"])
    config = yaml.safe_load(path.read_text())
    del config["path"]  # the YAML's own folder is the root, as when it is given without `path:`
    path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    assert len(load_dataset("ds/data.yaml").images[0].annotations) == 1
    monkeypatch.chdir(tmp_path / "ds")
    assert len(load_dataset("data.yaml").images[0].annotations) == 1


def test_yolo_val_split_is_the_validation_set(tmp_path, shapes):
    from tinyseg.data.training_data import build_training_data

    from conftest import tiny_config

    path = yolo_dataset(tmp_path, ["0 0.1 0.1 0.5 0.1 0.5 0.5"], val_lines=["1 0.2 0.2 0.6 0.2 0.6 0.6"])
    config = tiny_config(shapes, tmp_path / "run", f"data.train_json={path}", "data.val_json=", "data.image_dir=")
    data = build_training_data(config)
    assert [r.file_name for r in data.train_records] == ["a.png"] and [r.file_name for r in data.val_records] == ["v.png"]
    assert data.val_image_dir == tmp_path / "images" / "val"
    assert config.data.image_dir == str(tmp_path / "images" / "train")  # recorded in the run's config.yaml


def test_an_image_folder_given_beside_yolo_labels_is_named_unused_and_never_recorded(tmp_path, shapes, caplog):
    """The stray folder went into config.yaml as data.image_dir, where the report looked for the images; and
    check-data said nothing about it."""
    from tinyseg.data.check import check_dataset
    from tinyseg.data.training_data import build_training_data

    from conftest import tiny_config

    path = yolo_dataset(tmp_path, ["0 0.1 0.1 0.5 0.1 0.5 0.5"], val_lines=["1 0.2 0.2 0.6 0.2 0.6 0.6"])
    stray = str(shapes["images"])
    config = tiny_config(shapes, tmp_path / "run", f"data.train_json={path}", "data.val_json=",
                         f"data.image_dir={stray}", f"data.val_image_dir={stray}")
    with caplog.at_level("WARNING", logger="tinyseg"):
        build_training_data(config)
    assert f"the image folder {stray} is not used" in caplog.text
    assert (config.data.image_dir, config.data.val_image_dir) == (str(tmp_path / "images" / "train"),
                                                                  str(tmp_path / "images" / "val"))
    report, usable = check_dataset(str(path), stray, 10**8)
    assert usable and f"WARNING {path}: image folder: yolo labels name their own images" in report
