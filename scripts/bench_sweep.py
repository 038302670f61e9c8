"""Benchmark a vmapped ActiveFT sweep (`bilaf_jax.sweep.sweep_activeft`) against separate runs.

Usage:
  python scripts/bench_sweep.py [--n 20000] [--d 64] [--k 300] [--steps 1,100]
      [--temperatures 0.05,0.07,0.1,0.2] [--repeats 2] [--seed 0]

For each step count: the sweep over the temperatures in one compiled program, and one
`activeft` call per temperature, both timed in steady state (after a first, compiling call;
best of --repeats), and whether they select the same samples (they must). Prints a markdown
table. Synthetic features: a Gaussian mixture of 100 clusters.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from _common import cpu_name, mixture


def _steady(fn, repeats):
    import jax

    jax.block_until_ready(fn())  # compile
    best = float("inf")
    out = None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--k", type=int, default=300)
    p.add_argument("--steps", default="1,100")
    p.add_argument("--temperatures", default="0.05,0.07,0.1,0.2")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import jax

    from bilaf_jax.activeft import activeft
    from bilaf_jax.sweep import sweep_activeft

    steps = [int(s) for s in args.steps.split(",")]
    taus = [float(t) for t in args.temperatures.split(",")]
    x = mixture(args.n, args.d, 100, args.seed)
    key = jax.random.key(args.seed)
    print(f"# ActiveFT sweep: n={args.n} d={args.d} K={args.k}, {len(taus)} temperatures; "
          f"JAX {jax.__version__} on {jax.devices()[0].platform}; {cpu_name()}")
    print("\n| steps | vmapped sweep s | separate runs s (sum) | same selections |")
    print("|---|---|---|---|")
    ok = True
    for s in steps:
        t_sweep, out = _steady(lambda s=s: sweep_activeft(key, x, args.k, {"temperature": taus},
                                                          num_steps=s).indices, args.repeats)
        t_each, each = _steady(lambda s=s: [activeft(key, x, args.k, num_steps=s, temperature=t).indices
                                            for t in taus], args.repeats)
        same = all(np.array_equal(np.asarray(out[i]), np.asarray(each[i])) for i in range(len(taus)))
        ok &= same
        print(f"| {s} | {t_sweep:.2f} | {t_each:.2f} | {same} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
