#!/usr/bin/env bash
# One prepared GPU benchmark run (H100/H200), the issues' GPU measurements first: full pipeline
# at ImageNet scale, extraction and full-finetune throughput at 224 px, ActiveFT at CIFAR
# scale, JPEG reading per reader thread count; then the boundary stage alone at ImageNet scale
# with per-phase times for three class-batch sizes (boundary._ACCELERATOR_BATCH_ELEMENTS is
# 2^25, chosen by counting loop steps, not timed). Uses the machine's own JAX/Flax/Optax; no
# install step. Results: $OUT (or ./gpu_results), 8 files at most (JSON per step and
# log.txt). Each step has its own time limit, 13 minutes in all at most; the sweep comes last,
# so a command cut at 10 minutes loses only some of it.
#   bash scripts/gpu_bench.sh            # the real run
#   bash scripts/gpu_bench.sh --smoke    # the same steps at toy sizes: checks the script on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ "${1:-}" = "--smoke" ]; then
  SIZES="--n 20000 --k 100 --budget 1000 --clusters 50"
  SCALE="$SIZES --steps 5 --batch-size 5000"
  ACTIVEFT="--n 5000 --k 50 --steps 20 --repeats 1"
  SIZE=64; EXTRACT_BATCH=8; FINETUNE="--batch-size 4 --steps 2"; READ="--images 40 --workers 1,2"
elif [ $# -gt 0 ]; then
  echo "usage: bash scripts/gpu_bench.sh [--smoke]" >&2; exit 2
else
  SIZES=""; SCALE=""
  ACTIVEFT="--n 50000 --k 250 --steps 300 --repeats 2"
  SIZE=224; EXTRACT_BATCH=256; FINETUNE="--batch-size 128 --steps 20"; READ="--images 2000 --workers 1,4,8"
fi
LOG=$(mktemp -d)
FAILED=0
step() {  # step NAME TIMEOUT STDOUT_FILE CMD...: run one measurement, go on if it fails
  local name=$1 limit=$2 out=$3; shift 3
  echo "== $(date -u +%H:%M:%S) $name"
  if ! timeout "$limit" "$@" > "$out"; then echo "== FAILED: $name"; FAILED=1; fi
  cat "$out"
}
{
echo "== $(date -u +%H:%M:%S) devices"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null \
  || echo "no nvidia-smi"
$PY -c "import jax; print(jax.__version__, jax.devices())"
# shellcheck disable=SC2086  # the size flags are meant to split into words
step "full pipeline, ImageNet scale (ActiveFT 100 x 100k rows, then boundary stage), run twice" \
  240 "$LOG/scale_full.md" $PY scripts/bench_scale.py --full-pipeline --in-process \
  --precision default $SCALE --out "$OUT/scale_full.json"
step "extraction $SIZE px" 75 "$OUT/extract.json" $PY scripts/bench_extract.py --image-size $SIZE \
  --batch-size $EXTRACT_BATCH --channels 3 --input-size $SIZE --weights random --json
# shellcheck disable=SC2086
step "full finetune $SIZE px" 90 "$OUT/finetune.json" $PY scripts/bench_finetune.py \
  --image-size $SIZE $FINETUNE
# shellcheck disable=SC2086
step "ActiveFT n=50000 K=250 300 steps" 60 "$LOG/activeft.md" $PY scripts/bench_activeft.py $ACTIVEFT
# shellcheck disable=SC2086
step "JPEG reading and extraction at $SIZE px per reader thread count" 100 "$OUT/read.json" \
  $PY scripts/bench_read.py $READ --image-size $SIZE --extract --json
for e in 23 25 27; do  # a child process per size, killed at 60 s keeping its finished runs
  # shellcheck disable=SC2086
  step "boundary stage alone, class batches of 2^$e elements, per phase" 70 "$LOG/boundary_$e.md" \
    $PY scripts/bench_scale.py $SIZES --profile --repeats 1 --timeout 60 \
    --batch-elements $((1 << e)) --out "$OUT/boundary_2e$e.json"
done
echo "== $(date -u +%H:%M:%S) done"
exit $FAILED
} 2>&1 | tee "$OUT/log.txt"
