"""`tinyseg VERB ...`: one verb per job, as in the README."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

log = logging.getLogger("tinyseg")


def _add_predict_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--amp", choices=["auto", "none", "bf16", "fp16"], default=None,
                        help="inference precision (default: the run's train.amp; auto = bf16 on capable CPUs, fp16 on CUDA)")
    parser.add_argument("--score-thresh", type=float, default=None, help="keep detections above this (default 0.01)")
    parser.add_argument("--max-detections", type=int, default=None, help="per image (default 100)")
    parser.add_argument("--mask-thresh", type=float, default=None, help="mask probability cut (default 0.5)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=2, help="image-loading processes")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="test-time augmentation: flip (+ --tta-scales), merged by NMS with mask voting")
    parser.add_argument("--tta-scales", type=int, nargs="*", default=None, help="extra test short sides for --tta")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinyseg", description="Mask R-CNN instance segmentation for small datasets")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    verbs = parser.add_subparsers(dest="verb")

    train = verbs.add_parser("train", help="train a model; writes a run directory")
    train.add_argument("--config", default="default", help="a preset name or a YAML path (default: default)")
    train.add_argument("--train-json")
    train.add_argument("--image-dir")
    train.add_argument("--val-json")
    train.add_argument("--val-image-dir")
    train.add_argument("--output-dir")
    train.add_argument("--resume", action="store_true", help="continue the run in --output-dir from last.pt")
    train.add_argument("--devices", type=int, default=0, help="launch this many processes with torchrun")
    train.add_argument("overrides", nargs="*", help="section.key=value (e.g. solver.lr=0.01 model.backbone=resnet101)")

    evaluate = verbs.add_parser("evaluate", help="COCO bbox/segm AP of a detections file, or of a checkpoint")
    evaluate.add_argument("--gt", required=True, help="ground-truth COCO JSON")
    evaluate.add_argument("--detections", help="a submission/results JSON to score")
    evaluate.add_argument("--checkpoint", help="predict with this checkpoint, then score")
    evaluate.add_argument("--image-dir", help="images of --gt (with --checkpoint)")
    evaluate.add_argument("--iou-type", choices=("segm", "bbox", "both"), default="both")
    evaluate.add_argument("--output", help="write the metrics as JSON here")
    _add_predict_options(evaluate)

    predict = verbs.add_parser("predict", help="write a submission JSON for a folder of images")
    predict.add_argument("--checkpoint", help="a tinyseg checkpoint (or give --onnx)")
    predict.add_argument("--onnx", help="an exported ONNX model, run with onnxruntime instead of PyTorch")
    predict.add_argument("--image-dir", required=True)
    predict.add_argument("--images-json", default="", help="test.json: image ids are looked up by file name")
    predict.add_argument("--output", required=True, help="the submission JSON to write")
    _add_predict_options(predict)

    validate = verbs.add_parser("validate-submission", help="check a submission against test.json")
    validate.add_argument("submission")
    validate.add_argument("--images-json", required=True)
    validate.add_argument("--categories-json", help="where the categories are, if not in --images-json")

    visualize = verbs.add_parser("visualize", help="PNG overlays of predictions or ground truth")
    visualize.add_argument("--image-dir", required=True)
    visualize.add_argument("--gt", help="COCO JSON with annotations: draw the ground truth")
    visualize.add_argument("--images-json", help="image list (test.json) for --detections")
    visualize.add_argument("--detections", help="a submission JSON to draw instead of ground truth")
    visualize.add_argument("--categories-json", help="category names, if not in the images JSON")
    visualize.add_argument("--output-dir", required=True)
    visualize.add_argument("--num", type=int, default=16, help="how many images (random, seeded)")
    visualize.add_argument("--seed", type=int, default=0)
    visualize.add_argument("--score-thresh", type=float, default=0.3)

    export = verbs.add_parser("export", help="export a checkpoint to ONNX (dynamic image size)")
    export.add_argument("checkpoint")
    export.add_argument("--format", choices=("onnx",), default="onnx")
    export.add_argument("--output", help="default: the checkpoint's name with .onnx")
    export.add_argument("--opset", type=int, default=17)

    report = verbs.add_parser("report", help="(re)build the training report (plots, report.html) of a run")
    report.add_argument("run_dir")

    check = verbs.add_parser("check-data", help="check a COCO dataset and its images without training")
    check.add_argument("json")
    check.add_argument("image_dir")
    check.add_argument("--max-image-pixels", type=int, default=40_000_000)

    demo = verbs.add_parser("demo", help="make a small dataset, train from scratch, evaluate, predict, draw")
    demo.add_argument("--output-dir", default="demo_out")
    demo.add_argument("overrides", nargs="*", help="section.key=value for the demo's training")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if not args.verb:
        build_parser().print_help()
        return 2
    from .commands import run_verb, user_errors

    try:
        return run_verb(args)
    except user_errors() as error:
        print(f"tinyseg {args.verb}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tinyseg {args.verb}: interrupted", file=sys.stderr)
        return 130


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
    return subprocess.call(command, env=os.environ.copy())


if __name__ == "__main__":
    sys.exit(main())
