"""What each CLI verb does, given parsed arguments; the jobs themselves live in their packages."""

from __future__ import annotations

import argparse
import json
import logging
import random
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("tinyseg")


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the input's fault: printed as one clear message, never as a traceback."""
    from .config import ConfigError
    from .data.coco import DatasetError
    from .model.weights import BackboneWeightsError
    from .runtime.checkpoint import CheckpointError
    from .runtime.precision import DeviceError
    from .training.trainer import NonFiniteLossError

    return (ConfigError, DatasetError, CheckpointError, BackboneWeightsError, NonFiniteLossError,
            FileNotFoundError, NotADirectoryError, UsageError, DeviceError)


def error_exit_code(error: BaseException) -> int:
    """1 for bad data (a file, an entry, a field), 2 for a command line or config that cannot be used."""
    from .data.coco import DatasetError

    return 1 if isinstance(error, (DatasetError, FileNotFoundError, NotADirectoryError)) else 2


def describe(error: BaseException) -> str:
    """The one line printed for a user error: an OS error by its file first, as tinyseg's own errors are."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror.lower()}"
    return str(error)


class UsageError(ValueError):
    """Arguments that do not go together."""


def run_verb(args: argparse.Namespace) -> int:
    from .runtime import distributed as dist

    verb = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict,
            "validate-submission": cmd_validate, "visualize": cmd_visualize, "check-data": cmd_check_data,
            "demo": cmd_demo, "export": cmd_export, "report": cmd_report, "convert": cmd_convert,
            "compare": cmd_compare}[args.verb]
    try:
        return verb(args)
    finally:
        dist.shutdown()


def train_config(args: argparse.Namespace):
    from .config import load_config

    paths = {"data.train_json": args.train_json, "data.image_dir": args.image_dir, "data.val_json": args.val_json,
             "data.val_image_dir": args.val_image_dir, "train.output_dir": args.output_dir}
    given = [f"{key}={json.dumps(value)}" for key, value in paths.items() if value]
    if getattr(args, "folds", None) is not None:
        given.append(f"data.folds={args.folds}")
    if getattr(args, "format", None):
        given.append(f"data.format={args.format}")
    overrides = given + list(args.overrides)
    if args.config is None and getattr(args, "resume", False):
        from .training.resume import resume_config

        return resume_config(overrides)
    return load_config(args.config or "default", overrides)


def launch_torchrun(argv: list[str], devices: int) -> int:
    """`tinyseg train --devices N ...` is `torchrun --nproc_per_node=N -m tinyseg train ...`."""
    rest, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == "--devices":
            skip = True
            continue
        if item.startswith("--devices="):
            continue
        rest.append(item)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}",
               "-m", "tinyseg", *rest]
    log.info("launching: %s", " ".join(command))
    return subprocess.call(command)


def cmd_train(args: argparse.Namespace) -> int:
    from .runtime.distributed import launched_by_torchrun
    from .training.trainer import train

    if args.devices > 1 and not launched_by_torchrun():
        return launch_torchrun(args.argv, args.devices)
    config = train_config(args)
    if config.data.folds:
        from .training.cross_validation import cross_validate

        cross_validate(config, resume=args.resume)
        return 0
    summary = train(config, resume=args.resume)
    log.info("done: %d epochs, %d iterations; best %s; run in %s", summary["epochs"], summary["iterations"],
             _short(summary["best"]), summary["run_dir"])
    return 0


def _short(best: dict) -> str:
    if best.get("segm_AP50", -1) < 0:
        return "(no validation set)"
    return f"segm AP50 {best['segm_AP50']:.4f} at epoch {best.get('epoch')}"


def _predict_overrides(args: argparse.Namespace) -> dict:
    """The prediction options given on the command line (None = keep the run's setting)."""
    return {name: getattr(args, name)
            for name in ("score_thresh", "max_detections", "mask_thresh", "batch_size", "tta", "tta_scales")}


def cmd_predict(args: argparse.Namespace) -> int:
    from .inference.jobs import PredictJob, predict_checkpoint, predict_onnx
    from .inference.export import runtime_for
    from .inference.submission import write_image_list, write_submission
    from .runtime import distributed as dist

    if bool(args.checkpoint) == bool(args.onnx):
        raise UsageError("give --checkpoint CKPT or --onnx MODEL.onnx")
    if args.checkpoint and args.runtime:  # silently predicting with PyTorch would time the wrong thing
        raise UsageError(f"--runtime {args.runtime} runs an exported model: export the checkpoint"
                         " (tinyseg export CKPT) and give --onnx MODEL.onnx")
    if args.onnx:
        # the exported graph runs as exported, one image at a time: these would be silently ignored
        from dataclasses import replace

        from .config import DataConfig, PredictConfig, TrainConfig
        from .config_rules import check_predict

        fixed = {"tta": None, "tta_scales": None, "batch_size": None, "amp": None, "device": TrainConfig.device,
                 "workers": DataConfig.num_workers}
        given = [f"--{name.replace('_', '-')}" for name, unset in fixed.items()
                 if getattr(args, name) not in (unset, False) and not (name == "device" and args.device == "cpu")]
        if given:
            raise UsageError(f"{', '.join(given)}: not for an exported model (--onnx runs its graph as exported:"
                             " no TTA, one image at a time, on the CPU); give --checkpoint for these")
        applied = ("score_thresh", "mask_thresh", "max_detections")
        check_predict(replace(PredictConfig(), **{k: getattr(args, k) for k in applied if getattr(args, k) is not None}))
        try:
            runtime = runtime_for(args.onnx, args.runtime)
        except ValueError as error:
            raise UsageError(str(error)) from error
        try:
            found, entries = predict_onnx(args.onnx, args.image_dir, args.images_json, args.score_thresh,
                                          args.mask_thresh, runtime, args.max_detections)
        except ModuleNotFoundError as error:
            package = (error.name or "").split(".")[0]
            if package not in ("onnx", "onnxruntime", "openvino"):
                raise
            raise UsageError(f"--onnx with --runtime {runtime} needs the {package} package:"
                             f" pip install {package}") from error
    else:
        job = PredictJob(args.checkpoint, args.image_dir, args.images_json, device=args.device,
                         predict_overrides=_predict_overrides(args), num_workers=args.workers, amp=args.amp)
        found, entries = predict_checkpoint(job)
    if not dist.is_main():
        return 0
    count = write_submission(args.output, found.results)
    if not args.images_json:
        write_image_list(Path(args.output).with_suffix(".images.json"), entries)
    log.info("wrote %d detections for %d images to %s", count, len(found.image_ids), args.output)
    if found.errors:
        print(f"tinyseg predict: {len(found.errors)} image(s) could not be read and have no detections:",
              file=sys.stderr)
        for error in found.errors:
            print(f"  - {error}", file=sys.stderr)
        return 1
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation.coco_eval import format_report
    from .inference.jobs import PredictJob, evaluate_checkpoint, load_ground_truth, score_detections
    from .inference.submission import write_submission
    from .runtime import distributed as dist
    from .runtime.files import write_json

    iou_types = ("segm", "bbox") if args.iou_type == "both" else (args.iou_type,)
    if bool(args.detections) == bool(args.checkpoint):
        raise UsageError("give either --detections FILE or --checkpoint CKPT --image-dir DIR")
    ci = _ci_options(args)  # checked before a prediction that can take hours
    fmt = args.format or "auto"
    gt = load_ground_truth(args.gt, fmt)  # converted once: its images, the ids to predict, the scoring
    if args.checkpoint:
        image_dir = args.image_dir or gt.image_dir
        if not image_dir:
            raise UsageError("--checkpoint needs --image-dir (the images of a COCO --gt)")
        job = PredictJob(args.checkpoint, image_dir, device=args.device, predict_overrides=_predict_overrides(args),
                         num_workers=args.workers, amp=args.amp)
        detections_file = Path(args.output or "evaluation.json").with_suffix(".detections.json")
        _, results = evaluate_checkpoint(job, gt, iou_types, args.allow_subset,
                                         keep=lambda found: write_submission(detections_file, found.results), **ci)
        if not dist.is_main():  # under torchrun, rank 0 scores the gathered detections
            return 0
    else:
        results = score_detections(gt, args.detections, iou_types, args.allow_subset, **ci)
    print(format_report(results))
    if args.output:
        write_json(args.output, results)
    return 0


def _ci_options(args: argparse.Namespace) -> dict:
    if args.resamples < 0 or not 0 < args.ci_level < 1:
        raise UsageError(f"--resamples must be >= 0 and --ci-level in (0, 1), got {args.resamples}, {args.ci_level}")
    return {"ci_resamples": args.resamples if args.ci else 0, "ci_level": args.ci_level, "ci_seed": args.ci_seed}


def cmd_compare(args: argparse.Namespace) -> int:
    from .evaluation.compare import compare_files, format_comparison
    from .runtime.files import write_json

    if args.resamples < 1 or not 0 < args.ci_level < 1:
        raise UsageError(f"--resamples must be >= 1 and --ci-level in (0, 1), got {args.resamples}, {args.ci_level}")
    result = compare_files(args.gt, args.a, args.b, args.iou_type, args.resamples, args.ci_level, args.ci_seed,
                           args.allow_subset, args.format or "auto")
    print(format_comparison(result))
    if args.output:
        write_json(args.output, result)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .inference.submission import check_submission

    found = check_submission(args.submission, args.images_json, args.categories_json)
    if found.problems:
        print(f"{args.submission}: {len(found.problems)} problem(s):")
        for problem in found.problems:
            print(f"  - {problem}")
        return 1
    listed = args.categories_json or args.images_json
    print(f"{args.submission}: valid ({found.detections} detections)" + ("" if found.categories_checked else
          f"; category ids not checked: {listed} lists no categories (give --categories-json)"))
    return 0


def cmd_visualize(args: argparse.Namespace) -> int:
    from .data.coco import read_json
    from .inference.jobs import load_ground_truth
    from .inference.overlays import write_overlays
    from .inference.submission import read_image_list

    if args.detections:
        source = args.images_json or args.gt
        if not source:
            raise UsageError("--detections needs --images-json (or --gt) for the image list")
        images = read_image_list(source)["images"]
        instances = read_json(args.detections)
        categories = read_image_list(args.categories_json or source).get("categories", [])
    else:
        if not args.gt:
            raise UsageError("give --gt to draw ground truth, or --detections with --images-json")
        full = load_ground_truth(args.gt).to_coco_dict()  # COCO checked, or another format converted
        images, instances, categories = full["images"], full["annotations"], full["categories"]
    chosen = random.Random(args.seed).sample(images, min(args.num, len(images)))
    written = write_overlays(chosen, instances, categories, args.image_dir, args.output_dir, args.score_thresh)
    print(f"wrote {len(written)} overlays to {args.output_dir}")
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    from .data.check import check_dataset

    if args.max_detections < 1:
        raise UsageError(f"--max-detections {args.max_detections}: prediction keeps at least 1 detection per image")
    report, usable = check_dataset(args.json, args.image_dir, args.max_image_pixels, args.format or "auto",
                                   args.crowd_rle_as_instances, args.max_detections)
    print(report)
    return 0 if usable else 1


def cmd_convert(args: argparse.Namespace) -> int:
    from .data.formats.convert import convert

    output = Path(args.output)
    if args.to == "coco" and output.is_dir():  # it was an IsADirectoryError traceback after the whole read
        raise UsageError(f"--output {output} is a folder: name the COCO JSON file to write ({output / 'labels.json'})")
    if args.to == "yolo" and (output.is_file() or output.suffix.lower() in (".json", ".yaml", ".yml")):
        raise UsageError(f"--to yolo writes a dataset folder (data.yaml, labels/, images/): --output names a folder,"
                         f" got {output}")
    print(convert(args.src, args.output, args.format or "auto", args.to, args.image_dir, args.split,
                  args.crowd_rle_as_instances))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .inference.export import ExportOptionError, calibration_images, check_options, export

    output = args.output or str(Path(args.checkpoint).with_suffix({"onnx": ".onnx", "openvino": ".xml"}[args.format]))
    try:  # before any tracing: nothing is written
        check_options(output, args.format, bool(args.int8_calibration), args.int8_images, args.opset)
    except ExportOptionError as error:
        raise UsageError(str(error)) from error  # printed after "tinyseg export: error:"
    what = "--int8-calibration" if args.int8_calibration else f"--format {args.format}"
    try:
        calibration = calibration_images(args.int8_calibration, args.int8_images) if args.int8_calibration else None
        path = export(args.checkpoint, output, args.format, args.opset, calibration, args.pasted_masks)
    except ModuleNotFoundError as error:
        package = (error.name or "").split(".")[0]
        if package not in ("onnx", "onnxruntime", "openvino"):
            raise
        raise UsageError(f"export {what} needs the {package} package: pip install {package}") from error
    print(f"wrote {path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .training.report import write_report

    run_dir = Path(args.run_dir)
    if not (run_dir / "metrics.jsonl").is_file():  # an empty page (or a traceback, for a file) helped no one
        raise FileNotFoundError(2, "not a run folder (no metrics.jsonl in it)", str(run_dir))
    print(f"wrote {write_report(run_dir)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.output_dir, list(args.overrides))
    return 0
