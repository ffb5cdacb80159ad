"""tinyseg against the reference loop (benchmarks/reference_loop.py), side by side in one process.

    python benchmarks/throughput.py --quick --json benchmarks/results/throughput-quick.json

Measures, on the same model architecture, image size and images:
- a training step (images/s), R50-FPN (and R152-FPN without --quick), on real Tiny VOC photos;
- prediction from image files to a written submission JSON (images/s), on Tiny VOC and nuclei images;
- evaluation of a many-instance result set on nuclei val: faster-coco-eval vs pycocotools (seconds),
  with the 12 numbers checked equal;
- peak RSS of each side's prediction job, each in a fresh process, and peak GPU memory on CUDA.
On CUDA (--device cuda, the default when a GPU is present) tinyseg uses its CUDA settings: fp16/bf16
AMP, channels_last, cudnn.benchmark, batched prediction with loader workers; the reference stays fp32.
Each side runs alternately `--repeats` times; the table shows medians and tinyseg/reference ratios.
Weights are random (nothing pretrained is reachable here), so prediction keeps every detection
(score threshold 0): 100 masks per image, the heaviest case for pasting and encoding.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

import reference_loop as reference  # noqa: E402
from recipe import commit, machine, write_result  # noqa: E402
from tinyseg.config import InputConfig, ModelConfig  # noqa: E402

SHARED = ROOT.parent / "shared" / "datasets"
VOC, NUCLEI = SHARED / "tinyvoc", SHARED / "nuclei"
DEVICE = "cpu"  # set from --device in main(); the fresh prediction processes get it as an argument


def tinyseg_amp(device: str):
    from tinyseg.engine.precision import resolve_amp

    return resolve_amp("auto", torch.device(device))  # bf16 on CPUs that have it; fp16/bf16 on CUDA


def benchmark_model(backbone: str, size: int) -> torch.nn.Module:
    """The model of every speed measurement, before any precision or layout setting: frozen BN (as a
    user with ImageNet weights trains it), random weights, score threshold 0 (every image gets a full
    set of detections to paste and encode)."""
    from tinyseg.model import build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(backbone=backbone, init="none", norm="frozen_bn"), 21, size, 1333, score_thresh=0.0)


def build(backbone: str, size: int, reference_side: bool, device: str = "cpu", training: bool = True):
    """The benchmark model for one side: the reference resizes inside the model; tinyseg's training side
    gets the trainer's precision settings (its prediction side gets prepare_for_inference instead)."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    from tinyseg.model import set_precision

    model = benchmark_model(backbone, size)  # same architecture and weights on both sides
    if reference_side:  # the tutorial model resizes inside, in training too
        model.transform = GeneralizedRCNNTransform(size, 1333, model.transform.image_mean, model.transform.image_std)
    elif training:  # what the trainer sets; prediction gets prepare_for_inference instead
        set_precision(model, tinyseg_amp(device), True)
    torch.backends.cudnn.benchmark = not reference_side
    return model.to(device)


def peak_rss_kib() -> int:
    """This process's peak resident memory. Linux keeps ru_maxrss across exec, so a spawned child would
    report its parent's peak at fork time; VmHWM belongs to the child's own address space."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gpu_peak_mib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else 0.0


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
    synchronize(DEVICE)
    start = time.perf_counter()
    function()
    synchronize(DEVICE)
    return time.perf_counter() - start


# -- training ------------------------------------------------------------------------------------
def reference_train(backbone: str, size: int, steps: int) -> float:
    model = build(backbone, size, True, DEVICE)
    loader = torch.utils.data.DataLoader(reference.TutorialDataset(str(VOC / "pascal_train_sample.json"),
                                                                   str(VOC / "train_sample")),
                                         batch_size=2, shuffle=True, num_workers=2, collate_fn=reference.collate)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.005, momentum=0.9)
    reference.train_steps(model, loader, optimizer, 1, DEVICE)  # warm-up
    seconds = timed(lambda: reference.train_steps(model, loader, optimizer, steps, DEVICE))
    return steps * 2 / seconds


def tinyseg_train(backbone: str, size: int, steps: int) -> float:
    from tinyseg.data.coco import load_coco
    from tinyseg.data.dataset import InstanceDataset, collate
    from tinyseg.data.presets import train_transforms
    from tinyseg.data.samplers import TrainBatchSampler

    data = load_coco(VOC / "pascal_train_sample.json")
    dataset = InstanceDataset(data.images, VOC / "train_sample", data.categories,
                              train_transforms(InputConfig(min_size=[size], max_size=1333)))
    sampler = TrainBatchSampler(dataset.aspect_ratios(), 2, seed=0)
    cuda = DEVICE.startswith("cuda")
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=2, collate_fn=collate,
                                         persistent_workers=True, pin_memory=cuda)
    model = build(backbone, size, False, DEVICE).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.005, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and tinyseg_amp(DEVICE) == torch.float16)

    def run(count: int) -> None:
        done = 0
        while done < count:
            for images, targets in loader:
                images = [image.to(DEVICE, non_blocking=True) for image in images]
                targets = [{k: v.to(DEVICE, non_blocking=True) if isinstance(v, torch.Tensor) else v
                            for k, v in t.items()} for t in targets]
                losses = model(images, targets)
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


# -- prediction ----------------------------------------------------------------------------------
def predict_entries(count: int) -> list[tuple[str, int, str]]:
    voc = json.loads((VOC / "test.json").read_text())["images"][:count]
    nuclei = json.loads((NUCLEI / "val.json").read_text())["images"][: max(1, count // 4)]
    return [(str(VOC / "test_images"), i["id"], i["file_name"]) for i in voc] + \
           [(str(NUCLEI / "images"), i["id"], i["file_name"]) for i in nuclei]


def reference_predict(backbone: str, size: int, count: int, device: str = "cpu") -> tuple[float, int, float]:
    global DEVICE
    DEVICE = device
    model = build(backbone, size, True, device)
    entries = predict_entries(count)
    with tempfile.TemporaryDirectory() as scratch:
        def run():
            for folder in sorted({e[0] for e in entries}):
                reference.predict_to_file(model, [(i, f) for d, i, f in entries if d == folder], folder,
                                          f"{scratch}/{Path(folder).name}.json", device=device)
        seconds = timed(run)
    return len(entries) / seconds, peak_rss_kib(), gpu_peak_mib(device)


def tinyseg_predict(backbone: str, size: int, count: int, device: str = "cpu") -> tuple[float, int, float]:
    from tinyseg.data.coco import CategoryMap
    from tinyseg.data.dataset import ImageListDataset
    from tinyseg.inference.predictor import predict_images
    from tinyseg.inference.submission import write_submission
    from tinyseg.model import prepare_for_inference

    global DEVICE
    DEVICE = device
    cpu = device == "cpu"
    # what `tinyseg predict` does (inference/predictor.py::load_model, inference/run.py::run_predict)
    model = prepare_for_inference(build(backbone, size, False, device, training=False), tinyseg_amp(device), True)
    categories = CategoryMap(list(range(1, 21)), [str(i) for i in range(1, 21)])
    entries = predict_entries(count)
    with tempfile.TemporaryDirectory() as scratch:
        def run():
            for folder in sorted({e[0] for e in entries}):
                dataset = ImageListDataset([(i, f) for d, i, f in entries if d == folder], folder)
                found = predict_images(model, dataset, categories, torch.device(device), 0.5,
                                       batch_size=1 if cpu else 2, num_workers=0 if cpu else 2, progress=False)
                write_submission(f"{scratch}/{Path(folder).name}.json", found.results)
        seconds = timed(run)
    # On a CPU tinyseg predicts in-process (no loader workers), as the reference does, so both sides
    # count their own process only. (On CUDA the loader workers' memory is not counted.)
    return len(entries) / seconds, peak_rss_kib(), gpu_peak_mib(device)


def _child(queue, function, args) -> None:
    queue.put(function(*args))


def in_fresh_process(function, *args):
    """Run a job in a new (non-daemonic) process, so that its peak RSS is its own and it may start workers."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, function, args))
    process.start()
    result = queue.get()
    process.join()
    return result


# -- evaluation ----------------------------------------------------------------------------------
def nuclei_detections() -> tuple[dict, list[dict]]:
    """Ground truth of nuclei val and a realistic result set: each instance shifted a little, plus misses."""
    import numpy as np
    from pycocotools import mask as mask_utils

    gt = json.loads((NUCLEI / "val.json").read_text())
    sizes = {i["id"]: (i["height"], i["width"]) for i in gt["images"]}
    rng = np.random.default_rng(0)
    detections = []
    for annotation in gt["annotations"]:
        if rng.random() < 0.1:
            continue
        mask = mask_utils.decode({**annotation["segmentation"], "counts": annotation["segmentation"]["counts"].encode()})
        mask = np.roll(mask, tuple(rng.integers(-2, 3, size=2)), axis=(0, 1))
        rle = mask_utils.encode(np.asfortranarray(mask))
        rle["counts"] = rle["counts"].decode()
        detections.append({"image_id": annotation["image_id"], "category_id": 1, "score": float(rng.random()),
                           "segmentation": rle})
    assert sizes
    return gt, detections


def reference_evaluate(gt: dict, detections: list[dict]) -> list[float]:
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes([dict(d) for d in detections]), "segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats]


def tinyseg_evaluate(gt: dict, detections: list[dict]) -> list[float]:
    from tinyseg.evaluation.coco_eval import STAT_NAMES, evaluate_detections

    stats = evaluate_detections(gt, detections, ("segm",))["segm"]["stats"]
    return [stats[name] for name in STAT_NAMES]


# -- the table -----------------------------------------------------------------------------------
def side_by_side(name: str, reference_fn, tinyseg_fn, repeats: int, higher_is_better: bool = True) -> dict:
    ref, ours = [], []
    for _ in range(repeats):
        ref.append(reference_fn())
        ours.append(tinyseg_fn())
    r, t = statistics.median(ref), statistics.median(ours)
    ratio = t / r if higher_is_better else r / t
    print(f"{name:<34s} reference {r:10.3f}   tinyseg {t:10.3f}   ratio {ratio:5.2f}x   "
          f"(runs: ref {', '.join(f'{v:.3f}' for v in ref)}; tinyseg {', '.join(f'{v:.3f}' for v in ours)})", flush=True)
    return {"reference": r, "tinyseg": t, "ratio": ratio, "reference_runs": ref, "tinyseg_runs": ours}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="R50 only, 512 px, fewer steps: under 5 minutes on 2 CPU cores")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not VOC.exists() or not NUCLEI.exists():
        print(f"needs the real data in {SHARED}", file=sys.stderr)
        return 2
    global DEVICE
    DEVICE = args.device
    size = 512 if args.quick else 800
    repeats = args.repeats or (2 if args.quick else 3)
    steps, count = (2, 6) if args.quick else (4, 20)
    backbones = ["resnet50"] if args.quick else ["resnet50", "resnet152"]
    gpu = torch.cuda.get_device_name() if DEVICE.startswith("cuda") else "none"
    print(f"machine: {machine()}; GPU {gpu}; commit {commit()}; size {size}px, batch 2, {repeats} repeats")
    results: dict = {"machine": machine(), "gpu": gpu, "device": DEVICE, "commit": commit(), "size": size,
                     "repeats": repeats, "amp": str(tinyseg_amp(DEVICE))}
    for backbone in backbones:
        results[f"train_{backbone}"] = side_by_side(
            f"train {backbone} (images/s)",
            lambda: track_gpu_peak(f"reference {backbone}", lambda: reference_train(backbone, size, steps)),
            lambda: track_gpu_peak(f"tinyseg {backbone}", lambda: tinyseg_train(backbone, size, steps)), repeats)
    ref_rss, our_rss, ref_gpu, our_gpu = [], [], [], []

    def ref_predict():
        speed, rss, gpu_mib = in_fresh_process(reference_predict, "resnet50", size, count, DEVICE)
        ref_rss.append(rss)
        ref_gpu.append(gpu_mib)
        return speed

    def our_predict():
        speed, rss, gpu_mib = in_fresh_process(tinyseg_predict, "resnet50", size, count, DEVICE)
        our_rss.append(rss)
        our_gpu.append(gpu_mib)
        return speed

    results["predict_resnet50"] = side_by_side("predict to submission (images/s)", ref_predict, our_predict, repeats)
    gt, detections = nuclei_detections()
    if reference_evaluate(gt, detections) != tinyseg_evaluate(gt, detections):
        print("evaluation numbers differ between pycocotools and tinyseg", file=sys.stderr)
        return 1
    results["evaluate"] = side_by_side("evaluate nuclei val segm (seconds)", lambda: timed(lambda: reference_evaluate(gt, detections)),
                                       lambda: timed(lambda: tinyseg_evaluate(gt, detections)), repeats, higher_is_better=False)
    rss_ratio = statistics.median(our_rss) / statistics.median(ref_rss)
    print(f"{'peak RSS of predict (MiB)':<34s} reference {statistics.median(ref_rss) / 1024:10.0f}   "
          f"tinyseg {statistics.median(our_rss) / 1024:10.0f}   ratio {rss_ratio:5.2f} (tinyseg / reference)")
    results.update({"train_ratio": results["train_resnet50"]["ratio"], "predict_ratio": results["predict_resnet50"]["ratio"],
                    "eval_ratio": results["evaluate"]["ratio"], "rss_ratio": rss_ratio,
                    "rss_mib": {"reference": statistics.median(ref_rss) / 1024, "tinyseg": statistics.median(our_rss) / 1024},
                    "eval_identical": True})
    if DEVICE.startswith("cuda"):
        results["train_gpu_peak_mib"] = TRAIN_GPU_PEAK_MIB
        print("peak GPU memory of training (MiB):", ", ".join(f"{k} {v:.0f}" for k, v in TRAIN_GPU_PEAK_MIB.items()))
        results["predict_gpu_peak_mib"] = {"reference": statistics.median(ref_gpu), "tinyseg": statistics.median(our_gpu)}
        print(f"{'peak GPU memory of predict (MiB)':<34s} reference {statistics.median(ref_gpu):10.0f}   "
              f"tinyseg {statistics.median(our_gpu):10.0f}")
    write_result(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
