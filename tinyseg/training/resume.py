"""What a resumed run may change: the run's own settings by default, and nothing that shapes its weights.

`--resume` continues last.pt's weights, optimizer moments and schedule. Without `--config` it reads the run's
config.yaml, so `tinyseg train --output-dir RUN --resume solver.epochs=30` extends a run as trained (one with a
time budget: a larger train.max_time_min); with a config whose model or optimizer differs, the saved state
cannot be loaded, and that is said before the data checks and before anything in the run folder is rewritten.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, load_config
from ..runtime.checkpoint import load_checkpoint

log = logging.getLogger("tinyseg")

CONFIG_FILE = "config.yaml"
# Settings whose change leaves last.pt's tensors unloadable: the weights' shapes, which parameters train (the
# optimizer's groups) and the optimizer's kind; the rest of `model` (dropouts, sampled RoIs, proposal counts)
# may change, and load_state_dict's own check in the trainer catches anything this list misses.
WEIGHT_SHAPING = {"model": ("backbone", "arch", "norm", "fpn_channels", "box_head_dim", "mask_head_convs",
                            "mask_head_channels", "trainable_layers"), "solver": ("optimizer",)}
DATA = ("train_json", "val_json")  # the image folders are rewritten to where the images were read


def resume_config(overrides: list[str]) -> Config:
    """The settings a resume without --config goes on with: the config.yaml of the run in train.output_dir (as
    the overrides set it, else the default's), the overrides applied on top."""
    saved = Path(load_config("default", overrides).train.output_dir) / CONFIG_FILE
    if not saved.is_file():  # the default preset would build another model than the run's, or train afresh
        raise ConfigError(f"--resume: {saved} not found, so the run's settings are unknown: give --output-dir of"
                          " the run, or --config with its settings")
    log.info("--resume: with the run's own settings, %s", saved)
    return load_config(str(saved), overrides)


def resumable_state(cfg: Config) -> dict[str, Any]:
    """last.pt of cfg's run folder, refused when cfg would build another model or optimizer than it holds."""
    path = Path(cfg.train.output_dir) / "last.pt"
    state = load_checkpoint(path)
    saved, now = state.get("config", {}), cfg.to_dict()
    changed = [f"{section}.{key}: {saved[section][key]!r} -> {now[section][key]!r}"
               for section, keys in WEIGHT_SHAPING.items()
               for key in keys if key in saved.get(section, {}) and saved[section][key] != now[section][key]
               and "auto" not in (saved[section][key], now[section][key])]  # `auto` resolves from the others
    if changed:
        raise ConfigError(f"--resume: {path} was trained with other settings ({'; '.join(changed)}), so its weights"
                          f" and optimizer state cannot be continued; leave out --config to resume with the run's"
                          f" own {CONFIG_FILE}, or start a new run in another --output-dir")
    moved = [f"data.{key}: {saved['data'][key]!r} -> {now['data'][key]!r}" for key in DATA
             if saved.get("data", {}).get(key) and now["data"][key]
             and Path(saved["data"][key]).resolve() != Path(now["data"][key]).resolve()]
    if moved:
        log.warning("--resume: %s continues on other data than it was trained on (%s); its epochs so far were"
                    " on the earlier data", path, "; ".join(moved))
    return state
