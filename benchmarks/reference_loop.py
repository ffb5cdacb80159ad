"""THE REFERENCE: the torchvision-tutorial loop the homework solution used, re-implemented faithfully.

Kept only to measure tinyseg against it (benchmarks/throughput.py). Its traits, on purpose:
- a Python Dataset that opens the image and decodes every mask with pycocotools on every access;
- images resized inside the model to an 800 px short side, fp32, batch 2, no AMP, no channels_last;
- DataLoader with the tutorial's settings (no persistent workers, no pinned memory);
- inference one image at a time, then one RLE encode per mask and a plain json.dump.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO


class TutorialDataset(torch.utils.data.Dataset):
    def __init__(self, json_path: str, image_dir: str, train: bool = True):
        self.coco = COCO(json_path)
        self.ids = [i for i in sorted(self.coco.imgs) if self.coco.getAnnIds(imgIds=i, iscrowd=False)]
        self.image_dir = Path(image_dir)
        self.train = train
        self.category_to_label = {c: i + 1 for i, c in enumerate(sorted(self.coco.cats))}

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        image = Image.open(self.image_dir / info["file_name"]).convert("RGB")
        annotations = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id, iscrowd=False))
        masks = np.stack([self.coco.annToMask(a) for a in annotations])  # decoded on every access
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                 for a in annotations]
        target = {"boxes": torch.as_tensor(boxes, dtype=torch.float32),
                  "labels": torch.as_tensor([self.category_to_label[a["category_id"]] for a in annotations]),
                  "masks": torch.as_tensor(masks, dtype=torch.uint8), "image_id": torch.tensor([image_id])}
        tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        if self.train and torch.rand(()) < 0.5:
            tensor = tensor.flip(-1)
            target["masks"] = target["masks"].flip(-1)
            width = tensor.shape[-1]
            target["boxes"][:, [0, 2]] = width - target["boxes"][:, [2, 0]]
        return tensor, target


def _autocast(device: str, amp: torch.dtype | None):
    return torch.autocast(torch.device(device).type, dtype=amp) if amp is not None else contextlib.nullcontext()


def collate(batch):
    return tuple(zip(*batch))


def train_steps(model, loader, optimizer, steps: int, device: str = "cpu", amp: torch.dtype | None = None,
                scaler: torch.amp.GradScaler | None = None) -> int:
    """The tutorial's train_one_epoch inner loop, for a number of steps; returns images seen.

    amp: the whole model and losses under autocast, with a GradScaler for fp16, as torchvision's
    detection reference scripts do with --amp (the tutorial itself is fp32). Only for comparing with
    tinyseg's AMP on a GPU ("AMP on both sides").
    """
    model.train()
    seen = 0
    for step, (images, targets) in enumerate(loader):
        if step >= steps:
            break
        images = [image.to(device) for image in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        with _autocast(device, amp):
            losses = model(images, targets)
            loss = sum(losses.values())
        optimizer.zero_grad()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        seen += len(images)
    return seen


@torch.no_grad()
def predict_to_file(model, entries: list[tuple[int, str]], image_dir: str, output: str, mask_thresh: float = 0.5,
                    category_ids: list[int] | None = None, device: str = "cpu", amp: torch.dtype | None = None) -> int:
    """One image at a time, one encode per mask, json.dump: the reference's submission writer (amp: the
    forward under autocast, outputs back to fp32)."""
    model.eval()
    results = []
    for image_id, file_name in entries:
        image = Image.open(Path(image_dir) / file_name).convert("RGB")
        tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        with _autocast(device, amp):
            raw = model([tensor.to(device)])[0]
        output_ = {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in raw.items()}
        masks = output_["masks"].numpy()
        for k in range(len(output_["scores"])):
            binary = (masks[k, 0] > mask_thresh).astype(np.uint8)
            rle = mask_utils.encode(np.asfortranarray(binary))
            rle["counts"] = rle["counts"].decode("ascii")
            label = int(output_["labels"][k])
            results.append({"image_id": int(image_id), "score": float(output_["scores"][k]),
                            "category_id": category_ids[label - 1] if category_ids else label,
                            "segmentation": rle})
    with open(output, "w") as handle:
        json.dump(results, handle)
    return len(results)
