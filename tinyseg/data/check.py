"""`tinyseg check-data`: the dataset's statistics and every problem, without training."""

from __future__ import annotations

from collections import Counter

import numpy as np

from ..config import PredictConfig
from .coco import ERROR, WARNING, DatasetError, Problem, beyond_detection_cap
from .formats import inspect_dataset, resolve_format, unused_image_dir
from .images import check_images


def check_dataset(json_path: str, image_dir: str, max_pixels: int, fmt: str = "auto",
                  crowd_rle_as_instances: bool = False,
                  max_detections: int = PredictConfig.max_detections) -> tuple[str, bool]:
    """(report text, usable): usable means no error-level problem (warnings are recoveries). Labels in
    another format (labelme, YOLO, VOC) are converted first and bring their own image folder.
    max_detections: prediction's cap per image, to warn about images that hold more instances."""
    fmt = resolve_format(json_path, fmt)
    if fmt == "coco" and not image_dir:
        raise DatasetError(f"{json_path}: a COCO file needs its image folder: tinyseg check-data {json_path} IMAGES/")
    data, problems = inspect_dataset(json_path, require_annotations=False, fmt=fmt,
                                     crowd_rle_as_instances=crowd_rle_as_instances)
    if data is not None:
        problems = problems + unused_image_dir(json_path, fmt, data.image_dir, image_dir)
        if not any(record.has_instances for record in data.images):  # train refuses it: so must this
            problems.append(Problem(json_path, "annotations", "no image has a (non-crowd) instance: nothing to"
                                    " train or score on"))
    image_dir = (data.image_dir if data is not None else "") or image_dir
    lines = [f"dataset {json_path} ({fmt}) with images in {image_dir}"]
    if data is not None:
        problems = problems + check_images(image_dir, data.images, json_path, max_pixels)
        dense = beyond_detection_cap(data.images, max_detections)
        if dense:
            problems.append(Problem(json_path, "annotations", dense, WARNING))
        lines += _statistics(data)
    errors = [p for p in problems if p.severity == ERROR]
    warnings = [p for p in problems if p.severity != ERROR]
    lines.append(f"problems: {len(errors)} error(s), {len(warnings)} warning(s)")
    lines += [f"  ERROR   {p}" for p in errors] + [f"  WARNING {p}" for p in warnings]
    usable = not errors
    lines.append("usable for training" if usable else "NOT usable: fix the errors above")
    return "\n".join(lines), usable


def _statistics(data) -> list[str]:
    per_class = Counter(a["category_id"] for r in data.images for a in r.annotations)
    per_image = np.array([len(r.annotations) for r in data.images] or [0])
    sizes = Counter(f"{r.width}x{r.height}" for r in data.images)
    crowd = sum(a.get("iscrowd", 0) for r in data.images for a in r.annotations)
    empty = sum(1 for r in data.images if not r.annotations)
    lines = [f"images: {len(data.images)} ({empty} without annotations)",
             f"instances: {int(per_image.sum())} ({crowd} crowd)",
             f"instances per image: min {per_image.min()}, median {np.median(per_image):.0f}, max {per_image.max()}",
             f"image sizes: {len(sizes)} distinct; most common " + ", ".join(f"{s} ({n})" for s, n in sizes.most_common(3)),
             "instances per class:"]
    for category_id, name in zip(data.categories.category_ids, data.categories.names):
        lines.append(f"  {category_id:>5d} {name:<20s} {per_class.get(category_id, 0)}")
    return lines
