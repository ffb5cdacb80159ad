"""What the importers share: image sizes as training sees them, COCO entries whose area and box come from the
mask, class-name files, and ignore regions (labelme `__ignore__`, VOC void) turned into crowd annotations."""

from __future__ import annotations

import io
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..coco import ERROR, PLACEHOLDER_CLASS_NAMES, WARNING, DatasetError, Problem
from ..images import IMAGE_SUFFIXES

log = logging.getLogger("tinyseg")
EXIF_ORIENTATION = 0x0112


def image_size(path: Path, content: bytes | None = None) -> tuple[int, int]:
    """(width, height) after EXIF rotation, as training loads it, from the header only; `content`: the
    image's bytes when they are not on disk (labelme's embedded imageData), `path` then names them."""
    try:
        with Image.open(io.BytesIO(content) if content is not None else path) as image:
            width, height = image.size
            orientation = image.getexif().get(EXIF_ORIENTATION)
    except (OSError, ValueError, SyntaxError) as error:
        raise DatasetError(f"{path}: cannot read the image ({error})") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


class UnreadableText(DatasetError):
    """A text file that cannot be read or is not UTF-8; `problem` names the file and the line."""

    def __init__(self, path: str | Path, entry: str, message: str):
        super().__init__(f"{path}: {entry}: {message}")
        self.problem = Problem(str(path), entry, message, ERROR)


def read_text(path: str | Path) -> str:
    """A label, list or names file as text: UTF-8 (a BOM, as Windows editors write, is dropped), or
    UnreadableText naming the file and the line of the first byte that is not UTF-8."""
    try:
        content = Path(path).read_bytes()
    except OSError as error:
        raise UnreadableText(path, "file", f"cannot be read ({error.strerror or error})") from None
    try:
        return content.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = content.count(b"\n", 0, error.start) + 1
        raise UnreadableText(path, f"line {line}", f"not UTF-8 text (byte 0x{content[error.start]:02x}); save the"
                             " file as UTF-8") from None


def link_or_copy(source: Path, target: Path) -> None:
    """A link to `source` (resolved) at `target`, replacing what is there; a copy where links are not allowed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    temp.unlink(missing_ok=True)
    try:
        temp.symlink_to(Path(source).resolve())
    except OSError:  # no symlinks (Windows without the right): a copy
        shutil.copy2(source, temp)
    os.replace(temp, target)


def find_image(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        for candidate in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def absolute(path: Path) -> Path:
    """Absolute and normalised, but links kept: a YOLO images/ folder of links names its own files."""
    return Path(os.path.abspath(path))


def image_root(default: Path, images: list[Path]) -> Path:
    """The folder the COCO file names its images from: `default` when every image lies inside it."""
    default = absolute(default)
    paths = [absolute(p) for p in images]
    if all(default in p.parents for p in paths):
        return default
    return Path(os.path.commonpath([str(p.parent) for p in paths]))


def read_class_names(path: Path) -> list[str]:
    """One name per line, in id order; labelme's `__ignore__` and `_background_` lines are not classes."""
    names = [line.strip() for line in read_text(path).splitlines()]
    names = [n for n in names if n and n not in (*PLACEHOLDER_CLASS_NAMES, "background")]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DatasetError(f"{path}: class names listed twice: {', '.join(duplicates)}")
    return names


class CocoBuilder:
    """Collects images and annotations; every annotation gets its area and box from its mask."""

    def __init__(self, source: str | Path, fmt: str, names: list[str], category_ids: list[int] | None = None):
        self.source, self.fmt = str(source), fmt
        ids = category_ids or list(range(1, len(names) + 1))
        self.categories = [{"id": int(i), "name": n} for i, n in zip(ids, names)]
        self.id_of = {n: int(i) for i, n in zip(ids, names)}
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.problems: list[Problem] = []

    def error(self, file: str | Path, entry: str, message: str) -> None:
        self.problems.append(Problem(str(file), entry, message, ERROR))

    def warn(self, file: str | Path, entry: str, message: str) -> None:
        self.problems.append(Problem(str(file), entry, message, WARNING))

    def add_image(self, file_name: str, width: int, height: int) -> dict:
        image = {"id": len(self.images) + 1, "file_name": file_name, "width": int(width), "height": int(height)}
        self.images.append(image)
        return image

    def add(self, image: dict, category_id: int, segmentation: Any, iscrowd: int = 0) -> dict | None:
        """Append an annotation (polygon list or mask RLE); None, and nothing added, when its mask is empty."""
        from pycocotools import mask as mask_utils

        from ..rle import segmentation_to_rle

        rle = segmentation_to_rle(segmentation, image["height"], image["width"])
        area = float(mask_utils.area(rle))
        if area <= 0:
            return None
        if isinstance(segmentation, dict):
            segmentation = rle_to_json(segmentation)
        annotation = {"id": len(self.annotations) + 1, "image_id": image["id"], "category_id": int(category_id),
                      "segmentation": segmentation, "area": area,
                      "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": int(iscrowd)}
        self.annotations.append(annotation)
        return annotation

    def add_ignore(self, image: dict, segmentation: Any, region: np.ndarray,
                   instances: list[tuple[int, np.ndarray]]) -> None:
        """An ignore region is a crowd of each class whose instance it touches, or of every class if none."""
        near = dilate(region)
        touched = sorted({c for c, mask in instances if (mask & near).any()})
        for category_id in touched or [c["id"] for c in self.categories]:
            self.add(image, category_id, segmentation, iscrowd=1)

    def measure(self, image_file: Path, owner: str | Path, entry: str,
                content: bytes | None = None) -> tuple[int, int] | None:
        """image_size, or None and an error naming `owner` (the label file) when the image is unreadable."""
        try:
            return image_size(image_file, content)
        except DatasetError as error:
            self.error(owner, entry, str(error))
            return None

    def result(self) -> dict:
        """The COCO dict of what could be converted; the errors and warnings are in `problems` (load_dataset
        raises on the errors, check-data lists them next to the statistics of this dict)."""
        return {"info": {"description": f"converted by tinyseg from {self.fmt}: {self.source}"},
                "images": self.images, "annotations": self.annotations, "categories": self.categories}


def rle_to_json(rle: dict) -> dict:
    counts = rle["counts"]
    return {"size": [int(v) for v in rle["size"]], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def mask_to_rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    return rle_to_json(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))))


def dilate(mask: np.ndarray) -> np.ndarray:
    """The mask grown by one pixel (4-neighbours): what 'touches' means for ignore regions."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown


def report(problems: list[Problem], sink: list[Problem] | None) -> None:
    """Warnings go to the caller's list (check-data prints them) or to the log."""
    if sink is not None:
        sink.extend(problems)
    else:
        for problem in problems:
            log.warning("%s", problem)
