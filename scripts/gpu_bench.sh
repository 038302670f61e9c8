#!/usr/bin/env bash
# One prepared GPU benchmark run (H100/H200): full pipeline at ImageNet scale, ActiveFT at CIFAR
# scale, feature extraction and full-finetune throughput at 224 px. Results go to $OUT (or
# ./gpu_results) as JSON and a log. Uses the machine's own JAX/Flax/Optax; no install step.
#   bash scripts/gpu_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
log() { echo "== $(date -u +%H:%M:%S) $*"; }
{
log "devices"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$PY -c "import jax; print(jax.__version__, jax.devices())"
log "full pipeline, ImageNet scale (ActiveFT 100 x 100k rows, then boundary stage), run twice"
timeout 300 $PY scripts/bench_scale.py --full-pipeline --in-process --precision default --out "$OUT/scale_full.json"
log "ActiveFT n=50000 K=250 300 steps"
timeout 90 $PY scripts/bench_activeft.py --n 50000 --k 250 --steps 300 --repeats 2 > "$OUT/activeft.md"; cat "$OUT/activeft.md"
log "extraction 224 px"
timeout 90 $PY scripts/bench_extract.py --image-size 224 --batch-size 256 --channels 3 --input-size 224 --weights random --json > "$OUT/extract.json"; cat "$OUT/extract.json"
log "full finetune 224 px"
timeout 90 $PY scripts/bench_finetune.py --image-size 224 --batch-size 128 --steps 20 > "$OUT/finetune.json"; cat "$OUT/finetune.json"
log "done"
} 2>&1 | tee "$OUT/log.txt"
