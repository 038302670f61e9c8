#!/usr/bin/env bash
# One prepared GPU benchmark run (H100/H200), the issues' GPU measurements first: full pipeline
# at ImageNet scale (ActiveFT in float32, the library's default, then in TF32; a first run
# that compiles, then two more, each with the seconds it spent compiling: a GPU's scatter-add is
# not deterministic, so a rerun's cores, and the boundary stage's shapes, can differ),
# extraction and full-finetune throughput at 224 px, ActiveFT at CIFAR scale, JPEG reading per
# reader thread count; then the boundary stage alone at ImageNet scale with per-phase times for
# three class-batch sizes in one process (boundary._ACCELERATOR_BATCH_ELEMENTS is 2^25, chosen
# by counting loop steps, not timed). Uses the machine's own JAX/Flax/Optax; no
# install step. Results: $OUT (or ./gpu_results): a JSON file per step (JSON lines where a step
# measures several things, each line written as soon as it is measured), and log.txt. Each step
# has its own time limit, about 12 minutes in all at most; the sweep comes last, so a command cut at
# 10 minutes loses only some of it.
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
  SCALE="$SIZES --steps 5 --batch-size 5000 --repeats 1"
  ACTIVEFT="--n 5000 --k 50 --steps 20 --repeats 1"
  # ViT-S/16's train step compiles in a third of EfficientNet-Lite0's time on a CPU (6 s
  # against 17 s); both train in tests/test_train_resume.py
  SIZE=64; EXTRACT_BATCH=8; FINETUNE="--batch-size 4 --steps 2 --backbone vit_s16"
  READ="--images 40 --workers 1,2"
elif [ $# -gt 0 ]; then
  echo "usage: bash scripts/gpu_bench.sh [--smoke]" >&2; exit 2
else
  SIZES=""; SCALE="--repeats 2"
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
$PY -c "
import importlib.metadata as m, jax
def version(p):
    try:
        return m.version(p)
    except m.PackageNotFoundError:
        return 'absent'
print(', '.join(f'{p} {version(p)}' for p in ('jax', 'jaxlib', 'flax', 'optax', 'numpy')))
print(jax.devices(), jax.devices()[0].device_kind)"
# shellcheck disable=SC2086  # the size flags are meant to split into words
# A child process that saves its finished runs: a cut step still leaves them.
step "full pipeline, ImageNet scale (ActiveFT 100 x 100k rows, then boundary stage)" \
  250 "$LOG/scale_full.md" $PY scripts/bench_scale.py --full-pipeline --timeout 240 \
  --precision highest,default $SCALE --out "$OUT/scale_full.json"
step "extraction $SIZE px" 75 "$OUT/extract.jsonl" $PY scripts/bench_extract.py --image-size $SIZE \
  --batch-size $EXTRACT_BATCH --channels 3 --input-size $SIZE --weights random --json
# shellcheck disable=SC2086
step "full finetune $SIZE px" 90 "$OUT/finetune.jsonl" $PY scripts/bench_finetune.py \
  --image-size $SIZE $FINETUNE
# shellcheck disable=SC2086
step "ActiveFT n=50000 K=250 300 steps" 60 "$LOG/activeft.md" $PY scripts/bench_activeft.py $ACTIVEFT
# shellcheck disable=SC2086
step "JPEG reading and extraction at $SIZE px per reader thread count" 100 "$OUT/read.jsonl" \
  $PY scripts/bench_read.py $READ --image-size $SIZE --extract --json
# One process for the three sizes (the features are made and moved to the device once), the
# default size first; its finished runs are kept if it is cut.
# shellcheck disable=SC2086
step "boundary stage alone, class batches of 2^25, 2^23, 2^27 elements, per phase" 160 \
  "$LOG/boundary_sweep.md" $PY scripts/bench_scale.py $SIZES --profile --repeats 1 --timeout 150 \
  --batch-elements $((1 << 25)),$((1 << 23)),$((1 << 27)) --out "$OUT/boundary_sweep.json"
echo "== $(date -u +%H:%M:%S) done"
exit $FAILED
} 2>&1 | tee "$OUT/log.txt"
