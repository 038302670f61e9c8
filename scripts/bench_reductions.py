"""Time the ordering primitives the selection code avoids or uses on this backend.

Usage:
  python scripts/bench_reductions.py [--repeats 10]

Prints a markdown table of milliseconds per call for: XLA's argmin against
`distances.first_argmin` (two plain reductions), `lax.top_k` against `distances.smallest_k`
(k-fold extraction) in float32 and float64 at the widths the boundary stage uses, and a full
sort (ns per element). These back the statements in `bilaf_jax/distances.py`,
`bilaf_jax/boundary.py` and BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from _common import cpu_name


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from jax import lax

    from bilaf_jax import distances

    def ms(fn, x):
        fn = jax.jit(fn)
        jax.block_until_ready(fn(x))
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            jax.block_until_ready(fn(x))
        return 1e3 * (time.perf_counter() - t0) / args.repeats

    rng = np.random.default_rng(0)
    rows = []
    with jax.enable_x64(True):
        for dtype in (jnp.float32, jnp.float64):
            name = jnp.dtype(dtype).name
            x = jnp.asarray(rng.normal(size=(4096, 250)), dtype)
            rows.append((f"argmin [4096, 250] axis 1 {name}", ms(lambda v: jnp.argmin(v, 1), x),
                         "first_argmin", ms(lambda v: distances.first_argmin(v, 1), x)))
            xt = x.T  # ActiveFT's [K, c] layout
            rows.append((f"argmax [250, 4096] axis 0 {name}", ms(lambda v: jnp.argmax(v, 0), xt),
                         "first_argmax", ms(lambda v: distances.first_argmax(v, 0), xt)))
            for width, k in ((42, 10), (250, 17), (6405, 17)):
                x = jnp.asarray(rng.normal(size=(4096, width)), dtype)
                rows.append((f"top_k [4096, {width}] k={k} {name}",
                             ms(lambda v, k=k: lax.top_k(-v, k), x),
                             "smallest_k", ms(lambda v, k=k: distances.smallest_k(v, k), x)))
        x = jnp.asarray(rng.normal(size=(200, 256)), jnp.float32)
        sort_ms = ms(lambda v: jnp.sort(v, axis=1), x)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({cpu_name()}, "
          f"{os.cpu_count()} CPUs); mean of {args.repeats} calls after one warm-up")
    print("| XLA primitive | ms | replacement | ms | ratio |")
    print("|---|---|---|---|---|")
    for a, ta, b, tb in rows:
        print(f"| {a} | {ta:.2f} | {b} | {tb:.2f} | {ta / tb:.1f}x |")
    print(f"\nsort [200, 256] float32: {sort_ms:.2f} ms = {1e6 * sort_ms / (200 * 256):.0f} ns "
          "per element")


if __name__ == "__main__":
    main()
