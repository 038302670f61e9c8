"""Benchmark ActiveFT (`bilaf_jax.activeft.activeft`) on synthetic features; optionally against
a PyTorch implementation of the authors' formulation on the same features and initial rows.

Usage:
  python scripts/bench_activeft.py [--n 50000] [--d 384] [--k 250] [--steps 300,100]
      [--batch-size ROWS] [--precision default|high|highest] [--repeats 1] [--torch]
      [--clusters 100] [--seed 0] [--mesh N|all] [--distributed]

ImageNet scale (GPU):
  python scripts/bench_activeft.py --n 1281167 --k 6405 --steps 100 --batch-size 100000

Features: a Gaussian mixture (`--clusters` centres, unit noise), float32, generated in chunks
with a fixed seed. Prints one markdown row per measurement: first call (compilation included)
and steady state (best of --repeats further calls) for JAX; wall seconds for PyTorch (eager, no
compilation). The authors' PyTorch code measured 157 s for n = 50,000, K = 250, 300 steps on
this project's 2-core CPU machine.
--mesh shards the pool's rows over N devices; --distributed joins a multi-process run (the same
command on every process; each prints its own timings). See `bilaf_jax.sharding`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from _common import cpu_name, mixture

from bilaf_jax.cli import add_mesh_options, setup_mesh


def machine_info():
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu_name()}, {os.cpu_count()} cores, load {load:.1f}"


def torch_activeft(features, init_indices, num_steps, *, temperature=0.07, balance=1.0,
                   learning_rate=1e-3, batch_size=None, seed=0):
    """The authors' ActiveFT in PyTorch (written from the method description).

    c = normalize(theta); e_i = exp(max_j f_i . c_j / tau);
    S_j = sum_k exp(stopgrad(c_k) . c_j / tau); loss = -mean(log e - log(e + lambda S_p(i)));
    Adam; then each centroid in order takes its most similar untaken sample.
    Returns (sorted indices, losses).
    """
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    feats = F.normalize(torch.from_numpy(features), dim=1)
    n = feats.shape[0]
    theta = torch.nn.Parameter(feats[torch.from_numpy(np.asarray(init_indices, np.int64))].clone())
    opt = torch.optim.Adam([theta], lr=learning_rate)
    losses = []
    for _ in range(num_steps):
        batch = feats if batch_size is None else feats[torch.randperm(n)[:batch_size]]
        c = F.normalize(theta, dim=1)
        sim = batch @ c.T / temperature  # [b, K]
        s_max, assign = sim.max(dim=1)
        e = torch.exp(s_max)
        gram = torch.exp(c.detach() @ c.T / temperature)  # [K(k), K(j)]
        s_j = gram.sum(dim=0)
        loss = -torch.mean(torch.log(e) - torch.log(e + balance * s_j[assign]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        c = F.normalize(theta, dim=1)
        taken = torch.zeros(n, dtype=torch.bool)
        picks = []
        for j in range(c.shape[0]):
            sim = feats @ c[j]
            sim[taken] = -float("inf")
            p = int(torch.argmax(sim))
            taken[p] = True
            picks.append(p)
    return np.sort(np.array(picks)), np.array(losses)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--k", type=int, default=250)
    p.add_argument("--steps", default="300,100", help="comma list of step counts")
    p.add_argument("--batch-size", type=int, default=None, help="rows per step (default: all)")
    p.add_argument("--precision", choices=("default", "high", "highest"), default="default")
    p.add_argument("--repeats", type=int, default=1, help="steady-state calls after the first")
    p.add_argument("--clusters", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch", action="store_true", help="also time the PyTorch implementation")
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument("--skip-jax", action="store_true", help="time only the PyTorch version")
    add_mesh_options(p)
    args = p.parse_args(argv)
    # Each of these was a traceback from numpy or the library (a bad --steps after a first run).
    try:
        steps = [int(s) for s in args.steps.split(",")]
    except ValueError:
        p.error(f"--steps must be comma-separated integers, got {args.steps!r}")
    checks = [(min(args.n, args.d, args.clusters) >= 1, "--n, --d and --clusters must be >= 1"),
              (1 <= args.k <= args.n, f"need 1 <= --k <= --n, got k={args.k} n={args.n}"),
              (min(steps) >= 0, f"--steps must be >= 0, got {args.steps}"),
              (args.batch_size is None or 1 <= args.batch_size <= args.n,
               f"need 1 <= --batch-size <= --n, got {args.batch_size}"),
              (args.repeats >= 0, f"--repeats must be >= 0, got {args.repeats}"),
              (0 <= args.seed < 2**32 - 1, f"--seed must lie in [0, 2**32 - 1), got {args.seed}"),
              (args.torch_threads is None or args.torch_threads >= 1,
               f"--torch-threads must be >= 1, got {args.torch_threads}")]
    for ok, message in checks:
        if not ok:
            p.error(message)
    try:
        mesh = setup_mesh(args)
    except ValueError as e:  # --mesh 0, or more devices than there are
        p.error(str(e))

    import jax
    from jax import lax

    from bilaf_jax.activeft import activeft
    from bilaf_jax.sharding import place, to_host

    precision = {"default": lax.Precision.DEFAULT, "high": lax.Precision.HIGH,
                 "highest": lax.Precision.HIGHEST}[args.precision]
    t0 = time.perf_counter()
    x = mixture(args.n, args.d, args.clusters, args.seed)
    gen_s = time.perf_counter() - t0
    init = np.sort(np.random.default_rng(args.seed + 1).choice(args.n, args.k, replace=False))
    dev = jax.devices()[0]
    xd, num_rows = place(x, mesh) if mesh is not None else (jax.device_put(x, dev), None)
    key = jax.random.key(args.seed)
    print(f"# ActiveFT benchmark: n={args.n} d={args.d} K={args.k} clusters={args.clusters} "
          f"batch={args.batch_size or 'full'} precision={args.precision}; features generated in "
          f"{gen_s:.1f} s")
    where = "" if mesh is None else f", rows sharded over {mesh.size} devices in {jax.process_count()} process(es)"
    print(f"# JAX {jax.__version__} on {dev.platform}:{dev.device_kind}{where}; host {machine_info()}")
    print()
    # CPU seconds (user + system, all threads of this process) are reported next to wall
    # seconds: on a shared machine they vary far less with other jobs' load.
    print("| impl | n | d | K | steps | batch | precision | first call s | steady s | "
          "steady CPU s | device | host (load at start) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    jax_picks = {}
    for num_steps in [] if args.skip_jax else steps:
        host = machine_info()
        run = lambda num_steps=num_steps: activeft(
            key, xd, args.k, num_steps=num_steps, batch_size=args.batch_size,
            init_indices=init, precision=precision, num_rows=num_rows)
        t0 = time.perf_counter()
        out = jax.block_until_ready(run())
        first = time.perf_counter() - t0
        steady, cpu = [], []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(run())
            steady.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        jax_picks[num_steps] = to_host(out.indices)
        st = f"{min(steady):.2f}" if steady else "-"
        ct = f"{min(cpu):.1f}" if cpu else "-"
        print(f"| jax | {args.n} | {args.d} | {args.k} | {num_steps} | {args.batch_size or 'full'} | "
              f"{args.precision} | {first:.2f} | {st} | {ct} | {dev.device_kind} | {host} |",
              flush=True)
    if args.torch:
        import torch

        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        for num_steps in steps:
            host = machine_info()
            t0, c0 = time.perf_counter(), time.process_time()
            picks, _ = torch_activeft(x, init, num_steps, batch_size=args.batch_size,
                                      seed=args.seed)
            secs = time.perf_counter() - t0
            cpu_s = time.process_time() - c0
            print(f"| torch {torch.__version__} ({torch.get_num_threads()} threads) | {args.n} | "
                  f"{args.d} | {args.k} | {num_steps} | {args.batch_size or 'full'} | fp32 | "
                  f"{secs:.2f} | {secs:.2f} | {cpu_s:.1f} | cpu | {host} |", flush=True)
            if num_steps in jax_picks:
                same = np.intersect1d(picks, jax_picks[num_steps]).size
                print(f"#   torch and JAX selections share {same} of {args.k} indices "
                      "(same initial rows; batches differ when --batch-size is set)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
