"""Ablations of BiLAF on the `default` run config: one BiLAF setting varied, all else fixed.

Usage:
  python scripts/ablation.py [--param num_cores|remove_fraction] [--values V1,V2,...]
      [--workdir runs/ablation_PARAM] [--features-from runs/default] [--seeds 0,1,2,3,4]

--param is a setting BiLAF alone uses: `num_cores` (K, the ActiveFT cores) or
`remove_fraction` (P_rm, the share of each pseudo-class that denoising drops); --values
defaults to 20,50,100 for K and 0,0.1,0.3 for P_rm. Runs `bilaf
run`'s pipeline (`bilaf_jax.experiment.run_experiment`) once per value with the methods
bilaf-paper and bilaf-official, and once with random and activeft (they do not use it), each
in a subfolder of --workdir sharing one set of extracted features (the first run's, copied into
the others; a subfolder holding other features is refused). Every other setting is the
`default` config's (Fashion-MNIST pool of 10,000, EfficientNet-Lite0 taps at 48 px,
selection on the 256-d projection, linear probe and k-NN, B = 100 / 200 / 500).
--features-from copies the features of a finished `bilaf run --workdir DIR` (default config)
instead of extracting them again. Resumable like `bilaf run`: finished pieces are kept.
Writes WORKDIR/results.md (test accuracy in %, mean ± std over the seeds; failed cells;
paired comparisons with random and activeft) and prints it. Every run's settings are checked
before the first starts; bad input: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import fail  # noqa: E402

from bilaf_jax import experiment, run_configs  # noqa: E402
from bilaf_jax.io import InputError, arrays_sha256, atomic_open, write_text_atomic  # noqa: E402

PARAMS = {"num_cores": ("K", int), "remove_fraction": ("P_rm", float)}
# --values when not given (the README's runs); K's 20,50,100 was also P_rm's, which is out of range
DEFAULT_VALUES = {"num_cores": "20,50,100", "remove_fraction": "0,0.1,0.3"}
FEATURE_FILES = ("pool.npz", "test.npz", "selection.npz")
# The config fields that decide the extracted (and projected) features.
FEATURE_FIELDS = ("dataset", "pool_size", "test_size", "backbone", "image_size", "weights",
                  "selection_dim")


def _features_sha256(path: Path) -> str:
    """The features and labels a feature file holds (its metadata aside)."""
    z = experiment._read_npz(path)
    return arrays_sha256(z["features"], z["labels"])


def share_features(base: Path, config, target: Path) -> None:
    """Copy base/features into target/features if base was run with the same feature settings."""
    # run.json is written when a run starts: an interrupted run's features count too
    try:
        saved = json.loads((base / "run.json").read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{base} is not a `bilaf run` workdir (no readable run.json); give "
                         "a finished or started default run, or leave out --features-from") from None
    if not (base / "features").is_dir():
        raise InputError(f"{base} has no features/ yet; leave out --features-from")
    differ = [f for f in FEATURE_FIELDS if saved.get(f) != getattr(config, f)]
    if differ:
        raise InputError(f"{base} was run with other feature settings "
                         f"({', '.join(differ)}); leave out --features-from")
    copy_features(base, target)


def check_same_features(base: Path, target: Path) -> None:
    """Refuse target features (say, extracted there before) that differ from base's, where
    both have them: the report pairs runs on the same seeds, which must see the same features
    and labels. (selection.npz records the pool it projects: made again where that differs.)"""
    for name in FEATURE_FILES:
        src, dst = base / "features" / name, target / "features" / name
        if (name != "selection.npz" and src.exists() and dst.exists()
                and _features_sha256(dst) != _features_sha256(src)):
            raise InputError(f"{dst} holds other features than {src}; move {dst.parent} away "
                             f"to use {base}'s (that run's selections and evaluations are then "
                             "made again)")


def copy_features(base: Path, target: Path) -> None:
    """Copy base/features' files into target/features where target has none (after
    `check_same_features`)."""
    check_same_features(base, target)
    (target / "features").mkdir(parents=True, exist_ok=True)
    for name in FEATURE_FILES:
        src, dst = base / "features" / name, target / "features" / name
        if src.exists() and not dst.exists():  # atomically: a killed copy leaves no stub
            with open(src, "rb") as fin, atomic_open(dst, "wb") as fout:
                shutil.copyfileobj(fin, fout)


def report(by_row: dict, budgets, label: str, command: str, seeds, default: str) -> str:
    lines = [f"# Ablation of {label} on the `default` config", "",
             f"Command: `{command}`; seeds {list(seeds)}; test accuracy in %, mean ± std over "
             f"the seeds. random and activeft do not use {label}.", ""]
    for ev, title in (("linear", "Linear probe"), ("knn", "Weighted k-NN (k = 20)")):
        lines += [f"{title}:", "", f"| method | {label} | " +
                  " | ".join(f"B = {b}" for b in budgets) + " |",
                  "|---|---|" + "---|" * len(budgets)]
        for (method, value), records in by_row.items():
            stats = experiment.summarize(records)
            cells = []
            for b in budgets:
                cells.append(experiment.format_cell(
                    *stats.get((method, b, ev), (float("nan"), float("nan"), 0)),
                    total=len(seeds)))
            lines.append(f"| {method} | {value} | " + " | ".join(cells) + " |")
        lines.append("")

    failed = {}  # (method, value, B) -> [seeds failed, seeds run, first error]
    for (method, value), records in by_row.items():
        for r in records:
            if r["eval"] != "linear":  # one record per selection
                continue
            seen = failed.setdefault((method, value, r["budget"]), [0, 0, None])
            seen[1] += 1
            if r.get("error"):
                seen[0] += 1
                seen[2] = seen[2] or r["error"]
    failed = {key: v for key, v in failed.items() if v[0]}
    if failed:
        lines += ["Failed selections:", ""]
        lines += [f"- {m}, {label} = {v}, B = {b}: {bad} of {total} seeds; first: {error}"
                  for (m, v, b), (bad, total, error) in failed.items()]
        lines.append("")

    # Paired over the seeds (two-sided t-test at 5%), as `bilaf run`'s verdicts.
    reference = by_row[("random", "-")] + by_row[("activeft", "-")]
    lines += ["Paired comparisons (two-sided t-test over the seeds, 5%):", ""]
    for (method, value), records in by_row.items():
        if value == "-":
            continue
        for ev in ("linear", "knn"):
            for b in budgets:
                said = [experiment.verdict(reference + records, method, other, b, ev)
                        for other in ("random", "activeft")]
                lines.append(f"- {label} = {value}, B = {b}, {ev}: " + "; ".join(said))
    if any(v == default for _, v in by_row):
        lines += ["", f"Paired with the default config's {label} = {default}:", ""]
        for (method, value), records in by_row.items():
            if value in ("-", default):
                continue
            # the default's records under another name, so that verdict can pair them
            other = f"{method} with {label} = {default}"
            base = [dict(r, method=other) for r in by_row[(method, default)]]
            for ev in ("linear", "knn"):
                for b in budgets:
                    lines.append(f"- {label} = {value}, B = {b}, {ev}: "
                                 + experiment.verdict(records + base, method, other, b, ev))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--param", choices=sorted(PARAMS), default="num_cores")
    p.add_argument("--values", default=None,
                   help="comma list of the setting's values (default: K 20,50,100; P_rm 0,0.1,0.3)")
    p.add_argument("--workdir", default=None, help="default: runs/ablation_PARAM")
    p.add_argument("--features-from", default=None, help="a finished default-config workdir")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    label, kind = PARAMS[args.param]
    try:
        values = [kind(v) for v in (args.values or DEFAULT_VALUES[args.param]).split(",")]
        seeds = tuple(int(s) for s in args.seeds.split(","))
    except ValueError as e:
        p.error(str(e))
    if len(set(values)) != len(values):  # one workdir and one table row per value
        p.error(f"--values repeats a value: {args.values}")
    try:
        return _run(args, label, values, seeds, argv)
    except InputError as e:
        return fail("ablation.py", e)


def _run(args, label, values, seeds, argv) -> int:
    base = run_configs.default()._replace(seeds=seeds)
    root = Path(args.workdir or f"runs/ablation_{args.param}")
    runs = [("reference", "-", base._replace(name="ablation_reference",
                                             methods=("random", "activeft")))]
    runs += [(f"{args.param}_{v}", str(v), base._replace(
        name=f"ablation_{args.param}_{v}", methods=("bilaf-paper", "bilaf-official"),
        **{args.param: v})) for v in values]
    # A bad value or seed failed only after the reference run (minutes to hours), with a traceback.
    for _, _, config in runs:
        experiment.validate(config)
    # features already there that differ from the shared ones, before the first run too
    source = Path(args.features_from) if args.features_from else root / runs[0][0]
    for folder, _, _ in runs:
        if root / folder != source:
            check_same_features(source, root / folder)
    command = " ".join(["python scripts/ablation.py", *(argv if argv is not None else sys.argv[1:])])
    by_row, budgets = {}, None
    first = None
    for folder, value, config in runs:
        wd = root / folder
        if args.features_from:
            share_features(Path(args.features_from), config, wd)
        elif first is not None:  # the first run's features serve the others: extracted once
            copy_features(first, wd)
        out = experiment.run_experiment(config, wd, progress=not args.no_progress,
                                        command=command)
        first = first or wd
        budgets = out.results["budgets"]
        for method in config.methods:
            by_row[(method, value)] = [r for r in out.results["records"] if r["method"] == method]
    text = report(by_row, budgets, label, command, seeds,
                  str(getattr(run_configs.default(), args.param)))
    write_text_atomic(root / "results.md", text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
