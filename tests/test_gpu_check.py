"""benchmarks/gpu_check.sh, prepared before any GPU is lent: its --dry-run takes the same steps on the CPU
(AMP training, a resume with EMA, a 1-process torchrun on gloo, throughput.py against the reference
with AMP on both sides and a trained checkpoint) at tiny sizes, and must pass here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import decodes_with_pycocotools

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def run_script(*args: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("gpu-check-out"), tmp_path_factory.mktemp("gpu-check-work")
    result = run_script("--dry-run", "--out", str(out), env={"WORK": str(work)})
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return {"out": out, "work": work, "stdout": result.stdout}


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_dry_run_takes_every_step_and_sums_them_up(dry_run):
    out = dry_run["out"]
    summary = read(out / "gpu_check.json")
    assert summary["passed"] and summary["dry_run"]
    assert [s["step"] for s in summary["steps"]] == ["amp", "ema", "ddp", "speed"]
    assert all(s["exit_code"] == 0 for s in summary["steps"])
    assert "cpu_flags" in summary and "cpu_name" in summary
    assert set(summary["checks"]) == {"amp", "ema", "ddp"}
    for step in ("amp", "ema", "ddp", "speed"):
        assert (out / f"{step}.log").stat().st_size > 0
    # the training steps went where they were sent, EMA kept across the resume
    amp, ema, ddp = (read(out / f"{step}-check.json") for step in ("amp", "ema", "ddp"))
    assert (amp["iteration"], amp["ema_updates"], amp["problems"]) == (2, 2, [])
    assert (ema["iteration"], ema["ema_updates"], ema["problems"]) == (4, 4, [])
    assert (ddp["iteration"], ddp["problems"]) == (2, [])
    assert "torch.distributed.run" in (out / "ddp.log").read_text()
    assert (out / "ema-metrics.jsonl").exists() and (out / "amp-config.yaml").exists()
    assert not list(out.glob("*.pt")), "checkpoints stay in WORK, not in the output folder"


def test_dry_run_writes_the_throughput_keys(dry_run):
    result = read(dry_run["out"] / "throughput-gpu.json")
    for key in ("train_ratio", "predict_ratio", "predict_default_ratio", "eval_ratio", "rss_ratio", "peak_gflops",
                "utilization", "gflops_per_image", "cpu_flags", "cpu_name", "checkpoint_predict_ratio",
                "checkpoint_predict_default_ratio"):
        assert key in result, key
    assert result["smoke"] and result["device"] == "cpu" and result["checkpoint"].endswith("last.pt")
    assert set(result["utilization"]) == {"backbone", "predict", "train"}
    assert all(value > 0 for value in result["gflops_per_image"].values())
    assert result["peak_gflops"] > 0 and all(value > 0 for value in result["utilization"].values())
    # the peak is the best of a matmul and a convolution, measured at the start and at the end of the run
    measured = [value for at in ("start", "end") for value in result["peak_measurements"][at]["model"].values()]
    assert len(measured) == 4 and result["peak_gflops"] == max(measured)
    fp32 = [value for at in ("start", "end") for value in result["peak_measurements"][at]["fp32"].values()]
    assert result["peak_gflops_fp32"] == max(fp32)
    # the preset's defaults (tinyvoc: flip TTA) ran, and were timed stage by stage
    assert result["stages"]["random_default"]["tta"] and not result["stages"]["random_tta_off"]["tta"]
    assert result["stages"]["random_default"]["seconds_per_image"]["TTA merge"] > 0
    assert result["stages"]["random_tta_off"]["seconds_per_image"]["TTA merge"] == 0
    assert "checkpoint_default" in result["stages"]


def test_the_checks_catch_a_run_that_stopped_short(dry_run, tmp_path, monkeypatch):
    from gpu_check_verify import check_checkpoint, main

    checkpoint = str(dry_run["work"] / "ema-last.pt")  # the resumed run: 4 iterations, EMA
    assert check_checkpoint(checkpoint, 4, ema=True)["problems"] == []
    assert check_checkpoint(checkpoint, 300, ema=True)["problems"] == ["iteration 4, expected 300",
                                                                       "4 EMA updates in 300 iterations"]
    assert check_checkpoint(checkpoint, 4, ema=False)["problems"] == ["EMA weights in a run without solver.ema"]
    steps = tmp_path / "steps.tsv"
    steps.write_text("amp\t0\t1500\nema\t1\t250\n")
    monkeypatch.setattr(sys, "argv", ["gpu_check_verify.py", "--steps", str(steps), "--out", str(tmp_path)])
    assert main() == 1  # a failed step fails the check
    summary = read(tmp_path / "gpu_check.json")
    assert not summary["passed"] and summary["seconds"] == pytest.approx(1.75)


def test_without_a_gpu_or_data_the_real_check_says_why(tmp_path):
    result = run_script("--out", str(tmp_path / "out"), env={"TINYSEG_SHARED": str(tmp_path / "nothing")})
    assert result.returncode == 2 and "no nuclei data" in result.stderr
    result = run_script("--no-such-option")
    assert result.returncode == 2 and "unknown argument --no-such-option" in result.stderr


@decodes_with_pycocotools  # the reference loop reads masks as the tutorial scripts do
def test_reference_loop_trains_and_predicts_under_autocast(shapes, tmp_path):
    """--reference-amp: the tutorial loop with AMP, as torchvision's reference scripts run it."""
    import reference_loop as reference
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    from tinyseg.config import InputConfig, ModelConfig, PredictConfig
    from tinyseg.inference.submission import validate_submission
    from tinyseg.model import build_model

    dataset = reference.TutorialDataset(str(shapes["train"]), str(shapes["images"]))
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", init="none", fpn_channels=32, box_head_dim=64), 4,
                        test=InputConfig(test_min_size=96, test_max_size=160), predict=PredictConfig(score_thresh=0.0))
    model.transform = GeneralizedRCNNTransform(96, 160, model.transform.image_mean, model.transform.image_std)
    before = [p.detach().clone() for p in model.parameters()]
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, collate_fn=reference.collate)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.005, momentum=0.9)
    assert reference.train_steps(model, loader, optimizer, 1, amp=torch.bfloat16) == 1
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before))
    test = json.loads(Path(shapes["test"]).read_text())
    entries = [(image["id"], image["file_name"]) for image in test["images"][:1]]
    output = tmp_path / "reference.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the pooler's RoIAlign threads do not inherit autocast (bench_models.reference_amp)
    try:
        written = reference.predict_to_file(model, entries, str(shapes["images"]), str(output), category_ids=[3, 7, 12],
                                            amp=torch.bfloat16)
    finally:
        torch.set_num_threads(threads)
    assert written > 0
    assert validate_submission(output, shapes["test"], shapes["train"]) == []
