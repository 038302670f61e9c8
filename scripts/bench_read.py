"""Reading images from disk: JPEG decoding and host resizing, in one thread or several.

    python scripts/bench_read.py [--images 2000] [--width 500] [--height 375] [--image-size 224]
        [--workers 1,2] [--extract] [--json]

Writes --images JPEG files of ImageNet's typical size (quality 90, seeded smooth content with
noise) into a temporary image folder, then times `bilaf_jax.data.load_rows` over all of them
(decode + resize to --image-size on the host, chunks of 64) for each worker count. With
--extract it also times `bilaf extract`'s path (`extract_to_file`, EfficientNet-Lite0 with
random weights, batches of 64, `read_workers` each worker count), where reading overlaps the
forward pass. Prints a markdown table, or with --json one JSON object per line: the set-up
first, then each measurement as soon as it is made (a run cut short keeps the finished ones).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_folder(root: Path, count: int, width: int, height: int, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(count):
        folder = root / "all" / f"c{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        a, b, c = rng.uniform(0.005, 0.05, 3)
        base = np.stack([np.sin(a * xx + i), np.cos(b * yy), np.sin(c * (xx + yy))], -1)
        pixels = 127.5 * (base + 1) + rng.normal(0, 12, base.shape)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            folder / f"{i}.jpg", quality=90)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", default="1,2", help="comma list of reader thread counts")
    p.add_argument("--extract", action="store_true", help="also time extract_to_file")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]

    from bilaf_jax import data

    load_at_start = round(os.getloadavg()[0], 2)
    rows = []

    def measured(row):
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"  # the features go beside it, not into the data
        t0 = time.perf_counter()
        write_folder(root, args.images, args.width, args.height)
        write_s = time.perf_counter() - t0
        meta = {"image_files": f"{args.images} JPEG {args.width}x{args.height}",
                "resize_to": args.image_size, "write_s": round(write_s, 1),
                "cpu_cores": os.cpu_count(), "load_at_start": load_at_start}
        if args.extract:
            import jax

            device = jax.devices()[0]
            meta["device"] = f"{device.platform}:{device.device_kind}"
        if args.json:
            print(json.dumps({"meta": meta}), flush=True)
        src = data.data_source("image_folder", "all", data_dir=root)
        every = np.arange(len(src))
        data.load_rows(src, every[:64], image_size=args.image_size, chunk=64, workers=1)  # warm
        for w in workers:
            t0 = time.perf_counter()
            got = data.load_rows(src, every, image_size=args.image_size, chunk=64, workers=w)
            secs = time.perf_counter() - t0
            assert got.images.shape == (len(src), args.image_size, args.image_size, 3)
            measured({"what": "load_rows", "workers": w, "images": len(src),
                         "img_per_s": round(len(src) / secs, 1), "seconds": round(secs, 2)})
        if args.extract:
            from bilaf_jax import backbones
            from bilaf_jax.extract import extract_to_file

            bb = backbones.load("efficientnet_lite0", "random")
            first = None
            for w in workers:
                out = Path(tmp) / f"features_{w}.npz"
                extract_to_file(out, dataset="image_folder", split="all", data_dir=root,
                                backbone=bb, image_size=args.image_size, batch_size=64,
                                limit=256, progress=False)  # compiles the forward pass
                out.unlink()
                t0 = time.perf_counter()
                extract_to_file(out, dataset="image_folder", split="all", data_dir=root,
                                backbone=bb, image_size=args.image_size, batch_size=64,
                                progress=False, read_workers=w)
                secs = time.perf_counter() - t0
                with np.load(out) as z:
                    feats = z["features"]
                if first is None:
                    first = feats
                assert np.array_equal(feats, first)  # the same features however read
                measured({"what": "extract_to_file", "workers": w, "images": len(src),
                             "img_per_s": round(len(src) / secs, 1), "seconds": round(secs, 2)})
    if not args.json:
        print("# " + ", ".join(f"{k} {v}" for k, v in meta.items()))
        print("| what | workers | images | img/s | seconds |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['what']} | {r['workers']} | {r['images']} | {r['img_per_s']} | "
                  f"{r['seconds']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
