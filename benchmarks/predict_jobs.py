"""The prediction jobs of throughput.py, each side in a fresh process, and tinyseg's stage profile.

A job is random weights (the worst case: score threshold 0, 100 detections an image) or a trained
checkpoint (the detections it really makes), with TTA off or with the settings users get by default:
the preset's predict section for random weights, the run's own for a checkpoint (TTA as shipped).
"""

from __future__ import annotations

import multiprocessing
import queue as queue_module
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

import reference_loop as reference  # noqa: E402
from bench_models import (build, gpu_peak_mib, peak_rss_kib, reference_amp, reference_checkpoint_model,  # noqa: E402
                          timed, tinyseg_amp)
from roofline import StageTimer, count_flops, model_flops  # noqa: E402

SETTINGS = ("tta-off", "default")


@dataclass(frozen=True)
class PredictJob:
    entries: tuple[tuple[str, int, str], ...]  # (image folder, image id, file name)
    device: str = "cpu"
    backbone: str = "resnet50"
    size: int = 512
    checkpoint: str = ""  # a trained tinyseg checkpoint; "" = random weights
    settings: str = "tta-off"  # or "default": the preset's (random weights) or the run's predict settings
    preset: str = "tinyvoc"  # whose predict settings "default" takes with random weights
    reference_amp: bool = False  # the reference under autocast too (AMP on both sides)
    small: bool = False  # bench_models.SMALL_HEADS (--smoke)

    def folders(self) -> list[str]:
        return sorted({folder for folder, _, _ in self.entries})

    def in_folder(self, folder: str) -> list[tuple[int, str]]:
        return [(image_id, name) for where, image_id, name in self.entries if where == folder]


@dataclass
class PredictRun:
    images_per_s: float
    rss_kib: int
    gpu_mib: float
    detections_per_image: float


def reference_predict(job: PredictJob) -> PredictRun:
    if job.checkpoint:
        model, categories, _ = reference_checkpoint_model(job.checkpoint, job.device)
        ids = categories.category_ids
    else:
        model, ids = build(job.backbone, job.size, True, job.device, small=job.small), None
    amp = reference_amp(job.device, job.reference_amp)
    written = 0
    with tempfile.TemporaryDirectory() as scratch:
        def run():
            nonlocal written
            for folder in job.folders():
                written += reference.predict_to_file(model, job.in_folder(folder), folder,
                                                     f"{scratch}/{Path(folder).name}.json", category_ids=ids,
                                                     device=job.device, amp=amp)
        seconds = timed(run, job.device)
    count = len(job.entries)
    return PredictRun(count / seconds, peak_rss_kib(), gpu_peak_mib(job.device), written / count)


def tinyseg_model(job: PredictJob):
    """(model, categories, predict settings) as `tinyseg predict` sets them up (inference/predictor.py::
    load_model); the settings are None for random weights with TTA off (score threshold 0, no TTA)."""
    from tinyseg.config import load_config
    from tinyseg.data.coco import CategoryMap
    from tinyseg.inference.predictor import load_model
    from tinyseg.config import InputConfig
    from tinyseg.model import apply_inference_settings, prepare_for_inference

    if job.checkpoint:
        loaded = load_model(job.checkpoint, job.device, {"tta": False} if job.settings == "tta-off" else None)
        return loaded.model, loaded.categories, loaded.config.predict
    model = build(job.backbone, job.size, False, job.device, training=False, small=job.small)
    predict = None
    if job.settings == "default":
        predict = load_config(job.preset).predict
        apply_inference_settings(model, InputConfig(test_min_size=job.size, test_max_size=1333), predict)
    prepare_for_inference(model, tinyseg_amp(job.device), True)
    return model, CategoryMap(list(range(1, 21)), [str(i) for i in range(1, 21)]), predict


def run_tinyseg(model, categories, predict, job: PredictJob, scratch: str, entries=None) -> int:
    """What `tinyseg predict` does (inference/jobs.py::predict_checkpoint), per image folder; detections written.

    On a CPU one image at a time with no loader workers, as `tinyseg predict` does there, so both sides
    count their own process only (on CUDA the loader workers' memory is not counted)."""
    from tinyseg.data.dataset import ImageListDataset
    from tinyseg.inference.predictor import predict_images
    from tinyseg.inference.submission import write_submission

    cpu = job.device == "cpu"
    mask_thresh = predict.mask_thresh if predict else 0.5
    batch = 1 if cpu else (predict.batch_size if predict else 2)
    written = 0
    for folder in job.folders():
        chosen = [e for e in (entries or job.entries) if e[0] == folder]
        if not chosen:
            continue
        dataset = ImageListDataset([(image_id, name) for _, image_id, name in chosen], folder)
        found = predict_images(model, dataset, categories, torch.device(job.device), mask_thresh, batch_size=batch,
                               num_workers=0 if cpu else 2, progress=False, tta=predict)
        written += write_submission(f"{scratch}/{Path(folder).name}.json", found.results)
    return written


def tinyseg_predict(job: PredictJob) -> PredictRun:
    model, categories, predict = tinyseg_model(job)
    written = 0
    with tempfile.TemporaryDirectory() as scratch:
        def run():
            nonlocal written
            written = run_tinyseg(model, categories, predict, job, scratch)
        seconds = timed(run, job.device)
    count = len(job.entries)
    return PredictRun(count / seconds, peak_rss_kib(), gpu_peak_mib(job.device), written / count)


def profile_tinyseg(job: PredictJob, flops: bool = True) -> dict:
    """Where tinyseg's prediction time goes: seconds per image by stage (roofline.STAGES), after a
    one-image warm-up, and GFLOP per image by stage from a second, uncounted-for-time pass."""
    model, categories, predict = tinyseg_model(job)
    count = len(job.entries)
    with tempfile.TemporaryDirectory() as scratch:
        run_tinyseg(model, categories, predict, job, scratch, entries=job.entries[:1])  # kernels picked, caches warm
        with StageTimer(model, job.device) as timer:
            written = run_tinyseg(model, categories, predict, job, scratch)
        profile = {"settings": job.settings, "tta": bool(predict and predict.tta), "images": count,
                   "detections_per_image": written / count, "seconds_per_image": timer.per_image(count)}
        if flops:
            counts, _ = count_flops(lambda: run_tinyseg(model, categories, predict, job, scratch))
            profile["gflops_per_image"] = {k: v / count / 1e9 for k, v in model_flops(counts, model).items()}
    return profile


def _child(queue, function, args) -> None:
    try:
        queue.put((True, function(*args)))
    except BaseException:  # the parent would otherwise wait for a result forever
        import traceback

        queue.put((False, traceback.format_exc()))


def in_fresh_process(function, *args):
    """Run a job in a new (non-daemonic) process, so that its peak RSS is its own and it may start workers."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, function, args))
    process.start()
    while True:
        try:
            ok, result = queue.get(timeout=5)
            break
        except queue_module.Empty:
            if not process.is_alive():  # killed (out of memory, a signal): no result will come
                raise RuntimeError(f"{function.__name__} died in its process (exit code {process.exitcode})") from None
    process.join()
    if not ok:
        raise RuntimeError(f"{function.__name__} failed in its process:\n{result}")
    return result
