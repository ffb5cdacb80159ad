"""Prediction time of tinyseg checkpoints and Ultralytics YOLO-seg weights on the same images, side by side.

    N=../shared/datasets/nuclei
    python benchmarks/peers/predict_side_by_side.py --images $N/val.json --image-dir $N/images \
        --checkpoint runs/fast/best.pt --checkpoint runs/scratch/best.pt --no-tta-too \
        --yolo runs/peer-ultralytics-yolo26n-seg-short-.../train/weights/last.pt \
        --rounds 3 --json benchmarks/results/nuclei-predict-side-by-side.json

What is timed, per image, for every model: reading the image file, the network, and the masks as COCO
compressed RLE at the image's own size, that is, what a user needs for a results file.
- tinyseg as `tinyseg predict` runs (inference/predictor.py predict_images on one image): a checkpoint
  with the run's own prediction settings, TTA as shipped (--no-tta-too adds each checkpoint that ships
  TTA with TTA off too), or a config's model with random weights (--random-weights 'fast-cpu
  model.fpn_channels=128': what a model shape costs, before training one).
- YOLO as benchmarks/peers/ultralytics_seg.py predicts: conf 0.001, at most predict.max_detections,
  retina masks, at the size the weights were trained at unless --imgsz.
Both in fp32 (Ultralytics has no bf16 on a CPU; tinyseg would take bf16 on CPUs that have it natively:
--tinyseg-amp auto) and with the same torch threads, every core the process may use (Ultralytics would
take one of two).

The models take turns: each round runs every model over all images, one model after the other, starting
one model later each round, so that a drift of the machine's speed or an order effect touches them
alike. Reported per model: the median over rounds of the mean s/image, each round's figure, detections
per image; per tinyseg model, its ratio to each YOLO model (the median of the per-round ratios). The
first image of every model is predicted once, untimed, before round 1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

BENCHMARKS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCHMARKS.parent))
sys.path.insert(0, str(BENCHMARKS))
sys.path.insert(0, str(Path(__file__).parent))

from machine_info import commit, machine, write_result  # noqa: E402

from tinyseg.config import PredictConfig  # noqa: E402

Runner = Callable[[int], int]  # image index -> detections written


def random_weights_model(spec: str, amp: str):
    """`PRESET key=value ...` with random weights (seed 0), one class, score threshold 0: every image gets
    predict.max_detections detections, the most work a model of that shape does (trained nuclei models
    come close: their images hold up to 375 nuclei)."""
    import torch

    from tinyseg.config import load_config
    from tinyseg.data.coco import CategoryMap
    from tinyseg.inference.predictor import build_for_inference

    name, *overrides = spec.split()
    torch.manual_seed(0)
    return build_for_inference(load_config(name, [*overrides, "predict.score_thresh=0"]), CategoryMap([1], ["object"]),
                               "cpu", amp)


def tinyseg_runner(loaded, predict, image_dir: str, records: list) -> Runner:
    """loaded: an inference LoadedModel; predict: the PredictConfig it runs with (its TTA setting)."""
    from tinyseg.data.dataset import ImageListDataset
    from tinyseg.inference.predictor import predict_images

    dataset = ImageListDataset([(r.image_id, r.file_name) for r in records], image_dir)

    def run(index: int) -> int:
        found = predict_images(loaded.model, dataset, loaded.categories, loaded.device, predict.mask_thresh,
                               indices=[index], progress=False, tta=predict)
        return len(found.results)

    return run


def yolo_runner(weights: str, imgsz: int | None, threads: int, image_dir: str, records: list
                ) -> tuple[Runner, int]:
    from ultralytics import YOLO
    from ultralytics_seg import CONF, results_to_coco, use_threads

    from tinyseg.data.images import image_path

    use_threads(threads)  # Ultralytics sets torch's threads itself, at its first predict call
    model = YOLO(weights, task="segment")
    imgsz = imgsz or int(model.overrides["imgsz"])  # the training size, kept in the weights
    options = {"conf": CONF, "max_det": PredictConfig.max_detections, "imgsz": imgsz, "retina_masks": True,
               "verbose": False, "device": "cpu"}
    class_ids = list(range(len(model.names)))

    def run(index: int) -> int:
        record = records[index]
        result = model.predict(source=str(image_path(image_dir, record.file_name)), **options)[0]
        return len(results_to_coco(result, record.image_id, class_ids))

    return run, imgsz


def time_rounds(runners: dict[str, Runner], images: int, rounds: int) -> dict[str, dict[str, Any]]:
    for run in runners.values():
        run(0)  # warm-up: first-call allocations, Ultralytics' model fusing
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    detections: dict[str, int] = {}
    names = list(runners)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            run = runners[name]
            count = 0
            start = time.perf_counter()
            for index in range(images):
                count += run(index)
            seconds[name].append((time.perf_counter() - start) / images)
            detections[name] = count
            print(f"round {round_index + 1}/{rounds} {name}: {seconds[name][-1]:.3f} s/image, "
                  f"{count / images:.1f} detections/image", flush=True)
    return {name: {"s_per_image": statistics.median(runs), "runs": runs,
                   "detections_per_image": detections[name] / images} for name, runs in seconds.items()}


def peer_ratios(timed: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each tinyseg model's time over each YOLO model's: the median of the rounds' ratios (a round's two
    figures were measured minutes apart at most)."""
    ratios = {}
    for name, result in timed.items():
        if name.startswith("tinyseg"):
            for peer in (n for n in timed if n.startswith("yolo")):
                per_round = [mine / theirs for mine, theirs in zip(result["runs"], timed[peer]["runs"])]
                ratios[f"{name} / {peer}"] = {"median": statistics.median(per_round), "runs": per_round}
    return ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="a COCO file naming the images (its annotations unused)")
    parser.add_argument("--image-dir", required=True)
    parser.add_argument("--checkpoint", action="append", default=[], help="a tinyseg checkpoint (repeatable)")
    parser.add_argument("--random-weights", action="append", default=[], metavar="'PRESET [key=value ...]'",
                        help="a model of that config with random weights and 100 detections an image (repeatable)")
    parser.add_argument("--no-tta-too", action="store_true", help="also time each checkpoint with TTA off")
    parser.add_argument("--yolo", action="append", default=[], help="Ultralytics weights, .pt (repeatable)")
    parser.add_argument("--imgsz", type=int, help="YOLO's prediction size (default: the size it was trained at)")
    parser.add_argument("--tinyseg-amp", default="none", help="tinyseg's precision (train.amp's choices; none = fp32)")
    parser.add_argument("--limit", type=int, default=0, help="the first N images only (0 = all)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    if not args.checkpoint and not args.random_weights and not args.yolo:
        parser.error("give at least one --checkpoint, --random-weights or --yolo")

    import dataclasses

    import torch

    from tinyseg.data.formats import load_dataset
    from tinyseg.inference.predictor import load_model

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(threads)
    records = load_dataset(args.images, fmt="coco").images
    runners: dict[str, Runner] = {}
    yolo_sizes: dict[str, int] = {}
    for checkpoint in args.checkpoint:
        loaded = load_model(checkpoint, "cpu", amp=args.tinyseg_amp)
        shipped = loaded.config.predict
        runners[f"tinyseg {checkpoint}"] = tinyseg_runner(loaded, shipped, args.image_dir, records)
        if args.no_tta_too and shipped.tta:
            runners[f"tinyseg {checkpoint} --no-tta"] = tinyseg_runner(loaded, dataclasses.replace(shipped, tta=False),
                                                                      args.image_dir, records)
    for spec in args.random_weights:
        loaded = random_weights_model(spec, args.tinyseg_amp)
        runners[f"tinyseg random weights: {spec}"] = tinyseg_runner(loaded, loaded.config.predict, args.image_dir,
                                                                   records)
    if args.yolo:
        from ultralytics_seg import offline_env

        offline_env(Path(tempfile.mkdtemp(prefix="ultralytics-config-")))
        for weights in args.yolo:
            runners[f"yolo {weights}"], yolo_sizes[weights] = yolo_runner(weights, args.imgsz, threads, args.image_dir,
                                                                         records)
    images = min(len(records), args.limit) if args.limit else len(records)
    timed = time_rounds(runners, images, args.rounds)
    threads_used = torch.get_num_threads()
    ratios = peer_ratios(timed)
    result = {"images": images, "images_json": args.images, "rounds": args.rounds, "yolo_imgsz": yolo_sizes,
              "tinyseg_amp": args.tinyseg_amp, "torch_threads": threads_used,
              "models": timed, "ratios": ratios, "machine": machine(), "commit": commit()}
    for name, ratio in ratios.items():
        print(f"{name}: {ratio['median']:.2f}x")
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
