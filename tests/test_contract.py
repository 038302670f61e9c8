"""The contract every selector keeps: shape and dtype, range, uniqueness, exclusions, same key
same answer, budget edge cases, clear errors."""

import functools

import jax
import numpy as np
import pytest

from bilaf_jax.activeft import activeft
from bilaf_jax.baselines import kcenter_select, kmeans_select, random_select

SELECTORS = {
    "activeft": functools.partial(activeft, num_steps=15),
    "kcenter": kcenter_select,
    "kmeans": kmeans_select,
    "random": random_select,
}


@pytest.fixture(scope="module")
def pool():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 6)) * 4
    x = centres[rng.integers(0, 5, 157)] + rng.normal(size=(157, 6))
    return x.astype(np.float32)


@pytest.mark.parametrize("name", SELECTORS)
@pytest.mark.parametrize("k", [1, 7, 157])
def test_shape_dtype_range_unique_sorted(name, k, pool):
    out = SELECTORS[name](jax.random.key(1), pool, k)
    idx = np.asarray(out.indices)
    assert idx.shape == (k,) and idx.dtype == np.int32
    assert idx.min() >= 0 and idx.max() < len(pool)
    assert len(np.unique(idx)) == k
    assert np.all(np.diff(idx) > 0)


@pytest.mark.parametrize("name", SELECTORS)
def test_same_key_same_answer_and_key_matters(name, pool):
    fn = SELECTORS[name]
    a = np.asarray(fn(jax.random.key(5), pool, 9).indices)
    b = np.asarray(fn(jax.random.key(5), pool, 9).indices)
    np.testing.assert_array_equal(a, b)
    others = [np.asarray(fn(jax.random.key(s), pool, 9).indices) for s in range(6, 10)]
    assert any(not np.array_equal(a, o) for o in others)


@pytest.mark.parametrize("name", SELECTORS)
def test_excluded_rows_never_chosen(name, pool):
    exclude = np.arange(0, 157, 3)
    out = SELECTORS[name](jax.random.key(2), pool, 20, exclude=exclude)
    idx = np.asarray(out.indices)
    assert not set(idx.tolist()) & set(exclude.tolist())
    assert len(np.unique(idx)) == 20
    # Everything that is left, exactly.
    rest = np.setdiff1d(np.arange(157), exclude)
    out = SELECTORS[name](jax.random.key(2), pool, len(rest), exclude=exclude)
    np.testing.assert_array_equal(out.indices, rest)


@pytest.mark.parametrize("name", SELECTORS)
def test_duplicate_and_identical_rows(name):
    x = np.ones((12, 4), np.float32)
    idx = np.asarray(SELECTORS[name](jax.random.key(0), x, 12).indices)
    np.testing.assert_array_equal(idx, np.arange(12))
    x = np.repeat(np.eye(3, dtype=np.float32), 4, axis=0)
    idx = np.asarray(SELECTORS[name](jax.random.key(0), x, 5).indices)
    assert len(np.unique(idx)) == 5


@pytest.mark.parametrize("name", SELECTORS)
def test_impossible_budget_and_bad_exclusions(name, pool):
    fn = SELECTORS[name]
    with pytest.raises(ValueError, match="num_samples"):
        fn(jax.random.key(0), pool, 0)
    with pytest.raises(ValueError, match="num_samples"):
        fn(jax.random.key(0), pool, 158)
    with pytest.raises(ValueError, match="fewer than"):
        fn(jax.random.key(0), pool, 150, exclude=np.arange(10))
    with pytest.raises(ValueError, match="repeated"):
        fn(jax.random.key(0), pool, 5, exclude=[1, 1])
    with pytest.raises(ValueError, match="out of range"):
        fn(jax.random.key(0), pool, 5, exclude=[157])


@pytest.mark.parametrize("name", SELECTORS)
def test_no_recompile_on_second_call(name, pool):
    fn = SELECTORS[name]
    fn(jax.random.key(0), pool, 6)
    from jax._src import test_util as jtu  # count_jit_and_pmap_lowerings is stable in tests

    with jtu.count_jit_and_pmap_lowerings() as count:
        fn(jax.random.key(1), pool + 1.0, 6)
    assert count() == 0


@pytest.mark.parametrize("name", ["kcenter", "kmeans", "random"])  # activeft: test_activeft.py
def test_jit_eager_parity(name, pool):
    fn = SELECTORS[name]
    jitted = np.asarray(fn(jax.random.key(3), pool, 8).indices)
    with jax.disable_jit():
        eager = np.asarray(fn(jax.random.key(3), pool, 8).indices)
    np.testing.assert_array_equal(jitted, eager)


def test_direct_distances_through_select_do_not_depend_on_the_origin(pool):
    """Euclidean distances do not change under a shift; with direct=True neither do the picks
    (the Gram form loses precision far from the origin: see boundary.bilaf's `direct`)."""
    from bilaf_jax.pipeline import select

    def picks(x):
        return np.asarray(select(jax.random.key(0), x, 24, num_cores=4, core_method="kcenter",
                                 direct=True).indices)

    np.testing.assert_array_equal(picks(pool + np.float32(1000)), picks(pool))


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_boundary_stage_jit_eager_parity(mode, pool):
    """Eager runs (jax.disable_jit, for debugging) of the boundary stage: its loops then hand
    Python ints to their bodies."""
    from bilaf_jax.boundary import bilaf

    x = pool.astype(np.float64) if mode == "official" else pool
    with jax.enable_x64(mode == "official"):
        jitted = bilaf(jax.random.key(0), x, [0, 20, 40], 12, mode=mode)
        with jax.disable_jit():
            eager = bilaf(jax.random.key(0), x, [0, 20, 40], 12, mode=mode)
    np.testing.assert_array_equal(np.asarray(eager.indices), np.asarray(jitted.indices))


@pytest.mark.parametrize("name", [*SELECTORS, "bilaf"])
def test_feature_dtypes_and_values_too_large_to_square(name, pool):
    from bilaf_jax.pipeline import select

    def run(x):
        if name == "bilaf":  # the boundary stage sorts distances by their bits
            return np.asarray(select(jax.random.key(0), x, 12, num_cores=3,
                                     core_method="kcenter").indices)
        return np.asarray(SELECTORS[name](jax.random.key(0), x, 6).indices)

    expected = run(pool)
    np.testing.assert_array_equal(run(pool.astype(">f4")), expected)  # another byte order
    half = run(pool.astype(np.float16))  # computed in float32
    assert len(np.unique(half)) == len(expected)
    with pytest.raises(ValueError, match="overflow float32; rescale"):
        run(pool * np.float32(1e20))
    with pytest.raises(ValueError, match="overflow float32; rescale"):  # float64 in, float32 run
        run(pool.astype(np.float64) * 1e25)
    with pytest.raises(ValueError, match="NaN or Inf"):
        run(np.where(np.arange(157)[:, None] == 3, np.nan, pool).astype(np.float32))
    # squares below float32's normal range: every distance alike, the first rows picked
    with pytest.raises(ValueError, match="underflow float32; rescale"):
        run(pool * np.float32(1e-20))
    np.testing.assert_array_equal(run(pool * np.float32(2 ** -40)), expected)  # small, still exact


def test_misleading_options_are_refused():
    """Options that would be ignored or half-applied are errors, not silent."""
    from bilaf_jax.activeft import activeft
    from bilaf_jax.baselines import kmeans_select
    from bilaf_jax.pipeline import select

    x = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
    key = jax.random.key(0)
    # exclude / num_rows in core_options would reach stage 1 only
    for opt, use in (("exclude", "labeled="), ("num_rows", "num_rows=")):
        with pytest.raises(ValueError, match=f"core_options may not hold '{opt}': pass {use}"):
            select(key, x, 20, num_cores=4, core_options={opt: [1, 2]})
    # select's own arguments (they were TypeErrors from deep inside)
    for method in ("bilaf", "activeft", "kmeans"):
        for opt in ("key", "features", "num_samples"):
            with pytest.raises(ValueError, match=f"core_options may not hold '{opt}'"):
                select(key, x, 20, method=method, num_cores=4, core_options={opt: 3})
    with pytest.raises(ValueError, match=r"core_options \['num_steps'\] are not options of the kcenter"):
        select(key, x, 20, num_cores=4, core_method="kcenter", core_options=dict(num_steps=5))
    # boundary-stage options for a single-stage method (ignored, even when invalid)
    for method, opts in (("kcenter", dict(mode="official")), ("random", dict(remove_fraction=5.0)),
                         ("kmeans", dict(num_neighbors=0, normalize=True))):
        with pytest.raises(ValueError, match=f"{', '.join(opts)} configure BiLAF's boundary "
                                             f"stage, which method='{method}' does not run"):
            select(key, x, 10, method=method, **opts)
    select(key, x, 10, method="kcenter", remove_fraction=np.float64(0.1))  # the default, as given
    # bilaf under vmap over keys: a clear error before ActiveFT runs, not one from inside
    with pytest.raises(ValueError, match="needs a concrete key and core_options"):
        jax.vmap(lambda k: select(k, x, 10, num_cores=3).indices)(jax.random.split(key, 2))
    with pytest.raises(ValueError, match="unknown precision 'garbage'"):
        select(key, x, 10, method="kmeans", precision="garbage")
    with pytest.raises(ValueError, match="'kcenter' computes in float32"):
        select(key, x, 10, method="kcenter", precision="bfloat16")
    select(key, x, 20, num_cores=4, core_method="kcenter", precision="bfloat16")  # boundary stage
    # a boolean mask is no index list
    with pytest.raises(ValueError, match="not a boolean mask"):
        select(key, x, 10, method="random", labeled=np.arange(60) < 2)
    with pytest.raises(ValueError, match="chunk_size"):
        activeft(key, x, 5, num_steps=2, chunk_size=2.5)
    with pytest.raises(ValueError, match="chunk_size"):
        kmeans_select(key, x, 5, chunk_size=0)


def test_keys_that_are_not_prng_keys_are_refused(pool):
    """A seed where a key belongs was a TypeError from inside JAX ("invalid PRNG key data")
    that named neither the argument nor what to pass."""
    from bilaf_jax.pipeline import select

    for bad in (0, None, np.zeros(2, np.float32), "abc"):
        for fn in (kcenter_select, kmeans_select, random_select, activeft):
            with pytest.raises(ValueError, match=r"key must be a PRNG key such as jax.random.key\(0\)"):
                fn(bad, pool, 3)
        with pytest.raises(ValueError, match="key must be a PRNG key"):
            select(bad, pool, 12, num_cores=3, core_method="kcenter")
    with pytest.raises(ValueError, match="single PRNG key, got a batch of shape"):
        random_select(jax.random.split(jax.random.key(0), 3), pool, 3)
    # raw keys (jax.random.PRNGKey) and keys traced by vmap still work
    random_select(jax.random.PRNGKey(0), pool, 3)
    keys = jax.vmap(jax.random.PRNGKey)(np.arange(2))
    jax.vmap(lambda k: select(k, pool, 3, method="kcenter").indices)(keys)


def test_index_arguments_of_the_wrong_kind():
    """Strings and objects reached np.mod (a NumPy TypeError naming no argument); 1e20 wrapped
    to int64's minimum in the message."""
    from bilaf_jax.boundary import bilaf

    x = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="exclude must hold integers, got dtype <U1"):
        random_select(jax.random.key(0), x, 3, exclude=["a"])
    with pytest.raises(ValueError, match="exclude must hold integers, got dtype object"):
        random_select(jax.random.key(0), x, 3, exclude=np.array([1, "a"], object))
    with pytest.raises(ValueError, match=r"exclude out of range \[0, 40\): 100000000000000000000"):
        random_select(jax.random.key(0), x, 3, exclude=[1e20])
    with pytest.raises(ValueError, match=r"core_indices out of range \[0, 40\): 9223372036854775809"):
        bilaf(jax.random.key(0), x, np.array([2**63 + 1], np.uint64), 4)
    # integer-valued objects are indices like any others
    np.testing.assert_array_equal(
        random_select(jax.random.key(0), x, 3, exclude=np.array([1, 2], object)).indices,
        random_select(jax.random.key(0), x, 3, exclude=[1, 2]).indices)


def test_hyperparameters_that_are_not_real_numbers_are_named(pool):
    """A string or None reached np.isfinite (a TypeError naming no argument); a complex
    learning rate, tolerance or fraction passed the checks and ran."""
    from bilaf_jax.pipeline import select

    key = jax.random.key(0)
    for name, value in (("temperature", "0.07"), ("learning_rate", None), ("learning_rate", 1e-3j),
                        ("balance", "1")):
        with pytest.raises(ValueError, match=f"{name} must be a real number"):
            activeft(key, pool, 3, num_steps=2, **{name: value})
    for value in ("1e-6", 1e-6j):
        with pytest.raises(ValueError, match="tol must be a real number"):
            kmeans_select(key, pool, 3, tol=value)
    for name, value in (("remove_fraction", "0.1"), ("ring_fraction", 0.1j),
                        ("opponent_penalty", None)):
        with pytest.raises(ValueError, match=f"{name} must be a real number"):
            select(key, pool, 12, num_cores=3, core_method="kcenter", **{name: value})


def test_select_refuses_non_bool_flags_and_non_dict_core_options(pool):
    """bilaf read bool(normalize): normalize="false" normalised the features, silently."""
    from bilaf_jax.pipeline import select

    key = jax.random.key(0)
    with pytest.raises(ValueError, match="normalize must be True or False, got 'false'"):
        select(key, pool, 12, num_cores=3, core_method="kcenter", normalize="false")
    with pytest.raises(ValueError, match="direct must be True, False or None, got 'no'"):
        select(key, pool, 12, num_cores=3, core_method="kcenter", direct="no")
    with pytest.raises(ValueError, match="core_options must be a dict"):
        select(key, pool, 12, num_cores=3, core_options="num_steps=5")
    from bilaf_jax.boundary import bilaf  # called directly, not through select

    for name, value in (("normalize", "false"), ("direct", "no"), ("normalize", None)):
        with pytest.raises(ValueError, match=f"{name} must be True"):
            bilaf(key, pool, [0, 5, 9], 12, **{name: value})
    np.testing.assert_array_equal(  # NumPy bools are bools
        select(key, pool, 12, num_cores=3, core_method="kcenter", normalize=np.bool_(True)).indices,
        select(key, pool, 12, num_cores=3, core_method="kcenter", normalize=True).indices)


def test_eight_bit_float_and_four_bit_int_features_run_in_float32(pool):
    """ml_dtypes' float8 / int4 are real numbers; they were refused as if they were not."""
    import ml_dtypes

    for dtype in (ml_dtypes.float8_e4m3fn, ml_dtypes.int4):
        small = (pool * 2).astype(dtype)
        np.testing.assert_array_equal(kcenter_select(jax.random.key(0), small, 6).indices,
                                      kcenter_select(jax.random.key(0), small.astype(np.float32), 6).indices)


def test_shard_rows_names_a_bad_mesh(pool):
    """A missing axis was a bare KeyError, no mesh an AttributeError on None."""
    from bilaf_jax.sharding import make_mesh, shard_rows

    with pytest.raises(ValueError, match=r"mesh has no axis 'rows' \(its axes: \('data',\)\)"):
        shard_rows(pool, make_mesh(1), axis="rows")
    with pytest.raises(ValueError, match="mesh must be a jax.sharding.Mesh"):
        shard_rows(pool, None)
    # a float was a TypeError from slicing the device list, True a one-device mesh
    for bad in (1.0, True, "1"):
        with pytest.raises(ValueError, match="num_devices must be an integer"):
            make_mesh(bad)
    assert make_mesh(np.int64(1)).shape == {"data": 1}


@pytest.mark.parametrize("name,value,says", [("learning_rate", 1e39, "too large for float32"),
                                             ("balance", 1e39, "too large for float32"),
                                             ("balance", 1e-46, "too small for float32")])
def test_activeft_settings_beyond_float32_are_named(name, value, says):
    """They ran: NaN centroids (learning_rate 1e39), infinite or zero losses (balance)."""
    from bilaf_jax.activeft import activeft

    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=f"{name} .* {says}"):
        activeft(jax.random.key(0), x, 5, num_steps=2, **{name: value})
