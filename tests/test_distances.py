"""`bilaf_jax.distances` against naive NumPy (ties included)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bilaf_jax import distances


def _tied(rng, shape):
    # Few distinct values, so that ties are everywhere.
    return rng.integers(0, 7, size=shape).astype(np.float64)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_first_argmin_and_argmax_match_numpy(axis):
    x = _tied(np.random.default_rng(0), (37, 23))
    low, i = distances.first_argmin(jnp.asarray(x, jnp.float32), axis=axis)
    np.testing.assert_array_equal(np.asarray(i), np.argmin(x, axis=axis))
    np.testing.assert_array_equal(np.asarray(low), np.min(x, axis=axis))
    high, j = distances.first_argmax(jnp.asarray(x, jnp.float32), axis=axis)
    np.testing.assert_array_equal(np.asarray(j), np.argmax(x, axis=axis))
    np.testing.assert_array_equal(np.asarray(high), np.max(x, axis=axis))


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
@pytest.mark.parametrize("p", [40, 700], ids=["extract", "top_k"])
def test_smallest_k_matches_stable_sort(p, x64):
    rng = np.random.default_rng(p)
    x = _tied(rng, (5, 9, p))
    x[0, 0, :] = np.inf  # a row with nothing finite
    k = 6
    order = np.argsort(x, axis=-1, kind="stable")[..., :k]
    with jax.enable_x64(x64):
        vals, idx = distances.smallest_k(jnp.asarray(x), k)
        vals, idx = np.asarray(vals), np.asarray(idx)
    assert idx.dtype == np.int32 and vals.shape == idx.shape == (5, 9, k)
    np.testing.assert_array_equal(vals, np.take_along_axis(x, order, axis=-1))
    finite = np.isfinite(vals)
    np.testing.assert_array_equal(idx[finite], order[finite])


@pytest.mark.parametrize("direct", [False, True])
def test_knn_and_nearest_centre_match_numpy(direct):
    rng = np.random.default_rng(1)
    queries, points = rng.normal(size=(50, 4)), rng.normal(size=(30, 4))
    points[7] = points[3]  # an exact tie: the lower index comes first
    d = np.sqrt(((queries[:, None] - points[None]) ** 2).sum(-1))
    order = np.argsort(d, axis=1, kind="stable")
    with jax.enable_x64(True):
        nb = distances.knn(queries, points, 5, "euclidean", chunk_size=16, direct=direct)
        near = distances.nearest_centre(queries, points, "euclidean", chunk_size=16,
                                        direct=direct)
        np.testing.assert_array_equal(np.asarray(nb.index), order[:, :5])
        np.testing.assert_allclose(np.asarray(nb.distance),
                                   np.take_along_axis(d, order[:, :5], 1), rtol=1e-10)
        np.testing.assert_array_equal(np.asarray(near.index), order[:, 0])
        np.testing.assert_allclose(np.asarray(near.distance), d.min(1), rtol=1e-10)


def test_knn_point_mask_pads_with_minus_one():
    rng = np.random.default_rng(2)
    q, pts = rng.normal(size=(6, 3)), rng.normal(size=(8, 3))
    mask = np.zeros(8, bool)
    mask[[1, 5]] = True
    nb = distances.knn(q, pts, 4, point_mask=mask)
    assert set(np.asarray(nb.index[:, :2]).ravel()) <= {1, 5}
    assert (np.asarray(nb.index[:, 2:]) == -1).all() and np.isinf(nb.distance[:, 2:]).all()


def test_greedy_unique_match_equals_naive_greedy():
    rng = np.random.default_rng(3)
    pts, cen = rng.normal(size=(200, 5)), rng.normal(size=(40, 5))
    d = ((cen[:, None] - pts[None]) ** 2).sum(-1)
    taken, want = np.zeros(200, bool), []
    for j in range(40):
        i = int(np.argmin(np.where(taken, np.inf, d[j])))
        taken[i] = True
        want.append(i)
    with jax.enable_x64(True):
        # Two candidates per centre force the exact-scan fallback for later centres.
        got = distances.greedy_unique_match(pts, cen, num_candidates=2, chunk_size=64)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_greedy_unique_match_refuses_more_centres_than_free_points():
    """It handed out repeated and taken points ([0 1 2 0 0 0], [8 9 0 0])."""
    x = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="6 centres but only 3 points"):
        distances.greedy_unique_match(x[:3], x[:6])
    with pytest.raises(ValueError, match="4 centres but only 2 points not taken"):
        distances.greedy_unique_match(x, x[:4], taken=np.arange(10) < 8)
    got = distances.greedy_unique_match(x, x[:2], taken=np.arange(10) < 8)
    assert sorted(np.asarray(got).tolist()) == [8, 9]
    # were a ZeroDivisionError and NumPy's "need at least one array to stack"
    for kwargs in (dict(chunk_size=0), dict(num_candidates=0)):
        with pytest.raises(ValueError, match="chunk_size and num_candidates must be positive"):
            distances.greedy_unique_match(x, x[:2], **kwargs)


def test_greedy_unique_match_under_vmap_equals_each_run():
    # Under vmap the exact-scan fallback runs for the settings that need it (and others keep
    # their candidate pick): the same picks as one call per centre set.
    rng = np.random.default_rng(4)
    pts = rng.normal(size=(150, 4)).astype(np.float32)
    cen = rng.normal(size=(3, 30, 4)).astype(np.float32)
    cen[1] = pts[:30] + 0.01  # this set needs no fallback: each centre sits on its own point
    each = [np.asarray(distances.greedy_unique_match(pts, c, num_candidates=2)) for c in cen]
    both = jax.vmap(lambda c: distances.greedy_unique_match(pts, c, num_candidates=2))(cen)
    np.testing.assert_array_equal(np.asarray(both), np.stack(each))
    np.testing.assert_array_equal(each[1], np.arange(30))


def test_bfloat16_precision_rounds_the_inputs():
    """"bfloat16" is bfloat16 inputs with float32 accumulation on every backend (XLA's CPU
    backend ignored the algorithm preset and gave float32's product bit for bit)."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(64, 96)).astype(np.float32), rng.normal(size=(96, 32)).astype(np.float32)
    low = np.asarray(distances.matmul(jnp.asarray(a), jnp.asarray(b), "bfloat16"))
    full = np.asarray(distances.matmul(jnp.asarray(a), jnp.asarray(b), "float32"))
    want = (a.astype(ml_dtypes.bfloat16).astype(np.float64)
            @ b.astype(ml_dtypes.bfloat16).astype(np.float64))
    np.testing.assert_allclose(low, want, rtol=1e-5, atol=1e-5)
    assert low.dtype == np.float32 and np.abs(low - full).max() > 1e-2


def test_centring_shift_moves_only_pools_far_from_the_origin():
    """The mean where it lies farther from the origin than the rows' RMS distance from it
    (weights drop padding rows), else exact zeros."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)).astype(np.float32)
    near = np.asarray(distances.centring_shift(x))
    assert near.dtype == np.float32 and not near.any()
    far = x + np.float32(50.0)
    np.testing.assert_allclose(distances.centring_shift(far), far.mean(0), rtol=1e-6)
    # Padding rows far away do not count; with them counted the mean would move.
    padded = np.concatenate([far, np.full((56, 6), 1e6, np.float32)])
    weight = np.arange(256) < 200
    np.testing.assert_allclose(distances.centring_shift(padded, weight), far.mean(0), rtol=1e-6)
    # The boundary: the mean's norm against the RMS distance from it.
    two = np.array([[3.0, 0.0], [5.0, 0.0]], np.float32)  # mean 4, spread 1: far
    np.testing.assert_array_equal(distances.centring_shift(two), [4.0, 0.0])
    wide = np.array([[-3.0, 0.0], [5.0, 0.0]], np.float32)  # mean 1, spread 4: near
    np.testing.assert_array_equal(distances.centring_shift(wide), [0.0, 0.0])


@pytest.mark.parametrize("p", [40, 700], ids=["extract", "top_k"])
def test_smallest_k_treats_signed_zeros_as_a_tie(p):
    """-0.0 == +0.0, so the lower index comes first; top-k ordered -0.0 first (by bits).
    A "dot" distance is -0.0 or +0.0 by the signs of the zero products."""
    rng = np.random.default_rng(0)
    x = rng.choice(np.array([-0.0, 0.0, 1.0, 2.0], np.float32), size=(6, p))
    vals, idx = distances.smallest_k(jnp.asarray(x), 8)
    order = np.argsort(x, axis=-1, kind="stable")[:, :8]
    np.testing.assert_array_equal(np.asarray(idx), order)
    np.testing.assert_array_equal(np.asarray(vals), np.take_along_axis(x, order, axis=-1))


def test_rows_of_other_widths_ranks_or_masks_are_named_errors():
    """The shapes are checked before the matmul (an XLA dot_general error, an IndexError, or a
    NumPy zero-size reduction error before), also inside jit."""
    x = np.ones((5, 4), np.float32)
    cases = [(lambda: distances.knn(x, x[:, :3], 2), "queries rows have 4 dimensions, points rows 3"),
             (lambda: distances.knn(x[0], x, 2), r"must be 2-D \[rows, d\], got shapes \(4,\)"),
             (lambda: distances.knn(x, x, 2, point_mask=np.ones(4, bool)),
              r"point_mask must have one entry per row of points \(5\)"),
             (lambda: distances.nearest_centre(x, x[:0]), r"centres is empty"),
             (lambda: distances.nearest_centre(x, x[:2, :2]), "points rows have 4 dimensions"),
             (lambda: jax.jit(distances.nearest_centre)(x, x[:2, :3]), "points rows have 4"),
             (lambda: distances.greedy_unique_match(x, x[:2, :3]), "centres rows have 3 dimensions")]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize("d", [1, 5, 8, 13, 384])
def test_direct_distances_are_scipys_cdist_bit_for_bit(d):
    """Explicit differences added feature by feature in scipy's order: float64 distances equal
    scipy's to the last bit, so the official mode sees the ties and orderings the authors'
    script sees (the product of each difference is rounded before it is added, as there)."""
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(d)
    x = rng.normal(size=(70, d)) * 10.0 ** rng.uniform(-2, 2, size=(70, 1))
    y = rng.normal(size=(45, d))
    with jax.enable_x64(True):
        got = np.asarray(jax.jit(lambda a, b: distances.pairwise(a, b, "euclidean", direct=True))(
            x, y))
        sq = np.asarray(distances.pairwise(x, y, "sqeuclidean", direct=True))
    np.testing.assert_array_equal(got, cdist(x, y))
    np.testing.assert_array_equal(sq, cdist(x, y, "sqeuclidean"))
