"""Each speed-up measured alone: tinyseg's settings with one of them taken out (leave-one-out).

    python benchmarks/speedups.py --json benchmarks/results/speedups.json     # about 8 minutes on 2 cores

Same model (R50-FPN, frozen BN, random weights), image size (512 px) and real images as throughput.py.
Variants run in turn, `--repeats` times each (round-robin, so drifts in machine speed hit all alike);
the table gives each variant's median and its speed relative to tinyseg's full settings. Also measured:
the training data loader alone, with augmentation, against the model's training speed, so that a
loader that would starve the model shows up; and (--only preset-train) the training step of a CPU
preset's own model, data and settings on nuclei (`--preset`, default fast-cpu: GroupNorm, from scratch),
with the levers a CPU without a GPU has: bf16, channels_last, torch.compile (inductor) of the trunk and
FPN, fewer sampled RoIs per image (the box loss samples them; the mask loss runs on their positives).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from torchvision.ops import MultiScaleRoIAlign  # noqa: E402
from torchvision.ops import misc as misc_ops  # noqa: E402

from machine_info import commit, machine, write_result  # noqa: E402
from throughput import NUCLEI, VOC, benchmark_model, predict_entries, timed  # noqa: E402
from tinyseg.config import InputConfig  # noqa: E402

SIZE = 512
TRAIN_STEPS = 3

TRAIN_VARIANTS = {
    "tinyseg": {},
    "fp32 (no bf16 autocast)": {"amp": None},
    "no channels_last": {"channels_last": False},
    "torchvision FrozenBN (promotes to fp32)": {"torchvision_frozen_bn": True},
    "loader in the main process": {"workers": 0},
    "masks re-converted to RLE on every access": {"no_mask_cache": True},
    "torchvision's RoIAlign kernel": {"torchvision_roi_align": True},
}
PRESET_TRAIN_VARIANTS = {
    "tinyseg": {},
    "fp32 (no bf16 autocast)": {"amp": "none"},
    # set_precision keeps GroupNorm models channels-first on a CPU since 89bfab1; this forces the old layout
    "channels_last forced (as before 89bfab1)": {"force_channels_last": True},
    "torch.compile trunk+FPN (inductor)": {"compile_backbone": True},
    "128 sampled RoIs per image": {"overrides": ("model.box_batch_size_per_image=128",)},
    "64 sampled RoIs per image": {"overrides": ("model.box_batch_size_per_image=64",)},
    "torchvision's RoIAlign kernel": {"torchvision_roi_align": True},
}
PRESET_STEPS, PRESET_WARMUP = 10, 3  # whole nuclei images vary in size: a warm-up covers the compiler's recompile
PREDICT_VARIANTS = {
    "tinyseg": {},
    "fp32 (no bf16 anywhere)": {"amp": None},
    "heads in fp32": {"heads_fp32": True},
    "torchvision's RoIAlign kernel": {"torchvision_roi_align": True},
    "frozen BN not folded": {"no_fold": True},
    "weights cast by autocast per call": {"no_weight_cast": True},
    "full-size float masks pasted": {"paste_full": True},
    "no channels_last": {"channels_last": False},
    "batch of 2 images": {"batch": 2},
    "json.dump with indent": {"pretty_json": True},
}


def plain_model() -> torch.nn.Module:
    return benchmark_model("resnet50", SIZE)


# -- training ------------------------------------------------------------------------------------
def training_loader(workers: int, no_mask_cache: bool, input_cfg: InputConfig | None = None):
    from tinyseg.data.coco import load_coco
    from tinyseg.data.dataset import InstanceDataset, collate
    from tinyseg.data.augment import build
    from tinyseg.data.samplers import TrainBatchSampler

    data = load_coco(VOC / "pascal_train_sample.json")
    dataset = InstanceDataset(data.images, VOC / "train_sample", data.categories,
                              build(input_cfg or InputConfig(min_size=[SIZE], max_size=1333)).sample)
    if no_mask_cache:
        dataset._rle_cache = _NoCache()
    else:
        dataset.cache_masks()  # as the trainer does
    sampler = TrainBatchSampler(dataset.aspect_ratios(), 2, seed=0)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                                       persistent_workers=workers > 0)


class _NoCache(dict):
    def __contains__(self, key) -> bool:  # never a hit: every access converts the polygons again
        return False


def train_speed(amp=torch.bfloat16, channels_last=True, torchvision_frozen_bn=False, workers=2,
                no_mask_cache=False, torchvision_roi_align=False) -> float:
    from tinyseg.model import set_precision

    model = plain_model().train()
    if torchvision_roi_align:
        torchvision_poolers(model)
    if torchvision_frozen_bn:
        for module in model.modules():
            if isinstance(module, misc_ops.FrozenBatchNorm2d):
                module.__class__ = misc_ops.FrozenBatchNorm2d
    set_precision(model, amp, channels_last)
    loader = training_loader(workers, no_mask_cache)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.005, momentum=0.9)
    step = training_step(model, loader, optimizer)
    step()  # warm-up
    return TRAIN_STEPS * 2 / timed(lambda: [step() for _ in range(TRAIN_STEPS)])


def preset_train_speed(preset: str, amp: str | None = None, force_channels_last: bool = False,
                       compile_backbone: bool = False, overrides: tuple[str, ...] = (),
                       torchvision_roi_align: bool = False) -> float:
    """Images/s of the preset's training step (batch 1 as the CPU presets train) on nuclei train images."""
    from tinyseg.config import load_config
    from tinyseg.data.augment import build as build_augmentation
    from tinyseg.data.coco import load_coco
    from tinyseg.data.dataset import InstanceDataset, collate
    from tinyseg.model import build_model, set_precision
    from tinyseg.runtime.precision import resolve_amp
    from tinyseg.training.optim import build_optimizer

    cfg = load_config(preset, [*overrides, *([f"train.amp={amp}"] if amp else [])])
    data = load_coco(NUCLEI / "train.json")
    torch.manual_seed(0)
    model = build_model(cfg.model, data.categories.num_classes, test=cfg.input, predict=cfg.predict).train()
    set_precision(model, resolve_amp(cfg.train.amp, torch.device("cpu")), cfg.train.channels_last)
    if force_channels_last:
        model.backbone.channels_last = True
        model.backbone.to(memory_format=torch.channels_last)
    if torchvision_roi_align:
        torchvision_poolers(model)
    if compile_backbone:  # in place: the module keeps its parameter names (a checkpoint would load as before)
        model.backbone.body.compile(dynamic=True)
        model.backbone.fpn.compile(dynamic=True)
    dataset = InstanceDataset(data.images[:PRESET_STEPS + PRESET_WARMUP], NUCLEI / "images", data.categories,
                              build_augmentation(cfg.input).sample)
    dataset.cache_masks()
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=collate)
    optimizer = build_optimizer(model, cfg.solver)
    step = training_step(model, loader, optimizer)
    for _ in range(PRESET_WARMUP):
        step()
    return PRESET_STEPS / timed(lambda: [step() for _ in range(PRESET_STEPS)])


def torchvision_poolers(model) -> None:
    """torchvision's MultiScaleRoIAlign (its single-threaded CPU kernel) in place of tinyseg's gather."""
    for name in ("box_roi_pool", "mask_roi_pool"):
        pool = getattr(model.roi_heads, name)
        setattr(model.roi_heads, name, MultiScaleRoIAlign(pool.featmap_names, pool.output_size, pool.sampling_ratio))


def training_step(model, loader, optimizer):
    """One optimizer step on the loader's next batch, as a function (the loader restarts when spent)."""
    batches = iter(_forever(loader))

    def step() -> None:
        images, targets = next(batches)
        losses = model(list(images), list(targets))
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    return step


def _forever(loader):
    while True:
        yield from loader


def loader_speed(input_cfg: InputConfig, batches: int = 12) -> float:
    """Images/s of the training loader alone (2 workers), with the preset's augmentation."""
    loader = iter(_forever(training_loader(2, False, input_cfg)))
    next(loader)  # workers started
    return batches * 2 / timed(lambda: [next(loader) for _ in range(batches)])


# -- prediction ----------------------------------------------------------------------------------
def predict_speed(amp=torch.bfloat16, heads_fp32=False, torchvision_roi_align=False, no_fold=False,
                  no_weight_cast=False, paste_full=False, channels_last=True, batch=1, pretty_json=False) -> float:
    from tinyseg.data.coco import CategoryMap
    from tinyseg.data.dataset import ImageListDataset
    from tinyseg.inference.predictor import predict_images
    from tinyseg.inference.submission import submission_entries, write_submission
    from tinyseg.model import set_precision
    from tinyseg.model.detector import InferenceAmp
    from tinyseg.model.for_inference import cast_autocast_weights, conv_heads_channels_last, fold_frozen_batchnorm

    model = plain_model().eval()
    if not no_fold:
        fold_frozen_batchnorm(model.backbone.body)
    set_precision(model, amp, channels_last)
    if channels_last:
        conv_heads_channels_last(model)  # the steps of model/for_inference.py::prepare_for_inference, one by one
    if heads_fp32:
        for module in model.modules():
            if isinstance(module, InferenceAmp):
                module.amp_dtype = None
    if amp is not None and not no_weight_cast:
        cast_autocast_weights(model, amp)
    if torchvision_roi_align:
        torchvision_poolers(model)
    categories = CategoryMap(list(range(1, 21)), [str(i) for i in range(1, 21)])
    entries = predict_entries(6)

    def run() -> None:  # as throughput.py's tinyseg side: the library's loop, folder by folder
        with tempfile.TemporaryDirectory() as scratch:
            for folder in sorted({e[0] for e in entries}):
                dataset = ImageListDataset([(i, f) for d, i, f in entries if d == folder], folder)
                found = predict_images(model, dataset, categories, torch.device("cpu"), 0.5, batch_size=batch,
                                       progress=False, paste_full=paste_full)
                if pretty_json:
                    with open(f"{scratch}/s.json", "w") as handle:
                        json.dump(submission_entries(found.results), handle, indent=2)
                else:
                    write_submission(f"{scratch}/s.json", found.results)

    return len(entries) / timed(run)


# -- the table -----------------------------------------------------------------------------------
def measure(variants: dict, function, repeats: int, title: str, only: list[str] | None = None) -> dict:
    if only:
        unknown = set(only) - set(variants)
        if unknown:
            raise SystemExit(f"unknown variants {sorted(unknown)}; known: {list(variants)}")
        variants = {name: options for name, options in variants.items() if name == "tinyseg" or name in only}
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, options in variants.items():
            runs[name].append(function(**options))
    base = statistics.median(runs["tinyseg"])
    print(f"\n{title}\n{'variant':<44s} {'images/s':>9s} {'vs tinyseg':>10s}  runs")
    table = {}
    for name, values in runs.items():
        median = statistics.median(values)
        table[name] = {"images_per_s": median, "relative": median / base, "runs": values}
        print(f"{name:<44s} {median:9.3f} {median / base:9.2f}x  {', '.join(f'{v:.3f}' for v in values)}", flush=True)
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", choices=["train", "predict", "loader", "preset-train"])
    parser.add_argument("--preset", default="fast-cpu", help="--only preset-train: the preset whose training step is measured")
    parser.add_argument("--variants", nargs="+", help="with --only train, predict or preset-train: only these variants (names as in the table; tinyseg's own"
                        " settings are always run, as the baseline)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not VOC.exists() or not NUCLEI.exists():
        print(f"needs the real data in {VOC.parent}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    print(f"machine: {machine()}; commit {commit()}; R50-FPN, {SIZE} px, {args.repeats} repeats")
    results: dict = {"machine": machine(), "commit": commit(), "size": SIZE, "repeats": args.repeats}
    if args.only in (None, "train"):
        results["train"] = measure(TRAIN_VARIANTS, train_speed, args.repeats, "training step (batch 2)",
                                   args.variants if args.only else None)
    if args.only == "preset-train":  # not in the default set: a preset's own model, not the R50 of the rest
        results["preset"] = args.preset
        results["preset_train"] = measure(PRESET_TRAIN_VARIANTS, functools.partial(preset_train_speed, args.preset),
                                          args.repeats, f"{args.preset}'s training step on nuclei (batch 1)", args.variants)
    if args.only in (None, "predict"):
        results["predict"] = measure(PREDICT_VARIANTS, predict_speed, args.repeats, "prediction to a submission",
                                     args.variants if args.only else None)
    if args.only in (None, "loader"):
        presets = {"multi-scale 480-800 + flip (tinyvoc)": InputConfig(min_size=list(range(480, 801, 32)), max_size=1333),
                   "LSJ 384 + flip + photometric (scratch-cpu)": InputConfig(lsj=True, lsj_size=384, lsj_scale=[0.5, 1.5],
                                                                           photometric=True)}
        results["loader"] = {name: statistics.median(loader_speed(cfg) for _ in range(args.repeats))
                             for name, cfg in presets.items()}
        print("\ntraining loader alone, 2 workers (images/s):")
        for name, speed in results["loader"].items():
            print(f"{name:<44s} {speed:9.2f}")
    write_result(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
