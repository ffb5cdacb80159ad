"""benchmarks/peers/predict_side_by_side.py's bookkeeping (not its models): turns, warm-up, medians, ratios.
The clock is faked: each model "takes" a fixed time per image, so the figures are exact."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "peers" / "predict_side_by_side.py"


@pytest.fixture
def side_by_side():
    spec = importlib.util.spec_from_file_location("predict_side_by_side", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_models_take_turns_and_ratios_are_per_round(side_by_side, monkeypatch):
    clock = [0.0]
    calls: list[tuple[str, int]] = []
    # seconds per image of each model, per round: YOLO gets slower in round 2 (a drift of the machine)
    cost = {"tinyseg a": [0.6, 0.6, 0.6], "yolo b": [0.2, 0.3, 0.2]}
    round_of = {name: -1 for name in cost}

    def runner(name):
        def run(index):
            if index == 0:
                round_of[name] += 1
            calls.append((name, index))
            clock[0] += cost[name][max(round_of[name] - 1, 0)]  # round_of 0 is the warm-up
            return 2
        return run

    monkeypatch.setattr(side_by_side.time, "perf_counter", lambda: clock[0])
    timed = side_by_side.time_rounds({name: runner(name) for name in cost}, images=4, rounds=3)
    assert calls[:2] == [("tinyseg a", 0), ("yolo b", 0)]  # warm-up, one image each
    firsts = [calls[i][0] for i in range(2, len(calls), 4)]
    assert firsts == ["tinyseg a", "yolo b", "yolo b", "tinyseg a", "tinyseg a", "yolo b"]  # rotates each round
    assert timed["yolo b"]["runs"] == pytest.approx([0.2, 0.3, 0.2])
    assert timed["yolo b"]["s_per_image"] == pytest.approx(0.2) and timed["tinyseg a"]["detections_per_image"] == 2
    ratio = side_by_side.peer_ratios(timed)["tinyseg a / yolo b"]
    assert ratio["runs"] == pytest.approx([3.0, 2.0, 3.0]) and ratio["median"] == pytest.approx(3.0)


def test_random_weights_model_predicts_the_cap_on_real_files(side_by_side, shapes):
    """--random-weights: the preset's model shape with the overrides, every image at the detection cap."""
    loaded = side_by_side.random_weights_model("demo model.mask_head_convs=1 predict.max_detections=7", "none")
    convs = [m for m in loaded.model.roi_heads.mask_head.modules() if m.__class__.__name__ == "Conv2d"]
    assert len(convs) == 1 and loaded.config.predict.score_thresh == 0
    from tinyseg.data.formats import load_dataset

    records = load_dataset(shapes["val"], fmt="coco").images
    run = side_by_side.tinyseg_runner(loaded, loaded.config.predict, shapes["images"], records)
    assert len(records) == 4 and [run(i) for i in range(len(records))] == [7] * len(records)
