"""Stage 1: core samples by ActiveFT (Xie et al., CVPR 2023), as the BiLAF authors run it.

K free centroids `theta` are optimised so that their normalised versions cover the pool's
normalised features while staying spread out:

    c = normalize(theta)                           [K, d]
    s_ij = f_i . c_j / tau,  p(i) = argmax_j s_ij   (f_i L2-normalised)
    S_j = sum_k exp(stopgrad(c_k) . c_j / tau)      (all K, self included)
    loss = mean_i log(1 + lambda * S_p(i) / exp(s_i,p(i)))

then each centroid, in order, takes its most similar pool sample not yet taken.

The data term's gradient reaches only each row's argmax centroid, so the assignment is computed
without gradient (one chunked matmul), and the similarity s_i,p(i) has a custom gradient
(`custom_vjp`) whose backward pass is a scatter-add of features by assignment (`segment_sum`),
not a second [n, K] matmul. The loss is evaluated
in log space (logsumexp, softplus), which equals the authors' exp/log form but cannot overflow
for small temperatures.
"""

from __future__ import annotations

import functools
import random
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from bilaf_jax import _validation as V
from bilaf_jax import distances


class ActiveFTOutput(NamedTuple):
    """Result of `activeft`.

    indices: int32[K], the selected pool rows, unique, ascending (the pseudo-class order).
    matched_indices: int32[K], the same rows in centroid order (row j was taken by centroid j).
    centroids: [K, d], final normalised centroids.
    losses: f32[num_steps], the loss before each optimiser step.
    init_indices: int32[K], the pool rows the centroids started from.
    """

    indices: jax.Array
    matched_indices: jax.Array
    centroids: jax.Array
    losses: jax.Array
    init_indices: jax.Array


class ActiveFTState(NamedTuple):
    theta: jax.Array  # [K, d] free centroid parameters
    opt_state: optax.OptState
    losses: jax.Array  # [num_steps]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def assigned_similarity(centroids, features, chunk_size=distances.DEFAULT_CHUNK, precision=None):
    """Each row's best similarity to `centroids` [K, d] and which centroid gives it.

    features [b, d] -> (s f[b] = max_j f_i . c_j, p int32[b] = argmax_j, ties: lowest j).
    The backward pass w.r.t. `centroids` is a scatter-add of features by assignment (the
    gradient of a max reaches only its argmax); `features` get no gradient.
    """
    return _assigned_similarity_fwd(centroids, features, chunk_size, precision)[0]


def _assigned_similarity_fwd(centroids, features, chunk_size, precision):
    def block(xb):
        # [K, c] layout: XLA's CPU reductions run faster along the leading axis.
        sim = distances.matmul(centroids, xb.T, precision)
        return distances.first_argmax(sim, axis=0)

    s, p = distances.map_rows(block, features, chunk_size)
    return (s, p), (features, p, centroids)


def _assigned_similarity_bwd(chunk_size, precision, residuals, cotangents):
    features, p, centroids = residuals
    g_s, _ = cotangents
    g_c = jax.ops.segment_sum(g_s[:, None] * features, p, num_segments=centroids.shape[0])
    # The cotangent takes the centroids' dtype, which may differ from the features' (float32
    # centroids against float64 or bfloat16 features).
    return g_c.astype(centroids.dtype), None


assigned_similarity.defvjp(_assigned_similarity_fwd, _assigned_similarity_bwd)


def activeft_loss(theta, features, temperature, balance, *, chunk_size=distances.DEFAULT_CHUNK,
                  precision=None, row_mask=None):
    """The authors' ActiveFT objective. theta [K, d]; features [b, d] L2-normalised -> scalar.

    Value and gradient equal the authors' PyTorch loss (gradient flows through c_p(i) in the
    data term and through c_j, not c_k, in the Gram term). `row_mask` bool[b]: rows that count
    (padding rows of a sharded pool do not).
    """
    c = distances.normalize(theta)
    sim, assign = assigned_similarity(c, features, chunk_size, precision)
    s = sim / temperature  # [b]
    # [K, K]: k, j. Never at a reduced `precision`: exp(./tau) would amplify bfloat16 rounding,
    # and it is cheap.
    gram = distances.matmul(lax.stop_gradient(c), c.T) / temperature
    log_s = jax.nn.logsumexp(gram, axis=0)  # [K]: log S_j
    # log(1 + lambda * S / e) = softplus(log lambda + log S - s)
    per_row = jax.nn.softplus(jnp.log(balance) + log_s[assign] - s)
    if row_mask is None:
        return jnp.mean(per_row)
    return jnp.sum(jnp.where(row_mask, per_row, 0.0)) / jnp.sum(row_mask)


def activeft(key, features, num_samples: int, *, num_steps: int = 300, temperature=0.07,
             learning_rate=1e-3, balance=1.0, batch_size: int | None = None, init_indices=None,
             batch_indices=None, optimizer: optax.GradientTransformation | None = None,
             chunk_size: int = 16384, precision=None, exclude=None,
             num_rows: int | None = None) -> ActiveFTOutput:
    """Select `num_samples` core samples from `features` [n, d] with ActiveFT.

    Args:
      key: PRNG key (initial centroids unless `init_indices` is given; batch rows per step).
      features: [n, d] pool features (normalised internally). Computed in float32 as the
        authors do, or in float64 for float64 features under `jax.enable_x64`.
      num_samples: K, number of samples to select (1 <= K <= n).
      num_steps: optimiser steps (authors: 300 full-batch; 100 on ImageNet with batches).
      temperature, learning_rate, balance: tau, Adam's lr and lambda; traceable (vmap-able).
      batch_size: None for full-batch steps; else a fresh random batch of rows per step
        (the authors' ImageNet variant, 100,000 rows), drawn without replacement.
      init_indices: int[K] pool rows to start from (to reproduce a given run).
      batch_indices: int[num_steps, batch_size] the rows of each step's batch, distinct within
        a step, instead of drawing them (to reproduce a given run: `authors_imagenet_draws`
        gives the authors' ImageNet script's). Needs `batch_size`.
      optimizer: any optax transformation; default `optax.adam(learning_rate)` (then
        `learning_rate` is ignored when an optimizer is given). Reuse the same object across
        calls to avoid recompiling.
      chunk_size: rows per block in the assignment matmuls (bounds memory).
      precision: similarity matmuls: "float32" (default), "tensorfloat32" (NVIDIA GPUs) or
        "bfloat16", the last two accumulating in float32 (see `bilaf_jax.distances`).
      exclude: int[m] rows already labelled: never selected, never used as initial centroids
        (they still shape the objective as part of the pool).
      num_rows: the real rows when `features` was padded to shard evenly (`bilaf_jax.sharding`):
        rows from `num_rows` on are ignored.

    Returns:
      ActiveFTOutput; `indices` ascending.

    >>> import jax, numpy as np
    >>> x = np.random.default_rng(0).normal(size=(100, 8)).astype(np.float32)
    >>> out = activeft(jax.random.key(0), x, 5, num_steps=10)
    >>> out.indices.shape, out.losses.shape
    ((5,), (10,))
    """
    V.check_key(key)
    features, num_rows = V.check_pool(features, num_rows)
    n = features.shape[0]
    num_samples = V.check_count(num_samples, "num_samples", 1, num_rows)
    num_steps = V.check_count(num_steps, "num_steps", 0, 10**9)
    if batch_size is not None:
        batch_size = V.check_count(batch_size, "batch_size", 1, num_rows)
    if batch_indices is not None:
        batch_indices = _check_batch_indices(batch_indices, batch_size, num_steps, num_rows)
    if batch_size == num_rows:  # every step's batch is the whole pool (in any order)
        batch_size = batch_indices = None
    V.check_positive(temperature, "temperature")
    V.check_temperature(temperature)
    V.check_positive(learning_rate, "learning_rate", allow_zero=True)
    V.check_positive(balance, "balance")
    V.check_float32(learning_rate, "learning_rate")
    V.check_float32(balance, "balance")
    excluded = V.check_exclude(exclude, num_rows, num_samples, total=n)
    if excluded is not None and not excluded.any():
        excluded = None  # exclude=[] draws the same initial rows as exclude=None
    if init_indices is not None:
        init_indices = V.check_indices(init_indices, num_rows, "init_indices", num_samples)
        if excluded is not None and excluded[init_indices].any():
            raise ValueError("init_indices include excluded rows")
        init_indices = jnp.asarray(init_indices)
    distances.resolve_precision(precision)  # unknown names fail here, before tracing
    chunk_size = V.check_count(chunk_size, "chunk_size", 1, 1 << 30)
    if optimizer is not None and not isinstance(optimizer, optax.GradientTransformation):
        raise ValueError(f"optimizer must be an optax.GradientTransformation, got {type(optimizer)}")
    return _activeft(key, features, init_indices, V.unavailable_rows(excluded, n, num_rows), temperature,
                     learning_rate, balance, batch_indices, num_samples=num_samples, num_steps=num_steps,
                     batch_size=batch_size, num_rows=num_rows, has_excluded=excluded is not None,
                     optimizer=optimizer, chunk_size=chunk_size, precision=precision)


@functools.partial(jax.jit, static_argnames=("num_samples", "num_steps", "batch_size", "num_rows",
                                             "has_excluded", "optimizer", "chunk_size", "precision"))
def _activeft(key, features, init_indices, unavailable, temperature, learning_rate, balance,
              batch_indices, *, num_samples, num_steps, batch_size, num_rows, has_excluded, optimizer, chunk_size,
              precision):
    n = features.shape[0]
    dtype = jnp.promote_types(features.dtype, jnp.float32)
    x = features.astype(dtype)
    # normalize's eps (torch's 1e-12) would leave every row of a pool of tiny values (accepted
    # down to about 1e-16) short of unit length: lift such a pool by a power of two, which
    # gives the unit rows of the same pool at any ordinary scale. Other pools: times 1.
    # The scale is that of the real rows (padding may hold anything), sliced as [n] row maxima
    # so that a sharded pool is not gathered.
    row_max = jnp.max(jnp.abs(x), axis=1)  # [n]
    _, exponent = jnp.frexp(jnp.max(row_max[:num_rows]))
    x = x * jnp.where(exponent < -16, jnp.ldexp(jnp.ones((), dtype), -exponent), 1.0).astype(dtype)
    feats = distances.normalize(x)
    init_key, batch_key = jax.random.split(key)
    if init_indices is None and (unavailable is None or not has_excluded):
        init_indices = jax.random.choice(init_key, num_rows, (num_samples,), replace=False)
    elif init_indices is None:
        # Drawn over the real rows: padding must not change the draw, whatever the PRNG's
        # `jax_threefry_partitionable` setting (without it, the bits depend on the length).
        free = (~unavailable[:num_rows]).astype(jnp.float32)
        init_indices = jax.random.choice(init_key, num_rows, (num_samples,), replace=False,
                                         p=free / free.sum())
    init_indices = init_indices.astype(jnp.int32)
    theta = feats[init_indices]
    tx = optimizer if optimizer is not None else optax.adam(learning_rate)
    row_mask = None if num_rows == n else jnp.arange(n) < num_rows
    loss_fn = functools.partial(activeft_loss, temperature=temperature, balance=balance,
                                chunk_size=chunk_size, precision=precision)

    def step(t, state: ActiveFTState) -> ActiveFTState:
        if batch_size is None:
            batch, mask = feats, row_mask
        else:
            rows = (batch_indices[t] if batch_indices is not None else
                    jax.random.choice(jax.random.fold_in(batch_key, t), num_rows, (batch_size,),
                                      replace=False))
            batch, mask = feats[rows], None
        loss, grad = jax.value_and_grad(loss_fn)(state.theta, batch, row_mask=mask)
        updates, opt_state = tx.update(grad, state.opt_state, state.theta)
        theta = optax.apply_updates(state.theta, updates)
        return ActiveFTState(theta, opt_state, state.losses.at[t].set(loss.astype(jnp.float32)))

    state = ActiveFTState(theta, tx.init(theta), jnp.zeros(num_steps, jnp.float32))
    if num_steps:  # the body is traced even for no steps, and would index an empty trace
        state = lax.fori_loop(0, num_steps, step, state)
    centroids = distances.normalize(state.theta)
    matched = distances.greedy_unique_match(feats, centroids, "dot", chunk_size=chunk_size,
                                            precision=precision, taken=unavailable)
    return ActiveFTOutput(jnp.sort(matched), matched, centroids, state.losses, init_indices)


def _check_batch_indices(batch_indices, batch_size, num_steps: int, num_rows: int) -> jax.Array:
    """`batch_indices` as int32 [num_steps, batch_size], each step's rows distinct pool rows."""
    if batch_size is None:
        raise ValueError("batch_indices needs batch_size (the rows of each step's batch)")
    if V.is_traced(batch_indices):
        raise ValueError("batch_indices must be concrete (not traced inside jit/vmap)")
    arr = np.asarray(batch_indices)
    if arr.shape != (num_steps, batch_size):
        raise ValueError(f"batch_indices must have shape (num_steps, batch_size) = "
                         f"{(num_steps, batch_size)}, got {arr.shape}")
    for t, rows in enumerate(arr):  # (one check per step: a bad one is named)
        V.check_indices(rows, num_rows, f"batch_indices[{t}]")
    return jnp.asarray(arr.astype(np.int32))


def authors_imagenet_draws(n: int, num_samples: int, num_steps: int = 100,
                           batch_size: int = 100_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The rows the authors' ImageNet core script draws for a pool of `n` rows:
    (init_indices int64[K], batch_indices int32[num_steps, batch_size]).

    Their script seeds Python's `random` with 0, takes K distinct rows to start the centroids
    from, then a fresh sample of `batch_size` distinct rows per step, all with
    `random.sample` over the row ids. Pass both to `activeft` (with `batch_size`) to repeat its
    run on the same features in the same row order (their feature file's). Python's `random`
    runs on the host: 3.8 s for ImageNet's pool (K = 6,405, 100 steps of 100,000 rows) on a
    2-core CPU.

    >>> init, batches = authors_imagenet_draws(1000, 5, num_steps=2, batch_size=10)
    >>> init.shape, batches.shape
    ((5,), (2, 10))
    """
    n = V.check_count(n, "n", 1, 2**31 - 1)
    num_samples = V.check_count(num_samples, "num_samples", 1, n)
    num_steps = V.check_count(num_steps, "num_steps", 0, 10**9)
    batch_size = V.check_count(batch_size, "batch_size", 1, n)
    rng = random.Random(seed)  # as `random.seed(seed)` seeds the module's own generator
    rows = range(n)  # random.sample indexes its population: a range draws as their list does
    init = np.asarray(rng.sample(rows, num_samples), np.int64)
    batches = np.empty((num_steps, batch_size), np.int32)
    for t in range(num_steps):
        batches[t] = rng.sample(rows, batch_size)
    return init, batches
