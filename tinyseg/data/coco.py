"""Read and check COCO instance JSON: records per image, and the map between file ids and labels.

Every problem is reported with the file and the entry (`images[3] id=17`, `annotations[42] id=99`),
so a bad dataset is refused before the first training step, not hours later.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .rle import compressed_rle_counts

ERROR, WARNING = "error", "warning"
# labelme's class-list placeholders, not classes (its COCO export writes `_background_` as category 0).
PLACEHOLDER_CLASS_NAMES = ("__ignore__", "_background_")


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the file and the entries."""


@dataclass
class Problem:
    file: str
    entry: str
    message: str
    severity: str = ERROR

    def __str__(self) -> str:
        return f"{self.file}: {self.entry}: {self.message}"


@dataclass
class CategoryMap:
    """The file's category ids go in and come out; contiguous labels 1..K are used inside (0 = background)."""

    category_ids: list[int]
    names: list[str]

    def __post_init__(self) -> None:
        self._label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}

    @classmethod
    def from_categories(cls, categories: list[dict]) -> "CategoryMap":
        ordered = sorted(categories, key=lambda c: c["id"])
        return cls([int(c["id"]) for c in ordered], [str(c.get("name", c["id"])) for c in ordered])

    @property
    def num_classes(self) -> int:
        """Including the background class."""
        return len(self.category_ids) + 1

    def category_to_label(self, category_id: int) -> int:
        return self._label_of[int(category_id)]

    def label_to_category(self, label: int) -> int:
        return self.category_ids[int(label) - 1]

    def label_to_name(self, label: int) -> str:
        return self.names[int(label) - 1]

    def to_dict(self) -> dict[str, Any]:
        return {"category_ids": list(self.category_ids), "names": list(self.names)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "CategoryMap":
        return cls([int(i) for i in values["category_ids"]], [str(n) for n in values["names"]])

    def to_coco(self) -> list[dict]:
        return [{"id": cid, "name": name} for cid, name in zip(self.category_ids, self.names)]

    def check_same(self, other: "CategoryMap", path: str | Path, data_name: str) -> None:
        """A checkpoint (self, read from path) used with data of another class set is refused."""
        from ..runtime.checkpoint import CheckpointError

        if self.category_ids != other.category_ids or self.names != other.names:
            raise CheckpointError(
                f"{path} was trained on a different class set than {data_name}:\n"
                f"  checkpoint: {list(zip(self.category_ids, self.names))}\n"
                f"  data:       {list(zip(other.category_ids, other.names))}")


@dataclass
class ImageRecord:
    image_id: int
    file_name: str
    height: int
    width: int
    annotations: list[dict] = field(default_factory=list)

    @property
    def has_instances(self) -> bool:
        return any(not a.get("iscrowd", 0) for a in self.annotations)


@dataclass
class CocoData:
    path: str
    images: list[ImageRecord]
    categories: CategoryMap
    problems: list[Problem] = field(default_factory=list)
    image_dir: str = ""  # set when the data was converted from a format that knows its images (data/formats)

    def to_coco_dict(self, records: list[ImageRecord] | None = None) -> dict[str, Any]:
        """A COCO dict for evaluation (ground truth of the given records, or all)."""
        records = self.images if records is None else records
        images = [{"id": r.image_id, "file_name": r.file_name, "height": r.height, "width": r.width} for r in records]
        annotations = [dict(a) for r in records for a in r.annotations]
        return {"images": images, "annotations": annotations, "categories": self.categories.to_coco()}


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: not valid JSON: {error}") from None


def inspect_coco(path: str | Path, require_annotations: bool = True,
                 raw: dict | None = None) -> tuple[CocoData | None, list[Problem]]:
    """Parse and check a COCO file: the data as far as it could be read (None when its structure is
    unusable; the bad entries left out) and every problem found. `raw`: a COCO dict already converted
    in memory from `path` (data/formats), checked the same way."""
    name = str(path)
    raw = read_json(path) if raw is None else raw
    problems: list[Problem] = []
    if not isinstance(raw, dict):
        return None, [Problem(name, "top level", f"expected a JSON object, got {type(raw).__name__}")]
    for key in ("images", "categories") + (("annotations",) if require_annotations else ()):
        if not isinstance(raw.get(key), list):
            problems.append(Problem(name, key, "missing, or not a list"))
    if problems:
        return None, problems

    categories = _check_categories(name, raw["categories"], problems)
    images = _check_images(name, raw["images"], problems)
    by_id = {r.image_id: r for r in images}
    _check_annotations(name, raw.get("annotations") or [], by_id, set(categories), problems)
    _drop_unused_placeholders(name, categories, raw.get("annotations") or [], problems)
    category_map = CategoryMap.from_categories(list(categories.values()))
    if raw.get("annotations"):
        missing = categories_without_instances(category_map, images)
        if missing:
            problems.append(Problem(name, "categories", f"{len(missing)} of {len(categories)} categories have no"
                                    f" (non-crowd) instance, so a model trained on this file can never predict"
                                    f" them: {', '.join(missing)}", WARNING))
    return CocoData(name, images, category_map, problems), problems


def load_coco(path: str | Path, require_annotations: bool = True) -> CocoData:
    """Load a COCO file or raise DatasetError listing every error (warnings are kept on the result)."""
    data, problems = inspect_coco(path, require_annotations)
    if data is None or any(p.severity == ERROR for p in problems):
        raise DatasetError(format_problems(problems, f"{path} cannot be used"))
    return data


def categories_without_instances(categories: CategoryMap, records: list[ImageRecord]) -> list[str]:
    """'id name' of each category that no non-crowd annotation of the records uses."""
    used = {a["category_id"] for r in records for a in r.annotations if not a.get("iscrowd", 0)}
    return [f"{cid} {name}" for cid, name in zip(categories.category_ids, categories.names) if cid not in used]


def beyond_detection_cap(records: list[ImageRecord], max_detections: int) -> str:
    """What to tell when some image holds more (non-crowd) instances than prediction keeps per image; ""
    when none does. Nuclei micrographs hold up to 375: with COCO's 100 a quarter of such an image can
    never be found, and nothing else says so (COCO AP counts 100 detections an image, whatever is kept)."""
    counts = [sum(1 for a in r.annotations if not a.get("iscrowd", 0)) for r in records]
    dense = [i for i, count in enumerate(counts) if count > max_detections]
    if not dense:
        return ""
    densest = max(dense, key=lambda i: counts[i])  # the first of the densest
    most, lost = counts[densest], sum(counts[i] - max_detections for i in dense)
    enough = (most // 50 + 1) * 50  # above the count: duplicates and false positives take places too
    return (f"{len(dense)} image(s) hold more instances than prediction keeps (predict.max_detections="
            f"{max_detections} per image): {lost} instances in all can never be found, the most in image id="
            f"{records[densest].image_id} ({records[densest].file_name}, {most} instances). Set predict.max_detections="
            f"{enough} (tinyseg predict --max-detections {enough}; an exported model keeps the cap it was exported "
            f"with) to find them, at more time per image. AP does not change: COCO counts 100 detections an image.")


def format_problems(problems: list[Problem], headline: str, limit: int = 30) -> str:
    errors = [p for p in problems if p.severity == ERROR] or problems
    lines = [f"{headline}: {len(errors)} problem(s)"] + [f"  - {p}" for p in errors[:limit]]
    if len(errors) > limit:
        lines.append(f"  ... and {len(errors) - limit} more (run `tinyseg check-data` for the full list)")
    return "\n".join(lines)


def _check_categories(name: str, entries: list, problems: list[Problem]) -> dict[int, dict]:
    categories: dict[int, dict] = {}
    for index, entry in enumerate(entries):
        where = f"categories[{index}]"
        if not isinstance(entry, dict) or not _is_int(entry.get("id")):
            problems.append(Problem(name, where, "needs an integer 'id'"))
            continue
        if entry["id"] in categories:
            problems.append(Problem(name, f"{where} id={entry['id']}", "duplicate category id"))
        twins = [c for c, e in categories.items() if "name" in entry and e.get("name") == entry["name"]]
        if twins and twins[0] != entry["id"]:  # classes no one can tell apart, and one row per name in every table
            problems.append(Problem(name, f"{where} id={entry['id']}", f"name {entry['name']!r} is also category id"
                                    f" {twins[0]}'s: merge them, or rename one"))
        categories[int(entry["id"])] = entry
    if not categories and not problems:
        problems.append(Problem(name, "categories", "no categories defined"))
    return categories


def _drop_unused_placeholders(name: str, categories: dict[int, dict], annotations: list, problems: list) -> None:
    """A placeholder that no annotation uses would be trained as a class that never occurs."""
    used = {a.get("category_id") for a in annotations if isinstance(a, dict) and _is_int(a.get("category_id"))}
    unused = [c for c, entry in categories.items() if entry.get("name") in PLACEHOLDER_CLASS_NAMES and c not in used]
    for cid in unused if len(unused) < len(categories) else []:
        problems.append(Problem(name, f"categories id={cid}", f"{categories.pop(cid)['name']!r} is labelme's"
                                " placeholder, not a class; left out", WARNING))


def _check_images(name: str, entries: list, problems: list[Problem]) -> list[ImageRecord]:
    records, seen = [], set()
    for index, entry in enumerate(entries):
        where = f"images[{index}]"
        if not isinstance(entry, dict) or not _is_int(entry.get("id")):
            problems.append(Problem(name, where, "needs an integer 'id'"))
            continue
        where = f"{where} id={entry['id']}"
        file_name = entry.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            problems.append(Problem(name, where, "needs a 'file_name'"))
            continue
        if not is_safe_relative(file_name):
            problems.append(Problem(name, where, f"file_name '{file_name}' leaves the image folder (absolute or '..')"))
            continue
        height, width = entry.get("height"), entry.get("width")
        if not (_is_int(height) and _is_int(width) and height > 0 and width > 0):
            problems.append(Problem(name, where, f"needs positive integer height and width, got {height}x{width}"))
            continue
        if entry["id"] in seen:
            problems.append(Problem(name, where, "duplicate image id"))
            continue
        seen.add(entry["id"])
        records.append(ImageRecord(int(entry["id"]), file_name, int(height), int(width)))
    return records


def _check_annotations(name: str, entries: list, images: dict[int, ImageRecord], category_ids: set[int],
                       problems: list[Problem]) -> None:
    seen_ids = set()
    for index, entry in enumerate(entries):
        where = f"annotations[{index}]"
        if not isinstance(entry, dict):
            problems.append(Problem(name, where, "not an object"))
            continue
        kinds = _id_type_problems(entry, ("id", "image_id", "category_id"), optional=("id",))
        if kinds:
            problems.append(Problem(name, where, kinds))
            continue
        if entry.get("id") is not None:
            where = f"{where} id={entry['id']}"
            if entry["id"] in seen_ids:
                problems.append(Problem(name, where, "duplicate annotation id"))
                continue
            seen_ids.add(entry["id"])
        record = images.get(entry.get("image_id"))
        if record is None:
            problems.append(Problem(name, where, f"refers to unknown image_id {entry.get('image_id')!r}"))
            continue
        if entry.get("category_id") not in category_ids:
            problems.append(Problem(name, where, f"unknown category_id {entry.get('category_id')!r}"))
            continue
        clean = _check_annotation(name, where, entry, record, problems)
        if clean is not None:
            record.annotations.append(clean)


def _check_annotation(name: str, where: str, entry: dict, record: ImageRecord, problems: list[Problem]) -> dict | None:
    segmentation = entry.get("segmentation")
    message = _segmentation_problem(segmentation, record)
    if message == "empty":
        problems.append(Problem(name, where, "empty segmentation; annotation skipped", WARNING))
        return None
    if message:
        problems.append(Problem(name, where, message))
        return None
    bbox = entry.get("bbox")
    if bbox is not None:
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_finite(v) for v in bbox)):
            problems.append(Problem(name, where, f"bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}"))
            return None
        if bbox[2] <= 0 or bbox[3] <= 0:
            problems.append(Problem(name, where, f"zero-size or negative box {bbox} (w and h must be > 0)"))
            return None
        x, y, w, h = bbox
        if x < -1 or y < -1 or x + w > record.width + 1 or y + h > record.height + 1:
            problems.append(Problem(name, where, f"box {bbox} lies partly outside the {record.width}x{record.height}"
                                    " image; clipped (boxes are recomputed from the masks)", WARNING))
    clean = dict(entry)
    clean["iscrowd"] = int(bool(entry.get("iscrowd", 0)))
    clean.setdefault("id", None)
    return clean


def _segmentation_problem(segmentation: Any, record: ImageRecord) -> str | None:
    if segmentation is None or segmentation == [] or segmentation == {}:
        return "empty"
    if isinstance(segmentation, list):
        for part_index, part in enumerate(segmentation):
            if not isinstance(part, list) or not all(isinstance(v, (int, float)) for v in part):
                return f"polygon part {part_index} is not a list of numbers"
            if not all(math.isfinite(v) for v in part):
                return f"polygon part {part_index} has NaN or infinite coordinates"
            if len(part) % 2:
                return f"polygon part {part_index} has an odd number of coordinates ({len(part)})"
            if len(part) < 6:
                return f"polygon part {part_index} has fewer than 3 points ({len(part) // 2})"
        return None
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if not (isinstance(size, list) and len(size) == 2) or not isinstance(counts, (str, list)):
            return "RLE needs 'size' [h, w] and 'counts'"
        if list(size) != [record.height, record.width]:
            return f"RLE size {size} differs from the image's [height, width] [{record.height}, {record.width}]"
        if isinstance(counts, list):
            if not all(_is_int(c) and c >= 0 for c in counts):
                return "uncompressed RLE 'counts' must be a list of non-negative integers"
            total, kind = sum(counts), "uncompressed"
        else:
            decoded = compressed_rle_counts(counts)
            if decoded is None or any(c < 0 for c in decoded):
                return "compressed RLE 'counts' is not a valid COCO RLE string"
            total, kind = sum(decoded), "compressed"
        if total != record.height * record.width:
            return f"{kind} RLE counts sum to {total}, not h*w = {record.height * record.width}"
        return None
    return f"segmentation must be a polygon list or an RLE dict, got {type(segmentation).__name__}"


def _id_type_problems(entry: dict, keys: tuple[str, ...], optional: tuple[str, ...] = ()) -> str | None:
    """A message for the first id field that is not an integer (a list or dict id would crash later)."""
    for key in keys:
        value = entry.get(key)
        if value is None and key in optional:
            continue
        if not _is_int(value):
            return f"'{key}' must be an integer, got {type(value).__name__} {str(value)[:40]}"
    return None


def is_safe_relative(file_name: str) -> bool:
    path = Path(file_name)
    return not path.is_absolute() and ".." not in path.parts and not file_name.startswith(("/", "\\"))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
