"""labelme JSON folders to COCO: one JSON per image, shapes grouped into instances like labelme's own
labelme2coco (same label and group_id = one instance), `__ignore__` shapes as crowd regions.

Polygons are kept as polygons (the user's points, rasterised by pycocotools like any COCO polygon);
rectangles and circles become polygons; labelme 5 `mask` shapes become RLE. Category ids are 1..K in the
order of `labels.txt` / `class_names.txt` in the folder when there is one (labelme's own order, its
`__ignore__` and `_background_` lines skipped), else in sorted-name order.
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..coco import DatasetError, Problem, read_json
from ..rle import decode_mask, segmentation_to_rle
from .common import CocoBuilder, absolute, image_root, read_class_names

IGNORE = "__ignore__"
NAME_FILES = ("labels.txt", "class_names.txt")
AREA_SHAPES = ("polygon", "rectangle", "circle", "mask")
LINE_SHAPES = ("line", "linestrip", "point", "points")
PIL_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}


def is_labelme_file(path: Path) -> bool:
    try:
        raw = read_json(path)
    except DatasetError:
        return False
    return isinstance(raw, dict) and isinstance(raw.get("shapes"), list)


def to_coco(src: str | Path, split: str = "") -> tuple[dict, Path, list[Problem]]:
    """(COCO dict of what could be converted, image folder, problems naming the file and shape of the rest)
    for a folder of labelme JSON files. Nothing is written into the folder (embedded.py)."""
    src = Path(src)
    if not src.is_dir():
        raise DatasetError(f"{src}: a labelme dataset is a folder of JSON files; folder not found")
    files, skipped, unreadable = [], [], []
    for path in sorted(src.rglob("*.json")):
        try:
            raw = read_json(path)
        except DatasetError as error:  # every unreadable file is listed, not only the first
            unreadable.append((path, str(error).removeprefix(f"{path}: ")))
            continue
        (files if isinstance(raw, dict) and isinstance(raw.get("shapes"), list) else skipped).append((path, raw))
    if not files:
        raise DatasetError(f"{src}: no labelme JSON file (a JSON object with 'shapes') in this folder"
                           + "".join(f"\n  - {path}: {reason}" for path, reason in unreadable))
    names = _class_names(src, files)
    builder = CocoBuilder(src, "labelme", names)
    for path, reason in unreadable:
        builder.error(path, "top level", reason)
    for path, _ in skipped:
        builder.warn(path, "top level", "not a labelme file (no 'shapes' list); left out")
    parsed, seen = [], {}
    for path, raw in files:
        found = _image_file(path, raw, builder)
        if found is None:
            continue
        other = seen.setdefault(found[0].resolve(), path)
        if other != path:
            builder.error(path, "imagePath", f"{found[0]} is also the image of {other}")
            continue
        parsed.append((path, raw, *found))
    root = image_root(src, [image_file for _, _, image_file, _ in parsed]) if parsed else src
    images = []
    for path, raw, image_file, content in parsed:
        if _convert_file(path, raw, image_file, content, root, builder):
            images.append((absolute(image_file).relative_to(root).as_posix(), content or image_file))
    return builder.result(), _image_folder(src, root, images, builder), builder.problems


def _image_folder(src: Path, root: Path, images: list[tuple[str, Path | bytes]], builder: CocoBuilder) -> Path:
    """`root`, or when some images are only embedded, a cache folder of them all (embedded.py)."""
    from .embedded import cache_root, image_folder

    embedded = [name for name, source in images if isinstance(source, bytes)]
    if not embedded:
        return root
    try:
        folder = image_folder(images)
    except OSError as error:
        builder.error(src, "imageData", f"{len(embedded)} image(s) only embedded in their JSON ({embedded[0]}, ...)"
                                        f" could not be decoded into the cache {cache_root()} ({error}); set"
                                        " XDG_CACHE_HOME to a writable folder, or save the images beside the JSON")
        return root
    builder.warn(src, "imageData", f"{len(embedded)} image(s) only embedded in their JSON ({embedded[0]}, ...):"
                                   f" read from {folder}, which holds them decoded and links to the other images;"
                                   f" nothing is written into {src}")
    return folder


def _class_names(src: Path, files: list[tuple[Path, dict]]) -> list[str]:
    for name in NAME_FILES:
        if (src / name).is_file():
            return read_class_names(src / name)
    labels = {s.get("label") for _, raw in files for s in raw["shapes"] if isinstance(s, dict)}
    return sorted(str(label) for label in labels if isinstance(label, str) and label and label != IGNORE)


def _image_file(path: Path, raw: dict, builder: CocoBuilder) -> tuple[Path, bytes | None] | None:
    """(the image beside the JSON (imagePath is relative to the JSON's folder), None), or for an
    embedded-only image (imageData without the file) (where labelme would have saved it, its bytes)."""
    image_path = raw.get("imagePath") or ""
    if not isinstance(image_path, str):
        builder.error(path, "imagePath", f"must be a file name, got {type(image_path).__name__}")
        return None
    image_path = image_path.replace("\\", "/")
    candidate = path.parent / image_path if image_path else None
    if candidate is not None and candidate.is_file():
        return candidate, None
    data = raw.get("imageData")
    if not data:
        where = f"'{image_path}': {candidate}" if image_path else "missing"
        builder.error(path, "imagePath", f"image file not found ({where}) and no embedded imageData")
        return None
    try:
        content = base64.b64decode(data, validate=False)
        with Image.open(io.BytesIO(content)) as image:
            suffix = PIL_SUFFIX.get(image.format or "", ".png")
    except (ValueError, TypeError, OSError) as error:
        builder.error(path, "imageData", f"not a base64-encoded image ({error})")
        return None
    target = path.parent / (Path(image_path).name if image_path else path.stem + suffix)
    return (target, None) if target.is_file() else (target, content)


def _convert_file(path: Path, raw: dict, image_file: Path, content: bytes | None, root: Path,
                  builder: CocoBuilder) -> bool:
    """Add the image and its instances; False when the image itself cannot be used."""
    size = builder.measure(image_file, path, "imageData" if content is not None else "imagePath", content)
    if size is None:
        return False
    width, height = size
    stated = (raw.get("imageWidth"), raw.get("imageHeight"))
    if stated != (None, None) and stated != (width, height):
        builder.error(path, "imageWidth/imageHeight", f"{stated[0]}x{stated[1]} differs from the image"
                                                      f" {image_file} ({width}x{height})")
        return False
    image = builder.add_image(absolute(image_file).relative_to(root).as_posix(), width, height)
    groups: dict[tuple, list[tuple[int, Any]]] = {}
    for index, shape in enumerate(raw["shapes"]):
        part = _shape_part(path, index, shape, width, height, builder)
        if part is None:
            continue
        group_id = shape.get("group_id")
        key = (shape["label"], group_id if group_id is not None else f"shape {index}")
        groups.setdefault(key, []).append((index, part))
    instances, ignores = [], []
    for (label, _), parts in groups.items():
        segmentation = _join(parts, height, width)
        where = f"shapes[{', '.join(str(i) for i, _ in parts)}] ({label})"
        if label == IGNORE:
            ignores.append(segmentation)
            continue
        if label not in builder.id_of:
            builder.error(path, where, f"label '{label}' is not in the class names file")
            continue
        annotation = builder.add(image, builder.id_of[label], segmentation)
        if annotation is None:
            builder.warn(path, where, "the shape covers no pixel; left out")
            continue
        instances.append((annotation["category_id"], _mask(segmentation, height, width)))
    for segmentation in ignores:
        builder.add_ignore(image, segmentation, _mask(segmentation, height, width), instances)
    return True


def _shape_part(path: Path, index: int, shape: Any, width: int, height: int, builder: CocoBuilder) -> Any:
    """One shape as polygon parts (list of flat coordinate lists) or a full-image RLE dict; None if unusable."""
    if not isinstance(shape, dict) or not isinstance(shape.get("label"), str) or not shape["label"]:
        builder.error(path, f"shapes[{index}]", "needs a 'label' string")
        return None
    where = f"shapes[{index}] ({shape['label']})"
    kind = shape.get("shape_type") or "polygon"
    if kind in LINE_SHAPES:
        builder.warn(path, where, f"a {kind} has no area; left out")
        return None
    if kind not in AREA_SHAPES:
        builder.error(path, where, f"shape_type '{kind}' is not one of {', '.join(AREA_SHAPES + LINE_SHAPES)}")
        return None
    group_id = shape.get("group_id")
    if group_id is not None and (not isinstance(group_id, int) or isinstance(group_id, bool)):
        builder.error(path, where, f"group_id must be an integer or null, got {group_id!r}")
        return None
    points = shape.get("points")
    if not (isinstance(points, list) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in points)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    for p in points for v in p)):
        builder.error(path, where, "'points' must be a list of [x, y] number pairs")
        return None
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    needed = {"polygon": 3, "rectangle": 2, "circle": 2, "mask": 2}[kind]
    if len(points) < needed:
        builder.error(path, where, f"a {kind} needs at least {needed} points, got {len(points)}")
        return None
    if kind == "polygon":
        return [[float(v) for v in points.ravel()]]
    if kind == "rectangle":
        (x0, y0), (x1, y1) = points.min(axis=0), points.max(axis=0)
        return [[float(x0), float(y0), float(x1), float(y0), float(x1), float(y1), float(x0), float(y1)]]
    if kind == "circle":
        return [_circle(points[0], points[1])]
    return _mask_shape(path, where, shape, points, width, height, builder)


def _circle(center: np.ndarray, rim: np.ndarray) -> list[float]:
    """labelme's circle (centre, a point on it) as a polygon with vertices about 2 px apart."""
    radius = float(np.hypot(*(rim - center)))
    count = int(min(max(math.ceil(2 * math.pi * radius / 2), 12), 180))
    angles = np.linspace(0, 2 * math.pi, count, endpoint=False)
    xy = np.stack([center[0] + radius * np.cos(angles), center[1] + radius * np.sin(angles)], axis=1)
    return [round(float(v), 3) for v in xy.ravel()]


def _mask_shape(path: Path, where: str, shape: dict, points: np.ndarray, width: int, height: int,
                builder: CocoBuilder) -> dict | None:
    """labelme 5's `mask` shape: a base64 PNG of the box between its two points."""
    from .common import mask_to_rle

    try:
        with Image.open(io.BytesIO(base64.b64decode(shape.get("mask") or "", validate=False))) as picture:
            crop = np.asarray(picture.convert("L")) > 0
    except (ValueError, TypeError, OSError) as error:
        builder.error(path, where, f"'mask' is not a base64-encoded PNG ({error})")
        return None
    x0, y0 = (int(round(v)) for v in points.min(axis=0))
    full = np.zeros((height, width), dtype=bool)
    top, left = max(y0, 0), max(x0, 0)
    bottom, right = min(y0 + crop.shape[0], height), min(x0 + crop.shape[1], width)
    if bottom > top and right > left:
        full[top:bottom, left:right] = crop[top - y0:bottom - y0, left - x0:right - x0]
    return mask_to_rle(full)


def _join(parts: list[tuple[int, Any]], height: int, width: int) -> Any:
    """The parts of one instance: a polygon list stays a polygon list; any mask part makes one RLE."""
    if all(isinstance(p, list) for _, p in parts):
        return [polygon for _, p in parts for polygon in p]
    from .common import mask_to_rle

    union = np.zeros((height, width), dtype=bool)
    for _, part in parts:
        union |= _mask(part, height, width)
    return mask_to_rle(union)


def _mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    return decode_mask(segmentation_to_rle(segmentation, height, width), height, width)
