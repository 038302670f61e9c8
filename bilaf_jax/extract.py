"""Resumable feature extraction to a `.npz` file (the edge between datasets, backbones and disk).

`extract_to_file(out, dataset=..., split=..., backbone=...)` embeds a dataset split with a
backbone and writes `out` (npz) with

- `features` f32 [n, dim], `labels` int32 [n], `indices` int64 [n] (pool row ids: the dataset
  rows used, 0..n-1 in the dataset's order),
- `meta`: a 0-d string array holding JSON (backbone, weight sha256, image size, dataset, split,
  limit, taps, ...). `weights_sha256` is the weight file's sha256, "random(seed=S)", or
  "changed:<sha256>" for a `Backbone` whose module was trained in place after loading.

Completed batches go to `<out>.partial/batch_<b>.npz` (each written atomically) beside a
`config.json`. A killed run started again with the same configuration reuses them; a different
configuration is refused (the batches are kept). The final file is written atomically and the partial folder removed,
so `out` is either absent or complete, never truncated.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from bilaf_jax.io import (
    InputError,
    atomic_open,
    check_output_path,
    exclusive_lock,
    name_max,
    read_selection_record,
    save_npz_atomic,
    selection_record_path,
    temp_prefix,
    write_json_atomic,
)

__all__ = ["ExtractOutput", "check_feature_pair", "extract_to_file", "read_meta", "same_rows"]

_SHARD = "batch_{:06d}.npz"


class ExtractOutput(NamedTuple):
    path: Path
    num_images: int  # n
    dim: int
    reused_batches: int  # batches found in the partial folder and not recomputed
    computed_batches: int
    seconds: float


# What np.load raises for a damaged or foreign file: an empty one is an EOFError, and zipfile
# raises NotImplementedError / RuntimeError for damaged method, version or encryption fields.
_DAMAGED_NPZ = (OSError, ValueError, KeyError, EOFError, RuntimeError, zipfile.BadZipFile)


def _save_shard(path: Path, **arrays) -> None:
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def _load_shard(path: Path, rows: int, dim: int):
    try:
        with np.load(path, allow_pickle=False) as z:
            features, labels = z["features"], z["labels"]
    except _DAMAGED_NPZ:
        return None
    if features.shape != (rows, dim) or labels.shape != (rows,) or features.dtype != np.float32:
        return None
    return features, labels


def _remove_stale_temps(out: Path) -> None:
    """Delete what a kill during the final atomic write of `out` left beside it: temporary files
    named as `io.atomic_open` names them for `out` (`.<name>.<8 random chars>.tmp`), nothing else.

    Such a file is live only while another extraction to the same `out` is finishing, and two at
    once are not supported anyway: they share (and reset, and remove) the `.partial` folder.
    """
    # (the prefix cut short as atomic_open cuts it for a long name)
    stale = re.compile(re.escape(temp_prefix(out.name, out.parent)) + r"[a-z0-9_]{8}\.tmp")
    for p in out.parent.iterdir():
        if stale.fullmatch(p.name) and p.is_file() and not p.is_symlink():
            with contextlib.suppress(OSError):
                p.unlink()


def _check_outside_data(out: Path, dataset: str, data_dir) -> None:
    from bilaf_jax import data

    raw = data.raw_data_dir(dataset, data_dir)
    if raw is not None and out.resolve().is_relative_to(raw.resolve()):
        # Would overwrite a data file, or add a file to the data (an image folder's class).
        raise InputError(f"output path {out} is inside the data folder {raw}, an input: choose "
                         "an output path outside it")


# Not part of what the features depend on: the same weights moved (a new venv) resume; the
# rows are decided by num_images with the data's fingerprint (a limit at or above the split's
# size, or none, is the whole split).
_NOT_SETTINGS = ("weights_path", "limit")


def same_rows(meta: dict, limit: int | None, total: int | None = None) -> bool:
    """Whether features with extraction `meta` hold the rows `limit` asks for (the first
    `limit` rows, None: all) of the same split. `total`: the split's size where its data is at
    hand; without it, features that stopped short of their own limit, or had none, tell it."""
    stored, n = meta.get("limit"), meta.get("num_images")
    if stored == limit:
        return True
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, stored or 0)):
        return False  # not written by this module
    if total is None:
        if stored is not None and stored <= n:
            return False  # the split may hold more than these n rows
        total = n
    return n == (total if limit is None else min(limit, total))


def _changed(before: dict, now: dict) -> str:
    """The settings in which `now` differs from `before`, for a message; the limit is named
    with the number of images it decided."""
    keys = [k for k in now if k not in _NOT_SETTINGS and before.get(k) != now.get(k)]
    keys += [k for k in before if k not in now and k not in _NOT_SETTINGS]
    if "num_images" in keys and before.get("limit") != now.get("limit"):
        keys.insert(keys.index("num_images"), "limit")
    return ", ".join(f"{k} {before.get(k)!r} (now {now.get(k)!r})" for k in keys)


def _prepare_partial(partial: Path, config: dict) -> None:
    """Make `partial` hold shards of exactly `config`: keep them if it matches; refuse to
    discard finished batches of an extraction with other settings (hours of work on a large
    pool, lost to a mistyped flag)."""
    cfg_path = partial / "config.json"
    if partial.is_dir():
        try:
            before = json.loads(cfg_path.read_text())
        except (OSError, ValueError):
            before = None
        def settings(c):
            return {k: v for k, v in c.items() if k not in _NOT_SETTINGS}

        if isinstance(before, dict) and settings(before) == settings(config):
            if before != config:
                write_json_atomic(cfg_path, config, indent=1)
            return
        shards = sorted(partial.glob("batch_*.npz"))
        if shards:
            if isinstance(before, dict):
                changed = _changed(before, config)
            else:
                changed = "settings unreadable"
            # the same data and split, read or preprocessed otherwise: not a flag of this run
            fixed = isinstance(before, dict) and all(
                before.get(k) == config.get(k) for k in ("dataset", "split")) and any(
                before.get(k) != config.get(k) for k in ("resize", "mean", "std", "source"))
            advice = ("the backbone's preprocessing or the data changed since (an earlier "
                      "version?): remove the folder to start over" if fixed else
                      "finish that extraction with its own settings, or remove the folder to "
                      "start over")
            raise InputError(f"{partial} holds {len(shards)} finished batches of an extraction "
                             f"with other settings ({changed}); {advice}")
        for p in partial.iterdir():  # only what this module writes
            if p.name == "config.json" or p.name.endswith(".tmp"):
                p.unlink()
    elif partial.exists():
        raise InputError(f"{partial} exists and is not a folder; remove it")
    partial.mkdir(exist_ok=True)
    write_json_atomic(cfg_path, config, indent=1)


def extract_to_file(out, *, dataset: str, split: str, backbone, weights=None,
                    image_size: int | None = None, limit: int | None = None,
                    batch_size: int = 64, data_dir=None, cache_dir=None, taps=None,
                    seed: int = 0, progress: bool = True, on_batch=None,
                    read_workers: int | None = None) -> ExtractOutput:
    """Embed `dataset`/`split` with `backbone` (a name, or a loaded `Backbone`) into `out`.

    `seed`: of `weights="random"` where `backbone` is a name (a loaded one keeps its own).
    `on_batch(batch_index)` is called after each batch's shard is safely on disk.
    `read_workers`: threads reading image batches ahead (default `data.read_workers()`).
    Raises InputError (one line) for every problem a user can cause, and when another process
    is extracting to the same `out` (they would share its partial folder).
    """
    out = check_output_path(out, inputs=() if weights in (None, "random") else (weights,))
    if out.suffix != ".npz":  # the file is an .npz archive; another name would mislead readers
        raise InputError(f"output must be a .npz file, got {out}")
    # Its lock file and .partial folder take 8 more characters than the name itself.
    if len(os.fsencode(out.name)) + len(".partial") > name_max(out.parent):
        raise InputError(f"output name too long for {out.parent} ({len(os.fsencode(out.name))} "
                         f"bytes; at most {name_max(out.parent) - len('.partial')})")
    _check_outside_data(out, dataset, data_dir)  # before the lock file, which would be added there
    with exclusive_lock(out.with_name(f".{out.name}.lock"), f"output {out}"):
        return _extract(out, dataset=dataset, split=split, backbone=backbone, weights=weights,
                        image_size=image_size, limit=limit, batch_size=batch_size,
                        data_dir=data_dir, cache_dir=cache_dir, taps=taps, seed=seed,
                        progress=progress, on_batch=on_batch, read_workers=read_workers)


def _extract(out, *, dataset, split, backbone, weights, image_size, limit, batch_size, data_dir,
             cache_dir, taps, seed, progress, on_batch, read_workers) -> ExtractOutput:
    from bilaf_jax import backbones as bbs
    from bilaf_jax import data

    t0 = time.perf_counter()
    out = check_output_path(out, inputs=() if weights in (None, "random") else (weights,))
    _remove_stale_temps(out)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer))
                              or limit < 1):
        raise InputError(f"limit must be a positive integer, got {limit!r}")
    batch_size = bbs._check_batch_size(batch_size)
    if read_workers is not None and (isinstance(read_workers, bool)
                                     or not isinstance(read_workers, (int, np.integer))
                                     or read_workers < 1):
        raise InputError(f"read_workers must be a positive integer, got {read_workers!r}")
    if isinstance(backbone, str):
        backbone = bbs.load(backbone, weights, taps=taps, seed=seed)
    size = backbone._size(image_size)
    source = data.data_source(dataset, split, data_dir=data_dir, cache_dir=cache_dir)
    n = len(source) if limit is None else min(int(limit), len(source))
    if n == 0:
        raise InputError(f"{dataset} split '{split}' is empty")
    batch_size = min(batch_size, n)
    num_batches = -(-n // batch_size)
    meta = {
        "dataset": dataset,
        "split": split,
        "limit": None if limit is None else int(limit),
        "num_images": n,
        "source": source.fingerprint,
        "backbone": backbone.name,
        # a module trained in place is not its weight file's ("changed:..."); a loaded random
        # Backbone knows its own seed, `seed` is that of a name's load
        "weights_sha256": backbone.weights_id(seed),
        "weights_path": backbone.weights_path,
        "taps": None if backbone.taps is None else [str(t) for t in backbone.taps],
        "dim": backbone.dim,
        "image_size": size,
        "resize": backbone.resize_method,
        "mean": list(backbone.mean),
        "std": list(backbone.std),
    }
    if source.class_names is not None:  # an image folder's labels are positions in this list
        meta["class_names"] = list(source.class_names)
    partial = out.with_name(out.name + ".partial")
    done = _finished_meta(out)
    if done is not None:
        same = {k: v for k, v in done.items() if k not in ("seconds", *_NOT_SETTINGS)} == \
            {k: v for k, v in meta.items() if k not in _NOT_SETTINGS}
        if same:  # already extracted with these settings
            _remove_leftover_partial(partial, meta)
            return ExtractOutput(out, n, backbone.dim, num_batches, 0, 0.0)
        changed = _changed({k: v for k, v in done.items() if k != "seconds"}, meta)
        raise InputError(f"{out} holds features extracted with other settings ({changed}); "
                         "remove it or choose another output path")
    _prepare_partial(partial, {**meta, "batch_size": batch_size, "format": 1})
    try:
        return _extract_batches(out, partial, meta, source, backbone, size, n, batch_size,
                                progress, on_batch, read_workers, t0)
    except BaseException:
        if not any(partial.glob("batch_*.npz")):  # nothing finished to resume from
            shutil.rmtree(partial, ignore_errors=True)
        raise


def _remove_leftover_partial(partial: Path, meta: dict) -> None:
    """Remove the partial folder of the extraction that wrote the finished file (`meta`: its
    settings), which a kill between writing that file and removing the folder leaves, also
    half removed (no config.json). One of other settings is left alone."""
    if not partial.is_dir():
        return
    try:
        before = json.loads((partial / "config.json").read_text())
    except FileNotFoundError:
        before = meta
    except (OSError, ValueError):
        return
    ignored = (*_NOT_SETTINGS, "batch_size", "format")
    if isinstance(before, dict) and ({k: v for k, v in before.items() if k not in ignored}
                                     == {k: v for k, v in meta.items() if k not in ignored}):
        shutil.rmtree(partial, ignore_errors=True)


def _extract_batches(out, partial, meta, source, backbone, size, n, batch_size, progress,
                     on_batch, read_workers, t0) -> ExtractOutput:
    """Embed the batches not yet in `partial`, then write `out` from all of them."""
    from tqdm.auto import tqdm

    from bilaf_jax import backbones as bbs
    from bilaf_jax import data

    num_batches = -(-n // batch_size)
    shards: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for b in range(num_batches):
        p = partial / _SHARD.format(b)
        if p.exists():
            rows = min(n, (b + 1) * batch_size) - b * batch_size
            got = _load_shard(p, rows, backbone.dim)
            if got is not None:
                shards[b] = got
    reused = len(shards)
    todo = [b for b in range(num_batches) if b not in shards]
    bar = tqdm(total=n, initial=sum(len(f) for f, _ in shards.values()), unit="img",
               desc=f"extract {backbone.name}", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    try:
        if todo:
            run = bbs.make_embedder(backbone, image_size=size, batch_size=batch_size)

            def read(b):
                return bbs.read_rows(source, b * batch_size, min(n, (b + 1) * batch_size), size,
                                     backbone.resize_method)

            # Batches are read and decoded in threads ahead of the device (data.prefetch).
            for b, arrays in data.prefetch(read, todo, workers=read_workers):
                lo, hi = b * batch_size, min(n, (b + 1) * batch_size)
                features = run(arrays.images)
                if not np.isfinite(features).all():
                    raise InputError(f"non-finite features in batch {b} (rows {lo}-{hi - 1})")
                labels = arrays.labels.astype(np.int32)
                _save_shard(partial / _SHARD.format(b), features=features, labels=labels)
                shards[b] = (features, labels)
                bar.update(hi - lo)
                if on_batch is not None:
                    on_batch(b)
    finally:
        bar.close()
    features = np.concatenate([shards[b][0] for b in range(num_batches)])
    labels = np.concatenate([shards[b][1] for b in range(num_batches)])
    seconds = time.perf_counter() - t0
    meta["seconds"] = round(seconds, 3)
    save_npz_atomic(out, features=features, labels=labels,
                    indices=np.arange(n, dtype=np.int64), meta=np.asarray(json.dumps(meta)))
    shutil.rmtree(partial, ignore_errors=True)
    return ExtractOutput(out, n, backbone.dim, reused, len(todo), seconds)


def _finished_meta(out: Path) -> dict | None:
    """The metadata of a feature file already at `out` (None: no file there). A file there
    that is not one this module wrote is refused: extraction would overwrite it."""
    if not out.exists():
        return None
    try:
        return read_meta(out)
    except InputError:
        raise InputError(f"{out} exists and is not a feature file written by `bilaf extract`; "
                         "remove it or choose another output path") from None


def read_meta(path) -> dict:
    """The `meta` JSON of a feature file written by `extract_to_file`."""
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):  # a plain .npy array
            raise KeyError("meta")
        with z:
            meta = json.loads(str(z["meta"]))
        if not isinstance(meta, dict):  # another program's "meta"
            raise ValueError(f"meta is a JSON {type(meta).__name__}, not an object")
        return meta
    except _DAMAGED_NPZ as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise InputError(f"{path} has no readable extraction metadata ({msg})") from None


def pool_identity(path) -> dict | None:
    """{dataset, split, source} of the rows a feature file made by `extract_to_file` holds
    (source: the data's fingerprint); None for files without extraction metadata."""
    try:
        meta = read_meta(path)
    except InputError:
        return None
    return {k: meta.get(k) for k in ("dataset", "split", "source")}


def check_selection_pool(selection_path, pool: dict | None, what: str, record: dict | None = None) -> None:
    """Refuse a selection that `bilaf select` made on rows of another data set, split or data
    than `pool` ({dataset, split, source}, as `pool_identity`; None values are not compared).
    Selections without a provenance record, or whose features had no extraction metadata,
    are not checked. `record`: the selection's record where the caller has read it already
    (`io.read_selection_record`)."""
    record = read_selection_record(selection_path) if record is None else record
    try:
        made_on = record["features"].get("pool")
    except (KeyError, TypeError, AttributeError):
        return
    if not isinstance(made_on, dict) or pool is None:
        return
    made_on, pool = dict(made_on), dict(pool)
    if made_on.get("dataset") == "image_folder" == pool.get("dataset"):
        # "all" and "train" read the same folder; the folder's fingerprint includes file
        # times, which a copy of the same images changes
        for d in (made_on, pool):
            d["split"] = "train" if d.get("split") == "all" else d.get("split")
            d["source"] = None
    for key in ("dataset", "split", "source"):
        a, b = made_on.get(key), pool.get(key)
        if a is not None and b is not None and a != b:
            raise InputError(f"{selection_path} was selected on {key} {a!r} (its record "
                             f"{selection_record_path(selection_path).name}), but {what} is "
                             f"{key} {b!r}: its indices would "
                             "label other images")


# What must agree between a pool's and a test split's features for a model fitted on one to be
# evaluated on the other.
_SAME_EMBEDDING = ("backbone", "weights_sha256", "taps", "dim", "image_size", "resize", "mean", "std")


def check_feature_pair(pool_path, test_path) -> None:
    """Refuse pool and test feature files that `extract_to_file` made with different embeddings
    (backbone, weights, taps, image size, preprocessing), from different data sets or class
    folders (an image folder's label i is its i-th class folder), or from the
    same split of the same data (test rows would be labelled for training). Files without
    extraction metadata (made elsewhere) are not checked."""
    metas = []
    for path in (pool_path, test_path):
        try:
            metas.append(read_meta(path))
        except InputError:
            return
    pool, test = metas
    for key in _SAME_EMBEDDING + ("dataset", "class_names"):
        if pool.get(key) != test.get(key):
            raise InputError(f"{pool_path} and {test_path} differ in {key} ({pool.get(key)!r} vs "
                             f"{test.get(key)!r}): features of one embedding and data set are needed")
    same_source = pool.get("source") is not None and pool.get("source") == test.get("source")
    if same_source or (pool.get("split") == test.get("split")
                       and pool.get("source") == test.get("source")):
        # an image folder's "all" and "train" read the same images: the source tells
        raise InputError(f"{pool_path} and {test_path} hold the same images (split "
                         f"{pool.get('split')!r} and {test.get('split')!r} of one source): "
                         "the test features must come from the held-out split")
