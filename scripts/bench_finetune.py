"""Full-finetune throughput (images/s) of the compiled train step, and probe timings.

    python scripts/bench_finetune.py --image-size 48 --batch-size 32            # CPU
    python scripts/bench_finetune.py --image-size 224 --batch-size 128 --steps 50   # GPU
    python scripts/bench_finetune.py --probes                # linear probe / k-NN call times
    python scripts/bench_finetune.py ... --num-devices 8     # data-parallel over 8 devices

The train step is the one `bilaf finetune --mode full` runs (RandomResizedCrop + flip in JAX,
forward, backward, SGD update), fed random preprocessed images; compilation is timed apart.
Weights are random by default (speed does not depend on them). Prints one JSON line per result,
each as soon as it is measured: the train step's before the evaluation step compiles.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout


def bench_train(args) -> dict:
    import jax
    import jax.numpy as jnp

    from bilaf_jax import backbones
    from train.train import build_finetune, make_config

    bb = backbones.load(args.backbone, args.weights)
    cfg = make_config(selection="-", backbone=args.backbone, image_size=args.image_size,
                      batch_size=args.batch_size, ema_decay=args.ema_decay,
                      drop_path=0.1 if args.backbone == "vit_s16" else 0.0,
                      num_devices=args.num_devices, eval_batch_size=args.batch_size)
    total = args.warmup + args.steps
    ft = build_finetune(cfg, bb, args.num_classes, total, 1)
    rng = np.random.default_rng(0)
    images = ft.shard(jnp.asarray(rng.normal(size=(args.batch_size, args.image_size, args.image_size, 3)),
                                  jnp.float32))
    labels = ft.shard(jnp.asarray(rng.integers(0, args.num_classes, args.batch_size), jnp.int32))
    key = jax.random.key(0)
    state = ft.state
    t = time.perf_counter()
    state, loss = ft.train_step(state, images, labels, key)
    jax.block_until_ready(loss)
    compile_s = time.perf_counter() - t
    for i in range(1, args.warmup):
        state, loss = ft.train_step(state, images, labels, jax.random.fold_in(key, i))
    jax.block_until_ready(state)
    t = time.perf_counter()
    for i in range(args.steps):
        state, loss = ft.train_step(state, images, labels, jax.random.fold_in(key, 1000 + i))
    jax.block_until_ready(state)
    dt = time.perf_counter() - t
    device = jax.devices()[0]
    train = {"bench": "full_finetune_step", "device": f"{device.platform}:{device.device_kind}",
             "num_devices": args.num_devices, "backbone": args.backbone,
             "image_size": args.image_size, "batch_size": args.batch_size, "steps": args.steps,
             "compile_s": round(compile_s, 2), "step_s": round(dt / args.steps, 4),
             "train_images_per_s": round(args.steps * args.batch_size / dt, 2),
             "final_loss": float(loss)}
    print(json.dumps(train), flush=True)  # before the evaluation compiles: a cut run keeps it
    mask = ft.shard(jnp.ones(args.batch_size, bool))
    n_eval = ft.eval_step(state["params"], state["rest"], images, labels, mask)
    jax.block_until_ready(n_eval)
    t = time.perf_counter()
    for _ in range(args.steps):
        n_eval = ft.eval_step(state["params"], state["rest"], images, labels, mask)
    jax.block_until_ready(n_eval)
    dt_eval = time.perf_counter() - t
    return {**train, "bench": "full_finetune_eval",
            "eval_images_per_s": round(args.steps * args.batch_size / dt_eval, 2)}


def bench_probes(args) -> list[dict]:
    import jax

    from train import knn_eval, linear_probe

    rng = np.random.default_rng(0)
    n, d, m, c = args.pool, args.dim, args.test, 10
    centres = rng.normal(size=(c, d)).astype(np.float32)
    pool_y = rng.integers(0, c, n)
    pool_x = centres[pool_y] * 0.2 + rng.normal(size=(n, d)).astype(np.float32)
    test_y = rng.integers(0, c, m)
    test_x = jax.device_put(centres[test_y] * 0.2 + rng.normal(size=(m, d)).astype(np.float32))
    out = []
    for fn in (linear_probe, knn_eval):
        for budget in args.budgets:
            times = []
            for rep in range(args.repeats + 1):
                idx = np.random.default_rng(rep).choice(n, budget, replace=False)
                t = time.perf_counter()
                acc = fn(pool_x[idx], pool_y[idx], test_x, test_y, num_classes=c)
                times.append(time.perf_counter() - t)
            device = jax.devices()[0]
            out.append({"bench": fn.__name__, "device": f"{device.platform}:{device.device_kind}",
                        "budget": budget,
                        "dim": d, "test_rows": m, "first_call_s": round(times[0], 3),
                        "median_s": round(float(np.median(times[1:])), 4),
                        "accuracy": round(acc, 4)})
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default="random", help="'random' or a weight file")
    p.add_argument("--image-size", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (first one compiles)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--ema-decay", type=float, default=0.0)
    p.add_argument("--num-devices", type=int, default=1, help="data-parallel devices")
    p.add_argument("--probes", action="store_true", help="time linear_probe / knn_eval instead")
    p.add_argument("--pool", type=int, default=10000)
    p.add_argument("--dim", type=int, default=1752)
    p.add_argument("--test", type=int, default=10000)
    p.add_argument("--budgets", type=int, nargs="+", default=[100, 200, 500, 1000])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    results = bench_probes(args) if args.probes else [bench_train(args)]
    for r in results:
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
