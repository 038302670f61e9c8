#!/usr/bin/env bash
# Run the installed `bilaf` command against bad inputs. Each must exit with code 2, print one
# line on stderr, print no traceback and write no output file. Good input must write the
# selection list and its provenance sidecar (SELECTION.meta.json), and `--verify` must agree.
#
#   scripts/check_bad_inputs.sh            # uses `bilaf` on PATH (or $BILAF)
#
# Prints one line per case (PASS / FAIL / SKIP, exit code, the message) and a tally; exits 1
# if any case fails. As root, permission cases run with CAP_DAC_OVERRIDE and
# CAP_DAC_READ_SEARCH dropped (setpriv), since root otherwise reads and writes anything.
set -u

BILAF=${BILAF:-bilaf}
if ! command -v "$BILAF" >/dev/null; then
  echo "no '$BILAF' command on PATH (activate the virtual environment?)" >&2
  exit 1
fi
PYTHON=$(head -1 "$(command -v "$BILAF")" | sed 's/^#!//')
[ -x "$PYTHON" ] || PYTHON=python3

work=$(mktemp -d)
trap 'chmod -R u+rwx "$work" 2>/dev/null; rm -rf "$work"' EXIT
cd "$work" || exit 1
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}

"$PYTHON" - <<'EOF'
import json
import numpy as np
rng = np.random.default_rng(0)
good = rng.normal(size=(30, 4)).astype(np.float32)
np.save("good.npy", good)
np.save("one_d.npy", np.zeros(5, np.float32))
np.save("three_d.npy", np.zeros((2, 3, 4), np.float32))
np.save("empty.npy", np.zeros((0, 4), np.float32))
bad = good.copy(); bad[3, 1] = np.nan; np.save("nan.npy", bad)
bad[3, 1] = np.inf; np.save("inf.npy", bad)
np.save("object.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
np.savez("pool.npz", features=good, labels=rng.integers(0, 3, 30))
np.savez("test.npz", features=rng.normal(size=(12, 4)).astype(np.float32),
         labels=rng.integers(0, 3, 12))
open("text.npy", "w").write("not an array\n")
open("truncated.npy", "wb").write(open("good.npy", "rb").read()[:200])
for name, obj in {"sel.json": [0, 1, 2], "repeat.json": [1, 1, 2], "range.json": [0, 30],
                  "notlist.json": {"a": 1}, "many.json": list(range(28))}.items():
    json.dump(obj, open(name, "w"))
EOF
cp good.npy unreadable.npy && chmod 000 unreadable.npy
mkdir readonly && chmod 555 readonly

pass=0 fail=0 skip=0
DROP=()  # prefix that takes away root's permission override

# case NAME OUTPUT... -- ARGS...: expect exit 2, one stderr line, no traceback, no OUTPUT.
case_bad() {
  local name=$1; shift
  local outputs=()
  while [ "$1" != "--" ]; do outputs+=("$1"); shift; done
  shift
  "${DROP[@]}" "$BILAF" "$@" >stdout.txt 2>stderr.txt
  local rc=$? problems=()
  local lines
  lines=$(grep -c . stderr.txt)
  [ "$rc" -eq 2 ] || problems+=("exit $rc")
  [ "$lines" -eq 1 ] || problems+=("$lines stderr lines")
  if grep -q Traceback stderr.txt stdout.txt; then problems+=("traceback"); fi
  for f in "${outputs[@]}"; do
    if [ -e "$f" ]; then problems+=("wrote $f"); rm -rf "$f"; fi
  done
  local msg
  msg=$(grep . stderr.txt | tail -1)
  if [ ${#problems[@]} -eq 0 ]; then
    pass=$((pass + 1)); printf 'PASS  rc=%s  %-34s %s\n' "$rc" "$name" "$msg"
  else
    fail=$((fail + 1)); printf 'FAIL  rc=%s  %-34s %s\n' "$rc" "$name" "${problems[*]}"
    sed 's/^/        | /' stderr.txt | tail -6
  fi
}

S=(--budget 5 --out out.json)
O=(out.json out.meta.json)
echo "== bilaf select"
case_bad "missing file"               "${O[@]}" -- select missing.npy "${S[@]}"
case_bad "folder instead of file"     "${O[@]}" -- select . "${S[@]}"
case_bad "not a numpy file"           "${O[@]}" -- select text.npy "${S[@]}"
case_bad "truncated .npy"             "${O[@]}" -- select truncated.npy "${S[@]}"
case_bad "object array"               "${O[@]}" -- select object.npy "${S[@]}"
case_bad "1-D features"               "${O[@]}" -- select one_d.npy "${S[@]}"
case_bad "3-D features"               "${O[@]}" -- select three_d.npy "${S[@]}"
case_bad "empty features"             "${O[@]}" -- select empty.npy "${S[@]}"
case_bad "NaN features"               "${O[@]}" -- select nan.npy "${S[@]}"
case_bad "Inf features"               "${O[@]}" -- select inf.npy "${S[@]}"
case_bad "budget 0"                   "${O[@]}" -- select good.npy --budget 0 --out out.json
case_bad "budget > n"                 "${O[@]}" -- select good.npy --budget 31 --out out.json
case_bad "budget abc"                 "${O[@]}" -- select good.npy --budget abc --out out.json
case_bad "budget 150%"                "${O[@]}" -- select good.npy --budget 150% --out out.json
case_bad "budget 2.5"                 "${O[@]}" -- select good.npy --budget 2.5 --out out.json
case_bad "budget inf"                 "${O[@]}" -- select good.npy --budget inf --out out.json
case_bad "budget > unlabelled rows"   "${O[@]}" -- select good.npy --labeled many.json "${S[@]}"
case_bad "--labeled repeats"          "${O[@]}" -- select good.npy --labeled repeat.json "${S[@]}"
case_bad "--labeled out of range"     "${O[@]}" -- select good.npy --labeled range.json "${S[@]}"
case_bad "--labeled not a list"       "${O[@]}" -- select good.npy --labeled notlist.json "${S[@]}"
case_bad "--cores > budget"           "${O[@]}" -- select good.npy --cores 6 "${S[@]}"
case_bad "--cores 0"                  "${O[@]}" -- select good.npy --cores 0 "${S[@]}"
case_bad "unknown method"             "${O[@]}" -- select good.npy --method foo "${S[@]}"
case_bad "unknown mode"               "${O[@]}" -- select good.npy --mode foo "${S[@]}"
case_bad "missing output folder"      nodir -- select good.npy --budget 5 --out nodir/out.json
case_bad "output is a folder"         "${O[@]}" -- select good.npy --budget 5 --out .
case_bad "--verify without record"    -- select --verify sel.json
case_bad "--seed 2**32 (repeats 0)"    "${O[@]}" -- select good.npy --seed 4294967296 "${S[@]}"
before=$(sha256sum good.npy sel.json)
case_bad "output is the features file" -- select good.npy --budget 5 --out good.npy
case_bad "output is the --labeled file" -- select good.npy --labeled sel.json --budget 5 --out sel.json
if [ "$(sha256sum good.npy sel.json)" = "$before" ]; then
  pass=$((pass + 1)); echo "PASS  inputs unchanged after the two cases above"
else
  fail=$((fail + 1)); echo "FAIL  an input file was overwritten"
fi

if [ "$(id -u)" -eq 0 ]; then
  if setpriv --bounding-set -dac_override,-dac_read_search true 2>/dev/null; then
    DROP=(setpriv --bounding-set -dac_override,-dac_read_search)
    echo "   (root: the next two cases run without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH)"
  fi
fi
if [ "$(id -u)" -ne 0 ] || [ ${#DROP[@]} -gt 0 ]; then
  case_bad "unreadable file (chmod 000)" "${O[@]}" -- select unreadable.npy "${S[@]}"
  case_bad "unwritable output folder"  readonly/out.json readonly/out.meta.json -- \
    select good.npy --budget 5 --out readonly/out.json
else
  skip=$((skip + 2))
  echo "SKIP  unreadable file / unwritable folder: running as root without setpriv, permissions are not enforced"
fi
DROP=()

echo "== bilaf extract"
X=(--limit 10 --out f.npz)
XO=(f.npz f.npz.partial)
case_bad "unknown dataset"            "${XO[@]}" -- extract --dataset foo "${X[@]}"
case_bad "unknown backbone"           "${XO[@]}" -- extract --dataset fashion_mnist --backbone foo "${X[@]}"
case_bad "missing dataset folder"     "${XO[@]}" -- extract --dataset fashion_mnist --data-dir no_such_dir "${X[@]}"
case_bad "missing image folder"       "${XO[@]}" -- extract --dataset image_folder --data-dir no_such_dir "${X[@]}"
case_bad "unknown split"              "${XO[@]}" -- extract --dataset fashion_mnist --split foo "${X[@]}"
case_bad "missing output folder"      nodir -- extract --dataset fashion_mnist --limit 10 --out nodir/f.npz

echo "== bilaf finetune"
F=(--mode knn --features pool.npz --test-features test.npz --workdir wd)
case_bad "selection out of range"     wd -- finetune --selection range.json "${F[@]}"
case_bad "selection repeats"          wd -- finetune --selection repeat.json "${F[@]}"
case_bad "selection not a list"       wd -- finetune --selection notlist.json "${F[@]}"
case_bad "selection missing"          wd -- finetune --selection missing.json "${F[@]}"
case_bad "unknown mode"               wd -- finetune --selection sel.json --mode foo --workdir wd

echo "== bilaf run"
if "$BILAF" run --help >/dev/null 2>&1; then
  case_bad "unknown config"           wd -- run --config no_such_config --workdir wd
  case_bad "missing config file"      wd -- run --config no_such.py --workdir wd
else
  fail=$((fail + 1)); echo "FAIL  'bilaf run' is missing"
fi

echo "== good input"
# case_good NAME OUT ARGS...: exit 0, OUT holds 6 distinct indices, OUT's sidecar exists,
# and `--verify OUT` re-runs the selection to the same list.
case_good() {
  local name=$1 out=$2; shift 2
  "$BILAF" select good.npy --budget 6 "$@" --out "$out" 2>stderr.txt
  local rc=$? meta=${out%.json}.meta.json
  local n
  n=$("$PYTHON" -c "import json, sys; l = json.load(open(sys.argv[1])); print(len(l), len(set(l)))" "$out" 2>/dev/null)
  if [ $rc -eq 0 ] && [ -f "$meta" ] && [ "$n" = "6 6" ]; then
    pass=$((pass + 1)); echo "PASS  rc=0  $name: $out = $(cat "$out"), $meta written"
  else
    fail=$((fail + 1))
    echo "FAIL  rc=$rc  $name: $out = '$(cat "$out" 2>/dev/null)' (length, distinct: ${n:-none}), sidecar: $(ls "$meta" 2>&1)"
    sed 's/^/        | /' stderr.txt | tail -6
  fi
  if "$BILAF" select --verify "$out" >stdout.txt 2>stderr.txt; then
    pass=$((pass + 1)); echo "PASS  rc=0  $name, --verify: $(cat stdout.txt)"
  else
    fail=$((fail + 1)); echo "FAIL  $name, --verify: $(cat stdout.txt stderr.txt | tail -3)"
  fi
}
case_good "bilaf, default K = max(1, B // 10) = 1" sel_k1.json --steps 20
case_good "bilaf, --cores 2" sel_k2.json --steps 20 --cores 2
case_good "bilaf official, --cores 2" sel_off.json --steps 20 --cores 2 --mode official
case_good "kcenter" sel_kc.json --method kcenter

echo "== $pass passed, $fail failed, $skip skipped"
[ "$fail" -eq 0 ]
