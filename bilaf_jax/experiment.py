"""The end-to-end benchmark behind `bilaf run`: features -> selections -> evaluations -> report.

`run_experiment(config, workdir)` for a `RunConfig`:

1. Features: the pool (the FIRST `pool_size` train images of the data set, in its row order,
   which is also the pool of `train`'s full finetuning) and the test images are embedded once
   with the backbone (`bilaf_jax.extract.extract_to_file`, resumable per batch) into
   `features/pool.npz`, `features/test.npz`.
   With `selection_dim`, selection runs on the rank-`selection_dim` projection of the pool
   features onto their top right singular vectors (no centring: inner products and Euclidean
   distances are kept up to the discarded energy, which is reported); evaluations always use
   the full features. Saved once in `features/selection.npz`.
2. Selections: every method x budget x seed (`jax.random.key(seed)`), each cached as
   `selections/<method>/b<budget>_s<seed>.json`. BiLAF's ActiveFT cores (K = `num_cores`, the
   same for all budgets, re-drawn per seed) are computed once per seed
   (`selections/cores/activeft_k<K>_s<seed>.json`) and are exactly those
   `pipeline.select(key, ..., method="bilaf")` draws.
3. Evaluations: linear probe and weighted k-NN on the cached features (train.linear_probe,
   train.knn_eval), or full finetuning (train.train_and_evaluate), each record cached as
   `evals/<eval>/<method>_b<budget>_s<seed>.json`.
4. Report: `results.json`, `results.md`, `accuracy_vs_budget.png`, and `pca_map.png` of the
   first BiLAF method's selection at the middle budget for the first seed, where it succeeded.

Every file is written atomically; a killed run started again reuses every finished piece, and
its `results.json` records equal those of an uninterrupted run (selection_seconds is the time
measured when the selection was made, stored with it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import io
import json
import math
import os
import platform
import sys
import time
import warnings
import zipfile
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import numpy as np

from bilaf_jax.io import (
    InputError,
    arrays_sha256,
    check_identity,
    exclusive_lock,
    indices_sha256,
    read_json_object,
    save_npz_atomic,
    sha256_file,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)

METHODS = ("random", "kcenter", "kmeans", "activeft", "bilaf-paper", "bilaf-official")
EVALS = ("linear", "knn", "full")
EVAL_TITLES = {"linear": "Linear probe on frozen features",
               "knn": "Weighted k-NN on frozen features (k = 20, cosine, as DINO)",
               "full": "Full finetuning of the backbone"}
FORMAT = 1

LOCK_NAME = ".lock"  # held by the run working in a workdir

# Fields that do not change any cached piece: a resumed run may change them.
_NOT_IDENTITY = ("name", "methods", "budget_fractions", "seeds", "evals", "notes", "data_dir",
                 "extract_batch_size")


class RunConfig(NamedTuple):
    """What `bilaf run` does. Defaults = the `default` config (see `bilaf_jax.run_configs`)."""

    name: str = "default"
    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    pool_size: int | None = 10_000  # the pool = the first pool_size train images (None: all)
    test_size: int | None = None  # the first test_size test images (None: all)
    backbone: str = "efficientnet_lite0_taps"
    weights: str | None = None  # None: the backbone's default file; "random"; or a path
    image_size: int = 48
    extract_batch_size: int = 256
    selection_dim: int | None = 256  # rank of the projection used for selection (None: raw)
    methods: tuple = METHODS
    budget_fractions: tuple = (0.01, 0.02, 0.05)
    seeds: tuple = (0, 1, 2, 3, 4)
    num_cores: int = 20  # K of BiLAF, fixed across budgets
    activeft_steps: int = 300
    activeft_batch_size: int | None = None  # None: full-batch steps
    remove_fraction: float = 0.1  # P_rm of the boundary stage
    evals: tuple = ("linear", "knn")
    finetune: dict | None = None  # overrides of train.make_config for the "full" evaluation
    finetune_backbone: str = "efficientnet_lite0"
    notes: str = ""


class Job(NamedTuple):
    method: str
    budget: int
    seed: int


class Interrupted(Exception):
    """Raised by `run_experiment(..., stop_after=N)` after N new pieces (as if killed there)."""


# ----------------------------------------------------------------------------- validation


def budgets_for(config: RunConfig, pool_size: int) -> list[int]:
    """Budgets in samples: floor(fraction * pool size), at least 1, as `bilaf select --budget
    1%` and the paper (1% of ImageNet's 1,281,167 is 12,811). The fraction is taken as written
    (0.29 of 100 is 29, not floor(28.999999999999996))."""
    return [max(1, math.floor(Fraction(str(f)) * pool_size)) for f in config.budget_fractions]


def validate(config: RunConfig) -> RunConfig:
    """Raise InputError (one line) for settings that cannot run.

    Returns `config` as the run uses it: lists as tuples, paths as str, NumPy scalars as Python
    numbers (a .py config file may give any of these; results.json and run.json need JSON types,
    and their identity is the same either way).
    """
    from bilaf_jax import backbones, data

    if not isinstance(config.name, str):
        raise InputError(f"run config: name must be a string, got {config.name!r}")

    def fail(message):
        raise InputError(f"run config {config.name}: {message}")

    def integer(value):
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    def number(value):
        return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)

    changes = {}

    def positive_int(name, allow_none=False):
        value = getattr(config, name)
        if value is None and allow_none:
            return
        if not integer(value) or value < 1:
            fail(f"{name} must be a positive integer{' or None' if allow_none else ''}, "
                 f"got {value!r}")
        changes[name] = int(value)

    def distinct(name, ok, what):
        value = getattr(config, name)
        # Element checks come first: set() of unhashable elements would raise TypeError.
        if (not isinstance(value, (list, tuple)) or not value or not all(ok(v) for v in value)
                or len(set(value)) != len(value)):
            fail(f"{name} must be a non-empty list of distinct {what}, got {value!r}")
        return value

    for name in ("dataset", "backbone", "finetune_backbone", "notes"):
        if not isinstance(getattr(config, name), str):
            fail(f"{name} must be a string, got {getattr(config, name)!r}")
    if config.dataset not in data.DATASETS:
        fail(f"unknown dataset {config.dataset!r}")
    if config.backbone not in backbones.BACKBONES:
        fail(f"unknown backbone {config.backbone!r}")
    for name in ("data_dir", "weights"):
        value = getattr(config, name)
        if isinstance(value, os.PathLike):
            changes[name] = value = os.fspath(value)
        if value is not None and not isinstance(value, str):
            fail(f"{name} must be a path (string) or None, got {value!r}")
    for name in ("pool_size", "test_size", "selection_dim", "activeft_batch_size"):
        positive_int(name, allow_none=True)
    for name in ("image_size", "extract_batch_size", "num_cores", "activeft_steps"):
        positive_int(name)
    changes["methods"] = tuple(distinct(
        "methods", lambda m: isinstance(m, str) and m in METHODS, f"names from {', '.join(METHODS)}"))
    changes["evals"] = tuple(distinct(
        "evals", lambda e: isinstance(e, str) and e in EVALS, f"names from {', '.join(EVALS)}"))
    # JAX keeps 32 bits of an integer seed: 2**32 would repeat seed 0.
    seeds = distinct("seeds", lambda s: integer(s) and 0 <= s < 2**32, "integers in [0, 2**32)")
    changes["seeds"] = tuple(int(s) for s in seeds)
    fractions = distinct("budget_fractions", lambda f: number(f) and 0 < f <= 1,
                         "numbers in (0, 1]")
    changes["budget_fractions"] = tuple(_as_written(f) for f in fractions)
    if not number(config.remove_fraction) or not 0 <= config.remove_fraction < 1:
        fail(f"remove_fraction must be a number in [0, 1), got {config.remove_fraction!r}")
    changes["remove_fraction"] = _as_written(config.remove_fraction)
    if config.finetune is not None:
        if not isinstance(config.finetune, dict) or not all(isinstance(k, str) for k in config.finetune):
            fail(f"finetune must be a dict of train settings or None, got {config.finetune!r}")
        # The run sets these per evaluation (finetune_config); given here, they would be
        # overwritten without a word.
        owned = sorted(set(config.finetune) & set(FINETUNE_SET_BY_RUN))
        if owned:
            fail(f"finetune sets {', '.join(owned)}, which the run sets itself ("
                 + "; ".join(f"{k}: {FINETUNE_SET_BY_RUN[k]}" for k in owned) + ")")
        try:  # it is part of the identity in run.json
            json.dumps(config.finetune, allow_nan=False)
        except (TypeError, ValueError) as e:
            fail(f"finetune must hold plain values (numbers, strings, lists): {e}")
    config = config._replace(**changes)
    if config.pool_size is not None:
        check_budgets(config, config.pool_size)
    if "full" in config.evals:  # now, not when the first finetuning starts hours later
        try:
            finetune_config(config, Path("selection.json"), config.seeds[0], config.pool_size)
        except (TypeError, ValueError) as e:
            fail(f"finetune: {' '.join(str(e).split())}")
    return config


def _as_written(value) -> float:
    """A Python float of the decimal a number prints as: np.float32(0.01) is 0.01, not
    0.009999999776482582 (which would make 1% of 10,000 a budget of 99)."""
    return float(np.format_float_positional(np.asarray(value)[()], unique=True, trim="0"))


# Train images of the data sets whose size is fixed (image folders: known after reading).
TRAIN_SIZES = {"fashion_mnist": 60_000, "mnist_5k": 4_000, "cifar10": 50_000, "cifar100": 50_000,
               "imagenet2012": 1_281_167}


def check_pool_size(config: RunConfig, available: int) -> None:
    """Refuse a pool_size beyond the data's train images: the budgets, K's check and the report
    would be of a pool that is not there."""
    if config.pool_size is not None and config.pool_size > available:
        raise InputError(f"run config {config.name}: pool_size {config.pool_size} exceeds the "
                         f"{available} train images of {config.dataset}; lower it or use None "
                         "(every image)")


def check_budgets(config: RunConfig, pool_size: int) -> list[int]:
    budgets = budgets_for(config, pool_size)
    if len(set(budgets)) != len(budgets):
        raise InputError(f"run config {config.name}: budgets {budgets} repeat for a pool of {pool_size}")
    if any(b > pool_size for b in budgets):
        raise InputError(f"run config {config.name}: budget above the pool size {pool_size}")
    if any(m.startswith("bilaf") for m in config.methods) and config.num_cores > min(budgets):
        raise InputError(f"run config {config.name}: num_cores K = {config.num_cores} exceeds the "
                         f"smallest budget {min(budgets)}")
    batch = config.activeft_batch_size
    if (batch is not None and batch > pool_size
            and any(m == "activeft" or m.startswith("bilaf") for m in config.methods)):
        # ActiveFT refuses it, but only at its first selection, after the features are made
        raise InputError(f"run config {config.name}: activeft_batch_size {batch} exceeds the pool "
                         f"size {pool_size}; lower it or use None (full-batch steps)")
    return budgets


# train Config keys that `finetune_config` sets from the run config, and from where.
FINETUNE_SET_BY_RUN = {
    "mode": "full, the evaluation's", "dataset": "the run's dataset",
    "data_dir": "the run's data_dir", "selection": "each selection's file",
    "pool_size": "the pool's", "seed": "each selection's seed",
    "backbone": "set finetune_backbone", "backbone_weights": "the run's weights",
}


def finetune_config(config: RunConfig, selection_path, seed: int, pool_size: int | None):
    """train's Config for the full finetuning of one selection (raises ValueError if invalid)."""
    from train.train import make_config

    overrides = dict(config.finetune or {})
    overrides.update(mode="full", dataset=config.dataset, data_dir=config.data_dir,
                     selection=str(selection_path), pool_size=pool_size, seed=seed,
                     backbone=config.finetune_backbone, backbone_weights=config.weights)
    overrides.setdefault("image_size", config.image_size)
    overrides.setdefault("test_size", config.test_size)
    return make_config(**overrides)


def weights_id(backbone: str, weights: str | None) -> str | None:
    """The weights as a run's identity knows them: None for the backbone's default file (also
    when given by path), "random", or "sha256:<hex>" of the file, so that the same file named
    by another path is the same run. Raises InputError for a missing file."""
    from bilaf_jax.backbones import _weights_path

    if weights is None or weights == "random":
        return weights
    sha = sha256_file(_weights_path(backbone, weights))
    try:
        default = _weights_path(backbone, None)
    except InputError:
        default = None
    return None if default is not None and sha256_file(default) == sha else f"sha256:{sha}"


def identity(config: RunConfig) -> dict:
    ident = {k: v for k, v in config._asdict().items() if k not in _NOT_IDENTITY}
    ident["weights"] = _weights_id_once(config.backbone, config.weights)
    ident["format"] = FORMAT
    return json.loads(json.dumps(ident))


@functools.lru_cache(maxsize=16)
def _weights_id_once(backbone: str, weights: str | None) -> str | None:
    return weights_id(backbone, weights)  # hashes the file: once per process


# What a selection (or BiLAF's cores) depends on besides method, budget and seed: the pool and
# its selection features, and the method's own settings.
_POOL_SETTINGS = ("dataset", "pool_size", "backbone", "weights", "image_size", "selection_dim",
                  "format")
_METHOD_SETTINGS = {"activeft": ("activeft_steps", "activeft_batch_size"),
                    "cores": ("activeft_steps", "activeft_batch_size", "num_cores"),
                    "bilaf": ("activeft_steps", "activeft_batch_size", "num_cores",
                              "remove_fraction")}


def selection_settings(config: RunConfig, method: str) -> dict:
    """The settings a cached selection record of `method` ("cores": BiLAF's cores) was made
    with: records copied in from another workdir are checked against them."""
    ident = identity(config)
    keys = _POOL_SETTINGS + _METHOD_SETTINGS.get(method.split("-")[0], ())
    return {k: ident[k] for k in keys}


def _check_made_with(path: Path, rec: dict, settings: dict) -> None:
    made = rec.get("made_with")
    if made == settings:
        return
    if not isinstance(made, dict):
        why = "records no settings (an earlier version made it)"
    else:
        why = "was made with " + ", ".join(
            f"{k} {made.get(k)!r} (this run: {settings.get(k)!r})"
            for k in sorted(set(made) | set(settings)) if made.get(k) != settings.get(k))
    raise InputError(f"{path} {why}; remove it (or the selections folder) to make it again "
                     "with this run's settings")


def _check_workdir_makeable(workdir: Path) -> None:
    """What `_make_workdir` would refuse, without creating anything (for the dry run)."""
    if workdir.exists() and not workdir.is_dir():
        raise InputError(f"workdir {workdir} exists and is not a folder")
    if workdir.is_dir():
        if not os.access(workdir, os.W_OK | os.X_OK):
            raise InputError(f"workdir {workdir} is not writable")
        return
    parent = workdir.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"cannot create workdir {workdir}: {os.strerror(errno.ENOTDIR)}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot create workdir {workdir}: {os.strerror(errno.EACCES)}")


def _make_workdir(workdir: Path) -> None:
    _check_workdir_makeable(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create workdir {workdir}: {e.strerror or e}") from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise InputError(f"workdir {workdir} is not writable")


def _check_workdir(workdir: Path, config: RunConfig) -> None:
    _make_workdir(workdir)
    path = workdir / "run.json"
    ident = identity(config)
    if path.exists():
        try:
            check_identity(path, ident, workdir)
            return
        except InputError:
            if _holds_pieces(workdir):
                raise
        # Nothing was made under those settings (say, a run that stopped at a mistyped
        # --weights), so there is nothing to protect: this run takes the workdir over.
    _check_features_present(config, workdir)  # features copied in: this config's, before it claims them
    _check_selections_present(config, workdir)  # and selections
    write_json_atomic(path, {"identity": ident, "config": config._asdict(),
                             "created": _utc_now()}, indent=1)


def preflight(config: RunConfig, workdir) -> None:
    """What `bilaf run --dry-run` checks without writing anything: the weight file, the data
    folder where the run would read it (to extract features not yet in `workdir`, or to
    finetune), and that `workdir` could be made and written and would take this config (its
    run.json, and any features and selections in it)."""
    from bilaf_jax import data
    from bilaf_jax.backbones import _weights_path

    if config.weights != "random":
        _weights_path(config.backbone, config.weights)
    workdir = Path(workdir).expanduser()
    extracted = all(p.exists() for p in _feature_paths(workdir).values())
    raw = data.raw_data_dir(config.dataset, config.data_dir)
    if raw is not None and not raw.is_dir() and (not extracted or "full" in config.evals):
        raise InputError(f"data folder not found: {raw}")
    _check_workdir_makeable(workdir)
    if (workdir / "run.json").exists() and _holds_pieces(workdir):
        check_identity(workdir / "run.json", identity(config), workdir)
    _check_features_present(config, workdir)
    _check_selections_present(config, workdir)


def _check_selections_present(config: RunConfig, workdir: Path) -> None:
    """Refuse selection and core records (copied in, or left by another config) that this
    config would reuse but were made with other settings. Unreadable ones are left to be made
    again."""
    folder = workdir / "selections"
    paths = [(p, m) for m in config.methods if (folder / m).is_dir()
             for p in sorted((folder / m).glob("b*_s*.json")) if not p.name.endswith(".indices.json")]
    paths += [(p, "cores") for p in sorted((folder / "cores").glob(f"activeft_k{config.num_cores}_s*.json"))]
    for path, method in paths:
        rec = _json_or_none(path)
        if isinstance(rec, dict):
            _check_made_with(path, rec, selection_settings(config, method))


def _holds_pieces(workdir: Path) -> bool:
    """Whether `workdir` holds any file but run.json (cached pieces, reports, the user's own
    files), not counting temporary files of atomic writes or an extraction's settings file
    before its first batch."""
    for p in workdir.rglob("*"):
        if p in (workdir / "run.json", workdir / LOCK_NAME) or p.is_dir():
            continue
        if p.name.startswith(".") and p.name.endswith((".tmp", ".lock")):
            continue  # an extraction's lock stays behind when it is stopped before a batch
        if p.name == "config.json" and p.parent.name.endswith(".partial"):
            continue
        return True
    return False


def _utc_now(ts: float | None = None) -> str:
    import datetime

    when = datetime.datetime.fromtimestamp(time.time() if ts is None else ts, datetime.timezone.utc)
    return when.strftime("%Y-%m-%d %H:%M")


def _started(workdir: Path) -> str:
    """When this workdir's run was first started (run.json's creation)."""
    path = workdir / "run.json"
    try:
        return json.loads(path.read_text()).get("created") or _utc_now(path.stat().st_mtime)
    except (OSError, ValueError, AttributeError):
        return _utc_now()


# ----------------------------------------------------------------------------- progress


def _bar(total, desc, progress):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not progress,
                dynamic_ncols=True, leave=True)


class _Counter:
    """Counts newly computed pieces; raises Interrupted after `stop_after` of them."""

    def __init__(self, stop_after):
        self.stop_after = stop_after
        self.done = 0

    def tick(self):
        self.done += 1
        if self.stop_after is not None and self.done >= self.stop_after:
            raise Interrupted(f"stopped after {self.done} new pieces")


# ----------------------------------------------------------------------------- stage 1: features


class Features(NamedTuple):
    pool: np.ndarray  # [n, d] evaluation features
    pool_labels: np.ndarray  # int32[n] (never used for selection)
    test: np.ndarray  # [m, d]
    test_labels: np.ndarray  # int32[m]
    selection: np.ndarray  # [n, r] features the selectors see
    retained_energy: float  # share of sum ||x||^2 kept by the projection (1.0 without)
    meta: dict


def _damaged(path: Path, why: str) -> InputError:
    return InputError(f"{path} is damaged ({why}); delete it and run again to make it anew")


def _read_npz(path: Path, keys=("features", "labels")) -> dict:
    """A cached .npz of this run. Atomic writes never leave a partial one, so a bad one was
    damaged from outside: a one-line error (features can take hours to make again)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise _damaged(path, (str(e).splitlines() or [type(e).__name__])[0]) from None
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise _damaged(path, f"no array {missing[0]!r}")
    if "labels" in keys and (arrays["features"].ndim != 2 or arrays["labels"].shape
                             != arrays["features"].shape[:1]):
        raise _damaged(path, f"features {arrays['features'].shape}, labels "
                             f"{arrays['labels'].shape}")
    return arrays


def project(features: np.ndarray, rank: int) -> tuple[np.ndarray, float]:
    """Rows of features [n, d] in the basis of their top-`rank` right singular vectors [n, r].

    No centring, so inner products and distances are kept up to the discarded energy. Returns
    (projected float32 [n, r], retained share of the squared Frobenius norm). Deterministic
    signs (largest component of each vector positive).
    """
    x = np.asarray(features, np.float32)
    if rank >= x.shape[1]:
        return x, 1.0
    gram = (x.T @ x).astype(np.float64)  # [d, d]
    evals, evecs = np.linalg.eigh(gram)
    order = np.argsort(evals)[::-1][:rank]
    v = evecs[:, order]
    v *= np.sign(v[np.argmax(np.abs(v), axis=0), np.arange(rank)])
    kept = float(evals[order].sum() / max(evals.sum(), 1e-300))
    return x @ v.astype(np.float32), kept


def load_or_extract_features(config: RunConfig, workdir: Path, *, progress=True, counter=None,
                             backbone=None) -> Features:
    """Embed (or reuse) the pool and test images; returns Features."""
    from bilaf_jax import data
    from bilaf_jax.extract import extract_to_file, read_meta

    folder = workdir / "features"
    paths = _feature_paths(workdir)
    if not paths["pool"].exists() and config.pool_size is not None:
        # before extracting (features made elsewhere, or injected, are taken as they are)
        check_pool_size(config, len(data.data_source(config.dataset, "train",
                                                     data_dir=config.data_dir)))
    folder.mkdir(exist_ok=True)
    limits = {"pool": config.pool_size, "test": config.test_size}
    splits = {"pool": "train", "test": data.eval_split(config.dataset)}
    if not all(p.exists() for p in paths.values()):
        from bilaf_jax import backbones

        bb = backbone
        if bb is None:
            bb = backbones.load(config.backbone, config.weights)
        for part in ("pool", "test"):
            if paths[part].exists():
                continue
            on_batch = (lambda b: counter.tick()) if counter is not None else None
            extract_to_file(paths[part], dataset=config.dataset, split=splits[part], backbone=bb,
                            image_size=config.image_size, limit=limits[part],
                            batch_size=config.extract_batch_size, data_dir=config.data_dir,
                            progress=progress, on_batch=on_batch)
    pool, test = _read_npz(paths["pool"]), _read_npz(paths["test"])
    if test["features"].shape[1] != pool["features"].shape[1]:
        raise _damaged(paths["test"], f"{test['features'].shape[1]}-d features, the pool's are "
                                      f"{pool['features'].shape[1]}-d")
    meta = read_meta(paths["pool"])
    for part in ("pool", "test"):
        _check_feature_meta(config, paths[part], part)
    sel_path = folder / "selection.npz"
    if config.selection_dim is None or config.selection_dim >= pool["features"].shape[1]:
        selection, kept = pool["features"], 1.0
    else:
        selection, kept = _projection(sel_path, pool["features"], config.selection_dim)
    return Features(pool["features"], pool["labels"].astype(np.int32), test["features"],
                    test["labels"].astype(np.int32), selection, kept, meta)


def _projection(path: Path, pool: np.ndarray, rank: int) -> tuple[np.ndarray, float]:
    """`project(pool, rank)`, cached in `path` with the hash of the pool it was made from: a
    pool extracted again (other features) is projected again, not paired with the old one."""
    made_from = arrays_sha256(pool)
    if path.exists():
        z = _read_npz(path, keys=("features", "retained_energy"))
        selection, kept = z["features"], z["retained_energy"]
        want = (pool.shape[0], rank)
        if selection.shape != want or kept.shape != () or kept.dtype.kind != "f":
            raise _damaged(path, f"features {selection.shape}, expected {want}")
        if str(z.get("pool_sha256", "")) == made_from:
            return selection, float(kept)
        sys.stderr.write(f"bilaf run: note: {path} was made from other pool features (or by "
                         "an earlier version of bilaf_jax, which did not record them); "
                         "projecting them again\n")
    selection, kept = project(pool, rank)
    save_npz_atomic(path, features=selection, retained_energy=np.asarray(kept),
                    pool_sha256=np.asarray(made_from))
    return selection, kept


def expected_feature_meta(config: RunConfig, part: str) -> dict:
    """What the `meta` of this run's feature file `part` ("pool" or "test") must say: data set,
    split, size limit, backbone, image size, preprocessing (resize, mean, std), weights
    (sha256, or "random(seed=0)") and, where the data is on this machine, its fingerprint."""
    return _expected_feature_meta(config, part)[0]


def _expected_feature_meta(config: RunConfig, part: str) -> tuple[dict, int | None]:
    """(`expected_feature_meta`, the split's size where its data is here, else None)."""
    from bilaf_jax import data
    from bilaf_jax.backbones import _weights_path, preprocessing

    split = "train" if part == "pool" else data.eval_split(config.dataset)
    want = {"dataset": config.dataset, "split": split,
            "limit": config.pool_size if part == "pool" else config.test_size,
            "backbone": config.backbone, "image_size": config.image_size,
            **preprocessing(config.backbone)}
    if config.weights == "random":
        want["weights_sha256"] = "random(seed=0)"
    else:
        want["weights_sha256"] = sha256_file(_weights_path(config.backbone, config.weights))
    try:  # where the data is here, it must be the data the features were made from
        source = data.data_source(config.dataset, split, data_dir=config.data_dir)
    except InputError:
        return want, None
    want["source"] = source.fingerprint
    if source.class_names is not None:  # an image folder's fingerprint covers its images only:
        want["class_names"] = list(source.class_names)  # an empty class folder shifts labels
    return want, len(source)


def _feature_paths(workdir: Path) -> dict[str, Path]:
    """Where a run keeps its pool and test features: {"pool": ..., "test": ...}."""
    return {part: workdir / "features" / f"{part}.npz" for part in ("pool", "test")}


def _check_features_present(config: RunConfig, workdir: Path) -> None:
    for part, path in _feature_paths(workdir).items():
        if path.exists():
            _check_feature_meta(config, path, part)


def _check_feature_meta(config: RunConfig, path: Path, part: str) -> None:
    """Refuse a feature file (cached, or copied in by hand) that another config made."""
    from bilaf_jax.extract import read_meta, same_rows

    _read_npz(path, keys=("labels",))  # a damaged file says so first
    meta = read_meta(path)
    want, total = _expected_feature_meta(config, part)
    for key, value in want.items():
        # a limit at or above the split's size is the whole split, as no limit is
        same = same_rows(meta, value, total) if key == "limit" else meta.get(key) == value
        if not same:
            why = (" (the backbone's preprocessing; an earlier version of bilaf_jax made them)"
                   if key in ("resize", "mean", "std") else "")
            raise InputError(f"{path} was made with {key} {meta.get(key)!r}, but this run's "
                             f"config asks for {value!r}{why}; move {path.parent} away to "
                             "extract the features again")


# ----------------------------------------------------------------------------- stage 2: selections


def _selection_path(workdir: Path, job: Job) -> Path:
    return workdir / "selections" / job.method / f"b{job.budget}_s{job.seed}.json"


def _cores_path(workdir: Path, config: RunConfig, seed: int) -> Path:
    return workdir / "selections" / "cores" / f"activeft_k{config.num_cores}_s{seed}.json"


def _read_record(path: Path, valid) -> dict | None:
    """A cached JSON record, or None to compute it (again).

    Atomic writes never leave a partial record, so one that does not parse or fails `valid`
    was damaged from outside; records are cheap to make again (the same, from the same seed),
    so it is remade, and said on stderr.
    """
    try:
        rec = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        rec = None
    if isinstance(rec, dict) and valid(rec):
        return rec
    sys.stderr.write(f"bilaf run: {path} is damaged; making it again\n")
    return None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_indices(v, n: int) -> bool:
    return isinstance(v, list) and all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in v)


def _is_for(rec: dict, job: Job) -> bool:
    return (rec.get("method"), rec.get("budget"), rec.get("seed")) == tuple(job)


def _core_options(config: RunConfig) -> dict:
    opts = {"num_steps": config.activeft_steps}
    if config.activeft_batch_size is not None:
        opts["batch_size"] = config.activeft_batch_size
    return opts


def _bilaf_cores(config: RunConfig, workdir: Path, features: np.ndarray, seed: int, counter,
                 made_from: str, remade: list):
    """ActiveFT cores of `seed` (cached): the cores select(key, ..., method='bilaf') draws.
    made_from: `arrays_sha256(features)`; a record of other features is made again (its path
    appended to `remade`)."""
    import jax

    from bilaf_jax.pipeline import select

    path = _cores_path(workdir, config, seed)
    n = len(features)
    settings = selection_settings(config, "cores")
    cached = _read_record(path, lambda r: _is_indices(r.get("indices"), n)
                          and len(r["indices"]) == config.num_cores and _is_number(r.get("seconds")))
    if cached is not None:
        _check_made_with(path, cached, settings)
        if cached.get("features_sha256") == made_from:
            return cached
        remade.append(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # select()'s bilaf path runs the core selector with the first half of split(key); so does
    # select(method="activeft") with the same options, so these are the same cores.
    out = select(jax.random.key(seed), features, config.num_cores, method="activeft",
                 core_options=_core_options(config))
    indices = np.sort(np.asarray(out.indices)).tolist()
    rec = {"indices": indices, "seconds": time.perf_counter() - t0, "made_with": settings,
           "features_sha256": made_from}
    write_json_atomic(path, rec)
    counter.tick()
    return rec


def boundary_from_cores(seed: int, features: np.ndarray, core_indices, budget: int, *, mode: str,
                        remove_fraction: float = 0.1):
    """BiLAF's boundary stage on given cores, with the key and precision `pipeline.select` uses.

    select(jax.random.key(seed), features, budget, method="bilaf", num_cores=K, mode=mode)
    equals running the core stage then this (tests check it).
    """
    import jax
    import jax.numpy as jnp

    from bilaf_jax.boundary import bilaf

    _, boundary_key = jax.random.split(jax.random.key(seed))
    cores = np.sort(np.asarray(core_indices))
    kwargs = dict(mode=mode, remove_fraction=remove_fraction)
    if mode == "official":
        with jax.enable_x64(True):
            return bilaf(boundary_key, jnp.asarray(features, jnp.float64), cores, budget, **kwargs)
    return bilaf(boundary_key, features, cores, budget, **kwargs)


def _valid_selection(rec: dict, job: Job, n: int) -> bool:
    if not _is_for(rec, job):
        return False
    if "error" in rec:
        return isinstance(rec["error"], str)
    if job.method.startswith("bilaf") and not _is_indices(rec.get("core_indices"), n):
        return False
    return _is_indices(rec.get("indices"), n) and _is_number(rec.get("seconds"))


def run_selection(config: RunConfig, workdir: Path, features: np.ndarray, job: Job, counter,
                  made_from: str, remade: list) -> dict:
    """Compute (or read) one selection record; official mode's failures where the authors'
    script fails are recorded (and reported), any other error stops the run.
    made_from: `arrays_sha256(features)`; a cached record of other features (extracted again),
    or for BiLAF of other cores than its seed's (made again differently), is made again, and
    its path appended to `remade`."""
    import jax

    from bilaf_jax.boundary import ScriptFailure
    from bilaf_jax.pipeline import select

    path = _selection_path(workdir, job)
    settings = selection_settings(config, job.method)
    cached = _read_record(path, lambda r: _valid_selection(r, job, len(features)))
    if cached is not None:
        _check_made_with(path, cached, settings)
        same = cached.get("features_sha256") == made_from
        if same and job.method.startswith("bilaf"):  # every budget and mode of a seed: its cores
            same = cached.get("core_indices") == _bilaf_cores(
                config, workdir, features, job.seed, counter, made_from, remade)["indices"]
        if same:
            return cached
        remade.append(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {"method": job.method, "budget": job.budget, "seed": job.seed, "made_with": settings,
           "features_sha256": made_from}
    caught = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if job.method.startswith("bilaf"):
                cores = _bilaf_cores(config, workdir, features, job.seed, counter, made_from,
                                     remade)
                # recorded before the boundary stage: a failure there is of these cores too
                rec["core_indices"] = cores["indices"]
                rec["core_seconds"] = cores["seconds"]
                t0 = time.perf_counter()
                out = boundary_from_cores(job.seed, features, cores["indices"], job.budget,
                                          mode=job.method.split("-", 1)[1],
                                          remove_fraction=config.remove_fraction)
                indices = np.asarray(out.indices)
                seconds = cores["seconds"] + time.perf_counter() - t0
            else:
                t0 = time.perf_counter()
                opts = _core_options(config) if job.method == "activeft" else None
                out = select(jax.random.key(job.seed), features, job.budget, method=job.method,
                             core_options=opts)
                indices = np.asarray(out.indices)
                seconds = time.perf_counter() - t0
        rec["indices"] = [int(i) for i in indices]
        rec["num_unique"] = int(len(np.unique(indices)))
        rec["seconds"] = seconds
    except ScriptFailure as e:  # official mode where the authors' script would crash
        rec["error"] = " ".join(str(e).split())
    rec["warnings"] = sorted({" ".join(str(w.message).split()) for w in caught})
    write_json_atomic(path, rec)
    counter.tick()
    return rec


# ----------------------------------------------------------------------------- stage 3: evaluations


def _eval_path(workdir: Path, job: Job, ev: str) -> Path:
    return workdir / "evals" / ev / f"{job.method}_b{job.budget}_s{job.seed}.json"


def _json_or_none(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _eval_basis(config: RunConfig, workdir: Path, job: Job, ev: str, selection: dict,
                pool_size: int, features_sha: dict) -> dict:
    """What an evaluation record was computed from: its selection's indices (or failure), for
    the evaluations on features the pool's and test's feature and label hashes
    (`features_sha256`), and for full finetuning the resolved training settings."""
    made_from = json.dumps(selection.get("indices", selection.get("error")))
    basis = {"selection_sha256": hashlib.sha256(made_from.encode()).hexdigest()}
    if ev != "full":
        basis.update(pool_sha256=features_sha["pool"], test_sha256=features_sha["test"],
                     labels_sha256=features_sha["labels"])
    elif "error" not in selection:
        sel_path = _selection_path(workdir, job).with_suffix(".indices.json")
        from train.train import without_later_defaults

        cfg = without_later_defaults(dataclasses.asdict(
            finetune_config(config, sel_path, job.seed, pool_size)))
        basis["finetune"] = json.loads(json.dumps({k: v for k, v in cfg.items()
                                                   if k != "selection"}))
    return basis


def _finetune_result_settings(settings: dict) -> dict:
    """A full finetuning basis's training settings as far as they decide its result: less
    what train's identity leaves out (the data's folder, checkpointing, devices), the weights
    as `weights_id` knows them (the default file, or a copy, named by another path is the same
    run; a file no longer there is compared by its path)."""
    from train.train import _NOT_IDENTITY

    out = {k: v for k, v in settings.items() if k not in _NOT_IDENTITY}
    weights = out.get("backbone_weights")
    if isinstance(weights, str) and weights != "random" and isinstance(out.get("backbone"), str):
        with contextlib.suppress(InputError, OSError):
            out["backbone_weights"] = _weights_id_once(out["backbone"], weights)
    return out


def _same_basis(cached, basis: dict) -> bool:
    """Whether a cached evaluation record's basis is `basis`; full finetuning's settings are
    compared by `_finetune_result_settings`, so that its hours are not spent again on a moved
    data folder or weights named by another path."""
    if not (isinstance(cached, dict) and isinstance(cached.get("finetune"), dict)
            and "finetune" in basis):
        return cached == basis
    return ({**cached, "finetune": _finetune_result_settings(cached["finetune"])}
            == {**basis, "finetune": _finetune_result_settings(basis["finetune"])})


def _set_aside_other_selections_finetuning(folder: Path, sel_path: Path) -> None:
    """Move the finetuning run in `folder` aside if it trained on another selection than the
    one in `sel_path` (this job's selection, made again differently): train would refuse the
    folder, and this evaluation is being made again. Kept, not removed: it may hold hours of
    training."""
    ident = (read_json_object(folder / "config.json") or {}).get("identity")
    ident = ident if isinstance(ident, dict) else {}
    if "selection_indices_sha256" in ident:  # train records the list's digest
        old, ours = ident["selection_indices_sha256"], indices_sha256(_json_or_none(sel_path))
    else:  # an earlier version recorded the file's
        old, ours = ident.get("selection_sha256"), sha256_file(sel_path)
    if not isinstance(old, str) or old == ours:
        return  # ours (resumed), or nothing train could tell: left to train
    aside = folder.with_name(f"{folder.name}.selection-{old[:12]}")
    for i in range(1, 1000):
        if not aside.exists():
            break
        aside = folder.with_name(f"{folder.name}.selection-{old[:12]}.{i}")
    folder.rename(aside)  # one step: a kill leaves the run here or there, never half of it
    sys.stderr.write(f"bilaf run: note: {folder} finetuned another selection; moved it to "
                     f"{aside.name}\n")


def run_evaluation(config: RunConfig, workdir: Path, feats: Features, job: Job, ev: str,
                   selection: dict, counter, num_classes: int, features_sha: dict,
                   remade: list) -> dict:
    """Compute (or read) one evaluation record. features_sha: `features_sha256(feats)`; a
    cached record of another selection, other features or labels, or other finetuning settings
    is made again, and its path appended to `remade`."""
    path = _eval_path(workdir, job, ev)
    basis = _eval_basis(config, workdir, job, ev, selection, len(feats.pool_labels), features_sha)
    cached = _read_record(path, lambda r: _is_for(r, job) and r.get("eval") == ev
                          and (r.get("accuracy") is None or _is_number(r["accuracy"]))
                          and (r.get("selection_seconds") is None
                               or _is_number(r["selection_seconds"])))
    if cached is not None and _same_basis(cached.get("basis"), basis):
        return cached
    if cached is not None:
        remade.append(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {"method": job.method, "budget": job.budget, "seed": job.seed, "eval": ev,
           "accuracy": None, "selection_seconds": selection.get("seconds"), "basis": basis}
    if "error" in selection:
        rec["error"] = "selection failed: " + selection["error"]
    else:
        # each selected sample is labelled once, whatever the evaluation (official mode can
        # repeat samples)
        idx = np.asarray(selection["indices"], np.int64)
        idx = idx[np.sort(np.unique(idx, return_index=True)[1])]  # first occurrences, in order
        rec["num_labelled"] = int(len(idx))
        t0 = time.perf_counter()
        if ev == "linear":
            from train import linear_probe

            acc = linear_probe(feats.pool[idx], feats.pool_labels[idx], feats.test,
                               feats.test_labels, num_classes=num_classes)
        elif ev == "knn":
            from train import knn_eval

            acc = knn_eval(feats.pool[idx], feats.pool_labels[idx], feats.test, feats.test_labels,
                           num_classes=num_classes)
        else:
            from train.train import train_and_evaluate

            sel_path = _selection_path(workdir, job).with_suffix(".indices.json")
            labelled = sorted(int(i) for i in idx)
            if _json_or_none(sel_path) != labelled:  # absent, or damaged from outside
                write_json_atomic(sel_path, labelled)
            cfg = finetune_config(config, sel_path, job.seed, len(feats.pool_labels))
            folder = workdir / "finetune" / f"{job.method}_b{job.budget}_s{job.seed}"
            _set_aside_other_selections_finetuning(folder, sel_path)
            summary = train_and_evaluate(cfg, folder)
            acc = summary["final_accuracy"]
            # the best evaluation along the way (eval_every / eval_every_epochs) and its step:
            # what the authors' finetuning script reports; the tables show the final accuracy
            rec["best_accuracy"] = float(summary.get("best_accuracy", acc))
            rec["best_step"] = int(summary.get("best_step", summary["step"]))
        rec["accuracy"] = float(acc)
        rec["eval_seconds"] = time.perf_counter() - t0
    write_json_atomic(path, rec)
    counter.tick()
    return rec


# ----------------------------------------------------------------------------- stage 4: report


def cpu_description() -> str:
    """The CPU model and its widest vector instruction sets, from /proc/cpuinfo ("" where it
    cannot be read). XLA compiles for the host's instruction set, so float results, and with
    them near-tie decisions, can differ between CPU types."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16")
           if f in flags]
    model = fields.get("model name", platform.processor())
    ident = "/".join(fields[k] for k in ("cpu family", "model", "stepping") if k in fields)
    return ", ".join(x for x in (model, ident and f"family/model/stepping {ident}",
                                 " ".join(isa)) if x)


def features_sha256(feats: Features) -> dict:
    """`arrays_sha256` of the pool, test and selection feature arrays, and of the pool and test
    labels ("labels"): tells a rerun whose selections differ whether its features were the
    same, and cached pieces whether they were made from these features (and, evaluations, these
    labels, which the feature hashes do not cover)."""
    pool = arrays_sha256(feats.pool)
    return {"pool": pool, "test": arrays_sha256(feats.test),
            "selection": pool if feats.selection is feats.pool else arrays_sha256(feats.selection),
            "labels": arrays_sha256(feats.pool_labels, feats.test_labels)}


def environment() -> dict:
    import jax

    try:
        import flax

        flax_version = flax.__version__
    except ImportError:  # pragma: no cover
        flax_version = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_description(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "flax": flax_version,
        "numpy": np.__version__,
        "devices": [str(d) for d in jax.devices()],
    }


def summarize(records: list[dict]) -> dict:
    """{(method, budget, eval): (mean, std, count)} over the seeds with an accuracy."""
    groups: dict = {}
    for r in records:
        groups.setdefault((r["method"], r["budget"], r["eval"]), []).append(r["accuracy"])
    out = {}
    for key, accs in groups.items():
        vals = np.asarray([a for a in accs if a is not None], np.float64)
        if len(vals):
            # one seed has no spread to show: NaN (format_cell prints the mean alone)
            out[key] = (float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else math.nan,
                        len(vals))
        else:
            out[key] = (math.nan, math.nan, 0)
    return out


def _or_none(v: float) -> float | None:
    return None if math.isnan(v) else v


def format_cell(mean: float, std: float, count: int, total: int | None = None) -> str:
    """A table cell in %: "mean ± std", the mean alone for one seed, "failed" for none, and
    "(n=count)" where fewer than `total` seeds are in it."""
    if count == 0:
        return "failed"
    cell = f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if count > 1 else "")
    return cell + ("" if total is None or count == total else f" (n={count})")


def _paired(records, method, other, budget, ev):
    a = {r["seed"]: r["accuracy"] for r in records
         if r["method"] == method and r["budget"] == budget and r["eval"] == ev}
    b = {r["seed"]: r["accuracy"] for r in records
         if r["method"] == other and r["budget"] == budget and r["eval"] == ev}
    seeds = sorted(s for s in a if s in b and a[s] is not None and b[s] is not None)
    return np.asarray([a[s] - b[s] for s in seeds], np.float64)


def t_critical(df: int) -> float:
    """Two-sided 5% critical value of Student's t with `df` degrees of freedom."""
    from scipy import stats

    return float(stats.t.ppf(0.975, df))


def verdict(records, method, other, budget, ev) -> str:
    """One honest phrase: mean paired difference, seeds won, and whether a paired t-test over
    the seeds (two-sided, 5%) separates the two methods."""
    d = _paired(records, method, other, budget, ev)
    if not len(d):
        return f"{method} vs {other}: no comparable runs"
    mean = d.mean()
    wins = int((d > 0).sum())
    shown = round(100 * mean, 1) + 0.0  # the words follow the number printed (+ 0.0: no -0.0)
    if len(d) > 1:
        se = d.std(ddof=1) / math.sqrt(len(d))
        clear = abs(mean) > t_critical(len(d) - 1) * se and shown != 0
    else:
        se, clear = math.nan, False
    if shown > 0:
        word = "beats" if clear else "is ahead of"
    elif shown < 0:
        word = "loses to" if clear else "is behind"
    else:
        word = "is level with"
    se_txt = f", s.e. {100 * se:.1f}" if len(d) > 1 else ""
    sig = "" if clear or shown == 0 else f", not significant over {len(d)} seeds"
    return (f"{method} {word} {other} ({shown:+.1f} points{se_txt}; "
            f"ahead on {wins}/{len(d)} seeds{sig})")


def results_markdown(config: RunConfig, records, budgets, meta: dict) -> str:
    stats = summarize(records)
    pool_n = meta["pool_size"]
    lines = [f"# bilaf run: config `{config.name}`", ""]
    lines.append(f"Command: `{meta['command']}`  ")
    lines.append(f"Run started (UTC): {meta['started']}; this report: {meta['date']}; machine: "
                 f"{meta['machine']}  ")
    lines.append(f"Data: {config.dataset}, pool = first {pool_n} train images, "
                 f"{meta['test_size']} test images; backbone {config.backbone} at "
                 f"{config.image_size} px ({meta['feature_dim']}-d features); selection on "
                 + (f"a rank-{config.selection_dim} projection (retained energy "
                    f"{meta['retained_energy']:.4f})" if meta["selection_dim"] else "the raw features")
                 + ".  ")
    if any(m.startswith("bilaf") for m in config.methods):
        lines.append(f"BiLAF: K = {config.num_cores} ActiveFT cores ({config.activeft_steps} "
                     f"steps), fixed across budgets.  ")
    if config.notes:
        lines.append(f"{config.notes}  ")
    lines.append(f"Seeds: {', '.join(str(s) for s in config.seeds)}. Accuracy in %, mean ± "
                 "sample std over seeds.")
    lines.append("")
    for ev in config.evals:
        lines.append(f"## {EVAL_TITLES[ev]} (`{ev}`)")
        lines.append("")
        head = "| method | " + " | ".join(
            f"B = {b} ({100 * b / pool_n:g}%)" for b in budgets) + " | selection s (B = "
        head += f"{budgets[-1]}) |"
        lines.append(head)
        lines.append("|---" * (len(budgets) + 2) + "|")
        for m in config.methods:
            cells = []
            for b in budgets:
                cells.append(format_cell(*stats.get((m, b, ev), (math.nan, math.nan, 0)),
                                         total=len(config.seeds)))
            secs = [r["selection_seconds"] for r in records if r["method"] == m
                    and r["budget"] == budgets[-1] and r["eval"] == ev
                    and r["selection_seconds"] is not None]
            sec = f"{np.median(secs):.1f}" if secs else "-"
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {sec} |")
        lines.append("")
        bilafs = [m for m in config.methods if m.startswith("bilaf")]
        others = [m for m in ("random", "activeft") if m in config.methods]
        if bilafs and others:
            lines.append("Does BiLAF beat random and ActiveFT? (differences paired by seed; "
                         "'beats' / 'loses to' only where a two-sided paired t-test over the "
                         "seeds is significant at 5%, each test on its own: with this many "
                         "comparisons, some at 5% are expected by chance)")
            lines.append("")
            for b in budgets:
                parts = [verdict(records, m, o, b, ev) for m in bilafs for o in others]
                lines.append(f"- B = {b}: " + "; ".join(parts) + ".")
            lines.append("")
    failed = [r for r in records if r.get("error")]
    if failed:
        lines.append("## Failed runs")
        lines.append("")
        seen = set()
        for r in failed:
            key = (r["method"], r["budget"], r["seed"])
            if key not in seen:
                seen.add(key)
                lines.append(f"- {r['method']} B = {r['budget']} seed {r['seed']}: {r['error']}")
        lines.append("")
    short = sorted({(r["method"], r["budget"], r["seed"], r["num_labelled"]) for r in records
                    if r.get("num_labelled") is not None and r["num_labelled"] < r["budget"]})
    if short:
        lines.append("## Selections with repeated samples")
        lines.append("")
        lines.append("Official mode repeats samples where the authors' allocation exceeds a "
                     "denoised class; every evaluation labels each sample once:")
        lines.append("")
        for m, b, seed, k in short:
            lines.append(f"- {m} B = {b} seed {seed}: {k} distinct samples")
        lines.append("")
    lines.append("Median selection time is wall-clock on this machine, including JAX compilation "
                 "where a shape is seen first; bilaf's includes its ActiveFT cores.")
    return "\n".join(lines) + "\n"


def _png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plot_accuracy(config: RunConfig, records, budgets, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = summarize(records)
    fig, axes = plt.subplots(1, len(config.evals), figsize=(5.2 * len(config.evals), 4),
                             squeeze=False)
    for ax, ev in zip(axes[0], config.evals, strict=False):
        for m in config.methods:
            pts = [(b, *stats[(m, b, ev)][:2]) for b in budgets
                   if (m, b, ev) in stats and stats[(m, b, ev)][2] > 0]
            if not pts:
                continue
            b, mean, std = (np.asarray(v) for v in zip(*pts, strict=False))
            std = np.nan_to_num(std)  # one seed: no error bar
            style = "-o" if m.startswith("bilaf") else "--o"
            ax.errorbar(b, 100 * mean, yerr=100 * std, fmt=style, capsize=3, label=m,
                        markersize=4, linewidth=1.5 if m.startswith("bilaf") else 1.0)
        ax.set_xscale("log")
        ax.set_xticks(budgets)
        ax.set_xticklabels([str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("budget (labelled samples)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{config.dataset}: {ev}")
        ax.grid(alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:  # nothing to plot where every run failed
        axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    write_bytes_atomic(path, _png_bytes(fig))
    plt.close(fig)


def plot_pca_map(feats: Features, selection: dict, path: Path, title: str) -> None:
    """2-D PCA of the pool features with one BiLAF selection's cores and boundary picks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.asarray(feats.pool, np.float32)
    x = x - x.mean(0)
    # Top-2 eigenvectors of the covariance (a full SVD of [n, d] is needlessly slow here).
    evals, evecs = np.linalg.eigh((x.T @ x).astype(np.float64))
    top = evecs[:, np.argsort(evals)[::-1][:2]]
    top *= np.sign(top[np.argmax(np.abs(top), axis=0), np.arange(2)])
    xy = x @ top.astype(np.float32)
    fig, ax = plt.subplots(figsize=(7, 6))
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=feats.pool_labels, cmap="tab10", s=3, alpha=0.25,
                    linewidths=0)
    cores = np.asarray(selection.get("core_indices", []), np.int64)
    picks = np.asarray(selection["indices"], np.int64)
    boundary = np.setdiff1d(picks, cores)
    ax.scatter(xy[boundary, 0], xy[boundary, 1], marker="^", s=28, facecolors="none",
               edgecolors="black", linewidths=0.9, label=f"boundary picks ({len(boundary)})")
    ax.scatter(xy[cores, 0], xy[cores, 1], marker="*", s=160, c="red", edgecolors="black",
               linewidths=0.6, label=f"core samples ({len(cores)})")
    ax.set_title(title)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    legend = ax.legend(loc="best", fontsize=8)
    ax.add_artist(legend)
    handles, _ = sc.legend_elements()
    ax.legend(handles, [str(i) for i in range(len(handles))], title="true class",
              loc="lower right", fontsize=7, title_fontsize=7, markerscale=0.8)
    fig.tight_layout()
    write_bytes_atomic(path, _png_bytes(fig))
    plt.close(fig)


# ----------------------------------------------------------------------------- driver


def _readable(folder: Path, names) -> None:
    """Atomic writes create private files; make the report readable like any new file."""
    umask = os.umask(0)
    os.umask(umask)
    for name in names:
        with contextlib.suppress(OSError):
            os.chmod(folder / name, 0o666 & ~umask)


class RunOutput(NamedTuple):
    results: dict  # the content of results.json
    markdown: str  # the content of results.md
    workdir: Path
    written: tuple = ()  # the report files written in workdir


def _say_made_again(paths: list, what: str, why: str) -> None:
    """One note for the cached records of a stage that were made again."""
    if paths:
        one = len(paths) == 1
        shown = ", ".join(str(p) for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
        sys.stderr.write(f"bilaf run: note: {len(paths)} cached {what} record"
                         f"{'' if one else 's'} {'was' if one else 'were'} made from {why} (or "
                         f"by an earlier version of bilaf_jax, which did not record it); made "
                         f"{'it' if one else 'them'} again: {shown}\n")


def plan(config: RunConfig, pool_size: int) -> tuple[list[int], list[Job]]:
    budgets = check_budgets(config, pool_size)
    jobs = [Job(m, b, s) for s in config.seeds for m in config.methods for b in budgets]
    return budgets, jobs


def run_experiment(config: RunConfig, workdir, *, progress: bool = True,
                   stop_after: int | None = None, command: str | None = None,
                   backbone=None) -> RunOutput:
    """Run (or resume) `config` in `workdir`; returns what was written to results.json/.md.

    stop_after: stop (raise Interrupted) after this many newly computed pieces (feature
    batches, cores, selections, evaluations), as if killed there; for tests.
    backbone: a loaded Backbone to use instead of loading `config.backbone` (tests).
    """
    config = validate(config)
    workdir = Path(workdir).expanduser()
    _make_workdir(workdir)
    # Two runs in one workdir would take over each other's run.json and partial files.
    with exclusive_lock(workdir / LOCK_NAME, f"workdir {workdir}"):
        _check_workdir(workdir, config)
        return _run_experiment(config, workdir, progress, stop_after, command, backbone)


def _run_experiment(config, workdir, progress, stop_after, command, backbone) -> RunOutput:
    counter = _Counter(stop_after)
    timing = {}
    t0 = time.perf_counter()
    feats = load_or_extract_features(config, workdir, progress=progress, counter=counter,
                                     backbone=backbone)
    timing["features_seconds"] = time.perf_counter() - t0
    features_sha = features_sha256(feats)
    n = len(feats.pool_labels)
    budgets, jobs = plan(config, n)
    num_classes = int(max(feats.pool_labels.max(), feats.test_labels.max())) + 1

    t1 = time.perf_counter()
    selections, remade = {}, []
    with contextlib.closing(_bar(len(jobs), "select", progress)) as bar:
        for job in jobs:
            bar.set_postfix_str(f"{job.method} B={job.budget} seed={job.seed}", refresh=False)
            selections[job] = run_selection(config, workdir, feats.selection, job, counter,
                                            features_sha["selection"], remade)
            bar.update()
    _say_made_again(remade, "selection", "other features or other cores")
    timing["selection_seconds"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    records, remade = [], []
    with contextlib.closing(_bar(len(jobs) * len(config.evals), "evaluate", progress)) as bar:
        for job in jobs:
            for ev in config.evals:
                bar.set_postfix_str(f"{ev} {job.method} B={job.budget} seed={job.seed}",
                                    refresh=False)
                records.append(run_evaluation(config, workdir, feats, job, ev, selections[job],
                                              counter, num_classes, features_sha, remade))
                bar.update()
    _say_made_again(remade, "evaluation", "another selection, other features or labels, or "
                                          "other finetuning settings")
    timing["evaluation_seconds"] = time.perf_counter() - t2
    order = {(m, b, s, e): i for i, (m, b, s, e) in enumerate(
        (m, b, s, e) for m in config.methods for b in budgets for s in config.seeds
        for e in config.evals)}
    records.sort(key=lambda r: order[(r["method"], r["budget"], r["seed"], r["eval"])])

    meta = {
        "command": command or f"bilaf run --config {config.name} --workdir {workdir}",
        "date": _utc_now(),
        "started": _started(workdir),
        "machine": f"{platform.machine()}" + (f" ({cpu})" if (cpu := cpu_description()) else "")
                   + f", {os.cpu_count()} CPU cores, JAX devices: "
                   + ", ".join(sorted({d.platform for d in __import__("jax").devices()})),
        "pool_size": n,
        "test_size": len(feats.test_labels),
        "feature_dim": int(feats.pool.shape[1]),
        "selection_dim": None if feats.selection.shape[1] == feats.pool.shape[1]
        else int(feats.selection.shape[1]),
        "retained_energy": feats.retained_energy,
    }
    results = {
        "format": FORMAT,
        "config": json.loads(json.dumps(config._asdict())),
        "budgets": budgets,
        "pool_size": n,
        "test_size": len(feats.test_labels),
        "num_classes": num_classes,
        "feature_dim": meta["feature_dim"],
        "selection_dim": meta["selection_dim"],
        "retained_energy": feats.retained_energy,
        "features_meta": feats.meta,
        "features_sha256": features_sha,
        "records": records,
        "summary": [{"method": m, "budget": b, "eval": e, "mean": _or_none(mean),
                     "std": _or_none(std), "count": c}
                    for (m, b, e), (mean, std, c) in sorted(summarize(records).items(),
                                                            key=lambda kv: str(kv[0]))],
        "environment": environment(),
        "command": meta["command"],
        "date": meta["date"],
        "run_started": meta["started"],
        "timing_this_call": timing,
    }
    markdown = results_markdown(config, records, budgets, meta)
    write_json_atomic(workdir / "results.json", results, indent=1)
    write_text_atomic(workdir / "results.md", markdown)
    plot_accuracy(config, records, budgets, workdir / "accuracy_vs_budget.png")
    written = ["results.json", "results.md", "accuracy_vs_budget.png"]
    bilaf_method = next((m for m in ("bilaf-paper", "bilaf-official") if m in config.methods), None)
    sel = None
    if bilaf_method is not None:
        b = budgets[len(budgets) // 2]
        sel = selections[Job(bilaf_method, b, config.seeds[0])]
    if sel is not None and "error" not in sel:
        plot_pca_map(feats, sel, workdir / "pca_map.png",
                     f"{bilaf_method}, B = {b}, K = {config.num_cores}, seed "
                     f"{config.seeds[0]} ({config.dataset}, first 2 PCs of the pool)")
        written.append("pca_map.png")
    else:  # an earlier run's map would show another selection
        with contextlib.suppress(FileNotFoundError):
            (workdir / "pca_map.png").unlink()
    _readable(workdir, written)
    return RunOutput(results, markdown, workdir, tuple(written))
