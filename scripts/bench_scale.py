"""Benchmark BiLAF at ImageNet scale: the boundary stage alone (CPU or GPU), or the full pipeline.

Usage:
  # (a) boundary stage, random cores, in a fresh subprocess (so peak RSS is the stage's own)
  python scripts/bench_scale.py [--n 1281167] [--d 384] [--k 6405] [--budget 64058]
      [--mode paper] [--clusters 1000] [--repeats 1] [--profile] [--timeout SECONDS]
      [--batch-elements N[,N2,...]] [--assign-precision float32|bfloat16|tensorfloat32]
      [--out RESULT.json]
  # several class-batch sizes in one process (each: a first run that compiles, then --repeats)
  # how the classes would be batched for batch elements 2^E (no timing)
  python scripts/bench_scale.py --plan-steps 21,23,25,27
  # (b) full pipeline (meant for a GPU): ActiveFT (--steps of --batch-size rows), then the
  #     boundary stage on its cores; per ActiveFT precision a first run, then --repeats more
  #     (steady state); each run records the seconds XLA spent compiling in it and whether its
  #     cores equal the first run's (a GPU's scatter-add is not deterministic)
  python scripts/bench_scale.py --full-pipeline [--steps 100] [--batch-size 100000]
      [--precision highest[,default,high]] [--out RESULT.json]
  # either, with the pool's rows sharded over N devices (several processes: --distributed,
  # the same command on each; each reports its own process's memory)
  python scripts/bench_scale.py ... --mesh N|all [--distributed]

Features: a Gaussian mixture of --clusters centres (so pseudo-classes have realistic sizes),
float32, generated in chunks with a fixed seed inside the measured process. Peak memory is the
process's ru_maxrss (features included; the RSS after generating them is reported separately),
plus the accelerator's peak_bytes_in_use where the device reports it. The output is checked:
B unique indices that include every core (official mode may repeat samples by design).

--profile attributes the boundary stage's time to assignment, host planning, denoising and
selection by wrapping the stage's internal jitted steps with a blocking timer (this removes
overlap between steps, so the total can rise slightly).
CPU seconds (user + system over all threads) are reported next to wall seconds; on a shared
machine they depend far less on other jobs. Targets for (a) on the 2-core CPU machine: <= 300 s and <= 20 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import CompileClock, PhaseTimer, cpu_name, fail, mixture

from bilaf_jax.cli import add_mesh_options, setup_mesh
from bilaf_jax.distances import PRECISIONS

GIB = 1 << 30


def rss_gib():
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)


def device_peak_gib(dev):
    try:
        stats = dev.memory_stats() or {}
    except Exception:  # CPU devices may not implement it
        return None
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / GIB


def check_selection(indices, cores, budget, mode):
    idx = np.asarray(indices)
    uniq = np.unique(idx).size
    has_cores = bool(np.isin(cores, idx).all())
    ok = idx.shape == (budget,) and has_cores and (uniq == budget or mode == "official")
    return dict(selected=int(idx.size), unique=int(uniq), all_cores_selected=has_cores, ok=bool(ok))


def measure(args) -> dict:
    """Runs inside the measured process."""
    import jax
    from jax import lax

    from bilaf_jax import boundary
    from bilaf_jax.sharding import place, to_host

    mesh = setup_mesh(args)
    x64 = args.mode == "official"
    if x64:
        jax.config.update("jax_enable_x64", True)
    dev = jax.devices()[0]
    t0 = time.perf_counter()
    x = mixture(args.n, args.d, args.clusters, args.seed)
    if x64:
        x = x.astype(np.float64)
    res = dict(n=args.n, d=args.d, k=args.k, budget=args.budget, mode=args.mode,
               clusters=args.clusters, seed=args.seed, device=f"{dev.platform}:{dev.device_kind}",
               jax=jax.__version__, host=f"{cpu_name()}, {os.cpu_count()} cores",
               load_at_start=round(os.getloadavg()[0], 2),
               generate_s=round(time.perf_counter() - t0, 2),
               mesh=None if mesh is None else mesh.size, processes=jax.process_count(),
               assign_precision=args.assign_precision)
    xd, num_rows = place(x, mesh) if mesh is not None else (jax.device_put(x, dev), None)
    # The boundary stage takes the real rows (as `bilaf_jax.select` hands them over).
    x_real = xd if num_rows is None else xd[:num_rows]
    del x
    res["rss_after_features_gib"] = round(rss_gib(), 3)
    key = jax.random.key(args.seed)
    core_key, boundary_key = jax.random.split(key)

    def use_batch_elements(value):
        if value is not None:  # class batch size, on any device
            boundary._BATCH_ELEMENTS = boundary._ACCELERATOR_BATCH_ELEMENTS = value
        return boundary._batch_elements(xd)

    sizes = args.batch_elements or [None]
    res["batch_elements"] = use_batch_elements(sizes[0])
    timer = PhaseTimer(boundary) if args.profile else None
    clock = CompileClock()
    runs = []
    res["runs"] = runs

    def save_partial():
        # After every run, so a timeout still leaves the finished runs.
        if args.child_out:
            Path(args.child_out).write_text(json.dumps({**res, "peak_rss_gib": round(rss_gib(), 3),
                                                        "partial": True}))

    if args.full_pipeline:
        from bilaf_jax.activeft import activeft

        res.update(steps=args.steps, batch_size=args.batch_size, precision=args.precision)
        for name in args.precision:
            precision = {"default": lax.Precision.DEFAULT, "high": lax.Precision.HIGH,
                         "highest": lax.Precision.HIGHEST}[name]
            first_cores = None
            for _ in range(1 + args.repeats):
                if timer:
                    timer.reset()
                clock.take()
                t0 = time.perf_counter()
                core = jax.block_until_ready(
                    activeft(core_key, xd, args.k, num_steps=args.steps, batch_size=args.batch_size,
                             precision=precision, num_rows=num_rows))
                t1 = time.perf_counter()
                cores = np.sort(to_host(core.indices))
                out = jax.block_until_ready(boundary.bilaf(boundary_key, x_real, cores, args.budget,
                                                           mode=args.mode,
                                                           precision=args.assign_precision))
                t2 = time.perf_counter()
                same = None if first_cores is None else bool(np.array_equal(cores, first_cores))
                first_cores = cores if first_cores is None else first_cores
                runs.append(dict(precision=name, activeft_s=round(t1 - t0, 3),
                                 boundary_s=round(t2 - t1, 3), total_s=round(t2 - t0, 3),
                                 compile_s=clock.take(), cores_as_first=same,
                                 phases=dict(timer.totals) if timer else None,
                                 check=check_selection(out.indices, cores, args.budget, args.mode)))
                save_partial()
    else:
        cores = np.sort(np.random.default_rng(args.seed + 1).choice(args.n, args.k, replace=False))
        for size in sizes:
            elements = use_batch_elements(size)
            for _ in range(1 + args.repeats):
                if timer:
                    timer.reset()
                clock.take()
                t0, c0 = time.perf_counter(), time.process_time()
                out = jax.block_until_ready(boundary.bilaf(boundary_key, x_real, cores, args.budget,
                                                           mode=args.mode,
                                                           precision=args.assign_precision))
                runs.append(dict(batch_elements=elements, boundary_s=round(time.perf_counter() - t0, 3),
                                 boundary_cpu_s=round(time.process_time() - c0, 3),
                                 compile_s=clock.take(), phases=dict(timer.totals) if timer else None,
                                 check=check_selection(out.indices, cores, args.budget, args.mode)))
                save_partial()
    sizes = np.bincount(np.asarray(out.pseudo_labels), minlength=args.k)
    res.update(runs=runs, class_size_min=int(sizes.min()), class_size_median=float(np.median(sizes)),
               class_size_max=int(sizes.max()), kept=int(np.asarray(out.kept).sum()),
               peak_rss_gib=round(rss_gib(), 3), device_peak_gib=device_peak_gib(dev))
    return res


def plan_steps(args) -> str:
    """How the boundary stage would batch its classes for several batch-element budgets: the
    loop steps run one after another are about the sum, over batches, of the largest class."""
    import jax
    import jax.numpy as jnp

    from bilaf_jax import boundary

    x = mixture(args.n, args.d, args.clusters, args.seed)
    cores = np.sort(np.random.default_rng(args.seed + 1).choice(args.n, args.k, replace=False))
    num_nearest = min(args.k, 2 if args.mode == "official" else boundary.NUM_OPPONENTS + 1)
    a = boundary._assign_jit(jax.device_put(x), jnp.asarray(cores, jnp.int32),
                             jnp.int32(args.budget), 0.1, 0.1, num_nearest=num_nearest,
                             normalize=False, centre=False, direct=False,
                             chunk_size=boundary.distances.DEFAULT_CHUNK,
                             mode=args.mode)
    labels = np.asarray(a.labels)
    sizes = np.bincount(labels, minlength=args.k)
    lines = [f"# n={args.n} d={args.d} K={args.k} clusters={args.clusters}; class sizes "
             f"min/median/max {sizes.min()}/{np.median(sizes):.0f}/{sizes.max()}", "",
             "| batch elements | buckets | batches | sequential class steps | classes per batch |",
             "|---|---|---|---|---|"]
    for e in (int(v) for v in args.plan_steps.split(",")):
        plan = boundary._plan(labels, cores, args.d, 1 << e)
        batches = sum(b.classes.shape[0] // b.batch for b in plan)
        steps = sum(int(b.counts.reshape(-1, b.batch).max(1).sum()) for b in plan)
        lines.append(f"| 2^{e} | {len(plan)} | {batches} | {steps} | "
                     f"{' / '.join(str(b.batch) for b in plan)} |")
    return "\n".join(lines)


def steady_runs(res) -> dict:
    """The runs after each group's first (group: ActiveFT precision, or class-batch size)."""
    groups: dict = {}
    for r in res["runs"]:
        if "precision" in r:
            name = f"ActiveFT precision {r['precision']}"
        else:
            name = f"batch elements {r.get('batch_elements', res.get('batch_elements'))}"
        groups.setdefault(name, []).append(r)
    return {name: rs[1:] for name, rs in groups.items() if len(rs) > 1}


def markdown(res) -> str:
    lines = [f"# BiLAF scale benchmark on {res['device']} (host {res['host']}, load at start "
             f"{res['load_at_start']}); JAX {res['jax']}",
             f"# n={res['n']} d={res['d']} K={res['k']} B={res['budget']} mode={res['mode']} "
             f"clusters={res['clusters']} batch elements={res.get('batch_elements')} "
             + (f"ActiveFT {res['steps']} steps of {res['batch_size'] or 'all'} rows, "
                if "steps" in res else "") +
             f"assignment precision={res.get('assign_precision', 'float32')}"
             + (f" mesh={res['mesh']} devices, {res['processes']} process(es)" if res.get("mesh") else "") + (
                 "; PARTIAL (killed by --timeout after the runs below)" if res.get("partial") else
                 f"; pseudo-class sizes min/median/max = {res['class_size_min']}/"
                 f"{res['class_size_median']:.0f}/{res['class_size_max']}"),
             ""]
    phases = []
    for r in res["runs"]:
        phases += [p for p in (r.get("phases") or {}) if p not in phases]
    lines += ["| run | activeft s | boundary s | boundary CPU s | total s | compile s | "
              + "".join(f"{p} s | " for p in phases) + "peak RSS GiB | device peak GiB | check |",
              "|---|---|---|---|---|---|" + "---|" * len(phases) + "---|---|---|"]
    dev_peak = res.get("device_peak_gib")
    if res.get("partial"):
        dev_peak = None
    seen: dict = {}
    for r in res["runs"]:
        # runs are grouped by ActiveFT precision or class-batch size; each group's first compiles
        group = r.get("precision", r.get("batch_elements"))
        i = seen[group] = seen.get(group, -1) + 1
        label = "first (compile)" if i == 0 else ("steady" if i == 1 else f"steady {i}")
        if "precision" in r:
            label = f"{r['precision']}: {label}"
            if r.get("cores_as_first") is False:
                label += ", other cores than the first"
        elif len(res["runs"]) > 1 and any(q.get("batch_elements") != group for q in res["runs"]):
            e = int(group).bit_length() - 1
            label = f"{f'2^{e}' if group == 1 << e else group} elements: {label}"
        ph = r.get("phases") or {}
        cells = [f"{ph[p]:.1f}" if p in ph else "-" for p in phases]
        c = r["check"]
        check = ("ok" if c["ok"] else "FAIL") + f" ({c['unique']} unique, cores "
        check += ("all in" if c["all_cores_selected"] else "MISSING") + ")"
        lines.append(f"| {label} | {r.get('activeft_s', '-')} | {r['boundary_s']} | "
                     f"{r.get('boundary_cpu_s', '-')} | "
                     f"{r.get('total_s', r['boundary_s'])} | {r.get('compile_s', '-')} | "
                     + "".join(c + " | " for c in cells) +
                     f"{res['peak_rss_gib']:.2f} | "
                     f"{'-' if dev_peak is None else f'{dev_peak:.2f}'} | {check} |")
    for group, rs in steady_runs(res).items():
        best = min(rs, key=lambda r: r.get("total_s", r["boundary_s"]))
        lines.append(f"\n{group}: steady state {best.get('total_s', best['boundary_s'])} s (the fastest "
                     f"of {len(rs)} later run(s); {best.get('compile_s', 0)} s of it compiling)")
    lines.append(f"\nRSS after generating the features: {res['rss_after_features_gib']:.2f} GiB "
                 f"(peak RSS is the process maximum over all runs).")
    return "\n".join(lines)


def _names(*choices):
    def parse(text):
        names = text.split(",")
        bad = [n for n in names if n not in choices]
        if bad or len(set(names)) != len(names):
            raise argparse.ArgumentTypeError(f"expected distinct names from {', '.join(choices)}, "
                                             f"got {text!r}")
        return names
    return parse


def _positive_ints(text):
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, comma-separated, got {text!r}")
    return values


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_281_167)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--k", type=int, default=6405)
    p.add_argument("--budget", type=int, default=64_058)
    p.add_argument("--mode", choices=("paper", "official"), default="paper")
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1,
                   help="steady-state runs after the first (per precision / batch size)")
    p.add_argument("--full-pipeline", action="store_true")
    p.add_argument("--steps", type=int, default=100, help="ActiveFT steps (--full-pipeline)")
    p.add_argument("--batch-size", type=int, default=100_000,
                   help="ActiveFT rows per step (--full-pipeline); 0 = full batch")
    p.add_argument("--precision", type=_names("default", "high", "highest"), default=["highest"],
                   help="ActiveFT's matmuls (--full-pipeline), comma-separated to run several: "
                   "highest is float32 (the library's default), default is TF32 on recent GPUs")
    p.add_argument("--assign-precision", choices=PRECISIONS,
                   default="float32", help="the boundary stage's assignment matmuls")
    p.add_argument("--profile", action="store_true", help="per-phase times of the boundary stage")
    p.add_argument("--plan-steps", default=None, metavar="E1,E2,...",
                   help="only print the class batching for batch elements 2^E1, 2^E2, ...")
    p.add_argument("--batch-elements", type=_positive_ints, default=None,
                   help="elements per class batch array (default: boundary's for the device); "
                   "comma-separated: each in turn, in one process (not with --full-pipeline)")
    p.add_argument("--timeout", type=float, default=None, help="kill the measurement after this")
    p.add_argument("--in-process", action="store_true",
                   help="measure in this process (peak RSS then includes the parent)")
    p.add_argument("--out", default=None, help="write the result JSON here (atomically; an "
                   "existing file must be an earlier result)")
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    add_mesh_options(p)
    return p


def _fail(message) -> int:
    return fail("bench_scale.py", message)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size == 0:
        args.batch_size = None
    # These were tracebacks (numpy's or the library's), some only after the measurement.
    for name in ("n", "d", "clusters"):
        if getattr(args, name) < 1:
            return _fail(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.seed < 2**32:
        return _fail(f"--seed must lie in [0, 2**32), got {args.seed}")
    if args.steps < 0:
        return _fail(f"--steps must be >= 0, got {args.steps}")
    if args.timeout is not None and not args.timeout > 0:
        return _fail(f"--timeout must be > 0 seconds, got {args.timeout}")
    if args.plan_steps:
        try:
            args.plan_steps = ",".join(str(int(e)) for e in args.plan_steps.split(","))
        except ValueError:
            return _fail(f"--plan-steps must be comma-separated integers, got {args.plan_steps!r}")
    if args.out and not args.child_out:  # now, not after a measurement of minutes
        from bilaf_jax.io import InputError, check_output_path, check_replaceable

        try:
            check_output_path(args.out)
            check_replaceable(args.out, ("runs",), "bench_scale.py")  # notes, features: keep
        except InputError as e:
            return _fail(e)
    if not 1 <= args.k <= args.budget <= args.n:
        sys.stderr.write(f"bench_scale.py: error: need 1 <= k <= budget <= n, got k={args.k} "
                         f"budget={args.budget} n={args.n}\n")
        return 2
    if args.full_pipeline and args.batch_size is not None and not 1 <= args.batch_size <= args.n:
        sys.stderr.write(f"bench_scale.py: error: need 0 <= --batch-size <= n (0: full batch), "
                         f"got {args.batch_size} with n={args.n}\n")
        return 2
    if args.full_pipeline and args.batch_elements and len(args.batch_elements) > 1:
        sys.stderr.write("bench_scale.py: error: --full-pipeline takes one --batch-elements\n")
        return 2
    if args.repeats < 0:
        sys.stderr.write(f"bench_scale.py: error: --repeats must be >= 0, got {args.repeats}\n")
        return 2
    if args.plan_steps:
        print(plan_steps(args))
        return 0
    if args.child_out or args.in_process:
        try:
            res = measure(args)
        except ValueError as e:  # --mesh beyond the devices, say: one line, not a traceback
            return _fail(e)
        if args.child_out:
            Path(args.child_out).write_text(json.dumps(res))
            return 0
    else:
        with tempfile.TemporaryDirectory() as tmp:
            child_out = Path(tmp) / "result.json"
            cmd = [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:]),
                   "--child-out", str(child_out)]
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                print(f"bench_scale.py: measurement killed after {args.timeout:.0f} s "
                      f"(wall {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
                proc = None
            if not child_out.exists():
                if proc is not None and proc.returncode == 2:  # it said why, in one line
                    return 2
                code = "timeout" if proc is None else f"exit {proc.returncode}"
                print(f"bench_scale.py: measurement failed ({code}) before any run finished",
                      file=sys.stderr)
                return 1
            res = json.loads(child_out.read_text())
            if not res.get("runs"):
                print("bench_scale.py: no run finished", file=sys.stderr)
                return 1
            res["process_wall_s"] = round(time.perf_counter() - t0, 2)
    print(markdown(res))
    if args.out:
        from bilaf_jax.io import write_json_atomic

        write_json_atomic(args.out, res, indent=1)
    return 0 if all(r["check"]["ok"] for r in res["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
