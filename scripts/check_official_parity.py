"""Check `bilaf(..., mode="official")` against the authors' own stage-2 script.

Usage:
  python scripts/check_official_parity.py PATH/TO/density_cluster.py
      [--features FILE.npy] [--cores N] [--budgets 100,300] [--seed 0]
      [--data digits|random] [--k 10 --ring 0.1 --remove 0.1 --penalty 1.1]
      [--stable-argsort]

The authors' file (from github.com/Thinklab-SJTU/BiLAF, data_selection/Boundary_Selection/)
is imported from the given path and its functions are called in this process on the same
float64 features and core indices; nothing of it is copied here. Features: --features FILE
(an [n, d] .npy array), else scikit-learn's digits through a fixed random projection to 32-d
(tie-free real data), or --data random (Gaussian [2000, 64]). Cores are --cores random pool
indices (sorted, as the authors' ActiveFT file stores them). Prints, per budget, whether the
two lists are identical (same indices, same order). Exit status 1 on any mismatch.

On features with exact distance ties (integer values, duplicates) the script's density step
orders tied distances with NumPy's default, unstable `argsort`, whose order depends on the
NumPy build and the CPU; the official mode orders them stably. --stable-argsort gives the
script a stable `argsort` (its module's `np` only), which makes such pools comparable.
"""

from __future__ import annotations

import argparse
import sys
import types
import warnings

import numpy as np
from _common import load_authors


def authors_select(mod, features, cores, budget, k, ring, remove, penalty):
    """Their main() without file I/O: assignment, denoising, selection."""
    class_core = features[cores]
    lists = mod.distance_cluster(features, class_core, len(cores))
    lists, _ = mod.density_cluster_denoise(lists, features, cores, len(cores), k, remove, ring)
    return [int(i) for i in mod.selection(lists, class_core, features, cores, len(cores),
                                          budget, penalty)]


def _with_stable_argsort():
    """NumPy's namespace with `argsort` stable (for the authors' module only)."""
    stable = types.ModuleType("numpy_stable_argsort")
    stable.__dict__.update({k: getattr(np, k) for k in dir(np) if not k.startswith("__")})

    def argsort(a, axis=-1, kind=None, order=None):
        return np.argsort(a, axis=axis, kind="stable", order=order)

    stable.argsort = argsort
    return stable


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("authors_file")
    p.add_argument("--features", default=None)
    p.add_argument("--data", default="digits", choices=["digits", "random"])
    p.add_argument("--cores", type=int, default=20)
    p.add_argument("--budgets", default="100,300")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--ring", type=float, default=0.1)
    p.add_argument("--remove", type=float, default=0.1)
    p.add_argument("--penalty", type=float, default=1.1)
    p.add_argument("--stable-argsort", action="store_true",
                   help="give the script a stable np.argsort (see above)")
    args = p.parse_args(argv)

    import jax

    from bilaf_jax.boundary import bilaf

    rng = np.random.default_rng(args.seed)
    if args.features:
        feats = np.load(args.features).astype(np.float64)
    elif args.data == "digits":
        from sklearn.datasets import load_digits

        feats = load_digits().data.astype(np.float64) @ np.random.default_rng(1).normal(
            size=(64, 32))
    else:
        feats = rng.normal(size=(2000, 64))
    cores = np.sort(rng.choice(feats.shape[0], args.cores, replace=False))
    mod = load_authors(args.authors_file)
    if args.stable_argsort:
        mod.np = _with_stable_argsort()
    ok = True
    for budget in (int(b) for b in args.budgets.split(",")):
        try:
            theirs = authors_select(mod, feats, cores, budget, args.k, args.ring, args.remove,
                                    args.penalty)
        except Exception as e:  # their script crashes on zero allocations
            theirs = f"crash: {type(e).__name__}: {e}"
        with jax.enable_x64(True), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ours = [int(i) for i in np.asarray(bilaf(
                    jax.random.key(0), feats, cores, budget, mode="official",
                    num_neighbors=args.k, ring_fraction=args.ring, remove_fraction=args.remove,
                    opponent_penalty=args.penalty).indices)]
            except ValueError as e:
                ours = f"ValueError: {e}"
        if isinstance(theirs, str) or isinstance(ours, str):
            same = isinstance(theirs, str) and isinstance(ours, str)
            detail = f"authors: {theirs if isinstance(theirs, str) else 'ok'}; " \
                     f"ours: {ours if isinstance(ours, str) else 'ok'}"
        else:
            same = theirs == ours
            first = next((i for i, (a, b) in enumerate(zip(theirs, ours, strict=False)) if a != b), None)
            detail = (f"{len(ours)} indices, {len(set(ours))} unique"
                      + ("" if same else f"; first difference at position {first}"))
        ok &= same
        print(f"n={feats.shape[0]} d={feats.shape[1]} K={len(cores)} B={budget} "
              f"k={args.k} ring={args.ring} remove={args.remove} penalty={args.penalty}: "
              f"{'IDENTICAL' if same else 'DIFFERENT'} ({detail})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
