"""Finetuning on the selected (labelled) samples: `train_and_evaluate(config, workdir)`.

Modes
  linear  linear probe on cached features (`train.linear`), evaluated on cached test features.
  knn     DINO's weighted k-NN on cached features (`train.knn`).
  full    backbone + linear head trained on images: RandomResizedCrop + flip in JAX, SGD with
          momentum (or AdamW), warm-up + cosine schedule, label smoothing, weight decay,
          optional EMA of the weights; orbax checkpoints with exact resume.

Workdir layout
  config.json     the config and the content hashes of its input files; a later start with a
                  different config is refused before anything is written (unless the run
                  stopped before any checkpoint, metrics line or summary: nothing to lose).
  .lock           held while a run writes here; a second process is refused meanwhile.
  metrics.jsonl   full mode: one JSON object every log_every steps and at every evaluation
                  (every eval_every steps and the last): step, train_loss (mean since the
                  previous line), learning_rate, and eval_accuracy where evaluated; on resume,
                  lines past the restored step go. Linear: step and train_loss every log_every
                  iterations, the last with eval_accuracy. k-NN: one line, step 0 and
                  eval_accuracy.
  checkpoints/    orbax CheckpointManager (full mode).
  summary.json    written atomically at the end: mode, final_accuracy, step, resumed_from_step,
                  num_labelled, num_pool, num_test, num_classes, config; full mode also
                  best_accuracy, best_step (the best evaluation along the way) and
                  params_digest.

Exact resume: batch order and augmentation keys are functions of (seed, step) only
(`train.input_pipeline`), and a checkpoint holds everything else (parameters, other model
state such as BatchNorm statistics, optimiser state, EMA, the running loss sum, the step), so a
run interrupted at any point (Ctrl-C waits for the checkpoint being written) and started again
ends in the same state, bit for bit, as an uninterrupted one (on CPU; on GPUs XLA may pick
non-deterministic kernels unless `--xla_gpu_deterministic_ops=true` is in XLA_FLAGS).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from bilaf_jax.io import (
    InputError,
    arrays_sha256,
    check_identity,
    exclusive_lock,
    indices_sha256,
    load_features,
    load_index_list,
    read_json_object,
    read_selection_record,
    selection_record_path,
    sha256_file,
    write_json_atomic,
    write_text_atomic,
)
from train.knn import check_labels, exact_accuracy
from train.linear import DEFAULT_STEPS, DEFAULT_WEIGHT_DECAY

MODES = ("linear", "knn", "full")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that decides a finetuning run. Build with `make_config(**overrides)`."""

    mode: str = "full"
    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    selection: str | None = None  # JSON list of pool row ids to label
    pool_size: int | None = None  # pool = first pool_size train images / feature rows (None: all)
    test_size: int | None = None  # evaluate on the first test_size test images (None: all)
    features: str | None = None  # linear/knn: pool features .npz (features, labels)
    test_features: str | None = None  # linear/knn: test features .npz (features, labels)
    num_classes: int | None = None  # None: the data set's (full mode), else 1 + the largest label
    seed: int = 0
    # Backbone (full mode).
    backbone: str = "efficientnet_lite0"
    backbone_weights: str | None = None  # None: the pretrained weights; "random": random init
    image_size: int = 48
    # Full finetune.
    steps: int | None = None  # None: from epochs
    epochs: float = 100.0  # an epoch is ceil(labelled / batch_size) steps, warm-up epochs too
    batch_size: int = 32
    optimizer: str = "sgd"  # sgd (momentum) | adamw
    learning_rate: float = 3e-3
    momentum: float = 0.9
    nesterov: bool = False  # sgd: Nesterov momentum (timm's "sgd", which the authors' finetuning uses)
    weight_decay: float = 1e-4  # on kernels only (see decay_mask), not biases or norm scales
    warmup_steps: int | None = None  # None: from warmup_epochs
    warmup_epochs: float = 5.0
    # The learning rate rises from warmup_lr to learning_rate, then falls by a cosine to min_lr:
    # per step ("steps"), or per epoch as the authors' DeiT script steps timm's scheduler
    # ("deit": an epoch's rate is the schedule at the epoch before, and epochs + 1 epochs run,
    # 0 to epochs as its loop; see `deit_learning_rate`).
    schedule: str = "steps"
    warmup_lr: float = 0.0
    min_lr: float = 0.0
    # Batches: "wrap" (every batch full, from the stream of epoch permutations) or "deit" (the
    # authors' repeated-augmentation sampler: an epoch of max(1, n // 256) * 256 samples, its
    # last batch smaller; train.input_pipeline.DeitOrder). repeated_augmentation: copies of
    # each labelled image per epoch, each with its own crop (the authors: 3).
    sampler: str = "wrap"
    repeated_augmentation: int = 1
    # "deit": the GPUs their sampler deals its list over (their command: 2), which pads the
    # list with its head where they do not divide it and takes floor(epoch / replicas) from
    # each; the global batch is batch_size (a multiple of it) whatever num_devices is
    sampler_replicas: int = 1
    label_smoothing: float = 0.1
    ema_decay: float = 0.0  # 0: no EMA; else evaluate the EMA of the weights and BatchNorm
    # statistics (as timm's ModelEma averages the whole state)
    drop_path: float = 0.0  # stochastic depth, by the backbone's rule (train.models.set_drop_path)
    crop_scale_min: float = 0.08
    # resampling of the training crops: bilinear, or bicubic as DeiT's (the authors' finetuning)
    crop_interpolation: str = "bilinear"
    # Test images: None = the whole image resized to image_size; else DeiT's evaluation crop,
    # the shorter side resized to image_size / eval_crop_fraction, then the centre crop (0.875).
    eval_crop_fraction: float | None = None
    head_init: str = "zeros"  # the classifier head: "zeros", or "normal" (std 0.02, timm's ViT)
    # Training crops from the labelled images "resized" to image_size first, or as "stored"
    # (the authors' transform crops the image itself: CIFAR's 32 px; needs one square size)
    crop_from: str = "resized"
    grad_clip_norm: float | None = None
    eval_every: int | None = None  # None: evaluate at the end only
    # or after epochs 0, N, 2N, ... (0-based, as the authors' `epoch % eval_interval == 0`, 50:
    # the first epoch too); not both
    eval_every_epochs: int | None = None
    eval_batch_size: int = 256
    num_devices: int = 1  # full mode: data-parallel devices, each batch split across them
    log_every: int = 10
    checkpoint_every: int = 100
    max_checkpoints: int = 2
    # Linear probe.
    linear_weight_decay: float = DEFAULT_WEIGHT_DECAY
    linear_steps: int = DEFAULT_STEPS
    # k-NN.
    knn_k: int = 20
    knn_temperature: float = 0.07


# Fields added after runs were made, at the value those runs used: left out of identities there,
# so that such runs still resume (and `bilaf run` keeps their evaluations).
LATER_FIELDS = {"crop_interpolation": "bilinear", "schedule": "steps", "warmup_lr": 0.0,
                "min_lr": 0.0, "sampler": "wrap", "repeated_augmentation": 1,
                "head_init": "zeros", "eval_every_epochs": None, "crop_from": "resized",
                "sampler_replicas": 1}
SCHEDULES = ("steps", "deit")
SAMPLERS = ("wrap", "deit")
HEAD_INITS = ("zeros", "normal")
CROP_FROM = ("resized", "stored")


def without_later_defaults(fields: dict) -> dict:
    """`fields` (a Config as a dict) less the LATER_FIELDS at the value earlier runs used."""
    return {k: v for k, v in fields.items() if not (k in LATER_FIELDS and v == LATER_FIELDS[k])}

# Fields that do not change the result (num_devices: only the float summation order; eval_batch_size
# only how many test images go through at once): a resumed run may change them freely.
_NOT_IDENTITY = ("data_dir", "checkpoint_every", "max_checkpoints", "selection", "features",
                 "test_features", "num_devices", "eval_batch_size")


# What each mode reads of a config: the other fields may change between runs in one workdir
# (a linear probe's result does not depend on the full finetune's seed or learning rate).
_ON_FEATURES = ("mode", "dataset", "pool_size", "test_size", "num_classes", "log_every")
_READ_BY_MODE = {"linear": _ON_FEATURES + ("linear_weight_decay", "linear_steps"),
                 "knn": _ON_FEATURES + ("knn_k", "knn_temperature")}


def _unread(mode: str) -> set[str]:
    """The Config fields a run in `mode` does not read."""
    fields = {f.name for f in dataclasses.fields(Config)}
    if mode in _READ_BY_MODE:
        return fields - set(_READ_BY_MODE[mode])
    return {"linear_weight_decay", "linear_steps", "knn_k", "knn_temperature"}


def make_config(**overrides) -> Config:
    """Config from keyword overrides; unknown keys or bad values raise ValueError."""
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown config key(s): {', '.join(unknown)}")
    config = Config(**{k: _plain(v) for k, v in overrides.items()})
    validate_config(config)
    return config


def _plain(value):
    """A .py config's NumPy scalars and paths as the plain values a run's config.json holds."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic) and not isinstance(value, (np.str_, np.bytes_)):
        return value.item()
    return value


def validate_config(c: Config) -> None:
    for name in ("dataset", "backbone", "selection", "features", "test_features", "data_dir",
                 "backbone_weights"):
        v = getattr(c, name)
        if (v is not None or name in ("dataset", "backbone")) and not isinstance(v, str):
            raise ValueError(f"{name} must be a string{'' if name in ('dataset', 'backbone') else ' (a path)'}"
                             f", got {v!r}")
    for name in ("selection", "features", "test_features"):
        if getattr(c, name) == "":  # Path("") is the current folder: "selection file . is not JSON"
            raise ValueError(f"{name} is empty; give a file path")
    if c.mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {c.mode!r}")
    if c.optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer must be sgd or adamw, got {c.optimizer!r}")
    if c.selection is None:
        raise ValueError("a selection file is required")

    def positive_int(name, optional=False):
        v = getattr(c, name)
        if v is None and optional:
            return
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")

    for name, allowed in (("schedule", SCHEDULES), ("sampler", SAMPLERS),
                          ("head_init", HEAD_INITS), ("crop_from", CROP_FROM)):
        if getattr(c, name) not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got "
                             f"{getattr(c, name)!r}")
    for name in ("batch_size", "checkpoint_every", "log_every", "eval_batch_size", "image_size",
                 "linear_steps", "knn_k", "max_checkpoints", "num_devices",
                 "repeated_augmentation", "sampler_replicas"):
        positive_int(name)
    for name in ("steps", "pool_size", "test_size", "eval_every", "eval_every_epochs",
                 "num_classes"):
        positive_int(name, optional=True)
    if c.eval_every is not None and c.eval_every_epochs is not None:
        raise ValueError("give eval_every (steps) or eval_every_epochs, not both")
    if c.warmup_steps is not None and (isinstance(c.warmup_steps, bool)
                                       or not isinstance(c.warmup_steps, (int, np.integer))
                                       or c.warmup_steps < 0):
        raise ValueError(f"warmup_steps must be a non-negative integer, got {c.warmup_steps!r}")
    if not isinstance(c.nesterov, bool):
        raise ValueError(f"nesterov must be true or false, got {c.nesterov!r}")
    if c.batch_size % c.num_devices:
        raise ValueError(f"batch_size ({c.batch_size}) must be a multiple of num_devices "
                         f"({c.num_devices}): each device takes an equal share of a batch")
    if c.batch_size % c.sampler_replicas:
        raise ValueError(f"batch_size ({c.batch_size}) must be a multiple of sampler_replicas "
                         f"({c.sampler_replicas}): the global batch of that many GPUs")
    def in_range(name, lo, hi, *, lo_open=False, hi_closed=False, optional=False):
        v = getattr(c, name)
        if v is None and optional:
            return
        ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
              and (v > lo if lo_open else v >= lo) and (v <= hi if hi_closed else v < hi))
        if not ok:
            bounds = f"{'(' if lo_open else '['}{lo}, {hi}{']' if hi_closed else ')'}"
            raise ValueError(f"{name} must be a number in {bounds}, got {v!r}")

    if isinstance(c.seed, bool) or not isinstance(c.seed, int) or not 0 <= c.seed < 2**32:
        # JAX keeps 32 bits of an integer seed: 2**32 would repeat seed 0.
        raise ValueError(f"seed must be an integer in [0, 2**32), got {c.seed!r}")
    inf = float("inf")
    in_range("learning_rate", 0.0, inf, lo_open=True)
    in_range("epochs", 0.0, inf, lo_open=True)
    in_range("momentum", 0.0, 1.0)
    in_range("weight_decay", 0.0, inf)
    in_range("linear_weight_decay", 0.0, inf)
    in_range("warmup_epochs", 0.0, inf)
    in_range("warmup_lr", 0.0, inf)
    in_range("min_lr", 0.0, inf)
    if c.schedule == "deit" and c.warmup_steps is not None:
        raise ValueError("schedule 'deit' counts its warm-up in epochs (warmup_epochs); "
                         "warmup_steps must be None")
    in_range("drop_path", 0.0, 1.0)
    in_range("grad_clip_norm", 0.0, inf, lo_open=True, optional=True)
    in_range("eval_crop_fraction", 0.0, 1.0, lo_open=True, hi_closed=True, optional=True)
    in_range("knn_temperature", 0.0, inf, lo_open=True)
    in_range("ema_decay", 0.0, 1.0)
    in_range("label_smoothing", 0.0, 1.0)
    in_range("crop_scale_min", 0.0, 1.0, lo_open=True, hi_closed=True)
    from train.input_pipeline import INTERPOLATIONS

    if c.crop_interpolation not in INTERPOLATIONS:
        raise ValueError(f"crop_interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                         f"got {c.crop_interpolation!r}")
    if c.mode in ("linear", "knn"):
        if c.features is None:
            raise ValueError(f"mode {c.mode} needs pool features (--features FILE.npz)")
        if c.test_features is None:
            raise ValueError(f"mode {c.mode} needs test features (--test-features FILE.npz, "
                             "written by `bilaf extract` on the test split)")


# ----------------------------------------------------------------------------- workdir


def _identity(config: Config, indices, data_sha256: str | None = None,
              num_classes: int | None = None) -> dict:
    """What a workdir's run depends on. `indices`: the selection list read from
    config.selection. Full mode: `data_sha256` is the digest of the labelled and test images
    and labels it reads (data_dir, a path, is not identity: a copy resumes), `num_classes` the
    classes of its head (an image folder's class folders, some maybe empty)."""
    left_out = set(_NOT_IDENTITY) | _unread(config.mode)
    ident = {k: v for k, v in without_later_defaults(dataclasses.asdict(config)).items()
             if k not in left_out}
    # the list, in its order (full mode's data order follows it), not the file's bytes: the
    # same list written again in another layout resumes
    ident["selection_indices_sha256"] = indices_sha256(indices)
    for name in ("features", "test_features"):
        path = getattr(config, name)
        if path is not None and config.mode in ("linear", "knn"):
            ident[f"{name}_sha256"] = sha256_file(path)
    if config.mode == "full":  # checkpoints trained on other inputs must not be resumed
        from bilaf_jax.backbones import preprocessing

        ident["preprocessing"] = preprocessing(config.backbone)
        ident["data_sha256"] = data_sha256
        ident["resolved_num_classes"] = num_classes
        weights, path = config.backbone_weights, None
        if weights is None:  # the default file (a package's, which another version may replace)
            from bilaf_jax.backbones import _weights_path

            with contextlib.suppress(InputError):  # none: loading the backbone says so
                path = _weights_path(config.backbone, None)
        elif weights != "random" and Path(weights).expanduser().is_file():
            path = Path(weights).expanduser()
        if path is not None:
            # the path alone would resume checkpoints made from a file since replaced there
            ident["backbone_weights_sha256"] = sha256_file(path)
    return ident


# Identity keys added after runs were made: a workdir whose config.json lacks one is compared
# without it (check_identity's added_later; recorded with it from then on), so such runs resume.
LATER_IDENTITY_KEYS = ("backbone_weights_sha256", "resolved_num_classes")


def _as_stored(identity: dict, stored: dict, selection) -> dict:
    """`identity` as compared with a workdir's `stored` one: the weights by their digest where
    both record it (a copy elsewhere, or the default file named by its path, is the same run),
    the selection file (path `selection`) by its bytes where an earlier version recorded only
    those, and _NOT_IDENTITY keys and fields the mode does not read (`_unread`) that an earlier
    version recorded left out of the comparison."""
    ignored = set(_NOT_IDENTITY) | _unread(identity.get("mode"))
    identity = {**identity, **{k: stored[k] for k in ignored if k in stored}}
    if "selection_sha256" in stored and "selection_indices_sha256" not in stored:
        del identity["selection_indices_sha256"]
        identity["selection_sha256"] = sha256_file(selection)
    sha = identity.get("backbone_weights_sha256")
    if sha is not None and stored.get("backbone_weights_sha256") == sha:
        identity["backbone_weights"] = stored.get("backbone_weights")
    return identity


def _stored_identity(workdir: Path) -> dict:
    """The identity in `workdir`'s config.json ({} where there is none or it is unreadable:
    `_check_workdir` says so)."""
    stored = (read_json_object(workdir / "config.json") or {}).get("identity")
    return stored if isinstance(stored, dict) else {}


def _check_workdir(workdir: Path, identity: dict, selection) -> bool:
    """Refuse a workdir that belongs to another config (`identity`, of a run on the selection
    file `selection`). Returns True if it already has ours.

    A workdir whose run of another config stopped before it had any result (no checkpoint,
    metrics line or summary) is not refused: there is nothing of that run to lose."""
    if workdir.exists() and not workdir.is_dir():
        raise InputError(f"workdir {workdir} exists and is not a folder")
    cfg_path = workdir / "config.json"
    if not cfg_path.exists():
        ours = ("metrics.jsonl", "summary.json", "checkpoints")
        if workdir.is_dir() and any((workdir / name).exists() for name in ours):
            raise InputError(f"workdir {workdir} holds a run without config.json; "
                             "use an empty or new workdir")
        return False
    stored = _stored_identity(workdir)
    try:
        if stored.get("mode") not in (None, identity.get("mode")):
            # the settings each mode records differ too: the mode is what to name
            raise InputError(f"workdir {workdir} holds a run of a different config (mode: "
                             f"{stored['mode']!r} -> {identity['mode']!r}); use a new --workdir")
        check_identity(cfg_path, _as_stored(identity, stored, selection), workdir,
                       added_later=LATER_IDENTITY_KEYS)
    except InputError:
        if _holds_results(workdir):
            raise
        return False
    return True


def _holds_results(workdir: Path) -> bool:
    """Whether a run in `workdir` got as far as a summary, a metrics line or a finished
    checkpoint (orbax names those by their step; one cut short is a tmp folder)."""
    metrics = workdir / "metrics.jsonl"
    checkpoints = workdir / "checkpoints"
    return ((workdir / "summary.json").exists()
            or (metrics.exists() and metrics.stat().st_size > 0)
            or (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())))


def _check_not_in_use(workdir: Path) -> None:
    """Refuse at once a workdir another process holds, before minutes of loading images or
    fitting that `_claimed` would then refuse. Creates nothing: a workdir or lock file not
    there yet is held by no one."""
    lock = workdir / ".lock"
    if lock.is_file():
        with exclusive_lock(lock, f"workdir {workdir}"):
            pass


@contextlib.contextmanager
def _claimed(workdir: Path, config: Config, identity: dict):
    """Hold `workdir` for this run: create it, lock it (a second process writing the same
    checkpoints would corrupt them), check it again under the lock, and write config.json."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # say, a file where a parent folder should be: one line, not a traceback
        raise InputError(f"cannot create workdir {workdir}: {e.strerror or e}") from None
    with exclusive_lock(workdir / ".lock", f"workdir {workdir}"):
        # another process may have written it meanwhile
        _check_workdir(workdir, identity, config.selection)
        write_json_atomic(workdir / "config.json",
                          {"config": dataclasses.asdict(config), "identity": identity}, indent=1)
        yield


class MetricsWriter:
    """Appends JSON lines to metrics.jsonl; `truncate(step)` drops lines past a resumed step."""

    def __init__(self, path: Path):
        self.path = path

    def truncate(self, step: int) -> None:
        # A line cut short by a kill does not parse and is dropped.
        self.replace([rec for rec in self.records() if isinstance(rec, dict)
                      and isinstance(rec.get("step"), int) and rec["step"] <= step])

    def replace(self, records: list[dict]) -> None:
        """Write `records` as the whole file, atomically."""
        write_text_atomic(self.path, "".join(json.dumps(rec) + "\n" for rec in records))

    def records(self) -> list[dict]:
        out = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def _write_summary(workdir: Path, summary: dict) -> None:
    write_json_atomic(workdir / "summary.json", summary, indent=1)


# ----------------------------------------------------------------------------- entry point


def train_and_evaluate(config: Config, workdir, *, backbone=None,
                       max_steps_this_run: int | None = None) -> dict:
    """Run (or resume) the finetuning run `config` in `workdir`; return the summary dict, with
    "notes" added (remarks for the user on stderr, such as test classes no labelled sample has;
    `summary_without_state` drops them).

    backbone: optional `bilaf_jax.backbones.Backbone`-like object (full mode) used instead of
      loading `config.backbone` (tests pass small ones).
    max_steps_this_run: full mode: stop after this many steps in this call, as if killed there
      (no summary is written; the returned dict has "interrupted": True); a run whose last step
      comes within them ends as usual.
    """
    # A Config built directly may hold NumPy scalars or paths: as make_config's, so that
    # config.json and summary.json can record them (not a TypeError once the run is done).
    config = dataclasses.replace(config, **{f.name: _plain(getattr(config, f.name))
                                            for f in dataclasses.fields(Config)})
    validate_config(config)
    if isinstance(workdir, str) and not workdir:  # Path("") is the current folder
        raise InputError("workdir is empty; give a folder path")
    workdir = Path(workdir)
    _check_not_in_use(workdir)
    if config.mode == "full":
        return _run_full(config, workdir, backbone, max_steps_this_run)
    return _run_on_features(config, workdir)


def _check_selection(path, indices, rows: dict | None, what: str) -> None:
    """Refuse a selection that its `bilaf select` record does not describe (a list copied
    beside another selection's record would be judged, and its run recorded, by that other
    selection), then one selected on other rows than `rows` (see `check_selection_pool`)."""
    from bilaf_jax.extract import check_selection_pool

    record = read_selection_record(path)  # None: no record, nothing to compare
    recorded = record.get("indices_sha256") if record is not None else None
    if recorded is not None and recorded != indices_sha256(indices):
        raise InputError(f"{path} is not the list its record {selection_record_path(path)} describes "
                         "(indices_sha256 differs: the list was edited or copied beside another "
                         "selection's record); put the list's own record beside it, or select again")
    if record is not None:  # without one there is nothing to check the pool against
        check_selection_pool(path, rows, what, record)


def _unseen_classes_note(train_labels, test_labels) -> str | None:
    """A note when some test classes have no labelled sample: their test samples cannot be
    classified right, so the accuracy is lower than the model's (0 when no class is shared)."""
    unseen = np.isin(test_labels, train_labels, invert=True)
    if not unseen.any():
        return None
    classes = len(np.unique(test_labels[unseen]))
    return (f"{int(unseen.sum())} of {len(test_labels)} test samples have labels never seen in "
            f"training ({classes} of {len(np.unique(test_labels))} test classes have no labelled "
            "sample); they count as wrong")


def _load_feature_pair(config: Config):
    pool_x, pool_y = load_features(config.features)
    if pool_y is None:
        raise InputError(f"{config.features} has no 'labels' array; linear/knn modes need labels")
    test_x, test_y = load_features(config.test_features)
    if test_y is None:
        raise InputError(f"{config.test_features} has no 'labels' array")
    if test_x.shape[1] != pool_x.shape[1]:
        raise InputError(f"pool features are {pool_x.shape[1]}-d but test features are "
                         f"{test_x.shape[1]}-d")
    from bilaf_jax.extract import check_feature_pair

    check_feature_pair(config.features, config.test_features)
    return pool_x, pool_y, test_x, test_y


def _size_notes(config: Config, pool_rows: int, test_rows: int, where: str) -> list[str]:
    """Notes for a pool_size / test_size above the rows `where` has: the run takes them all
    (one config serves feature files and data sets of several sizes), and says so."""
    notes = []
    for name, asked, there, what in (("pool_size", config.pool_size, pool_rows, "train"),
                                     ("test_size", config.test_size, test_rows, "test")):
        if asked is not None and asked > there:
            notes.append(f"{name} {asked} is more than the {there} {what} rows of {where}: "
                         f"the run uses all {there}")
    return notes


def _run_on_features(config: Config, workdir: Path) -> dict:
    from bilaf_jax.extract import pool_identity
    from train.knn import knn_eval
    from train.linear import linear_probe

    pool_x, pool_y, test_x, test_y = _load_feature_pair(config)
    notes = _size_notes(config, len(pool_y), len(test_y), "the feature files")
    pool_x, pool_y = pool_x[: config.pool_size], pool_y[: config.pool_size]
    test_x, test_y = test_x[: config.test_size], test_y[: config.test_size]
    sel = np.asarray(load_index_list(config.selection, n=len(pool_y)), np.int64)
    rows = pool_identity(config.features)
    _check_selection(config.selection, sel, rows, f"--features {config.features}")
    if rows is not None and rows["dataset"] not in (None, config.dataset):
        # the run's records would name a data set its numbers are not of
        raise InputError(f"dataset {config.dataset} but the features {config.features} hold "
                         f"{rows['dataset']} rows")
    identity = _identity(config, sel)
    _check_workdir(workdir, identity, config.selection)
    num_classes = config.num_classes or int(max(pool_y.max(), test_y.max())) + 1
    check_labels(num_classes, selected_pool_labels=pool_y[sel], test_labels=test_y)
    notes.append(_unseen_classes_note(pool_y[sel], test_y))
    # Computed before anything is written: an error or Ctrl-C here leaves the workdir as it was
    # (not a summary.json beside an emptied metrics.jsonl).
    if config.mode == "linear":
        out = linear_probe(pool_x[sel], pool_y[sel], test_x, test_y,
                           weight_decay=config.linear_weight_decay, steps=config.linear_steps,
                           num_classes=num_classes, return_output=True)
        trace = np.asarray(out.loss_trace)
        records = [{"step": i + 1, "train_loss": float(trace[i])}
                   for i in range(config.log_every - 1, len(trace) - 1, config.log_every)]
        step = len(trace)
        accuracy = exact_accuracy(out.predictions, test_y)
        records.append({"step": step, "train_loss": float(trace[-1]), "eval_accuracy": accuracy})
    else:
        out = knn_eval(pool_x[sel], pool_y[sel], test_x, test_y, k=config.knn_k,
                       temperature=config.knn_temperature, num_classes=num_classes,
                       return_output=True)
        step = 0
        accuracy = exact_accuracy(out.predictions, test_y)
        records = [{"step": 0, "eval_accuracy": accuracy}]
    with _claimed(workdir, config, identity):
        MetricsWriter(workdir / "metrics.jsonl").replace(records)
        summary = {
            "mode": config.mode,
            "final_accuracy": accuracy,
            "step": step,
            "resumed_from_step": 0,
            "num_labelled": int(len(sel)),
            "num_pool": int(len(pool_y)),
            "num_test": int(len(test_y)),
            "num_classes": num_classes,
            "config": dataclasses.asdict(config),
        }
        _write_summary(workdir, summary)
    summary["notes"] = [n for n in notes if n]
    return summary


# ----------------------------------------------------------------------------- full finetune


def _is_float(x) -> bool:
    import jax.numpy as jnp

    return jnp.issubdtype(x.dtype, jnp.floating)


def _is_key(x) -> bool:
    import jax
    import jax.numpy as jnp

    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree):
    import jax

    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _keys_from_data(tree, template):
    import jax

    return jax.tree.map(
        lambda x, t: jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if _is_key(t)
        else x, tree, template)


def params_digest(params) -> str:
    """sha256 (first 16 hex digits) of all parameter arrays, in pytree order."""
    import jax

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


# Not weight-decayed although not 1-d: a ViT's position and class embeddings (as DeiT / timm,
# whose finetuning recipe the paper follows, exclude them).
NO_DECAY = ("pos_embed", "cls_token")


def decay_mask(params):
    """True for the parameters weight decay applies to: kernels (ndim > 1), not biases, norm
    scales or the embeddings named in NO_DECAY. params: a pytree; returns bools of its shape."""
    import jax

    def decays(path, p):
        names = {getattr(k, "key", getattr(k, "name", None)) for k in path}
        return p.ndim > 1 and not names.intersection(NO_DECAY)

    return jax.tree_util.tree_map_with_path(decays, params)


def deit_learning_rate(config: Config, steps_per_epoch: int):
    """The authors' DeiT schedule as a function of the step: timm's cosine scheduler, set per
    epoch (warm-up from warmup_lr to learning_rate over warmup_epochs epochs, then a cosine to
    min_lr over `epochs` epochs, min_lr after), at t = the epoch before the step's: their loop
    calls `lr_scheduler.step(epoch)` after epoch `epoch`, and epoch 0 runs at the rate set at
    construction, warmup_lr (t = 0 too)."""
    import jax.numpy as jnp

    peak, low, start = config.learning_rate, config.min_lr, config.warmup_lr
    warm, length = config.warmup_epochs, config.epochs

    def schedule(count):
        t = jnp.maximum(count // steps_per_epoch - 1, 0).astype(jnp.float32)
        rising = start + t * (peak - start) / max(warm, 1.0)  # (used only where t < warm)
        cosine = low + 0.5 * (peak - low) * (1.0 + jnp.cos(jnp.pi * t / length))
        return jnp.where(t < warm, rising, jnp.where(t < length, cosine, low))

    return schedule


def _make_optimizer(config: Config, total_steps: int, warmup_steps: int,
                    steps_per_epoch: int = 1):
    import optax

    if config.schedule == "deit":
        schedule = deit_learning_rate(config, steps_per_epoch)
    else:
        schedule = optax.warmup_cosine_decay_schedule(
            config.warmup_lr, config.learning_rate, max(warmup_steps, 0),
            max(total_steps, warmup_steps + 1), config.min_lr)
    parts = []
    if config.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    if config.optimizer == "sgd":
        parts += [optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
                  optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov)]
    else:
        parts.append(optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule


# Compiled steps are cached per (graph, hyperparameters) so repeated runs in one process (tests,
# sweeps) compile once.
_STEP_CACHE: dict = {}


def _train_step_fn(train_def, tx, key_tuple, *, image_size, num_classes, label_smoothing,
                   ema_decay, crop_scale_min, crop_interpolation="bilinear"):
    # Everything the traced step closes over is in the key: a run with other settings must not
    # reuse a step compiled for the first one.
    cache_key = ("train", train_def, key_tuple, image_size, num_classes, label_smoothing,
                 ema_decay, crop_scale_min, crop_interpolation)
    if cache_key in _STEP_CACHE:
        return _STEP_CACHE[cache_key]
    import jax
    import optax
    from flax import nnx

    from train.input_pipeline import random_resized_crop_and_flip

    def train_step(state, images, labels, key):
        images = random_resized_crop_and_flip(key, images, out_size=image_size,
                                              scale_min=crop_scale_min,
                                              interpolation=crop_interpolation)
        targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)

        def loss_fn(params, rest):
            # Fresh Variable objects at this trace level, so BatchNorm may update them.
            params, rest = jax.tree.map(lambda x: x, (params, rest))
            model = nnx.merge(train_def, params, rest)
            logits = model(images)
            loss = optax.softmax_cross_entropy(logits, targets).mean()
            _, _, rest = nnx.split(model, nnx.Param, ...)
            return loss, rest

        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"],
                                                                         state["rest"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = dict(state, step=state["step"] + 1, params=params, rest=rest, opt_state=opt_state,
                   loss_sum=state["loss_sum"] + loss, loss_count=state["loss_count"] + 1)
        if ema_decay > 0:
            new["ema"] = jax.tree.map(
                lambda e, p: ema_decay * e + (1.0 - ema_decay) * p if _is_float(p) else p,
                state["ema"], (params, rest))
        return new, loss

    fn = jax.jit(train_step, donate_argnums=0)
    _STEP_CACHE[cache_key] = fn
    return fn


def _eval_step_fn(eval_def):
    cache_key = ("eval", eval_def)
    if cache_key in _STEP_CACHE:
        return _STEP_CACHE[cache_key]
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def eval_step(params, rest, images, labels, mask):
        logits = nnx.merge(eval_def, params, rest)(images)
        correct = (jnp.argmax(logits, axis=1) == labels) & mask
        return jnp.sum(correct.astype(jnp.int32))

    fn = jax.jit(eval_step)
    _STEP_CACHE[cache_key] = fn
    return fn


class _Images:
    """Preprocessed images, computed once when they fit in `budget` bytes, else per batch."""

    def __init__(self, backbone, images: np.ndarray, image_size: int, budget: float = 1.5e9):
        self.backbone, self.raw, self.size = backbone, images, image_size
        self.cached = None
        if len(images) * image_size * image_size * 3 * 4 <= budget:
            chunks = [np.asarray(backbone.preprocess(images[i: i + 1024], image_size))
                      for i in range(0, len(images), 1024)]
            self.cached = np.concatenate(chunks)

    def __len__(self):
        return len(self.raw)

    def take(self, idx: np.ndarray) -> np.ndarray:
        if self.cached is not None:
            return self.cached[idx]
        return np.asarray(self.backbone.preprocess(self.raw[idx], self.size))


def _evaluate(eval_fn, params, rest, test: _Images, labels: np.ndarray, batch_size: int,
              shard=lambda x: x) -> float:
    n = len(labels)
    correct = 0
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        mask = idx < n
        idx = np.where(mask, idx, 0)
        correct += int(eval_fn(params, rest, shard(test.take(idx)), shard(labels[idx]), shard(mask)))
    return correct / n


def _load_backbone(config: Config):
    from bilaf_jax import backbones

    return backbones.load(config.backbone, config.backbone_weights, seed=config.seed)



class Finetune(NamedTuple):
    """What a full-finetune run needs: initial state, compiled steps, schedule.

    state: dict(step, params, rest (BatchNorm statistics, RNG state), opt_state, loss_sum,
      loss_count[, ema]), every leaf a fresh array committed to one device, or replicated over
      `config.num_devices` devices.
    train_step(state, images f32 [b, s, s, 3], labels int[b], key) -> (state, loss); donates
      `state`. eval_step(params, rest, images, labels, mask) -> number correct.
    commit(tree): placed like the state. shard(array): a batch [b, ...] placed for the steps
      (split over the devices; unchanged on one device).
    """

    state: dict
    train_step: Any
    eval_step: Any
    schedule: Any
    commit: Any
    shard: Any


def build_finetune(config: Config, backbone, num_classes: int, total_steps: int,
                   warmup_steps: int, steps_per_epoch: int = 1) -> Finetune:
    """Classifier (backbone + head, initialised as `head_init`), optimiser and compiled steps."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from train.models import Classifier, set_drop_path

    # This sets the rate on the caller's module (its weights stay untouched, see below): a later
    # run on the same module sets its own rate again.
    drop_path_applied = set_drop_path(backbone.module, config.drop_path)
    if config.drop_path > 0 and not drop_path_applied:
        raise ValueError(f"backbone {config.backbone} has no drop-path layers; set drop_path=0")
    model = Classifier(backbone.module, backbone.dim, num_classes, rngs=nnx.Rngs(config.seed),
                       head_init=config.head_init)
    model.train()
    train_def, params, rest = nnx.split(model, nnx.Param, ...)
    model.eval()
    eval_def, _, _ = nnx.split(model, nnx.Param, ...)
    tx, schedule = _make_optimizer(config, total_steps, warmup_steps, steps_per_epoch)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "rest": rest,
        "opt_state": tx.init(params),
        "loss_sum": jnp.zeros((), jnp.float32),
        "loss_count": jnp.zeros((), jnp.int32),
    }
    if config.ema_decay > 0:
        state["ema"] = (params, rest)  # EMA of the weights and of the BatchNorm statistics
    # Own copies: the train step donates its input buffers, and the caller's backbone module
    # must stay usable. Every leaf is committed to one device: jit's cache key includes
    # committed-ness, and restored arrays are committed, so uncommitted fresh ones would
    # compile the step twice. With several devices the state is replicated and every batch
    # split across them; jit then runs the step data-parallel (BatchNorm still sees the whole
    # batch, as on one device).
    commit, shard = _placement(config.num_devices)
    state = commit(jax.tree.map(jnp.copy, state))
    key_tuple = (config.optimizer, config.learning_rate, config.momentum, config.nesterov,
                 config.weight_decay, config.grad_clip_norm, total_steps, warmup_steps,
                 config.schedule, config.warmup_lr, config.min_lr, config.warmup_epochs,
                 config.epochs, steps_per_epoch)
    train_step = _train_step_fn(
        train_def, tx, key_tuple, image_size=config.image_size, num_classes=num_classes,
        label_smoothing=config.label_smoothing, ema_decay=config.ema_decay,
        crop_scale_min=config.crop_scale_min, crop_interpolation=config.crop_interpolation)
    return Finetune(state, train_step, _eval_step_fn(eval_def), schedule, commit, shard)


def _stored_size(pool) -> int:
    """The side of a source's images where all are one square size (crop_from "stored")."""
    shape = pool.image_shape
    if shape is None or shape[0] != shape[1]:
        what = "differ in size" if shape is None else f"are {shape[0]} x {shape[1]}"
        raise InputError(f"crop_from 'stored' crops the images as stored, but {pool.name}'s "
                         f"{what} (one square size is needed, as CIFAR's); use crop_from "
                         "'resized'")
    return int(shape[0])


def plan_steps(config: Config, num_labelled: int):
    """(batch order, steps per epoch, steps in the run, warm-up steps) of a full finetuning
    of `num_labelled` images."""
    from train.input_pipeline import steps_for_epochs

    order = batch_order(config, num_labelled)
    per_epoch = (order.epoch_samples if config.sampler == "deit"  # samples an epoch is cut from
                 else num_labelled * config.repeated_augmentation)
    steps_per_epoch = steps_for_epochs(1.0, per_epoch, config.batch_size)
    # the authors' loop runs epochs 0 .. epochs (their scheduler's `epochs` is the cosine's)
    epochs_run = config.epochs + (1 if config.schedule == "deit" else 0)
    total = config.steps or steps_for_epochs(epochs_run, per_epoch, config.batch_size)
    # warm-up epochs are counted as the run's (a fraction of a step is one more step), not
    # rounded half to even (2.5 epochs of 1 step were 2 steps, 3.5 were 4)
    warmup = (config.warmup_steps if config.warmup_steps is not None
              else 0 if config.warmup_epochs == 0
              else steps_for_epochs(config.warmup_epochs, per_epoch, config.batch_size))
    return order, steps_per_epoch, total, warmup


def batch_order(config: Config, num_labelled: int):
    """The run's batch order (`train.input_pipeline`): BatchOrder for sampler "wrap", DeitOrder
    for "deit", whose batches must each split evenly over the devices."""
    from train.input_pipeline import BatchOrder, DeitOrder

    if config.sampler == "wrap":
        return BatchOrder(config.seed, num_labelled, config.batch_size,
                          config.repeated_augmentation)
    order = DeitOrder(config.seed, num_labelled, config.batch_size, config.repeated_augmentation,
                      config.sampler_replicas)
    uneven = [b for b in order.batch_sizes() if b % config.num_devices]
    if uneven:
        raise InputError(f"sampler 'deit' cuts each epoch of {order.epoch_samples} samples into "
                         f"batches of {order.batch_sizes()}; {uneven[0]} does not split over "
                         f"{config.num_devices} devices: use a num_devices dividing it")
    return order


def check_num_devices(num_devices: int, name: str = "num_devices") -> None:
    """Refuse more devices than this process has (checked before any data is read)."""
    import jax

    if num_devices > jax.device_count():
        have = jax.device_count()
        raise InputError(f"{name} is {num_devices} but only {have} device"
                         f"{'s are' if have > 1 else ' is'} available")


def _placement(num_devices: int):
    """(commit, shard) for `Finetune`: the state on one device or replicated over a mesh of
    `num_devices`; batches as they are or split over the mesh's "data" axis."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from bilaf_jax.sharding import make_mesh

    check_num_devices(num_devices)
    if num_devices == 1:
        device = jax.devices()[0]
        return (lambda tree: jax.device_put(tree, device)), (lambda x: x)
    mesh = make_mesh(num_devices)
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return (lambda tree: jax.device_put(tree, replicated)), (lambda x: jax.device_put(x, split))


@contextlib.contextmanager
def _sigint_deferred():
    """Hold a Ctrl-C (SIGINT) that comes during the block and act on it after the block.
    Outside the main thread, or where SIGINT is ignored or default, the block runs as is."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield
        return
    held = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        previous(signal.SIGINT, held[0])


def _run_full(config: Config, workdir: Path, backbone, max_steps_this_run) -> dict:
    from bilaf_jax import data

    check_num_devices(config.num_devices)

    # Only the labelled rows of the pool and the test rows are read into memory (an ImageNet
    # pool does not fit); images that differ in size are resized to image_size on the host.
    pool = data.data_source(config.dataset, "train", data_dir=config.data_dir)
    n_pool = len(pool) if config.pool_size is None else min(config.pool_size, len(pool))
    sel = np.asarray(load_index_list(config.selection, n=n_pool), np.int64)
    _check_selection(config.selection, sel, {"dataset": config.dataset, "split": "train",
                                             "source": pool.fingerprint},
                     f"this run's pool ({config.dataset} train)")
    test_src = data.data_source(config.dataset, data.eval_split(config.dataset),
                                data_dir=config.data_dir)
    if pool.class_names is not None and test_src.class_names != pool.class_names:
        # labels are positions in each split's own class list
        raise InputError(f"the {pool.split} and {test_src.split} image folders have different "
                         f"class folders ({pool.class_names} vs {test_src.class_names}), so "
                         "their labels would mean different classes; give both the same classes")
    n_test = len(test_src) if config.test_size is None else min(config.test_size, len(test_src))
    notes = _size_notes(config, len(pool), len(test_src), f"{config.dataset}")
    # A workdir of another config is refused now, not after minutes of reading images: all of
    # the identity but what the images decide, which is checked once they are read.
    identity, stored = _identity(config, sel), _stored_identity(workdir)
    _check_workdir(workdir, {**identity, **{k: stored.get(k) for k in
                                            ("data_sha256", "resolved_num_classes")}},
                   config.selection)
    bb = backbone if backbone is not None else _load_backbone(config)
    s = config.image_size
    resample = getattr(bb, "resize_method", "bilinear")
    if config.crop_from == "stored":
        stored = _stored_size(pool)
        labelled = data.load_rows(pool, sel)  # as stored: crops are taken from these
    else:
        stored = s
        labelled = data.load_rows(pool, sel, image_size=s, resample=resample)
    test = data.load_rows(test_src, np.arange(n_test), image_size=s, resample=resample,
                          crop_fraction=config.eval_crop_fraction)
    num_classes = (config.num_classes or pool.num_classes
                   or int(max(labelled.labels.max(), test.labels.max())) + 1)
    identity["data_sha256"] = arrays_sha256(labelled.images, labelled.labels, test.images,
                                            test.labels)
    identity["resolved_num_classes"] = num_classes
    _check_workdir(workdir, identity, config.selection)

    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    train_labels = np.asarray(labelled.labels, np.int32)
    test_labels = np.asarray(test.labels, np.int32)
    check_labels(num_classes, selected_pool_labels=train_labels, test_labels=test_labels)
    notes.append(_unseen_classes_note(train_labels, test_labels))
    order, steps_per_epoch, total, warmup = plan_steps(config, len(sel))

    def evaluate_after(step: int) -> bool:  # (besides the last step)
        if config.eval_every_epochs is not None:
            epoch, within = divmod(step, steps_per_epoch)  # `epoch` epochs done
            return within == 0 and (epoch - 1) % config.eval_every_epochs == 0
        return bool(config.eval_every) and step % config.eval_every == 0
    if warmup >= total:
        source = (f"warmup_steps {warmup}" if config.warmup_steps is not None else
                  f"{config.warmup_epochs:g} warm-up epochs of {steps_per_epoch} steps = {warmup}")
        raise InputError(f"the warm-up ({source}) is not shorter than the run ({total} steps), "
                         "so the cosine decay would never start; lower warmup_steps "
                         "(--warmup-steps) / warmup_epochs or run more steps (--steps)")

    ft = build_finetune(config, bb, num_classes, total, warmup, steps_per_epoch)
    state, schedule, commit, shard = ft.state, ft.schedule, ft.commit, ft.shard
    train_step, eval_step = ft.train_step, ft.eval_step
    # Preprocessed before anything is written, so a bad image size leaves the workdir untouched.
    try:
        train_images = _Images(bb, labelled.images, stored)
    except InputError as e:  # e.g. ViT-S/16 refuses a size that is no multiple of 16
        if stored == s:
            raise
        raise InputError(f"crop_from 'stored' normalises the {stored} px images as stored, "
                         f"and {e}; use crop_from 'resized'") from None
    test_images = _Images(bb, test.images, s)

    with _claimed(workdir, config, identity):
        mngr = ocp.CheckpointManager(
            (workdir / "checkpoints").absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=config.max_checkpoints, create=True))
        try:
            start = 0
            latest = mngr.latest_step()
            if latest is not None:
                template = state
                saved = _keys_to_data(template)
                abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, saved)
                try:
                    restored = mngr.restore(latest, args=ocp.args.StandardRestore(abstract))
                except Exception as e:  # a damaged checkpoint: orbax says so in many ways
                    why = " ".join(str(e).split())
                    for tail in (" See full TensorStore details", " [tensorstore_spec"):
                        why = why.split(tail)[0]
                    why = why[:200] or type(e).__name__
                    raise InputError(
                        f"checkpoint {latest} in {workdir / 'checkpoints'} cannot be read ({why}); "
                        "move that folder away to resume from the checkpoint before it") from None
                state = commit(_keys_from_data(restored, template))
                start = int(state["step"])
            metrics = MetricsWriter(workdir / "metrics.jsonl")
            metrics.truncate(start)

            aug_key = jax.random.fold_in(jax.random.key(config.seed), 1)

            def eval_state(st):
                """(params, rest) to evaluate: the EMA's where EMA is on."""
                return st["ema"] if config.ema_decay > 0 else (st["params"], st["rest"])

            # Evaluation batches split evenly too (padding rows are masked, so the size is free).
            eval_batch = -(-config.eval_batch_size // config.num_devices) * config.num_devices
            t0 = time.perf_counter()
            ran = seen = 0
            final_acc = None
            step = start
            while step < total:
                if max_steps_this_run is not None and ran >= max_steps_this_run:
                    return {"interrupted": True, "step": step, "resumed_from_step": start}
                idx = order(step)
                key = jax.random.fold_in(aug_key, step)
                state, _ = train_step(state, shard(train_images.take(idx)), shard(train_labels[idx]), key)
                step += 1
                ran += 1
                seen += len(idx)
                evaluate = step == total or evaluate_after(step)
                if step % config.log_every == 0 or evaluate:
                    record = {"step": step,
                              "train_loss": float(state["loss_sum"]) / max(int(state["loss_count"]), 1),
                              "learning_rate": float(schedule(step - 1))}
                    state["loss_sum"] = commit(jnp.zeros((), jnp.float32))
                    state["loss_count"] = commit(jnp.zeros((), jnp.int32))
                    if evaluate:
                        record["eval_accuracy"] = _evaluate(eval_step, *eval_state(state), test_images,
                                                            test_labels, eval_batch, shard)
                        if step == total:
                            final_acc = record["eval_accuracy"]
                    metrics.write(record)
                if step % config.checkpoint_every == 0 or step == total:
                    with _sigint_deferred():  # a save cut short leaves its tmp folder behind
                        mngr.save(step, args=ocp.args.StandardSave(_keys_to_data(state)))
        finally:
            # On Ctrl-C too, the save in flight is waited for: left to the interpreter's exit, its
            # threads fail with tracebacks and leave a tmp folder; finished, the run resumes from it.
            with _sigint_deferred():
                mngr.close()
        elapsed = time.perf_counter() - t0

        if final_acc is None:  # resumed from the final checkpoint
            final_acc = _evaluate(eval_step, *eval_state(state), test_images, test_labels,
                                  eval_batch, shard)
        # The best of the evaluations along the way (every eval_every steps and the last): what the
        # authors' finetuning script reports ("Max accuracy"); final_accuracy is the last.
        evals = [(r["eval_accuracy"], r["step"]) for r in metrics.records() if "eval_accuracy" in r]
        best_acc, best_step = max(evals + [(final_acc, step)], key=lambda e: (e[0], -e[1]))
        summary = {
            "mode": "full",
            "final_accuracy": final_acc,
            "best_accuracy": best_acc,
            "best_step": best_step,
            "step": step,
            "resumed_from_step": start,
            "num_labelled": int(len(sel)),
            "num_pool": n_pool,
            "num_test": int(len(test_labels)),
            "num_classes": num_classes,
            "params_digest": params_digest(eval_state(state)[0]),
            "config": dataclasses.asdict(config),
        }
        if start == total:  # the run had ended: its record keeps where it resumed, if it did
            previous = read_json_object(workdir / "summary.json") or {}
            if previous.get("step") == total and isinstance(previous.get("resumed_from_step"), int):
                summary["resumed_from_step"] = previous["resumed_from_step"]
        _write_summary(workdir, summary)
    if ran:
        summary["images_per_second"] = seen / elapsed
    summary["state"] = state
    summary["notes"] = [n for n in notes if n]
    return summary


def summary_without_state(summary: dict) -> dict[str, Any]:
    """The summary as written to summary.json (drops the in-memory state, timing and notes)."""
    return {k: v for k, v in summary.items() if k not in ("state", "images_per_second", "notes")}


__all__ = ["Config", "MODES", "make_config", "params_digest", "train_and_evaluate"]
