"""k-fold cross-validation: one recipe trained K times, each run scored on a fold it never trained on.

For datasets too small for a fixed val split: the K scores average out which images happened to land in
val, and their spread says how far one split's number can be trusted. The folds come from the leak-free
splitter (duplicates stay in one fold). Each fold is an ordinary run directory `<output_dir>/fold_<i>/`
with its own `train.json` and `val.json` (subsets of data.train_json with all its categories, so the
category ids round-trip); `<output_dir>/cv_summary.json` collects the scores.

A finished fold leaves `fold_result.json`; running the same command again skips it, so an interrupted
cross-validation continues where it stopped (`--resume` also continues the unfinished fold from its
last.pt). Under torchrun the folds still run one after another, each trained with DDP over all ranks.
"""

from __future__ import annotations

import copy
import gc
import logging
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError
from ..data.training_data import load_checked
from ..data.coco import DatasetError, read_json
from ..data.split import fold_assignments
from ..runtime.files import atomic_write_text, write_json
from ..runtime import distributed as dist
from ..runtime.precision import resolve_device

log = logging.getLogger("tinyseg")

FOLD_RESULT = "fold_result.json"
SUMMARY = "cv_summary.json"
METRICS = ("segm_AP50", "segm_AP", "bbox_AP50", "bbox_AP")
# How a run is executed, not what it learns, and the fold's own paths (its images are compared by id):
# a finished fold is kept when only these change.
NEUTRAL = {"data": {"num_workers", "train_json", "val_json", "val_image_dir"},
           "train": {"device", "log_every", "dist_timeout_min", "output_dir"}}


@dataclass
class Fold:
    index: int
    run_dir: Path
    train_ids: list[int]
    val_ids: list[int]
    config: Config  # the fold's own run: data.train_json/val_json point into run_dir


def plan_folds(cfg: Config) -> tuple[list[Fold], dict]:
    """The K folds of data.train_json (every image checked first) and its data as one COCO dict."""
    d = cfg.data
    if d.val_json:
        raise ConfigError(f"data.folds={d.folds} splits data.train_json into folds and scores each run on one;"
                          f" it does not go with data.val_json ({d.val_json})")
    data = load_checked(d.train_json, d.image_dir, d.max_image_pixels, fmt=d.format,
                        crowd_rle_as_instances=d.crowd_rle_as_instances)
    image_dir = data.image_dir  # labelme, YOLO and VOC labels bring their own images
    try:
        assignment = fold_assignments(image_dir, data.images, d.folds, d.split_seed)
    except ValueError as error:
        raise DatasetError(f"{d.train_json}: data.folds: {error}") from None
    root = Path(cfg.train.output_dir)
    folds = []
    for index in range(d.folds):
        run_dir = root / f"fold_{index}"
        # Absolute paths: a fold's config.yaml then re-runs that fold from any folder.
        fold_cfg = copy.deepcopy(cfg)
        fold_cfg.data.train_json = str((run_dir / "train.json").resolve())
        fold_cfg.data.val_json = str((run_dir / "val.json").resolve())
        fold_cfg.data.image_dir, fold_cfg.data.val_image_dir = str(Path(image_dir).resolve()), ""
        fold_cfg.data.format, fold_cfg.data.folds, fold_cfg.train.output_dir = "coco", 0, str(run_dir.resolve())
        train_ids = [r.image_id for r, f in zip(data.images, assignment) if f != index]
        val_ids = [r.image_id for r, f in zip(data.images, assignment) if f == index]
        folds.append(Fold(index, run_dir, train_ids, val_ids, fold_cfg))
    return folds, data.to_coco_dict()  # as loaded: labelme, YOLO and VOC labels arrive as COCO


def coco_subset(full: dict, image_ids: list[int]) -> dict:
    """These images and their annotations, with every category: each fold keeps the file's category ids."""
    keep = set(image_ids)
    return {"images": [image for image in full["images"] if image["id"] in keep],
            "annotations": [a for a in full["annotations"] if a["image_id"] in keep],
            "categories": full["categories"]}


def _comparable(config: dict) -> dict:
    return {section: {k: v for k, v in values.items() if k not in NEUTRAL.get(section, ())}
            for section, values in config.items()}


def finished_result(fold: Fold) -> dict | None:
    """The saved result of a fold trained earlier with these settings; None when it has not finished."""
    path = fold.run_dir / FOLD_RESULT
    if not path.is_file():
        return None
    saved = read_json(path)
    before, now = _comparable(saved.get("config", {})), _comparable(fold.config.to_dict())
    changed = [f"{s}.{k}" for s in now for k in now[s] if before.get(s, {}).get(k) != now[s][k]]
    if saved.get("val_image_ids") != fold.val_ids or saved.get("train_image_ids") != fold.train_ids:
        changed.insert(0, "the fold's images")
    if changed:
        raise ConfigError(f"{path}: fold {fold.index} was finished with other settings ({', '.join(changed[:6])});"
                          f" use another --output-dir, or delete {fold.run_dir} to train it again")
    return saved


def cross_validate(cfg: Config, resume: bool = False) -> dict[str, Any] | None:
    """Train and score every fold; returns the summary (on rank 0; None on the other ranks)."""
    dist.init(resolve_device(cfg.train.device), cfg.train.dist_timeout_min * 60)
    folds, full = plan_folds(cfg)
    # Rank 0 decides what is finished, so every rank trains the same folds even if their disks differ.
    decided: tuple[dict, BaseException | None] = ({}, None)
    if dist.is_main():
        try:
            decided = ({f.index: finished_result(f) for f in folds}, None)
        except (ConfigError, DatasetError) as error:  # raised on every rank, not left waiting for rank 0
            decided = ({}, error)
    finished, problem = dist.all_gather_objects(decided)[0]
    if problem is not None:
        raise problem
    if os.environ.get("LOCAL_RANK", "0") == "0":  # one writer per machine
        # what `--resume` without --config continues with (each fold's own config.yaml is a fold's run)
        atomic_write_text(Path(cfg.train.output_dir) / "config.yaml", cfg.to_yaml())
        for fold in folds:
            write_json(fold.run_dir / "train.json", coco_subset(full, fold.train_ids))
            write_json(fold.run_dir / "val.json", coco_subset(full, fold.val_ids))
    dist.barrier()
    results = []
    for fold in folds:
        if finished.get(fold.index) is not None:
            log.info("fold %d/%d: finished earlier, kept (%s)", fold.index + 1, len(folds), fold.run_dir)
            results.append(finished[fold.index])
            continue
        log.info("fold %d/%d: %d training images, %d val images -> %s", fold.index + 1, len(folds),
                 len(fold.train_ids), len(fold.val_ids), fold.run_dir)
        results.append(_train_fold(fold, resume))
    if not dist.is_main():
        return None
    summary = summarize(cfg, folds, results)
    write_json(Path(cfg.train.output_dir) / SUMMARY, summary)
    print(format_summary(summary), flush=True)
    return summary


def _train_fold(fold: Fold, resume: bool) -> dict | None:
    from .trainer import Trainer

    # The Trainer directly, not trainer.train(): that one ends the process group, which the next fold needs.
    trainer = Trainer(copy.deepcopy(fold.config), resume=resume and (fold.run_dir / "last.pt").is_file())
    run = trainer.fit()
    del trainer
    gc.collect()  # the data loader's workers and the model go before the next fold builds its own
    if not dist.is_main():
        return None
    # The score is the run's last evaluation, not its best epoch: picking the epoch on the fold it is
    # scored on would flatter every fold. With train.eval_every=0 the two are the same.
    stats = read_json(fold.run_dir / "val_results.json")
    final = {f"{kind}_{name}": stats[kind]["stats"][name] for kind in ("segm", "bbox") for name in ("AP50", "AP")}
    result = {"fold": fold.index, "run_dir": str(fold.run_dir), "train_images": len(fold.train_ids),
              "val_images": len(fold.val_ids), **final, "best_epoch": run["best"].get("epoch"),
              "epochs": run["epochs"], "iterations": run["iterations"], "seconds": run["seconds"],
              "val_image_ids": fold.val_ids, "train_image_ids": fold.train_ids, "config": fold.config.to_dict()}
    write_json(fold.run_dir / FOLD_RESULT, result)
    return result


def summarize(cfg: Config, folds: list[Fold], results: list[dict]) -> dict[str, Any]:
    """Mean, sample standard deviation (K - 1), min and max of each metric over the folds."""
    per_fold = [{key: r[key] for key in ("fold", "run_dir", "train_images", "val_images", "iterations", *METRICS,
                                         "val_image_ids")} for r in results]
    summary: dict[str, Any] = {"folds": len(folds), "train_json": cfg.data.train_json,
                               "image_dir": cfg.data.image_dir, "split_seed": cfg.data.split_seed,
                               "score": "last evaluation of each fold's run", "per_fold": per_fold}
    for name, reduce in (("mean", statistics.fmean), ("std", statistics.stdev), ("min", min), ("max", max)):
        summary[name] = {}
        for metric in METRICS:
            # COCOeval gives -1 where a fold has no ground truth to score: left out, not averaged in.
            values = [r[metric] for r in results if r[metric] >= 0]
            enough = len(values) >= (2 if name == "std" else 1)
            summary[name][metric] = reduce(values) if enough else None
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    head = f"{'fold':<6}{'train':>6}{'val':>5}" + "".join(f"{m.replace('_', ' '):>11}" for m in METRICS)
    lines = [f"cross-validation: {summary['folds']} folds of {summary['train_json']}"
             f" (scores: {summary['score']})", head]
    for fold in summary["per_fold"]:
        lines.append(f"{fold['fold']:<6}{fold['train_images']:>6}{fold['val_images']:>5}"
                     + "".join(f"{fold[m]:>11.4f}" for m in METRICS))
    for name in ("mean", "std", "min", "max"):
        cells = "".join(f"{'-' if v is None else format(v, '.4f'):>11}" for v in
                        (summary[name][m] for m in METRICS))
        lines.append(f"{name:<17}{cells}")
    return "\n".join(lines)
