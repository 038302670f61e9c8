"""`bilaf run`: the end-to-end benchmark (features, selections, evaluations, report).

    bilaf run --workdir runs/default                 # Fashion-MNIST, 10,000-image pool (CPU)
    bilaf run --quick --workdir runs/quick           # 2,000-image pool, 2 seeds (minutes)
    bilaf run --config full --workdir runs/full      # 60,000-image pool, 224 px, finetuning (GPU)
    bilaf run --config full --dry-run --workdir runs/full   # check the plan, compute nothing

Configs: default, quick, mnist_5k, full, paper_cifar10, paper_cifar100, paper_imagenet (see
`bilaf_jax/run_configs.py`; configs/run_*.py mirror several with their commands), or a path
to a .py file whose
`get_config()` returns a RunConfig or a dict of overrides of the default.
Writes WORKDIR/results.json, results.md, accuracy_vs_budget.png and, where a BiLAF method
ran, pca_map.png; every finished piece (features, selections, evaluations) is cached there, so
the same command after an interruption resumes and gives the same results.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

from bilaf_jax.cli import UsageError, workdir_type


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="run the end-to-end benchmark (methods x budgets x seeds) and report",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="run config name or .py path (default: default)")
    p.add_argument("--quick", action="store_true", help="the quick config (same as --config quick)")
    p.add_argument("--workdir", required=True, type=workdir_type, help="run folder (created; resumed if it exists)")
    p.add_argument("--data-dir", help="dataset folder (Fashion-MNIST: the IDX files)")
    p.add_argument("--weights", help="backbone weight file (e.g. dino_deitsmall16_pretrain.pth) "
                   "or 'random'")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config and print the plan; compute nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_compile_cache_option(p, "reused by later runs")
    p.set_defaults(func=run)


def add_compile_cache_option(parser, reuse: str) -> None:
    """--compile-cache FOLDER|off for commands that call `enable_compile_cache`."""
    parser.add_argument("--compile-cache", default=None,
                        help=f"folder for JAX's persistent compilation cache, {reuse} (default: "
                        "$BILAF_COMPILE_CACHE or ~/.cache/bilaf_jax/jax_compile; 'off' disables "
                        "it)")


def enable_compile_cache(folder) -> str | None:
    """Point JAX's persistent compilation cache at `folder` (None: the default; 'off': none).

    Many selection programs have data-dependent static shapes (budgets, BiLAF's per-class
    buckets); a later run on the same pool then skips recompiling them. Programs that compile
    in under $BILAF_COMPILE_CACHE_MIN_SECONDS (default 0.2 s) are not worth a file.
    """
    import os

    asked = folder or os.environ.get("BILAF_COMPILE_CACHE")
    folder = asked or "~/.cache/bilaf_jax/jax_compile"
    if folder == "off":
        return None
    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        usable = os.access(path, os.W_OK | os.X_OK)
        why = "not writable"
    except OSError as e:
        usable, why = False, e.strerror or str(e)
    if not usable:  # a cache is an optimisation only: run without it, but say so if asked for
        if asked:
            sys.stderr.write(f"note: compilation cache {path} unusable ({why}); running without it\n")
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", cache_min_seconds())
    return str(path)


def cache_min_seconds() -> float:
    """$BILAF_COMPILE_CACHE_MIN_SECONDS, or 0.2 where unset or not a finite number (a cache is
    an optimisation only: a bad value must not stop a run, nor turn the cache off unsaid)."""
    import os

    try:
        secs = float(os.environ.get("BILAF_COMPILE_CACHE_MIN_SECONDS", "0.2"))
    except ValueError:
        return 0.2
    return max(secs, 0.0) if math.isfinite(secs) else 0.2


def resolve_config(args):
    from bilaf_jax import run_configs

    if args.quick and args.config not in (None, "quick"):
        raise UsageError(f"--quick and --config {args.config} contradict each other")
    config = run_configs.get("quick" if args.quick else (args.config or "default"))
    changes = {}
    if args.data_dir is not None:
        changes["data_dir"] = args.data_dir
    if args.weights is not None:
        changes["weights"] = args.weights
    return config._replace(**changes)


def dry_run(config, workdir: Path) -> int:
    from bilaf_jax import experiment

    config = experiment.validate(config)  # also checks the finetuning settings of "full"
    experiment.preflight(config, workdir)
    available = experiment.TRAIN_SIZES.get(config.dataset)
    if available is not None:
        experiment.check_pool_size(config, available)
    pool = config.pool_size or available
    if pool is None:
        sys.stdout.write(f"config {config.name}: pool size known only after loading the data\n")
        return 0
    budgets, jobs = experiment.plan(config, pool)
    sys.stdout.write(
        f"config {config.name}: {config.dataset}, pool {pool}, backbone {config.backbone} at "
        f"{config.image_size} px, budgets {budgets}, K = {config.num_cores}, seeds "
        f"{list(config.seeds)}, methods {list(config.methods)}, evals {list(config.evals)}: "
        f"{len(jobs)} selections, {len(jobs) * len(config.evals)} evaluations -> {workdir}\n")
    return 0


def run(args) -> int:
    config = resolve_config(args)
    workdir = Path(args.workdir).expanduser()
    if args.dry_run:
        return dry_run(config, workdir)
    from bilaf_jax import experiment

    enable_compile_cache(args.compile_cache)
    argv = getattr(args, "argv", None)  # set by bilaf_jax.cli.main
    command = "bilaf " + " ".join(shlex.quote(str(a)) for a in argv) if argv else None
    out = experiment.run_experiment(config, workdir, progress=not args.no_progress,
                                    command=command)
    sys.stdout.write(out.markdown)
    sys.stdout.write(f"\nwrote {workdir / out.written[0]}, {', '.join(out.written[1:])}\n")
    return 0
