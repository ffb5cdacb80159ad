"""`tinyseg convert`: labels in any format tinyseg reads to a COCO file, or to a YOLO segmentation dataset."""

from __future__ import annotations

from pathlib import Path

from ...runtime.files import write_json
from .embedded import is_cached, mirror


def convert(src: str, output: str, fmt: str = "auto", to: str = "coco", image_dir: str = "", split: str = "",
            crowd_rle_as_instances: bool = False) -> str:
    """Write the converted labels; returns the one-line summary."""
    from . import load_dataset

    if to == "yolo":
        from .yolo_export import coco_to_yolo

        counts = coco_to_yolo(src, image_dir or None, output, fmt, crowd_rle_as_instances, split)
        return (f"wrote {output}: {counts['images']} images, {counts['instances']} instances,"
                f" {counts['categories']} categories (data.yaml, labels/, images/ linked to the originals)")
    data = load_dataset(src, fmt=fmt, split=split, crowd_rle_as_instances=crowd_rle_as_instances)
    folder = data.image_dir or image_dir
    if data.image_dir and is_cached(data.image_dir):
        # labelme images only embedded in their JSON: decoded next to the output, never into the source
        folder = str(Path(output).with_name(f"{Path(output).stem}_images"))
        mirror(data.image_dir, folder)
    coco = data.to_coco_dict()
    write_json(output, coco)
    crowds = sum(1 for a in coco["annotations"] if a.get("iscrowd"))
    where = f"; images in {folder} (its --image-dir)" if folder else ""
    return (f"wrote {output}: {len(coco['images'])} images, {len(coco['annotations']) - crowds} instances"
            f" (+{crowds} crowd regions), {len(coco['categories'])} categories{where}")
