"""Training really learns, resumes exactly, and refuses what it must refuse."""

import logging
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tinyseg.runtime.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tinyseg.training.trainer import NonFiniteLossError, train
from tinyseg.runtime.metrics_log import read_metrics

from conftest import ROOT, TINY, tiny_config


def test_short_training_lowers_loss_and_overfits(trained_run):
    records = [r for r in read_metrics(trained_run["run_dir"]) if r["kind"] == "train"]
    first = sum(r["loss"] for r in records[:5]) / 5
    last = sum(r["loss"] for r in records[-5:]) / 5
    assert last < 0.6 * first, f"loss went from {first:.3f} to {last:.3f}"
    best = trained_run["summary"]["best"]
    # Chance on this set is about 0: a model that learned nothing finds no shape at IoU 0.5.
    assert best["segm_AP50"] > 0.3, best
    for name in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt"):
        assert (trained_run["run_dir"] / name).exists(), name


def _weights(path):
    return load_checkpoint(path)["model"]


def _train_cli(shapes, run_dir, *extra):
    overrides = TINY + [f"train.output_dir={run_dir}", "solver.epochs=3", "train.eval_every=0", *extra]
    return [sys.executable, "-m", "tinyseg", "train", "--train-json", str(shapes["train"]), "--image-dir",
            str(shapes["images"]), "--val-json", str(shapes["val"]), *overrides]


def test_sigkill_then_resume_matches_uninterrupted_run(shapes, tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(_train_cli(shapes, straight), check=True, capture_output=True, cwd=ROOT, timeout=600)

    killed = tmp_path / "killed"
    process = subprocess.Popen(_train_cli(shapes, killed), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "last.pt").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = load_checkpoint(killed / "last.pt")  # intact: written atomically
    assert state["epoch"] < 3, "the run finished before it could be killed; the test proves nothing"
    subprocess.run(_train_cli(shapes, killed) + ["--resume"], check=True, capture_output=True, cwd=ROOT, timeout=600)

    resumed, reference = _weights(killed / "last.pt"), _weights(straight / "last.pt")
    assert load_checkpoint(killed / "last.pt")["iteration"] == load_checkpoint(straight / "last.pt")["iteration"]
    for key in reference:
        assert torch.allclose(resumed[key].float(), reference[key].float(), atol=1e-6), key


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(shapes, tmp_path):
    config = tiny_config(shapes, tmp_path, "solver.epochs=1", "train.eval_every=0")
    train(config)
    before = (tmp_path / "last.pt").read_bytes()
    config = tiny_config(shapes, tmp_path, "solver.epochs=2", "solver.lr=1e30", "solver.warmup_iters=0",
                         "solver.clip_grad_norm=0", "solver.optimizer=sgd")
    with pytest.raises(NonFiniteLossError, match="non-finite loss.*untouched"):
        train(config)
    assert (tmp_path / "last.pt").read_bytes() == before


def test_checkpoint_write_crash_leaves_previous_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, {"epoch": 2})
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_written_files_get_the_umask_s_permissions_or_keep_their_own(tmp_path):
    """mkstemp makes owner-only files: every checkpoint, submission and report came out 0600."""
    import stat

    from tinyseg.runtime.files import atomic_write_text

    path, previous = tmp_path / "submission.json", os.umask(0o022)
    try:
        atomic_write_text(path, "[]")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        path.chmod(0o640)  # a file's own permissions survive its rewrite
        atomic_write_text(path, "[]")
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    finally:
        os.umask(previous)


def test_a_file_that_is_no_checkpoint_is_named_as_such(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("hello")  # torch's unpickler raised a bare KeyError on it
    with pytest.raises(CheckpointError, match="notes.pt: not a tinyseg checkpoint"):
        load_checkpoint(text)
    listed = tmp_path / "submission.json"
    listed.write_text('{"images": []}')  # was refused as pickled code, with PyTorch's page about weights_only
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(listed)
    assert str(error.value) == (f"{listed}: not a tinyseg checkpoint (not a file torch.save wrote: it begins"
                                " b'{\"images\": []}')")


def test_checkpoint_write_failing_halfway_leaves_previous_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1, "weights": torch.arange(10_000.0)})
    real_save = torch.save

    def half_then_fail(state, handle):
        import io

        buffer = io.BytesIO()
        real_save(state, buffer)
        handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # bytes really reach the file
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, {"epoch": 2, "weights": torch.zeros(10_000)})
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["weights"], torch.arange(10_000.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_truncated_and_pickled_checkpoints_are_refused(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"epoch": 1, "weights": torch.ones(1000)})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(truncated)

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "tinyseg-checkpoint", "payload": Payload()}, evil)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(evil)
    assert str(error.value).startswith(f"{evil}: refused") and str(error.value).endswith("it would load posix.system")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a tinyseg checkpoint"):
        load_checkpoint(foreign)


def test_a_new_run_in_an_earlier_run_s_folder_replaces_its_metrics(shapes, tmp_path, caplog):
    """metrics.jsonl was appended to: two runs' iterations 1..N in one file, and in the report's plots."""
    config = tiny_config(shapes, tmp_path, "solver.epochs=1", "train.eval_every=0")
    train(config)
    first = read_metrics(tmp_path)
    with caplog.at_level(logging.WARNING, logger="tinyseg"):
        train(config)
    assert "holds an earlier run" in caplog.text
    iterations = [r["iteration"] for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert len(iterations) == len({*iterations}) == len([r for r in first if r["kind"] == "train"])


def test_bf16_training_stays_finite(shapes, tmp_path):
    config = tiny_config(shapes, tmp_path, "solver.epochs=2", "train.amp=bf16", "train.channels_last=true",
                         "train.eval_every=0")
    summary = train(config)
    losses = [r["loss"] for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert summary["iterations"] == 8 and all(math.isfinite(v) for v in losses)


def test_ctrl_c_saves_a_resumable_checkpoint(shapes, tmp_path):
    run_dir = tmp_path / "interrupted"
    # A suite started in the background by a shell without job control inherits SIGINT ignored, and so
    # would the child: it gets the default back, as a terminal's Ctrl-C finds it.
    process = subprocess.Popen(_train_cli(shapes, run_dir, "solver.epochs=50"), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 6:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "resumable checkpoint" in stderr and "Traceback" not in stderr
    state = load_checkpoint(run_dir / "last.pt")
    assert state["iteration"] >= 5 and state["epoch"] < 50
    # --resume picks it up; two more epochs than saved finish quickly.
    target = state["epoch"] + 2
    subprocess.run(_train_cli(shapes, run_dir, f"solver.epochs={target}") + ["--resume"], check=True,
                   capture_output=True, cwd=ROOT, timeout=600)
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == target


def _one_second_per_clock_read(monkeypatch) -> None:
    """The trainer's clock advances one second each time it is read, so a budgeted run is the same on an idle
    machine and on a loaded one."""
    import types

    import tinyseg.training.trainer as trainer_module

    ticks = iter(range(10**6))
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(time=lambda: float(next(ticks))))


def test_time_budget_stops_training_and_decays_the_learning_rate(shapes, tmp_path, monkeypatch):
    # 0.2 min = 12 clock reads, far fewer than 100 epochs' 400 iterations.
    _one_second_per_clock_read(monkeypatch)
    config = tiny_config(shapes, tmp_path, "solver.epochs=100", "solver.warmup_iters=0", "train.max_time_min=0.2",
                         "train.eval_every=0", "data.val_json=", "data.val_fraction=0")
    summary = train(config)
    records = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert 2 < summary["iterations"] < 12 and (tmp_path / "last.pt").exists()
    # the budgeted cosine follows wall time: the last logged rate is well below the first
    assert records[-1]["lr"] < 0.5 * records[0]["lr"]


def test_a_time_budget_replaces_the_epoch_count(shapes, tmp_path, monkeypatch):
    """As Ultralytics' `time`: with train.max_time_min the run lasts the budget, not solver.epochs (a preset's
    100 epochs of 13 fruits_nuts images ended 2 of 10 minutes early); solver.max_iters still ends it first."""
    _one_second_per_clock_read(monkeypatch)
    config = tiny_config(shapes, tmp_path, "solver.epochs=1", "solver.warmup_iters=0", "train.max_time_min=1",
                         "train.eval_every=0", "data.val_json=", "data.val_fraction=0", "solver.batch_size=4")
    summary = train(config)
    assert summary["epochs"] > 2 and summary["iterations"] > 2 * 2
    capped = tiny_config(shapes, tmp_path / "capped", "solver.max_iters=3", "solver.warmup_iters=0",
                         "train.max_time_min=1", "train.eval_every=0", "data.val_json=", "data.val_fraction=0")
    assert train(capped)["iterations"] == 3
    # a step schedule is set in epochs, so they stay its end
    stepped = tiny_config(shapes, tmp_path / "stepped", "solver.epochs=1", "solver.scheduler=step",
                          "solver.step_epochs=[1]", "train.max_time_min=1", "train.eval_every=0", "data.val_json=",
                          "data.val_fraction=0", "solver.warmup_iters=0")
    assert train(stepped)["epochs"] == 1


def test_a_warm_up_longer_than_half_the_run_is_flagged(shapes, tmp_path, caplog):
    config = tiny_config(shapes, tmp_path, "solver.max_iters=2", "solver.warmup_iters=10", "train.eval_every=0")
    with caplog.at_level(logging.WARNING, logger="tinyseg"):
        train(config)
    assert "solver.warmup_iters=10 is over half of the 2 iterations" in caplog.text
    caplog.clear()
    config = tiny_config(shapes, tmp_path / "short", "solver.max_iters=2", "solver.warmup_iters=1",
                         "train.eval_every=0")
    with caplog.at_level(logging.WARNING, logger="tinyseg"):
        train(config)
    assert "warmup_iters" not in caplog.text


def test_resume_goes_on_with_the_run_s_own_settings_and_refuses_another_model(shapes, tmp_path):
    """Without --config, a resume built the default model (resnet50) and failed on last.pt; with another
    model it failed in load_state_dict with a traceback, config.yaml already rewritten."""
    import shutil

    from conftest import run_cli

    train(tiny_config(shapes, tmp_path, "solver.epochs=1", "train.eval_every=0"))
    saved = (tmp_path / "config.yaml").read_text()
    other = run_cli("train", "--config", str(tmp_path / "config.yaml"), "--output-dir", str(tmp_path), "--resume",
                    "model.fpn_channels=64", "solver.optimizer=sgd", check=False)
    assert other.returncode == 2 and "Traceback" not in other.stderr, other.stderr
    assert "model.fpn_channels: 32 -> 64; solver.optimizer: 'adamw' -> 'sgd'" in other.stderr
    assert (tmp_path / "config.yaml").read_text() == saved and load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    shutil.copy(shapes["val"], tmp_path / "val_copy.json")
    extended = run_cli("train", "--output-dir", str(tmp_path), "--val-json", str(tmp_path / "val_copy.json"),
                       "--resume", "solver.epochs=2", "model.rpn_post_nms_top_n_test=100", check=False)
    assert extended.returncode == 0, extended.stderr
    assert "continues on other data than it was trained on (data.val_json:" in extended.stderr
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == 2 and state["config"]["model"]["backbone"] == "resnet18"
    # weights that do not fit what the settings build, whatever the settings say: one line, no traceback
    state["config"]["model"]["fpn_channels"] = 64
    save_checkpoint(tmp_path / "last.pt", state)
    unfit = run_cli("train", "--output-dir", str(tmp_path), "--resume", "model.fpn_channels=64", check=False)
    assert unfit.returncode == 2 and "does not fit the model or optimizer" in unfit.stderr, unfit.stderr
    assert "Traceback" not in unfit.stderr
    # no config.yaml: the default preset would have been trained from last.pt's folder without a word
    lost = run_cli("train", "--output-dir", str(tmp_path / "elsewhere"), "--resume", check=False)
    assert lost.returncode == 2 and "config.yaml not found, so the run's settings are unknown" in lost.stderr
