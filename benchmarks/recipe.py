"""Train a preset from scratch under a fixed wall-clock budget on a real dataset, and report val AP.

    python benchmarks/recipe.py --preset scratch-cpu --train-json ../shared/datasets/nuclei/train.json \
        --val-json ../shared/datasets/nuclei/val.json --image-dir ../shared/datasets/nuclei/images \
        --budget-min 20 --json out.json [key=value ...]

Without --val-json the val split is cut from --train-json by tinyseg's leak-free splitter
(data.val_fraction, data.split_seed), as `tinyseg train` does. With --folds K (and no --val-json) the
preset is cross-validated instead: K runs of --budget-min each, every one scored on the fold it did not
train on; the result holds each fold's scores and their mean and spread (tinyseg train --folds).

The budget covers training only; the cosine schedule decays to zero as the budget runs out, then the
model is evaluated once on the val split. The checkpoint stays in the run directory (--run-dir).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))

from machine_info import commit, machine, write_result  # noqa: E402  (one result writer for every benchmark)
from tinyseg.config import load_config  # noqa: E402
from tinyseg.training.cross_validation import cross_validate  # noqa: E402
from tinyseg.training.trainer import train  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--train-json", required=True)
    parser.add_argument("--val-json", default="",
                        help="default: split data.val_fraction of --train-json off, duplicate-aware (no leaks)")
    parser.add_argument("--image-dir", required=True)
    parser.add_argument("--budget-min", type=float, required=True, help="per run (per fold with --folds)")
    parser.add_argument("--folds", type=int, default=0, help="cross-validate over K folds of --train-json")
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--run-dir", help="default: runs/recipe-PRESET-<time>")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    run_dir = args.run_dir or f"runs/recipe-{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    config = load_config(args.preset, [
        f"data.train_json={args.train_json}", *([f"data.val_json={args.val_json}"] if args.val_json else []), f"data.image_dir={args.image_dir}",
        f"train.output_dir={run_dir}", f"train.max_time_min={args.budget_min}", "train.eval_every=0",
        *([f"data.folds={args.folds}"] if args.folds else []), *args.overrides])
    if args.folds:
        summary = cross_validate(config)
        result = {"preset": args.preset, "dataset": Path(args.train_json).parent.name, "folds": args.folds,
                  "budget_s_per_fold": args.budget_min * 60, "overrides": args.overrides, "run_dir": run_dir,
                  **{k: summary[k] for k in ("mean", "std", "min", "max", "split_seed")},
                  "per_fold": [{**{k: v for k, v in fold.items() if k != "val_image_ids"},
                                **val_intervals(Path(fold["run_dir"]))} for fold in summary["per_fold"]],
                  "machine": machine(), "commit": commit()}
        print(json.dumps(result, indent=2))
        write_result(args.json, result)
        return 0
    summary = train(config)
    best = summary["best"]
    result = {"preset": args.preset, "dataset": Path(args.train_json).parent.name, "budget_s": args.budget_min * 60,
              "iterations": summary["iterations"], "images_seen": summary["images_seen"],
              "segm_AP50": best.get("segm_AP50"), "segm_AP": best.get("segm_AP"), "bbox_AP50": best.get("bbox_AP50"),
              "overrides": args.overrides, "run_dir": run_dir, "train_seconds": round(summary["seconds"], 1),
              "machine": machine(), "commit": commit(), **val_intervals(Path(run_dir))}
    print(json.dumps(result, indent=2))
    write_result(args.json, result)
    return 0


def val_intervals(run_dir: Path) -> dict:
    """The 95% bootstrap intervals of the final val evaluation (eval.ci_resamples), as the trainer wrote them."""
    path = run_dir / "val_results.json"
    if not path.exists():
        return {}
    results = json.loads(path.read_text())
    out = {}
    for kind in ("segm", "bbox"):
        ci = (results.get(kind) or {}).get("ci")
        if ci:
            out[f"{kind}_AP50_ci"], out[f"{kind}_AP_ci"] = ci["AP50"], ci["AP"]
            out["ci_method"] = f"{ci['method']}, {ci['resamples']} resamples, level {ci['level']}"
    return out


if __name__ == "__main__":
    sys.exit(main())
