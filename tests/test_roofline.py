"""benchmarks/roofline.py and machine_info.py: the FLOP counts, the peak and utilization arithmetic, the
stage timer, and the machine fields every benchmark result file carries."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import machine_info  # noqa: E402
import roofline  # noqa: E402


def test_flops_of_a_conv_and_a_linear_match_the_formulas():
    conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1)
    linear = torch.nn.Linear(16, 4)
    x = torch.randn(2, 3, 10, 12)
    counts, out = roofline.count_flops(lambda: conv(x))
    assert counts["Global"] == 2 * 8 * 3 * 3 * 3 * 10 * 12 * 2  # 2 x Cout x Cin x k x k x Hout x Wout x N
    assert out.shape == (2, 8, 10, 12)
    counts, _ = roofline.count_flops(lambda: linear(torch.randn(5, 16)))
    assert counts["Global"] == 2 * 16 * 4 * 5
    # a backward pass inside the call is counted: weight and input gradients, one forward's worth each
    inputs = torch.randn(5, 16, requires_grad=True)
    counts, _ = roofline.count_flops(lambda: linear(inputs).sum().backward())
    assert counts["Global"] == 3 * 2 * 16 * 4 * 5


def test_utilization_is_achieved_over_peak():
    assert roofline.utilization(gflops_per_image=2.0, images_per_s=5.0, peak_gflops=100.0) == pytest.approx(0.1)
    assert roofline.utilization(2.0, 5.0, 0.0) == 0.0


def test_peak_is_twice_n_cubed_over_the_best_run(monkeypatch):
    ticks = iter([0.0, 0.5, 1.0, 1.25, 2.0, 3.0, 4.0, 4.4] + [10.0 + i for i in range(100)])
    monkeypatch.setattr(roofline.time, "perf_counter", lambda: next(ticks))
    # runs of 0.5, 0.25, 1.0, 0.4 s (then 1 s each): the best is 0.25 s
    assert roofline.peak_matmul_gflops("cpu", torch.float32, size=64, min_seconds=2.0) == pytest.approx(2 * 64**3 / 0.25 / 1e9)


def test_conv_peak_counts_the_convolutions_flops(monkeypatch):
    ticks = iter([0.0, 0.5, 1.0, 1.2, 2.0, 3.0] + [10.0 + i for i in range(100)])
    monkeypatch.setattr(roofline.time, "perf_counter", lambda: next(ticks))
    # runs of 0.5, 0.2, 1.0 s (then 1 s each): 2 x C x C x 9 x H x W FLOPs in the best, 0.2 s
    assert roofline.peak_conv_gflops("cpu", torch.float32, size=8, channels=4, min_seconds=2.0) == pytest.approx(
        2 * 4 * 4 * 9 * 8 * 8 / 0.2 / 1e9)
    # --smoke's sizes (every run takes 1 s on this clock): a 256 matmul, a 32-channel conv on 32 x 32
    peaks = roofline.dense_peaks("cpu", torch.float32, small=True)
    assert peaks == {"matmul": pytest.approx(2 * 256**3 / 1e9), "conv3x3": pytest.approx(2 * 32 * 32 * 9 * 32 * 32 / 1e9)}


def tiny_model():
    from tinyseg.config import InputConfig, ModelConfig, PredictConfig
    from tinyseg.model import build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(backbone="resnet18", init="none", fpn_channels=32, box_head_dim=64), 4,
                       test=InputConfig(test_min_size=96, test_max_size=160),
                       predict=PredictConfig(score_thresh=0.0)).eval()


def test_model_flops_split_the_model_into_stages():
    model = tiny_model()
    counts, _ = roofline.count_flops(lambda: model([torch.rand(3, 96, 112)]))
    stages = roofline.model_flops(counts, model)
    for stage in ("backbone+FPN", "RPN", "box head", "mask head"):
        assert stages[stage] > 0, stage
    assert stages["backbone+FPN"] + stages["RPN"] + stages["box head"] + stages["mask head"] == stages["model"]
    assert stages["total"] >= stages["model"]


def test_stage_timer_times_every_stage_and_leaves_nothing_behind(shapes):
    from tinyseg.config import PredictConfig
    from tinyseg.data.coco import CategoryMap
    from tinyseg.data.dataset import ImageListDataset
    from tinyseg.inference import predictor, tta
    from tinyseg.inference.predictor import predict_images

    model = tiny_model()
    original_paste, original_merge = predictor.to_coco_results, tta.merge_views
    images = json.loads(Path(shapes["test"]).read_text())["images"][:2]
    dataset = ImageListDataset([(i["id"], i["file_name"]) for i in images], shapes["images"])
    categories = CategoryMap([3, 7, 12], ["a", "b", "c"])
    with roofline.StageTimer(model) as timer:
        found = predict_images(model, dataset, categories, torch.device("cpu"), 0.5, batch_size=1, progress=False,
                               tta=PredictConfig(tta=True))
    assert found.results  # score threshold 0: random weights still detect
    seconds = timer.per_image(len(images))
    for stage in ("backbone+FPN", "RPN", "box head", "mask head", "postprocess", "paste + RLE", "TTA merge"):
        assert seconds[stage] > 0, stage
    assert sum(seconds[stage] for stage in roofline.STAGES) == pytest.approx(seconds["total"])
    # hooks removed and functions restored: a later prediction runs untimed
    assert predictor.to_coco_results is original_paste and tta.merge_views is original_merge
    assert "postprocess" not in model.transform.__dict__
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_cpu_info_reads_the_name_and_the_kernel_flags():
    text = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
            "flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 amx_tile amx_bf16 avx512_vnni\n"
            "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu\n")
    name, flags = machine_info.cpu_info(text)
    assert name == "Intel(R) Xeon(R) Platinum 8480+"
    assert flags == ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16"]
    assert machine_info.cpu_info("model name : AMD EPYC\nflags : fpu sse2\n") == ("AMD EPYC", [])


def test_every_result_file_gets_the_machine_fields(tmp_path):
    path = tmp_path / "results" / "r.json"
    machine_info.write_result(str(path), {"train_ratio": 2.0, "commit": "abc1234"})
    written = json.loads(path.read_text())
    assert written["train_ratio"] == 2.0 and written["commit"] == "abc1234"  # the result's own fields win
    assert {"cpu_name", "cpu_flags", "machine", "torch"} <= set(written)
    assert isinstance(written["cpu_flags"], list)
    machine_info.write_result(None, {"x": 1})  # no path, no file
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary file left
