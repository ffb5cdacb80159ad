"""MLflow experiment tracking (the optional extra `pip install "tinyseg[mlflow]"`).

On when `train.mlflow=true` or when the environment sets MLFLOW_TRACKING_URI (MLflow's own convention;
an empty value counts as unset). The store is MLFLOW_TRACKING_URI when set, else ./mlruns: a local
file store, no server. A run gets the resolved config as params (`section.key`), every metrics.jsonl
line as metrics (step = iteration), and at the end the checkpoint (best.pt), the report and its plots,
config.yaml, metrics.jsonl and val_results.json as artifacts. Only rank 0 logs.

A run started with --resume continues the MLflow run of its run directory (`mlflow_run.json`). Inside
an MLflow run the caller already started (`with mlflow.start_run(): tinyseg.api.train(...)`) tinyseg
logs into that run and leaves ending it to the caller.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..config import Config, ConfigError
from ..runtime import distributed as dist
from ..runtime.files import atomic_write_text

log = logging.getLogger("tinyseg")

DEFAULT_STORE = "mlruns"  # relative to the working directory, as MLflow's own default file store was
RUN_FILE = "mlflow_run.json"  # in the run directory: which MLflow run a resume continues
ARTIFACTS = ("best.pt", "report.html", "config.yaml", "metrics.jsonl", "val_results.json")
NOT_METRICS = ("kind", "epoch", "iteration", "time")  # the step, the timestamp, labels


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or Path(DEFAULT_STORE).resolve().as_uri()


def _is_file_store(uri: str) -> bool:
    scheme = urlparse(uri).scheme
    return scheme in ("", "file") or len(scheme) == 1  # a bare path, file:, or a Windows drive letter


def start_tracking(cfg: Config, run_dir: Path, resume: bool = False, main: bool = True) -> "Tracker | None":
    """The tracker of this training, or None when tracking is off or this is not rank 0.

    Called on every rank: when one rank cannot start tracking (MLflow missing, the store refusing rank 0),
    every rank raises the same ConfigError, instead of the others waiting at their first collective
    until train.dist_timeout_min.
    """
    problem, tracker = None, None
    try:
        tracker = _start_tracking(cfg, run_dir, resume, main)
    except ConfigError as error:
        problem = str(error)
    # Unconditional, so that every rank takes part even if their settings or installs differ.
    problems = [p for p in dist.all_gather_objects(problem) if p is not None]
    if problems:
        if tracker is not None:
            tracker.end("FAILED")
        raise ConfigError(problems[0])
    return tracker


def _start_tracking(cfg: Config, run_dir: Path, resume: bool, main: bool) -> "Tracker | None":
    from_env = bool(os.environ.get("MLFLOW_TRACKING_URI"))
    if not (cfg.train.mlflow or from_env):
        return None
    try:
        import mlflow  # noqa: F401
    except ImportError:
        if cfg.train.mlflow:
            raise ConfigError('train.mlflow=true needs MLflow: pip install "tinyseg[mlflow]"') from None
        if main:
            log.warning('MLFLOW_TRACKING_URI is set but MLflow is not installed (pip install "tinyseg[mlflow]"): '
                        "this run is not tracked")
        return None
    if not main:
        return None
    uri = tracking_uri()
    if _is_file_store(uri):
        # Recent MLflow (3.x) refuses file stores unless this is set; a file store is what was asked for.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        return Tracker(cfg, Path(run_dir), uri, resume)
    except Exception as error:  # the store is unreachable or refuses: say so before hours of training
        raise ConfigError(f"MLflow tracking at {uri}: {type(error).__name__}: {error}".split("\n")[0]) from None


class Tracker:
    def __init__(self, cfg: Config, run_dir: Path, uri: str, resume: bool):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.broken = False
        active = mlflow.active_run()
        self.owned = active is None  # the caller's run is the caller's to end
        if active is not None:
            self.client = MlflowClient(mlflow.get_tracking_uri())
            self.run_id = active.info.run_id
        else:
            self.client = MlflowClient(uri)
            self.run_id = self._continued_run(run_dir, uri) if resume else None
            if self.run_id is None:
                self.run_id = self._new_run(cfg, run_dir, uri)
        self._log_params(flatten(cfg.to_dict()))
        log.info("MLflow: logging to run %s at %s", self.run_id, self.client.tracking_uri)

    def _new_run(self, cfg: Config, run_dir: Path, uri: str) -> str:
        name = cfg.train.mlflow_experiment
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                experiment_id = self.client.create_experiment(name)
            except Exception:  # another process created it in between
                experiment_id = self.client.get_experiment_by_name(name).experiment_id
        else:
            experiment_id = experiment.experiment_id
        run = self.client.create_run(experiment_id, run_name=run_dir.resolve().name,
                                     tags={"tinyseg.run_dir": str(run_dir.resolve())})
        atomic_write_text(run_dir / RUN_FILE, json.dumps({"tracking_uri": uri, "run_id": run.info.run_id}) + "\n")
        return run.info.run_id

    def _continued_run(self, run_dir: Path, uri: str) -> str | None:
        try:
            saved = json.loads((run_dir / RUN_FILE).read_text())
            if saved["tracking_uri"] != uri:
                return None
            self.client.update_run(saved["run_id"], status="RUNNING")
            return saved["run_id"]
        except Exception:  # no file, another store, or a deleted run: a new run, the curves restart
            return None

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        # MLflow refuses to change a logged param: a resume with other settings keeps the first values,
        # and config.yaml (an artifact) holds what the last part of the run used.
        logged = self.client.get_run(self.run_id).data.params
        changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
        if changed:
            log.warning("MLflow: params %s differ from the run's logged values and are not updated",
                        ", ".join(changed))
        fresh = [Param(k, v) for k, v in params.items() if k not in logged]
        for start in range(0, len(fresh), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=fresh[start:start + 100])

    def log(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl line: its numbers, at step = iteration and the line's time."""
        from mlflow.entities import Metric

        step = int(record.get("iteration", 0))
        stamp = int(1000 * record.get("time", time.time()))
        metrics = [Metric(k, float(v), stamp, step) for k, v in record.items()
                   if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(v)]
        self._guarded(lambda: self.client.log_batch(self.run_id, metrics=metrics))

    def finish(self, run_dir: Path) -> None:
        """The checkpoint, report and plots as artifacts; then the run is FINISHED."""
        run_dir = Path(run_dir)
        for name in ARTIFACTS:
            if (run_dir / name).exists():
                self._guarded(lambda name=name: self.client.log_artifact(self.run_id, str(run_dir / name)))
        if (run_dir / "plots").is_dir():
            self._guarded(lambda: self.client.log_artifacts(self.run_id, str(run_dir / "plots"), "plots"))
        self.end("FINISHED")

    def end(self, status: str) -> None:
        if self.owned:
            self._guarded(lambda: self.client.set_terminated(self.run_id, status))
            self.owned = False  # ended once

    def _guarded(self, call) -> None:
        # Tracking must never cost a training run. MLflow's client has already retried with backoff for
        # minutes when a call fails, so a failure stops the tracking rather than stalling every later step.
        if self.broken:
            return
        try:
            call()
        except Exception as error:
            self.broken = True
            log.warning("MLflow logging failed, tracking stops here (the training goes on; the run directory "
                        "has everything): %s", str(error).split("\n")[0])


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat
