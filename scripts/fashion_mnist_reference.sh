#!/usr/bin/env bash
# The reference numbers of configs/fashion_mnist.py, measured: random selections of 100, 200
# and 500 labels and all 10,000 labels of the pool (the first 10,000 train images), each
# evaluated by the linear probe and k-NN on cached 48 px EfficientNet-Lite0 tap features, and
# the 500-label selection fully finetuned with the config's recipe.
#
#   scripts/fashion_mnist_reference.sh [WORKDIR]     # default runs/fashion_mnist_reference
#   FULL=0 scripts/fashion_mnist_reference.sh        # the feature evaluations only (seconds)
#
# Every step is a `bilaf` command, printed before it runs; a finished step is reused when the
# script runs again (extraction and finetuning resume). Ends with a table of final_accuracy.
# The whole script: 2 min 32 s on a 2-core CPU, most of it the full finetune.
set -euo pipefail

BILAF=${BILAF:-bilaf}
command -v "$BILAF" >/dev/null || { echo "no '$BILAF' command on PATH" >&2; exit 1; }
PYTHON=$(head -1 "$(command -v "$BILAF")" | sed 's/^#!//')
[ -x "$PYTHON" ] || PYTHON=python3
work=${1:-runs/fashion_mnist_reference}
mkdir -p "$work"

run() { echo "+ $*"; "$@"; }

for split in train test; do
    run "$BILAF" extract --dataset fashion_mnist --split "$split" --limit 10000 \
        --backbone efficientnet_lite0_taps --image-size 48 --out "$work/$split.npz"
done

# Random selections: numpy's default_rng(0), as the config's docstring writes them.
for b in 100 200 500 10000; do
    "$PYTHON" -c "import json, sys, numpy as np
b = int(sys.argv[1])
json.dump(sorted(int(i) for i in np.random.default_rng(0).choice(10000, b, replace=False)),
          open(sys.argv[2], 'w'))" "$b" "$work/sel$b.json"
done

for b in 100 200 500 10000; do
    for mode in linear knn; do
        run "$BILAF" finetune --config fashion_mnist --mode "$mode" --selection "$work/sel$b.json" \
            --features "$work/train.npz" --test-features "$work/test.npz" --workdir "$work/${mode}_$b"
    done
done
if [ "${FULL:-1}" != 0 ]; then
    run "$BILAF" finetune --config fashion_mnist --selection "$work/sel500.json" --workdir "$work/full_500"
fi

"$PYTHON" - "$work" <<'EOF'
import json, pathlib, sys

work = pathlib.Path(sys.argv[1])
print("| run | labels | final_accuracy | steps |")
print("|---|---|---|---|")
for d in sorted(p.parent for p in work.glob("*/summary.json")):
    s = json.loads((d / "summary.json").read_text())
    print(f"| {d.name} | {s['num_labelled']} | {s['final_accuracy']:.4f} | {s['step']} |")
EOF
