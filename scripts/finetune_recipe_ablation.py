"""Which part of a full-finetuning recipe moves its accuracy: one finished run, again with
settings changed one group at a time.

    python scripts/finetune_recipe_ablation.py --from runs/finetune_cpu/finetune/random_b500_s0 \
        --workdir runs/recipe_ablation

`--from` is the workdir of a finished `bilaf finetune --mode full` run (its config.json gives the
base settings, the selection included). Each variant runs in WORKDIR/<name> (resumable, as any
finetuning workdir) and the table goes to WORKDIR/results.md and stdout. Bad input: one line
on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import fail

# name -> settings changed from the base run's config
VARIANTS = {
    "as run": {},
    "no gradient clipping": {"grad_clip_norm": None},
    "plain momentum (no Nesterov)": {"nesterov": False},
    "neither": {"grad_clip_norm": None, "nesterov": False},
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="base", required=True, help="workdir of a finished full finetune")
    p.add_argument("--workdir", required=True)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    args = p.parse_args(argv)
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown or not chosen:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if len(set(chosen)) != len(chosen):  # one workdir and one table row per variant
        p.error(f"--variants repeats a variant: {args.variants}")
    try:
        return _run(args, chosen)
    except (ValueError, OSError) as e:  # InputError included
        return fail("finetune_recipe_ablation.py", e)


def _run(args, chosen) -> int:
    from bilaf_jax.io import InputError, write_text_atomic
    from train.train import make_config, train_and_evaluate

    # A missing or unreadable --from was a traceback.
    try:
        base = json.loads((Path(args.base) / "config.json").read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{args.base} is not a finetuning workdir (no readable config.json "
                         "with a config)") from None
    if not isinstance(base, dict) or base.get("mode") != "full":
        raise InputError(f"{args.base} is not a full-finetuning run")
    # Every variant's config before the first run (hours), not when its turn comes.
    configs = {name: make_config(**{**base, **VARIANTS[name]}) for name in chosen}
    out = Path(args.workdir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--workdir {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    rows = ["| variant | changed | final accuracy % |", "|---|---|---|"]
    for name in chosen:
        change = VARIANTS[name]
        summary = train_and_evaluate(configs[name], out / name.split(" (")[0].replace(" ", "_"))
        shown = ", ".join(f"{k}={v}" for k, v in change.items()) or "-"
        rows.append(f"| {name} | {shown} | {100 * summary['final_accuracy']:.1f} |")
        print(rows[-1], flush=True)
    text = (f"Base: {args.base} (selection {base['selection']}, seed {base['seed']}, "
            f"{base['steps']} steps)\n\n" + "\n".join(rows) + "\n")
    write_text_atomic(out / "results.md", text)
    sys.stdout.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
