"""Each training option changes what it says it changes: tests that fail if the feature is removed or broken."""

import copy
import json

import pytest
import torch

from tinyseg.runtime.checkpoint import load_checkpoint
from tinyseg.training.trainer import Trainer, sync_batchnorm, train

from conftest import tiny_config

NO_VAL = ("data.val_json=", "data.val_fraction=0")  # no evaluation: these tests are about the steps


def _forwards_between_steps(trainer, monkeypatch):
    """Count training forwards per optimizer step (the micro-batches whose gradients each step sums)."""
    counts, pending = [], [0]
    trainer.model.register_forward_pre_hook(lambda module, args: pending.__setitem__(0, pending[0] + 1))
    step = trainer._optimizer_step

    def counted():
        counts.append(pending[0])
        pending[0] = 0
        step()

    monkeypatch.setattr(trainer, "_optimizer_step", counted)
    return counts


def test_accumulation_never_leaks_into_the_next_epoch(shapes, tmp_path, monkeypatch):
    # 8 images, batch 2 = 4 batches per epoch; accumulate 3 leaves one micro-batch over in each epoch.
    config = tiny_config(shapes, tmp_path, "solver.accumulate=3", "solver.epochs=2", *NO_VAL,
                         "input.aspect_ratio_grouping=false")
    trainer = Trainer(config)
    counts = _forwards_between_steps(trainer, monkeypatch)
    trainer.fit()
    assert trainer.iteration == 2 and counts == [3, 3]
    for parameter in trainer.model.parameters():
        assert parameter.grad is None or not parameter.grad.any()


def test_accumulate_larger_than_an_epoch_is_refused(shapes, tmp_path):
    from tinyseg.data.coco import DatasetError

    with pytest.raises(DatasetError, match="fewer than solver.accumulate"):
        Trainer(tiny_config(shapes, tmp_path, "solver.accumulate=9"))


def _ema_run(shapes, tmp_path, *extra):
    return tiny_config(shapes, tmp_path, "solver.ema=true", "solver.max_iters=2", *extra)


def test_ema_weights_are_the_ones_evaluated_and_saved_beside_the_raw(shapes, tmp_path, monkeypatch):
    import tinyseg.training.trainer as trainer_module

    seen = {}
    real = trainer_module.evaluate_model

    def spy(model, *args, **kwargs):
        seen["weights"] = {k: v.clone() for k, v in model.state_dict().items()}
        return real(model, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "evaluate_model", spy)
    trainer = Trainer(_ema_run(shapes, tmp_path))
    trainer.fit()
    state = load_checkpoint(tmp_path / "last.pt")
    floats = [k for k, v in state["model"].items() if v.dtype.is_floating_point and "running" not in k]
    assert state["ema_updates"] == trainer.iteration > 0
    assert any(not torch.equal(state["model"][k], state["ema"][k]) for k in floats), "EMA equals the raw weights"
    for key in floats:
        assert torch.equal(seen["weights"][key], state["ema"][key]), f"{key}: evaluated weights are not the EMA"
        assert torch.equal(trainer.model.state_dict()[key], state["model"][key]), f"{key}: raw weights not restored"


def test_ctrl_c_during_ema_evaluation_saves_the_raw_weights(shapes, tmp_path, monkeypatch):
    import tinyseg.training.trainer as trainer_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "evaluate_model", interrupted)
    trainer = Trainer(_ema_run(shapes, tmp_path))
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    state = load_checkpoint(tmp_path / "last.pt")
    floats = [k for k, v in state["model"].items() if v.dtype.is_floating_point and "running" not in k]
    assert any(not torch.equal(state["model"][k], state["ema"][k]) for k in floats), "the EMA was saved as the model"


class _OnAnotherDevice(torch.Tensor):
    """Stands in for a tensor on another device than the model's (a CPU-mapped checkpoint on a CUDA run):
    only an explicit move with .to() makes it a plain tensor on the model's device."""

    def to(self, *args, **kwargs):
        return torch.Tensor.to(self.as_subclass(torch.Tensor), *args, **kwargs)


def test_resumed_ema_is_moved_to_the_model_device(shapes, tmp_path, monkeypatch):
    import tinyseg.training.resume as resume_module

    train(_ema_run(shapes, tmp_path, "train.eval_every=0", "solver.max_iters=2"))
    real = resume_module.load_checkpoint

    def elsewhere(path):
        state = real(path)
        state["ema"] = {k: v.as_subclass(_OnAnotherDevice) for k, v in state["ema"].items()}
        return state

    monkeypatch.setattr(resume_module, "load_checkpoint", elsewhere)
    trainer = Trainer(_ema_run(shapes, tmp_path, "train.eval_every=0", "solver.max_iters=3"), resume=True)
    model_device = next(trainer.model.parameters()).device
    assert not any(isinstance(v, _OnAnotherDevice) for v in trainer.ema.state.values()), "EMA state never moved"
    assert {v.device for v in trainer.ema.state.values()} == {model_device}


def test_step_scheduler_drops_the_lr_at_its_epochs(shapes, tmp_path):
    trainer = Trainer(tiny_config(shapes, tmp_path, "solver.scheduler=step", "solver.step_epochs=[1, 2]",
                                  "solver.gamma=0.1", "solver.epochs=3", "solver.warmup_iters=0"))
    per_epoch = trainer.steps_per_epoch
    lrs = []
    for _ in range(3 * per_epoch):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.scheduler.step()
    assert lrs[:per_epoch] == pytest.approx([0.002] * per_epoch)
    assert lrs[per_epoch:2 * per_epoch] == pytest.approx([0.0002] * per_epoch)
    assert lrs[2 * per_epoch:] == pytest.approx([0.00002] * per_epoch)


def test_reference_batch_scales_the_lr(shapes, tmp_path):
    trainer = Trainer(tiny_config(shapes, tmp_path, "solver.reference_batch=8", "solver.accumulate=2",
                                  "solver.warmup_iters=0"))
    # lr 0.002 x (batch 2 x accumulate 2 x 1 process) / 8
    assert trainer.optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.001)
    assert trainer.cfg.solver.reference_batch == 0  # applied once: config.yaml records the lr used


def test_repeat_factor_sampling_draws_the_rare_class_more_often(shapes, tmp_path):
    data = json.loads(shapes["train"].read_text())
    rare_image = data["images"][0]["id"]
    # Category 12 appears in only the first image; every other instance becomes category 3.
    for annotation in data["annotations"]:
        annotation["category_id"] = 12 if annotation["image_id"] == rare_image else 3
    path = tmp_path / "rare.json"
    path.write_text(json.dumps(data))
    trainer = Trainer(tiny_config(shapes, tmp_path / "run", f"data.train_json={path}", "input.repeat_threshold=0.5",
                                  "input.aspect_ratio_grouping=false", "solver.batch_size=1"))
    index = [r.image_id for r in trainer.dataset.records].index(rare_image)
    draws = {i: 0 for i in range(len(trainer.dataset))}
    for epoch in range(20):
        trainer.sampler.set_epoch(epoch)
        for batch in trainer.sampler:
            for item in batch:
                draws[item[0] if isinstance(item, tuple) else item] += 1
    common = [n for i, n in draws.items() if i != index]
    assert draws[index] > 1.5 * (sum(common) / len(common))


def test_copy_paste_in_the_trainer_adds_instances(shapes, tmp_path, monkeypatch):
    counts = {}

    def record(prob):
        seen = []
        config = tiny_config(shapes, tmp_path / str(prob), f"input.copy_paste_prob={prob}", "solver.max_iters=2",
                             *NO_VAL, "input.hflip_prob=0")
        trainer = Trainer(config)
        trainer.model.register_forward_pre_hook(
            lambda module, args: seen.append(sum(len(t["labels"]) for t in args[1])) if len(args) > 1 else None)
        trainer.fit()
        return seen

    counts[0.0], counts[1.0] = record(0.0), record(1.0)
    assert sum(counts[1.0]) > sum(counts[0.0])


def test_train_negatives_keeps_images_without_instances(shapes, tmp_path):
    from tinyseg.data.training_data import build_training_data

    data = json.loads(shapes["train"].read_text())
    empty = data["images"][0]["id"]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != empty]
    path = tmp_path / "negatives.json"
    path.write_text(json.dumps(data))
    ids = {}
    for keep in (False, True):
        config = tiny_config(shapes, tmp_path, f"data.train_json={path}", f"data.train_negatives={str(keep).lower()}")
        ids[keep] = {r.image_id for r in build_training_data(config).train_records}
    assert empty not in ids[False] and empty in ids[True] and len(ids[True]) == len(ids[False]) + 1


def test_training_warns_of_images_beyond_the_detection_cap(shapes, tmp_path, caplog, monkeypatch):
    """An image with more instances than predict.max_detections keeps: its rest can never be found. Told
    once, though each fold of a cross-validation reads the data again."""
    from tinyseg.data import training_data

    monkeypatch.setattr(training_data, "_TOLD", set())
    with caplog.at_level("WARNING", logger="tinyseg"):
        training_data.build_training_data(tiny_config(shapes, tmp_path))
        assert "can never be found" not in caplog.text
        for _ in range(2):
            training_data.build_training_data(tiny_config(shapes, tmp_path, "predict.max_detections=1"))
    assert caplog.text.count("can never be found") == 1
    assert "(predict.max_detections=1 per image)" in caplog.text and "Set predict.max_detections=50" in caplog.text


def test_syncbn_converts_batchnorm_only_across_processes():
    from tinyseg.config import ModelConfig
    from tinyseg.model import build_model

    model = build_model(ModelConfig(backbone="resnet18", init="none", norm="syncbn", fpn_channels=32,
                                    box_head_dim=64), 3)
    plain = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert plain > 0
    assert sync_batchnorm(model, "syncbn", 1) is model
    converted = sync_batchnorm(model, "syncbn", 2)
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules()) == plain
    assert sync_batchnorm(model, "bn", 2) is model


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_optimizer_runs_fused_with_the_same_update(name):
    """The fused kernel (a CPU has one since torch 2.4) takes the step the per-tensor loop takes."""
    from tinyseg.config import SolverConfig
    from tinyseg.training.optim import build_optimizer

    cfg = SolverConfig(optimizer=name, lr=0.01, weight_decay=0.05)
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Flatten(),
                                  torch.nn.LazyLinear(2))]
    models[0](torch.rand(1, 3, 8, 8))
    models.append(copy.deepcopy(models[0]))
    fused = build_optimizer(models[0], cfg)
    assert all(group["fused"] for group in fused.param_groups)
    reference = build_optimizer(models[1], cfg)  # the same groups and options, as the per-tensor loop
    options = {k: v for k, v in reference.defaults.items() if k not in ("fused", "foreach", "decoupled_weight_decay")}
    plain = type(reference)([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in reference.param_groups],
                            **options, fused=False, foreach=False)
    for _ in range(3):
        for model, optimizer in zip(models, (fused, plain)):
            optimizer.zero_grad()
            model(torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))).square().sum().backward()
            optimizer.step()
    for a, b in zip(*(model.parameters() for model in models)):
        torch.testing.assert_close(a, b)
