#!/usr/bin/env bash
# The GPU check, prepared for the day a GPU is lent: one script, one GPU, under 8 minutes.
#
#   bash benchmarks/gpu_check.sh [--out DIR]              # on a machine with one CUDA GPU
#   bash benchmarks/gpu_check.sh --dry-run [--out DIR]    # the same steps on the CPU, tiny (the test suite)
#
# Steps, each timed, its output in DIR/<step>.log:
#   1. amp     `tinyseg train --config tinyvoc` from scratch on nuclei with fp16 AMP, ITERS iterations
#              (the preset keeps EMA weights: solver.ema=true);
#   2. ema     the same run resumed (--resume), to ITERS + EXTRA_ITERS: the EMA weights go back to the
#              GPU and keep averaging (the check: EMA updates = iterations), then are scored on val;
#   3. ddp     a 1-process torchrun of the same training (NCCL on CUDA), DDP_ITERS iterations;
#   4. speed   benchmarks/throughput.py --quick --reference-amp (AMP on both sides), REPEATS (1) repeats,
#              with the step-2 checkpoint beside random weights -> DIR/throughput-gpu.json.
# Each training step is checked from its checkpoint (iteration reached, EMA kept: DIR/<step>-check.json),
# and DIR/gpu_check.json sums up steps, seconds and checks. Checkpoints stay in a scratch folder (WORK,
# default a temporary one, removed at the end), so DIR holds only small files: logs, config.yaml, metrics.jsonl, results.
# --dry-run: --device cpu, gloo instead of NCCL, amp=auto (bf16 where the CPU has it), a generated
# dataset instead of nuclei, the tests' tiny model (tests/conftest.py TINY), 2 iterations a step,
# throughput.py --smoke.
# DIR: --out, else $OUT (the device machine's output folder), else a new temporary folder.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY=0
DIR=${OUT:-}
while [[ $# -gt 0 ]]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --out) DIR=$2; shift ;;
        *) echo "gpu_check.sh: unknown argument $1 (use --dry-run, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done
DIR=${DIR:-$(mktemp -d -t gpu-check.XXXXXX)}
if [[ -z ${WORK:-} ]]; then  # checkpoints of a GPU run are gigabytes: a folder made here goes at the end
    WORK=$(mktemp -d -t gpu-check-work.XXXXXX)
    trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$DIR" "$WORK"
DIR=$(cd "$DIR" && pwd)
if [[ -z ${PYTHON:-} ]]; then
    PYTHON=python3
    [[ -x $ROOT/.venv/bin/python ]] && PYTHON=$ROOT/.venv/bin/python
fi
cd "$ROOT"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

if [[ $DRY == 1 ]]; then
    # On a busy 2-core CPU, two OpenMP threads per process stall at every barrier (a 256 x 256 matmul
    # ran at 1 GFLOP/s instead of 59); tiny models gain nothing from a second thread.
    export OMP_NUM_THREADS=1
    DATA=$WORK/shapes
    "$PYTHON" -c "import sys; from tinyseg.data.synthetic import make_shapes_dataset as m; m(sys.argv[1], train_images=4, val_images=2, test_images=1, size=(96, 112), max_shapes=2)" "$DATA"
    TRAIN=(--train-json "$DATA/train.json" --image-dir "$DATA/images")
    VAL=(--val-json "$DATA/val.json")
    CHECKPOINT_IMAGES=(--checkpoint-json "$DATA/val.json" --checkpoint-images "$DATA/images")
    ITERS=${ITERS:-2} EXTRA_ITERS=${EXTRA_ITERS:-2} DDP_ITERS=${DDP_ITERS:-2}
    # amp=auto: bf16 autocast on CPUs with native bf16 (AVX512-BF16/AMX); emulated bf16 elsewhere made
    # each tiny step 3 s instead of a fraction of one, for no extra coverage (fp16 + GradScaler is CUDA's).
    SETTINGS=(train.device=cpu train.amp=auto data.num_workers=0 eval.ci_resamples=0 train.report=false
              model.backbone=resnet18 model.fpn_channels=32 model.box_head_dim=128
              model.rpn_batch_size_per_image=64 model.box_batch_size_per_image=32
              model.rpn_post_nms_top_n_train=200 model.rpn_post_nms_top_n_test=200
              "input.min_size=[96]" input.max_size=160 input.test_min_size=96 input.test_max_size=160
              solver.batch_size=2 solver.warmup_iters=1 train.channels_last=false)
    SPEED=(--smoke --device cpu)
else
    SHARED=${TINYSEG_SHARED:-$ROOT/../shared}
    N=$SHARED/datasets/nuclei
    [[ -f $N/train.json ]] || { echo "gpu_check.sh: no nuclei data at $N (set TINYSEG_SHARED)" >&2; exit 2; }
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA GPU here (use --dry-run)')"
    TRAIN=(--train-json "$N/train.json" --image-dir "$N/images")
    VAL=(--val-json "$N/val.json")
    CHECKPOINT_IMAGES=(--checkpoint-json "$N/val.json" --checkpoint-images "$N/images")
    # Budget on one GPU (8 minutes in all, estimated, not yet measured): ~3 min of training at batch 8
    # and the val scoring, ~3 min of throughput.py --quick with one repeat (6 fresh prediction processes,
    # each importing torch and starting CUDA).
    ITERS=${ITERS:-300} EXTRA_ITERS=${EXTRA_ITERS:-100} DDP_ITERS=${DDP_ITERS:-50}
    SETTINGS=(train.device=cuda train.amp=fp16 data.num_workers=8 solver.warmup_iters=50)
    SPEED=(--quick --device cuda --repeats "${REPEATS:-1}")
fi
# after every option (argparse); no val split: only the resumed step evaluates (its EMA weights, on val)
OVERRIDES=(model.init=none train.eval_every=0 data.val_fraction=0 "${SETTINGS[@]}")
SUMMARY=$DIR/steps.tsv
: > "$SUMMARY"

step() {  # step NAME COMMAND...: run, time, log; stop the check at the first failure
    local name=$1 start code
    shift
    echo "== $name: $*" | tee "$DIR/$name.log"
    start=$(date +%s%N)
    set +e
    "$@" 2>&1 | tee -a "$DIR/$name.log"
    code=${PIPESTATUS[0]}
    set -e
    printf '%s\t%s\t%s\n' "$name" "$code" $(( ($(date +%s%N) - start) / 1000000 )) >> "$SUMMARY"  # milliseconds
    if [[ $code != 0 ]]; then
        echo "gpu_check.sh: step $name failed (exit $code); see $DIR/$name.log" >&2
        exit "$code"
    fi
}

keep_run() {  # keep_run NAME RUN_DIR: its small files to DIR, its checkpoint for the checks at the end
    cp "$2/config.yaml" "$DIR/$1-config.yaml"
    [[ -f $2/metrics.jsonl ]] && cp "$2/metrics.jsonl" "$DIR/$1-metrics.jsonl"
    cp "$2/last.pt" "$WORK/$1-last.pt"
}

RUN=$WORK/amp
TINYSEG_TRAIN=(-m tinyseg train --config tinyvoc "${TRAIN[@]}")
step amp "$PYTHON" "${TINYSEG_TRAIN[@]}" --output-dir "$RUN" "${OVERRIDES[@]}" solver.max_iters="$ITERS"
keep_run amp "$RUN"
step ema "$PYTHON" "${TINYSEG_TRAIN[@]}" "${VAL[@]}" --output-dir "$RUN" --resume "${OVERRIDES[@]}" \
    solver.max_iters=$((ITERS + EXTRA_ITERS))
keep_run ema "$RUN"
step ddp "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 "${TINYSEG_TRAIN[@]}" \
    --output-dir "$WORK/ddp" "${OVERRIDES[@]}" solver.max_iters="$DDP_ITERS"
keep_run ddp "$WORK/ddp"
step speed "$PYTHON" benchmarks/throughput.py "${SPEED[@]}" --reference-amp --checkpoint "$RUN/last.pt" \
    "${CHECKPOINT_IMAGES[@]}" --json "$DIR/throughput-gpu.json"

# One process for every check (each python start imports torch: seconds on a busy CPU). tinyvoc keeps
# EMA weights (solver.ema=true), so each run must have them, with one update per iteration: a resume
# that dropped the average would restart the count.
"$PYTHON" benchmarks/gpu_check_verify.py --steps "$SUMMARY" --dry-run "$DRY" --out "$DIR" \
    --check amp "$WORK/amp-last.pt" "$ITERS" 1 --check ema "$WORK/ema-last.pt" $((ITERS + EXTRA_ITERS)) 1 \
    --check ddp "$WORK/ddp-last.pt" "$DDP_ITERS" 1
echo "gpu_check.sh: all steps passed; results in $DIR"
