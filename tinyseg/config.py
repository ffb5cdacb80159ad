"""The one config object: dataclasses, loaded from YAML, every field overridable as `section.key=value`.

A preset is a YAML file in tinyseg/configs/ that states only what differs from the defaults below, or from
the config it names as `base:`.
`--config` takes a preset name or a path; command-line `key=value` pairs are applied last.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config_rules import ConfigError, validate

PRESET_DIR = Path(__file__).parent / "configs"


@dataclass
class DataConfig:
    train_json: str = ""
    image_dir: str = ""
    val_json: str = ""  # explicit validation set; empty = split val_fraction off the training set
    val_image_dir: str = ""  # defaults to image_dir
    val_fraction: float = 0.1
    split_seed: int = 0
    # k-fold cross-validation of train_json (`tinyseg train --folds K`): K runs, each scored on one fold
    # (duplicates kept in one fold), seeded by split_seed; 0 = off, one ordinary run
    folds: int = 0
    train_negatives: bool = False  # keep images without annotations in training, as negatives
    num_workers: int = 2
    max_image_pixels: int = 40_000_000  # larger images are refused with a clear error
    # Evaluate on images that are also trained on: only to measure how well a model fits its own
    # training set, never for a number you report. Off, a val set that shares images is refused.
    allow_val_overlap: bool = False
    # The labels' format (docs/formats.md): auto = from the layout (a .json file is COCO, a .yaml a YOLO
    # dataset, a folder of labelme JSONs, a VOC folder); labelme, YOLO and VOC bring their own images.
    format: str = "auto"
    # Read iscrowd=1 RLE masks as objects: CVAT's COCO export marks every brush mask as a crowd.
    crowd_rle_as_instances: bool = False


@dataclass
class InputConfig:
    min_size: list[int] = field(default_factory=lambda: [800])  # short side; several = multi-scale
    max_size: int = 1333
    test_min_size: int = 800
    test_max_size: int = 1333
    hflip_prob: float = 0.5
    # The reference solution tripled the data: the original, a copy and one horizontally flipped copy.
    # copies=3 with flipped_copies=1 reproduces that; copies=1 is the usual one pass per epoch.
    copies: int = 1
    flipped_copies: int = 0
    photometric: bool = False  # brightness, contrast, saturation and hue jitter, each with p 0.5 (SSD's)
    # Photometric's channel shuffle as torchvision's RandomPhotometricDistort has it: it hides colour, which
    # tells fruits_nuts' classes apart (benchmarks/README.md, "fruits_nuts on Zen 4")
    channel_permutation: bool = False
    lsj: bool = False  # large-scale jitter: random resize by lsj_scale, then crop/pad to lsj_size
    lsj_scale: list[float] = field(default_factory=lambda: [0.1, 2.0])
    lsj_size: int = 1024
    copy_paste_prob: float = 0.0  # Simple Copy-Paste between the images of a batch
    # YOLO's mosaic: with this probability a training image is four, meeting at a random centre of a canvas twice
    # its size, zoomed by a factor drawn from mosaic_scale (0.5: the whole canvas; Ultralytics' scale=0.5 is [0.5, 1.5])
    mosaic_prob: float = 0.0
    mosaic_scale: list[float] = field(default_factory=lambda: [0.5, 1.5])
    aspect_ratio_grouping: bool = True
    repeat_threshold: float = 0.0  # LVIS repeat-factor sampling; 0 = off, LVIS uses 0.001


@dataclass
class ModelConfig:
    backbone: str = "resnet50"  # a name in tinyseg.model.BACKBONES: resnet18..152, resnext*, regnet_x/y_*
    # imagenet | coco | coco-v2 | none | /path/to/state_dict.pth (a torchvision ResNet's or Mask R-CNN's)
    init: str = "imagenet"
    # auto | tinyseg | maskrcnn_resnet50_fpn | maskrcnn_resnet50_fpn_v2: torchvision's detector layouts
    # take whole-detector weights; auto = the layout of coco(-v2) init or of a Mask R-CNN file, else tinyseg
    arch: str = "auto"
    # false refuses whole-detector weights (coco, coco-v2, a Mask R-CNN file): rules that allow
    # ImageNet-pretrained backbones only, such as the tinyvoc homework's
    allow_detector_init: bool = True
    norm: str = "auto"  # auto | frozen_bn | bn | gn | syncbn; auto = frozen_bn if pretrained else gn
    trainable_layers: int = 3  # pretrained backbones only; from scratch trains all stages
    fpn_channels: int = 256
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])  # one per FPN level
    box_head_dim: int = 1024
    box_head_dropout: float = 0.0
    mask_head_dropout: float = 0.0
    # The mask head's 3x3 convolutions and their width (0 = fpn_channels). Mask R-CNN's 4 x 256 costs about
    # 1 GFLOP per detection, the largest stage of CPU prediction at 100 detections an image.
    mask_head_convs: int = 4
    mask_head_channels: int = 0
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000


@dataclass
class SolverConfig:
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 2
    accumulate: int = 1  # gradient accumulation steps per optimizer step
    epochs: int = 12
    max_iters: int = 0  # optimizer steps; > 0 overrides epochs
    scheduler: str = "cosine"  # cosine | step | constant
    step_epochs: list[int] = field(default_factory=lambda: [8, 11])
    gamma: float = 0.1
    warmup_iters: int = 200
    warmup_factor: float = 0.001
    clip_grad_norm: float = 0.0  # 0 = off
    # Linear scaling rule (Goyal et al., 2017): when > 0, lr is multiplied by
    # (batch_size x accumulate x world size) / reference_batch. 0 = use lr as given.
    reference_batch: int = 0
    ema: bool = False
    ema_decay: float = 0.9998


@dataclass
class TrainConfig:
    output_dir: str = "runs/train"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto | none | bf16 | fp16; auto = bf16 on CPUs that have it, fp16 on CUDA
    channels_last: bool = True  # the backbone channels-last; not for GroupNorm models on a CPU (slower there)
    seed: int = 0
    deterministic: bool = False
    eval_every: int = 1  # epochs; 0 = only at the end
    log_every: int = 10  # iterations between metrics.jsonl lines
    nonfinite_loss: str = "stop"  # stop | skip
    # Train for this much wall time, then stop cleanly (checkpoint + eval); as Ultralytics' `time`, it replaces
    # solver.epochs (a cosine ends with it; a step schedule, set in epochs, keeps them as a cap), while
    # solver.max_iters still ends a run first. 0 = off
    max_time_min: float = 0.0
    dist_timeout_min: float = 10.0  # a collective that waits longer (a dead peer) ends the job
    report: bool = True  # report.html and its plots at the end of the run (`tinyseg report RUN` writes it later)
    # MLflow tracking (pip install "tinyseg[mlflow]"): also on whenever MLFLOW_TRACKING_URI is set, which
    # names the store; else ./mlruns, a local file store (tinyseg/training/tracking.py)
    mlflow: bool = False
    mlflow_experiment: str = "tinyseg"


@dataclass
class PredictConfig:
    score_thresh: float = 0.01
    max_detections: int = 100
    mask_thresh: float = 0.5
    nms_thresh: float = 0.5
    batch_size: int = 2
    tta: bool = False
    tta_scales: list[int] = field(default_factory=list)  # extra test short sides; empty = flip only
    # Overlays (visualize, demo, the report's gallery) draw detections from this score; the report's
    # confusion matrix and per-image F1 count them from it too
    overlay_score_thresh: float = 0.5


@dataclass
class EvalConfig:
    # Intervals for AP, AP50 and per-class AP50 by bootstrap over images, in every evaluation during
    # training and in `tinyseg evaluate` / `tinyseg compare`; 0 = off (evaluate --no-ci)
    ci_resamples: int = 1000
    ci_level: float = 0.95
    ci_seed: int = 0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    input: InputConfig = field(default_factory=InputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.exists():
        return preset
    if path.exists():
        return path
    raise ConfigError(
        f"config '{name_or_path}' is neither a file nor a preset; presets: {', '.join(preset_names())}"
    )


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file or preset (after the file it names as `base`), then `section.key=value`
    overrides."""
    config = Config()
    if name_or_path:
        apply_file(config, resolve_config_path(name_or_path), [])
    for item in overrides or []:
        apply_override(config, item)
    validate(config)
    return config


def apply_file(config: Config, path: Path, including: list[Path]) -> None:
    """A YAML config; its top-level `base: NAME_OR_PATH` (a preset, or a file relative to this one) is
    applied first, as detectron2's _BASE_, so a preset states only how it differs from another."""
    if path.resolve() in including:
        chain = " -> ".join(str(p) for p in [*including, path.resolve()])
        raise ConfigError(f"{path}: 'base' goes round in a circle: {chain}")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(loaded).__name__}")
    base = loaded.pop("base", None)
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{path}: 'base' must name a preset or a YAML file, got {base!r}")
        nearby = path.parent / base
        if nearby.suffix in (".yaml", ".yml") and nearby.is_file():
            base_path = nearby
        elif (PRESET_DIR / f"{base}.yaml").is_file():
            base_path = PRESET_DIR / f"{base}.yaml"
        else:
            raise ConfigError(f"{path}: base '{base}' is neither a YAML file beside it ({nearby}) nor a preset; "
                              f"presets: {', '.join(preset_names())}")
        apply_file(config, base_path, [*including, path.resolve()])
    apply_dict(config, loaded, source=str(path))


def config_from_dict(values: dict[str, Any]) -> Config:
    config = Config()
    apply_dict(config, values, source="checkpoint")
    return config


def apply_dict(config: Config, values: dict[str, Any], source: str) -> None:
    for section_name, section_values in values.items():
        section = _section(config, section_name, source)
        if not isinstance(section_values, dict):
            raise ConfigError(f"{source}: section '{section_name}' must be a mapping")
        for key, value in section_values.items():
            _set_field(section, section_name, key, value, source)


def apply_override(config: Config, item: str) -> None:
    """Apply `section.key=value`, or `key=value` when the key names exactly one field."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    dotted, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    if "." in dotted:
        section_name, key = dotted.split(".", 1)
    else:
        owners = [f.name for f in dataclasses.fields(config) if dotted in _field_names(getattr(config, f.name))]
        if len(owners) != 1:
            where = f"in {', '.join(owners)}" if owners else "in no section"
            raise ConfigError(f"override '{item}': key '{dotted}' is {where}; write section.{dotted}=...")
        section_name, key = owners[0], dotted
    _set_field(_section(config, section_name, "command line"), section_name, key, value, "command line")


def _section(config: Config, name: str, source: str) -> Any:
    names = [f.name for f in dataclasses.fields(config)]
    if name not in names:
        raise ConfigError(f"{source}: unknown config section '{name}'{_suggest(name, names)}")
    return getattr(config, name)


def _field_names(section: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(section)]


def _set_field(section: Any, section_name: str, key: str, value: Any, source: str) -> None:
    names = _field_names(section)
    if key not in names:
        raise ConfigError(f"{source}: unknown key '{section_name}.{key}'{_suggest(key, names)}")
    hint = typing.get_type_hints(type(section))[key]
    setattr(section, key, _coerce(value, hint, f"{section_name}.{key}", source))


def _coerce(value: Any, hint: Any, name: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is list:
        (item_type,) = typing.get_args(hint)
        items = value if isinstance(value, list) else [value]
        return [_coerce(v, item_type, name, source) for v in items]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        return "" if value is None else str(value)
    raise ConfigError(f"{source}: '{name}' expects {getattr(hint, '__name__', hint)}, got {value!r}")


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
