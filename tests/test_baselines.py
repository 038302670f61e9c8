"""Baselines (random, k-center, k-means) against NumPy references."""

import jax
import numpy as np
import pytest

from bilaf_jax.baselines import kcenter_select, kmeans_select, random_select
from tests import reference_core as ref


def test_kcenter_matches_reference(digits):
    x = digits[0][:500]
    out = kcenter_select(jax.random.key(4), x, 25)
    want = ref.kcenter(x, 25, int(out.order[0]))
    np.testing.assert_array_equal(out.order, want)
    np.testing.assert_array_equal(out.indices, np.sort(want))
    assert np.all(np.diff(np.asarray(out.radius[1:])) <= 1e-4)  # covering radius never grows


def test_kcenter_with_duplicate_rows_matches_reference():
    x = np.array([[0.0], [0.0], [1.0], [1.0], [0.0]], np.float32)
    out = kcenter_select(jax.random.key(0), x, 5)
    want = ref.kcenter(x, 5, int(out.order[0]))
    np.testing.assert_array_equal(out.order, want)
    assert sorted(want) == [0, 1, 2, 3, 4]


def test_kcenter_first_pick_is_random():
    x = np.random.default_rng(0).normal(size=(200, 3)).astype(np.float32)
    firsts = {int(kcenter_select(jax.random.key(s), x, 3).order[0]) for s in range(8)}
    assert len(firsts) > 1


def test_kmeans_reaches_lloyd_fixed_point_and_matches_sklearn_quality(digits):
    x = digits[0]
    out = kmeans_select(jax.random.key(0), x, 10, num_iters=300, tol=0.0)
    centres = np.asarray(out.centres, np.float64)
    assign = ((x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
    for j in range(10):
        if (assign == j).any():
            np.testing.assert_allclose(centres[j], x[assign == j].mean(0), rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(out.matched_indices, ref.greedy_match(x, centres))
    from sklearn.cluster import KMeans

    best = KMeans(10, n_init=10, random_state=0).fit(x).inertia_
    assert float(out.inertia) <= 1.1 * best


def test_kmeans_pool_far_from_origin_reaches_a_lloyd_fixed_point(digits):
    """Digits (64 pixels in [0, 16]) moved 1000 from the origin, in float32: Lloyd still ends
    at a fixed point of exact (float64) assignments, and the picks are the reference greedy
    match. Untranslated, the Gram form's error (about eps ||x||^2 = 4 in squared distance)
    decided assignments, and the centres were not the means of their points."""
    x = digits[0].astype(np.float32) + np.float32(1000.0)
    out = kmeans_select(jax.random.key(0), x, 10, num_iters=300, tol=0.0)
    assert int(out.num_iters) < 300
    centres = np.asarray(out.centres, np.float64)
    assign = ((x[:, None, :].astype(np.float64) - centres[None]) ** 2).sum(-1).argmin(1)
    for j in range(10):
        np.testing.assert_allclose(centres[j], x[assign == j].mean(0, dtype=np.float64), atol=1e-3)
    np.testing.assert_array_equal(out.matched_indices, ref.greedy_match(x, centres))


def test_kmeans_handles_duplicate_rows():
    x = np.repeat(np.random.default_rng(0).normal(size=(5, 3)), 4, axis=0).astype(np.float32)
    out = kmeans_select(jax.random.key(0), x, 8)
    assert len(set(np.asarray(out.indices).tolist())) == 8


def test_kmeans_iterates_on_features_whose_squared_norms_only_just_fit():
    """Each row's squared norm fits float32 (validation's bound), the pool's sum does not: the
    stopping threshold overflowed and no Lloyd iteration ran. Picks are scale-free."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(300, 8)) + 3 * rng.normal(size=(6, 8))[rng.integers(0, 6, 300)]).astype(np.float32)
    small = kmeans_select(jax.random.key(0), x, 6)
    large = kmeans_select(jax.random.key(0), x * np.float32(2e17), 6)
    assert int(large.num_iters) == int(small.num_iters) > 0
    np.testing.assert_array_equal(large.indices, small.indices)


def test_kmeans_picks_do_not_change_near_the_largest_accepted_values():
    """Values up to 1.9 * 2**62 in d = 1 (validation's bound is 2**63) with one row opposite
    the others: after centring that row lies twice as far out, ||x||^2 + ||c||^2 overflowed
    in the Gram form and the picks were not those of the same pool scaled down by 2**62."""
    rng = np.random.default_rng(0)
    for seed in range(4):
        n = int(rng.integers(5, 30))
        small = rng.uniform(0.9, 1.9, size=(n, 1)).astype(np.float32)
        small[rng.integers(0, n)] = -1.9
        large = small * np.float32(2.0**62)  # exact: a power of two
        k = int(rng.integers(2, n))
        a = kmeans_select(jax.random.key(seed), large, k)
        b = kmeans_select(jax.random.key(seed), small, k)
        np.testing.assert_array_equal(a.matched_indices, b.matched_indices)
        np.testing.assert_array_equal(a.centres, b.centres * np.float32(2.0**62))
        assert int(a.num_iters) == int(b.num_iters)


def test_random_select_is_uniform_enough():
    x = np.zeros((50, 2), np.float32)
    counts = np.zeros(50)
    for s in range(400):
        counts[np.asarray(random_select(jax.random.key(s), x, 5).indices)] += 1
    assert counts.min() > 10 and counts.max() < 80  # expected 40 each


@pytest.mark.parametrize("fn", [random_select, kcenter_select, kmeans_select])
def test_bad_input(fn):
    with pytest.raises(ValueError, match="NaN"):
        fn(jax.random.key(0), np.array([[np.nan, 1.0], [0.0, 1.0]]), 1)
    with pytest.raises(ValueError, match="2-D"):
        fn(jax.random.key(0), np.zeros(5), 1)
    with pytest.raises(ValueError, match="empty"):
        fn(jax.random.key(0), np.zeros((0, 3)), 1)
    with pytest.raises(ValueError, match="num_samples"):
        fn(jax.random.key(0), np.zeros((4, 3)), 5)


def test_kcenter_identical_rows_never_repeats():
    x = np.ones((6, 3), np.float32)
    out = kcenter_select(jax.random.key(0), x, 6)
    assert sorted(np.asarray(out.indices).tolist()) == list(range(6))


def test_kcenter_with_labelled_rows_starts_from_them(digits):
    x = digits[0][:300]
    labelled = [3, 50, 120]
    out = kcenter_select(jax.random.key(0), x, 10, exclude=labelled)
    # Reference: farthest-point greedy with the labelled rows as the chosen set.
    xx = x.astype(np.float64)
    chosen = list(labelled)
    want = []
    for _ in range(10):
        d = np.min(((xx[:, None] - xx[chosen][None]) ** 2).sum(-1), axis=1)
        d[chosen] = -1
        want.append(int(np.argmax(d)))
        chosen.append(want[-1])
    np.testing.assert_array_equal(out.order, want)


def test_kmeans_plus_plus_seeds_follow_squared_distances():
    """k-means++: the first seed uniform, the next with probability D(x)^2 / sum D^2. Points
    0, 1 and 3 on a line, K = 2, no Lloyd step (the centres are the seeds): the frequency of
    each (first, second) pair over 3,000 keys against its exact probability (a uniform second
    seed, say, would give 1/6 each)."""
    x = np.array([[0.0], [1.0], [3.0]], np.float32)
    keys = jax.random.split(jax.random.key(0), 3000)
    centres = jax.vmap(lambda k: kmeans_select(k, x, 2, num_iters=0).centres)(keys)
    pairs = np.asarray(centres)[:, :, 0]
    exact = {}
    for a in (0.0, 1.0, 3.0):
        d2 = {b: (a - b) ** 2 for b in (0.0, 1.0, 3.0) if b != a}
        for b, w in d2.items():
            exact[(a, b)] = w / sum(d2.values()) / 3
    for (a, b), p in exact.items():
        freq = np.mean((pairs[:, 0] == a) & (pairs[:, 1] == b))
        sd = np.sqrt(p * (1 - p) / len(keys))
        assert abs(freq - p) < 4 * sd, ((a, b), freq, p)
    assert sum(np.mean((pairs[:, 0] == a) & (pairs[:, 1] == b)) for a, b in exact) == 1.0


def _naive_lloyd(x, seeds, num_iters, tol):
    """Lloyd from `seeds` in float64: nearest centre (lowest index on ties), empty centres
    stay, stop once the total squared movement is <= tol * total variance."""
    x = np.asarray(x, np.float64)
    c = np.asarray(seeds, np.float64).copy()
    scale = ((x - x.mean(0)) ** 2).sum(1).mean()
    it = 0
    while it < num_iters:
        a = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        new = np.array([x[a == j].mean(0) if (a == j).any() else c[j] for j in range(len(c))])
        shift, c, it = ((new - c) ** 2).sum(), new, it + 1
        if shift <= tol * scale:
            break
    inertia = ((x[:, None] - c[None]) ** 2).sum(-1).min(1).sum()
    return c, it, inertia


@pytest.mark.parametrize("num_iters, tol", [(1, 0.0), (3, 0.0), (100, 1e-4), (100, 0.0)])
def test_kmeans_follows_naive_lloyd_from_its_seeds(num_iters, tol):
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(200, 4)) + 3 * rng.normal(size=(5, 4))[rng.integers(0, 5, 200)]).astype(np.float32)
    key = jax.random.key(1)
    seeds = kmeans_select(key, x, 7, num_iters=0).centres  # k-means++ seeds (tested above)
    out = kmeans_select(key, x, 7, num_iters=num_iters, tol=tol)
    centres, iters, inertia = _naive_lloyd(x, seeds, num_iters, tol)
    assert int(out.num_iters) == iters
    np.testing.assert_allclose(out.centres, centres, atol=1e-4)
    np.testing.assert_allclose(float(out.inertia), inertia, rtol=1e-4)
    np.testing.assert_array_equal(out.matched_indices, ref.greedy_match(x, centres))
    np.testing.assert_array_equal(out.indices, np.sort(out.matched_indices))


@pytest.mark.parametrize("k", [1, 2, 37])
def test_kcenter_budget_edges_and_float64_match_reference(k):
    rng = np.random.default_rng(k)
    x = np.round(2 * rng.normal(size=(37, 3)))  # integer values: exact ties and duplicates
    jax.config.update("jax_enable_x64", True)
    try:
        out = kcenter_select(jax.random.key(k), x, k)  # float64 throughout
        assert out.radius.dtype == np.float64
    finally:
        jax.config.update("jax_enable_x64", False)
    np.testing.assert_array_equal(out.order, ref.kcenter(x, k, int(out.order[0])))
    out32 = kcenter_select(jax.random.key(k), x, k)  # float64 input computed in float32
    np.testing.assert_array_equal(out32.order, out.order)


def test_random_select_with_exclusions_is_uniform_over_the_rest():
    """Every pair of the 5 rows left is drawn about as often (4,000 draws, 400 expected)."""
    x = np.zeros((10, 2), np.float32)
    keys = jax.random.split(jax.random.key(0), 4000)
    idx = np.asarray(jax.vmap(lambda k: random_select(k, x, 2, exclude=[0, 2, 4, 6, 8]).indices)(keys))
    pairs, counts = np.unique(idx, axis=0, return_counts=True)
    assert set(pairs.ravel().tolist()) == {1, 3, 5, 7, 9} and len(pairs) == 10
    chi2 = ((counts - 400) ** 2 / 400).sum()
    assert chi2 < 27.9  # chi-square, 9 degrees of freedom, p = 0.001
