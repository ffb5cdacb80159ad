"""`tinyseg VERB ...`: one verb per job, as in the README."""

from __future__ import annotations

import argparse
import logging
import sys


def _add_predict_options(parser: argparse.ArgumentParser) -> None:
    from .config import DataConfig, PredictConfig, TrainConfig

    def run_default(key: str) -> str:  # None on the command line keeps the run's predict.* setting
        return f"(default: the run's predict.{key}, {getattr(PredictConfig, key)} unless it set one)"

    parser.add_argument("--device", default=TrainConfig.device,
                        help=f"auto | cpu | cuda | cuda:N (default {TrainConfig.device}, as train.device)")
    parser.add_argument("--amp", choices=["auto", "none", "bf16", "fp16"], default=None,
                        help="inference precision (default: the run's train.amp; auto = bf16 on capable CPUs, fp16 on CUDA)")
    parser.add_argument("--score-thresh", type=float, default=None,
                        help=f"keep detections above this {run_default('score_thresh')}")
    parser.add_argument("--max-detections", type=int, default=None, help=f"per image {run_default('max_detections')}")
    parser.add_argument("--mask-thresh", type=float, default=None,
                        help=f"mask probability cut {run_default('mask_thresh')}")
    parser.add_argument("--batch-size", type=int, default=None, help=run_default("batch_size"))
    parser.add_argument("--workers", type=int, default=DataConfig.num_workers,
                        help=f"image-loading processes (default {DataConfig.num_workers}, as data.num_workers)")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="test-time augmentation: flip (+ --tta-scales), merged by NMS with mask voting")
    parser.add_argument("--tta-scales", type=int, nargs="*", default=None, help="extra test short sides for --tta")


def _add_ci_options(parser: argparse.ArgumentParser, switch: bool = True) -> None:
    from .config import EvalConfig

    if switch:
        parser.add_argument("--ci", action=argparse.BooleanOptionalAction, default=EvalConfig.ci_resamples > 0,
                            help="intervals for AP, AP50 and per-class AP50 by bootstrap over images"
                                 f" (default {'on' if EvalConfig.ci_resamples > 0 else 'off'})")
    parser.add_argument("--resamples", type=int, default=EvalConfig.ci_resamples,
                        help=f"bootstrap resamples (default {EvalConfig.ci_resamples})")
    parser.add_argument("--ci-level", type=float, default=EvalConfig.ci_level,
                        help=f"interval level (default {EvalConfig.ci_level})")
    parser.add_argument("--ci-seed", type=int, default=EvalConfig.ci_seed,
                        help=f"seed of the resamples (default {EvalConfig.ci_seed})")


def _add_format_option(parser: argparse.ArgumentParser) -> None:
    from .config import DataConfig
    from .config_rules import CHOICES

    parser.add_argument("--format", choices=CHOICES[("data", "format")], default=None,
                        help=f"the labels' format (default {DataConfig.format}: told by the layout; docs/formats.md)")


def _add_convert_parser(verbs) -> None:
    convert = verbs.add_parser("convert", help="labelme / YOLO / VOC labels to COCO JSON, or COCO to YOLO")
    convert.add_argument("src", help="a labelme folder, a YOLO dataset YAML, a VOC folder, or a COCO JSON")
    convert.add_argument("--output", required=True, help="the COCO JSON to write, or the YOLO folder (--to yolo)")
    _add_format_option(convert)
    convert.add_argument("--to", choices=("coco", "yolo"), default="coco")
    convert.add_argument("--image-dir", default="", help="the images of a COCO SRC")
    convert.add_argument("--split", default="", help="YOLO: the YAML's split (default train); VOC: an ImageSets list")
    convert.add_argument("--crowd-rle-as-instances", action="store_true",
                         help="read iscrowd=1 RLE masks as objects (CVAT writes every brush mask as a crowd)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinyseg", description="Mask R-CNN instance segmentation for small datasets")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    verbs = parser.add_subparsers(dest="verb")

    train = verbs.add_parser("train", help="train a model; writes a run directory")
    train.add_argument("--config", help="a preset name or a YAML path (default: default; with --resume, the"
                                        " run's own config.yaml)")
    train.add_argument("--train-json", help="COCO JSON, or a labelme folder, a YOLO dataset YAML, a VOC folder")
    train.add_argument("--image-dir", help="the images of a COCO --train-json (the other formats know theirs)")
    train.add_argument("--val-json")
    train.add_argument("--val-image-dir")
    train.add_argument("--output-dir")
    _add_format_option(train)
    train.add_argument("--resume", action="store_true", help="continue the run in --output-dir from last.pt")
    train.add_argument("--devices", type=int, default=0, help="launch this many processes with torchrun")
    from .config import DataConfig

    train.add_argument("--folds", type=int, default=None,
                       help="k-fold cross-validation of --train-json: K runs in OUTPUT_DIR/fold_<i>, scores in"
                            f" OUTPUT_DIR/cv_summary.json (sets data.folds; default {DataConfig.folds} = off)")
    train.add_argument("overrides", nargs="*", help="section.key=value (e.g. solver.lr=0.01 model.backbone=resnet101)")

    evaluate = verbs.add_parser("evaluate", help="COCO bbox/segm AP of a detections file, or of a checkpoint")
    evaluate.add_argument("--gt", required=True, help="ground truth: COCO JSON, or labelme / YOLO (its val) / VOC")
    _add_format_option(evaluate)
    evaluate.add_argument("--detections", help="a submission/results JSON to score")
    evaluate.add_argument("--checkpoint", help="predict with this checkpoint, then score")
    evaluate.add_argument("--image-dir", help="images of --gt (with --checkpoint)")
    evaluate.add_argument("--iou-type", choices=("segm", "bbox", "both"), default="both")
    evaluate.add_argument("--output", help="write the metrics as JSON here")
    evaluate.add_argument("--allow-subset", action="store_true",
                          help="score only the detections of images in --gt (others are an error by default)")
    _add_ci_options(evaluate)
    _add_predict_options(evaluate)

    predict = verbs.add_parser("predict", help="write a submission JSON for a folder of images")
    predict.add_argument("--checkpoint", help="a tinyseg checkpoint (or give --onnx)")
    predict.add_argument("--onnx", help="an exported model (tinyseg export), run without PyTorch's model: a .onnx"
                         " file, or OpenVINO's .xml")
    predict.add_argument("--runtime", choices=("onnxruntime", "openvino"),
                         help="what runs --onnx (default: onnxruntime for .onnx, openvino for .xml;"
                              " pip install openvino)")
    predict.add_argument("--image-dir", required=True, help="a folder of images, or one image")
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
    from .config import PredictConfig

    visualize.add_argument("--score-thresh", type=float, default=PredictConfig.overlay_score_thresh,
                           help="draw detections from this score (default "
                                f"{PredictConfig.overlay_score_thresh}, as predict.overlay_score_thresh)")

    export = verbs.add_parser("export", help="export a checkpoint to ONNX (dynamic image size) or OpenVINO IR")
    export.add_argument("checkpoint")
    export.add_argument("--format", choices=("onnx", "openvino"), default="onnx",
                        help="onnx (default), or openvino: IR files M.xml + M.bin (pip install openvino)")
    export.add_argument("--output", help="default: the checkpoint's name with .onnx (.xml for openvino)")
    export.add_argument("--opset", type=int, default=17)
    export.add_argument("--int8-calibration", metavar="IMAGE_DIR", default="",
                        help="quantize the ONNX export to int8 (onnxruntime), calibrated on images in this folder"
                             " (training images)")
    export.add_argument("--int8-images", type=int, default=16, help="how many images calibrate int8 (default 16)")
    export.add_argument("--pasted-masks", action="store_true",
                        help="paste full-size masks inside the graph (output 'masks', N x 1 x H x W) for callers"
                             " without tinyseg; slower (a loop over detections). Default: the mask head's"
                             " 'mask_probs' (N x 1 x 28 x 28), pasted into their boxes by tinyseg predict --onnx")

    compare = verbs.add_parser("compare", help="B - A in AP/AP50 (per class too) of two detection files on the"
                                               " same images, with a paired bootstrap interval")
    compare.add_argument("--gt", required=True, help="ground truth of the images both files are for")
    _add_format_option(compare)
    compare.add_argument("a", help="detections of model A (a submission/results JSON)")
    compare.add_argument("b", help="detections of model B")
    compare.add_argument("--iou-type", choices=("segm", "bbox"), default="segm")
    compare.add_argument("--output", help="write the comparison as JSON here")
    compare.add_argument("--allow-subset", action="store_true", help="drop detections of images not in --gt")
    _add_ci_options(compare, switch=False)

    report = verbs.add_parser("report", help="(re)build the training report (plots, report.html) of a run")
    report.add_argument("run_dir")

    check = verbs.add_parser("check-data", help="check a COCO dataset and its images without training")
    check.add_argument("json", help="COCO JSON, or a labelme folder, a YOLO dataset YAML, a VOC folder")
    check.add_argument("image_dir", nargs="?", default="", help="the images of a COCO file")
    _add_format_option(check)
    check.add_argument("--max-image-pixels", type=int, default=DataConfig.max_image_pixels,
                       help=f"larger images are refused (default {DataConfig.max_image_pixels}, as "
                            "data.max_image_pixels)")
    check.add_argument("--max-detections", type=int, default=PredictConfig.max_detections,
                       help="warn about images with more instances than this (default "
                            f"{PredictConfig.max_detections}, as predict.max_detections)")
    check.add_argument("--crowd-rle-as-instances", action="store_true",
                       help="read iscrowd=1 RLE masks as objects, as data.crowd_rle_as_instances=true trains them")

    _add_convert_parser(verbs)

    demo = verbs.add_parser("demo", help="make a small dataset, train from scratch, evaluate, predict, draw")
    demo.add_argument("--output-dir", default="demo_out")
    demo.add_argument("overrides", nargs="*", help="section.key=value for the demo's training")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # argparse gives a positional list only its first run: `train a=1 --output-dir R b=2` left b=2 out
    if rest and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in rest):
        args.overrides, rest = [*args.overrides, *rest], []
    if rest:
        parser.parse_args(argv)  # argparse's own error for what it does not know
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `train --devices N` relaunches with it
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if not args.verb:
        build_parser().print_help()
        return 2
    from .commands import describe, error_exit_code, run_verb, user_errors

    try:
        return run_verb(args)
    except user_errors() as error:
        print(f"tinyseg {args.verb}: error: {describe(error)}", file=sys.stderr)
        return error_exit_code(error)
    except KeyboardInterrupt:
        print(f"tinyseg {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
