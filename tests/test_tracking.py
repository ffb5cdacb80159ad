"""MLflow tracking against a local file store: params, every metrics line, artifacts, run status, resume."""

import json
import logging
import sys

import pytest

from tinyseg.config import Config, ConfigError
from tinyseg.runtime.metrics_log import MetricsLogger, read_metrics
from tinyseg.training.tracking import RUN_FILE, start_tracking

from conftest import tiny_config


@pytest.fixture
def store(tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI at a fresh file store; MLFLOW_ALLOW_FILE_STORE unset (tinyseg sets it), then restored."""
    pytest.importorskip("mlflow", reason='needs MLflow: pip install "tinyseg[mlflow]" (the test extra has it)')
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # recorded, so the delete below is undone too
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    return uri


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def test_training_logs_config_metrics_and_artifacts(shapes, tmp_path, store):
    from tinyseg.training.trainer import train

    run_dir = tmp_path / "run"
    train(tiny_config(shapes, run_dir, "solver.max_iters=2", "train.mlflow=true", "train.mlflow_experiment=tiny",
                       "train.report=true"))
    client = _client(store)
    run_id = json.loads((run_dir / RUN_FILE).read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "tiny"
    assert run.data.params["solver.lr"] == "0.002" and run.data.params["model.backbone"] == "resnet18"
    records = read_metrics(run_dir)
    train_steps = [r["iteration"] for r in records if r["kind"] == "train"]
    assert len(train_steps) == 2
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == train_steps
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [r["loss"] for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    assert val and run.data.metrics["segm_AP50"] == val[-1]["segm_AP50"]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"best.pt", "report.html", "config.yaml", "metrics.jsonl", "plots"} <= artifacts
    assert "plots/losses.png" in {a.path for a in client.list_artifacts(run_id, "plots")}


def test_a_failed_run_is_marked_and_a_resume_continues_it(tmp_path, store):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    logger = MetricsLogger(run_dir, tracker=start_tracking(Config(), run_dir))
    logger.log({"kind": "train", "epoch": 1, "iteration": 1, "loss": 2.0, "lr": 0.01, "time": 1.0e9})
    with pytest.raises(RuntimeError):
        try:
            raise RuntimeError("boom")
        finally:
            logger.close()
    run_id = logger.tracker.run_id
    assert _client(store).get_run(run_id).info.status == "FAILED"

    resumed = MetricsLogger(run_dir, tracker=start_tracking(Config(), run_dir, resume=True))
    assert resumed.tracker.run_id == run_id
    resumed.log({"kind": "train", "epoch": 1, "iteration": 2, "loss": 1.0, "lr": 0.01, "time": 1.0e9 + 5})
    resumed.close()
    resumed.finish()
    run = _client(store).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in _client(store).get_metric_history(run_id, "loss")] == [(1, 2.0), (2, 1.0)]
    assert MetricsLogger(run_dir, tracker=start_tracking(Config(), run_dir)).tracker.run_id != run_id  # no resume: a new run


def test_inside_the_callers_run_it_logs_there_and_leaves_the_run_open(tmp_path, store, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the caller's own run needs it for a file store
    with mlflow.start_run() as outer:
        logger = MetricsLogger(tmp_path, tracker=start_tracking(Config(), tmp_path))
        logger.log({"kind": "val", "epoch": 1, "iteration": 5, "segm_AP50": 0.5})
        logger.close()
        logger.finish()
        assert mlflow.active_run().info.run_id == outer.info.run_id
        assert _client(store).get_run(outer.info.run_id).info.status == "RUNNING"
    assert _client(store).get_run(outer.info.run_id).data.metrics == {"segm_AP50": 0.5}
    assert not (tmp_path / RUN_FILE).exists()


def test_only_rank_zero_and_only_when_asked(tmp_path, store, monkeypatch):
    assert start_tracking(Config(), tmp_path, main=False) is None
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert start_tracking(Config(), tmp_path) is None  # neither train.mlflow nor the variable
    assert not (tmp_path / "mlruns").exists()


def test_without_mlflow_installed(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = Config()
    config.train.mlflow = True
    for main in (True, False):  # every rank stops, not only the one that would log
        with pytest.raises(ConfigError, match=r'pip install "tinyseg\[mlflow\]"'):
            start_tracking(config, tmp_path, main=main)
    # Only the environment variable: a warning, and the training goes on untracked.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    with caplog.at_level(logging.WARNING, logger="tinyseg"):
        assert start_tracking(Config(), tmp_path) is None
    assert "not tracked" in caplog.text


def test_a_store_that_fails_mid_run_stops_tracking_not_training(tmp_path, store, monkeypatch, caplog):
    logger = MetricsLogger(tmp_path, tracker=start_tracking(Config(), tmp_path))
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise ConnectionError("store gone\nsecond line")

    monkeypatch.setattr(logger.tracker.client, "log_batch", refuse)
    with caplog.at_level(logging.WARNING, logger="tinyseg"):
        for step in (1, 2):
            logger.log({"kind": "train", "epoch": 1, "iteration": step, "loss": 1.0})
        logger.finish()
    assert len(calls) == 1 and caplog.text.count("tracking stops here") == 1 and "second line" not in caplog.text
    assert len(read_metrics(tmp_path)) == 2  # metrics.jsonl has every line


def test_when_rank_zero_cannot_track_every_rank_stops(tmp_path, monkeypatch):
    """Under DDP only rank 0 starts the MLflow run: when that fails, the other ranks must raise the same
    error instead of waiting at their first collective until train.dist_timeout_min. Two ranks, faked."""
    import types

    import tinyseg.training.tracking as tracking
    from tinyseg.runtime import distributed

    monkeypatch.setitem(sys.modules, "mlflow", types.ModuleType("mlflow"))  # importable; never reached here
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    sent = []

    def refuse(*args):
        raise ConnectionError("store refused\nsecond line")

    monkeypatch.setattr(tracking, "Tracker", refuse)
    config = Config()
    config.train.mlflow = True
    # Rank 0: its failure goes to the others, and it raises it too.
    monkeypatch.setattr(distributed, "all_gather_objects", lambda value: sent.append(value) or [value, None])
    with pytest.raises(ConfigError, match="ConnectionError: store refused$"):
        start_tracking(config, tmp_path, main=True)
    assert sent and "store refused" in sent[0]
    # Rank 1: nothing went wrong there, but it receives rank 0's error and stops with it.
    monkeypatch.setattr(distributed, "all_gather_objects", lambda value: [sent[0], value])
    with pytest.raises(ConfigError, match="ConnectionError: store refused$"):
        start_tracking(config, tmp_path, main=False)
    # Tracking off: every rank still takes part in the exchange, and nothing is raised.
    monkeypatch.setattr(distributed, "all_gather_objects", lambda value: sent.append(value) or [value, None])
    assert start_tracking(Config(), tmp_path, main=False) is None and sent[-1] is None
