"""YOLO's mosaic (YOLOv4; Ultralytics trains with it by default): four training images in one."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F


@dataclass
class Mosaic:
    """With `probability` per sample, four transformed training images meet at a random centre of a canvas twice
    the size of the first, and a window about the canvas centre, zoomed by a factor drawn from `scale`, becomes
    the training image at the first image's size: zoom 1 shows a random part of each, zoom 0.5 the whole canvas.
    The model's step then sees more instances, in more contexts and at more scales, for the cost of one image;
    the loader's work is four images. Instances left with under `min_visible` of their zoomed area are dropped,
    as Ultralytics drops boxes cut to under a tenth. Partners are drawn uniformly (repeat factors apply to the
    sampled image only). Draws come from the global RNG, which the dataset seeds per sample."""

    probability: float
    scale: tuple[float, float] = (0.5, 1.5)
    min_visible: float = 0.1

    def partners(self, dataset_size: int) -> list[int]:
        """The three other images of this sample's mosaic, or none: the sample stays one image."""
        if self.probability <= 0 or torch.rand(()).item() >= self.probability:
            return []
        return torch.randint(dataset_size, (3,)).tolist()

    def __call__(self, samples: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, dict]:
        centre = (0.5 + torch.rand(2)).tolist()
        low, high = self.scale
        return self.compose(samples, centre, low + (high - low) * torch.rand(()).item())

    def compose(self, samples: list[tuple[torch.Tensor, dict]], centre: list[float],
                zoom: float) -> tuple[torch.Tensor, dict]:
        """The mosaic for a centre (y, x) in units of the first image's size, each in [0.5, 1.5], and a zoom.
        The target's boxes are left to the caller (the dataset's finalize_target)."""
        image = samples[0][0]
        height, width = image.shape[-2:]
        # The window is (height, width) / zoom about the canvas centre (height, width); a canvas point p lands
        # at (p - window start) * zoom in the output.
        top, left = height * (1 - 0.5 / zoom), width * (1 - 0.5 / zoom)
        fill = 114 / 255 if image.is_floating_point() else 114  # Ultralytics' grey
        canvas = torch.full((image.shape[0], height, width), fill, dtype=image.dtype)
        masks, labels = [torch.zeros((0, height, width), dtype=torch.uint8)], [torch.zeros(0, dtype=torch.int64)]
        for corner, (piece, target) in enumerate(samples):
            h, w = piece.shape[-2:]
            # corners 0..3: the image's bottom-right, bottom-left, top-right, top-left corner at the centre
            y0 = centre[0] * height - (h if corner < 2 else 0)
            x0 = centre[1] * width - (w if corner % 2 == 0 else 0)
            size = (max(1, round(h * zoom)), max(1, round(w * zoom)))
            at = (round((y0 - top) * zoom), round((x0 - left) * zoom))
            rows, cols = _overlap(at[0], size[0], height), _overlap(at[1], size[1], width)
            if rows is None or cols is None:
                continue
            # The whole piece is resized, then cut: a cut first would round the scale of a thin edge piece.
            shown = (slice(rows[0] - at[0], rows[1] - at[0]), slice(cols[0] - at[1], cols[1] - at[1]))
            canvas[:, slice(*rows), slice(*cols)] = F.resize(piece, list(size), antialias=True)[(slice(None), *shown)]
            resized = (F.resize(target["masks"], list(size), interpolation=InterpolationMode.NEAREST)
                       if len(target["masks"]) else target["masks"].new_zeros((0, *size)))
            cut = resized[(slice(None), *shown)]
            visible = cut.flatten(1).sum(dim=1) >= self.min_visible * resized.flatten(1).sum(dim=1)
            sheet = torch.zeros((int(visible.sum()), height, width), dtype=torch.uint8)
            sheet[:, slice(*rows), slice(*cols)] = cut[visible]
            masks.append(sheet)
            labels.append(target["labels"][visible])
        return canvas, {"masks": torch.cat(masks), "labels": torch.cat(labels), "image_id": samples[0][1]["image_id"]}


def _overlap(start: int, length: int, size: int) -> tuple[int, int] | None:
    """[start, start + length) within [0, size), or None where they do not meet."""
    low, high = max(0, start), min(size, start + length)
    return (low, high) if high > low else None
