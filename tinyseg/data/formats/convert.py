"""`tinyseg convert`: labels in any format tinyseg reads to a COCO file, or to a YOLO segmentation dataset."""

from __future__ import annotations


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
    from ...inference.submission import write_json

    coco = data.to_coco_dict()
    write_json(output, coco)
    crowds = sum(1 for a in coco["annotations"] if a.get("iscrowd"))
    folder = data.image_dir or image_dir
    where = f"; images in {folder} (its --image-dir)" if folder else ""
    return (f"wrote {output}: {len(coco['images'])} images, {len(coco['annotations']) - crowds} instances"
            f" (+{crowds} crowd regions), {len(coco['categories'])} categories{where}")


def labels_image_dir(path: str, fmt: str = "auto") -> str:
    """The image folder that labels in another format bring ('' for COCO, whose images are given apart)."""
    from . import detect_format, load_dataset, val_split

    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "coco":
        return ""
    return load_dataset(path, require_annotations=False, fmt=fmt, split=val_split(path, fmt)).image_dir

