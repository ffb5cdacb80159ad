"""The label formats users bring, read as COCO in memory: labelme folders, YOLO segmentation datasets, VOC
instance PNGs (one module each, `to_coco(src, split) -> (coco_dict, image_dir, problems)`), and COCO itself,
including the quirk of CVAT's COCO export (brush masks written as crowds). `coco_to_yolo` (yolo_export.py)
goes back. Reading never writes into the dataset (labelme's embedded images: embedded.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ...config_rules import CHOICES
from ..coco import ERROR, WARNING, CocoData, DatasetError, Problem, format_problems, inspect_coco, read_json
from .common import report

log = logging.getLogger("tinyseg")
FORMATS = CHOICES[("data", "format")]
CROWD_RLE_ENTRY = "annotations (iscrowd RLE masks)"


def detect_format(path: str | Path) -> str:
    """coco, labelme, yolo or voc, from the layout: a .json file, a .yaml file, a folder of labelme JSONs,
    a folder with SegmentationObject/, or a folder with a data.yaml."""
    from .labelme import is_labelme_file
    from .voc import is_voc_folder

    path = Path(path)
    if path.is_file():  # any file but a YAML is read as COCO JSON (and named if it is not JSON)
        return "yolo" if path.suffix.lower() in (".yaml", ".yml") else "coco"
    if not path.is_dir():
        raise DatasetError(f"{path}: file or folder not found")
    if is_voc_folder(path):
        return "voc"
    if any(is_labelme_file(p) for p in sorted(path.rglob("*.json"))[:20]):
        return "labelme"
    if (path / "data.yaml").is_file() or len(list(path.glob("*.yaml")) + list(path.glob("*.yml"))) == 1:
        return "yolo"
    raise DatasetError(f"{path}: a folder that is neither a labelme folder (JSON files with 'shapes'), a VOC"
                       " folder (SegmentationObject/) nor a YOLO dataset (data.yaml)")


def resolve_format(path: str | Path, fmt: str = "auto") -> str:
    """The format to read `path` as: `fmt`, or when it is auto, the one its layout tells (detect_format)."""
    return detect_format(path) if fmt == "auto" else fmt


def convert_labels(src: str | Path, fmt: str = "auto", split: str = "") -> tuple[Any, Path | None, list[Problem]]:
    """(COCO dict of what could be converted, image folder, the conversion's problems); raises only when
    nothing can be read (no such folder, a YAML without names). The image folder is None for COCO input,
    whose images are wherever the user says."""
    from . import labelme, voc, yolo

    fmt = resolve_format(src, fmt)
    if fmt == "coco":
        return read_json(src), None, []
    modules = {"labelme": labelme, "yolo": yolo, "voc": voc}
    if fmt not in modules:
        raise DatasetError(f"{src}: unknown label format '{fmt}' (one of {', '.join(FORMATS)})")
    return modules[fmt].to_coco(src, split)


def to_coco(src: str | Path, fmt: str = "auto", split: str = "",
            problems: list[Problem] | None = None) -> tuple[Any, Path | None]:
    """(COCO dict, image folder) or DatasetError listing every error; warnings go to `problems`, or the log."""
    fmt = resolve_format(src, fmt)
    raw, image_dir, found = convert_labels(src, fmt, split)
    if any(p.severity == ERROR for p in found):
        raise DatasetError(format_problems(found, f"{src}: the {fmt} labels cannot be used"))
    report(found, problems)
    return raw, image_dir


def inspect_dataset(path: str | Path, require_annotations: bool = True, fmt: str = "auto", split: str = "",
                    crowd_rle_as_instances: bool = False) -> tuple[CocoData | None, list[Problem]]:
    """inspect_coco for any format: converted in memory, then checked like a COCO file. Like inspect_coco,
    it returns what could be read and every problem (check-data prints both); load_dataset raises."""
    raw, image_dir, converted = convert_labels(path, fmt, split)
    if isinstance(raw, dict) and isinstance(raw.get("annotations"), list):
        if crowd_rle_as_instances:
            changed = crowd_rle_to_instances(raw["annotations"])
            log.info("%s: %d iscrowd RLE masks read as instances (data.crowd_rle_as_instances)", path, changed)
        converted += crowd_rle_warning(str(path), raw["annotations"])
    data, problems = inspect_coco(path, require_annotations, raw=raw)
    problems = converted + problems
    if data is not None:
        data.problems = problems
        data.image_dir = str(image_dir) if image_dir is not None else ""
    return data, problems


def load_dataset(path: str | Path, require_annotations: bool = True, fmt: str = "auto", split: str = "",
                 crowd_rle_as_instances: bool = False) -> CocoData:
    """load_coco for any format; DatasetError listing every error (warnings kept on the result)."""
    data, problems = inspect_dataset(path, require_annotations, fmt, split, crowd_rle_as_instances)
    if data is None or any(p.severity == ERROR for p in problems):
        raise DatasetError(format_problems(problems, f"{path} cannot be used"))
    return data


def has_separate_val(path: str | Path, fmt: str = "auto") -> bool:
    """A YOLO dataset YAML with its own val split: trained on `train`, validated on `val`."""
    from .yolo import has_separate_val as yolo_has_val

    try:
        return resolve_format(path, fmt) == "yolo" and yolo_has_val(path)
    except DatasetError:
        return False


def val_split(path: str | Path, fmt: str = "auto") -> str:
    """The split to read for validation: a YOLO dataset YAML's `val`; other formats hold one set."""
    try:
        return "val" if resolve_format(path, fmt) == "yolo" else ""
    except DatasetError:
        return ""


def unused_image_dir(path: str | Path, fmt: str, own: str | Path, given: str | Path) -> list[Problem]:
    """labelme, YOLO and VOC labels name their own images: an image folder given besides them is not read."""
    if not own or not given or Path(own).resolve() == Path(given).resolve():
        return []
    return [Problem(str(path), "image folder", f"{fmt} labels name their own images (in {own}); the image folder"
                    f" {given} is not used", WARNING)]


def crowd_rle_warning(name: str, entries: list) -> list[Problem]:
    """CVAT's COCO export writes every mask drawn with its brush as an RLE with iscrowd=1, which training and
    evaluation ignore. COCO's own convention (polygon objects, RLE crowds) is left alone: the warning needs
    every RLE to be a crowd and either no other instance in the file or CVAT's `attributes.occluded`."""
    rles = [a for a in entries if isinstance(a, dict) and isinstance(a.get("segmentation"), dict)]
    crowds = [a for a in rles if a.get("iscrowd")]
    if not crowds or len(crowds) < len(rles):
        return []
    instances = sum(1 for a in entries if isinstance(a, dict) and not a.get("iscrowd"))
    cvat = any(isinstance(a.get("attributes"), dict) and "occluded" in a["attributes"] for a in crowds)
    if instances and not cvat:
        return []
    return [Problem(name, CROWD_RLE_ENTRY, f"all {len(crowds)} RLE masks are iscrowd=1, so training and evaluation"
                    " ignore them (CVAT writes every brush mask this way); if they are objects, set"
                    " data.crowd_rle_as_instances=true, or rewrite the file with `tinyseg convert FILE"
                    " --crowd-rle-as-instances --output FIXED.json`", WARNING)]


def crowd_rle_to_instances(entries: list) -> int:
    """Make every iscrowd=1 RLE annotation an instance (in place); how many were changed."""
    changed = 0
    for entry in entries:
        if isinstance(entry, dict) and entry.get("iscrowd") and isinstance(entry.get("segmentation"), dict):
            entry["iscrowd"], changed = 0, changed + 1
    return changed
