"""What a config may hold: the choices and ranges that `load_config` checks before anything runs, and the
prediction settings that `predict` checks on their own. Values that crash mid-run, or train nothing without a
word, are refused up front with one line per setting."""

from __future__ import annotations

import math
from typing import Any


class ConfigError(ValueError):
    """A config file or override that cannot be applied."""


CHOICES = {
    ("data", "format"): ("auto", "coco", "labelme", "yolo", "voc"),
    ("model", "norm"): ("auto", "frozen_bn", "bn", "gn", "syncbn"),
    ("model", "arch"): ("auto", "tinyseg", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"),
    ("solver", "optimizer"): ("sgd", "adamw"),
    ("solver", "scheduler"): ("cosine", "step", "constant"),
    ("train", "amp"): ("auto", "none", "bf16", "fp16"),
    ("train", "nonfinite_loss"): ("stop", "skip"),
}


def check_predict(p: Any) -> None:
    """A PredictConfig's settings that would give an empty or a maskless submission, or fail mid-run."""
    bad = [f"'predict.{name}' (--{name.replace('_', '-')}) must be {rule}, got {value}" for name, value, ok, rule in (
        ("score_thresh", p.score_thresh, 0.0 <= p.score_thresh <= 1.0, "in [0, 1]"),
        ("mask_thresh", p.mask_thresh, 0.0 < p.mask_thresh < 1.0, "in (0, 1)"),
        ("nms_thresh", p.nms_thresh, 0.0 < p.nms_thresh <= 1.0, "in (0, 1]"),
        ("max_detections", p.max_detections, p.max_detections >= 1, ">= 1"),
        ("batch_size", p.batch_size, p.batch_size >= 1, ">= 1"),
        ("tta_scales", p.tta_scales, all(size > 0 for size in p.tta_scales), "positive sizes")) if not ok]
    if bad:
        raise ConfigError("; ".join(bad))


# (holds, rule) per setting: values that crash mid-run, or train nothing without a word, are refused up front
_AT_LEAST_0 = (lambda v: math.isfinite(v) and v >= 0, ">= 0")
_AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
_POSITIVE = (lambda v: math.isfinite(v) and v > 0, "> 0")
_PROBABILITY = (lambda v: 0 <= v <= 1, "in [0, 1]")
_FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")
_OPEN_UNIT = (lambda v: 0 < v < 1, "in (0, 1)")
_SCALE_RANGE = (lambda v: len(v) == 2 and 0 < v[0] <= v[1], "[low, high] with 0 < low <= high")
_POSITIVE_SIZES = (lambda v: bool(v) and min(v) > 0, "one or more positive values")
RANGES = {
    "data": {"val_fraction": _FRACTION, "folds": (lambda v: v == 0 or v >= 2, "0 (off) or at least 2"),
             "num_workers": _AT_LEAST_0, "max_image_pixels": _POSITIVE},
    "input": {"min_size": _POSITIVE_SIZES, "max_size": _POSITIVE, "test_min_size": _POSITIVE,
              "test_max_size": _POSITIVE, "hflip_prob": _PROBABILITY, "copies": _AT_LEAST_1,
              "flipped_copies": _AT_LEAST_0, "lsj_size": _POSITIVE, "copy_paste_prob": _PROBABILITY,
              "lsj_scale": _SCALE_RANGE, "mosaic_prob": _PROBABILITY, "mosaic_scale": _SCALE_RANGE,
              "repeat_threshold": _AT_LEAST_0},
    "model": {"trainable_layers": (lambda v: 0 <= v <= 5, "in 0..5"), "fpn_channels": _AT_LEAST_1,
              "anchor_sizes": _POSITIVE_SIZES, "box_head_dim": _AT_LEAST_1, "box_head_dropout": _FRACTION,
              "mask_head_dropout": _FRACTION, "mask_head_convs": _AT_LEAST_1,
              "mask_head_channels": (lambda v: v >= 0, ">= 0 (0 = fpn_channels)"),
              "rpn_batch_size_per_image": _AT_LEAST_1, "box_batch_size_per_image": _AT_LEAST_1,
              "rpn_post_nms_top_n_train": _AT_LEAST_1, "rpn_post_nms_top_n_test": _AT_LEAST_1},
    "solver": {"lr": _POSITIVE, "momentum": _FRACTION, "weight_decay": _AT_LEAST_0, "batch_size": _AT_LEAST_1,
               "accumulate": _AT_LEAST_1, "epochs": _AT_LEAST_0, "max_iters": _AT_LEAST_0,
               "step_epochs": (lambda v: all(e >= 1 for e in v), "epochs >= 1"), "gamma": _POSITIVE,
               "warmup_iters": _AT_LEAST_0, "warmup_factor": (lambda v: 0 < v <= 1, "in (0, 1]"),
               "clip_grad_norm": _AT_LEAST_0, "reference_batch": _AT_LEAST_0, "ema_decay": _OPEN_UNIT},
    "train": {"eval_every": _AT_LEAST_0, "log_every": _AT_LEAST_1, "max_time_min": _AT_LEAST_0,
              "dist_timeout_min": _POSITIVE},
    "eval": {"ci_resamples": _AT_LEAST_0, "ci_level": _OPEN_UNIT},
}


def validate(config: Any) -> None:
    """A whole Config (tinyseg.config, which imports this module)."""
    check_predict(config.predict)
    for (section, key), allowed in CHOICES.items():
        value = getattr(getattr(config, section), key)
        if value not in allowed:
            raise ConfigError(f"'{section}.{key}' must be one of {', '.join(allowed)}, got '{value}'")
    bad = [f"'{section}.{key}' must be {rule}, got {getattr(getattr(config, section), key)}"
           for section, rules in RANGES.items() for key, (holds, rule) in rules.items()
           if not holds(getattr(getattr(config, section), key))]
    if config.solver.epochs == 0 and config.solver.max_iters == 0:
        bad.append("'solver.epochs' must be >= 1 (or solver.max_iters > 0), got 0")
    if config.input.channel_permutation and not config.input.photometric:
        bad.append("'input.channel_permutation' is a part of the photometric jitter: set input.photometric=true")
    if bad:
        raise ConfigError("; ".join(bad))
