"""The Python API: what the CLI does, callable from your own code.

    from tinyseg import Predictor
    predictor = Predictor("runs/voc/best.pt", device="cpu")
    for instance in predictor("photo.jpg"):
        print(instance.category_name, instance.score, instance.box, instance.mask.sum())
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .config import Config, TrainConfig, apply_override, load_config, validate
from .data.images import load_rgb, to_rgb

ImageInput = Union[str, Path, Image.Image, np.ndarray]
# ["solver.lr=0.01", ...], one such string, or {"solver.lr": 0.01, "model.backbone": "resnet18"}
Overrides = Union[Sequence[str], str, dict[str, Any], None]


@dataclass
class Instance:
    """One detected object, in the pixels of the input image."""

    mask: np.ndarray  # (H, W) bool
    box: tuple[float, float, float, float]  # x1, y1, x2, y2
    score: float
    category_id: int  # the training file's id
    category_name: str


class Predictor:
    """A trained model for inference on single images or batches.

    Args:
        checkpoint: a tinyseg checkpoint (`best.pt` or `last.pt` of a run).
        device: "cpu", "cuda", "cuda:N" or "auto".
        score_thresh, mask_thresh, max_detections, tta: override the run's prediction settings
            (tta: horizontal flip plus `predict.tta_scales`, merged by NMS with mask voting).
    """

    def __init__(self, checkpoint: str | Path, device: str = TrainConfig.device, score_thresh: float | None = None,
                 mask_thresh: float | None = None, max_detections: int | None = None, tta: bool | None = None):
        from .inference.predictor import load_model

        self.loaded = load_model(str(checkpoint), device, {"score_thresh": score_thresh, "mask_thresh": mask_thresh,
                                                           "max_detections": max_detections, "tta": tta})
        self.categories = self.loaded.categories

    def __call__(self, image: ImageInput) -> list[Instance]:
        """Instances found in one image: a path, a PIL image, or an (H, W[, C]) uint8 array in RGB."""
        return self.predict_batch([image])[0]

    @torch.no_grad()
    def predict_batch(self, images: Sequence[ImageInput]) -> list[list[Instance]]:
        """Instances for each image, in order; the images go through the network as one batch."""
        from .inference.predictor import mask_probs_output
        from .inference.tta import tta_forward

        if isinstance(images, (str, Path, Image.Image)) or (isinstance(images, np.ndarray) and images.ndim < 4):
            raise TypeError(f"predict_batch takes a list of images, got one {type(images).__name__}: predictor(image)"
                            " predicts one image")
        if not len(images):
            return []
        tensors = [_to_tensor(image).to(self.loaded.device) for image in images]
        model, p = self.loaded.model, self.loaded.config.predict
        if p.tta:
            outputs = tta_forward(model, tensors, p.tta_scales, True, p.nms_thresh, p.max_detections)
        else:
            with mask_probs_output(model):
                outputs = model(tensors)
        return [self._instances(output, p.mask_thresh, tuple(tensor.shape[-2:]))
                for output, tensor in zip(outputs, tensors)]

    def _instances(self, output: dict[str, torch.Tensor], mask_thresh: float,
                   image_size: tuple[int, int]) -> list[Instance]:
        from .inference.predictor import binary_masks

        masks = binary_masks(output, mask_thresh, image_size)  # (H, W, N) uint8
        found = []
        for index, (box, score, label) in enumerate(zip(output["boxes"].tolist(), output["scores"].tolist(),
                                                        output["labels"].tolist())):
            found.append(Instance(np.ascontiguousarray(masks[:, :, index], dtype=bool), tuple(box), float(score),
                                  self.categories.label_to_category(label), self.categories.label_to_name(label)))
        return found


def _to_tensor(image: ImageInput) -> torch.Tensor:
    if isinstance(image, (str, Path)):
        picture = load_rgb(image)
    elif isinstance(image, Image.Image):
        picture = to_rgb(image)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8:  # PIL's "Cannot handle this data type" did not say what to do
            raise TypeError(f"expected an (H, W[, 3]) uint8 array (0-255), got {image.dtype}: for floats in [0, 1],"
                            " pass (image * 255).round().astype(np.uint8)")
        picture = to_rgb(Image.fromarray(image))
    else:
        raise TypeError(f"expected a path, a PIL image or a numpy array, got {type(image).__name__}")
    array = np.asarray(picture, dtype=np.uint8)
    if not array.size:  # a ZeroDivisionError deep in the resize, before
        raise ValueError(f"an empty image ({array.shape[1]}x{array.shape[0]} pixels)")
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)


def train(config: Config | str | None = None, overrides: Overrides = None, resume: bool = False) -> dict[str, Any]:
    """Train like `tinyseg train`: a Config, or a preset name / YAML path (None: the `default` preset) plus
    `section.key=value` overrides (resume=True without a config goes on with the run's own config.yaml in
    train.output_dir).

    Returns {"best": metrics of the best epoch, "epochs", "iterations", "run_dir", "seconds"}; with
    data.folds > 0 it cross-validates as `tinyseg train --folds K` does and returns `cross_validate`'s summary.
    """
    from .training.trainer import train as run_training

    config = _configured(config, overrides, resume)
    if config.data.folds:
        return cross_validate(config, resume=resume)
    return run_training(config, resume=resume)


def _override_items(overrides: Overrides) -> list[str]:
    """`section.key=value` strings; one string was taken letter by letter before ("override 's' is not ...")."""
    if isinstance(overrides, str):
        return [overrides]
    if isinstance(overrides, dict):
        return [f"{key}={json.dumps(str(value) if isinstance(value, Path) else value)}"
                for key, value in overrides.items()]
    return list(overrides or [])


def _configured(config: Config | str | None, overrides: Overrides, resume: bool = False) -> Config:
    """A preset name or YAML path loaded (None: the `default` preset, as `tinyseg train` without --config;
    None with resume: the run's own config.yaml, as `--resume`), or a copy of a Config, with the overrides
    applied to any of them."""
    if config is None and resume:
        from .training.resume import resume_config

        return resume_config(_override_items(overrides))
    if not isinstance(config, Config):
        return load_config(config or "default", _override_items(overrides))
    config = copy.deepcopy(config)  # the caller's Config stays as given
    for item in _override_items(overrides):
        apply_override(config, item)
    validate(config)
    return config


def cross_validate(config: Config | str | None = None, overrides: Overrides = None, folds: int | None = None,
                   resume: bool = False) -> dict[str, Any]:
    """k-fold cross-validation like `tinyseg train --folds K` (folds=None keeps the config's data.folds).

    Returns cv_summary.json's content: "per_fold" (each fold's segm/bbox AP50 and AP, its val image ids and
    run directory), "mean", "std" (sample, K - 1), "min", "max" per metric, and "folds" (K). Under torchrun,
    ranks other than 0 get None.
    """
    from .training.cross_validation import cross_validate as run_cv

    config = _configured(config, _override_items(overrides) + ([f"data.folds={folds}"] if folds is not None else []),
                         resume)
    if config.data.folds < 2:
        from .config import ConfigError

        raise ConfigError(f"cross-validation needs folds >= 2 (data.folds or folds=), got {config.data.folds}")
    return run_cv(config, resume=resume)


def evaluate(gt: str | Path, detections: str | Path | list[dict] | None = None, checkpoint: str | Path | None = None,
             image_dir: str | Path | None = None, iou_types: Sequence[str] = ("segm", "bbox"),
             device: str = TrainConfig.device, allow_subset: bool = False, ci_resamples: int | None = None,
             ci_level: float | None = None, ci_seed: int | None = None) -> dict[str, Any]:
    """COCO AP like `tinyseg evaluate`: of a detections file/list, or of a checkpoint's predictions on image_dir.

    Returns per IoU type {"stats": {"AP", "AP50", ...}, "summary": [12 lines], "per_class_AP50": {...}}, and
    "ci" (bootstrap intervals over images for AP, AP50, per-class AP50) unless ci_resamples=0; the ci_ settings
    default to the config's `eval` section. Under torchrun, with a checkpoint, ranks other than 0 get None.
    """
    from .config import EvalConfig
    from .inference.jobs import PredictJob, evaluate_checkpoint, load_ground_truth, score_detections

    if (detections is None) == (checkpoint is None):
        raise ValueError("give either detections or checkpoint (with image_dir)")
    defaults = EvalConfig()
    ci = {"ci_resamples": defaults.ci_resamples if ci_resamples is None else ci_resamples, "ci_level": ci_level,
          "ci_seed": ci_seed}
    truth = load_ground_truth(str(gt))
    if checkpoint is not None:
        if image_dir is None:
            raise ValueError("checkpoint needs image_dir")
        job = PredictJob(str(checkpoint), str(image_dir), device=device, num_workers=0, progress=False)
        return evaluate_checkpoint(job, truth, tuple(iou_types), allow_subset, **ci)[1]
    return score_detections(truth, detections, tuple(iou_types), allow_subset, **ci)


def compare(gt: str | Path, a: str | Path | list[dict], b: str | Path | list[dict], iou_type: str = "segm",
            resamples: int | None = None, level: float | None = None, seed: int | None = None,
            allow_subset: bool = False) -> dict[str, Any]:
    """Like `tinyseg compare`: detections B against A (files or lists) on the images of gt, by paired bootstrap.

    Returns {"AP", "AP50", "per_class_AP50": {name: ...}, "method", "resamples", "level", "seed", "images", ...};
    each comparison holds "A", "B", "difference" (B - A), "interval", "share_B_better", "verdict" (better |
    worse | no difference) and "text" ("B is better by 0.031 AP50, 95% interval 0.008 to 0.054").
    """
    from .evaluation.compare import compare_files

    return compare_files(gt, a, b, iou_type, resamples, level, seed, allow_subset)
