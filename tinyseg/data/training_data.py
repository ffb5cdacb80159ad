"""From the config to checked training and validation data: every check runs before the first step."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..runtime import distributed as dist
from .coco import (CategoryMap, CocoData, DatasetError, ImageRecord, beyond_detection_cap,
                   categories_without_instances, format_problems)
from .images import check_images
from .split import content_keys, split_records

log = logging.getLogger("tinyseg")


@dataclass
class TrainingData:
    categories: CategoryMap
    train_records: list[ImageRecord]
    train_image_dir: Path
    val_records: list[ImageRecord]
    val_image_dir: Path
    val_gt: dict | None  # COCO ground truth of the val records, for evaluation


def load_checked(json_path: str, image_dir: str, max_pixels: int, require_annotations: bool = True,
                 fmt: str = "auto", split: str = "", crowd_rle_as_instances: bool = False) -> CocoData:
    """Load the labels (COCO, or labelme / YOLO / VOC converted in memory: data/formats) and open every image
    they name; raise DatasetError listing all problems. The result's image_dir is where the images are."""
    from .formats import load_dataset, resolve_format, unused_image_dir

    if not json_path:
        raise DatasetError("no annotation file given (data.train_json / --train-json)")
    fmt = resolve_format(json_path, fmt)
    if fmt == "coco" and not image_dir:
        raise DatasetError(f"{json_path}: a COCO file needs its image folder (--image-dir, or data.image_dir"
                           " / data.val_image_dir)")
    if fmt == "coco" and not Path(image_dir).is_dir():
        what = "is not a folder" if Path(image_dir).exists() else "does not exist"
        raise DatasetError(f"image folder '{image_dir}' for {json_path} {what}")
    data = load_dataset(json_path, require_annotations, fmt, split, crowd_rle_as_instances)
    for unused in unused_image_dir(json_path, fmt, data.image_dir, image_dir):
        log.warning("%s", unused)
    image_dir = data.image_dir = data.image_dir or image_dir
    problems = check_images(image_dir, data.images, json_path, max_pixels)
    if problems:
        raise DatasetError(format_problems(problems, f"{json_path}: images in {image_dir} cannot be used"))
    for warning in data.problems:
        log.warning("%s", warning)
    return data


def build_training_data(cfg: Config) -> TrainingData:
    from .formats import has_separate_val, val_split

    d = cfg.data
    options = {"fmt": d.format, "crowd_rle_as_instances": d.crowd_rle_as_instances}
    train = load_checked(d.train_json, d.image_dir, d.max_image_pixels, **options)
    train_dir = Path(train.image_dir)
    # A YOLO dataset YAML with its own val split is validated on it, as Ultralytics does.
    val_json = d.val_json or (d.train_json if has_separate_val(d.train_json, d.format) else "")
    if val_json:
        val = load_checked(val_json, d.val_image_dir or d.image_dir, d.max_image_pixels,
                           split=val_split(val_json, d.format), **options)
        val_dir = Path(val.image_dir)
        if val.categories.category_ids != train.categories.category_ids:
            raise DatasetError(f"{val_json}: categories {val.categories.category_ids} differ from"
                               f" {d.train_json}: {train.categories.category_ids}")
        if not d.allow_val_overlap:
            _refuse_overlap(train.images, train_dir, val.images, val_dir, val_json)
        train_records, val_records, gt_source = train.images, val.images, val
    else:
        val_dir = train_dir
        train_records, val_records = split_records(train_dir, train.images, d.val_fraction, d.split_seed)
        gt_source = train
    kept = [r for r in train_records if d.train_negatives or r.has_instances]
    if not kept:
        raise DatasetError(f"{d.train_json}: no training image has a (non-crowd) instance")
    missing = categories_without_instances(train.categories, kept)
    if missing and not val_json:  # the file itself was complete; the split took them
        log.warning("after the train/val split, %d categories have no training instance (the model cannot"
                    " learn them): %s", len(missing), ", ".join(missing))
    _warn_once(beyond_detection_cap(kept + val_records, cfg.predict.max_detections))
    # config.yaml then says where the images were read (labelme, YOLO and VOC labels bring their own), not a
    # folder given beside them and never read, which the report and a resume would take for the images.
    if not d.image_dir or Path(d.image_dir).resolve() != train_dir.resolve():
        d.image_dir = str(train_dir)
    if val_dir.resolve() != Path(d.val_image_dir or d.image_dir).resolve():
        d.val_image_dir = str(val_dir)
    return TrainingData(train.categories, kept, train_dir, val_records, val_dir,
                        gt_source.to_coco_dict(val_records) if val_records else None)


_TOLD: set[str] = set()


def _warn_once(message: str) -> None:
    """A warning about the data as a whole, once per process and on the main rank only: each fold of
    `train --folds K` reads the same file again."""
    if message and message not in _TOLD and dist.is_main():
        _TOLD.add(message)
        log.warning("%s", message)


def _refuse_overlap(train: list[ImageRecord], train_dir: Path, val: list[ImageRecord], val_dir: Path,
                    val_json: str) -> None:
    """An explicit val set must not share pictures (same bytes, or a near copy) with the training set."""
    import numpy as np

    from .images import image_signature
    from .split import near_duplicate_pairs

    pairs = [(r, train_dir) for r in train] + [(r, val_dir) for r in val]
    signatures = np.stack([image_signature(d, r.file_name) for r, d in pairs])
    digests = [content_keys(d, r)[0] for r, d in pairs]
    exact = {}
    for index, digest in enumerate(digests):
        exact.setdefault(digest, []).append(index)
    candidates = set(near_duplicate_pairs(signatures))
    candidates |= {(a, b) for group in exact.values() for a in group for b in group if a < b}
    leaks = sorted({(a, b - len(train)) for a, b in candidates if a < len(train) <= b})
    if leaks:
        lines = [f"{val_json}: image id={val[v].image_id} ({val[v].file_name}) duplicates training image"
                 f" id={train[t].image_id} ({train[t].file_name})" for t, v in leaks[:20]]
        raise DatasetError("validation images leak from the training set:\n  " + "\n  ".join(lines))
