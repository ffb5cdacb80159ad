"""Metrics to metrics.jsonl (and TensorBoard when installed, an experiment tracker when given), and the
progress bar's numbers."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool = True, tracker=None):
        """enabled: this process writes (rank 0). tracker: also gets every record, and the run's end (its
        log, end(status) and finish(run_dir); training/tracking.py's MLflow Tracker)."""
        self.enabled = enabled
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        self.tracker = tracker
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except Exception:  # tensorboard not installed: the JSONL file is the record
                self.writer = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # One write per line and a flush: a crash loses at most the line being written.
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
        if self.writer is not None:
            step = record.get("iteration", 0)
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("iteration", "epoch"):
                    self.writer.add_scalar(f"{record.get('kind', 'train')}/{key}", value, step)
        if self.tracker is not None:
            self.tracker.log(record)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        status = end_status()  # the trainer closes in a `finally`: an exception on its way out ends the run
        if self.tracker is not None and status:
            self.tracker.end(status)

    def finish(self) -> None:
        """After the report: the run's files go to MLflow as artifacts and the MLflow run ends."""
        if self.tracker is not None:
            self.tracker.finish(self.run_dir)


def end_status() -> str:
    """The status of a run whose logger closes now: inside an exception on its way out, the run failed."""
    kind = sys.exc_info()[0]
    if kind is None:
        return ""
    return "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


SHORT_NAMES = {"loss_classifier": "cls", "loss_box_reg": "box", "loss_mask": "mask",
               "loss_objectness": "obj", "loss_rpn_box_reg": "rpn"}
