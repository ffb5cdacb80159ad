import pytest

from tinyseg.config import ConfigError, load_config, preset_names


def test_presets_load_and_differ():
    assert {"default", "seed", "tinyvoc", "demo"} <= set(preset_names())
    seed = load_config("seed")
    assert seed.model.backbone == "resnet152"
    assert (seed.solver.lr, seed.solver.momentum, seed.solver.weight_decay) == (0.005, 0.9, 0.0005)
    assert (seed.solver.scheduler, seed.solver.batch_size, seed.input.min_size) == ("step", 2, [800])
    assert (seed.input.copies, seed.input.flipped_copies) == (3, 1)
    assert load_config("default").solver.scheduler == "cosine"


def test_overrides_dotted_and_short(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("solver:\n  lr: 0.1\nmodel:\n  backbone: resnet101\n")
    config = load_config(str(path), ["solver.lr=0.5", "backbone=resnet50", "input.min_size=[600,700]"])
    assert config.solver.lr == 0.5
    assert config.model.backbone == "resnet50"
    assert config.input.min_size == [600, 700]


@pytest.mark.parametrize("override, message", [
    ("solver.lrr=1", "did you mean 'lr'"),
    ("solver.lr=fast", "expects float"),
    ("train.amp=fp8", "must be one of"),
    ("nosuchsection.x=1", "unknown config section"),
    ("lr", "key=value"),
    ("model.mask_head_convs=0", "'model.mask_head_convs' must be >= 1"),
    # Each crashed mid-run with a traceback, or (epochs=0) exited 0 having trained nothing, before
    ("solver.lr=-0.1", r"'solver.lr' must be > 0, got -0.1"),
    ("input.test_min_size=0", "'input.test_min_size' must be > 0"),
    ("input.hflip_prob=1.5", r"'input.hflip_prob' must be in \[0, 1\]"),
    ("data.num_workers=-1", "'data.num_workers' must be >= 0"),
    ("model.fpn_channels=0", "'model.fpn_channels' must be >= 1"),
    ("solver.epochs=0", "'solver.epochs' must be >= 1"),
    ("solver.momentum=1.5", r"'solver.momentum' must be in \[0, 1\)"),
    ("input.lsj_scale=[2.0,0.1]", "'input.lsj_scale' must be \\[low, high\\] with 0 < low <= high"),
    ("input.mosaic_scale=[1.5,0.5]", "'input.mosaic_scale' must be \\[low, high\\] with 0 < low <= high"),
    ("input.mosaic_prob=2", r"'input.mosaic_prob' must be in \[0, 1\]"),
    # the default preset has no photometric jitter, so the shuffle would silently do nothing
    ("input.channel_permutation=true", "'input.channel_permutation' is a part of the photometric jitter"),
])
def test_bad_overrides_are_clear(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("default", [override])


def test_a_config_builds_on_its_base(tmp_path):
    (tmp_path / "parent.yaml").write_text("base: scratch-cpu\nsolver:\n  lr: 0.1\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\nmodel:\n  fpn_channels: 32\n")
    config = load_config(str(tmp_path / "child.yaml"), ["solver.epochs=3"])
    scratch = load_config("scratch-cpu")
    assert (config.model.backbone, config.input.min_size) == (scratch.model.backbone, scratch.input.min_size)
    assert (config.solver.lr, config.model.fpn_channels, config.solver.epochs) == (0.1, 32, 3)


def test_base_is_looked_up_beside_the_file_then_among_presets(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "mine.yaml").write_text("base: other.yaml\n")
    (tmp_path / "conf" / "other.yaml").write_text("solver:\n  lr: 0.3\n")
    (tmp_path / "other.yaml").write_text("solver:\n  lr: 0.7\n")  # in the working directory: not used
    (tmp_path / "conf" / "scratch-cpu.yaml").write_text("solver:\n  lr: 0.9\n")  # a name, not a file: the preset
    (tmp_path / "conf" / "named.yaml").write_text("base: scratch-cpu\n")
    monkeypatch.chdir(tmp_path)
    assert load_config("conf/mine.yaml").solver.lr == 0.3
    assert load_config("conf/named.yaml").solver.lr == load_config("scratch-cpu").solver.lr
    (tmp_path / "conf" / "other.yaml").unlink()
    with pytest.raises(ConfigError, match="mine.yaml: base 'other.yaml' is neither a YAML file beside it"):
        load_config("conf/mine.yaml")


def test_fast_cpu_is_scratch_cpu_with_a_lighter_model():
    fast, scratch = load_config("fast-cpu"), load_config("scratch-cpu")
    assert (fast.solver, fast.input, fast.train, fast.data) == (scratch.solver, scratch.input, scratch.train, scratch.data)
    assert fast.model.mask_head_convs < scratch.model.mask_head_convs and not fast.predict.tta
    assert _restated("fast-cpu") == []


@pytest.mark.parametrize("text, message", [
    ("base: loop.yaml\n", "goes round in a circle"),
    ("base: no-such-preset\n", "loop.yaml: base 'no-such-preset' is neither"),
    ("base: loop2.yaml\n", "goes round in a circle: .*loop.yaml -> .*loop2.yaml -> .*loop.yaml"),
    ("base: [scratch-cpu]\n", "'base' must name a preset or a YAML file"),
])
def test_a_bad_base_is_clear(tmp_path, text, message):
    (tmp_path / "loop.yaml").write_text(text)
    (tmp_path / "loop2.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match=message):
        load_config(str(tmp_path / "loop.yaml"))


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="presets: .*seed"):
        load_config("no-such-preset")


def _restated(preset: str) -> list[str]:
    """The settings a preset file gives the value they already have: the default's, or its base's."""
    import yaml

    from tinyseg.config import PRESET_DIR, Config

    raw = yaml.safe_load((PRESET_DIR / f"{preset}.yaml").read_text())
    base = raw.pop("base", None)
    before = (load_config(base) if base else Config()).to_dict()
    return [f"{section}.{key}" for section, values in raw.items() for key, value in values.items()
            if before[section][key] == value]


def test_finetune_and_seed_state_only_what_differs():
    """DEVELOPERS.md: presets state only what differs from the defaults. The values the finetune preset
    relies on the defaults for are still the tutorial's."""
    assert _restated("finetune") == []
    assert "solver.warmup_factor" not in _restated("seed")
    finetune = load_config("finetune")
    s = finetune.solver
    assert (finetune.model.trainable_layers, s.optimizer, s.momentum, s.batch_size) == (3, "sgd", 0.9, 2)
    assert (s.lr, s.weight_decay, s.gamma, s.warmup_factor, s.step_epochs) == (0.005, 0.0005, 0.1, 0.001, [3, 6, 9])
    assert load_config("seed").solver.warmup_factor == 0.001
