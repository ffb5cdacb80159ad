"""PASCAL VOC instance PNGs to COCO: `SegmentationObject/` (one index per instance), `SegmentationClass/`
(the class index of each pixel), `JPEGImages/`, and the class names (`class_names.txt`, as labelme's VOC
export writes it, index order with 0 = background; without it, the 20 VOC classes).

255 is "void" (object borders, regions to ignore): it is left out of every mask, and each void region
becomes a crowd (ignore) annotation of the classes whose instances it touches, or of every class when it
touches none (an unlabelled object), so COCO evaluation neither rewards nor punishes detections there.
Masks are kept as compressed RLE.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..coco import DatasetError, Problem
from .common import CocoBuilder, absolute, dilate, find_image, mask_to_rle, read_class_names, read_text

VOID = 255
VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
NAME_FILES = ("class_names.txt", "labels.txt")
INDEX_MODES = ("P", "L", "I", "I;16")


def is_voc_folder(path: Path) -> bool:
    return (path / "SegmentationObject").is_dir()


def to_coco(src: str | Path, split: str = "") -> tuple[dict, Path, list[Problem]]:
    """(COCO dict of what could be read, JPEGImages folder, problems naming the PNG and object of the rest);
    `split` picks ImageSets/Segmentation/<split>.txt, default every PNG."""
    src = Path(src)
    objects, classes, photos = src / "SegmentationObject", src / "SegmentationClass", src / "JPEGImages"
    for folder in (objects, classes, photos):
        if not folder.is_dir():
            raise DatasetError(f"{src}: a VOC instance dataset needs {folder.name}/; folder not found")
    names = _class_names(src)
    builder = CocoBuilder(src, "voc", names)
    for stem in _stems(src, objects, split):
        _convert_image(stem, objects, classes, photos, names, builder)
    return builder.result(), absolute(photos), builder.problems


def _class_names(src: Path) -> list[str]:
    for name in NAME_FILES:
        if (src / name).is_file():
            return read_class_names(src / name)
    return list(VOC_CLASSES)


def _stems(src: Path, objects: Path, split: str) -> list[str]:
    if not split:
        return sorted(p.stem for p in objects.glob("*.png"))
    listing = src / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        raise DatasetError(f"{src}: no split '{split}' ({listing} not found)")
    return [line.strip() for line in read_text(listing).splitlines() if line.strip()]


def _index_png(path: Path, builder: CocoBuilder) -> np.ndarray | None:
    if not path.is_file():
        builder.error(path, "file", "not found")
        return None
    try:
        with Image.open(path) as picture:
            if picture.mode not in INDEX_MODES:
                builder.error(path, "file", f"a {picture.mode} PNG; VOC masks are palette (index) PNGs,"
                                            " one index per pixel")
                return None
            return np.asarray(picture).astype(np.int64)
    except (OSError, ValueError, SyntaxError) as error:
        builder.error(path, "file", f"cannot read the PNG ({error})")
        return None


def _convert_image(stem: str, objects: Path, classes: Path, photos: Path, names: list[str],
                   builder: CocoBuilder) -> None:
    object_png, class_png = objects / f"{stem}.png", classes / f"{stem}.png"
    photo = find_image(photos, stem)
    if photo is None:
        builder.error(object_png, "JPEGImages", f"no photo {stem}.jpg (or .png) in {photos}")
        return
    size = builder.measure(photo, object_png, "JPEGImages")
    if size is None:
        return
    width, height = size
    index, klass = _index_png(object_png, builder), _index_png(class_png, builder)
    if index is None or klass is None:
        return
    for path, array in ((object_png, index), (class_png, klass)):
        if array.shape != (height, width):
            builder.error(path, "size", f"the PNG is {array.shape[1]}x{array.shape[0]}, its photo {photo}"
                                        f" is {width}x{height}")
            return
    image = builder.add_image(photo.name, width, height)
    instances = []
    for value in np.unique(index):
        if value in (0, VOID):
            continue
        mask = (index == value) & (klass != VOID)
        found = [int(c) for c in np.unique(klass[mask]) if c != 0]
        where = f"object {value}"
        if len(found) != 1:
            message = "has no class in SegmentationClass (its pixels are background there)" if not found else \
                f"spans several classes in SegmentationClass: {found}"
            builder.error(object_png, where, message)
            continue
        if found[0] > len(names):
            builder.error(class_png, where, f"class index {found[0]} is past the {len(names)} class names")
            continue
        if builder.add(image, found[0], mask_to_rle(mask)) is not None:
            instances.append((found[0], mask))
    covered = np.zeros((height, width), dtype=bool)
    for _, mask in instances:
        covered |= mask
    void = ((index == VOID) | (klass == VOID)) & ~covered
    if void.any():
        regions, untouched = void_regions(void, instances)
        for category_id, region in regions.items():
            builder.add(image, category_id, mask_to_rle(region), iscrowd=1)
        if untouched.any():
            for category in builder.categories:
                builder.add(image, category["id"], mask_to_rle(untouched), iscrowd=1)


def void_regions(void: np.ndarray, instances: list[tuple[int, np.ndarray]]) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Per class, the void pixels connected (through void) to one of its instances; and the void touching none.

    One bit per class spreads through the void, one pixel per step, until nothing changes: a connected
    component labelling restricted to what touches an instance, in numpy.
    """
    categories = sorted({c for c, _ in instances})
    regions: dict[int, np.ndarray] = {}
    for start in range(0, len(categories), 63):
        chunk = categories[start:start + 63]
        bits = np.zeros(void.shape, dtype=np.uint64)
        for category_id, mask in instances:
            if category_id in chunk:
                bits[dilate(mask) & void] |= np.uint64(1 << chunk.index(category_id))
        while True:
            grown = bits.copy()
            grown[1:] |= bits[:-1]
            grown[:-1] |= bits[1:]
            grown[:, 1:] |= bits[:, :-1]
            grown[:, :-1] |= bits[:, 1:]
            grown[~void] = 0
            if np.array_equal(grown, bits):
                break
            bits = grown
        for position, category_id in enumerate(chunk):
            region = ((bits >> np.uint64(position)) & np.uint64(1)).astype(bool)
            if region.any():
                regions[category_id] = region
    touched = np.zeros(void.shape, dtype=bool)
    for region in regions.values():
        touched |= region
    return regions, void & ~touched
