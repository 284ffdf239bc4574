#!/usr/bin/env bash
# Issue 27: the project's own commands on a GPU box, end to end, in one run (sized for <= 8 min on one H100/H200):
#   1. data: the embedded dataset built, cleaned and split (v3) through the CLI;
#   2. benchmarks/gpu.sh's figures: loader img/s (folder vs cached) and training img/s, synthetic vs the real
#      loader (pipeline efficiency), for vgg16_v2 and efficientnet_lite0 at 224 px, bf16 + channels_last;
#   3. sweep sweeps/transfer_gpu.yaml on W workers (bf16, channels_last, torch.compile: the CUDA defaults);
#   4. promote --study, then on this box's CPU (CUDA_VISIBLE_DEVICES=""): predict of the champion on the test
#      split, and `predict --evaluate v3`: the served accuracy / macro-F1 equal to the run's logged test figures.
# Everything runs in a fresh workspace (its own data/, a sqlite MLflow store and an Optuna journal under its
# mlruns/): the user's data/ and mlruns/ are never touched. Each step's seconds and figures, or its error, land in
# one JSON, rewritten after every step (a run cut short keeps what it measured):
#   $OUT_DIR/gpu-e2e-<device>-<UTC date>.json    OUT_DIR: benchmarks/results (--smoke: a new temp dir)
# A failed step is recorded and the steps that do not need it still run; the exit status is 1 if any step failed.
#   bash benchmarks/gpu_e2e.sh             # on the GPU box
#   bash benchmarks/gpu_e2e.sh --smoke     # the same on the CPU: 3 classes, 1 epoch, 2 trials, 32 px (a test runs it)
# Sizes: E2E_TRIALS, E2E_WORKERS, E2E_SWEEP_TIMEOUT (seconds after which a worker starts no new trial).
# E2E_KEEP=1 keeps the workspace (its path is printed); PYTHON picks the interpreter (default .venv/bin/python).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
SMOKE=0
case "${1:-}" in
  --smoke) SMOKE=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_e2e.sh [--smoke]" >&2; exit 2 ;;
esac
PY=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$PY" ] || PY=python3
case "$PY" in /*) ;; *) PY=$(command -v "$PY") ;; esac  # the steps run inside the workspace

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-e2e-XXXXXX")
[ "${E2E_KEEP:-0}" = 1 ] && echo "workspace: $WORK (kept)" || trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/logs" "$WORK/mlruns"
cd "$WORK"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true
export RESEARCH_MLRUNS="$WORK/mlruns" MLFLOW_TRACKING_URI="sqlite:///$WORK/mlruns/mlflow.db"
unset MLFLOW_REGISTRY_URI
STORAGE="journal:$WORK/mlruns/optuna.journal"
STUDY=transfer_gpu_e2e
CHAMPION=models:/illustration-classifier@champion
CORES=$(nproc)

if [ "$SMOKE" = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""  # the same commands on the CPU, whatever the machine has
  OUT_DIR=${OUT_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-e2e-out-XXXXXX")}
  TRIALS=${E2E_TRIALS:-2} WORKERS=${E2E_WORKERS:-2} SWEEP_TIMEOUT=${E2E_SWEEP_TIMEOUT:-120}
  BUILD=(--classes heart drink animal-bird --limit-per-class 10)
  # one epoch at 32 px on the tiny set: the spec's space and sampler stay, its sizes shrink
  SWEEP_SET=(--set base.epochs=1 --set base.warmup_epochs=0 --set base.batch_size=8
             --set "space.image_size.choices=[32]" --set "enqueue=[]")
  DEVICE=cpu SIZE=32 BATCH=8
  LOADER_RUN=(--epochs 1 --workers 1)
  TRAIN_RUN=(--steps 1 --warmup 1 --repeats 1 --no-amp --no-channels-last)
else
  OUT_DIR=${OUT_DIR:-$REPO/benchmarks/results}
  TRIALS=${E2E_TRIALS:-24} WORKERS=${E2E_WORKERS:-4} SWEEP_TIMEOUT=${E2E_SWEEP_TIMEOUT:-200}
  BUILD=()
  SWEEP_SET=()
  DEVICE=cuda SIZE=224 BATCH=128
  LOADER_RUN=(--epochs 2)
  TRAIN_RUN=(--steps 40 --warmup 10 --repeats 2 --amp --channels-last)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else
    'no CUDA device visible to torch: run this on the GPU box, or with --smoke on a CPU')"
fi
for n in "$TRIALS" "$WORKERS" "$SWEEP_TIMEOUT"; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "E2E_TRIALS, E2E_WORKERS and E2E_SWEEP_TIMEOUT take whole numbers > 0, not '$n'" >&2; exit 2; }
done

RESULT=$("$PY" -m benchmarks.gpu_e2e init --work "$WORK" --out-dir "$OUT_DIR" --smoke "$SMOKE" \
  --set trials="$TRIALS" workers="$WORKERS" sweep_timeout_s="$SWEEP_TIMEOUT" image_size="$SIZE" batch_size="$BATCH")
echo "results: $RESULT"
FAILED=()

# step NAME LIMIT_S [needs=STEP,...] -- CMD...: runs CMD with its output on the terminal and in logs/NAME.log,
# then records its seconds and figures (or its error) in the JSON. A step whose needed step failed is skipped.
step() {
  local name=$1 limit=$2 needs="" rc=0 start_ns
  shift 2
  if [[ $1 == needs=* ]]; then needs=${1#needs=}; shift; fi
  shift  # --
  local missing
  for missing in ${needs//,/ }; do
    if [[ " ${FAILED[*]} " == *" $missing "* ]]; then
      echo "== $name: skipped ($missing failed)"
      FAILED+=("$name")
      "$PY" -m benchmarks.gpu_e2e record --result "$RESULT" --work "$WORK" --step "$name" --skipped "$missing failed"
      return 0
    fi
  done
  echo "== $name: $*"
  start_ns=$(date +%s%N)
  # SIGINT: a sweep's KeyboardInterrupt stops its worker processes too
  { timeout -s INT -k 30 "$limit" "$@" 2>&1 | tee "logs/$name.log"; } || rc=$?
  local millis=$((($(date +%s%N) - start_ns) / 1000000))
  [ "$rc" = 0 ] || FAILED+=("$name")
  "$PY" -m benchmarks.gpu_e2e record --result "$RESULT" --work "$WORK" --step "$name" --rc "$rc" \
    --millis "$millis" || FAILED+=("$name:record")
}

R=("$PY" -m research)
step data_build 300 -- "${R[@]}" data build --out data/raw/emoji20 --workers "$CORES" "${BUILD[@]}"
step data_clean 240 needs=data_build -- "${R[@]}" clean data/raw/emoji20 --out data/clean/emoji20 --workers "$CORES"
step data_split 180 needs=data_clean -- "${R[@]}" split data/clean/emoji20 --version v3 --out data/versions \
  --workers "$CORES"

BENCH=(--device "$DEVICE" --dataset v3 --data-root data/versions --cache-root data/cache --out "$WORK/bench.json")
step bench_loader 240 needs=data_split -- "$PY" -m benchmarks.loader "${BENCH[@]}" --sizes "$SIZE" \
  --batch-size "$BATCH" "${LOADER_RUN[@]}"
step bench_train 300 needs=data_split -- "$PY" -m benchmarks.train "${BENCH[@]}" --image-size "$SIZE" \
  --batch-size "$BATCH" --models vgg16_v2 efficientnet_lite0 "${TRAIN_RUN[@]}"

step sweep $((SWEEP_TIMEOUT + 240)) needs=data_split -- "${R[@]}" sweep "$REPO/sweeps/transfer_gpu.yaml" \
  --study-name "$STUDY" --storage "$STORAGE" --n-trials "$TRIALS" --workers "$WORKERS" --timeout "$SWEEP_TIMEOUT" \
  "${SWEEP_SET[@]}"
step promote 120 needs=sweep -- "${R[@]}" promote --study "$STUDY"
step predict_cpu 180 needs=promote -- env CUDA_VISIBLE_DEVICES= "${R[@]}" predict --model "$CHAMPION" \
  data/versions/v3/test --json
step served_check 180 needs=promote -- env CUDA_VISIBLE_DEVICES= "${R[@]}" predict --model "$CHAMPION" \
  --evaluate v3 --split test --json

"$PY" -m benchmarks.gpu_e2e show --result "$RESULT"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "failed: ${FAILED[*]} (errors in $RESULT)" >&2
  exit 1
fi
