"""COCO (or any format tinyseg reads) to an Ultralytics YOLO segmentation dataset:

    OUT/images/<file_name>   links to the original images (copies where links are not allowed)
    OUT/labels/<file_name stem>.txt   one `class x1 y1 x2 y2 ...` line per instance, normalised
    OUT/data.yaml            path, train, val (both the images: split them in Ultralytics or before),
                             names, and category_ids so that `tinyseg convert data.yaml` gives back the ids

YOLO has one polygon per object: an instance in several parts (or with holes) is joined into one polygon
by zero-width bridges, as Ultralytics' own COCO converter does; masks (RLE) are traced at the pixel edges.
Crowd annotations have no YOLO form and are left out.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ...runtime.files import atomic_write, atomic_write_text
from ..coco import DatasetError
from .common import link_or_copy
from .embedded import is_cached
from .yolo import label_path

log = logging.getLogger("tinyseg")


def coco_to_yolo(src: str | Path, image_dir: str | Path | None, out_dir: str | Path, fmt: str = "auto",
                 crowd_rle_as_instances: bool = False, split: str = "") -> dict[str, Any]:
    """Write the YOLO dataset; returns counts for the summary line. Every image is checked first."""
    from ..images import check_images, image_path
    from . import load_dataset

    data = load_dataset(src, fmt=fmt, split=split, crowd_rle_as_instances=crowd_rle_as_instances)
    image_dir = Path(data.image_dir or image_dir or "")
    if not data.image_dir and not (str(image_dir) and image_dir.is_dir()):
        raise DatasetError(f"image folder '{image_dir}' for {src} does not exist (give --image-dir)")
    problems = check_images(image_dir, data.images, str(src))
    if problems:
        from ..coco import format_problems

        raise DatasetError(format_problems(problems, f"{src}: images in {image_dir} cannot be used"))
    out = Path(out_dir)
    for sub in ("images", "labels"):
        if (out / sub).exists() and any((out / sub).iterdir()):
            raise DatasetError(f"{out / sub}: already holds files; convert into a new or empty folder")
    classes = {cid: index for index, cid in enumerate(data.categories.category_ids)}
    instances = 0
    for record in data.images:
        target = out / "images" / record.file_name
        source = image_path(image_dir, record.file_name)
        if is_cached(source):  # a labelme image only embedded in its JSON: copied, the cache is not kept
            atomic_write(target, lambda out, content=source.read_bytes(): out.write(content))
        else:
            link_or_copy(source, target)
        lines = []
        for annotation in record.annotations:
            if annotation.get("iscrowd"):
                continue
            polygon = instance_polygon(annotation["segmentation"], record.height, record.width)
            if polygon is None:
                continue
            normalised = np.clip(polygon / np.array([record.width, record.height]), 0.0, 1.0)
            lines.append(" ".join([str(classes[annotation["category_id"]])] + [f"{v:.6f}" for v in normalised.ravel()]))
        instances += len(lines)
        atomic_write_text(label_path(target), "".join(line + "\n" for line in lines))
    description = {"path": str(out.resolve()), "train": "images", "val": "images",
                   "names": dict(enumerate(data.categories.names)),
                   "category_ids": list(data.categories.category_ids)}
    header = (f"# written by tinyseg convert from {src}; train and val are the same images: split them before\n"
              "# training for an honest val score. category_ids: the COCO ids of classes 0..K-1.\n")
    atomic_write_text(out / "data.yaml", header + yaml.safe_dump(description, sort_keys=False, allow_unicode=True))
    return {"images": len(data.images), "instances": instances, "categories": len(classes)}


def instance_polygon(segmentation: Any, height: int, width: int) -> np.ndarray | None:
    """One (N, 2) polygon in pixel coordinates for a COCO segmentation, parts joined; None if empty."""
    if isinstance(segmentation, list):
        parts = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in segmentation if len(p) >= 6]
    else:
        from ..rle import decode_masks, segmentation_to_rle

        parts = mask_polygons(decode_masks([segmentation_to_rle(segmentation, height, width)], height, width)[0])
    if not parts:
        return None
    return join_parts(parts)


def mask_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """Outlines (and holes, in the opposite direction) of a binary mask, at its pixel edges.

    contourpy (matplotlib's contour engine) traces the 0.5 level through the pixel centres; pixel (r, c)
    covers [c, c + 1] x [r, r + 1] in COCO coordinates, so the padded frame is shifted by -0.5.
    """
    import contourpy

    padded = np.pad(mask.astype(np.float64), 1)
    lines = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate).lines(0.5)
    polygons = []
    for line in lines:
        points = _drop_collinear(np.asarray(line)[:-1] - 0.5)
        if len(points) >= 3:
            polygons.append(points)
    polygons.sort(key=lambda p: -abs(_area(p)))  # the largest outline first: the bridges start from it
    return polygons


def _area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    before, after = np.roll(points, 1, axis=0), np.roll(points, -1, axis=0)
    cross = (points[:, 0] - before[:, 0]) * (after[:, 1] - points[:, 1]) - \
        (points[:, 1] - before[:, 1]) * (after[:, 0] - points[:, 0])
    return points[np.abs(cross) > 1e-9]


def join_parts(parts: list[np.ndarray]) -> np.ndarray:
    """One polygon visiting every part: from each part to the next by its nearest pair of vertices, walking
    the next part once round and coming back the same way, so each bridge has no area."""
    if len(parts) == 1:
        return parts[0]
    exits = [_nearest_pair(current, following) for current, following in zip(parts[:-1], parts[1:])]

    # Part i is entered at `entry` and left at `exit` for part i + 1; after the last part, each earlier part
    # is finished from its exit back round to its entry.
    entries = [0] + [int(b) for _, b in exits]
    leaves = [int(a) for a, _ in exits]
    forward, backward = [], []
    for index, part in enumerate(parts):
        entry, count = entries[index], len(part)
        if index == len(parts) - 1:
            forward += [part[(entry + step) % count] for step in range(count + 1)]
            continue
        span = (leaves[index] - entry) % count
        forward += [part[(entry + step) % count] for step in range(span + 1)]
        backward = [part[(entry + step) % count] for step in range(span, count + 1)] + backward
    return np.asarray(forward + backward)


def _nearest_pair(first: np.ndarray, second: np.ndarray, chunk: int = 512) -> tuple[int, int]:
    """(i, j) minimising |first[i] - second[j]|, in chunks so that long outlines stay small in memory."""
    best, pair = np.inf, (0, 0)
    for start in range(0, len(first), chunk):
        distances = ((first[start:start + chunk, None, :] - second[None, :, :]) ** 2).sum(axis=2)
        i, j = np.unravel_index(int(np.argmin(distances)), distances.shape)
        if distances[i, j] < best:
            best, pair = float(distances[i, j]), (start + int(i), int(j))
    return pair
