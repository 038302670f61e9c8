"""`bilaf finetune`: train on the selected samples and report test accuracy.

    bilaf finetune --dataset fashion_mnist --selection sel.json --mode linear \\
        --features pool.npz --test-features test.npz --workdir runs/lin
    bilaf finetune --dataset fashion_mnist --selection sel.json --mode full \\
        --backbone efficientnet_lite0 --image-size 48 --steps 500 --workdir runs/full

Modes: `linear` (probe on cached features), `knn` (weighted k-NN on cached features), `full`
(backbone + head on images, checkpointed; the same command after an interruption resumes).
Settings come from the defaults of `train.train.Config`, then `--config NAME` (a file
`configs/NAME.py` or a path to such a file, whose `get_config()` returns a dict), then the flags.
Writes WORKDIR/config.json, WORKDIR/metrics.jsonl, WORKDIR/summary.json (and WORKDIR/checkpoints
in full mode); WORKDIR/.lock is held while it runs. Prints the final accuracy; full mode then
prints {"params_digest": ...}, a digest of the evaluated weights (equal for two runs that ended
in the same state, as a resumed run and an uninterrupted one do).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from bilaf_jax.cli import UsageError, seed_type, workdir_type
from bilaf_jax.io import call_get_config

# flag -> Config field
_FLAGS = {
    "dataset": "dataset", "selection": "selection", "backbone": "backbone",
    "weights": "backbone_weights", "mode": "mode", "steps": "steps",
    "checkpoint_every": "checkpoint_every", "image_size": "image_size", "seed": "seed",
    "features": "features", "test_features": "test_features", "data_dir": "data_dir",
    "pool_size": "pool_size", "test_size": "test_size", "batch_size": "batch_size",
    "learning_rate": "learning_rate", "eval_every": "eval_every", "num_devices": "num_devices",
    "warmup_steps": "warmup_steps",
}

# Flags that only full finetuning uses (linear/knn run on cached features).
_FULL_ONLY = ("backbone", "weights", "steps", "checkpoint_every", "image_size", "data_dir",
              "batch_size", "learning_rate", "eval_every", "num_devices", "warmup_steps",
              "seed")  # the probe and k-NN are deterministic: no order, augmentation or init


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="finetune (full / linear probe / k-NN) on a selection and evaluate",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", help="dataset name (default: fashion_mnist)")
    p.add_argument("--selection", required=True, help="JSON list of pool row ids to label")
    p.add_argument("--backbone", help="backbone name for --mode full (default: efficientnet_lite0)")
    p.add_argument("--weights", help="backbone weights: a file, or 'random' (default: pretrained)")
    p.add_argument("--mode", choices=("linear", "knn", "full"), help="default: full")
    p.add_argument("--workdir", required=True, type=workdir_type, help="run folder (created; resumed if it exists)")
    p.add_argument("--steps", type=int, help="training steps (full: default from epochs)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    p.add_argument("--image-size", type=int, help="input side in pixels (full mode)")
    p.add_argument("--seed", type=seed_type,
                   help="--mode full: seed of the data order, augmentation and head (default 0)")
    p.add_argument("--features", help="pool features .npz (features, labels) for linear/knn")
    p.add_argument("--test-features", help="test features .npz (features, labels) for linear/knn")
    p.add_argument("--config", help="configs/NAME.py or a path to a config file")
    p.add_argument("--data-dir", help="dataset folder (see bilaf_jax.data)")
    p.add_argument("--pool-size", type=int, help="the pool = the first N train images (all of "
                   "them, with a note, where there are fewer)")
    p.add_argument("--test-size", type=int, help="evaluate on the first N test images (ImageNet: "
                   "validation images; all, with a note, where there are fewer)")
    p.add_argument("--batch-size", type=int, help="full mode: images per step (default 32)")
    p.add_argument("--learning-rate", type=float,
                   help="full mode: peak learning rate (default 3e-3)")
    p.add_argument("--eval-every", type=int, help="full mode: evaluate every N steps, in place of "
                   "a config's eval_every_epochs (default: at the end)")
    p.add_argument("--warmup-steps", type=int,
                   help="full mode: linear warm-up steps (default: warmup_epochs of the config, 5)")
    p.add_argument("--num-devices", type=int,
                   help="full mode: split each batch over this many devices (data parallel; "
                   "default 1). A run resumed on another count goes on, but is not bit-identical "
                   "to one that never changed")
    p.set_defaults(func=run)


# Config fields whose make_config messages ("steps must be a positive integer") should name
# the flag where the value came from one (not from --config).
_NUMERIC_FLAGS = ("steps", "checkpoint_every", "image_size", "pool_size", "test_size",
                  "batch_size", "learning_rate", "eval_every", "num_devices", "warmup_steps")


def _name_flags(message: str, args) -> str:
    for flag in _NUMERIC_FLAGS:
        if getattr(args, flag) is not None:
            # a whole word, not one already written as a flag ("--steps")
            message = re.sub(rf"(?<![\w-]){_FLAGS[flag]}\b", "--" + flag.replace("_", "-"),
                             message)
    return message


def load_config_file(name: str) -> dict:
    """`get_config()` of configs/NAME.py (next to the `train` package) or of a .py path."""
    path = Path(name)
    if path.suffix != ".py":
        import train

        path = Path(train.__file__).resolve().parent.parent / "configs" / f"{name}.py"
    if not path.is_file():
        raise UsageError(f"config not found: {name} (looked for {path})")
    cfg = call_get_config(path)
    if not isinstance(cfg, dict):
        raise UsageError(f"{path}: get_config() must return a dict")
    return dict(cfg)


def run(args) -> int:
    from train.train import check_num_devices, make_config, summary_without_state, train_and_evaluate

    overrides = load_config_file(args.config) if args.config else {}
    for flag, field in _FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides[field] = value
    if args.eval_every is not None:  # the flag's interval replaces the config's (in epochs)
        overrides.pop("eval_every_epochs", None)
    mode = overrides.get("mode", "full")
    if mode in ("linear", "knn") and isinstance(overrides.get("features"), (str, os.PathLike)):
        # The features say which data set their rows are; --dataset must not say otherwise
        # (a features value of another type is refused by make_config below).
        from bilaf_jax.extract import pool_identity

        rows = pool_identity(overrides["features"])
        if rows is not None and rows["dataset"] is not None:
            given = overrides.setdefault("dataset", rows["dataset"])
            if given != rows["dataset"]:
                raise UsageError(f"dataset {given} (--dataset or --config) but --features "
                                 f"{overrides['features']} holds {rows['dataset']} rows")
    if mode in ("linear", "knn"):
        ignored = [f"--{flag.replace('_', '-')}" for flag in _FULL_ONLY if getattr(args, flag) is not None]
        if ignored:
            raise UsageError(f"{', '.join(ignored)} appl{'y' if len(ignored) > 1 else 'ies'} to "
                             f"--mode full only (the {mode} mode on features would ignore it)")
    elif overrides.get("features") or overrides.get("test_features"):
        raise UsageError("--features / --test-features (or features / test_features in --config) "
                         "apply to --mode linear and knn only: full finetuning reads the images")
    try:
        config = make_config(**overrides)
    except TypeError as e:
        raise UsageError(str(e)) from None
    except ValueError as e:
        raise UsageError(_name_flags(str(e), args)) from None
    if config.mode == "full":  # here, where the message can name the flag
        check_num_devices(config.num_devices, "--num-devices" if args.num_devices else "num_devices")
    result = train_and_evaluate(config, args.workdir)
    for note in result.get("notes", ()):
        sys.stderr.write(f"bilaf finetune: note: {note}\n")
    summary = summary_without_state(result)
    resumed = summary["resumed_from_step"]
    sys.stdout.write(
        f"{summary['mode']}: final_accuracy {summary['final_accuracy']:.4f} at step "
        f"{summary['step']} ({summary['num_labelled']} labelled"
        + (f", resumed from step {resumed}" if resumed else "")
        + f") -> {Path(args.workdir) / 'summary.json'}\n")
    if summary.get("params_digest"):
        sys.stdout.write(json.dumps({"params_digest": summary["params_digest"]}) + "\n")
    return 0
