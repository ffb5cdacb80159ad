"""The training run: checked data, model, optimizer, the loop, checkpoints every epoch, evaluation, resume."""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..config import Config
from ..data.training_data import TrainingData, build_training_data
from ..data.coco import CategoryMap, DatasetError
from ..data import augment
from ..data.dataset import InstanceDataset, collate
from ..data.samplers import TrainBatchSampler, repeat_factors
from ..inference.jobs import predict_and_score
from ..model import apply_inference_settings, build_model, set_precision
from ..model.backbones import check_backbone
from ..runtime import distributed as dist
from ..runtime.checkpoint import CheckpointError, save_checkpoint
from ..runtime.files import atomic_write_text, write_json
from ..runtime.metrics_log import SHORT_NAMES, MetricsLogger, memory_mb
from ..runtime.precision import resolve_amp, resolve_device
from ..runtime.seeding import restore_rng, rng_state, seed_everything
from .optim import ModelEma, build_optimizer, build_scheduler
from .resume import resumable_state
from .tracking import start_tracking

log = logging.getLogger("tinyseg")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False):
        self.cfg = cfg
        self.device = dist.init(resolve_device(cfg.train.device), cfg.train.dist_timeout_min * 60)
        self.run_dir = Path(cfg.train.output_dir)
        self.main = dist.is_main()
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        self.epoch, self.iteration, self.epoch_step = 0, 0, 0
        self.completed_epoch_step = 0  # epoch_step at the last optimizer step: where a resume after Ctrl-C goes on
        self.elapsed_before = 0.0  # training seconds of earlier runs of this job (resume)
        self.started: float | None = None  # when fit() began; the budgeted schedule reads it
        check_backbone(cfg.model)  # a typo in the name is told before minutes of data checks
        resumed = resumable_state(cfg) if resume else None  # so is a resume with another model
        self.data: TrainingData = build_training_data(cfg)  # every check before the first step
        self._build_model()
        self._build_loader()
        self._build_solver()
        self.best: dict[str, Any] = {"segm_AP50": -1.0}
        if resumed is not None:
            self._resume(resumed)
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not resume:
                self._replace_earlier_run()
            atomic_write_text(self.run_dir / "config.yaml", cfg.to_yaml())
            if self.data.val_gt is not None:  # what the run is scored on, for the report and for audits
                write_json(self.run_dir / "val_gt.json", self.data.val_gt)
        self.logger = MetricsLogger(self.run_dir, self.main, start_tracking(cfg, self.run_dir, resume, main=self.main))

    def _replace_earlier_run(self) -> None:
        """A new run in the folder of an earlier one: its metrics would be appended to the earlier run's,
        and its best.pt would stand until this run beat it, so both go."""
        earlier = [self.run_dir / name for name in ("metrics.jsonl", "best.pt") if (self.run_dir / name).exists()]
        if earlier:
            log.warning("%s holds an earlier run: it is replaced (--resume continues a run; another"
                        " --output-dir keeps it)", self.run_dir)
        for path in earlier:
            path.unlink()

    # -- set-up -------------------------------------------------------------------------------
    def _build_model(self) -> None:
        c = self.cfg
        self.model = build_model(c.model, self.data.categories.num_classes, test=c.input, predict=c.predict)
        self.model = sync_batchnorm(self.model, c.model.norm, dist.world_size())
        self.model.to(self.device)
        self.amp_dtype = resolve_amp(c.train.amp, self.device)
        set_precision(self.model, self.amp_dtype, c.train.channels_last)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.ddp = None
        if dist.world_size() > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.ema = ModelEma(self.model, c.solver.ema_decay) if c.solver.ema else None

    def _build_loader(self) -> None:
        c = self.cfg
        self.augmentation = augment.build(c.input, c.train.seed, dist.rank())
        self.dataset = InstanceDataset(self.data.train_records, self.data.train_image_dir, self.data.categories,
                                       self.augmentation.sample, c.input.copies, c.data.max_image_pixels,
                                       c.train.seed, self.augmentation.mosaic)
        self.dataset.cache_masks()
        factors = None
        if c.input.repeat_threshold > 0:
            labels = [[a["category_id"] for a in self.dataset.instances(r)] for r in self.data.train_records]
            factors = repeat_factors(labels * self.dataset.copies, c.input.repeat_threshold)
        self.sampler = TrainBatchSampler(self.dataset.aspect_ratios(), c.solver.batch_size, c.train.seed,
                                         dist.rank(), dist.world_size(), c.input.aspect_ratio_grouping, factors)
        if len(self.sampler) == 0:
            raise DatasetError(f"{len(self.dataset)} training images are fewer than batch_size x world size"
                             f" ({c.solver.batch_size} x {dist.world_size()})")
        workers = c.data.num_workers
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self.sampler, num_workers=workers, collate_fn=collate,
            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None)

    def _build_solver(self) -> None:
        s = self.cfg.solver
        if len(self.sampler) < s.accumulate:
            raise DatasetError(f"{len(self.sampler)} batches per epoch are fewer than solver.accumulate="
                               f"{s.accumulate}: no optimizer step could be taken; lower solver.accumulate")
        self.steps_per_epoch = len(self.sampler) // s.accumulate
        self.total_iters = self._planned_iters()
        if s.warmup_iters * 2 > self.total_iters:
            # A short run that never leaves its warm-up learns almost nothing (benchmarks/README.md, "The
            # same number of images seen").
            log.warning("solver.warmup_iters=%d is over half of the %d iterations of this run: the learning "
                        "rate stays low most of the time; lower solver.warmup_iters (a quarter of the run or "
                        "less)", s.warmup_iters, self.total_iters)
        if s.reference_batch > 0:
            global_batch = s.batch_size * s.accumulate * dist.world_size()
            s.lr = s.lr * global_batch / s.reference_batch
            s.reference_batch = 0  # applied once; config.yaml records the lr actually used
        self.optimizer = build_optimizer(self.model, s)
        self.scheduler = build_scheduler(self.optimizer, s, self.total_iters, self.steps_per_epoch,
                                         self._time_progress)

    def _planned_iters(self) -> float:
        s = self.cfg.solver
        if s.max_iters > 0:
            return s.max_iters
        if self.cfg.train.max_time_min > 0 and s.scheduler != "step":  # a step schedule is set in epochs
            # As Ultralytics' `time`, a wall-clock budget replaces the epoch count: the run and its cosine end
            # with the time. With an epoch cap as well, a small dataset stopped well inside the budget asked for.
            return math.inf
        return s.epochs * self.steps_per_epoch

    def _time_progress(self) -> float:
        """Share of train.max_time_min used so far (0 without a budget): a budgeted cosine decays to 0 in time."""
        limit = self.cfg.train.max_time_min * 60
        if limit <= 0 or self.started is None:
            return 0.0
        return min(1.0, self._elapsed() / limit)

    def _elapsed(self) -> float:
        return self.elapsed_before + (time.time() - self.started if self.started is not None else 0.0)

    def _resume(self, state: dict[str, Any]) -> None:
        path = self.run_dir / "last.pt"
        CategoryMap.from_dict(state["categories"]).check_same(self.data.categories, path, self.cfg.data.train_json)
        try:  # what resumable_state cannot see (an `auto` that now resolves otherwise) still gets one line
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as error:
            raise CheckpointError(f"--resume: {path} does not fit the model or optimizer this config builds"
                                  f" ({str(error).strip().splitlines()[-1].strip()[:200]}); resume with the run's"
                                  " own config.yaml (leave out --config)") from None
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            # the checkpoint is loaded to the CPU; the average must live where the model does (CUDA).
            self.ema.state = {k: v.to(self.device) for k, v in state["ema"].items()}
            self.ema.updates = state.get("ema_updates", 0)
        self.epoch, self.iteration, self.epoch_step = state["epoch"], state["iteration"], state["epoch_step"]
        self.best = state.get("best", self.best)
        self.elapsed_before = state.get("elapsed_s", 0.0)
        restore_rng(state["rng"])
        if self.main:
            log.info("resumed %s at epoch %d, iteration %d", path, self.epoch, self.iteration)

    # -- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        self.started = time.time()
        try:
            while self.epoch < self.max_epochs() and self.iteration < self.total_iters and not self._time_is_up():
                finished = self._train_epoch()
                if finished:
                    self.epoch, self.epoch_step = self.epoch + 1, 0
                last = not finished or self.epoch >= self.max_epochs() or self.iteration >= self.total_iters
                every = self.cfg.train.eval_every
                metrics = self.evaluate() if (last or (every and self.epoch % every == 0)) else None
                self._save(metrics)
                if not finished:
                    break
        except KeyboardInterrupt:
            # A batch interrupted before its optimizer step is run again on resume, not skipped.
            self.epoch_step = min(self.epoch_step, self.completed_epoch_step)
            self._write_checkpoints(None)
            log.warning("interrupted: saved a resumable checkpoint to %s (continue with --resume)",
                        self.run_dir / "last.pt")
            raise
        finally:
            self.logger.close()
        if self.main:
            if self.cfg.train.report:
                self._write_report()
            self.logger.finish()  # MLflow, when on: the checkpoint and report as artifacts
        s = self.cfg.solver
        return {"best": self.best, "epochs": self.epoch, "iterations": self.iteration,
                "images_seen": self.iteration * s.batch_size * s.accumulate * dist.world_size(),
                "run_dir": str(self.run_dir), "seconds": time.time() - self.started}

    def _write_report(self) -> None:
        from .report import write_report

        try:
            write_report(self.run_dir)
        except Exception as error:  # a plot must never cost the user a finished training run
            log.warning("could not write the report: %s", error)

    def max_epochs(self) -> float:
        if math.isfinite(self.total_iters):
            return math.ceil(self.total_iters / self.steps_per_epoch)
        return math.inf

    def _epoch_label(self) -> str:
        if math.isfinite(self.max_epochs()):
            return f"epoch {self.epoch + 1}/{self.max_epochs()}"
        return f"epoch {self.epoch + 1} ({self.cfg.train.max_time_min:g} min budget)"

    def _time_is_up(self) -> bool:
        over = self.cfg.train.max_time_min > 0 and self._time_progress() >= 1.0
        if dist.world_size() > 1:  # every rank must stop on the same step
            over = dist.reduce_mean({"over": float(over)}, self._reduce_device())["over"] > 0
        return over

    def _reduce_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _train_epoch(self) -> bool:
        """One epoch (or the rest of it, after a mid-epoch resume); False when stopped early."""
        c = self.cfg
        self.model.train()
        self.sampler.set_epoch(self.epoch)
        self.sampler.skip_batches = self.epoch_step
        # Every draw is seeded from where it happens, never from what ran before: augmentation per sample
        # (the dataset) and per batch (the batch transform), the model's own (RoI sampling) per batch below.
        # So a resume at any step, and each DDP rank, repeats every draw exactly.
        self.completed_epoch_step = self.epoch_step
        network = self.ddp or self.model
        accumulate = c.solver.accumulate
        # Micro-batches past the last whole optimizer step are not run: their gradients would otherwise
        # be added into the next epoch's first step, which would then see more samples than the others.
        usable = self.steps_per_epoch * accumulate
        bar = tqdm(self.loader, desc=self._epoch_label(), disable=not self.main,
                   initial=self.epoch_step, total=usable, dynamic_ncols=True)
        for images, targets in bar:
            if self.epoch_step >= usable:
                break
            images, targets = self.augmentation.batch(images, targets, self.epoch, self.epoch_step)
            seed = augment.batch_seed(c.train.seed, self.epoch, self.epoch_step, dist.rank(), augment.MODEL)
            torch.manual_seed(seed)
            images = [image.to(self.device, non_blocking=True) for image in images]
            targets = [{k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
            self.epoch_step += 1
            stepping = self.epoch_step % accumulate == 0
            sync = nullcontext() if (stepping or self.ddp is None) else self.ddp.no_sync()
            with sync:
                losses = network(images, targets)
                loss = sum(losses.values())
                if not self._loss_is_finite(loss, losses):
                    continue
                self.scaler.scale(loss / accumulate).backward()
            if stepping:
                self._optimizer_step()
                self._log_step(bar, losses)
            if self.iteration >= self.total_iters or (stepping and self._time_is_up()):
                return self.iteration >= self.total_iters and self.epoch_step >= usable
        return True

    def _loss_is_finite(self, loss: torch.Tensor, losses: dict) -> bool:
        finite = bool(torch.isfinite(loss))
        if dist.world_size() > 1:
            finite = dist.reduce_mean({"ok": float(finite)}, self._reduce_device())["ok"] == 1.0
        if finite:
            return True
        detail = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
        if self.cfg.train.nonfinite_loss == "skip":
            log.warning("non-finite loss at iteration %d (%s): step skipped", self.iteration, detail)
            self.optimizer.zero_grad(set_to_none=True)
            return False
        raise NonFiniteLossError(
            f"non-finite loss at epoch {self.epoch + 1}, iteration {self.iteration} ({detail}). The last good"
            f" checkpoint {self.run_dir / 'last.pt'} is untouched. Lower solver.lr, raise solver.warmup_iters,"
            f" set solver.clip_grad_norm, or train.nonfinite_loss=skip.")

    def _optimizer_step(self) -> None:
        clip = self.cfg.solver.clip_grad_norm
        if clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.iteration += 1
        if self.ema is not None:
            self.ema.update(self.model)
        self.completed_epoch_step = self.epoch_step

    def _log_step(self, bar: tqdm, losses: dict) -> None:
        values = {k: v.item() for k, v in losses.items()}
        values["loss"] = sum(values.values())
        lr = self.optimizer.param_groups[0]["lr"]
        if self.main:
            bar.set_postfix({"loss": f"{values['loss']:.3f}",
                             **{SHORT_NAMES.get(k, k): f"{v:.3f}" for k, v in values.items() if k != "loss"},
                             "lr": f"{lr:.2e}", "mem": f"{memory_mb(self.device):.0f}M"}, refresh=False)
        if self.iteration % self.cfg.train.log_every == 0 or self.iteration == 1:
            values = dist.reduce_mean(values, self._reduce_device())
            self.logger.log({"kind": "train", "epoch": self.epoch + 1, "iteration": self.iteration,
                             "lr": lr, **values, "memory_mb": memory_mb(self.device), "time": time.time()})

    # -- evaluation and checkpoints -----------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any] | None:
        if not self.data.val_records:
            return None
        raw = None
        if self.ema is not None:
            raw = {k: v.clone() for k, v in self.model.state_dict().items()}
            self.model.load_state_dict(self.ema.state)
        try:
            metrics = evaluate_model(self.model, self.data, self.cfg, self.device, self.run_dir)
        finally:  # a Ctrl-C during evaluation must not leave the EMA weights to be saved as the raw model
            if raw is not None:
                self.model.load_state_dict(raw)
        if metrics is not None and self.main:
            self.logger.log({"kind": "val", "epoch": self.epoch, "iteration": self.iteration, **metrics})
            log.info("epoch %d, iteration %d: segm AP50 %.4f AP %.4f | bbox AP50 %.4f", self.epoch, self.iteration,
                     metrics["segm_AP50"], metrics["segm_AP"], metrics["bbox_AP50"])
        return metrics

    def _save(self, metrics: dict[str, Any] | None) -> None:
        self._write_checkpoints(metrics)
        dist.barrier()  # no rank runs ahead of a checkpoint that a resume would read

    def _write_checkpoints(self, metrics: dict[str, Any] | None) -> None:
        improved = metrics is not None and metrics["segm_AP50"] > self.best["segm_AP50"]
        if improved:
            self.best = {"epoch": self.epoch, "iteration": self.iteration, **metrics}
        if not self.main:
            return
        state = {
            "model": self.model.state_dict(), "ema": self.ema.state if self.ema else None,
            "ema_updates": self.ema.updates if self.ema else 0,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "epoch": self.epoch, "iteration": self.iteration,
            "epoch_step": self.epoch_step, "rng": rng_state(), "config": self.cfg.to_dict(),
            "categories": self.data.categories.to_dict(), "best": self.best, "metrics": metrics,
            "elapsed_s": self._elapsed(),
        }
        save_checkpoint(self.run_dir / "last.pt", state)
        no_val = not self.data.val_records
        if improved or no_val or not (self.run_dir / "best.pt").exists():
            save_checkpoint(self.run_dir / "best.pt", state)


def evaluate_model(model: torch.nn.Module, data: TrainingData, cfg: Config, device: torch.device,
                   run_dir: Path | None = None) -> dict | None:
    """COCO AP on the val records, by the same predict-and-score as `tinyseg evaluate --checkpoint`; rank 0
    scores (other ranks get None) and writes the latest evaluation in full for the report."""
    apply_inference_settings(model, cfg.input, cfg.predict)
    e = cfg.eval
    keep = (lambda found: write_json(run_dir / "val_detections.json", found.results)) if run_dir else None
    _, results = predict_and_score(model, data.categories, device, cfg.predict, data.val_gt, data.val_image_dir,
                                   max_pixels=cfg.data.max_image_pixels, keep=keep, ci_resamples=e.ci_resamples,
                                   ci_level=e.ci_level, ci_seed=e.ci_seed)
    if results is None:
        return None
    if run_dir is not None:
        write_json(run_dir / "val_results.json", results)
    return {f"{kind}_{name}": value for kind in ("segm", "bbox") for name, value in results[kind]["stats"].items()}


def sync_batchnorm(model: torch.nn.Module, norm: str, world_size: int) -> torch.nn.Module:
    """`model.norm=syncbn`: BatchNorm statistics over all ranks (plain BatchNorm in one process)."""
    if norm == "syncbn" and world_size > 1:
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def train(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Train as `tinyseg train` does; returns the best metrics and where the run lives."""
    trainer = Trainer(cfg, resume=resume)
    try:
        return trainer.fit()
    finally:
        dist.shutdown()
