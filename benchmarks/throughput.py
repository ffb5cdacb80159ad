"""tinyseg against the reference loop (benchmarks/reference_loop.py), side by side in one process.

    python benchmarks/throughput.py --quick --json benchmarks/results/throughput-quick.json
    python benchmarks/throughput.py --quick --checkpoint RUN/best.pt --json ...   # + a trained model

Measures, on the same model architecture, image size and images:
- a training step (images/s), R50-FPN (and R152-FPN without --quick), on real Tiny VOC photos;
- prediction from image files to a written submission JSON (images/s), on Tiny VOC and nuclei images:
  with TTA off (`predict_ratio`) and with the preset's own predict settings, TTA as shipped
  (`predict_default_ratio`, --preset); with --checkpoint also a trained model (its realistic detection
  counts, its own settings) on nuclei val, beside the random weights;
- evaluation of a many-instance result set on nuclei val: faster-coco-eval vs pycocotools (seconds),
  with the 12 numbers checked equal;
- peak RSS of each side's prediction job, each in a fresh process, and peak GPU memory on CUDA;
- the roofline: GFLOP per image (backbone, prediction, training step), the peak of a matmul and of a
  3 x 3 convolution measured before and after the random-weight measurements (the best of them),
  utilization = achieved GFLOP/s / peak, and tinyseg's prediction time by stage.
On CUDA (--device cuda, the default when a GPU is present) tinyseg uses its CUDA settings: fp16/bf16
AMP, channels_last, cudnn.benchmark, batched prediction with loader workers; the reference stays fp32
unless --reference-amp. Each side runs alternately `--repeats` times; medians and tinyseg/reference
ratios. Random weights keep every detection (score threshold 0): 100 masks per image, the worst case.
--smoke: a generated dataset, R18 with narrow heads at 96 px, one image (and one generated nuclei
stand-in), one repeat, prediction jobs in this process: proves the code paths in seconds, measures nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

import bench_models  # noqa: E402
import reference_loop as reference  # noqa: E402
from bench_models import benchmark_model, build, gpu_peak_mib, reference_amp, tinyseg_amp  # noqa: E402, F401
from eval_jobs import reference_evaluate, shifted_detections, tinyseg_evaluate  # noqa: E402
from machine_info import commit, machine, machine_info, write_result  # noqa: E402
from predict_jobs import PredictJob, in_fresh_process, profile_tinyseg, reference_predict, tinyseg_predict  # noqa: E402
from roofline import count_flops, dense_peaks, model_flops, utilization  # noqa: E402
from tinyseg.config import InputConfig  # noqa: E402

SHARED = Path(os.environ.get("TINYSEG_SHARED", ROOT.parent / "shared")) / "datasets"  # as tests/conftest.py
VOC, NUCLEI = SHARED / "tinyvoc", SHARED / "nuclei"
DEVICE = "cpu"  # set from --device in main(); the fresh prediction processes get it in their job
REFERENCE_AMP = False  # --reference-amp
SMALL = False  # --smoke: bench_models.SMALL_HEADS


@dataclass
class BenchData:
    train_json: Path
    train_images: Path
    predict_sets: list[tuple[Path, Path, float]]  # (images JSON, image folder, share of --count)
    eval_gt: Path
    checkpoint_json: Path  # the images a --checkpoint predicts on
    checkpoint_images: Path


REAL = BenchData(VOC / "pascal_train_sample.json", VOC / "train_sample",
                 [(VOC / "test.json", VOC / "test_images", 1.0), (NUCLEI / "val.json", NUCLEI / "images", 0.25)],
                 NUCLEI / "val.json", NUCLEI / "val.json", NUCLEI / "images")
DATA = REAL


def smoke_data(folder: Path) -> BenchData:
    from tinyseg.data.synthetic import make_shapes_dataset

    paths = make_shapes_dataset(folder, train_images=4, val_images=2, test_images=1, size=(96, 112), max_shapes=2)
    return BenchData(paths["train"], paths["images"], [(paths["test"], paths["images"], 1.0),
                                                       (paths["val"], paths["images"], 0.25)],
                     paths["val"], paths["val"], paths["images"])


def entries_of(images_json: Path, folder: Path, count: int) -> list[tuple[str, int, str]]:
    images = json.loads(Path(images_json).read_text())["images"][:count]
    return [(str(folder), i["id"], i["file_name"]) for i in images]


def predict_entries(count: int, data: BenchData | None = None) -> list[tuple[str, int, str]]:
    return [entry for images_json, folder, share in (data or DATA).predict_sets
            for entry in entries_of(images_json, folder, max(1, int(count * share)))]


TRAIN_GPU_PEAK_MIB: dict[str, float] = {}  # "reference resnet50" -> peak of its training runs


def track_gpu_peak(key: str, function):
    """Run a training measurement and keep its peak GPU memory (CUDA only)."""
    if DEVICE.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    value = function()
    TRAIN_GPU_PEAK_MIB[key] = max(TRAIN_GPU_PEAK_MIB.get(key, 0.0), gpu_peak_mib(DEVICE))
    return value


def timed(function) -> float:
    return bench_models.timed(function, DEVICE)


def scaler_for(amp) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cuda", enabled=DEVICE.startswith("cuda") and amp == torch.float16)


# -- training ------------------------------------------------------------------------------------
def reference_train(backbone: str, size: int, steps: int) -> float:
    model = build(backbone, size, True, DEVICE, small=SMALL)
    loader = torch.utils.data.DataLoader(reference.TutorialDataset(str(DATA.train_json), str(DATA.train_images)),
                                         batch_size=2, shuffle=True, num_workers=2, collate_fn=reference.collate)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.005, momentum=0.9)
    amp = reference_amp(DEVICE, REFERENCE_AMP)
    scaler = scaler_for(amp) if amp == torch.float16 else None

    reference.train_steps(model, loader, optimizer, 1, DEVICE, amp, scaler)  # warm-up
    seconds = timed(lambda: reference.train_steps(model, loader, optimizer, steps, DEVICE, amp, scaler))
    return steps * 2 / seconds


def tinyseg_loader(size: int, workers: int = 2):
    from tinyseg.data.coco import load_coco
    from tinyseg.data.dataset import InstanceDataset, collate
    from tinyseg.data.augment import build
    from tinyseg.data.samplers import TrainBatchSampler

    data = load_coco(DATA.train_json)
    dataset = InstanceDataset(data.images, DATA.train_images, data.categories,
                              build(InputConfig(min_size=[size], max_size=1333)).sample)
    sampler = TrainBatchSampler(dataset.aspect_ratios(), 2, seed=0)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                                       persistent_workers=workers > 0, pin_memory=DEVICE.startswith("cuda"))


def to_device(images, targets):
    images = [image.to(DEVICE, non_blocking=True) for image in images]
    targets = [{k: v.to(DEVICE, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
               for t in targets]
    return images, targets


def tinyseg_train(backbone: str, size: int, steps: int) -> float:
    loader = tinyseg_loader(size)
    model = build(backbone, size, False, DEVICE, small=SMALL).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.005, momentum=0.9)
    scaler = scaler_for(tinyseg_amp(DEVICE))

    def run(count: int) -> None:
        done = 0
        while done < count:
            for images, targets in loader:
                losses = model(*to_device(images, targets))
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(sum(losses.values())).backward()
                scaler.step(optimizer)
                scaler.update()
                done += 1
                if done >= count:
                    return
    run(1)
    seconds = timed(lambda: run(steps))
    return steps * 2 / seconds


def tinyseg_train_gflops(backbone: str, size: int) -> dict[str, float]:
    """GFLOP per image of one tinyseg training step (forward and backward), by stage."""
    images, targets = to_device(*next(iter(tinyseg_loader(size, workers=0))))
    model = build(backbone, size, False, DEVICE, small=SMALL).train()
    counts, _ = count_flops(lambda: sum(model(images, targets).values()).backward())
    return {k: v / len(images) / 1e9 for k, v in model_flops(counts, model).items()}


# -- the table -----------------------------------------------------------------------------------
def alternate(functions: dict, repeats: int) -> dict[str, list[float]]:
    """Each function in turn, `repeats` rounds, so drifts in machine speed hit all alike."""
    runs: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            runs[name].append(function())
    return runs


def compare(name: str, ref: list[float], ours: list[float], higher_is_better: bool = True) -> dict:
    r, t = statistics.median(ref), statistics.median(ours)
    ratio = t / r if higher_is_better else r / t
    print(f"{name:<42s} reference {r:10.3f}   tinyseg {t:10.3f}   ratio {ratio:5.2f}x   "
          f"(runs: ref {', '.join(f'{v:.3f}' for v in ref)}; tinyseg {', '.join(f'{v:.3f}' for v in ours)})", flush=True)
    return {"reference": r, "tinyseg": t, "ratio": ratio, "reference_runs": ref, "tinyseg_runs": ours}


def side_by_side(name: str, reference_fn, tinyseg_fn, repeats: int, higher_is_better: bool = True) -> dict:
    runs = alternate({"reference": reference_fn, "tinyseg": tinyseg_fn}, repeats)
    return compare(name, runs["reference"], runs["tinyseg"], higher_is_better)


def predict_table(label: str, job: PredictJob, repeats: int) -> dict:
    """The reference, tinyseg with TTA off and tinyseg with the default settings, alternating, each
    job in a fresh process; the reference runs serve both ratios (it has no TTA to switch)."""
    found: dict[str, list] = {"reference": [], "tta-off": [], "default": []}

    def side(key: str, function, side_job: PredictJob):
        def run() -> float:
            # --smoke: in this process (each fresh one imports torch again: 10 s on a busy 2-core CPU)
            found[key].append(function(side_job) if SMALL else in_fresh_process(function, side_job))
            return found[key][-1].images_per_s
        return run

    runs = alternate({"reference": side("reference", reference_predict, job),
                      "tta-off": side("tta-off", tinyseg_predict, replace(job, settings="tta-off")),
                      "default": side("default", tinyseg_predict, replace(job, settings="default"))}, repeats)
    table = {"tta_off": compare(f"predict {label}, TTA off (images/s)", runs["reference"], runs["tta-off"]),
             "default": compare(f"predict {label}, default settings (images/s)", runs["reference"], runs["default"])}
    for key, name in (("reference", "reference"), ("tta-off", "tta_off"), ("default", "default")):
        table[f"{name}_runs"] = [vars(run) for run in found[key]]
    table["detections_per_image"] = {name: statistics.median(r.detections_per_image for r in found[key])
                                     for key, name in (("reference", "reference"), ("tta-off", "tta_off"),
                                                       ("default", "default"))}
    return table


def median_of(runs: list, field: str, scale: float = 1.0) -> float:
    return statistics.median(run[field] for run in runs) * scale


def roofline(results: dict, profile: dict, train_gflops: dict, peak: float, train_speed: float) -> dict:
    """gflops_per_image, achieved GFLOP/s and utilization for the backbone (timed inside prediction),
    the whole prediction (its images/s) and the training step (its images/s)."""
    flops = profile["gflops_per_image"]
    speeds = {"backbone": 1 / max(profile["seconds_per_image"]["backbone+FPN"], 1e-9),
              "predict": results["predict_resnet50"]["tta_off"]["tinyseg"], "train": train_speed}
    per_image = {"backbone": flops["backbone+FPN"], "predict": flops["total"], "train": train_gflops["total"]}
    return {"gflops_per_image": per_image,
            "achieved_gflops": {k: per_image[k] * speeds[k] for k in per_image},
            "utilization": {k: utilization(per_image[k], speeds[k], peak) for k in per_image}}


def measure_peaks(dtype: torch.dtype, small: bool) -> dict[str, dict[str, float]]:
    """The dense peaks in the dtype tinyseg's backbone runs ("model") and in fp32."""
    model = dense_peaks(DEVICE, dtype, small)
    return {"model": model, "fp32": model if dtype == torch.float32 else dense_peaks(DEVICE, torch.float32, small)}


def describe_peaks(peaks: dict[str, dict[str, float]], dtype: torch.dtype) -> str:
    shown = {str(dtype).replace("torch.", ""): peaks["model"]}
    if dtype != torch.float32:
        shown["fp32"] = peaks["fp32"]
    return "; ".join(f"{label} " + ", ".join(f"{kernel} {value:.0f}" for kernel, value in values.items())
                     for label, values in shown.items()) + " GFLOP/s"


def print_profile(name: str, profile: dict) -> None:
    seconds = profile["seconds_per_image"]
    print(f"stages of {name} ({profile['detections_per_image']:.0f} detections/image), ms per image: "
          + ", ".join(f"{stage} {value * 1000:.0f}" for stage, value in seconds.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="R50 only, 512 px, fewer steps: under 6 minutes on 2 CPU cores")
    parser.add_argument("--smoke", action="store_true", help="generated data, R18 at 96 px, 1 image, 1 repeat: seconds")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="tinyvoc", help="whose predict settings the default-settings run uses")
    parser.add_argument("--checkpoint", default="", help="also measure this trained checkpoint (its own settings)")
    parser.add_argument("--checkpoint-json", default="", help="its images (default: nuclei val; --smoke: generated)")
    parser.add_argument("--checkpoint-images", default="")
    parser.add_argument("--reference-amp", action="store_true", help="the reference under autocast too (AMP on both sides)")
    parser.add_argument("--json")
    args = parser.parse_args()
    global DEVICE, DATA, REFERENCE_AMP, SMALL
    DEVICE, REFERENCE_AMP, SMALL = args.device, args.reference_amp, args.smoke
    with tempfile.TemporaryDirectory() as scratch:
        if args.smoke:
            DATA = smoke_data(Path(scratch))
        elif not VOC.exists() or not NUCLEI.exists():
            print(f"needs the real data in {SHARED} (or --smoke)", file=sys.stderr)
            return 2
        if args.checkpoint and not Path(args.checkpoint).is_file():
            print(f"--checkpoint {args.checkpoint}: no such file", file=sys.stderr)
            return 2
        return run(args)


def run(args: argparse.Namespace) -> int:
    size, steps, count = (96, 1, 1) if args.smoke else (512, 2, 6) if args.quick else (800, 4, 20)
    repeats = args.repeats or (1 if args.smoke else 2 if args.quick else 3)
    backbone = "resnet18" if args.smoke else "resnet50"
    backbones = [backbone] if args.smoke or args.quick else ["resnet50", "resnet152"]
    info, amp = machine_info(), tinyseg_amp(DEVICE)
    peak_dtype = amp or torch.float32
    print(f"machine: {machine()}; GPU {info['gpu_name']}; commit {commit()}; size {size}px, batch 2, {repeats} repeats")
    peaks = {"start": measure_peaks(peak_dtype, args.smoke)}
    print(f"dense peak before: {describe_peaks(peaks['start'], peak_dtype)}")
    results: dict = {"machine": machine(), **info, "gpu": info["gpu_name"], "device": DEVICE, "commit": commit(),
                     "size": size, "repeats": repeats, "amp": str(amp), "smoke": args.smoke, "preset": args.preset,
                     "reference_amp": str(reference_amp(DEVICE, REFERENCE_AMP)), "peak_gflops_dtype": str(peak_dtype)}
    for name in backbones:
        results[f"train_{name}"] = side_by_side(
            f"train {name} (images/s)",
            lambda: track_gpu_peak(f"reference {name}", lambda: reference_train(name, size, steps)),
            lambda: track_gpu_peak(f"tinyseg {name}", lambda: tinyseg_train(name, size, steps)), repeats)

    job = PredictJob(tuple(predict_entries(count)), DEVICE, backbone, size, preset=args.preset,
                     reference_amp=REFERENCE_AMP, small=SMALL)
    table = predict_table(f"{backbone} random weights", job, repeats)
    results["predict_resnet50"] = table  # the key of earlier result files, whatever the backbone
    gt, detections = shifted_detections(DATA.eval_gt)
    # equal up to the last bits of a float sum (the two libraries average in different orders)
    difference = max(abs(a - b) for a, b in zip(reference_evaluate(gt, detections), tinyseg_evaluate(gt, detections)))
    if difference > 1e-12:
        print(f"evaluation numbers differ between pycocotools and tinyseg by up to {difference}", file=sys.stderr)
        return 1
    results["evaluate"] = side_by_side("evaluate nuclei val segm (seconds)", lambda: timed(lambda: reference_evaluate(gt, detections)),
                                       lambda: timed(lambda: tinyseg_evaluate(gt, detections)), repeats, higher_is_better=False)
    ref_rss, our_rss = (median_of(table[key], "rss_kib", 1 / 1024) for key in ("reference_runs", "tta_off_runs"))
    rss_ratio = our_rss / ref_rss
    print(f"{'peak RSS of predict (MiB)':<42s} reference {ref_rss:10.0f}   tinyseg {our_rss:10.0f}   ratio {rss_ratio:5.2f} (tinyseg / reference)")
    results.update({"train_ratio": results[f"train_{backbone}"]["ratio"], "predict_ratio": table["tta_off"]["ratio"],
                    "predict_default_ratio": table["default"]["ratio"], "eval_ratio": results["evaluate"]["ratio"],
                    "rss_ratio": rss_ratio, "rss_mib": {"reference": ref_rss, "tinyseg": our_rss}, "eval_identical": True,
                    "eval_max_abs_difference": difference})

    # where the time goes, and how much of the machine it uses (tinyseg's side only)
    results["stages"] = {"random_tta_off": profile_tinyseg(job, flops=True),
                         "random_default": profile_tinyseg(replace(job, settings="default"), flops=False)}
    train_gflops = tinyseg_train_gflops(backbone, size)
    peaks["end"] = measure_peaks(peak_dtype, args.smoke)
    print(f"dense peak after: {describe_peaks(peaks['end'], peak_dtype)}")
    peak, peak_fp32 = (max(max(at[dtype].values()) for at in peaks.values()) for dtype in ("model", "fp32"))
    results.update(roofline(results, results["stages"]["random_tta_off"], train_gflops, peak,
                            results[f"train_{backbone}"]["tinyseg"]))
    results.update({"peak_gflops": peak, "peak_gflops_fp32": peak_fp32, "peak_measurements": peaks,
                    "train_gflops_by_stage": train_gflops})
    if args.checkpoint:
        checkpoint_json = args.checkpoint_json or str(DATA.checkpoint_json)
        checkpoint_images = args.checkpoint_images or str(DATA.checkpoint_images)
        trained = replace(job, entries=tuple(entries_of(Path(checkpoint_json), Path(checkpoint_images), count)),
                          checkpoint=str(Path(args.checkpoint).resolve()))
        checkpoint_table = predict_table("trained checkpoint", trained, repeats)
        results.update({"checkpoint": args.checkpoint, "checkpoint_images": checkpoint_json,
                        "checkpoint_predict": checkpoint_table,
                        "checkpoint_predict_ratio": checkpoint_table["tta_off"]["ratio"],
                        "checkpoint_predict_default_ratio": checkpoint_table["default"]["ratio"],
                        "checkpoint_detections_per_image": checkpoint_table["detections_per_image"]})
        results["stages"]["checkpoint_default"] = profile_tinyseg(replace(trained, settings="default"), flops=True)
    else:
        results.update({"checkpoint": None, "checkpoint_note": "no --checkpoint: random weights only "
                        "(score threshold 0, 100 detections per image: the worst case for pasting and encoding)"})
    for name, profile in results["stages"].items():
        print_profile(name, profile)
    print("GFLOP per image: " + ", ".join(f"{k} {v:.1f}" for k, v in results["gflops_per_image"].items())
          + f"; utilization of the {peak:.0f} GFLOP/s dense peak: "
          + ", ".join(f"{k} {v:.1%}" for k, v in results["utilization"].items()))
    if max(results["utilization"].values()) > 1:
        results["utilization_warning"] = ("utilization above 100%: most likely the peak measurements were slowed "
                                          "(another process, the CPU's clock); rerun with nothing else running")
        print(results["utilization_warning"], file=sys.stderr)
    if DEVICE.startswith("cuda"):
        results["train_gpu_peak_mib"] = TRAIN_GPU_PEAK_MIB
        print("peak GPU memory of training (MiB):", ", ".join(f"{k} {v:.0f}" for k, v in TRAIN_GPU_PEAK_MIB.items()))
        results["predict_gpu_peak_mib"] = {"reference": median_of(table["reference_runs"], "gpu_mib"),
                                           "tinyseg": median_of(table["tta_off_runs"], "gpu_mib")}
    write_result(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
