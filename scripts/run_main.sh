#!/usr/bin/env bash
# Set up a fresh machine and run the main job (the default benchmark) in runs/default.
# Usage: bash scripts/run_main.sh [--quick] [more `bilaf run` flags]
#   --quick: the 2,000-image smoke config, written to runs/quick instead.
# Re-running resumes: finished features, selections and evaluations are reused.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
workdir=runs/default
for arg in "$@"; do
  if [ "$arg" = "--quick" ]; then workdir=runs/quick; fi
done
mkdir -p runs
exec bilaf run --workdir "$workdir" "$@"
