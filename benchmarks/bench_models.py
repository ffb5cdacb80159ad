"""The models of the speed benchmarks (throughput.py, speedups.py) and the process measurements they share."""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from roofline import synchronize  # noqa: E402
from tinyseg.config import InputConfig, ModelConfig, PredictConfig  # noqa: E402


def tinyseg_amp(device: str):
    from tinyseg.runtime.precision import resolve_amp

    return resolve_amp("auto", torch.device(device))  # bf16 on CPUs that have it; fp16/bf16 on CUDA


def reference_amp(device: str, enabled: bool):
    """The reference's autocast dtype with --reference-amp on CUDA: tinyseg's own choice, so both sides
    run the same precision; None (fp32, the tutorial) otherwise. Not on a CPU: the reference loop there is
    torchvision's fp32 tutorial, what a CPU user without tinyseg runs (bf16 is slower than fp32 on CPUs
    without native bf16)."""
    return tinyseg_amp(device) if enabled and device.startswith("cuda") else None


# --smoke: the tests' narrow heads (tests/conftest.py TINY), so that 100 detections on a 2-core CPU
# take milliseconds: with 256 channels the mask head alone is about 1 GFLOP per detection.
SMALL_HEADS = {"fpn_channels": 32, "box_head_dim": 128, "rpn_post_nms_top_n_test": 200}


def benchmark_model(backbone: str, size: int, small: bool = False) -> torch.nn.Module:
    """The model of every speed measurement, before any precision or layout setting: frozen BN (as a
    user with ImageNet weights trains it), random weights, score threshold 0 (every image gets a full
    set of detections to paste and encode)."""
    from tinyseg.model import build_model

    torch.manual_seed(0)
    config = ModelConfig(backbone=backbone, init="none", norm="frozen_bn", **(SMALL_HEADS if small else {}))
    return build_model(config, 21, test=InputConfig(test_min_size=size, test_max_size=1333),
                       predict=PredictConfig(score_thresh=0.0))


def build(backbone: str, size: int, reference_side: bool, device: str = "cpu", training: bool = True,
          small: bool = False):
    """The benchmark model for one side: the reference resizes inside the model; tinyseg's training side
    gets the trainer's precision settings (its prediction side gets prepare_for_inference instead)."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    from tinyseg.model import set_precision

    model = benchmark_model(backbone, size, small)  # same architecture and weights on both sides
    if reference_side:  # the tutorial model resizes inside, in training too
        model.transform = GeneralizedRCNNTransform(size, 1333, model.transform.image_mean, model.transform.image_std)
    elif training:  # what the trainer sets; prediction gets prepare_for_inference instead
        set_precision(model, tinyseg_amp(device), True)
    torch.backends.cudnn.benchmark = not reference_side
    return model.to(device)


def reference_checkpoint_model(path: str, device: str):
    """A trained tinyseg checkpoint as the reference would run it: the same architecture and weights,
    torchvision's resizing transform at the run's test size, fp32, none of tinyseg's inference
    settings; the run's own score threshold, so both sides keep the same (realistic) detections."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    from tinyseg.config import config_from_dict
    from tinyseg.data.coco import CategoryMap
    from tinyseg.runtime.checkpoint import load_checkpoint
    from tinyseg.model import build_model

    state = load_checkpoint(path)
    config = config_from_dict(state["config"])
    categories = CategoryMap.from_dict(state["categories"])
    i = config.input
    model = build_model(config.model, categories.num_classes, load_weights=False, test=config.input,
                        predict=config.predict)
    model.load_state_dict(state.get("ema") or state["model"])
    model.transform = GeneralizedRCNNTransform(i.test_min_size, i.test_max_size, model.transform.image_mean,
                                               model.transform.image_std)
    torch.backends.cudnn.benchmark = False
    return model.to(device).eval(), categories, config


def peak_rss_kib() -> int:
    """This process's peak resident memory. Linux keeps ru_maxrss across exec, so a spawned child would
    report its parent's peak at fork time; VmHWM belongs to the child's own address space."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def gpu_peak_mib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else 0.0


def timed(function, device: str = "cpu") -> float:
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start
