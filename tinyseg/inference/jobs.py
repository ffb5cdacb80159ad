"""Predict a set of images, and predict-then-score: results in memory, for the writers and the scorer.

One path serves every caller: `predict_entries` (each rank its share, all ranks get every result back) is
what `tinyseg predict` runs, and `predict_and_score` adds COCO scoring on top for the trainer's validation,
`tinyseg evaluate --checkpoint` and `tinyseg.evaluate(checkpoint=...)`. Nothing here writes a file: the
submission, the images list and the overlays are written by their writers (inference/submission.py,
inference/overlays.py) from the returned results.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config import DataConfig, PredictConfig, TrainConfig
from ..data.coco import CategoryMap, CocoData
from ..data.dataset import ImageListDataset
from ..data.formats import load_dataset, resolve_format, val_split
from ..data.images import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, list_images
from ..evaluation.coco_eval import evaluate_detections, note_images_without_detections, read_detections
from ..runtime import distributed as dist
from ..runtime.precision import resolve_device
from .predictor import LoadedModel, Predictions, load_model, predict_images


@dataclass
class PredictJob:
    """A checkpoint and the images to run it on (the options of `tinyseg predict` / `evaluate --checkpoint`)."""

    checkpoint: str
    image_dir: str  # a folder of images, or one image file
    images_json: str = ""  # the ids and file names to predict; "" = every image in image_dir, numbered 1..N
    _: KW_ONLY
    device: str = TrainConfig.device
    predict_overrides: dict | None = None  # PredictConfig fields; None values keep the run's setting
    num_workers: int = DataConfig.num_workers
    progress: bool = True
    amp: str | None = None  # auto | none | bf16 | fp16; None = the run's train.amp


def load_ground_truth(gt_json: str, fmt: str = "auto", require_annotations: bool = True) -> CocoData:
    """The labels to predict or score (COCO, or labelme / YOLO's val / VOC converted), checked like training data."""
    fmt = resolve_format(gt_json, fmt)
    return load_dataset(gt_json, require_annotations, fmt=fmt, split=val_split(gt_json, fmt))


def image_entries(image_dir: str, images_json: str, categories: CategoryMap) -> list[tuple[int, str]]:
    """(image_id, file_name) pairs in image_folder(image_dir): from the images JSON (or labels in another
    format: data/formats), or every image in the folder numbered 1..N, or the one image image_dir names."""
    path = Path(image_dir)
    if images_json:
        if path.is_file():  # the JSON's images would be read from the file's folder, all of them
            raise FileNotFoundError(f"{path}: an image file; with an images JSON ({images_json}) give the folder "
                                    "of its images")
        data = load_ground_truth(images_json, require_annotations=False)
        if data.categories.category_ids:
            categories.check_same(data.categories, "checkpoint", images_json)
        return [(r.image_id, r.file_name) for r in data.images]
    if path.is_file():  # `tinyseg predict --image-dir photo.jpg`, as `yolo predict source=photo.jpg`
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise FileNotFoundError(f"{path}: neither a folder of images nor an image ({', '.join(IMAGE_SUFFIXES)})")
        return [(1, path.name)]
    return list(enumerate((file.name for file in list_images(image_dir)), start=1))


def image_folder(image_dir: str | Path) -> Path:
    """Where the entries' files are: image_dir, or the folder of the one image it names."""
    path = Path(image_dir)
    return path.parent if path.is_file() else path


def loader_settings(device: torch.device, batch_size: int, num_workers: int) -> tuple[int, int]:
    """Images per forward pass and loading processes. On a CPU a batch only adds padding work and loader
    workers compete with the model for the cores: one image at a time, decoded in-process
    (benchmarks/README.md, "Each speed-up alone")."""
    return (1, 0) if device.type == "cpu" else (batch_size, num_workers)


def predict_entries(model: torch.nn.Module, categories: CategoryMap, device: torch.device, predict: PredictConfig,
                    entries: list[tuple[int, str]], image_dir: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS,
                    num_workers: int = 0, progress: bool = True) -> Predictions:
    """Detections for the entries' images: each rank predicts its share, every rank gets all of them back
    (in rank order). Unreadable images are listed in .errors, not fatal."""
    dataset = ImageListDataset(entries, image_dir, max_pixels)
    shard = list(range(dist.rank(), len(dataset), dist.world_size()))
    batch_size, workers = loader_settings(device, predict.batch_size, num_workers)
    found = predict_images(model, dataset, categories, device, predict.mask_thresh, batch_size, workers,
                           indices=shard, progress=progress and dist.is_main(), tta=predict)
    parts = dist.all_gather_objects(found)
    return Predictions([r for part in parts for r in part.results], [e for part in parts for e in part.errors],
                       [i for part in parts for i in part.image_ids])


def score(gt: CocoData | dict, detections: list[dict], iou_types: tuple[str, ...] = ("segm", "bbox"),
          allow_subset: bool = False, **ci) -> dict:
    """COCO AP of detections on gt; `ci` (ci_resamples, ci_level, ci_seed) goes to evaluate_detections."""
    coco = gt.to_coco_dict() if isinstance(gt, CocoData) else gt
    return evaluate_detections(coco, detections, iou_types, allow_subset=allow_subset, **ci)


def score_detections(gt: CocoData, detections: str | Path | list[dict], iou_types: tuple[str, ...] = ("segm", "bbox"),
                     allow_subset: bool = False, **ci) -> dict:
    """`score` of a results file (or list), saying first which ground-truth images it leaves out."""
    found = read_detections(detections)
    note_images_without_detections(gt.to_coco_dict(), found, str(detections) if isinstance(detections, (str, Path))
                                   else "detections")
    return score(gt, found, iou_types, allow_subset, **ci)


def predict_and_score(model: torch.nn.Module, categories: CategoryMap, device: torch.device,
                      predict: PredictConfig, gt: CocoData | dict, image_dir: str | Path,
                      iou_types: tuple[str, ...] = ("segm", "bbox"), allow_subset: bool = False,
                      max_pixels: int = DEFAULT_MAX_PIXELS, num_workers: int = 0, progress: bool = True,
                      keep: Callable[[Predictions], None] | None = None, **ci) -> tuple[Predictions, dict | None]:
    """Predict gt's images and score them (rank 0 scores; other ranks get None as the results).

    keep: called on rank 0 with the predictions before they are scored (a writer: what took long to predict
    is on disk before scoring can fail or be interrupted).
    """
    coco = gt.to_coco_dict() if isinstance(gt, CocoData) else gt
    entries = [(image["id"], image["file_name"]) for image in coco["images"]]
    found = predict_entries(model, categories, device, predict, entries, image_dir, max_pixels, num_workers, progress)
    if not dist.is_main():
        return found, None
    if keep is not None:
        keep(found)
    return found, score(coco, found.results, iou_types, allow_subset, **ci)


def load_job_model(job: PredictJob) -> LoadedModel:
    """The job's checkpoint on this rank's device (torchrun: one process per device)."""
    device = dist.init(resolve_device(job.device))
    return load_model(job.checkpoint, str(device), job.predict_overrides, job.amp)


def predict_checkpoint(job: PredictJob) -> tuple[Predictions, list[tuple[int, str]]]:
    """`tinyseg predict`: the job's images through its checkpoint; returns the detections and the entries."""
    loaded = load_job_model(job)
    entries = image_entries(job.image_dir, job.images_json, loaded.categories)
    found = predict_entries(loaded.model, loaded.categories, loaded.device, loaded.config.predict, entries,
                            image_folder(job.image_dir), loaded.config.data.max_image_pixels, job.num_workers,
                            job.progress)
    return found, entries


def evaluate_checkpoint(job: PredictJob, gt: CocoData, iou_types: tuple[str, ...] = ("segm", "bbox"),
                        allow_subset: bool = False, keep: Callable[[Predictions], None] | None = None,
                        **ci) -> tuple[Predictions, dict | None]:
    """`tinyseg evaluate --checkpoint`: predict gt's images (in job.image_dir) and score them."""
    loaded = load_job_model(job)
    if gt.categories.category_ids:
        loaded.categories.check_same(gt.categories, job.checkpoint, gt.path)
    return predict_and_score(loaded.model, loaded.categories, loaded.device, loaded.config.predict, gt,
                             job.image_dir, iou_types, allow_subset, loaded.config.data.max_image_pixels,
                             job.num_workers, job.progress, keep, **ci)


def predict_onnx(model_path: str, image_dir: str, images_json: str = "", score_thresh: float | None = None,
                 mask_thresh: float | None = None, runtime: str | None = None,
                 max_detections: int | None = None) -> tuple[Predictions, list[tuple[int, str]]]:
    """What predict_checkpoint does, through onnxruntime or OpenVINO (None: the one that reads the file): one image
    at a time, no PyTorch model."""
    from .export import OnnxModel

    model = OnnxModel(model_path, score_thresh, mask_thresh, runtime, max_detections=max_detections)
    entries = image_entries(image_dir, images_json, model.categories)
    dataset = ImageListDataset(entries, image_folder(image_dir))
    found = Predictions()
    for index in range(len(dataset)):
        image, meta = dataset[index]
        if image is None:
            found.errors.append(meta["error"])
            continue
        found.results += model.results(image.float() / 255, meta["image_id"])
        found.image_ids.append(meta["image_id"])
    return found, entries

