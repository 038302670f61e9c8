#!/usr/bin/env bash
# Show that `kill -9` in the middle of `bilaf extract` and of `bilaf run --quick`, followed by
# the same command again, ends with the same results as an uninterrupted run.
#
#   scripts/check_kill_resume.sh [WORKDIR]        # default: a new temporary folder (kept)
#   PARTS="extract" scripts/check_kill_resume.sh  # only one part (extract | run)
#
# extract: Fashion-MNIST train, first 3,000 images, EfficientNet-Lite0 at 48 px. The killed
#   run is stopped once some batches wait in OUT.partial/; the rerun must reuse them, and its
#   features, labels and indices must equal the uninterrupted run's bit for bit (numpy).
# run: `bilaf run --quick`, killed once while selections are being made and once while
#   evaluations are running; the final results.json must equal the uninterrupted run's,
#   ignoring timing fields (*seconds*, date, timing_this_call) and the workdir path, and every
#   cached selection file must be identical.
# Needs the Fashion-MNIST IDX files (default /usr/share/datasets/fashion-mnist or --data-dir
# via $DATA_DIR) and the efficientnet_lite0 weights package. Minutes on a 2-core CPU.
set -u

BILAF=${BILAF:-bilaf}
command -v "$BILAF" >/dev/null || { echo "no '$BILAF' command on PATH" >&2; exit 1; }
PYTHON=$(head -1 "$(command -v "$BILAF")" | sed 's/^#!//')
[ -x "$PYTHON" ] || PYTHON=python3
PARTS=${PARTS:-"extract run"}
DATA=()
[ -n "${DATA_DIR:-}" ] && DATA=(--data-dir "$DATA_DIR")
work=${1:-$(mktemp -d -t bilaf-kill-XXXXXX)}
mkdir -p "$work" && cd "$work" || exit 1
echo "work folder: $work"
status=0

# start_and_kill LOG PATTERN COUNT CMD...: run CMD in the background, wait until at least
# COUNT files match the glob PATTERN, then kill -9 it. Fails if CMD ends first.
start_and_kill() {
  local log=$1 pattern=$2 count=$3; shift 3
  "$@" >"$log" 2>&1 &
  local pid=$! found=0
  while kill -0 "$pid" 2>/dev/null; do
    # shellcheck disable=SC2086
    found=$(compgen -G "$pattern" | wc -l)
    if [ "$found" -ge "$count" ]; then
      kill -9 "$pid"
      wait "$pid" 2>/dev/null
      echo "  killed pid $pid with -9 once $found files matched $pattern"
      return 0
    fi
    sleep 0.2
  done
  wait "$pid"
  echo "  FAIL: the command ended (exit $?) before $count files matched $pattern"
  tail -5 "$log" | sed 's/^/  | /'
  return 1
}

timed() {  # timed LOG CMD...: run CMD to completion, print its wall time and last line
  local log=$1; shift
  local t0=$SECONDS
  "$@" >"$log" 2>&1
  local rc=$?
  echo "  exit $rc after $((SECONDS - t0)) s: $(grep . "$log" | tail -1)"
  return $rc
}

if [[ " $PARTS " == *" extract "* ]]; then
  echo "== bilaf extract: uninterrupted vs killed with -9 and rerun"
  X=(extract --dataset fashion_mnist --split train --limit 3000 --backbone efficientnet_lite0
     --image-size 48 --batch-size 128 --no-progress "${DATA[@]}")
  rm -rf ref.npz ref.npz.partial killed.npz killed.npz.partial
  echo "  uninterrupted:"
  timed extract_ref.log "$BILAF" "${X[@]}" --out ref.npz || status=1
  echo "  interrupted:"
  if start_and_kill extract_killed.log "killed.npz.partial/batch_*.npz" 5 "$BILAF" "${X[@]}" --out killed.npz; then
    echo "  after the kill: killed.npz $( [ -e killed.npz ] && echo exists || echo 'absent (good)'),"\
         "$(compgen -G 'killed.npz.partial/batch_*.npz' | wc -l) finished batches in killed.npz.partial/,"\
         "$(compgen -G 'killed.npz.partial/.*.tmp' | wc -l) temporary files"
    echo "  same command again:"
    timed extract_resumed.log "$BILAF" "${X[@]}" --out killed.npz || status=1
    "$PYTHON" - <<'EOF' || status=1
import json, os
import numpy as np
a, b = np.load("ref.npz"), np.load("killed.npz")
ok = True
for k in ("features", "labels", "indices"):
    same = a[k].shape == b[k].shape and a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k])
    ok &= same
    print(f"  {k}: {a[k].shape} {a[k].dtype}, identical: {same}")
ma, mb = (json.loads(str(z["meta"])) for z in (a, b))
ma.pop("seconds", None); mb.pop("seconds", None)
print(f"  meta (without seconds) identical: {ma == mb}")
ok &= ma == mb
left = os.path.exists("killed.npz.partial")
print(f"  partial folder removed: {not left}")
print("  PASS" if ok and not left else "  FAIL")
raise SystemExit(0 if ok and not left else 1)
EOF
  else
    status=1
  fi
fi

if [[ " $PARTS " == *" run "* ]]; then
  echo "== bilaf run --quick: uninterrupted vs killed twice with -9 and rerun"
  R=(run --quick --no-progress "${DATA[@]}")
  rm -rf run_ref run_killed
  echo "  uninterrupted:"
  timed run_ref.log "$BILAF" "${R[@]}" --workdir run_ref || status=1
  echo "  interrupted during selection:"
  ok=1
  start_and_kill run_killed1.log "run_killed/selections/*/*.json" 8 "$BILAF" "${R[@]}" --workdir run_killed || ok=0
  if [ $ok -eq 1 ]; then
    echo "  interrupted again during evaluation:"
    start_and_kill run_killed2.log "run_killed/evals/*/*.json" 10 "$BILAF" "${R[@]}" --workdir run_killed || ok=0
  fi
  if [ $ok -eq 1 ]; then
    echo "  after the kills: $(compgen -G 'run_killed/evals/*/*.json' | wc -l) evaluations cached,"\
         "results.json $( [ -e run_killed/results.json ] && echo exists || echo absent)"
    echo "  same command again:"
    timed run_resumed.log "$BILAF" "${R[@]}" --workdir run_killed || status=1
    "$PYTHON" - <<'EOF' || status=1
import filecmp, json, os

TIMING = ("seconds", "date", "timing_this_call", "run_started")


def strip(obj, workdir):
    if isinstance(obj, dict):
        return {k: strip(v, workdir) for k, v in obj.items() if not any(t in k for t in TIMING)}
    if isinstance(obj, list):
        return [strip(v, workdir) for v in obj]
    if isinstance(obj, str):
        return obj.replace(os.path.abspath(workdir), "WORKDIR").replace(workdir, "WORKDIR")
    return obj


a = strip(json.load(open("run_ref/results.json")), "run_ref")
b = strip(json.load(open("run_killed/results.json")), "run_killed")
ok = True
for key in sorted(set(a) | set(b)):
    same = a.get(key) == b.get(key)
    if not same:
        print(f"  results.json[{key!r}] differs")
    ok &= same
print(f"  results.json without timing fields identical: {ok} ({len(a['records'])} records)")
sel_diff = []
for root, _, names in os.walk("run_ref/selections"):
    for name in names:
        p = os.path.join(root, name)
        q = p.replace("run_ref", "run_killed", 1)
        if name.endswith(".json"):
            da, db = (strip(json.load(open(x)), "") for x in (p, q))
            if da != db:
                sel_diff.append(p)
        elif not filecmp.cmp(p, q, shallow=False):
            sel_diff.append(p)
only = set()
for sub in ("selections", "features", "evals"):
    for side, other in (("run_ref", "run_killed"), ("run_killed", "run_ref")):
        for root, _, names in os.walk(os.path.join(side, sub)):
            for name in names:
                if not os.path.exists(os.path.join(root, name).replace(side, other, 1)):
                    only.add(os.path.join(root, name))
print(f"  selection files differing (timing fields ignored): {len(sel_diff)} {sel_diff[:3]}")
print(f"  cached files present in one workdir only: {len(only)} {sorted(only)[:3]}")
import numpy as np

feat_diff = []
for name in sorted(os.listdir("run_ref/features")):
    if name.endswith(".npz"):
        za, zb = np.load(f"run_ref/features/{name}"), np.load(f"run_killed/features/{name}")
        for k in za.files:
            if k == "meta":
                continue
            if k not in zb.files or not np.array_equal(za[k], zb[k]):
                feat_diff.append(f"{name}:{k}")
        print(f"  features/{name}: arrays {', '.join(k for k in za.files if k != 'meta')} identical: "
              f"{not [d for d in feat_diff if d.startswith(name)]}")
ok &= not sel_diff and not only and not feat_diff
print("  PASS" if ok else "  FAIL")
raise SystemExit(0 if ok else 1)
EOF
  else
    status=1
  fi
fi

echo "== $( [ $status -eq 0 ] && echo PASS || echo FAIL )"
exit $status
