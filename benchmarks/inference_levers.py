"""What each piece of test-time work buys: AP and time of prediction settings on one trained checkpoint.

    python benchmarks/inference_levers.py --checkpoint RUN/best.pt --gt VAL.json --image-dir IMAGES \
        [--images 50] [--settings shipped no-tta ...] --json out.json

Every setting predicts the same images one after another in this process (nothing else should run), is
scored with tinyseg's evaluation (95% intervals by bootstrap over images) and compared with the first
setting by a paired bootstrap over the same images. Time is the median and the mean of seconds per
image for the whole prediction (decode, model, mask paste, RLE), one image at a time as `tinyseg predict`
runs on a CPU. Settings are changes to the checkpoint's own ones ("shipped": the predict section saved
in the checkpoint, as its run was configured); `model.rpn_post_nms_top_n_test` is the number of RPN
proposals kept per image; the runtime settings run the checkpoint's ONNX export without TTA.
Choose on images the checkpoint never trained on and that you will not report (a fold of
`tinyseg train --folds`), then report the chosen setting on the val split.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from machine_info import commit, machine, write_result  # noqa: E402
from tinyseg.data.coco import read_json  # noqa: E402
from tinyseg.evaluation.compare import compare_detections  # noqa: E402
from tinyseg.data.dataset import ImageListDataset  # noqa: E402
from tinyseg.data.images import image_path  # noqa: E402
from tinyseg.inference.export import OnnxModel, export_onnx, quantize_int8, spread  # noqa: E402
from tinyseg.inference.jobs import predict_entries, score  # noqa: E402
from tinyseg.inference.predictor import load_model  # noqa: E402

SETTINGS = {
    "shipped": {},
    "no-tta": {"predict.tta": False},
    "no-tta-proposals-500": {"predict.tta": False, "model.rpn_post_nms_top_n_test": 500},
    "no-tta-proposals-300": {"predict.tta": False, "model.rpn_post_nms_top_n_test": 300},
    "no-tta-proposals-1000": {"predict.tta": False, "model.rpn_post_nms_top_n_test": 1000},
    "no-tta-score-0.05": {"predict.tta": False, "predict.score_thresh": 0.05},
    # The test size (short side, long-side cap in the preset's ratio) against the training size (384 in the CPU presets)
    "no-tta-test-size-320": {"predict.tta": False, "input.test_min_size": 320, "input.test_max_size": 533},
    "no-tta-test-size-448": {"predict.tta": False, "input.test_min_size": 448, "input.test_max_size": 747},
    "no-tta-test-size-512": {"predict.tta": False, "input.test_min_size": 512, "input.test_max_size": 853},
    # Per-class box NMS: touching instances (nuclei) have overlapping boxes
    "no-tta-nms-0.4": {"predict.tta": False, "predict.nms_thresh": 0.4},
    "no-tta-nms-0.6": {"predict.tta": False, "predict.nms_thresh": 0.6},
    "no-tta-nms-0.7": {"predict.tta": False, "predict.nms_thresh": 0.7},
    "tta-proposals-500": {"model.rpn_post_nms_top_n_test": 500},
    "tta": {"predict.tta": True},
    # The checkpoint exported to ONNX (--onnx, or exported here), no TTA, run by another runtime.
    "onnxruntime": {"runtime": "onnxruntime"},
    "openvino": {"runtime": "openvino"},
    # The same export quantized to int8 (tinyseg export --int8-calibration), calibrated on --calibration-json's images.
    "onnxruntime-int8": {"runtime": "onnxruntime", "int8": True},
    "openvino-int8": {"runtime": "openvino", "int8": True},
    # OpenVINO's CPU plugin in bf16 (fast only with AVX512-BF16 or AMX; PyTorch's own prediction uses bf16
    # autocast on the backbone there).
    "openvino-bf16": {"runtime": "openvino", "precision": "bf16"},
}


def subset(gt: dict, count: int) -> dict:
    """The first `count` images by id (all of them for 0) with their annotations."""
    images = sorted(gt["images"], key=lambda image: image["id"])[:count or None]
    keep = {image["id"] for image in images}
    return {**gt, "images": images, "annotations": [a for a in gt["annotations"] if a["image_id"] in keep]}


def run_setting(checkpoint: str, changes: dict, gt: dict, image_dir: str, onnx: str = "", int8: str = "") -> dict:
    if "runtime" in changes:
        return run_runtime(int8 if changes.get("int8") else onnx, changes, gt, image_dir)
    predict = {k.split(".", 1)[1]: v for k, v in changes.items() if k.startswith("predict.")}
    loaded = load_model(checkpoint, "cpu", predict)
    proposals = changes.get("model.rpn_post_nms_top_n_test")
    if proposals:
        loaded.model.rpn._post_nms_top_n["testing"] = proposals
    if "input.test_min_size" in changes:
        loaded.model.transform.min_size = (changes["input.test_min_size"],)
        loaded.model.transform.max_size = changes.get("input.test_max_size", loaded.model.transform.max_size)
    seconds, detections = [], []
    for image in gt["images"]:
        start = time.perf_counter()
        found = predict_entries(loaded.model, loaded.categories, loaded.device, loaded.config.predict,
                                [(image["id"], image["file_name"])], image_dir, progress=False)
        seconds.append(time.perf_counter() - start)
        detections += found.results
    return {"changes": changes, "tta": loaded.config.predict.tta,
            "proposals": loaded.model.rpn._post_nms_top_n["testing"],
            "score_thresh": loaded.config.predict.score_thresh, "test_size": loaded.model.transform.min_size[-1],
            **scored(gt, detections, seconds)}


def run_runtime(onnx: str, changes: dict, gt: dict, image_dir: str) -> dict:
    model = OnnxModel(onnx, runtime=changes["runtime"], precision=changes.get("precision", "f32"))
    dataset = ImageListDataset([(image["id"], image["file_name"]) for image in gt["images"]], image_dir)
    seconds, detections = [], []
    for index in range(len(dataset)):
        start = time.perf_counter()
        image, meta = dataset[index]
        detections += model.results(image.float() / 255, meta["image_id"])
        seconds.append(time.perf_counter() - start)
    return {"changes": changes, "tta": False, **scored(gt, detections, seconds)}


def scored(gt: dict, detections: list[dict], seconds: list[float]) -> dict:
    metrics = score(gt, detections, ("segm",), ci_resamples=1000, ci_level=0.95, ci_seed=0)["segm"]
    return {"segm_AP50": metrics["stats"]["AP50"], "segm_AP": metrics["stats"]["AP"],
            "segm_AP50_ci": metrics["ci"]["AP50"], "segm_AP_ci": metrics["ci"]["AP"],
            "s_per_image_median": statistics.median(seconds), "s_per_image_mean": sum(seconds) / len(seconds),
            "detections_per_image": len(detections) / len(gt["images"]), "_detections": detections}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--gt", required=True, help="COCO JSON of the images to predict and score")
    parser.add_argument("--image-dir", required=True)
    parser.add_argument("--images", type=int, default=0, help="the first N images by id (default: all)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                        help="the first is the baseline of the paired comparisons")
    parser.add_argument("--onnx", help="the checkpoint's ONNX export for the runtime settings (default: exported"
                        " next to --json)")
    parser.add_argument("--calibration-json", help="int8 settings: calibrate on images of this COCO file"
                        " (training images, never the scored ones), found in --image-dir")
    parser.add_argument("--calibration-images", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    gt = subset(read_json(args.gt), args.images)
    onnx = args.onnx
    if not onnx and any("runtime" in SETTINGS[name] for name in args.settings):
        onnx = str(Path(args.json or "levers.json").with_suffix(".onnx"))
        export_onnx(args.checkpoint, onnx)
    int8 = ""
    if any(SETTINGS[name].get("int8") for name in args.settings):
        if not args.calibration_json:
            parser.error("the int8 settings need --calibration-json (training images)")
        names = sorted(image["file_name"] for image in read_json(args.calibration_json)["images"])
        scored = {image["file_name"] for image in gt["images"]}
        if scored & set(names):
            parser.error(f"--calibration-json shares {len(scored & set(names))} images with --gt: calibrate on others")
        int8 = str(Path(onnx).with_suffix(".int8.onnx"))
        quantize_int8(onnx, int8, [image_path(args.image_dir, name) for name in spread(names, args.calibration_images)])
    runs = {}
    for name in args.settings:
        runs[name] = run_setting(args.checkpoint, SETTINGS[name], gt, args.image_dir, onnx, int8)
        print(f"{name:<24} AP50 {runs[name]['segm_AP50']:.4f} AP {runs[name]['segm_AP']:.4f}"
              f"  {runs[name]['s_per_image_median']:.3f} s/image (median)", flush=True)
    baseline = args.settings[0]
    for name, run in runs.items():
        if name != baseline:
            paired = compare_detections(gt, runs[baseline]["_detections"], run["_detections"], "segm")
            run["vs_" + baseline] = {metric: paired[metric] for metric in ("AP50", "AP")}
            run["time_ratio_vs_" + baseline] = run["s_per_image_mean"] / runs[baseline]["s_per_image_mean"]
    for run in runs.values():
        del run["_detections"]
    result = {"checkpoint": args.checkpoint, "gt": args.gt, "calibration_json": args.calibration_json,
              "calibration_images": args.calibration_images if int8 else 0, "images": len(gt["images"]),
              "instances": len(gt["annotations"]), "threads": torch.get_num_threads(), "settings": runs,
              "machine": machine(), "commit": commit()}
    print(json.dumps(result, indent=2))
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
