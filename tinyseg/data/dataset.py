"""Torch datasets: annotated images for training, and plain images for evaluation and prediction."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms.v2 import functional as F

from .coco import CategoryMap, ImageRecord
from .rle import decode_masks, segmentation_to_rle
from .images import DEFAULT_MAX_PIXELS, ImageLoadError, image_path, load_rgb
from .mosaic import Mosaic


class InstanceDataset(torch.utils.data.Dataset):
    """Images with instance targets (boxes, masks, contiguous labels) for training.

    Crowd regions are left out of the targets, as detectron2 does: the losses never see them, and
    evaluation treats them as COCO does. Masks are kept as compressed RLE once built (small in memory)
    and decoded in one call per image.
    """

    def __init__(self, records: list[ImageRecord], image_dir: str | Path, categories: CategoryMap,
                 transforms: Callable | None = None, copies: int = 1,
                 max_pixels: int = DEFAULT_MAX_PIXELS, seed: int = 0, mosaic: Mosaic | None = None):
        self.records = records
        self.seed = seed
        self.image_dir = Path(image_dir)
        self.categories = categories
        # (image, target, copy index) -> (image, target), e.g. augment.SampleTransform (a plain v2.Compose
        # takes no copy index: wrap it in SampleTransform). The copy index lets it treat the copies of one
        # image differently (flipped copies).
        self.transforms = transforms
        self.copies = max(1, copies)
        self.mosaic = mosaic
        self.max_pixels = max_pixels
        self._rle_cache: dict[int, list[dict]] = {}

    def __len__(self) -> int:
        return len(self.records) * self.copies

    def aspect_ratios(self) -> list[float]:
        return [r.width / r.height for r in self.records] * self.copies

    def record(self, index: int) -> ImageRecord:
        return self.records[index % len(self.records)]

    def instances(self, record: ImageRecord) -> list[dict]:
        return [a for a in record.annotations if not a.get("iscrowd", 0)]

    def rles(self, index: int) -> list[dict]:
        key = index % len(self.records)
        if key not in self._rle_cache:
            record = self.records[key]
            self._rle_cache[key] = [segmentation_to_rle(a["segmentation"], record.height, record.width)
                                    for a in self.instances(record)]
        return self._rle_cache[key]

    def cache_masks(self) -> None:
        """Build every image's RLEs now, in this process, so that loader workers inherit them
        instead of each worker converting the same polygons again."""
        for key in range(len(self.records)):
            self.rles(key)

    def __getitem__(self, key: int | tuple[int, int]):
        """key: an index, or (index, epoch) from TrainBatchSampler, which makes augmentation reproducible."""
        if isinstance(key, tuple):
            index, epoch = key
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
                return self._load(index)
        return self._load(key)

    def _load(self, index: int):
        partners = self.mosaic.partners(len(self)) if self.mosaic is not None else []
        if not partners:
            return self._transformed(index)
        image, target = self.mosaic([self._transformed(i) for i in [index, *partners]])
        return image, finalize_target(target)

    def _transformed(self, index: int):
        record = self.record(index)
        image = tv_tensors.Image(F.pil_to_tensor(load_rgb(image_path(self.image_dir, record.file_name),
                                                          self.max_pixels)))
        labels = [self.categories.category_to_label(a["category_id"]) for a in self.instances(record)]
        masks = torch.from_numpy(decode_masks(self.rles(index), record.height, record.width))
        target = {
            "masks": tv_tensors.Mask(masks),
            "boxes": tv_tensors.BoundingBoxes(_boxes_from_masks(masks), format="XYXY",
                                              canvas_size=(record.height, record.width)),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": record.image_id,
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target, index // len(self.records))
        return image, finalize_target(target)


def _boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    if masks.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    boxes = masks_to_boxes(masks)
    boxes[:, 2:] += 1  # pixel-inclusive extent -> box that covers the whole last pixel
    return boxes


def finalize_target(target: dict) -> dict:
    """Recompute boxes from the (transformed) masks and drop instances cut to nothing."""
    masks = target["masks"]
    masks = (masks.as_subclass(torch.Tensor) if isinstance(masks, tv_tensors.Mask) else masks).to(torch.uint8)
    keep = masks.flatten(1).any(dim=1).bool() if masks.shape[0] else torch.zeros(0, dtype=torch.bool)
    masks = masks[keep]
    return {
        "boxes": _boxes_from_masks(masks),
        "masks": masks,
        "labels": target["labels"][keep],
        "image_id": target["image_id"],
    }


class ImageListDataset(torch.utils.data.Dataset):
    """Images for prediction; an unreadable file yields an error entry instead of killing the run."""

    def __init__(self, entries: list[tuple[int, str]], image_dir: str | Path,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.entries = entries
        self.image_dir = Path(image_dir)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int):
        image_id, file_name = self.entries[index]
        meta = {"image_id": image_id, "file_name": file_name, "error": None}
        try:
            image = F.pil_to_tensor(load_rgb(image_path(self.image_dir, file_name), self.max_pixels))
        except ImageLoadError as error:
            return None, {**meta, "error": str(error)}
        meta["height"], meta["width"] = image.shape[-2:]
        return image, meta


def collate(batch):
    return tuple(zip(*batch))
