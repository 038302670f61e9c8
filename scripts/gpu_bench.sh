#!/usr/bin/env bash
# One prepared GPU benchmark run (H100/H200): full pipeline at ImageNet scale, ActiveFT at CIFAR
# scale, feature extraction and full-finetune throughput at 224 px. Results go to $OUT (or
# ./gpu_results) as JSON and a log. Uses the machine's own JAX/Flax/Optax; no install step.
#   bash scripts/gpu_bench.sh            # the real run (about 5 minutes on an H200)
#   bash scripts/gpu_bench.sh --smoke    # the same steps at toy sizes: checks the script on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ "${1:-}" = "--smoke" ]; then
  SCALE="--n 20000 --k 100 --budget 1000 --clusters 50 --steps 5 --batch-size 5000"
  ACTIVEFT="--n 5000 --k 50 --steps 20 --repeats 1"
  SIZE=64; EXTRACT_BATCH=8; FINETUNE="--batch-size 4 --steps 2"
elif [ $# -gt 0 ]; then
  echo "usage: bash scripts/gpu_bench.sh [--smoke]" >&2; exit 2
else
  SCALE=""
  ACTIVEFT="--n 50000 --k 250 --steps 300 --repeats 2"
  SIZE=224; EXTRACT_BATCH=256; FINETUNE="--batch-size 128 --steps 20"
fi
FAILED=0
step() {  # step NAME TIMEOUT OUTFILE CMD...: run one measurement, keep going if it fails
  local name=$1 limit=$2 out=$3; shift 3
  echo "== $(date -u +%H:%M:%S) $name"
  if ! timeout "$limit" "$@" > "$out"; then echo "== FAILED: $name"; FAILED=1; fi
  cat "$out"
}
{
echo "== $(date -u +%H:%M:%S) devices"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
$PY -c "import jax; print(jax.__version__, jax.devices())"
# shellcheck disable=SC2086  # the size flags are meant to split into words
step "full pipeline, ImageNet scale (ActiveFT 100 x 100k rows, then boundary stage), run twice" 300 \
  "$OUT/scale_full.txt" $PY scripts/bench_scale.py --full-pipeline --in-process --precision default \
  $SCALE --out "$OUT/scale_full.json"
# shellcheck disable=SC2086
step "ActiveFT n=50000 K=250 300 steps" 90 "$OUT/activeft.md" $PY scripts/bench_activeft.py $ACTIVEFT
step "extraction $SIZE px" 90 "$OUT/extract.json" $PY scripts/bench_extract.py --image-size $SIZE \
  --batch-size $EXTRACT_BATCH --channels 3 --input-size $SIZE --weights random --json
# shellcheck disable=SC2086
step "full finetune $SIZE px" 90 "$OUT/finetune.json" $PY scripts/bench_finetune.py --image-size $SIZE \
  $FINETUNE
echo "== $(date -u +%H:%M:%S) done"
exit $FAILED
} 2>&1 | tee "$OUT/log.txt"
