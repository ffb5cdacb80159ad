"""A small real COCO dataset made on the spot: coloured shapes on textured backgrounds.

It is written as image files and COCO JSON exactly like a user's data, so the demo and the tests run
the whole pipeline (reading, checks, training, evaluation, submission) with no download.
Each shape's pixels are painted from its own decoded annotation, so image and mask agree exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from .rle import decode_mask

SHAPES = ("circle", "square", "triangle")


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[float]:
    corners = {"circle": 20, "square": 4, "triangle": 3}[kind]
    points = []
    for k in range(corners):
        theta = angle + 2 * math.pi * k / corners
        points += [cx + r * math.cos(theta), cy + r * math.sin(theta)]
    return [round(v, 1) for v in points]


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Noise, a colour gradient and stripes: texture the network has to learn to ignore."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(60, 200, size=3)
    gradient = (x / width)[..., None] * rng.uniform(-50, 50, size=3)
    period = rng.uniform(6, 20)
    stripes = (np.sin((x * math.cos(rng.uniform(0, math.pi)) + y) / period) * 18)[..., None]
    noise = rng.normal(0, 14, size=(height, width, 3))
    return np.clip(base + gradient + stripes + noise, 0, 255)


def make_image(rng: np.random.Generator, image_id: int, height: int, width: int, category_ids: list[int],
               max_shapes: int) -> tuple[np.ndarray, list[dict]]:
    from pycocotools import mask as mask_utils

    pixels = _background(rng, height, width)
    annotations: list[dict] = []
    occupied = np.zeros((height, width), dtype=bool)
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        label = int(rng.integers(len(SHAPES)))
        r = float(rng.uniform(0.12, 0.24) * min(height, width))
        cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
        polygon = _polygon(SHAPES[label], cx, cy, r, float(rng.uniform(0, 2 * math.pi)))
        rle = mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))
        mask = decode_mask(rle, height, width)
        if (mask & occupied).sum() > 0.05 * mask.sum():
            continue  # keep instances apart so polygons stay exact
        occupied |= mask
        colour = rng.uniform(0, 255, size=3)
        shade = rng.normal(0, 10, size=(height, width, 3))
        pixels[mask] = np.clip(colour + shade[mask], 0, 255)
        # Store circles as compressed RLE and the rest as polygons: both formats go through the reader.
        if SHAPES[label] == "circle":
            segmentation = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
        else:
            segmentation = [polygon]
        annotations.append({"image_id": image_id, "category_id": category_ids[label],
                            "segmentation": segmentation, "area": float(mask_utils.area(rle)),
                            "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0})
    return pixels.astype(np.uint8), annotations


def make_shapes_dataset(out_dir: str | Path, train_images: int = 48, val_images: int = 12, test_images: int = 12,
                        size: tuple[int, int] = (128, 160), category_ids: tuple[int, ...] = (1, 2, 3),
                        max_shapes: int = 3, seed: int = 0) -> dict[str, Path]:
    """Write images/, train.json, val.json, test.json (images only) and test_gt.json; return their paths."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    categories = [{"id": cid, "name": name, "supercategory": "shape"} for cid, name in zip(category_ids, SHAPES)]
    splits = {"train": train_images, "val": val_images, "test": test_images}
    paths, next_image, next_annotation = {}, 1, 1
    for split, count in splits.items():
        images, annotations = [], []
        for _ in range(count):
            # Alternate landscape and portrait so aspect-ratio grouping has two groups.
            height, width = size if next_image % 2 else size[::-1]
            pixels, found = make_image(rng, next_image, height, width, list(category_ids), max_shapes)
            file_name = f"{split}_{next_image:04d}.png"
            Image.fromarray(pixels).save(out / "images" / file_name)
            images.append({"id": next_image, "file_name": file_name, "height": height, "width": width})
            for annotation in found:
                annotations.append({"id": next_annotation, **annotation})
                next_annotation += 1
            next_image += 1
        full = {"images": images, "annotations": annotations, "categories": categories}
        name = "test_gt" if split == "test" else split
        paths[name] = out / f"{name}.json"
        paths[name].write_text(json.dumps(full))
        if split == "test":
            paths["test"] = out / "test.json"
            paths["test"].write_text(json.dumps({"images": images, "categories": categories}))
    paths["images"] = out / "images"
    return paths
