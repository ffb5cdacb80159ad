"""The submission file: write it atomically in the exact homework format, and check one against test.json."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..runtime.files import write_json

SUBMISSION_KEYS = ("image_id", "score", "category_id", "segmentation")


def submission_entries(results: list[dict]) -> list[dict]:
    """Only the four fields of the format, in a stable order (best score first per image)."""
    ordered = sorted(results, key=lambda r: (r["image_id"], -r["score"]))
    return [{key: r[key] for key in SUBMISSION_KEYS} for r in ordered]


def write_submission(path: str | Path, results: list[dict]) -> int:
    entries = submission_entries(results)
    write_json(path, entries)
    return len(entries)


def write_image_list(path: str | Path, entries: list[tuple[int, str]]) -> None:
    """The ids given to a folder's images (no images JSON named them): {"images": [{"id", "file_name"}]}."""
    write_json(path, {"images": [{"id": image_id, "file_name": name} for image_id, name in entries]})


def read_image_list(path: str | Path) -> Any:
    """A JSON file as it is (a test.json may hold images only), or labels in another format (a labelme or
    VOC folder, a YOLO YAML) converted to COCO's layout, as predict and evaluate read them."""
    from ..data.coco import read_json
    from .jobs import load_ground_truth

    if Path(path).suffix.lower() == ".json":
        return read_json(path)
    return load_ground_truth(str(path), require_annotations=False).to_coco_dict()


@dataclass
class SubmissionCheck:
    """What validating a submission found: its problems (none when valid), how many detections it holds,
    and whether category ids were checked (an image list without categories leaves them unchecked)."""

    problems: list[str]
    detections: int = 0
    categories_checked: bool = False


def validate_submission(submission_path: str | Path, images_json: str | Path,
                        categories_json: str | Path | None = None, limit: int = 50) -> list[str]:
    """Every problem found (empty when valid): schema, types, ids, and RLEs that decode to the image's size."""
    return check_submission(submission_path, images_json, categories_json, limit).problems


def check_submission(submission_path: str | Path, images_json: str | Path,
                     categories_json: str | Path | None = None, limit: int = 50) -> SubmissionCheck:
    """validate_submission's problems, with the detection count and whether categories could be checked."""
    from ..data.coco import DatasetError, read_json

    try:
        submission = read_json(submission_path)
        reference = read_image_list(images_json)
        category_source = read_image_list(categories_json) if categories_json else reference
    except DatasetError as error:
        return SubmissionCheck([str(error)])
    if not isinstance(submission, list):
        return SubmissionCheck(
            [f"{submission_path}: the top level must be a JSON list, got {type(submission).__name__}"])
    for path, value in ((images_json, reference), (categories_json, category_source)):
        if not isinstance(value, dict):
            what = '"images"' if value is reference else '"categories"'
            return SubmissionCheck(
                [f"{path}: the top level must be an object with an {what} list, got {type(value).__name__}"])
    images = {image["id"]: image for image in reference.get("images", []) if isinstance(image, dict)}
    category_ids = {c["id"] for c in category_source.get("categories", []) if isinstance(c, dict)}
    problems: list[str] = []
    for index, entry in enumerate(submission):
        problems += [f"entry {index}: {p}" for p in _entry_problems(entry, images, category_ids)]
        if len(problems) >= limit:
            problems.append(f"... stopped after {limit} problems")
            break
    return SubmissionCheck(problems, len(submission), bool(category_ids))


def _entry_problems(entry: Any, images: dict, category_ids: set) -> list[str]:
    from ..data.rle import decode_masks

    if not isinstance(entry, dict):
        return [f"not an object: {entry!r:.60}"]
    missing = [k for k in SUBMISSION_KEYS if k not in entry]
    if missing:
        return [f"missing {', '.join(missing)}"]
    problems = []
    image = images.get(entry["image_id"]) if isinstance(entry["image_id"], int) else None
    if image is None:
        problems.append(f"image_id {entry['image_id']!r} is not in the images file")
    if not isinstance(entry["category_id"], int) or (category_ids and entry["category_id"] not in category_ids):
        problems.append(f"category_id {entry['category_id']!r} is not a known category")
    score = entry["score"]
    if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
        problems.append(f"score {score!r} is not a finite number")
    segmentation = entry["segmentation"]
    if not (isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), str)
            and isinstance(segmentation.get("size"), list) and len(segmentation["size"]) == 2):
        return problems + ["segmentation must be {'size': [h, w], 'counts': str} (compressed RLE)"]
    # An image list that predict wrote (ids and names, no sizes) leaves the size unchecked; the RLE still decodes.
    if image is not None and "height" in image and segmentation["size"] != [image["height"], image.get("width")]:
        problems.append(f"RLE size {segmentation['size']} differs from image {entry['image_id']}'s"
                        f" [{image['height']}, {image.get('width')}]")
    try:
        decode_masks([{"size": segmentation["size"], "counts": segmentation["counts"].encode("ascii")}],
                     *segmentation["size"])
    except Exception as error:  # the RLE codec raises plain Exceptions on bad counts
        problems.append(f"RLE counts do not decode ({error})")
    return problems
