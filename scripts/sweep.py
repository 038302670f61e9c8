"""Sweep BiLAF hyperparameters on a feature file and report label-free quality measures.

Usage:
  python scripts/sweep.py FEATURES.npz --budget B|P% [--cores K]
      --grid temperature=0.05,0.07,0.1 --grid remove_fraction=0.1,0.2 [...]
      [--steps 300] [--batch-size ROWS] [--num-neighbors 10] [--normalize]
      [--precision float32|bfloat16|tensorfloat32]
      [--settings-per-batch N | --sequential] [--seed 0] [--mesh N|all] [--distributed]
      --out RESULTS.json

Sweepable (traceable) parameters: temperature, learning_rate, balance (ActiveFT);
remove_fraction, ring_fraction, opponent_penalty (boundary stage, paper mode). The grid is
their cartesian product; unswept ones take the defaults. Each ActiveFT setting gives a core
set, and the boundary grid runs on each core set.

Writes RESULTS.json atomically: {"config": ..., "records": [one dict per setting]} and prints
a markdown table; an existing RESULTS.json is replaced only if it is such a file. When the
.npz carries `labels`, records also hold label_count (distinct true labels selected) and
label_balance (normalised entropy of their histogram).
--mesh shards the pool's rows over devices and --distributed spreads one sweep over several
processes (the same command on each; process 0 writes), as in `bilaf select`; the records are
those of a one-device sweep (selections equal; losses and distances summed in another order
may differ in the last bits).
Bad input: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from bilaf_jax.cli import add_mesh_options, seed_type, setup_mesh
from bilaf_jax.distances import PRECISIONS


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def build_parser():
    p = _Parser(prog="sweep.py", description=__doc__.splitlines()[0])
    p.add_argument("features", help=".npy [n, d] or .npz with 'features' (and optional 'labels')")
    p.add_argument("--budget", required=True,
                   help="B, samples to select, or a percentage of the pool such as 1%%")
    p.add_argument("--cores", type=int, default=None, help="K core samples (default max(1, B // 10))")
    p.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2,...",
                   help="values of one traceable hyperparameter (repeatable)")
    p.add_argument("--steps", type=int, default=300, help="ActiveFT optimiser steps")
    p.add_argument("--batch-size", type=int, default=None,
                   help="ActiveFT rows per step (default: full batch)")
    p.add_argument("--num-neighbors", type=int, default=10, help="IDC density k")
    p.add_argument("--normalize", action="store_true",
                   help="boundary stage on L2-normalised features")
    p.add_argument("--precision", default="float32", choices=PRECISIONS,
                   help="similarity matmuls of ActiveFT and the boundary assignment (as bilaf select)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--settings-per-batch", type=int, default=None,
                   help="vmap this many settings at a time (bounds memory; default: all)")
    g.add_argument("--sequential", action="store_true", help="one setting at a time")
    p.add_argument("--seed", type=seed_type, default=0, help="in [0, 2**32)")
    p.add_argument("--key", default="features", help="array name in an .npz")
    p.add_argument("--out", required=True, help="results JSON")
    add_mesh_options(p)
    return p


def markdown(records, has_labels):
    cols = ["temperature", "learning_rate", "balance", "remove_fraction", "ring_fraction",
            "opponent_penalty", "mean_distance", "core_mean_distance", "selected_balance",
            "pool_balance"]
    if has_labels:
        cols += ["label_count", "label_balance"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        lines.append("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c])
                                       for c in cols) + " |")
    return "\n".join(lines)


def _check_replaceable(path) -> None:
    """Refuse an existing --out that is not an earlier sweep's results: a selection, notes, or
    a `bilaf run` results.json (it too holds "config" and "records", but no "grid")."""
    import json

    from bilaf_jax import io

    io.check_replaceable(path, ("config", "records"), "sweep.py")
    old = json.loads(Path(path).read_text()) if Path(path).exists() else None
    if old is not None and not (isinstance(old["config"], dict) and "grid" in old["config"]
                                and isinstance(old["records"], list)):
        raise ValueError(f"--out {path} exists and is not a sweep.py result; choose another "
                         "--out or remove it")


def run(args) -> int:
    from bilaf_jax import io
    from bilaf_jax import sweep as S
    from bilaf_jax.cli.cmd_select import parse_budget

    grid = S.parse_grid(args.grid)
    if args.settings_per_batch is not None and args.settings_per_batch < 1:
        raise ValueError(f"--settings-per-batch must be >= 1, got {args.settings_per_batch}")
    if args.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {args.steps}")
    features, labels = io.load_features(args.features, key=args.key)
    n = features.shape[0]
    args.budget = parse_budget(args.budget, n)  # as `bilaf select` reads it
    if args.cores is not None and not 1 <= args.cores <= args.budget:
        raise ValueError(f"--cores must be in [1, {args.budget}], got {args.cores}")
    if args.batch_size is not None and not 1 <= args.batch_size <= n:
        raise ValueError(f"--batch-size must be in [1, {n}], got {args.batch_size}")
    # Fail on a bad destination (missing or unwritable folder, a folder, the input file
    # itself) before the (long) sweep.
    io.check_output_path(args.out, inputs=(args.features,))
    _check_replaceable(args.out)

    mesh = setup_mesh(args)
    import jax

    from bilaf_jax.sharding import is_main_process, place

    per_batch = 1 if args.sequential else args.settings_per_batch
    t0 = time.perf_counter()
    pool, num_rows = place(features, mesh)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        out = S.sweep(jax.random.key(args.seed), pool, args.budget, grid, num_cores=args.cores,
                      labels=labels, num_steps=args.steps, batch_size=args.batch_size,
                      num_neighbors=args.num_neighbors, normalize=args.normalize,
                      settings_per_batch=per_batch, num_rows=num_rows, precision=args.precision)
        records = S.to_records(out)
    seconds = time.perf_counter() - t0
    from bilaf_jax import __version__

    config = dict(features=str(Path(args.features).resolve()),
                  features_sha256=io.sha256_file(args.features), n=int(n), d=int(features.shape[1]),
                  budget=args.budget, num_cores=int(out.core_indices.shape[1]),
                  grid={k: list(v) for k, v in grid.items()}, num_steps=args.steps,
                  batch_size=args.batch_size, num_neighbors=args.num_neighbors,
                  normalize=args.normalize, precision=args.precision, mode="paper",
                  # the boundary stage may work on normalised rows; the measures do not
                  measures_on="features as given (Euclidean)",
                  settings_per_batch=per_batch,
                  seed=args.seed, has_labels=labels is not None, seconds=round(seconds, 3),
                  device=str(jax.devices()[0].device_kind), bilaf_jax=__version__, jax=jax.__version__,
                  mesh=None if mesh is None else mesh.size, processes=jax.process_count())
    if not is_main_process():
        return 0
    io.write_json_atomic(args.out, {"config": config, "records": records}, indent=1,
                         allow_nan=False)
    print(markdown(records, labels is not None))
    print(f"\n{len(records)} settings in {seconds:.1f} s; wrote {args.out}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        sys.stderr.write("sweep.py: interrupted\n")
        return 130
    except (ValueError, OSError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        sys.stderr.write(f"sweep.py: error: {msg}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
