"""Ultralytics YOLO segmentation datasets to COCO: a dataset YAML (`path`, `train`, `val`, `names`) and one
text file per image, `class x1 y1 x2 y2 ...` with coordinates normalised to the image's size.

A label file is found the way Ultralytics finds it: the last `/images/` of the image's path replaced by
`/labels/`, the suffix by `.txt`; no label file means an image without objects. YOLO class i is COCO
category id i + 1, unless the YAML carries `category_ids` (written by `tinyseg convert --to yolo`), which
restores the original COCO file's ids on the way back.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import yaml

from ..coco import DatasetError, Problem
from ..images import IMAGE_SUFFIXES
from .common import CocoBuilder, UnreadableText, absolute, image_root, read_text

# Normalised coordinates a little outside [0, 1] are rounding; far outside, they are pixels.
NOT_LABELS = ("classes.txt",)  # labelImg and CVAT's YOLO exports keep the class names in the labels folder
COORD_SLACK = 0.01


def label_path(image: str | Path) -> Path:
    """Ultralytics' img2label_paths for one image."""
    text = str(Path(image).absolute())  # a relative path has no leading separator before `images`
    images, labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    if images in text:
        text = labels.join(text.rsplit(images, 1))
    return Path(text).with_suffix(".txt")


def dataset_yaml(src: str | Path) -> Path:
    """The YAML itself, or the one YAML of a dataset folder (data.yaml preferred)."""
    src = Path(src)
    if src.is_file():
        return src
    if (src / "data.yaml").is_file():
        return src / "data.yaml"
    found = sorted(list(src.glob("*.yaml")) + list(src.glob("*.yml")))
    if len(found) != 1:
        raise DatasetError(f"{src}: a YOLO dataset folder needs data.yaml (or exactly one .yaml file),"
                           f" found {len(found)}")
    return found[0]


def read_dataset(src: str | Path) -> tuple[Path, dict]:
    path = dataset_yaml(src)
    try:
        config = yaml.safe_load(read_text(path))
    except yaml.YAMLError as error:
        raise DatasetError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(config, dict):
        raise DatasetError(f"{path}: expected a mapping with path, train, val and names")
    return path, config


def class_names(path: Path, config: dict) -> tuple[list[str], list[int]]:
    """(names by class index, COCO category id of each)."""
    names = config.get("names")
    if isinstance(names, dict):
        keys = list(names)
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in keys) \
                or sorted(keys) != list(range(len(keys))):
            raise DatasetError(f"{path}: names: the keys must be the class indices 0..{len(keys) - 1},"
                               f" got {', '.join(repr(k) for k in keys)}")
        names = [names[i] for i in range(len(keys))]
    if not isinstance(names, list) or not names:
        raise DatasetError(f"{path}: names: missing, or not a list / index mapping of class names")
    for index, name in enumerate(names):
        # YAML reads an unquoted `no` or `on` as a boolean and `~` as null: not what the user named the class
        if isinstance(name, bool) or not isinstance(name, (str, int, float)) or str(name) == "":
            raise DatasetError(f"{path}: names[{index}]: a class name must be a string, got {name!r}"
                               " (quote it in the YAML)")
    names = [str(n) for n in names]
    if "nc" in config and config["nc"] != len(names):  # Ultralytics refuses this too: which one is right?
        raise DatasetError(f"{path}: nc is {config['nc']!r} but names lists {len(names)} classes")
    ids = config.get("category_ids")
    if ids is None:
        return names, list(range(1, len(names) + 1))
    if not (isinstance(ids, list) and len(ids) == len(names)
            and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
            and len(set(ids)) == len(ids)):
        raise DatasetError(f"{path}: category_ids must list one distinct integer per name ({len(names)})")
    return names, ids


def split_entries(path: Path, config: dict, split: str) -> list[Path]:
    if not isinstance(config.get("path") or "", str):
        raise DatasetError(f"{path}: path: must be a folder name, got {config['path']!r}")
    root = path.parent / (config.get("path") or "")  # a relative `path:` is relative to the YAML's folder
    entries = config.get(split)
    if not entries:
        present = [k for k in ("train", "val", "test") if config.get(k)]
        raise DatasetError(f"{path}: no '{split}' split (it has: {', '.join(present) or 'none'})")
    entries = entries if isinstance(entries, list) else [entries]
    resolved = []
    for entry in entries:
        target = Path(str(entry))
        target = target if target.is_absolute() else root / target
        if not target.exists():
            raise DatasetError(f"{path}: {split}: '{entry}' not found (looked for {target})")
        resolved.append(target)
    return resolved


def has_separate_val(src: str | Path) -> bool:
    """True when the YAML names a val split that is not its train split (Ultralytics' coco8 uses one for both)."""
    try:
        path, config = read_dataset(src)
        return bool(config.get("val")) and split_entries(path, config, "val") != split_entries(path, config, "train")
    except DatasetError:
        return False


def split_images(path: Path, config: dict, split: str) -> tuple[list[Path], Path]:
    """The split's image files and the folder their COCO file names are relative to."""
    images: list[Path] = []
    entries = split_entries(path, config, split)
    for entry in entries:
        if entry.is_dir():
            images += sorted(p for p in entry.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif entry.suffix == ".txt":  # a list file: one image path per line, relative to the list's folder
            for line in read_text(entry).splitlines():
                if line.strip():
                    image = Path(line.strip())
                    images.append(image if image.is_absolute() else entry.parent / image)
        else:
            images.append(entry)
    if not images:
        raise DatasetError(f"{path}: {split}: no images in {', '.join(str(e) for e in entries)}")
    images = list(dict.fromkeys(absolute(image) for image in images))  # a folder listed twice is read once
    default = entries[0] if len(entries) == 1 and entries[0].is_dir() else images[0].parent
    return images, image_root(default, images)


def to_coco(src: str | Path, split: str = "") -> tuple[dict, Path, list[Problem]]:
    """(COCO dict, image folder, problems) of one split (default train) of a YOLO segmentation dataset; the
    dict holds what could be read, the problems name the label file and line of what could not."""
    path, config = read_dataset(src)
    split = split or "train"
    names, ids = class_names(path, config)
    images, root = split_images(path, config, split)
    builder = CocoBuilder(path, "yolo", names, ids)
    _warn_orphan_labels(images, split_entries(path, config, split), path, split, builder)
    for image_file in images:
        if not image_file.is_file():
            builder.error(path, split, f"image {image_file} not found")
            continue
        size = builder.measure(image_file, path, split)
        if size is None:
            continue
        image = builder.add_image(absolute(image_file).relative_to(root).as_posix(), *size)
        labels = label_path(image_file)
        if labels.is_file():
            try:
                _read_labels(labels, read_text(labels), image, ids, path, builder)
            except UnreadableText as error:
                builder.problems.append(error.problem)
    return builder.result(), root, builder.problems


def _warn_orphan_labels(images: list[Path], entries: list[Path], path: Path, split: str, builder: CocoBuilder) -> None:
    """Label files of the split's folders that no image has: a renamed or deleted image, its objects silently lost."""
    listed = {absolute(entry) for entry in entries}
    used = {absolute(label_path(image)) for image in images} | listed
    # Only a labels/ folder of its own: beside the images, a .txt file may be anything (a list, notes)
    folders = dict.fromkeys(absolute(label_path(entry / "_").parent) for entry in entries if entry.is_dir())
    folders = [folder for folder in folders if folder not in listed]
    orphans = sorted({p for folder in folders for p in folder.rglob("*.txt")
                      if absolute(p) not in used and p.name not in NOT_LABELS})
    if orphans:
        builder.warn(path, split, f"{len(orphans)} label file(s) have no image and are not read (first: {orphans[0]})")


def _read_labels(labels: Path, text: str, image: dict, ids: list[int], yaml_path: Path, builder: CocoBuilder) -> None:
    width, height = image["width"], image["height"]
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"line {number}"
        try:
            values = [float(v) for v in fields]
        except ValueError:
            builder.error(labels, where, f"not numbers: '{line.strip()[:60]}'")
            continue
        klass, coords = values[0], values[1:]
        if not klass.is_integer():
            builder.error(labels, where, f"class '{fields[0]}' is not an integer class index")
            continue
        if not 0 <= klass < len(ids):
            builder.error(labels, where, f"class {fields[0]} is past the {len(ids)} names of {yaml_path}"
                                         f" (0..{len(ids) - 1})")
            continue
        if len(coords) == 4:
            builder.error(labels, where, "4 numbers is a detection box (x y w h), not a polygon; tinyseg needs"
                                         " segmentation labels (class x1 y1 x2 y2 x3 y3 ...)")
            continue
        if len(coords) % 2:
            builder.error(labels, where, f"an odd number of coordinates ({len(coords)}); x and y come in pairs")
            continue
        if len(coords) < 6:
            builder.error(labels, where, f"a polygon needs at least 3 points, got {len(coords) // 2}")
            continue
        if not all(math.isfinite(v) and -COORD_SLACK <= v <= 1 + COORD_SLACK for v in coords):
            builder.error(labels, where, "coordinates must be normalised to [0, 1] (divided by the image's"
                                         f" width and height), got values up to {max(coords):g}")
            continue
        polygon = [round(min(max(v, 0.0), 1.0) * (width if i % 2 == 0 else height), 3) for i, v in enumerate(coords)]
        if builder.add(image, ids[int(klass)], [polygon]) is None:
            builder.warn(labels, where, "the polygon covers no pixel; left out")
