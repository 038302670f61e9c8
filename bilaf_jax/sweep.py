"""Hyperparameter sweeps of the BiLAF pipeline and label-free measures of a selection.

A sweep runs the cartesian product of a grid over the traceable hyperparameters:

  core stage (ActiveFT):    temperature, learning_rate, balance
  boundary stage (paper):   remove_fraction, ring_fraction, opponent_penalty

Every ActiveFT setting gives one core set; for each core set the boundary grid runs. Each
stage sweeps its settings inside one traced computation: `jax.vmap` over all settings by
default (compiled once for the batch), or, to bound memory, `settings_per_batch` settings at a
time (ActiveFT: `lax.map(..., batch_size=...)` inside one jit; boundary: the same vmapped
programs called once per batch, since `bilaf` plans its class buckets on the host and so
cannot sit inside `lax.map`). Settings that differ only in these hyperparameters therefore
share one compilation.

Measures (no labels needed, except `label_*`):
  mean_distance   mean Euclidean distance from each pool sample to its nearest selected sample
                  (paper Table 7), on the features as given; chunked, never an [n, B] matrix.
  selected_balance, pool_balance
                  normalised entropy H(p) / log K of the pseudo-label histogram of the selected
                  samples, and of the samples kept by denoising (1 = perfectly balanced).
  label_count, label_balance
                  with true labels: distinct labels among the selected samples, and normalised
                  entropy of their label histogram over the labels present in the pool.

The key is split as `bilaf_jax.pipeline.select` splits it, so a sweep setting selects what
`select(key, features, budget, num_cores=K, core_options=..., **boundary_params)` selects: the
boundary stage bit for bit, given the cores. ActiveFT inside the sweep is another compiled
program, whose float32 sums round differently (its losses differ from a separate run's in the
last bits); where its picks hinge on near-ties (very low-dimensional features, long runs at a
high learning rate) a setting's cores can differ from a separate run's.

Dimension glossary: see `bilaf_jax.distances`; here also S (number of settings).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bilaf_jax import _validation as V
from bilaf_jax import distances
from bilaf_jax.activeft import activeft
from bilaf_jax.sharding import process_local, real_rows, to_host

# name -> (default, lower bound, lower bound allowed, upper bound or None, upper allowed)
ACTIVEFT_PARAMS = {
    "temperature": (0.07, 0.0, False, None, False),
    "learning_rate": (1e-3, 0.0, True, None, False),
    "balance": (1.0, 0.0, False, None, False),
}
BOUNDARY_PARAMS = {
    "remove_fraction": (0.1, 0.0, True, 1.0, True),
    "ring_fraction": (0.1, 0.0, False, 1.0, True),
    "opponent_penalty": (1.1, 0.0, False, None, False),
}
TRACEABLE_PARAMS = (*ACTIVEFT_PARAMS, *BOUNDARY_PARAMS)
# Arguments that fix shapes or the compiled program: one value per sweep.
FIXED_PARAMS = ("num_steps", "batch_size", "num_cores", "num_samples", "budget",
                "num_neighbors", "mode", "normalize", "chunk_size", "precision", "init_indices",
                "optimizer", "direct", "core_method", "method")


# --------------------------------------------------------------------------------------------
# Grid specification.


def parse_grid(specs: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """Parse `["temperature=0.05,0.07", "remove_fraction=0.1,0.2"]` into a checked grid.

    Raises ValueError naming the problem: no '=', empty values, a value that is not a number,
    a parameter given twice, an unknown or non-traceable parameter, a value out of range.
    """
    grid: dict[str, tuple[float, ...]] = {}
    for spec in specs:
        name, sep, values = str(spec).partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"grid spec {spec!r} must look like name=v1,v2,...")
        parts = [v.strip() for v in values.split(",")]
        if not values.strip() or any(not v for v in parts):
            raise ValueError(f"grid spec {spec!r} has an empty value; give name=v1,v2,...")
        parsed = []
        for v in parts:
            try:
                parsed.append(float(v))
            except ValueError:
                raise ValueError(f"grid spec {spec!r}: {v!r} is not a number") from None
        if name in grid:
            raise ValueError(f"grid parameter {name!r} is given twice")
        grid[name] = tuple(parsed)
    return check_grid(grid)


def check_grid(grid: Mapping[str, Sequence[float]]) -> dict[str, tuple[float, ...]]:
    """Check names and values of a grid {name: values}; return it with float tuples.

    Values are checked here because the stages cannot check traced (vmapped) values.
    """
    if not isinstance(grid, Mapping):
        raise ValueError(f"grid must be a mapping {{name: values}}, got {type(grid).__name__}")
    out = {}
    for name, values in grid.items():
        if name in FIXED_PARAMS:
            raise ValueError(
                f"{name!r} is not a traceable hyperparameter (it fixes shapes or the compiled "
                f"program), so it cannot be swept in one program; set it once per sweep. "
                f"Sweepable: {', '.join(TRACEABLE_PARAMS)}")
        if name not in TRACEABLE_PARAMS:
            raise ValueError(f"unknown grid parameter {name!r}; sweepable: {', '.join(TRACEABLE_PARAMS)}")
        if isinstance(values, (str, bytes)) or np.ndim(values) != 1:
            raise ValueError(f"grid values of {name!r} must be a 1-D sequence of numbers, got {values!r}")
        vals = np.asarray(values)
        if vals.size == 0:
            raise ValueError(f"grid parameter {name!r} has no values")
        if vals.dtype.kind not in "iuf":
            raise ValueError(f"grid values of {name!r} must be numbers, got {values!r}")
        _, lo, lo_ok, hi, hi_ok = {**ACTIVEFT_PARAMS, **BOUNDARY_PARAMS}[name]
        # as given and as the float32 the settings run in (1e-46 is 0 there)
        with np.errstate(over="ignore", under="ignore"):
            as_run = vals.astype(np.float32).astype(float)
        for v in [*vals.astype(float), *as_run[np.isfinite(as_run)]]:
            bad = (not math.isfinite(v) or (v < lo if lo_ok else v <= lo)
                   or (hi is not None and (v > hi if hi_ok else v >= hi)))
            if bad:
                lo_s = f"{'[' if lo_ok else '('}{lo:g}"
                hi_s = f"{hi:g}{']' if hi_ok else ')'}" if hi is not None else "inf)"
                raise ValueError(f"grid value {name}={v:g} is out of range {lo_s}, {hi_s}")
        for v in vals.astype(float):
            if name == "temperature":
                V.check_temperature(v, "grid value temperature")
            elif name in ("learning_rate", "balance"):  # activeft refuses float32 subnormals
                V.check_float32(v, f"grid value {name}")
        # The settings run in float32 (float64 only with float64 features): values must stay
        # finite and distinct there.
        with np.errstate(over="ignore"):  # an overflow is reported below
            as32 = vals.astype(np.float32)
        if not np.isfinite(as32).all():
            raise ValueError(f"grid values of {name!r} must fit float32, got {_listed(vals)}")
        if np.unique(as32).size != vals.size:
            raise ValueError(f"grid parameter {name!r} repeats a value (in float32): "
                             f"{_listed(vals)}")
        out[name] = tuple(float(v) for v in vals)
    return out


def _listed(vals) -> str:
    """[0.05, 0.05], not NumPy 2's [np.float64(0.05), np.float64(0.05)]."""
    return "[" + ", ".join(repr(float(v)) for v in vals) + "]"


def expand(grid: Mapping[str, Sequence[float]], names: Sequence[str]) -> dict[str, np.ndarray]:
    """Cartesian product of `grid` restricted to `names` -> {name: f64[S]} (first name slowest).

    Parameters of `names` missing from the grid take the stage's default. S >= 1.
    """
    defaults = {**ACTIVEFT_PARAMS, **BOUNDARY_PARAMS}
    axes = [tuple(grid.get(name, (defaults[name][0],))) for name in names]
    rows = list(itertools.product(*axes))
    return {name: np.array([r[i] for r in rows], np.float64) for i, name in enumerate(names)}


def _batches(num: int, per_batch: int | None):
    if per_batch is not None:  # 0 or -2 silently ran one setting at a time; 1.5 failed in range()
        per_batch = V.check_count(per_batch, "settings_per_batch", 1, 1 << 30)
    per_batch = num if per_batch is None else min(per_batch, num)
    return per_batch, [(s, min(s + per_batch, num)) for s in range(0, num, per_batch)]


# --------------------------------------------------------------------------------------------
# Stage sweeps.


class ActiveFTSweep(NamedTuple):
    """Result of `sweep_activeft`.

    params: {name: f64[S]} the ActiveFT setting of each row.
    indices: int32[S, K] core samples, ascending.
    losses: f32[S, num_steps] loss traces.
    """

    params: dict
    indices: jax.Array
    losses: jax.Array


def sweep_activeft(key, features, num_cores: int, grid: Mapping[str, Sequence[float]] | None = None,
                   *, num_steps: int = 300, batch_size: int | None = None,
                   settings_per_batch: int | None = None, chunk_size: int = 16384,
                   precision=None, num_rows: int | None = None) -> ActiveFTSweep:
    """Run ActiveFT for every setting of the grid's ActiveFT part in one compiled program.

    Every setting uses the same `key` (same initial centroids and batches), so settings differ
    only by their hyperparameters. `settings_per_batch=None` vmaps over all settings; an int
    runs `lax.map` over batches of that many vmapped settings (memory of one batch).
    `num_rows`: the real rows of a padded, row-sharded pool (`bilaf_jax.sharding.shard_rows`).

    >>> import jax, numpy as np
    >>> x = np.random.default_rng(0).normal(size=(100, 8)).astype(np.float32)
    >>> out = sweep_activeft(jax.random.key(0), x, 5, {"temperature": [0.05, 0.1]}, num_steps=5)
    >>> out.indices.shape
    (2, 5)
    """
    grid = check_grid(grid or {})
    V.check_key(key)
    features, n = V.check_pool(features, num_rows)
    num_cores = V.check_count(num_cores, "num_cores", 1, n)
    # Fixed arguments key the compiled-program cache: check them first (a list is unhashable).
    num_steps = V.check_count(num_steps, "num_steps", 0, 10**9)
    chunk_size = V.check_count(chunk_size, "chunk_size", 1, 1 << 30)
    if batch_size is not None:
        batch_size = V.check_count(batch_size, "batch_size", 1, n)
    params = expand(grid, tuple(ACTIVEFT_PARAMS))
    num = params["temperature"].shape[0]
    per_batch, _ = _batches(num, settings_per_batch)
    # The dtype ActiveFT computes in: float64 NumPy features are float32 unless x64 is on.
    dtype = jax.dtypes.canonicalize_dtype(jnp.promote_types(features.dtype, jnp.float32))
    hp = {k: jnp.asarray(v, dtype) for k, v in params.items()}
    run = _activeft_sweep_jit(num_cores=num_cores, num_steps=num_steps, batch_size=batch_size,
                              chunk_size=chunk_size, precision=precision,
                              per_batch=None if per_batch >= num else per_batch,
                              num_rows=None if n == features.shape[0] else n)
    indices, losses = run(key, jnp.asarray(features), hp)
    return ActiveFTSweep(params, indices, losses)


@functools.lru_cache(maxsize=32)
def _activeft_sweep_jit(*, num_cores, num_steps, batch_size, chunk_size, precision, per_batch,
                        num_rows):
    def run(key, features, hp):
        def one(p):
            out = activeft(key, features, num_cores, num_steps=num_steps,
                           temperature=p["temperature"], learning_rate=p["learning_rate"],
                           balance=p["balance"], batch_size=batch_size, chunk_size=chunk_size,
                           precision=precision, num_rows=num_rows)
            return out.indices, out.losses

        if per_batch is None:
            return jax.vmap(one)(hp)
        return lax.map(one, hp, batch_size=per_batch)

    return jax.jit(run)


class BoundarySweep(NamedTuple):
    """Result of `sweep_boundary` (paper mode).

    params: {name: f64[S]} the boundary setting of each row.
    indices: int32[S, B] selections (class blocks, each starting with its core).
    pseudo_labels: int32[n] pseudo-class of each sample (the same for every setting).
    kept: bool[S, n] samples kept by denoising.
    allocation: int32[S, K] budget per pseudo-class.
    """

    params: dict
    indices: jax.Array
    pseudo_labels: jax.Array
    kept: jax.Array
    allocation: jax.Array


def sweep_boundary(key, features, core_indices, budget: int,
                   grid: Mapping[str, Sequence[float]] | None = None, *, num_neighbors: int = 10,
                   normalize: bool = False, settings_per_batch: int | None = None,
                   chunk_size: int = distances.DEFAULT_CHUNK, precision=None,
                   num_rows: int | None = None) -> BoundarySweep:
    """Run the boundary stage (paper mode) for every setting of the grid's boundary part.

    `settings_per_batch=None` vmaps `bilaf` over all settings at once; an int vmaps that many
    at a time (the last batch padded by repeating its last setting, so no batch recompiles);
    1 runs the settings one after the other without vmap. `num_rows`: the real rows of a
    padded, row-sharded pool (`bilaf_jax.sharding.shard_rows`).

    >>> import jax, numpy as np
    >>> f = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    >>> out = sweep_boundary(jax.random.key(0), f, [3, 50, 120], 12, {"remove_fraction": [0.1, 0.2]})
    >>> out.indices.shape
    (2, 12)
    """
    from bilaf_jax.boundary import Ratio, bilaf

    grid = check_grid(grid or {})
    features, n = V.check_pool(features, num_rows)
    features = real_rows(features, n)
    params = expand(grid, tuple(BOUNDARY_PARAMS))
    num = params["remove_fraction"].shape[0]
    per_batch, spans = _batches(num, settings_per_batch)
    features = jnp.asarray(features)
    dtype = features.dtype
    run = functools.partial(bilaf, key, features, core_indices, budget, mode="paper",
                            num_neighbors=num_neighbors, normalize=normalize, chunk_size=chunk_size,
                            precision=precision)

    def one(p):
        out = run(**p)
        return out.indices, out.pseudo_labels, out.kept, out.allocation

    parts = []
    for start, stop in spans:
        if per_batch == 1:
            res = one({k: float(v[start]) for k, v in params.items()})
            parts.append(jax.tree.map(lambda a: a[None], res))
            continue
        take = np.minimum(np.arange(start, start + per_batch), stop - 1)
        hp = {k: jnp.asarray(v[take], dtype) for k, v in params.items()}
        for k in ("ring_fraction", "remove_fraction"):  # exact floors, as separate runs have
            parts_k = [Ratio.of(float(x)) for x in params[k][take]]
            hp[k] = Ratio(hp[k], *(jnp.stack([getattr(r, f) for r in parts_k])
                                   for f in ("num", "den")))
        res = jax.vmap(one)(hp)
        parts.append(jax.tree.map(lambda a, m=stop - start: a[:m], res))
    indices, labels, kept, alloc = (jnp.concatenate(a) for a in zip(*parts, strict=True))
    return process_local(BoundarySweep(params, indices, labels[0], kept, alloc))


# --------------------------------------------------------------------------------------------
# Label-free quality measures.


def mean_nearest_distance(features, indices, *, chunk_size: int = distances.DEFAULT_CHUNK,
                          precision=lax.Precision.HIGHEST, num_rows: int | None = None):
    """Mean over pool rows of the Euclidean distance to the nearest selected row (Table 7).

    features [n, d]; indices int[B] -> scalar (over the first `num_rows` rows of a padded
    pool, default all). Chunked: [chunk_size, B] at a time. The nearest
    selected row is found with the Gram expansion and its distance measured again from explicit
    differences, so a selected row is at exactly 0 from itself (the expansion leaves noise of
    order sqrt(eps) |x| there, which also varied with how the rows were sharded).

    >>> import numpy as np
    >>> x = np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]], np.float32)
    >>> float(mean_nearest_distance(x, np.array([0])))
    5.0
    """
    features = _measured_rows(features, indices, num_rows, ndim=1)
    chunk_size = V.check_count(chunk_size, "chunk_size", 1, 1 << 30)
    centres = features[jnp.asarray(indices)]
    # Distances do not change under translation; measured from a selected row, the Gram
    # expansion does not lose the nearest centre to a large common offset of the features.
    origin = centres[0]

    def block(xb):
        near = distances.pairwise(xb - origin, centres - origin, precision=precision)
        _, idx = distances.first_argmin(near, axis=1)
        diff = xb - centres[idx]
        return jnp.sqrt(jnp.sum(diff * diff, axis=-1))

    return jnp.mean(distances.map_rows(block, features, chunk_size))


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _mean_nearest_many(features, indices, *, chunk_size):
    # One setting at a time: memory of one [chunk_size, B] block.
    return lax.map(lambda idx: mean_nearest_distance(features, idx, chunk_size=chunk_size), indices)


def mean_nearest_distances(features, indices, *, chunk_size: int = distances.DEFAULT_CHUNK,
                           num_rows: int | None = None):
    """`mean_nearest_distance` for each row of `indices` [S, B] -> f[S], in one program."""
    features = _measured_rows(features, indices, num_rows, ndim=2)
    chunk_size = V.check_count(chunk_size, "chunk_size", 1, 1 << 30)
    return _mean_nearest_many(features, jnp.asarray(indices), chunk_size=chunk_size)


def _measured_rows(features, indices, num_rows, ndim):
    """The real rows of a (padded) pool, checked and converted as the selectors take them
    (integer and 16-bit features as float32: int8 differences wrapped around and float16
    squares overflowed), with concrete `num_rows` and indices checked against them (an
    out-of-range gather would clamp silently). Shapes and dtypes are checked traced or not:
    they were errors from deep inside JAX (empty or float indexers, a broadcast)."""
    features = jnp.asarray(V.check_features(features))
    shape = np.shape(indices)
    dtype = indices.dtype if hasattr(indices, "dtype") else np.asarray(indices).dtype
    if len(shape) != ndim:
        raise ValueError(f"indices must be {ndim}-D, got shape {shape}")
    if shape[-1] == 0:
        raise ValueError("indices is empty: the distance to the nearest selected row needs one")
    if dtype == np.bool_ or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"indices must hold integer row numbers, got dtype {dtype}")
    if num_rows is not None:
        num_rows = V.check_count(num_rows, "num_rows", 1, features.shape[0])
    features = real_rows(features, num_rows)
    if not V.is_traced(indices):
        idx = np.asarray(indices)
        if idx.size and (idx.min() < 0 or idx.max() >= features.shape[0]):
            raise ValueError(f"indices must lie in [0, {features.shape[0]}), got "
                             f"{int(idx.min())}..{int(idx.max())}")
    return features


def normalized_entropy(counts) -> float:
    """H(p) / log(C) of a histogram `counts` [C] (p = counts / sum); 1.0 when C <= 1.

    >>> normalized_entropy([5, 5]), normalized_entropy([4, 0])
    (1.0, 0.0)
    """
    counts = np.asarray(counts, np.float64)
    if counts.ndim != 1 or not np.isfinite(counts).all() or (counts < 0).any():
        raise ValueError(f"counts must be a 1-D histogram of non-negative counts, got {counts}")
    if counts.size <= 1:
        return 1.0
    total = counts.sum()
    if total <= 0:
        return 0.0
    if (counts == counts[0]).all():  # H = log C exactly; rounding gave 1 +- 2e-16
        return 1.0
    p = counts[counts > 0] / total
    return min(1.0, max(0.0, float(-(p * np.log(p)).sum() / np.log(counts.size))))


def label_coverage(labels, indices) -> tuple[int, float]:
    """(distinct labels among `labels[indices]`, normalised entropy of their histogram over the
    labels present in the whole pool)."""
    labels = np.asarray(labels)
    classes, pool_ids = np.unique(labels, return_inverse=True)
    picked = pool_ids[np.asarray(indices)]
    counts = np.bincount(picked, minlength=classes.size)
    return int(np.count_nonzero(counts)), normalized_entropy(counts)


# --------------------------------------------------------------------------------------------
# The whole grid.


class SweepOutput(NamedTuple):
    """Result of `sweep`: one row per setting, S = S_core * S_boundary rows.

    params: {name: f64[S]} all six hyperparameters of each row (defaults where not swept).
    core_setting: int32[S] row of `core_indices` (the ActiveFT setting) each row used.
    core_indices: int32[S_core, K] ActiveFT cores of each core setting.
    core_loss: f32[S_core] ActiveFT's loss at its last step (before that step's update; NaN
      with no steps).
    core_mean_distance: f[S_core] mean distance to the nearest core.
    indices: int32[S, B] the selections.
    mean_distance: f[S] mean distance to the nearest selected sample.
    selected_balance, pool_balance: f64[S] normalised pseudo-label entropies.
    label_count: int[S] or None; label_balance: f64[S] or None (when labels are given).
    """

    params: dict
    core_setting: np.ndarray
    core_indices: jax.Array
    core_loss: jax.Array
    core_mean_distance: jax.Array
    indices: jax.Array
    mean_distance: jax.Array
    selected_balance: np.ndarray
    pool_balance: np.ndarray
    label_count: np.ndarray | None
    label_balance: np.ndarray | None


def sweep(key, features, budget: int, grid: Mapping[str, Sequence[float]] | None = None, *,
          num_cores: int | None = None, labels=None, num_steps: int = 300,
          batch_size: int | None = None, num_neighbors: int = 10, normalize: bool = False,
          settings_per_batch: int | None = None, chunk_size: int = distances.DEFAULT_CHUNK,
          precision=None, num_rows: int | None = None) -> SweepOutput:
    """BiLAF (ActiveFT cores, paper-mode boundary stage) over the cartesian product of `grid`.

    Args:
      key: PRNG key, split as `bilaf_jax.pipeline.select` splits it.
      features: [n, d] pool features.
      budget: B. num_cores: K, default `bilaf_jax.pipeline.default_num_cores(B)`.
      grid: {name: values} over `TRACEABLE_PARAMS`; missing names take the stage defaults.
      labels: optional int[n] true labels, used only by the label measures.
      num_steps, batch_size: ActiveFT's (fixed for the sweep).
      precision: of ActiveFT's and the boundary assignment's matmuls, as in `select`.
      num_neighbors, normalize: the boundary stage's (fixed for the sweep).
      settings_per_batch: None = vmap over all settings of a stage; else that many at a time.
      chunk_size: rows per block of the distance passes.
      num_rows: the real rows of a padded, row-sharded pool (`bilaf_jax.sharding.shard_rows`);
        the results equal those on the unpadded rows.

    Not jittable (the boundary stage plans its programs from concrete cores, as `bilaf`);
    `sweep_activeft` is.

    >>> import jax, numpy as np
    >>> x = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    >>> out = sweep(jax.random.key(0), x, 12, {"temperature": [0.05, 0.1],
    ...             "remove_fraction": [0.1, 0.2]}, num_cores=3, num_steps=5)
    >>> out.indices.shape, out.core_indices.shape
    ((4, 12), (2, 3))
    """
    from bilaf_jax.boundary import check_options
    from bilaf_jax.pipeline import default_num_cores

    grid = check_grid(grid or {})
    # The boundary stage's fixed settings, before the (long) ActiveFT sweep (the swept ones
    # were checked with the grid; their defaults stand in for them here).
    check_options(mode="paper", num_neighbors=num_neighbors, precision=precision,
                  **{name: spec[0] for name, spec in BOUNDARY_PARAMS.items()})
    V.check_count(chunk_size, "chunk_size", 1, 1 << 30)
    # before the ActiveFT sweep, as the other settings (bilaf checks normalize only after it)
    normalize = V.check_flag(normalize, "normalize")
    _batches(1, settings_per_batch)
    V.check_key(key)
    features, n = V.check_pool(features, num_rows)
    if V.is_traced(key) or V.is_traced(features):
        # The boundary stage plans its class programs from concrete cores (host arrays).
        raise ValueError("sweep needs concrete features and key: its boundary stage cannot run "
                         "under jax.jit / jax.vmap; call sweep_activeft there, or loop in Python")
    budget = V.check_count(budget, "budget", 1, n)
    if num_cores is None:
        num_cores = default_num_cores(budget)
    num_cores = V.check_count(num_cores, "num_cores", 1, budget)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
        if labels.dtype == object:  # None or mixed types: np.unique fails on them, unnamed
            raise ValueError("labels must be class ids (integers or strings), got objects")
    features = jnp.asarray(features)
    core_key, boundary_key = jax.random.split(key)

    cores = sweep_activeft(core_key, features, num_cores, grid, num_steps=num_steps,
                           batch_size=batch_size, settings_per_batch=settings_per_batch,
                           precision=precision, num_rows=n)
    features = real_rows(features, n)  # the boundary stage and the measures: real rows only
    core_indices = jnp.sort(cores.indices, axis=1)
    core_md = mean_nearest_distances(features, core_indices, chunk_size=chunk_size)
    core_loss = (cores.losses[:, -1] if num_steps else
                 jnp.full(core_indices.shape[0], jnp.nan, jnp.float32))

    rows = {name: [] for name in TRACEABLE_PARAMS}
    setting, indices, sel_bal, pool_bal = [], [], [], []
    for s in range(core_indices.shape[0]):
        res = sweep_boundary(boundary_key, features, to_host(core_indices[s]), budget, grid,
                             num_neighbors=num_neighbors, normalize=normalize,
                             settings_per_batch=settings_per_batch, chunk_size=chunk_size,
                             precision=precision)
        num_b = res.indices.shape[0]
        for name in ACTIVEFT_PARAMS:
            rows[name].append(np.full(num_b, cores.params[name][s]))
        for name in BOUNDARY_PARAMS:
            rows[name].append(res.params[name])
        setting.append(np.full(num_b, s, np.int32))
        indices.append(res.indices)
        pseudo = np.asarray(res.pseudo_labels)
        picked = np.asarray(res.indices)
        kept = np.asarray(res.kept)
        for b in range(num_b):
            sel_bal.append(normalized_entropy(np.bincount(pseudo[picked[b]], minlength=num_cores)))
            pool_bal.append(normalized_entropy(np.bincount(pseudo[kept[b]], minlength=num_cores)))
    indices = jnp.concatenate(indices)
    mean_d = mean_nearest_distances(features, indices, chunk_size=chunk_size)
    label_count = label_balance = None
    if labels is not None:
        cov = [label_coverage(labels, idx) for idx in np.asarray(indices)]
        label_count = np.array([c for c, _ in cov], np.int64)
        label_balance = np.array([b for _, b in cov], np.float64)
    # Several processes: each returns the whole result (see bilaf_jax.sharding).
    return process_local(SweepOutput({k: np.concatenate(v) for k, v in rows.items()}, np.concatenate(setting),
                                     core_indices, core_loss, core_md, indices, mean_d, np.array(sel_bal),
                                     np.array(pool_bal), label_count, label_balance))


def to_records(out: SweepOutput) -> list[dict]:
    """One flat JSON-ready dict per setting (parameters, measures, core setting); a measure
    that is not finite (a diverged or zero-step ActiveFT loss) is None (JSON null)."""
    def num(v):
        v = float(v)
        return v if math.isfinite(v) else None

    records = []
    for i in range(out.indices.shape[0]):
        s = int(out.core_setting[i])
        rec = {name: float(out.params[name][i]) for name in TRACEABLE_PARAMS}
        rec.update(
            core_setting=s,
            activeft_final_loss=num(out.core_loss[s]),
            core_mean_distance=num(out.core_mean_distance[s]),
            mean_distance=num(out.mean_distance[i]),
            selected_balance=num(out.selected_balance[i]),
            pool_balance=num(out.pool_balance[i]),
        )
        if out.label_count is not None:
            rec.update(label_count=int(out.label_count[i]), label_balance=num(out.label_balance[i]))
        records.append(rec)
    return records
