"""`tinyseg demo`: the main job end to end on a dataset made on the spot, from scratch, on a CPU.

Everything goes under the output folder: the dataset, the run directory, the submission, the scores
and the overlay PNGs.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .config import load_config
from .data.synthetic import make_shapes_dataset
from .training.trainer import train
from .evaluation.coco_eval import format_report, read_detections
from .inference.jobs import PredictJob, load_ground_truth, predict_checkpoint, score
from .inference.submission import validate_submission, write_submission
from .runtime.files import write_json
from .inference.overlays import write_overlays

log = logging.getLogger("tinyseg")


def run_demo(output_dir: str, overrides: list[str] | None = None) -> dict:
    started = time.time()
    out = Path(output_dir)
    paths = make_shapes_dataset(out / "data", train_images=80, val_images=20, test_images=20)
    log.info("dataset: %s (80 train, 20 val, 20 test images with COCO JSON)", out / "data")
    run_dir = out / "run"
    config = load_config("demo", [
        f"data.train_json={paths['train']}", f"data.image_dir={paths['images']}",
        f"data.val_json={paths['val']}", f"train.output_dir={run_dir}", *(overrides or [])])
    summary = train(config)

    submission = out / "submission.json"
    found, _ = predict_checkpoint(PredictJob(str(run_dir / "best.pt"), str(paths["images"]), str(paths["test"]),
                                             num_workers=0))
    write_submission(submission, found.results)
    problems = validate_submission(submission, paths["test"])
    if problems:
        raise RuntimeError("the demo's own submission is invalid:\n" + "\n".join(problems))
    scores = score(load_ground_truth(str(paths["test_gt"])), read_detections(str(submission)))
    write_json(out / "test_scores.json", scores)
    print(format_report(scores))

    test_json = json.loads(Path(paths["test"]).read_text())
    overlays = write_overlays(test_json["images"][:8], found.results, test_json["categories"], paths["images"],
                              out / "overlays", config.predict.overlay_score_thresh)
    result = {"val_segm_AP50": summary["best"].get("segm_AP50"), "test_segm_AP50": scores["segm"]["stats"]["AP50"],
              "test_bbox_AP50": scores["bbox"]["stats"]["AP50"], "seconds": round(time.time() - started, 1),
              "submission": str(submission), "overlays": str(overlays[0].parent) if overlays else None,
              "run_dir": str(run_dir)}
    write_json(out / "demo_summary.json", result)
    log.info("demo done in %.0f s: test segm AP50 %.3f (val %.3f); submission %s; overlays in %s",
             result["seconds"], result["test_segm_AP50"], result["val_segm_AP50"] or -1, submission,
             result["overlays"])
    return result
