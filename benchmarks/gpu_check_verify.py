"""The checks of benchmarks/gpu_check.sh, which bash cannot make itself, and its summary.

    python benchmarks/gpu_check_verify.py --steps OUT/steps.tsv --dry-run 0 --out OUT \
        --check amp WORK/amp-last.pt 300 1 --check ema WORK/ema-last.pt 400 1 ...

Each --check NAME CHECKPOINT ITERATIONS EMA(0|1) asks whether a training step got where it was sent:
the checkpoint's iteration, EMA weights kept (one update per iteration) or absent, finite weights; it
writes OUT/NAME-check.json. OUT/gpu_check.json sums up the steps (name, exit code, seconds) and the
checks, with the machine fields every benchmark result has. Exit 1 when a step or a check failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))

from machine_info import write_result  # noqa: E402


def check_checkpoint(path: str, iterations: int, ema: bool) -> dict:
    import torch

    from tinyseg.runtime.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    weights = state.get("ema") if ema else state["model"]
    problems = []
    if state["iteration"] != iterations:
        problems.append(f"iteration {state['iteration']}, expected {iterations}")
    if ema and not state.get("ema"):
        problems.append("no EMA weights, although solver.ema=true")
    elif ema and state.get("ema_updates") != iterations:
        problems.append(f"{state.get('ema_updates')} EMA updates in {iterations} iterations")
    if not ema and state.get("ema"):
        problems.append("EMA weights in a run without solver.ema")
    not_finite = [k for k, v in (weights or {}).items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if not_finite:
        problems.append(f"non-finite weights in {len(not_finite)} tensors, e.g. {not_finite[0]}")
    config = state["config"]
    return {"checkpoint": path, "iteration": state["iteration"], "ema_updates": state.get("ema_updates", 0),
            "amp": config["train"]["amp"], "device": config["train"]["device"], "backbone": config["model"]["backbone"],
            "elapsed_s": state.get("elapsed_s"), "problems": problems}


def read_steps(steps_tsv: str) -> list[dict]:
    steps = []
    for line in Path(steps_tsv).read_text().splitlines():
        name, code, milliseconds = line.split("\t")
        steps.append({"step": name, "exit_code": int(code), "seconds": int(milliseconds) / 1000})
    return steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", required=True, help="steps.tsv written by gpu_check.sh")
    parser.add_argument("--dry-run", type=int, choices=(0, 1), default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--check", nargs=4, action="append", default=[],
                        metavar=("NAME", "CHECKPOINT", "ITERATIONS", "EMA"))
    args = parser.parse_args()
    steps, checks = read_steps(args.steps), {}
    for name, checkpoint, iterations, ema in args.check:
        checks[name] = check_checkpoint(checkpoint, int(iterations), ema == "1")
        write_result(str(Path(args.out) / f"{name}-check.json"), checks[name])
        for problem in checks[name]["problems"]:
            print(f"gpu check {name}: {problem}", file=sys.stderr)
    passed = all(s["exit_code"] == 0 for s in steps) and not any(c["problems"] for c in checks.values())
    write_result(str(Path(args.out) / "gpu_check.json"),
                 {"dry_run": bool(args.dry_run), "passed": passed, "seconds": sum(s["seconds"] for s in steps),
                  "steps": steps, "checks": checks})
    print(f"gpu check: {len(steps)} steps in {sum(s['seconds'] for s in steps):.0f} s, "
          f"{'passed' if passed else 'FAILED'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
