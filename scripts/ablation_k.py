"""Does the number of core samples K change BiLAF's accuracy? The `default` run config with K varied.

Usage:
  python scripts/ablation_k.py [--ks 20,50,100] [--workdir runs/ablation_k]
      [--features-from runs/default] [--seeds 0,1,2,3,4]

Runs `bilaf run`'s pipeline (`bilaf_jax.experiment.run_experiment`) once per K with the
methods bilaf-paper and bilaf-official, and once with random and activeft (they do not depend
on K), each in a subfolder of --workdir that shares one set of extracted features. Every
other setting is the `default` config's (Fashion-MNIST pool of 10,000, EfficientNet-Lite0
taps at 48 px, selection on the 256-d projection, linear probe and k-NN, B = 100 / 200 / 500).
--features-from copies the features of a finished `bilaf run --workdir DIR` (default config)
instead of extracting them again. Resumable like `bilaf run`: finished pieces are kept.
Writes WORKDIR/results.md (mean ± std over the seeds, test accuracy in %) and prints it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bilaf_jax import experiment, run_configs  # noqa: E402
from bilaf_jax.io import write_text_atomic  # noqa: E402

FEATURE_FILES = ("pool.npz", "test.npz", "selection.npz")
# The config fields that decide the extracted (and projected) features.
FEATURE_FIELDS = ("dataset", "pool_size", "test_size", "backbone", "image_size", "weights",
                  "selection_dim")


def share_features(base: Path, config, target: Path) -> None:
    """Copy base/features into target/features if base was run with the same feature settings."""
    saved = json.loads((base / "results.json").read_text())["config"]
    differ = [f for f in FEATURE_FIELDS if saved.get(f) != getattr(config, f)]
    if differ:
        raise SystemExit(f"ablation_k.py: {base} was run with other feature settings "
                         f"({', '.join(differ)}); leave out --features-from")
    (target / "features").mkdir(parents=True, exist_ok=True)
    for name in FEATURE_FILES:
        src, dst = base / "features" / name, target / "features" / name
        if src.exists() and not dst.exists():
            shutil.copyfile(src, dst)


def table(records_by_label: dict, budgets, ev: str) -> list[str]:
    lines = ["| method | K | " + " | ".join(f"B = {b}" for b in budgets) + " |",
             "|---|---|" + "---|" * len(budgets)]
    for (method, k), records in records_by_label.items():
        stats = experiment.summarize(records)
        cells = []
        for b in budgets:
            mean, std, count = stats.get((method, b, ev), (float("nan"), float("nan"), 0))
            cells.append("failed" if count == 0 else f"{100 * mean:.1f} ± {100 * std:.1f}")
        lines.append(f"| {method} | {k} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ks", default="20,50,100", help="comma list of K (each <= the smallest B)")
    p.add_argument("--workdir", default="runs/ablation_k")
    p.add_argument("--features-from", default=None, help="a finished default-config workdir")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    seeds = tuple(int(s) for s in args.seeds.split(","))
    base = run_configs.default()._replace(seeds=seeds)
    root = Path(args.workdir)
    runs = [("reference", base._replace(name="ablation_k_reference",
                                        methods=("random", "activeft")))]
    runs += [(f"k{k}", base._replace(name=f"ablation_k{k}", num_cores=k,
                                     methods=("bilaf-paper", "bilaf-official"))) for k in ks]
    by_label, budgets = {}, None
    for folder, config in runs:
        wd = root / folder
        if args.features_from:
            share_features(Path(args.features_from), config, wd)
        out = experiment.run_experiment(config, wd, progress=not args.no_progress,
                                        command=" ".join(["python scripts/ablation_k.py",
                                                          *(argv or sys.argv[1:])]))
        budgets = out.results["budgets"]
        for method in config.methods:
            k = "-" if folder == "reference" else str(config.num_cores)
            by_label[(method, k)] = [r for r in out.results["records"] if r["method"] == method]
    lines = ["# K ablation on the `default` config", "",
             f"Command: `python scripts/ablation_k.py {' '.join(argv or sys.argv[1:])}`; "
             f"seeds {list(seeds)}; test accuracy in %, mean ± std over the seeds. random and "
             "activeft do not use K (activeft selects B samples directly).", ""]
    for ev, title in (("linear", "Linear probe"), ("knn", "Weighted k-NN (k = 20)")):
        lines += [f"{title}:", "", *table(by_label, budgets, ev), ""]
    failed = {}  # (method, K, B) -> (seeds failed, seeds run, first error)
    for (m, k), recs in by_label.items():
        for r in recs:
            if r["eval"] != "linear":  # one record per selection
                continue
            seen = failed.setdefault((m, k, r["budget"]), [0, 0, None])
            seen[1] += 1
            if r.get("error"):
                seen[0] += 1
                seen[2] = seen[2] or r["error"]
    failed = {key: v for key, v in failed.items() if v[0]}
    if failed:
        lines += ["Failed selections:", ""]
        lines += [f"- {m}, K = {k}, B = {b}: {bad} of {total} seeds; first: {error}"
                  for (m, k, b), (bad, total, error) in failed.items()]
        lines.append("")
    # Paired over the seeds (two-sided t-test at 5%), as `bilaf run`'s verdicts.
    reference = by_label[("random", "-")] + by_label[("activeft", "-")]
    lines += ["Paired comparisons (two-sided t-test over the seeds, 5%):", ""]
    for (method, k), records in by_label.items():
        if k == "-":
            continue
        for ev in ("linear", "knn"):
            for b in budgets:
                said = [experiment.verdict(reference + records, method, other, b, ev)
                        for other in ("random", "activeft")]
                lines.append(f"- K = {k}, B = {b}, {ev}: " + "; ".join(said))
    lines.append("")
    text = "\n".join(lines)
    write_text_atomic(root / "results.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
