"""What a resumed run may change: the run's own settings by default, and nothing that shapes its weights.

`--resume` continues last.pt's weights, optimizer moments and schedule. Without `--config` it reads the run's
config.yaml, so `tinyseg train --output-dir RUN --resume solver.epochs=30` extends a run as trained; with a
config whose model or optimizer differs, the saved state cannot be loaded, and that is said before the data
checks and before anything in the run folder is rewritten.
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
# optimizer's groups) and the optimizer's kind. model.init and allow_detector_init only choose the first weights.
WEIGHT_SHAPING = {"model": None, "solver": ("optimizer", "ema")}
FIRST_WEIGHTS_ONLY = ("init", "allow_detector_init")
DATA = ("train_json", "image_dir", "val_json", "val_image_dir")


def resume_config(overrides: list[str]) -> Config:
    """The settings a resume without --config goes on with: the config.yaml of the run in train.output_dir (as
    the overrides set it, else the default's), the overrides applied on top; the default preset without one."""
    found = load_config("default", overrides)
    saved = Path(found.train.output_dir) / CONFIG_FILE
    if not saved.is_file():
        return found
    log.info("--resume: with the run's own settings, %s", saved)
    return load_config(str(saved), overrides)


def resumable_state(cfg: Config) -> dict[str, Any]:
    """last.pt of cfg's run folder, refused when cfg would build another model or optimizer than it holds."""
    path = Path(cfg.train.output_dir) / "last.pt"
    state = load_checkpoint(path)
    saved, now = state.get("config", {}), cfg.to_dict()
    changed = [f"{section}.{key}: {saved[section][key]!r} -> {now[section][key]!r}"
               for section, keys in WEIGHT_SHAPING.items()
               for key in (keys or [k for k in now[section] if k not in FIRST_WEIGHTS_ONLY])
               if key in saved.get(section, {}) and saved[section][key] != now[section][key]
               and now[section][key] != "auto"]  # config.yaml holds what `auto` resolved to (model.arch)
    if changed:
        raise ConfigError(f"--resume: {path} was trained with other settings ({'; '.join(changed)}), so its weights"
                          f" and optimizer state cannot be continued; leave out --config to resume with the run's"
                          f" own {CONFIG_FILE}, or start a new run in another --output-dir")
    moved = [f"data.{key}: {saved['data'][key]!r} -> {now['data'][key]!r}" for key in DATA
             if key in saved.get("data", {}) and saved["data"][key] != now["data"][key]]
    if moved:
        log.warning("--resume: %s continues on other data than it was trained on (%s); its epochs so far were"
                    " on the earlier data", path, "; ".join(moved))
    return state
