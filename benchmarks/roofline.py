"""How close a measured speed is to what the machine could do: FLOPs counted, a matmul peak measured in
the same run, and where prediction's time goes, stage by stage.

- dense_peaks: the best GFLOP/s of a large square matmul and of a 3 x 3 convolution (the fastest dense
  kernels the BLAS / oneDNN / cuBLAS / cuDNN of this torch offers) on the same cores, threads and dtype as
  the model; throughput.py measures them before and after its random-weight measurements and takes the
  best as the peak, since one disturbed half-second can halve a measurement on a shared machine;
- count_flops: torch.utils.flop_counter over one call, per module (convolutions, matmuls; RoIAlign,
  NMS and pasting count zero, so utilization is of the dense work only);
- StageTimer: wall time per stage of tinyseg's prediction loop, from forward hooks on the model's parts
  and wrappers around the paste + RLE and TTA-merge functions.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

STAGES = ("preprocess", "backbone+FPN", "RPN", "box head", "mask head", "postprocess", "paste + RLE", "TTA merge",
          "other")
MASK_PARTS = ("mask_roi_pool", "mask_head", "mask_predictor")


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _best_gflops(function, flops: float, device: str, min_seconds: float) -> float:
    """The best GFLOP/s of function() (flops each), repeated at least 3 times and min_seconds in all, after
    a warm-up call (kernel selection, page faults).

    The best run, not the median: the peak is a ceiling, and on a shared machine slow runs are other
    people's work, not the kernel's.
    """
    function()
    best, spent, runs = float("inf"), 0.0, 0
    while runs < 3 or spent < min_seconds:
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        elapsed = time.perf_counter() - start
        best, spent, runs = min(best, elapsed), spent + elapsed, runs + 1
    return flops / best / 1e9


def peak_matmul_gflops(device: str = "cpu", dtype: torch.dtype = torch.float32, size: int | None = None,
                       min_seconds: float = 0.5) -> float:
    """The best GFLOP/s of size x size matmuls (2048 on a CPU, 8192 on CUDA), as _best_gflops runs them."""
    size = size or (8192 if torch.device(device).type == "cuda" else 2048)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    return _best_gflops(lambda: torch.mm(a, b, out=out), 2 * size**3, device, min_seconds)


def peak_conv_gflops(device: str = "cpu", dtype: torch.dtype = torch.float32, size: int | None = None,
                     channels: int = 256, min_seconds: float = 0.5) -> float:
    """The best GFLOP/s of a 3 x 3 convolution, channels x channels on a size x size channels-last map
    (size 128 on a CPU, 256 on CUDA): the backbone's own kernel. oneDNN's convolutions can outrun its
    matmul (on an AMD Zen 4, bf16: about 460 against 420 GFLOP/s), so a matmul alone is not a ceiling for
    a convolutional model. fp32 on CUDA runs without TF32, as the fp32 matmul does by default."""
    size = size or (256 if torch.device(device).type == "cuda" else 128)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, channels, size, size, generator=generator).to(device=device, dtype=dtype,
                                                                    memory_format=torch.channels_last)
    w = torch.randn(channels, channels, 3, 3, generator=generator).to(device=device, dtype=dtype,
                                                                     memory_format=torch.channels_last)
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        return _best_gflops(lambda: torch.conv2d(x, w, padding=1), 2 * channels**2 * 9 * size**2, device, min_seconds)


def dense_peaks(device: str = "cpu", dtype: torch.dtype = torch.float32, small: bool = False) -> dict[str, float]:
    """GFLOP/s of the matmul and the 3 x 3 convolution (small: tiny sizes, for --smoke)."""
    size, seconds = (64, 0.05) if small else (None, 0.5)
    return {"matmul": peak_matmul_gflops(device, dtype, size and 4 * size, seconds),
            "conv3x3": peak_conv_gflops(device, dtype, size and size // 2, 32 if small else 256, seconds)}


def utilization(gflops_per_image: float, images_per_s: float, peak_gflops: float) -> float:
    """Achieved GFLOP/s (work per image x images per second) as a share of the peak."""
    return gflops_per_image * images_per_s / peak_gflops if peak_gflops > 0 else 0.0


def count_flops(function) -> tuple[dict[str, int], object]:
    """FLOPs of one call, per module path ("Global" is everything, "MaskRCNN.backbone" a part), and
    what the call returned. A backward pass inside the call is counted too (to its modules)."""
    with FlopCounterMode(display=False) as counter:
        value = function()
    return {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}, value


def model_flops(counts: dict[str, int], model: nn.Module) -> dict[str, int]:
    """Per-stage FLOPs of a Mask R-CNN from count_flops' module paths: backbone+FPN, RPN, box head (the
    RoI heads less the mask branch), mask head, the whole model and everything counted ("total", which
    adds what ran outside the model, e.g. TTA's mask voting)."""
    root = type(model).__name__

    def part(path: str) -> int:
        return counts.get(f"{root}.{path}", 0)

    mask = sum(part(f"roi_heads.{name}") for name in MASK_PARTS)
    return {"backbone+FPN": part("backbone"), "RPN": part("rpn"), "box head": part("roi_heads") - mask,
            "mask head": mask, "model": counts.get(root, 0), "total": counts.get("Global", 0)}


class StageTimer:
    """Inside `with StageTimer(model):`, wall seconds per stage (STAGES) of tinyseg's prediction loop.

    Forward hooks time the model's parts (with a CUDA synchronize at each edge, so a GPU's queued work
    is charged to the stage that queued it); the box head is the RoI heads less the mask branch, which
    runs inside them. "other" is the wall time no stage claims: image decoding, the loader, TTA's
    flips, writing the JSON. The hooks cost a few microseconds each; use a separate untimed run for
    images/s.
    """

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu"):
        self.model, self.device = model, torch.device(device)
        self.seconds: dict[str, float] = defaultdict(float)
        self._handles: list = []
        self._patched: list[tuple[object, str, object]] = []
        self._starts: dict[int, float] = {}

    def _now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def _hook(self, module: nn.Module | None, stage: str) -> None:
        if module is None:
            return

        def before(mod, args):
            self._starts[id(mod)] = self._now()

        def after(mod, args, output):
            self.seconds[stage] += self._now() - self._starts.pop(id(mod))

        self._handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def _wrap(self, owner: object, name: str, stage: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = self._now()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[stage] += self._now() - start

        # an instance attribute (a bound method) or a module global: restored as it was on exit
        self._patched.append((owner, name, owner.__dict__.get(name, _ABSENT) if isinstance(owner, nn.Module) else original))
        setattr(owner, name, timed)

    def __enter__(self) -> "StageTimer":
        from tinyseg.inference import predictor, tta

        model, heads = self.model, self.model.roi_heads
        self._hook(model.transform, "preprocess")
        self._hook(model.backbone, "backbone+FPN")
        self._hook(model.rpn, "RPN")
        self._hook(heads, "roi heads")
        for name in MASK_PARTS:
            self._hook(getattr(heads, name, None), "mask head")
        self._wrap(model.transform, "postprocess", "postprocess")
        self._wrap(predictor, "to_coco_results", "paste + RLE")
        self._wrap(tta, "merge_views", "TTA merge")
        self._start = self._now()
        return self

    def __exit__(self, *exc) -> None:
        wall = self._now() - self._start
        for handle in self._handles:
            handle.remove()
        for owner, name, original in reversed(self._patched):
            if original is _ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self.seconds["box head"] = self.seconds.pop("roi heads", 0.0) - self.seconds["mask head"]
        self.seconds["other"] = wall - sum(self.seconds[stage] for stage in STAGES if stage != "other")
        self.seconds["total"] = wall

    def per_image(self, images: int) -> dict[str, float]:
        return {stage: self.seconds.get(stage, 0.0) / max(images, 1) for stage in (*STAGES, "total")}


_ABSENT = object()
