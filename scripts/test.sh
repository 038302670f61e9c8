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
# and pass in a fresh process. That process runs beside the rest rather than after them (on 2
# cores it ends first: 6.4 minutes against their 10.3); its report is printed after theirs.
TRAIN=(tests/test_train.py tests/test_train_cli.py tests/test_train_resume.py)
train_log=$(mktemp)
python -m pytest -q "${TRAIN[@]}" > "$train_log" 2>&1 &
train=$!
trap 'kill "$train" 2> /dev/null || true; rm -f "$train_log"' EXIT
ignore=()
for f in "${TRAIN[@]}"; do ignore+=(--ignore="$f"); done
# The rest in two worker processes, a test file each at a time, the longest files first
# (tests/conftest.py orders them): most of the time is XLA compiling, on one core per program.
status=0
python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder "${ignore[@]}" || status=$?
echo "== finetuning tests (tests/test_train*.py, their own process)"
train_status=0
wait "$train" || train_status=$?
cat "$train_log"
[ "$status" -eq 0 ] && status=$train_status
exit "$status"
