"""Baseline core selectors (paper Table 6): random, FDS / k-center greedy, K-Means.

Same contract as `activeft`: `fn(key, features, num_samples, ...)` returns a NamedTuple whose
`indices` are int32[num_samples], unique and ascending. All jitted; `num_samples` is static.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bilaf_jax import _validation as V
from bilaf_jax import distances


class RandomOutput(NamedTuple):
    """indices: int32[K] ascending, drawn uniformly without replacement."""

    indices: jax.Array


class KCenterOutput(NamedTuple):
    """indices: int32[K] ascending; order: int32[K] in pick order;
    radius: [K], the covering radius (max distance to the chosen set) before each pick
    (+inf before the first, or the distance to the labelled rows when `exclude` is given)."""

    indices: jax.Array
    order: jax.Array
    radius: jax.Array


class KMeansOutput(NamedTuple):
    """indices: int32[K] ascending (nearest distinct sample to each centre);
    matched_indices: int32[K] in centre order; centres: [K, d]; inertia: scalar sum of squared
    distances to the nearest centre; num_iters: Lloyd iterations run."""

    indices: jax.Array
    matched_indices: jax.Array
    centres: jax.Array
    inertia: jax.Array
    num_iters: jax.Array


def _check(key, features, num_samples, exclude, num_rows):
    """Validated (features, num_samples, num_rows, unavailable bool[n] or None)."""
    V.check_key(key)
    features, num_rows = V.check_pool(features, num_rows)
    n = features.shape[0]
    num_samples = V.check_count(num_samples, "num_samples", 1, num_rows)
    excluded = V.check_exclude(exclude, num_rows, num_samples, total=n)
    return features, num_samples, num_rows, V.unavailable_rows(excluded, n, num_rows)


def random_select(key, features, num_samples: int, *, exclude=None, num_rows=None) -> RandomOutput:
    """`num_samples` rows of `features` [n, d] uniformly at random, without replacement.

    exclude: int[m] rows already labelled, never chosen.
    num_rows: real rows of a padded, sharded pool (`bilaf_jax.sharding`); the rest are ignored.

    >>> import jax, numpy as np
    >>> random_select(jax.random.key(0), np.zeros((10, 2)), 3).indices.shape
    (3,)
    """
    features, num_samples, num_rows, unavailable = _check(key, features, num_samples, exclude, num_rows)
    if unavailable is not None and not unavailable[:num_rows].any():
        unavailable = None  # padding only: drawing from the first num_rows is the same thing
    return _random_select(key, unavailable, num_rows, num_samples=num_samples)


@functools.partial(jax.jit, static_argnums=(2,), static_argnames=("num_samples",))
def _random_select(key, unavailable, num_rows, *, num_samples):
    if unavailable is None:
        idx = jax.random.choice(key, num_rows, (num_samples,), replace=False)
    else:
        free = (~unavailable).astype(jnp.float32)
        idx = jax.random.choice(key, free.shape[0], (num_samples,), replace=False, p=free / free.sum())
    return RandomOutput(jnp.sort(idx.astype(jnp.int32)))


class _KCenterState(NamedTuple):
    min_dist: jax.Array  # [n] distance to the nearest chosen row
    order: jax.Array  # [K]
    radius: jax.Array  # [K]


def kcenter_select(key, features, num_samples: int, *, exclude=None, num_rows=None) -> KCenterOutput:
    """Farthest-point (k-center greedy) selection: FDS / CoreSet in the paper.

    Starts from a uniformly random row (as the authors' FDS does), then repeatedly adds the row
    farthest (Euclidean, features as given) from the chosen set; ties go to the lowest index.
    With `exclude` (rows already labelled), those rows form the initial chosen set instead of
    a random row (the CoreSet rule for a labelled pool). Cost O(K n d), memory O(n).
    num_rows: real rows of a padded, sharded pool (`bilaf_jax.sharding`); the rest are ignored.
    """
    features, num_samples, num_rows, unavailable = _check(key, features, num_samples, exclude, num_rows)
    padding = jnp.arange(features.shape[0]) >= num_rows
    if unavailable is None or not unavailable[:num_rows].any():
        return _kcenter(key, features, padding, num_rows, num_samples=num_samples)
    labelled = np.flatnonzero(unavailable[:num_rows]).astype(np.int32)
    return _kcenter_from(features, padding, labelled, num_samples=num_samples)


@functools.partial(jax.jit, static_argnames=("num_samples",))
def _kcenter_from(features, padding, labelled, *, num_samples):
    x = features.astype(jnp.promote_types(features.dtype, jnp.float32))

    def cover(min_dist, i):
        d = distances.squared_to_point(x, x[i])
        return jnp.minimum(min_dist, d), None

    min_dist, _ = lax.scan(cover, jnp.full(x.shape[0], jnp.inf, x.dtype), labelled)
    min_dist = min_dist.at[labelled].set(-1.0)  # labelled rows are never picked
    return _kcenter_loop(x, jnp.where(padding, -1.0, min_dist), 0, num_samples)


@functools.partial(jax.jit, static_argnums=(3,), static_argnames=("num_samples",))
def _kcenter(key, features, padding, num_rows, *, num_samples):
    x = features.astype(jnp.promote_types(features.dtype, jnp.float32))
    first = jax.random.randint(key, (), 0, num_rows, dtype=jnp.int32)
    min_dist = distances.squared_to_point(x, x[first])
    min_dist = jnp.where(padding, -1.0, min_dist).at[first].set(-1.0)
    out = _kcenter_loop(x, min_dist, 1, num_samples)
    order = out.order.at[0].set(first)
    return KCenterOutput(jnp.sort(order), order, out.radius.at[0].set(jnp.inf))


def _kcenter_loop(x, min_dist, start, num_samples):
    """Greedy picks start..K-1, given each row's squared distance to the chosen set (-1 for
    rows in it)."""

    def dist_to(i):
        return distances.squared_to_point(x, x[i])

    def step(t, state: _KCenterState) -> _KCenterState:
        # Chosen rows carry -1, so they are never picked again, while duplicates of a chosen
        # row (at distance 0) stay pickable once everything else is covered.
        pick = jnp.argmax(state.min_dist).astype(jnp.int32)
        radius = jnp.sqrt(jnp.maximum(state.min_dist[pick], 0.0))
        min_dist = jnp.minimum(state.min_dist, dist_to(pick)).at[pick].set(-1.0)
        return _KCenterState(min_dist, state.order.at[t].set(pick), state.radius.at[t].set(radius))

    state = _KCenterState(min_dist, jnp.zeros(num_samples, jnp.int32),
                          jnp.full(num_samples, jnp.inf, x.dtype))
    state = lax.fori_loop(start, num_samples, step, state)
    return KCenterOutput(jnp.sort(state.order), state.order, state.radius)


class _SeedState(NamedTuple):
    centres: jax.Array  # [K, d]
    min_dist: jax.Array  # [n] squared distance to the nearest seed so far


class _LloydState(NamedTuple):
    centres: jax.Array
    shift: jax.Array  # squared movement of centres in the last iteration
    it: jax.Array


def kmeans_select(key, features, num_samples: int, *, num_iters: int = 100, tol: float = 1e-6,
                  chunk_size: int = distances.DEFAULT_CHUNK, exclude=None,
                  num_rows=None) -> KMeansOutput:
    """K-Means baseline: k-means++ seeding, Lloyd iterations, nearest distinct sample per centre.

    Lloyd stops after `num_iters` iterations or when the total squared movement of the centres
    falls below `tol` times the pool's mean squared distance from its mean (its total variance;
    scikit-learn's `tol` is relative to the mean variance per feature, d times less). A centre that loses all its
    points stays where it was. Each centre, in order, then takes its nearest row not already
    taken, so the K indices are distinct. `exclude`: rows already labelled, never chosen.
    `num_rows`: real rows of a padded, sharded pool (`bilaf_jax.sharding`); the rest are ignored.
    """
    features, num_samples, num_rows, unavailable = _check(key, features, num_samples, exclude, num_rows)
    chunk_size = V.check_count(chunk_size, "chunk_size", 1, 1 << 30)
    num_iters = V.check_count(num_iters, "num_iters", 0, 10**7)
    V.check_positive(tol, "tol", allow_zero=True)
    return _kmeans(key, features, tol, unavailable, num_rows, num_samples=num_samples, num_iters=num_iters,
                   chunk_size=chunk_size)


@functools.partial(jax.jit, static_argnums=(4,), static_argnames=("num_samples", "num_iters", "chunk_size"))
def _kmeans(key, features, tol, unavailable, num_rows, *, num_samples, num_iters, chunk_size):
    n, d = features.shape
    x = features.astype(jnp.promote_types(features.dtype, jnp.float32))
    first_key, seed_key = jax.random.split(key)
    real = jnp.arange(n) < num_rows  # padding rows of a sharded pool are not data

    def sq_to(point):
        return jnp.where(real, distances.squared_to_point(x, point), 0.0)

    # k-means++: each next seed drawn with probability proportional to D(x)^2.
    first = x[jax.random.randint(first_key, (), 0, num_rows)]

    def seed_step(t, state: _SeedState) -> _SeedState:
        logits = jnp.where(state.min_dist > 0, jnp.log(state.min_dist), -jnp.inf)
        # All rows coincide with seeds (duplicates): fall back to uniform.
        logits = jnp.where(jnp.isinf(logits).all(), jnp.where(real, 0.0, -jnp.inf), logits)
        i = jax.random.categorical(jax.random.fold_in(seed_key, t), logits)
        return _SeedState(state.centres.at[t].set(x[i]), jnp.minimum(state.min_dist, sq_to(x[i])))

    seeds = _SeedState(jnp.zeros((num_samples, d), x.dtype).at[0].set(first), sq_to(first))
    centres = lax.fori_loop(1, num_samples, seed_step, seeds).centres
    weight = real.astype(x.dtype)
    # Lloyd's assignments use the Gram form: a pool far from the origin is translated first
    # (distances unchanged, centres moved back at the end; see distances.centring_shift).
    shift = distances.centring_shift(x, weight)
    # A row opposite the mean can end up twice as far from the origin as validation allows,
    # and the Gram form's ||x||^2 + ||c||^2 then overflows: halve such a pool (a power of two
    # changes no rounding; centres and inertia are scaled back exactly, the picks are the same).
    x, centres = x - shift, centres - shift
    factor = jnp.where(jnp.max(jnp.abs(x)) > math.sqrt(jnp.finfo(x.dtype).max / (4 * d)),
                       0.5, 1.0).astype(x.dtype)
    x, centres = x * factor, centres * factor
    # Mean squared distance from the mean (translation-free, like the selection), each term
    # divided first: the plain sum overflows for features that validation accepts (each
    # squared norm fits, n of them need not), which stopped Lloyd's iterations before the first.
    mean = jnp.sum((weight / num_rows)[:, None] * x, axis=0)
    scale = jnp.sum(weight * (jnp.sum((x - mean) ** 2, axis=1) / num_rows))

    def lloyd_cond(state: _LloydState):
        return (state.it < num_iters) & (state.shift > tol * scale)

    def lloyd_step(state: _LloydState) -> _LloydState:
        assign = distances.nearest_centre(x, state.centres, chunk_size=chunk_size).index
        sums = jax.ops.segment_sum(x * weight[:, None], assign, num_segments=num_samples)
        counts = jax.ops.segment_sum(weight, assign, num_segments=num_samples)
        new = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], state.centres)
        shift = jnp.sum((new - state.centres) ** 2)
        return _LloydState(new, shift, state.it + 1)

    state = lax.while_loop(lloyd_cond, lloyd_step,
                           _LloydState(centres, jnp.array(jnp.inf, x.dtype), jnp.array(0)))
    inertia = jnp.sum(weight * distances.nearest_centre(x, state.centres, chunk_size=chunk_size).distance)
    matched = distances.greedy_unique_match(x, state.centres, chunk_size=chunk_size, taken=unavailable)
    return KMeansOutput(jnp.sort(matched), matched, state.centres / factor + shift,
                        inertia / (factor * factor), state.it)
