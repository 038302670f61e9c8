"""`select`: the one-call pipeline (core stage, then boundary stage) and the baselines."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bilaf_jax import _validation as V
from bilaf_jax.activeft import activeft
from bilaf_jax.baselines import kcenter_select, kmeans_select, random_select
from bilaf_jax.distances import PRECISIONS
from bilaf_jax.sharding import process_local, real_rows, to_host

METHODS = ("bilaf", "activeft", "kcenter", "kmeans", "random")
CORE_METHODS = ("activeft", "kcenter", "kmeans", "random")
MODES = ("paper", "official")

_CORE_SELECTORS = {
    "activeft": activeft,
    "kcenter": kcenter_select,
    "kmeans": kmeans_select,
    "random": random_select,
}


class SelectOutput(NamedTuple):
    """Result of `select`.

    indices: int32[budget]. For "bilaf": class blocks in ascending core order, each starting with
      its core (the authors' output order); for the other methods: ascending. With `labeled`
      rows, their classes' blocks remain without their first row (the labelled core).
    core_indices: int32[K] ascending (for the baselines: the same as `indices`).
    core: the core stage's output (ActiveFTOutput, KCenterOutput, ...).
    boundary: the boundary stage's output (BilafOutput) for "bilaf", else None. With `labeled`
      rows its classes are those of sort(labeled + core_indices), K + m of them:
      `pseudo_labels` and `allocation` index that sorted list, not `core_indices`.
    """

    indices: jax.Array
    core_indices: jax.Array
    core: Any
    boundary: Any


def default_num_cores(budget: int) -> int:
    """K = max(1, budget // 10).

    This reproduces the paper's core counts at CIFAR-10 1% (B = 500, K = 50), CIFAR-100 5%
    (B = 2,500, K = 250) and ImageNet 5% (B = 64,058, K = 6,405). The paper keeps K fixed across
    budgets of one data set, so pass `num_cores` explicitly to reproduce its other columns.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ValueError(f"budget must be a positive integer, got {budget!r}")
    return max(1, int(budget) // 10)


def _is_default(value, default) -> bool:
    """`value` is the parameter's default (an array or tracer is not: `==` on it is no bool)."""
    if value is default:
        return True
    if V.is_traced(value) or np.ndim(value) != 0:
        return False
    return bool(value == default)


def select(key, features, budget: int, *, method: str = "bilaf", num_cores: int | None = None,
           core_method: str = "activeft", mode: str = "paper", core_options: dict | None = None,
           num_neighbors: int = 10, ring_fraction=0.1, remove_fraction=0.1,
           opponent_penalty=1.1, normalize: bool = False, direct: bool | None = None,
           labeled=None, num_rows: int | None = None,
           precision: str | None = None) -> SelectOutput:
    """Choose `budget` rows of `features` [n, d] to label.

    method: "bilaf" (core stage with `core_method` picking `num_cores` cores, then BiLAF's
      boundary stage fills the budget), or a single-stage selector of `budget` rows:
      "activeft", "kcenter", "kmeans", "random".
    num_cores: K for "bilaf"; default `default_num_cores(budget)` = max(1, budget // 10).
    core_options: extra keyword arguments for the core selector (e.g. num_steps, temperature,
      batch_size for ActiveFT).
    mode, num_neighbors, ring_fraction, remove_fraction, opponent_penalty, normalize, direct:
      passed to `bilaf_jax.boundary.bilaf` (see there); for the other methods they must keep
      their defaults (they would be ignored). In "official" mode the boundary stage runs in
      float64 under `jax.enable_x64`, as the authors' scipy code does, so that its list matches
      theirs index for index.
    labeled: int[m] rows already labelled (multi-round active finetuning). They are never
      selected. For "bilaf" (paper mode only) they also count as existing cores: the boundary stage runs with
      cores = labeled + the K new cores and a budget of budget + m, and the labelled rows are
      then dropped from its output, leaving `budget` new rows.
    num_rows: the real rows of a pool padded to shard evenly (`bilaf_jax.sharding.shard_rows`).
    precision: "float32" (default), "bfloat16" or "tensorfloat32" (NVIDIA GPUs) for the
      similarity matmuls of ActiveFT and of the boundary stage's assignment (paper mode), with
      float32 accumulation; see `bilaf_jax.distances`. Faster on accelerators; may flip
      near-ties.

    The key is split once per stage, so the core stage draws the same randomness whether or
    not a boundary stage follows.

    >>> import jax, numpy as np
    >>> x = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    >>> out = select(jax.random.key(0), x, 30, num_cores=5, core_options=dict(num_steps=20))
    >>> out.indices.shape, out.core_indices.shape
    ((30,), (5,))
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if core_method not in CORE_METHODS:
        raise ValueError(f"unknown core_method {core_method!r}; expected one of {CORE_METHODS}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    V.check_key(key)
    features, n = V.check_pool(features, num_rows)
    budget = V.check_count(budget, "budget", 1, n)
    core_key, boundary_key = jax.random.split(key)
    if core_options is not None and not isinstance(core_options, Mapping):
        raise ValueError(f"core_options must be a dict of the core selector's keyword "
                         f"arguments, got {core_options!r}")
    options = dict(core_options or {})
    stage1 = core_method if method == "bilaf" else method
    for name, use in (("exclude", "labeled="), ("num_rows", "num_rows="), ("key", "key"),
                      ("features", "features"),
                      ("num_samples", "the budget (and num_cores= for bilaf)")):
        # given to stage 1 only, the boundary stage would not know of them; or select's own
        if name in options:
            raise ValueError(f"core_options may not hold {name!r}: pass {use} to select")
    accepted = inspect.signature(_CORE_SELECTORS[stage1]).parameters
    open_ended = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    unknown = sorted(set(options) - set(accepted))
    if unknown and not open_ended:
        raise ValueError(f"core_options {unknown} are not options of the {stage1} selector")
    if precision is not None and stage1 == "activeft":
        if options.setdefault("precision", precision) != precision:
            raise ValueError(f"precision {precision!r} conflicts with core_options' "
                             f"{options['precision']!r}")
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if method not in ("bilaf", "activeft") and precision not in (None, "float32"):
        raise ValueError(f"precision {precision!r} applies to ActiveFT and the boundary stage; "
                         f"{method!r} computes in float32")
    if n < features.shape[0]:
        options["num_rows"] = n
    if labeled is not None:
        labeled = V.check_indices(labeled, n, "labeled")
        if method == "bilaf" and mode == "official" and labeled.size:
            # The script has no labelled pool; where it repeats a labelled core, no faithful
            # list of `budget` new rows exists.
            raise ValueError("labeled rows need mode='paper': the authors' script (official mode) has no "
                             "notion of an already-labelled pool")
        V.check_exclude(labeled, n, budget)
        if labeled.size:
            options["exclude"] = labeled
        else:
            labeled = None

    core_features = features
    if (isinstance(features, jax.Array) and features.dtype == np.float64
            and not jax.config.jax_enable_x64):
        # float64 rows placed under x64 for official mode's float64 boundary stage (as
        # `bilaf select --mesh` places them): the core stage takes them in float32, as it
        # takes a float64 NumPy array where x64 is off
        core_features = features.astype(np.float32)

    if method != "bilaf":
        if num_cores is not None and num_cores != budget:
            raise ValueError(f"num_cores applies to method='bilaf' only (got {num_cores} with {method!r})")
        defaults = inspect.signature(select).parameters
        given = [name for name, value in (
            ("mode", mode), ("num_neighbors", num_neighbors), ("ring_fraction", ring_fraction),
            ("remove_fraction", remove_fraction), ("opponent_penalty", opponent_penalty),
            ("normalize", normalize), ("direct", direct))
            if not _is_default(value, defaults[name].default)]
        if given:
            raise ValueError(f"{', '.join(given)} configure BiLAF's boundary stage, which "
                             f"method={method!r} does not run")
        core = _CORE_SELECTORS[method](core_key, core_features, budget, **options)
        return process_local(SelectOutput(core.indices, core.indices, core, None))

    from bilaf_jax.boundary import bilaf, check_options

    if V.is_traced(key) or any(V.is_traced(v) for v in options.values()):
        # The boundary stage plans its class programs from concrete cores (host arrays).
        raise ValueError("method='bilaf' needs a concrete key and core_options: it cannot run "
                         "under jax.vmap / jit over them; vmap the core selector and call "
                         "boundary.bilaf per core set, or loop in Python")
    # Before stage 1: a bad boundary setting should not cost a whole ActiveFT run first.
    check_options(mode=mode, num_neighbors=num_neighbors, ring_fraction=ring_fraction,
                  remove_fraction=remove_fraction, opponent_penalty=opponent_penalty,
                  precision=precision)
    # (bilaf checks these too, but only after stage 1)
    normalize = V.check_flag(normalize, "normalize")
    direct = V.check_flag(direct, "direct", allow_none=True)
    if num_cores is None:
        num_cores = default_num_cores(budget)
    num_cores = V.check_count(num_cores, "num_cores", 1, budget)
    core = _CORE_SELECTORS[core_method](core_key, core_features, num_cores, **options)
    core_indices = jnp.sort(core.indices)
    all_cores = to_host(core_indices)
    if labeled is not None:
        all_cores = np.sort(np.concatenate([all_cores, labeled]))
    run_boundary = functools.partial(
        bilaf, boundary_key, core_indices=all_cores, budget=budget + (0 if labeled is None else labeled.size),
        mode=mode, num_neighbors=num_neighbors, ring_fraction=ring_fraction,
        remove_fraction=remove_fraction, opponent_penalty=opponent_penalty, normalize=normalize,
        direct=direct, precision=precision)
    # The boundary stage works per pseudo-class on gathered rows; hand it the real rows.
    features = real_rows(features, n)
    if mode == "official":
        # The authors' boundary stage runs in float64 (scipy cdist); so does ours in this mode.
        with jax.enable_x64(True):
            boundary = run_boundary(jnp.asarray(features, jnp.float64))
    else:
        boundary = run_boundary(features)
    indices = boundary.indices
    if labeled is not None:
        picked = to_host(indices)
        indices = jnp.asarray(picked[~np.isin(picked, labeled)], jnp.int32)
    # Several processes: each returns the whole result (see bilaf_jax.sharding).
    return process_local(SelectOutput(indices, core_indices, core, boundary))

