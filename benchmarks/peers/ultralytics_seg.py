"""Ultralytics YOLO-seg from scratch under the same wall-clock budget as benchmarks/recipe.py, scored by
`tinyseg evaluate` (pycocotools' COCO AP, as tinyseg's own numbers; Ultralytics' built-in mask mAP is
computed differently and is never used here). Ultralytics is a benchmark-only dependency
(`pip install -e ".[peers]"`); tinyseg/ never imports it.

    N=../shared/datasets/nuclei
    python benchmarks/peers/ultralytics_seg.py --train-json $N/train.json --val-json $N/val.json \
        --image-dir $N/images --budget-min 20 --model yolo26n-seg.yaml --setting short \
        --json benchmarks/results/nuclei-yolo26n-seg-short-20min.json [key=value ...]

Steps:
1. The COCO files become one YOLO dataset with tinyseg's converter (`tinyseg convert --to yolo`): train and
   val in two folders of RUN_DIR/yolo, one data.yaml. Without --val-json the val split is cut from
   --train-json by tinyseg's leak-free splitter (--val-fraction, --split-seed: recipe.py's
   data.val_fraction and data.split_seed, whose values give the images `recipe.py` validates on).
2. A model YAML (yolo26n-seg.yaml, yolo11n-seg.yaml, ...) is trained from random weights (no .pt weights
   are reachable offline) with Ultralytics' `time=` budget (hours): after each epoch it re-fits its epoch
   count, and so its learning-rate schedule and the epoch mosaic stops at, to the budget. key=value
   arguments are passed to Ultralytics' train() (e.g. lr0=0.005).
3. The last checkpoint (last.pt, not best.pt: Ultralytics picks best.pt on the val split) predicts each val
   image at conf 0.001 with tinyseg's detection cap (predict.max_detections, 100) and masks at the image's
   own resolution (retina_masks). Masks become COCO compressed RLE (pycocotools), the class index the COCO
   category id the converter wrote (data.yaml's category_ids), the score the box confidence.
4. `tinyseg evaluate --gt VAL --detections RUN_DIR/results.json --output RUN_DIR/metrics.json`.

Settings (--setting):
- `defaults`: Ultralytics' own training defaults (imgsz 640, batch 16, nominal batch 64 reached by gradient
  accumulation, optimizer 'auto', 3 warm-up epochs, mosaic off for the last 10 epochs, ...).
- `short`, the short-budget variant: batch 8, nbs=8 (one optimizer step per batch instead of accumulating
  64 images), warmup_epochs=1, close_mosaic=2 (mosaic off for the last 2 epochs), imgsz 384 (the scale of
  tinyseg's scratch-cpu preset). Fixed before any reported run, from the trial in issue 17, not tuned on
  the reported val split.
--imgsz overrides either setting's image size (training and prediction).

Common to both settings, and why:
- pretrained=False, amp=False (Ultralytics' AMP check downloads weights), plots=False, and val=False: no
  validation during training, which would spend the budget on the reported split. Ultralytics would still
  validate after the last epoch and in its final_eval (unused here, outside train_seconds, and OOM-killed
  with the defaults setting on a 24 GiB machine): both are skipped (commit after 576e271; earlier runs
  ran them after training, which does not change what was trained).
- Both cores: Ultralytics sets torch to os.cpu_count() - 1 threads (one on a 2-core CPU: its
  utils.NUM_THREADS, applied in select_device) and forces data-loading workers to 0 on a CPU. This script
  sets --threads (default: every core) and --workers (default 2, tinyseg's data.num_workers).
- Offline: YOLO_OFFLINE=1, YOLO_AUTOINSTALL=0, and YOLO_CONFIG_DIR=RUN_DIR/ultralytics-config (this run's
  settings: a user's are neither read nor changed) holding matplotlib's DejaVu Sans as Arial.ttf, the font
  Ultralytics would otherwise download. Its tracking integrations (MLflow, ClearML, ...) are off.

Reported (--json): recipe.py's keys (`preset` is ultralytics-MODEL-SETTING; iterations = batches trained
on; images_seen; segm/bbox AP; train_seconds = Ultralytics' training loop up to its last batch; machine;
commit; the result writer adds cpu_flags and the rest of benchmarks/machine_info.py) plus epochs (images
seen / training images), optimizer_steps, bbox_AP, predict_s_per_image (the mean over the val images of
one `model.predict` call: reading, letterbox, network, NMS or top-k, masks upsampled to the image; after
one untimed warm-up image) and predict_s_per_image_with_rle (the same plus the masks' conversion to RLE).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

BENCHMARKS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCHMARKS.parent))
sys.path.insert(0, str(BENCHMARKS))

from machine_info import commit, machine, write_result  # noqa: E402

from tinyseg.config import DataConfig, PredictConfig  # noqa: E402
from tinyseg.data.coco import DatasetError  # noqa: E402

SETTINGS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "short": {"batch": 8, "nbs": 8, "warmup_epochs": 1, "close_mosaic": 2, "imgsz": 384},
}
COMMON = {"pretrained": False, "amp": False, "plots": False, "val": False, "exist_ok": True}
CONF = 0.001
# Ultralytics' experiment-tracking callbacks (on when their package is importable): off, so that a run
# neither spends its budget on them nor writes to another tool's store.
INTEGRATIONS = ("sync", "clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb")


def offline_env(config_dir: Path) -> None:
    """Environment for Ultralytics without a network, its settings in config_dir (this run's own, so that a
    user's settings are neither read nor changed); must run before `import ultralytics` reads it."""
    import matplotlib

    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "0"
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    folder = config_dir
    folder.mkdir(parents=True, exist_ok=True)
    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    # check_font() asks for Arial.ttf, or Arial.Unicode.ttf when a class name is not ASCII.
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        if not (folder / name).exists():
            shutil.copyfile(font, folder / name)


def split_train_val(train_json: str, val_json: str, image_dir: str, out: Path, val_fraction: float,
                    seed: int) -> tuple[str, str]:
    """(train, val) COCO files: as given, or val cut from train the way `tinyseg train` cuts it."""
    if val_json:
        return train_json, val_json
    from tinyseg.data.formats import load_dataset
    from tinyseg.data.split import split_records
    from tinyseg.runtime.files import write_json

    data = load_dataset(train_json, fmt="coco")
    train, val = split_records(image_dir, data.images, val_fraction, seed)
    paths = out / "train.json", out / "val.json"
    for path, records in zip(paths, (train, val)):
        write_json(str(path), data.to_coco_dict(records))
    return str(paths[0]), str(paths[1])


def prepare_dataset(train_json: str, val_json: str, image_dir: str, out: Path) -> tuple[Path, list[int]]:
    """Convert both splits with tinyseg's COCO -> YOLO converter; one data.yaml naming both. Returns its path
    and the COCO category id of each class index."""
    from tinyseg.data.formats.yolo_export import coco_to_yolo
    from tinyseg.runtime.files import atomic_write_text

    described = {}
    for split, src in (("train", train_json), ("val", val_json)):
        coco_to_yolo(src, image_dir, out / split)
        described[split] = yaml.safe_load((out / split / "data.yaml").read_text())
    ids = described["train"]["category_ids"]
    if described["val"]["category_ids"] != ids:
        raise DatasetError(f"{val_json}: categories {described['val']['category_ids']} differ from"
                           f" {train_json}: {ids}")
    data = {"path": str(out.resolve()), "train": "train/images", "val": "val/images",
            "names": described["train"]["names"], "category_ids": ids}
    atomic_write_text(out / "data.yaml", yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return out / "data.yaml", ids


def results_to_coco(result: Any, image_id: int, category_ids: list[int]) -> list[dict]:
    """One Ultralytics segmentation Results (masks at the image's resolution) as COCO result entries."""
    from pycocotools import mask as mask_utils

    from tinyseg.data.formats.common import rle_to_json

    if result.masks is None or len(result.boxes) == 0:
        return []
    height, width = result.orig_shape
    masks = result.masks.data.cpu().numpy() > 0.5
    if masks.shape[1:] != (height, width):
        raise ValueError(f"masks of {masks.shape[1:]} for an image of {(height, width)}: predict with retina_masks=True")
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    boxes = result.boxes.xyxy.cpu().numpy().astype(float)
    scores = result.boxes.conf.cpu().numpy().astype(float)
    classes = result.boxes.cls.cpu().numpy().astype(int)
    return [{"image_id": image_id, "category_id": int(category_ids[c]), "segmentation": rle_to_json(rle),
             "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)], "score": score}
            for (x1, y1, x2, y2), score, c, rle in zip(boxes.tolist(), scores.tolist(), classes.tolist(), rles)]


def use_threads(threads: int) -> None:
    """Make Ultralytics' select_device() set `threads` torch threads instead of os.cpu_count() - 1."""
    import ultralytics.utils.torch_utils as torch_utils

    torch_utils.NUM_THREADS = threads


def train(args: argparse.Namespace, data_yaml: Path, run_dir: Path, train_args: dict[str, Any]) -> dict[str, Any]:
    from ultralytics import YOLO
    from ultralytics.utils.torch_utils import strip_optimizer

    use_threads(args.threads)
    model = YOLO(args.model, task="segment")
    state: dict[str, Any] = {"epoch_batches": [], "steps": 0, "end": None}

    def on_pretrain_routine_start(trainer: Any) -> None:
        trainer.args.workers = args.workers  # runs after the trainer forced 0 workers on a CPU
        step = trainer.optimizer_step

        def counted_step() -> None:
            state["steps"] += 1
            step()
            state["end"] = time.time()

        trainer.optimizer_step = counted_step
        # Ultralytics validates after the last epoch even with val=False, then again in final_eval, at twice
        # the training batch with full-size masks: its defaults (640 px, batch 16) were OOM-killed there on
        # a 24 GiB machine. Those metrics are never used here, so both are skipped; final_eval's stripping of
        # the optimizer from last.pt (what predict() loads) is kept.
        trainer.validate = lambda: (trainer.metrics, None)
        trainer.final_eval = lambda: strip_optimizer(trainer.last) if trainer.last.exists() else None

    def on_train_epoch_start(trainer: Any) -> None:
        state["epoch_batches"].append(0)

    def on_train_batch_start(trainer: Any) -> None:
        # Counted at the start: the time budget ends an epoch right after a step, before on_train_batch_end.
        state["epoch_batches"][-1] += 1

    def on_train_batch_end(trainer: Any) -> None:
        state["end"] = time.time()

    for event, callback in (("on_pretrain_routine_start", on_pretrain_routine_start),
                            ("on_train_epoch_start", on_train_epoch_start),
                            ("on_train_batch_start", on_train_batch_start), ("on_train_batch_end", on_train_batch_end)):
        model.add_callback(event, callback)
    started = time.time()
    model.train(data=str(data_yaml), project=str(run_dir), name="train", **train_args)
    import torch

    trainer = model.trainer
    count, batch = len(trainer.train_loader.dataset), trainer.batch_size
    images = sum(min(b * batch, count) for b in state["epoch_batches"])
    return {"weights": Path(trainer.last), "iterations": sum(state["epoch_batches"]), "images_seen": images,
            "epochs": round(images / count, 3), "optimizer_steps": state["steps"],
            "train_seconds": round((state["end"] or time.time()) - trainer.train_time_start, 1),
            "train_call_seconds": round(time.time() - started, 1), "torch_threads": torch.get_num_threads()}


def predict(weights: Path, val_json: str, image_dir: str, category_ids: list[int], imgsz: int,
            device: str) -> tuple[list[dict], float, float, int]:
    """COCO results of every val image; (results, predict seconds, RLE seconds, images)."""
    from ultralytics import YOLO

    from tinyseg.data.formats import load_dataset
    from tinyseg.data.images import image_path

    records = load_dataset(val_json, fmt="coco").images
    model = YOLO(str(weights), task="segment")
    options = {"conf": CONF, "max_det": PredictConfig.max_detections, "imgsz": imgsz, "retina_masks": True,
               "verbose": False, **({"device": device} if device else {})}
    model.predict(source=str(image_path(image_dir, records[0].file_name)), **options)  # warm-up, untimed
    results: list[dict] = []
    predict_s = rle_s = 0.0
    for record in records:
        path = image_path(image_dir, record.file_name)
        start = time.perf_counter()
        result = model.predict(source=str(path), **options)[0]
        predicted = time.perf_counter()
        if tuple(result.orig_shape) != (record.height, record.width):
            raise DatasetError(f"{path}: read as {tuple(result.orig_shape)} (height, width) by Ultralytics,"
                               f" {val_json} says {(record.height, record.width)}")
        results.extend(results_to_coco(result, record.image_id, category_ids))
        rle_s += time.perf_counter() - predicted
        predict_s += predicted - start
    return results, predict_s, rle_s, len(records)


def evaluate(val_json: str, detections: Path, metrics: Path) -> dict[str, Any]:
    """`tinyseg evaluate` in a child process, exactly as a user runs it; returns its metrics file."""
    subprocess.run([sys.executable, "-m", "tinyseg", "evaluate", "--gt", val_json, "--detections", str(detections),
                    "--output", str(metrics)], check=True)
    return json.loads(metrics.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-json", required=True)
    parser.add_argument("--val-json", default="",
                        help="default: split --val-fraction of --train-json off, as recipe.py does")
    parser.add_argument("--val-fraction", type=float, default=DataConfig.val_fraction,
                        help="recipe.py's data.val_fraction (the same value gives the same val images)")
    parser.add_argument("--split-seed", type=int, default=DataConfig.split_seed, help="recipe.py's data.split_seed")
    parser.add_argument("--image-dir", required=True)
    parser.add_argument("--budget-min", type=float, required=True, help="training wall-clock budget (Ultralytics' time=)")
    parser.add_argument("--model", default="yolo26n-seg.yaml", help="an Ultralytics model YAML (yolo11n-seg.yaml, ...)")
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="defaults")
    parser.add_argument("--imgsz", type=int, help="default: the setting's (defaults 640, short 384)")
    parser.add_argument("--epochs", type=int, help="train this many epochs instead of the budget (smoke tests)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: every core)")
    parser.add_argument("--workers", type=int, default=DataConfig.num_workers, help="data-loading processes")
    parser.add_argument("--device", default="", help="Ultralytics' device (default: its choice, a GPU if any)")
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--run-dir", help="default: runs/peer-ultralytics-MODEL-SETTING-<time>")
    parser.add_argument("overrides", nargs="*", help="key=value passed to Ultralytics' train()")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    stem = Path(args.model).stem
    run_dir = Path(args.run_dir or f"runs/peer-ultralytics-{stem}-{args.setting}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    offline_env(run_dir / "ultralytics-config")
    import ultralytics

    ultralytics.settings.update({key: False for key in INTEGRATIONS if key in ultralytics.settings})
    train_json, val_json = split_train_val(args.train_json, args.val_json, args.image_dir, run_dir / "split",
                                          args.val_fraction, args.split_seed)
    data_yaml, category_ids = prepare_dataset(train_json, val_json, args.image_dir, run_dir / "yolo")
    train_args = {**SETTINGS[args.setting], **COMMON, "workers": args.workers}
    if args.imgsz:
        train_args["imgsz"] = args.imgsz
    train_args.update({"epochs": args.epochs} if args.epochs else {"time": args.budget_min / 60})
    if args.device:
        train_args["device"] = args.device
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"override '{item}' is not key=value")
        train_args[key] = yaml.safe_load(value)
    trained = train(args, data_yaml, run_dir, train_args)
    from ultralytics.utils import DEFAULT_CFG

    imgsz = int(train_args.get("imgsz", DEFAULT_CFG.imgsz))  # predict at the training size
    results, predict_s, rle_s, count = predict(trained["weights"], val_json, args.image_dir, category_ids, imgsz,
                                              args.device)
    from tinyseg.runtime.files import write_json

    write_json(str(run_dir / "results.json"), results)
    metrics = evaluate(val_json, run_dir / "results.json", run_dir / "metrics.json")
    segm, bbox = metrics.get("segm", {}).get("stats", {}), metrics.get("bbox", {}).get("stats", {})
    result = {"preset": f"ultralytics-{stem}-{args.setting}", "peer": f"ultralytics {ultralytics.__version__}",
              "dataset": Path(args.train_json).parent.name, "budget_s": args.budget_min * 60,
              "iterations": trained["iterations"], "images_seen": trained["images_seen"], "epochs": trained["epochs"],
              "optimizer_steps": trained["optimizer_steps"],
              "segm_AP50": segm.get("AP50"), "segm_AP": segm.get("AP"), "bbox_AP50": bbox.get("AP50"),
              "bbox_AP": bbox.get("AP"), "val_images": count, "detections": len(results),
              "predict_s_per_image": round(predict_s / count, 4),
              "predict_s_per_image_with_rle": round((predict_s + rle_s) / count, 4),
              "train_args": dict(train_args), "overrides": args.overrides, "run_dir": str(run_dir),
              "train_seconds": trained["train_seconds"], "train_call_seconds": trained["train_call_seconds"],
              "torch_threads": trained["torch_threads"], "machine": machine(), "commit": commit()}
    print(json.dumps(result, indent=2))
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
