#!/usr/bin/env bash
# Set up the environment and run the test suite: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
if [ "$#" -gt 0 ]; then
  exec python -m pytest -q "$@"
fi
# The finetuning tests run in a process of their own: late in one long session, XLA's CPU
# compiler (jaxlib 0.10.2) has crashed with SIGSEGV compiling their train steps, which compile
# and pass in a fresh process.
TRAIN=(tests/test_train.py tests/test_train_cli.py tests/test_train_resume.py)
ignore=()
for f in "${TRAIN[@]}"; do ignore+=(--ignore="$f"); done
# Two worker processes, a test file each at a time: most of the time is XLA compiling, on one
# core per program, so two files at once use both cores (15.6 -> 11.0 min on 2 cores).
python -m pytest -q -n 2 --dist loadfile "${ignore[@]}"
python -m pytest -q "${TRAIN[@]}"
