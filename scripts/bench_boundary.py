"""Benchmark the BiLAF boundary stage (`bilaf_jax.boundary.bilaf`) on synthetic features.

Usage:
  python scripts/bench_boundary.py [--n 50000] [--d 384] [--cores 250]
      [--budgets 500,1000,2500,5000] [--modes paper,official] [--x64] [--repeats 3] [--clusters C]
      [--authors PATH/TO/density_cluster.py]

Prints a markdown table: mode, B, first-call seconds (compilation included; the first budget
of each mode pays most of it, later budgets reuse the compiled bucket programs), steady-state
seconds (best of --repeats), and the process CPU seconds of the same calls (a check on the
wall-clock numbers when the machine is shared). With --authors, also times the authors' script functions on the
same features (float64, scipy), run in this process from the given file.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from _common import load_authors, mixture


def run_authors(mod, features, cores, budget):
    class_core = features[cores]
    lists = mod.distance_cluster(features, class_core, len(cores))
    lists, _ = mod.density_cluster_denoise(lists, features, cores, len(cores), 10, 0.1, 0.1)
    return mod.selection(lists, class_core, features, cores, len(cores), budget, 1.1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--cores", type=int, default=250)
    p.add_argument("--budgets", default="500,1000,2500,5000")
    p.add_argument("--modes", default="paper,official")
    p.add_argument("--x64", action="store_true", help="float64 features under jax x64")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clusters", type=int, default=0,
                   help="Gaussian-mixture features with this many clusters (0: a single Gaussian)")
    p.add_argument("--authors", default=None, help="path to the authors' density_cluster.py")
    args = p.parse_args(argv)

    import jax

    from bilaf_jax.boundary import bilaf

    rng = np.random.default_rng(args.seed)
    if args.clusters:
        feats = mixture(args.n, args.d, args.clusters, args.seed).astype(np.float64)
    else:  # one Gaussian blob: random cores give very uneven pseudo-classes
        feats = rng.normal(size=(args.n, args.d))
    cores = np.sort(rng.choice(args.n, args.cores, replace=False))
    budgets = [int(b) for b in args.budgets.split(",")]
    rows = []
    ctx = jax.enable_x64(True) if args.x64 else _null()
    with ctx:
        f = feats if args.x64 else feats.astype(np.float32)
        f = jax.device_put(f)
        key = jax.random.key(0)
        for mode in args.modes.split(","):
            for b in budgets:
                label = mode + (" x64" if args.x64 else "")
                try:
                    t0, c0 = time.perf_counter(), time.process_time()
                    jax.block_until_ready(bilaf(key, f, cores, b, mode=mode))
                except ValueError as e:  # official mode where the authors' script crashes
                    print(f"{label} B={b}: ValueError: {e}", flush=True)
                    rows.append((label, b, None, None))
                    continue
                first = (time.perf_counter() - t0, time.process_time() - c0)
                steady = []
                for _ in range(args.repeats):
                    t0, c0 = time.perf_counter(), time.process_time()
                    jax.block_until_ready(bilaf(key, f, cores, b, mode=mode))
                    steady.append((time.perf_counter() - t0, time.process_time() - c0))
                rows.append((label, b, first, min(steady)))
                print(label, b, first, min(steady), flush=True)
    if args.authors:
        mod = load_authors(args.authors)
        for b in budgets:
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                run_authors(mod, feats, cores, b)
            except Exception as e:  # zero allocations crash their script
                print(f"authors B={b}: {type(e).__name__}: {e}", flush=True)
                rows.append(("authors (numpy/scipy f64)", b, None, None))
                continue
            dt = (time.perf_counter() - t0, time.process_time() - c0)
            rows.append(("authors (numpy/scipy f64)", b, dt, dt))
            print("authors", b, dt, flush=True)
    print(f"n={args.n} d={args.d} K={args.cores} jax {jax.__version__} "
          f"devices {jax.devices()[0].platform}")
    print(f"load average at end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("| mode | B | first call (s) | steady (s) | first call CPU (s) | steady CPU (s) |")
    print("|---|---|---|---|---|---|")
    for mode, b, first, steady in rows:
        if first is None:
            print(f"| {mode} | {b} | crash / ValueError (zero allocation) | | | |")
            continue
        print(f"| {mode} | {b} | {first[0]:.2f} | {steady[0]:.3f} | {first[1]:.2f} | "
              f"{steady[1]:.3f} |")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
