"""Run a model over images and turn its outputs into COCO results with the file's category ids."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..config import Config, PredictConfig, TrainConfig, config_from_dict
from ..config_rules import check_predict
from ..data.coco import CategoryMap
from ..data.dataset import ImageListDataset, collate
from ..runtime.checkpoint import load_checkpoint
from ..runtime.precision import resolve_amp, resolve_device
from ..model import build_model, prepare_for_inference
from .masks import encode_masks, paste_masks_binary, paste_merged_binary
from .tta import tta_forward


@dataclass
class LoadedModel:
    model: nn.Module
    categories: CategoryMap
    config: Config
    device: torch.device


def load_model(checkpoint: str, device: str = TrainConfig.device, predict_overrides: dict | None = None,
               amp: str | None = None) -> LoadedModel:
    """A model ready for inference from a tinyseg checkpoint (EMA weights when the run kept them).

    predict_overrides: PredictConfig fields to change from the run's settings; None values are ignored.
    """
    state = load_checkpoint(checkpoint)
    config = config_from_dict(state["config"])
    for name, value in (predict_overrides or {}).items():
        if value is not None:
            setattr(config.predict, name, value)
    check_predict(config.predict)
    categories = CategoryMap.from_dict(state["categories"])
    # The checkpoint holds every weight: the run's architecture (model.init decides its norm and layout),
    # built without downloading or reading any pretrained weights.
    return build_for_inference(config, categories, device, amp, state.get("ema") or state["model"])


def build_for_inference(config: Config, categories: CategoryMap, device: str = TrainConfig.device,
                        amp: str | None = None, weights: dict | None = None) -> LoadedModel:
    """config's model in eval mode on `device`, ready for inference; weights: a state dict, None = as built."""
    model = build_model(config.model, categories.num_classes, load_weights=False, test=config.input,
                        predict=config.predict)
    if weights is not None:
        model.load_state_dict(weights)
    target = resolve_device(device)
    model.to(target).eval()
    # channels_last for frozen-BN models; GroupNorm models skip it on CPU (model/for_inference.py).
    prepare_for_inference(model, resolve_amp(amp or config.train.amp, target), config.train.channels_last)
    return LoadedModel(model, categories, config, target)


@contextmanager
def mask_probs_output(model: nn.Module, enabled: bool = True):
    """Inside, inference outputs the mask head's small "mask_probs" for binary_masks to paste, instead
    of torchvision's full-size float masks (100 of them at 1000 x 1000 px are 400 MB)."""
    model.transform.paste_masks = not enabled
    try:
        yield model
    finally:
        model.transform.paste_masks = True


def binary_masks(output: dict, mask_thresh: float, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """One image's masks as (H, W, N) uint8 in Fortran order: "mask_probs" pasted at image_size (H, W)
    (mixed by "mask_weights" after TTA), or torchvision's full-size "masks" (N, 1, H, W) thresholded."""
    if "mask_weights" in output:
        return paste_merged_binary(output["mask_probs"], output["mask_boxes"], output["mask_weights"], *image_size,
                                   mask_thresh)
    if "mask_probs" in output:
        return paste_masks_binary(output["mask_probs"], output["boxes"], *image_size, mask_thresh)
    return np.asfortranarray((output["masks"][:, 0] >= mask_thresh).cpu().numpy().transpose(1, 2, 0).astype(np.uint8))


def to_coco_results(output: dict, image_id: int, categories: CategoryMap, mask_thresh: float,
                    image_size: tuple[int, int] | None = None) -> list[dict]:
    """COCO results for one image's output: full-size "masks", or "mask_probs" pasted at image_size (H, W)."""
    rles = encode_masks(binary_masks(output, mask_thresh, image_size), channels_last=True)
    boxes = output["boxes"].float().cpu()
    boxes[:, 2:] -= boxes[:, :2]
    results = []
    for rle, box, score, label in zip(rles, boxes.tolist(), output["scores"].tolist(), output["labels"].tolist()):
        results.append({"image_id": int(image_id), "score": round(float(score), 5),
                        "category_id": categories.label_to_category(label),
                        "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"]},
                        "bbox": [round(v, 2) for v in box]})
    return results


@dataclass
class Predictions:
    results: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    image_ids: list[int] = field(default_factory=list)


@torch.no_grad()
def predict_images(model: nn.Module, dataset: ImageListDataset, categories: CategoryMap, device: torch.device,
                   mask_thresh: float, batch_size: int = PredictConfig.batch_size, num_workers: int = 0, indices: list[int] | None = None,
                   progress: bool = True, tta: PredictConfig | None = None, paste_full: bool = False) -> Predictions:
    """Detections for the dataset's images (or a subset); unreadable images are reported, not fatal.

    paste_full: paste masks the torchvision way (full-size float masks, thresholded after; not under TTA), only to
    measure what binary pasting saves (benchmarks/speedups.py).
    """
    subset = dataset if indices is None else torch.utils.data.Subset(dataset, indices)
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=collate, pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    use_tta = tta is not None and tta.tta
    found = Predictions()
    try:
        with mask_probs_output(model, enabled=not paste_full):
            for images, metas in tqdm(loader, desc="predict", disable=not progress, leave=False):
                readable = [(image, meta) for image, meta in zip(images, metas) if image is not None]
                found.errors += [meta["error"] for meta in metas if meta["error"]]
                if not readable:
                    continue
                batch = [image.to(device, non_blocking=True).float().div_(255) for image, _ in readable]
                if use_tta:
                    outputs = tta_forward(model, batch, tta.tta_scales, True, tta.nms_thresh, tta.max_detections)
                else:
                    outputs = model(batch)
                for output, (_, meta) in zip(outputs, readable):
                    found.results += to_coco_results(output, meta["image_id"], categories, mask_thresh,
                                                     (meta["height"], meta["width"]))
                    found.image_ids.append(meta["image_id"])
    finally:
        model.train(was_training)
    return found
