"""Benchmark the BiLAF boundary stage (`bilaf_jax.boundary.bilaf`) on synthetic features.

Usage:
  python scripts/bench_boundary.py [--n 50000] [--d 384] [--cores 250]
      [--budgets 500,1000,2500,5000] [--modes paper,official] [--x64] [--distances auto]
      [--repeats 3] [--clusters C] [--authors PATH/TO/density_cluster.py] [--in-process]
      [--profile] [--compile-weight W] [--batch-elements N] [--parts N]
      [--compiler-options JSON] [--mesh N|all [--distributed]]

Each (mode, budget) runs in a fresh Python process with no persistent compilation cache, so
its first call pays every compilation (--in-process: one process for all, where later
budgets reuse the compiled class programs). Prints a markdown table: mode, B, first-call
seconds, steady-state seconds (best of --repeats), and the CPU seconds of the same calls (a
check on the wall-clock numbers when the machine is shared). With --authors, also times the
authors' script functions on the same features (float64, scipy), loaded from the given file.

Features: a single Gaussian blob (default; random cores then give very uneven pseudo-classes)
or, with --clusters C, a mixture of C Gaussians (`_common.mixture`).

--mesh shards the pool's rows over N devices (as `bilaf_jax.select` hands them to the stage);
--distributed joins a multi-process run (the same command on every process; each prints its
own timings).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
from _common import PhaseTimer, cpu_name, load_authors, mixture

from bilaf_jax.cli import add_mesh_options, setup_mesh


def make_pool(args):
    """(features float64 [n, d], sorted core indices [K]): deterministic in the arguments."""
    rng = np.random.default_rng(args.seed)
    if args.clusters:
        feats = mixture(args.n, args.d, args.clusters, args.seed).astype(np.float64)
    else:
        feats = rng.normal(size=(args.n, args.d))
    return feats, np.sort(rng.choice(args.n, args.cores, replace=False))


def run_authors(mod, features, cores, budget):
    class_core = features[cores]
    lists = mod.distance_cluster(features, class_core, len(cores))
    lists, _ = mod.density_cluster_denoise(lists, features, cores, len(cores), 10, 0.1, 0.1)
    return mod.selection(lists, class_core, features, cores, len(cores), budget, 1.1)


def measure(args, mode, budgets, mesh=None):
    """Time `bilaf` for each budget in this process: {budget: (first, first_cpu, steady,
    steady_cpu[, first-call phases, steady phases])} or {budget: error message}."""
    import jax

    from bilaf_jax import boundary
    from bilaf_jax.boundary import bilaf
    from bilaf_jax.sharding import place

    timer = PhaseTimer(boundary) if args.profile else None
    if args.compile_weight is not None:  # the bucket planner's trade-off (see boundary.py)
        boundary._COMPILE_SECONDS = args.compile_weight
    if args.batch_elements is not None:  # class batch size (see boundary._BATCH_ELEMENTS)
        boundary._BATCH_ELEMENTS = boundary._ACCELERATOR_BATCH_ELEMENTS = args.batch_elements
    if args.parts is not None:  # bucket parts run side by side (see boundary._CPU_PARTS)
        boundary._CPU_PARTS = args.parts
    if args.compiler_options is not None:  # see boundary._CPU_COMPILER_OPTIONS
        boundary._CPU_COMPILER_OPTIONS = json.loads(args.compiler_options)

    feats, cores = make_pool(args)
    out = {}
    with jax.enable_x64(args.x64):
        f = feats if args.x64 else feats.astype(np.float32)
        if mesh is None:
            f = jax.device_put(f)
        else:  # sharded, padded rows dropped again: what `select` gives the stage
            f, num_rows = place(f, mesh)
            f = f[:num_rows]
        key = jax.random.key(0)
        kw = dict(mode=mode, direct={"auto": None, "direct": True, "gram": False}[args.distances])
        for b in budgets:
            if timer:
                timer.reset()
            try:
                t0, c0 = time.perf_counter(), time.process_time()
                jax.block_until_ready(bilaf(key, f, cores, b, **kw))
            except ValueError as e:  # official mode where the authors' script crashes
                out[b] = f"ValueError: {e}"
                continue
            first = (time.perf_counter() - t0, time.process_time() - c0)
            first_phases = dict(timer.totals) if timer else None
            steady = []
            for _ in range(args.repeats):
                if timer:
                    timer.reset()
                t0, c0 = time.perf_counter(), time.process_time()
                jax.block_until_ready(bilaf(key, f, cores, b, **kw))
                steady.append((time.perf_counter() - t0, time.process_time() - c0,
                               dict(timer.totals) if timer else None))
            best = min(steady, key=lambda r: r[0])
            out[b] = (*first, *best[:2]) + ((first_phases, best[2]) if timer else ())
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--cores", type=int, default=250)
    p.add_argument("--budgets", default="500,1000,2500,5000")
    p.add_argument("--modes", default="paper,official")
    p.add_argument("--x64", action="store_true", help="float64 features under jax x64")
    p.add_argument("--distances", default="auto", choices=["auto", "direct", "gram"],
                   help="explicit differences or the Gram form (auto: direct only in official "
                   "mode with float64)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clusters", type=int, default=0,
                   help="Gaussian-mixture features with this many clusters (0: a single Gaussian)")
    p.add_argument("--authors", default=None, help="path to the authors' density_cluster.py")
    p.add_argument("--in-process", action="store_true",
                   help="all budgets in this process (later first calls reuse compilations)")
    p.add_argument("--profile", action="store_true",
                   help="also print seconds per phase (assignment with the budget split, plan, the "
                   "class programs of all buckets together) of the first and the best steady "
                   "call; the phases then block one after the other")
    p.add_argument("--compile-weight", type=float, default=None,
                   help="override the bucket planner's weight for one more class program "
                   "(boundary._COMPILE_SECONDS; higher: fewer programs, more padding)")
    p.add_argument("--batch-elements", type=int, default=None,
                   help="elements per class batch array (boundary._BATCH_ELEMENTS, on any device)")
    p.add_argument("--parts", type=int, default=None,
                   help="override boundary._CPU_PARTS (bucket parts run side by side in "
                   "threads; default: the CPU cores)")
    p.add_argument("--compiler-options", default=None,
                   help="override boundary._CPU_COMPILER_OPTIONS, XLA options of the class "
                   "programs as JSON ('{}': XLA's defaults)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # "mode:budget"
    add_mesh_options(p)
    args = p.parse_args(argv)
    # Each of these was a traceback (numpy's, json's, min() of no steady runs), or an unknown
    # mode ran as a table row of errors with exit code 0.
    try:
        budgets = [int(b) for b in args.budgets.split(",")]
    except ValueError:
        p.error(f"--budgets must be comma-separated integers, got {args.budgets!r}")
    modes = args.modes.split(",")
    if not set(modes) <= {"paper", "official"} or len(set(modes)) != len(modes):
        p.error(f"--modes must be distinct names from paper, official, got {args.modes!r}")
    checks = [(min(args.n, args.d) >= 1, "--n and --d must be >= 1"),
              (1 <= args.cores <= args.n, f"need 1 <= --cores <= --n, got {args.cores}"),
              (min(budgets) >= 1 and len(set(budgets)) == len(budgets),
               f"--budgets must be distinct positive integers, got {args.budgets!r}"),
              (args.repeats >= 1, f"--repeats must be >= 1, got {args.repeats}"),
              (args.clusters >= 0, f"--clusters must be >= 0, got {args.clusters}"),
              (0 <= args.seed < 2**32, f"--seed must lie in [0, 2**32), got {args.seed}")]
    for ok, message in checks:
        if not ok:
            p.error(message)
    if args.compiler_options is not None:
        try:
            options = json.loads(args.compiler_options)
        except ValueError as e:
            p.error(f"--compiler-options is not JSON: {e}")
        if not isinstance(options, dict):
            p.error(f"--compiler-options must be a JSON object, got {args.compiler_options!r}")
    if args.distributed and not args.in_process:
        p.error("--distributed needs --in-process (one process per host for all budgets)")
    try:
        mesh = setup_mesh(args) if args.child or args.in_process else None
    except ValueError as e:  # --mesh 0, or more devices than there are
        p.error(str(e))

    if args.child:
        mode, b = args.child.split(":")
        print(json.dumps({str(k): v for k, v in measure(args, mode, [int(b)], mesh).items()}))
        return

    import jax

    label_tail = (" x64" if args.x64 else "") + \
        ("" if args.distances == "auto" else f" {args.distances}")
    rows = []
    for mode in modes:
        if args.in_process:
            results = measure(args, mode, budgets, mesh)
        else:
            results = {}
            for b in budgets:
                cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
                       "--child", f"{mode}:{b}"]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode == 2:  # a usage error (such as --mesh): its one line
                    sys.stderr.write(proc.stderr.strip().splitlines()[-1] + "\n")
                    raise SystemExit(2)
                if proc.returncode:
                    raise SystemExit(f"benchmark child failed:\n{proc.stderr[-3000:]}")
                results[b] = json.loads(proc.stdout.strip().splitlines()[-1])[str(b)]
        for b in budgets:
            r = results[b]
            rows.append((mode + label_tail, b, r))
            print(mode + label_tail, b, r, flush=True)
    if args.authors:
        mod = load_authors(args.authors)
        feats, cores = make_pool(args)
        for b in budgets:
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                run_authors(mod, feats, cores, b)
            except Exception as e:  # zero allocations crash their script
                rows.append(("authors (numpy/scipy f64)", b, f"{type(e).__name__}: {e}"))
                continue
            dt = (time.perf_counter() - t0, time.process_time() - c0)
            rows.append(("authors (numpy/scipy f64)", b, (*dt, *dt)))
            print("authors", b, dt, flush=True)

    feats, cores = make_pool(args)
    centres = feats[cores]
    labels = np.argmin((centres ** 2).sum(1)[None] - 2.0 * feats @ centres.T, axis=1)
    sizes = "/".join(str(int(v)) for v in
                     np.percentile(np.bincount(labels, minlength=args.cores), [0, 50, 100]))
    sizes = f"; pseudo-class sizes min/median/max = {sizes}"
    pool = f"mixture of {args.clusters} Gaussians" if args.clusters else "one Gaussian"
    print(f"\nn={args.n} d={args.d} K={args.cores} ({pool}{sizes}); jax {jax.__version__} on "
          f"{cpu_name()}, {os.cpu_count()} CPUs; first calls "
          f"{'in one process' if args.in_process else 'each in a fresh process'}; load "
          f"average at end {os.getloadavg()[0]:.1f}")
    print("| mode | B | first call (s) | steady (s) | first call CPU (s) | steady CPU (s) |")
    print("|---|---|---|---|---|---|")
    for mode, b, r in rows:
        if isinstance(r, str):
            print(f"| {mode} | {b} | {r.split(':')[0]} (see log) | | | |")
            continue
        first, first_cpu, steady, steady_cpu = r[:4]
        print(f"| {mode} | {b} | {first:.2f} | {steady:.3f} | {first_cpu:.2f} | {steady_cpu:.3f} |")
    profiled = [(mode, b, r[4:]) for mode, b, r in rows if not isinstance(r, str) and len(r) > 4]
    if profiled:
        print("\nphases (s), first call / steady:")
        for mode, b, (first, steady) in profiled:
            phases = ", ".join(f"{k} {first[k]:.2f} / {steady.get(k, 0.0):.3f}" for k in first)
            print(f"- {mode} B={b}: {phases}")


if __name__ == "__main__":
    main()
