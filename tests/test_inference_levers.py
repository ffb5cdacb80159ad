"""benchmarks/inference_levers.py: each named setting changes what it says on the trained checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import inference_levers  # noqa: E402
from tinyseg.data.coco import read_json  # noqa: E402


def test_the_test_size_and_nms_settings_reach_the_model(trained_run):
    shapes = trained_run["shapes"]
    checkpoint = str(trained_run["run_dir"] / "best.pt")
    gt = inference_levers.subset(read_json(shapes["val"]), 2)

    def run(name: str) -> dict:
        return inference_levers.run_setting(checkpoint, inference_levers.SETTINGS[name], gt, str(shapes["images"]))

    shipped, resized = run("no-tta"), run("no-tta-test-size-320")
    assert resized["test_size"] == 320 and shipped["test_size"] != 320
    assert not resized["tta"] and resized["segm_AP50"] >= 0  # scored against the same ground truth
    assert inference_levers.SETTINGS["no-tta-nms-0.7"]["predict.nms_thresh"] == 0.7
    loaded = inference_levers.load_model(checkpoint, "cpu", {"nms_thresh": 0.7})
    assert loaded.model.roi_heads.nms_thresh == 0.7  # a predict.* change is built into the model
