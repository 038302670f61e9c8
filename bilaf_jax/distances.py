"""Chunked distances used by every stage: pairwise blocks, nearest-centre assignment, k-NN.

Dimension glossary (used in shapes throughout the library):
  n  pool size (rows of `features`)       d  feature dimension
  m  number of query rows                 K  number of centres / core samples
  k  neighbours in a k-NN query           B  selection budget
  c  chunk size (rows processed at once)

Nothing here materialises more than a [c, K] (or [c, m]) block: queries are processed `chunk_size`
rows at a time with `lax.map`, so memory is bounded at ImageNet scale. All functions are pure and
jit-compatible; `chunk_size` and `k` are static.

Metrics:
  "sqeuclidean"  ||x - y||^2
  "euclidean"    ||x - y||
  "cosine"       1 - x.y / (||x|| ||y||)
  "dot"          -x.y   (a dissimilarity, so "nearest" = largest inner product)

Matmul precision (`precision=`): "float32" (default: full float32 on every device),
"tensorfloat32" (TF32 inputs, float32 accumulation; NVIDIA GPUs only) or "bfloat16" (bfloat16
inputs, float32 accumulation). The faster two may flip near-ties in argmax/argmin decisions; a
`jax.lax.Precision` or `DotAlgorithmPreset` is passed through unchanged.

`direct=True` computes Euclidean distances from explicit differences instead of the Gram
expansion ||x||^2 + ||y||^2 - 2 x.y: slower, but free of cancellation error, and added up feature
by feature in scipy's `cdist` order, so float64 distances on a CPU are scipy's bit for bit. The
official mode uses it in float64 to reproduce the authors' orderings.
The expansion's error grows with the rows' distance from the origin, about eps ||x||^2 in the
squared distance; the selectors translate a pool that lies far from the origin first
(`centring_shift`), which leaves its distances as they are.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bilaf_jax._as_numpy import nonnegative_product

METRICS = ("sqeuclidean", "euclidean", "cosine", "dot")
PRECISIONS = ("float32", "tensorfloat32", "bfloat16")
DEFAULT_CHUNK = 2048


def resolve_precision(precision):
    """Map a precision name (see module docstring) to what `jnp.matmul` takes."""
    if precision is None or precision == "float32":
        return lax.Precision.HIGHEST
    if precision == "bfloat16":
        return lax.DotAlgorithmPreset.BF16_BF16_F32
    if precision == "tensorfloat32":
        if jax.default_backend() != "gpu":
            raise ValueError("precision 'tensorfloat32' needs an NVIDIA GPU; use 'float32' or 'bfloat16'")
        return lax.DotAlgorithmPreset.TF32_TF32_F32
    if isinstance(precision, str):
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    return precision


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")


def _check_rows(x, y, x_name: str, y_name: str, y_mask=None, mask_name: str = "") -> None:
    """ValueError unless x [m, d] and y [p, d] are 2-D with one d, y has rows, and y_mask (if
    given) is [p]. Shapes only, so it holds inside jit too."""
    sx, sy = jnp.shape(x), jnp.shape(y)
    if len(sx) != 2 or len(sy) != 2:
        raise ValueError(f"{x_name} and {y_name} must be 2-D [rows, d], got shapes {sx} and {sy}")
    if sx[1] != sy[1]:
        raise ValueError(f"{x_name} rows have {sx[1]} dimensions, {y_name} rows {sy[1]}")
    if sy[0] == 0:
        raise ValueError(f"{y_name} is empty: shape {sy}")
    if y_mask is not None and jnp.shape(y_mask) != (sy[0],):
        raise ValueError(f"{mask_name} must have one entry per row of {y_name} ({sy[0]}), got "
                         f"shape {jnp.shape(y_mask)}")


def normalize(x, axis: int = -1, eps: float = 1e-12):
    """L2-normalise rows (like torch.nn.functional.normalize: x / max(||x||, eps)).

    An all-zero row stays zero with a finite gradient (1 / eps, as torch's): sqrt's derivative
    at 0 is infinite, and 0 * inf would make an all-zero ActiveFT centroid NaN after one step.
    """
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return x / jnp.maximum(norm, eps)


def centring_shift(x, weight=None):
    """The [d] translation the selectors subtract from a pool `x` [n, d] before Gram-form
    distances: the mean row where it lies farther from the origin than the rows' RMS distance
    from it, else exact zeros. `weight`: optional [n] row weights (0 for padding rows).

    The Gram expansion loses about eps ||x||^2 to cancellation, so a pool offset far from the
    origin (raw intensities, features of one sign) has its near-ties decided by rounding; after
    the shift ||x|| is of the order of the pool's spread. Translation leaves every Euclidean
    distance as it is, and a pool near the origin is left bit for bit (x - 0 == x). Where every
    value is an integer (raw pixels, counts) the shift is the mean rounded to integers: the
    translated rows stay integers, so distances tied exactly stay tied (the mean's fractions
    would round them apart).
    """
    x = jnp.asarray(x)
    w = jnp.ones(x.shape[0], x.dtype) if weight is None else jnp.asarray(weight, x.dtype)
    total = jnp.sum(w)
    # Each row divided first: the plain sum can overflow where every row fits.
    mean = jnp.sum((w / total)[:, None] * x, axis=0)
    spread = jnp.sum((w / total) * jnp.sum((x - mean) ** 2, axis=1))
    shift = jnp.where(jnp.all(x == jnp.round(x)), jnp.round(mean), mean)
    return jnp.where(jnp.sum(mean * mean) > spread, shift, jnp.zeros_like(mean))


def pairwise(x, y, metric: str = "sqeuclidean", *, direct: bool = False, precision=None):
    """Distances between every row of `x` [a, d] and every row of `y` [b, d] -> [a, b].

    One block, not chunked: call it on blocks, or use `map_rows` / `nearest_centre` / `knn`.
    """
    _check_metric(metric)
    if metric in ("sqeuclidean", "euclidean"):
        if direct:
            sq = _ordered_squares(x, y)
        else:
            xy = matmul(x, y.T, precision)
            sq = jnp.sum(x * x, -1)[:, None] + jnp.sum(y * y, -1)[None, :] - 2.0 * xy
            sq = jnp.maximum(sq, 0.0)
        return jnp.sqrt(sq) if metric == "euclidean" else sq
    if metric == "cosine":
        return 1.0 - matmul(normalize(x), normalize(y).T, precision)
    return -matmul(x, y.T, precision)


def _ordered_squares(x, y):
    """[a, b] squared distances from explicit differences, added feature after feature in
    order from 0 (as scipy's `cdist` adds them), so that float64 results equal scipy's bit
    for bit on a CPU; the [a, b] sum is the only array kept across features."""
    xt, yt = jnp.asarray(x).T, jnp.asarray(y).T

    def add(j, acc):
        diff = xt[j][:, None] - yt[j][None, :]
        return acc + nonnegative_product(diff, diff)  # rounded, as scipy's, before it is added

    zeros = jnp.zeros((xt.shape[1], yt.shape[1]), jnp.result_type(xt, yt))
    return lax.fori_loop(0, xt.shape[0], add, zeros, unroll=8)


def squared_to_point(x, point):
    """||x_i - point||^2 for each row of `x` [n, d] -> [n], from explicit differences (one
    fused pass over `x`; no promise of scipy's order, see `pairwise(direct=True)`)."""
    diff = x - point[None, :]
    return jnp.sum(diff * diff, axis=-1)


def matmul(a, b, precision=None):
    """a @ b under a precision policy (see module docstring); float64 inputs stay float64."""
    if a.dtype == jnp.float64 or b.dtype == jnp.float64:
        return jnp.matmul(a, b, precision=lax.Precision.HIGHEST)
    out_type = jnp.result_type(a, b)
    if isinstance(precision, str) and precision == "bfloat16":
        # Inputs rounded to bfloat16 explicitly: XLA's CPU backend ignores the BF16_BF16_F32
        # algorithm preset (its results were float32's, bit for bit); GPUs run this the same.
        return jnp.matmul(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                          preferred_element_type=jnp.float32).astype(out_type)
    return jnp.matmul(a, b, precision=resolve_precision(precision)).astype(out_type)


def map_rows(fn, x, chunk_size: int = DEFAULT_CHUNK):
    """Apply `fn` (rows [c, ...] -> outputs with leading dim c) to `x` in chunks of rows.

    Equivalent to `fn(x)` but only `chunk_size` rows are live at once. Rows are padded to a
    multiple of the chunk with copies of row 0 and the padding is dropped from the result.
    """
    n = x.shape[0]
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if n <= chunk_size:
        return fn(x)
    num_chunks = -(-n // chunk_size)
    pad = num_chunks * chunk_size - n
    if pad:
        x = jnp.concatenate([x, jnp.broadcast_to(x[:1], (pad,) + x.shape[1:])], axis=0)
    blocks = x.reshape((num_chunks, chunk_size) + x.shape[1:])
    out = lax.map(fn, blocks)
    return jax.tree.map(lambda o: o.reshape((num_chunks * chunk_size,) + o.shape[2:])[:n], out)


def pairwise_chunked(x, y, metric: str = "sqeuclidean", *, chunk_size: int = DEFAULT_CHUNK,
                     direct: bool = False):
    """Full [a, b] distance matrix computed `chunk_size` rows of `x` at a time (for small b)."""
    return map_rows(lambda xb: pairwise(xb, y, metric, direct=direct), x, chunk_size)


class Assignment(NamedTuple):
    """Nearest-centre assignment of each row.

    index: int32[n], position of the nearest centre (ties: lowest position).
    distance: [n], distance to it under the metric used.
    """

    index: jax.Array
    distance: jax.Array


def nearest_centre(points, centres, metric: str = "sqeuclidean", *, centre_mask=None,
                   chunk_size: int = DEFAULT_CHUNK, direct: bool = False,
                   precision=None) -> Assignment:
    """Assign each of `points` [n, d] to its nearest row of `centres` [K, d].

    centre_mask: optional bool[K]; False centres are never chosen.
    Never materialises more than a [chunk_size, K] block.
    """
    _check_metric(metric)
    _check_rows(points, centres, "points", "centres", centre_mask, "centre_mask")

    def block(xb):
        dist = pairwise(xb, centres, metric, direct=direct, precision=precision)
        if centre_mask is not None:
            dist = jnp.where(centre_mask[None, :], dist, jnp.inf)
        low, idx = first_argmin(dist, axis=1)
        return idx, low

    idx, dist = map_rows(block, points, chunk_size)
    return Assignment(idx, dist)


# Widest rows for which `smallest_k` extracts rather than calling top-k (float32).
_EXTRACT_MAX = 512


def first_argmin(values, axis: int = -1):
    """(min, first index of the min) along `axis`; values must not contain NaN.

    Same result as `jnp.min` + `jnp.argmin`, but as two plain reductions: XLA's CPU argmin
    is a variadic (value, index) reduction, 3-11x slower than these two on this project's CPU
    (`scripts/bench_reductions.py`).
    """
    n = values.shape[axis]
    low = jnp.min(values, axis=axis, keepdims=True)
    pos = lax.broadcasted_iota(jnp.int32, values.shape, axis % values.ndim)
    idx = jnp.min(jnp.where(values == low, pos, n), axis=axis)
    return jnp.squeeze(low, axis), idx


def first_argmax(values, axis: int = -1):
    """(max, first index of the max) along `axis`; see `first_argmin`."""
    high, idx = first_argmin(-values, axis)
    return -high, idx


def smallest_k(values, k: int):
    """The k smallest entries along the last axis, ascending (ties: lower index first).

    values: [..., p] -> (values [..., k], int32 indices [..., k]), k static, 0 < k <= p,
    no NaN. Up to p = 512, and always in float64, this takes k rounds of `first_argmin`
    extraction; wider float32 rows use top-k. On this project's CPU extraction measured
    1.3-2.0x faster than XLA's top-k in float32 at p = 42-250 and 7-18x faster in float64,
    where XLA has no top-k kernel (`scripts/bench_reductions.py`). Once only +inf is left,
    the index returned may repeat an earlier +inf entry's; callers treat +inf as empty.
    """
    p = values.shape[-1]
    if p > _EXTRACT_MAX and values.dtype != jnp.float64:
        # top-k orders floats by their bits, -0.0 below +0.0: make them the tie they are
        # (a "dot" distance is -0.0 or +0.0 by the signs of the zero products).
        values = jnp.where(values == 0, jnp.zeros_like(values), values)
        neg, idx = lax.top_k(-values, k)
        return -neg, idx.astype(jnp.int32)
    pos = lax.broadcasted_iota(jnp.int32, values.shape, values.ndim - 1)
    out_v, out_i = [], []
    for _ in range(k):
        low = jnp.min(values, axis=-1, keepdims=True)
        i = jnp.minimum(jnp.min(jnp.where(values == low, pos, p), axis=-1, keepdims=True), p - 1)
        out_v.append(low[..., 0])
        out_i.append(i[..., 0])
        values = jnp.where(pos == i, jnp.inf, values)
    return jnp.stack(out_v, axis=-1), jnp.stack(out_i, axis=-1)


class Neighbours(NamedTuple):
    """k nearest rows of a point set for each query, nearest first.

    distance: [m, k] ascending (ties: lower point index first).
    index: int32[m, k]; where fewer than k valid points exist, the tail is padded with
    distance +inf and index -1.
    """

    distance: jax.Array
    index: jax.Array


def knn(queries, points, k: int, metric: str = "sqeuclidean", *, point_mask=None,
        chunk_size: int = DEFAULT_CHUNK, direct: bool = False, precision=None) -> Neighbours:
    """The k nearest of `points` [p, d] to each of `queries` [m, d] (k static, k <= p).

    point_mask: optional bool[p]; False points are ignored.
    precision: of the distance matmuls (see the module docstring).
    Memory: one [chunk_size, p] block at a time.
    """
    _check_metric(metric)
    _check_rows(queries, points, "queries", "points", point_mask, "point_mask")
    p = points.shape[0]
    if not 0 < k <= p:
        raise ValueError(f"k must be in [1, {p}], got {k}")

    def block(qb):
        dist = pairwise(qb, points, metric, direct=direct, precision=precision)
        if point_mask is not None:
            dist = jnp.where(point_mask[None, :], dist, jnp.inf)
        dist_k, idx = smallest_k(dist, k)  # ties: lower index first
        idx = jnp.where(jnp.isinf(dist_k), -1, idx)
        return dist_k, idx

    dist, idx = map_rows(block, queries, chunk_size)
    return Neighbours(dist, idx)


def greedy_unique_match(points, centres, metric: str = "sqeuclidean", *,
                        chunk_size: int = DEFAULT_CHUNK, num_candidates: int = 32,
                        precision=None, taken=None):
    """For centres j = 0..K-1 in order, take the nearest point not already taken.

    points [n, d], centres [K, d] (K <= n) -> int32[K] distinct point indices, in centre order.
    Ties go to the lower point index. `taken`: optional bool[n] of points that start out taken
    (never chosen; at least K points must be free).

    The greedy pass runs on a per-centre table of the `num_candidates` nearest points (one
    chunked pass over the pool). A centre whose candidates are all taken (rare: it needs that
    many earlier centres to claim its nearest points) falls back to an exact scan of the pool,
    so the result equals the naive K x n greedy.
    """
    _check_metric(metric)
    points, centres = jnp.asarray(points), jnp.asarray(centres)
    _check_rows(centres, points, "centres", "points")
    n = points.shape[0]
    num_centres = centres.shape[0]
    # Too few free points would hand out taken or repeated ones without a word.
    if num_centres > n:
        raise ValueError(f"{num_centres} centres but only {n} points: each centre takes its own point")
    # 0 would divide by zero (chunk_size) or keep no candidates, failing deep inside
    if chunk_size <= 0 or num_candidates <= 0:
        raise ValueError(f"chunk_size and num_candidates must be positive, got {chunk_size} and "
                         f"{num_candidates}")
    if taken is not None and not isinstance(taken, jax.core.Tracer):
        free = n - int(jnp.count_nonzero(jnp.asarray(taken)))
        if num_centres > free:
            raise ValueError(f"{num_centres} centres but only {free} points not taken")
    t = min(num_candidates, n)

    # Top-t candidates per centre: scan the pool in chunks, merging running top-t lists.
    def scan_chunk(carry, xb_and_offset):
        best_d, best_i = carry
        xb, offset, valid = xb_and_offset
        dist = pairwise(centres, xb, metric, precision=precision)  # [K, c]
        dist = jnp.where(valid[None, :], dist, jnp.inf)
        ids = offset + jnp.arange(xb.shape[0], dtype=jnp.int32)
        all_d = jnp.concatenate([best_d, dist], axis=1)
        all_i = jnp.concatenate([best_i, jnp.broadcast_to(ids, dist.shape)], axis=1)
        # Columns are in index order (earlier candidates hold lower indices), so ties in
        # `smallest_k` keep the lower index, as a (distance, index) sort would.
        best_d, order = smallest_k(all_d, t)
        return (best_d, jnp.take_along_axis(all_i, order, 1)), None

    c = min(chunk_size, n)
    num_chunks = -(-n // c)
    pad = num_chunks * c - n
    xp = jnp.concatenate([points, jnp.zeros((pad, points.shape[1]), points.dtype)]) if pad else points
    blocks = xp.reshape(num_chunks, c, points.shape[1])
    offsets = jnp.arange(num_chunks, dtype=jnp.int32) * c
    valid = (jnp.arange(num_chunks * c) < n).reshape(num_chunks, c)
    dist_dtype = jnp.result_type(points.dtype, centres.dtype)
    init = (jnp.full((num_centres, t), jnp.inf, dist_dtype),
            jnp.full((num_centres, t), jnp.iinfo(jnp.int32).max, jnp.int32))
    (cand_d, cand_i), _ = lax.scan(scan_chunk, init, (blocks, offsets, valid))

    def exact_scan(j, taken):
        dist = map_rows(lambda xb: pairwise(xb, centres[j][None], metric, precision=precision)[:, 0],
                        points, chunk_size)
        return jnp.argmin(jnp.where(taken, jnp.inf, dist)).astype(jnp.int32)

    def body(j, state):
        taken, out = state
        ids = cand_i[j]
        free = ~taken[jnp.clip(ids, 0, n - 1)] & (ids < n)
        first_free = jnp.argmax(free)  # candidates are sorted, so the first free one is best
        # A loop of at most one pass, not lax.cond: under vmap (hyperparameter sweeps) a cond
        # runs both branches for every setting, the loop only while some setting needs it.
        _, pick = lax.while_loop(lambda s: s[0], lambda s: (False, exact_scan(j, taken)),
                                 (~free.any(), ids[first_free]))
        return taken.at[pick].set(True), out.at[j].set(pick)

    taken = jnp.zeros(n, bool) if taken is None else jnp.asarray(taken)
    state = (taken, jnp.zeros(num_centres, jnp.int32))
    _, out = lax.fori_loop(0, num_centres, body, state)
    return out
