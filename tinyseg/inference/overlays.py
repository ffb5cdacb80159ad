"""PNG overlays of masks, boxes, class names and scores, for predictions or ground truth."""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..data.rle import decode_mask, segmentation_to_rle
from ..data.images import image_path, load_rgb
from ..runtime.files import atomic_write


def _colour(index: int) -> tuple[int, int, int]:
    import matplotlib

    r, g, b, _ = matplotlib.colormaps["tab20"](index % 20)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_instances(image: Image.Image, instances: list[dict], names: dict[int, str], alpha: float = 0.45) -> Image.Image:
    """Instances carry 'segmentation' (polygon or RLE), 'category_id' and optionally 'score'."""
    from pycocotools import mask as mask_utils

    canvas = np.asarray(image, dtype=np.float32).copy()
    boxes = []
    for index, instance in enumerate(instances):
        rle = segmentation_to_rle(instance["segmentation"], image.height, image.width)
        mask = decode_mask(rle, image.height, image.width)
        colour = np.array(_colour(index), dtype=np.float32)
        canvas[mask] = canvas[mask] * (1 - alpha) + colour * alpha
        x, y, w, h = mask_utils.toBbox(rle).tolist()
        label = names.get(instance["category_id"], str(instance["category_id"]))
        if "score" in instance:
            label += f" {instance['score']:.2f}"
        boxes.append(((x, y, x + w, y + h), label, _colour(index)))
    result = Image.fromarray(canvas.astype(np.uint8))
    draw = ImageDraw.Draw(result)
    for box, label, colour in boxes:
        draw.rectangle(box, outline=colour, width=2)
        draw.text((box[0] + 2, max(0, box[1] - 11)), label, fill=colour)
    return result


def save_png(image: Image.Image, path: Path) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write(path, lambda out: out.write(buffer.getvalue()))


def write_overlays(images: list[dict], instances: list[dict], categories: list[dict], image_dir: str | Path,
                   output_dir: str | Path, score_thresh: float, limit: int | None = None) -> list[Path]:
    """One PNG per image; instances under score_thresh are left out (ground truth has no score)."""
    names = {c["id"]: c.get("name", str(c["id"])) for c in categories}
    by_image = defaultdict(list)
    for instance in instances:
        if instance.get("score", 1.0) >= score_thresh:
            by_image[instance["image_id"]].append(instance)
    written = []
    for image in images[:limit]:
        picture = load_rgb(image_path(image_dir, image["file_name"]))
        path = Path(output_dir) / f"{Path(image['file_name']).stem}.png"
        save_png(draw_instances(picture, by_image[image["id"]], names), path)
        written.append(path)
    return written
