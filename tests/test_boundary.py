"""BiLAF stage 2 (`bilaf_jax.boundary.bilaf`) against the naive NumPy references."""

import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bilaf_jax import boundary
from bilaf_jax.boundary import bilaf
from tests.reference_boundary import official_reference, paper_reference

KEY = jax.random.key(0)
NON_DEFAULT = dict(ring_fraction=0.2, remove_fraction=0.3, opponent_penalty=1.5)


def _blobs(seed=0, n=150, d=5, k=6):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(k, d))
    x = centres[rng.integers(0, k, n)] + rng.normal(size=(n, d))
    cores = rng.choice(n, k, replace=False)
    return x, cores


@pytest.fixture(scope="module")
def blobs():
    return _blobs()


@pytest.fixture(scope="module")
def digit_features(digits):
    # Real data: the 1,797 digit images through a fixed random projection (tie-free floats).
    x = digits[0].astype(np.float64) @ np.random.default_rng(1).normal(size=(64, 16))
    cores = np.random.default_rng(2).choice(x.shape[0], 12, replace=False)
    return x, cores


def _check(out, ref, n):
    assert out.indices.dtype == jnp.int32 and out.pseudo_labels.dtype == jnp.int32
    assert out.indices.shape == (len(ref[0]),) and out.pseudo_labels.shape == (n,)
    np.testing.assert_array_equal(np.asarray(out.pseudo_labels), ref[1])
    np.testing.assert_array_equal(np.asarray(out.kept), ref[2])
    np.testing.assert_array_equal(np.asarray(out.allocation), ref[3])
    np.testing.assert_array_equal(np.asarray(out.indices), np.asarray(ref[0]))


@pytest.mark.parametrize("mode,x64", [("official", True), ("paper", True), ("paper", False)],
                         ids=["official-float64", "paper-float64", "paper-float32"])
def test_bulk_removal_matches_reference(monkeypatch, digit_features, mode, x64):
    # Every round removes its nearest candidates by bisection (the small-budget path).
    monkeypatch.setattr(boundary, "_EXTRACT_QUOTA", 0)
    x, cores = digit_features
    ref_fn = official_reference if mode == "official" else paper_reference
    with jax.enable_x64(x64):
        for budget in (30, 200):
            out = bilaf(KEY, x if x64 else x.astype(np.float32), cores, budget, mode=mode)
            want = ref_fn(x, cores, budget)[0] if x64 else \
                ref_fn(x.astype(np.float32).astype(np.float64), cores, budget)[0]
            np.testing.assert_array_equal(np.asarray(out.indices), np.asarray(want))


def test_smallest_set_matches_sort():
    rng = np.random.default_rng(4)
    key = rng.integers(-3, 4, size=(6, 50)).astype(np.float32)
    key[0, :5] = -np.inf
    key[1, 7] = -0.0
    mask = rng.random((6, 50)) < 0.7
    tie = np.stack([rng.permutation(50) for _ in range(6)]).astype(np.int32)
    count = np.array([0, 1, 5, 17, 20, 3], np.int32)
    got = np.asarray(boundary._smallest_set(jnp.asarray(mask), jnp.asarray(key),
                                            jnp.asarray(tie), jnp.asarray(count)))
    for r in range(6):
        idx = np.nonzero(mask[r])[0]
        order = idx[np.lexsort((tie[r, idx], key[r, idx]))][:count[r]]
        np.testing.assert_array_equal(np.nonzero(got[r])[0], np.sort(order))



@pytest.mark.parametrize("values", [1, 2])
def test_insert_keeps_k_smallest_in_stable_order(values):
    # Sequential insertion of many entries with ties must equal a stable sort of all of them
    # (earlier entries first among equals), truncated to k; +inf inserts change nothing.
    rng = np.random.default_rng(7)
    c, k, r, steps = 3, 4, 9, 12
    entries = rng.integers(0, 5, size=(steps, c, r)).astype(np.float32)
    entries[3] = np.inf
    near = jnp.full((c, values, k, r), jnp.inf, jnp.float32)
    for t in range(steps):
        new = np.stack([entries[t], np.full((c, r), t, np.float32)][:values], axis=1)
        near = boundary._insert(near, jnp.asarray(new))
    order = np.argsort(entries, axis=0, kind="stable")[:k]               # [k, c, r]
    want = np.take_along_axis(entries, order, axis=0)
    got = np.asarray(near)
    np.testing.assert_array_equal(got[:, 0], want.transpose(1, 0, 2))
    if values == 2:  # the second value follows its entry (inf entries left as inf)
        want_t = np.where(np.isfinite(want), order, np.inf).astype(np.float32)
        np.testing.assert_array_equal(got[:, 1], want_t.transpose(1, 0, 2))

@pytest.mark.parametrize("params", [{}, NON_DEFAULT], ids=["default", "non_default"])
@pytest.mark.parametrize("mode", ["official", "paper"])
def test_matches_reference_blobs_x64(blobs, mode, params):
    x, cores = blobs
    ref_fn = official_reference if mode == "official" else paper_reference
    with jax.enable_x64(True):
        out = bilaf(KEY, x, cores, 40, mode=mode, **params)
        _check(out, ref_fn(x, cores, 40, **params), x.shape[0])
        if mode == "paper":
            ref_score = ref_fn(x, cores, 40, **params)[4]
            np.testing.assert_allclose(np.asarray(out.boundary_score), ref_score, rtol=1e-9)


@pytest.mark.parametrize("params,budget", [({}, 120), (NON_DEFAULT, 300)],
                         ids=["default", "non_default"])
@pytest.mark.parametrize("mode", ["official", "paper"])
def test_matches_reference_digits_x64(digit_features, mode, params, budget):
    x, cores = digit_features
    ref_fn = official_reference if mode == "official" else paper_reference
    with jax.enable_x64(True):
        out = bilaf(KEY, x, cores, budget, mode=mode, **params)
    _check(out, ref_fn(x, cores, budget, **params), x.shape[0])


def test_official_boundary_scores_are_the_scripts_bit_for_bit(digit_features):
    """The script's intra-class means are np.mean over rows in inclusion order; summed in
    NumPy's order (and divided as IEEE quotients) every boundary score is its value exactly."""
    x, cores = digit_features
    with jax.enable_x64(True):
        out = bilaf(KEY, x, cores, 200, mode="official")
    ref = official_reference(x, cores, 200)
    _check(out, ref, x.shape[0])
    np.testing.assert_array_equal(np.asarray(out.boundary_score), ref[4])


@pytest.mark.parametrize("seed", [0, 2, 9, 33])
def test_official_mode_on_a_tie_heavy_integer_pool(seed):
    """150 samples with 3 features in {0..3}: densities that are equal up to the order of
    their sums are common, so denoising keeps the script's samples only if every mean is
    summed and divided as NumPy does (seeds 0, 9 and 33 kept other samples before)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 4, size=(150, 3)).astype(np.float64)
    cores = np.sort(rng.choice(150, 3, replace=False))
    with jax.enable_x64(True):
        out = bilaf(KEY, x, cores, 30, mode="official", num_neighbors=3)
    ref = official_reference(x, cores, 30, num_neighbors=3)
    _check(out, ref, x.shape[0])
    np.testing.assert_array_equal(np.asarray(out.boundary_score), ref[4])


def test_official_other_num_neighbors_x64(blobs):
    x, cores = blobs
    with jax.enable_x64(True):
        out = bilaf(KEY, x, cores, 30, mode="official", num_neighbors=3, remove_fraction=0.2)
    _check(out, official_reference(x, cores, 30, num_neighbors=3, remove_fraction=0.2),
           x.shape[0])


def test_paper_float32_matches_reference(blobs):
    x, cores = blobs
    out = bilaf(KEY, x.astype(np.float32), cores, 40)
    assert out.boundary_score.dtype == jnp.float32
    _check(out, paper_reference(x.astype(np.float32), cores, 40), x.shape[0])


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_float32_pool_far_from_origin_matches_reference(blobs, mode):
    """Blobs moved 1000 from the origin in every coordinate (the mean's norm about 390 times
    their RMS spread), in float32: the selection is still the float64 reference's on the same
    inputs. The Gram form's cancellation error grows as ||x||^2; untranslated, 19 (paper)
    and 17 (official) of the 40 picks changed."""
    x, cores = blobs
    far = (x + 1000.0).astype(np.float32)
    reference = paper_reference if mode == "paper" else official_reference
    out = bilaf(KEY, far, cores, 40, mode=mode)
    _check(out, reference(far, cores, 40), x.shape[0])


def test_official_counts_are_the_scripts_float64_ones_for_float32_features():
    """The script's ring and kept counts are Python (float64) arithmetic: int(90 * (1 - 0.3))
    is 62, where float32 makes it 63. With x64 on, float32 features get the script's counts
    and its selection too."""
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(size=(90, 4)), 8 + rng.normal(size=(40, 4))])
    cores = [int(np.argmin(((x[:90] - x[:90].mean(0)) ** 2).sum(1))),
             90 + int(np.argmin(((x[90:] - x[90:].mean(0)) ** 2).sum(1)))]
    with jax.enable_x64(True), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the script's repeats, where they occur
        out = bilaf(KEY, x.astype(np.float32), cores, 20, mode="official", remove_fraction=0.3)
    labels, kept = np.asarray(out.pseudo_labels), np.asarray(out.kept)
    assert [int(kept[labels == j].sum()) for j in range(2)] == [62, 28]
    x32 = x.astype(np.float32).astype(np.float64)
    _check(out, official_reference(x32, cores, 20, remove_fraction=0.3), x.shape[0])


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
def test_integer_pool_far_from_origin_keeps_its_exact_ties(x64):
    """Small integer features (many samples exactly equidistant from two cores): the default
    Gram form, translated by an integer shift, decides those ties by the stated rules, as the
    reference does. Translated by the mean itself, 2 to 12 of the 150 labels and every
    selection here differed."""
    for seed in range(200, 203):
        rng = np.random.default_rng(seed)
        x = rng.integers(0, 4, size=(150, 4)).astype(np.float64)
        cores = rng.choice(150, 5, replace=False)
        assert len(np.unique(x[cores], axis=0)) == 5
        with jax.enable_x64(x64):
            for budget in (20, 50):
                out = bilaf(KEY, x if x64 else x.astype(np.float32), cores, budget)
                _check(out, paper_reference(x, cores, budget), 150)


def test_pool_near_the_origin_is_not_translated(blobs, monkeypatch):
    """A pool near the origin is measured as given (no copy, the same bits)."""
    x, cores = blobs
    seen = []
    assign = boundary._assign_jit
    monkeypatch.setattr(boundary, "_assign_jit",
                        lambda *a, **k: seen.append(k["centre"]) or assign(*a, **k))
    bilaf(KEY, x.astype(np.float32), cores, 40)
    bilaf(KEY, (x + 1000.0).astype(np.float32), cores, 40)
    with jax.enable_x64(True):
        bilaf(KEY, x + 1000.0, cores, 40, mode="official")  # explicit differences: no need
    assert seen == [False, True, False]


def test_paper_bfloat16_assignment_matches_reference(blobs):
    """bfloat16 matmuls only shortlist the nearest cores; the shortlist is re-measured in
    float32, so on blobs (no near-ties) the selection is the float32 reference's."""
    x, cores = blobs
    x32 = x.astype(np.float32)
    out = bilaf(KEY, x32, cores, 40, precision="bfloat16")
    _check(out, paper_reference(x32, cores, 40), x.shape[0])


def test_reduced_precision_shortlist_is_remeasured_exactly(digit_features):
    """`_assign` with bfloat16: the distances it keeps are the exact Euclidean distances (NumPy)
    to the cores it lists, ascending; and the labels are the exact nearest cores."""
    x, cores = digit_features
    x32 = x.astype(np.float32)
    core = np.sort(cores)
    a = boundary._assign_jit(x32, jnp.asarray(core, jnp.int32), jnp.int32(60), 0.1, 0.1,
                             num_nearest=5, normalize=False, centre=False, direct=False,
                             chunk_size=256, mode="paper", precision="bfloat16")
    idx, dist = np.asarray(a.core_index), np.asarray(a.core_dist)
    exact = np.linalg.norm(x[:, None, :] - x[core][idx], axis=-1)
    np.testing.assert_allclose(dist, exact, rtol=1e-5)
    assert (np.diff(dist, axis=1) >= 0).all()
    full = np.linalg.norm(x[:, None, :] - x[core][None], axis=-1)
    want = full.argmin(1)
    want[core] = np.arange(core.size)
    np.testing.assert_array_equal(np.asarray(a.labels), want)


def test_precision_checks(blobs):
    x, cores = blobs
    with pytest.raises(ValueError, match="unknown precision"):
        bilaf(KEY, x.astype(np.float32), cores, 40, precision="float16")
    with pytest.raises(ValueError, match="mode='paper' only"):
        bilaf(KEY, x.astype(np.float32), cores, 40, mode="official", precision="bfloat16")


def test_paper_normalize_matches_reference(blobs):
    x, cores = blobs
    with jax.enable_x64(True):
        out = bilaf(KEY, x, cores, 40, normalize=True)
    _check(out, paper_reference(x, cores, 40, normalize=True), x.shape[0])


def test_output_layout_and_uniqueness(blobs):
    x, cores = blobs
    out = bilaf(KEY, x.astype(np.float32), cores[::-1], 40)  # unsorted cores are sorted
    idx = np.asarray(out.indices)
    alloc = np.asarray(out.allocation)
    starts = np.concatenate([[0], np.cumsum(alloc)[:-1]])
    np.testing.assert_array_equal(idx[starts], np.sort(cores))
    assert len(set(idx.tolist())) == 40 and alloc.min() >= 1
    labels = np.asarray(out.pseudo_labels)
    for j, s in enumerate(starts):
        assert (labels[idx[s:s + alloc[j]]] == j).all()
    assert np.isinf(np.asarray(out.boundary_score)[~np.asarray(out.kept)]).all()
    assert not np.isnan(np.asarray(out.boundary_score)).any()


# --- edge cases (x64, exact distances so that duplicate rows tie exactly) ------------------


def _edge(x, cores, budget, **kw):
    with jax.enable_x64(True):
        out = bilaf(KEY, x, cores, budget, direct=True, **kw)
    ref = paper_reference(x, cores, budget, **kw)
    _check(out, ref, x.shape[0])
    assert len(set(np.asarray(out.indices).tolist())) == budget
    return out


def test_single_sample_class_and_small_classes():
    x, cores = _blobs(seed=3, n=40, d=3, k=3)
    x = np.concatenate([x, [[50.0, 50.0, 50.0]]])  # a far core alone in its class
    cores = np.append(cores, 40)
    out = _edge(x, cores, 12)
    assert int(np.sum(np.asarray(out.pseudo_labels) == 3)) == 1
    with jax.enable_x64(True):
        off = bilaf(KEY, x, cores, 12, mode="official", direct=True)
    _check(off, official_reference(x, cores, 12), x.shape[0])


def test_budget_equals_num_cores_and_pool_size():
    x, cores = _blobs(seed=4, n=40, d=3, k=3)
    out = _edge(x, cores, 3)
    np.testing.assert_array_equal(np.asarray(out.indices), np.sort(cores))
    out = _edge(x, cores, 40)
    assert sorted(np.asarray(out.indices).tolist()) == list(range(40))


def test_duplicate_rows_and_identical_rows():
    x, cores = _blobs(seed=5, n=40, d=3, k=3)
    x[10:20] = x[5]
    _edge(x, cores, 12)
    same = np.ones((40, 3))
    out = _edge(same, cores, 9)
    assert int(np.sum(np.asarray(out.pseudo_labels) == 0)) == 38
    with pytest.raises(ValueError, match="not in its own pseudo-class"):
        with jax.enable_x64(True):
            bilaf(KEY, same, cores, 9, mode="official")


def test_single_core():
    x, _ = _blobs(seed=6, n=40, d=3, k=3)
    out = _edge(x, [7], 6)
    assert np.isinf(np.asarray(out.boundary_score)).all()
    with jax.enable_x64(True):
        off = bilaf(KEY, x, [7], 6, mode="official")
    _check(off, official_reference(x, [7], 6), 40)


def test_official_zero_allocation_raises():
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.normal(size=(100, 2)), rng.normal(size=(5, 2)) + 30,
                        rng.normal(size=(5, 2)) - 30])
    cores = [0, 100, 105]
    with pytest.raises(ValueError, match="allocation gives 0"):
        bilaf(KEY, x, cores, 3, mode="official")
    with pytest.raises(ValueError, match="zero allocation"):
        official_reference(x, cores, 3)
    out = bilaf(KEY, x, cores, 3)  # paper mode: every class gets at least its core
    np.testing.assert_array_equal(np.asarray(out.indices), cores)


def test_official_repeats_warn_and_match_reference():
    rng = np.random.default_rng(8)
    x = np.concatenate([rng.normal(size=(20, 2)) + 10 * i for i in range(3)])
    cores = [0, 20, 40]
    with jax.enable_x64(True):
        with pytest.warns(UserWarning, match="repeats samples"):
            out = bilaf(KEY, x, cores, 60, mode="official")
    ref = official_reference(x, cores, 60)
    _check(out, ref, 60)
    assert len(set(ref[0])) < 60
    paper = bilaf(KEY, x, cores, 60)
    assert len(set(np.asarray(paper.indices).tolist())) == 60


@pytest.mark.parametrize("bad,match", [
    (dict(features=np.full((10, 2), np.nan)), "NaN"),
    (dict(features=np.zeros(10)), "2-D"),
    (dict(core_indices=[1, 1]), "repeated"),
    (dict(core_indices=[1, 10]), "out of range"),
    (dict(core_indices=[]), "core_indices"),
    (dict(budget=1), "budget"),
    (dict(budget=11), "budget"),
    (dict(mode="nope"), "mode"),
    (dict(ring_fraction=0.0), "ring_fraction"),
    (dict(remove_fraction=1.5), "remove_fraction"),
    (dict(opponent_penalty=-1.0), "opponent_penalty"),
    (dict(num_neighbors=0), "num_neighbors"),
])
def test_bad_inputs(bad, match):
    args = dict(features=np.random.default_rng(0).normal(size=(10, 2)), core_indices=[1, 4],
                budget=4)
    kwargs = {k: v for k, v in bad.items() if k not in args}
    args.update({k: v for k, v in bad.items() if k in args})
    with pytest.raises(ValueError, match=match):
        bilaf(KEY, args["features"], args["core_indices"], args["budget"], **kwargs)


def test_vmap_over_hyperparameters(blobs):
    x, cores = blobs
    x = x.astype(np.float32)
    sweep = dict(remove_fraction=[0.0, 0.1, 0.3], ring_fraction=[0.05, 0.1, 0.5],
                 opponent_penalty=[1.0, 1.1, 2.0])

    def run(remove, ring, penalty):
        out = bilaf(KEY, x, cores, 40, remove_fraction=remove, ring_fraction=ring,
                    opponent_penalty=penalty)
        return out.indices, out.allocation, out.kept

    batched = jax.vmap(run)(*(jnp.asarray(v, jnp.float32) for v in sweep.values()))
    for i in range(3):
        single = run(*(np.float32(v[i]) for v in sweep.values()))
        for b, s in zip(batched, single, strict=True):
            np.testing.assert_array_equal(np.asarray(b[i]), np.asarray(s))


def test_official_mode_under_vmap_marks_settings_the_script_would_crash_on(blobs):
    """Traced official mode cannot raise: a setting where the authors' script divides by zero
    (a class allocated nothing) returns -1s; a setting it runs gives the plain call's list."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(90, 2)), rng.normal(size=(3, 2)) + 20,
                        rng.normal(size=(3, 2)) - 20, rng.normal(size=(3, 2)) + [20, -20]])
    cores = [0, 90, 93, 96]
    with pytest.raises(ValueError, match="allocation gives 0 samples"):
        bilaf(KEY, x, cores, 4, mode="official")
    crash = jax.vmap(lambda p: bilaf(KEY, x, cores, 4, mode="official", remove_fraction=p).indices)
    np.testing.assert_array_equal(np.asarray(crash(jnp.array([0.1, 0.2]))), -np.ones((2, 4)))
    x2, cores2 = blobs
    run = jax.vmap(lambda p: bilaf(KEY, x2, cores2, 40, mode="official", remove_fraction=p).indices)
    fine = np.asarray(run(jnp.array([0.1, 0.3])))
    for row, p in zip(fine, (0.1, 0.3), strict=True):
        np.testing.assert_array_equal(row, bilaf(KEY, x2, cores2, 40, mode="official",
                                                 remove_fraction=p).indices)


def _bucket_compiles(caplog, fn):
    """Class-program compilations (jax's compile log) while running fn()."""
    caplog.clear()
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        fn()
    return [r.getMessage() for r in caplog.records
            if r.getMessage().startswith("Compiling jit(_bucket)")]


def test_no_recompile_on_second_call(blobs, caplog):
    # New hyperparameter values and a new budget reuse the compiled class programs.
    x, cores = blobs
    x = x.astype(np.float32)
    jax.clear_caches()  # earlier tests may have compiled these programs already
    first = _bucket_compiles(caplog, lambda: bilaf(KEY, x, cores, 40, remove_fraction=0.1))
    assert first  # the log does show this program's compilations

    def again():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            bilaf(KEY, x, cores, 40, remove_fraction=0.25, opponent_penalty=1.3)
            bilaf(KEY, x, cores, 60, ring_fraction=0.3)

    assert _bucket_compiles(caplog, again) == []


@pytest.mark.parametrize("parts", [1, 3])
def test_parts_in_threads_match_one_call(monkeypatch, parts):
    # Buckets dealt over threads (padded with empty batches) give what one call per bucket
    # gives; several buckets and several batches per bucket.
    monkeypatch.setattr(boundary, "_BATCH_ELEMENTS", 1 << 12)
    monkeypatch.setattr(boundary, "_COMPILE_SECONDS", 0.0)  # a bucket per padded size
    x, cores = _blobs(seed=3, n=300, d=6, k=8)
    x = x.astype(np.float32)
    want = {}
    for mode in ("paper", "official"):
        monkeypatch.setattr(boundary, "_CPU_PARTS", 0)  # plain jitted calls
        want[mode] = bilaf(KEY, x, cores, 60, mode=mode)
    monkeypatch.setattr(boundary, "_CPU_PARTS", parts)
    plan = boundary._plan(np.asarray(want["paper"].pseudo_labels), np.sort(cores), x.shape[1],
                          boundary._BATCH_ELEMENTS)
    assert len(plan) > 1 and any(b.classes.shape[0] > 2 * b.batch for b in plan)
    for mode in ("paper", "official"):
        got = bilaf(KEY, x, cores, 60, mode=mode)
        for a, b in zip(got, want[mode], strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_batch_size_per_device_and_results_independent_of_it(monkeypatch):
    class OnGpu:
        def devices(self):
            return [types.SimpleNamespace(platform="gpu")]

    x, cores = _blobs(seed=4, n=500, d=6, k=12)
    x = x.astype(np.float32)
    assert boundary._batch_elements(jnp.asarray(x)) == boundary._BATCH_ELEMENTS
    assert boundary._batch_elements(OnGpu()) == boundary._ACCELERATOR_BATCH_ELEMENTS
    want = {mode: bilaf(KEY, x, cores, 90, mode=mode) for mode in ("paper", "official")}
    for elements in (1 << 10, 1 << 30):  # many small batches; one batch per bucket
        monkeypatch.setattr(boundary, "_BATCH_ELEMENTS", elements)
        plan = boundary._plan(np.asarray(want["paper"].pseudo_labels), np.sort(cores), 6, elements)
        assert all((b.batch == b.classes.shape[0]) == (elements > 1 << 20) for b in plan)
        for mode in ("paper", "official"):
            got = bilaf(KEY, x, cores, 90, mode=mode)
            for name in ("indices", "pseudo_labels", "kept", "allocation"):
                np.testing.assert_array_equal(getattr(got, name), getattr(want[mode], name))
            # float32 sums of other batch shapes may round differently
            np.testing.assert_allclose(got.boundary_score, want[mode].boundary_score, rtol=1e-5,
                                       atol=1e-6)


def test_unknown_compiler_option_falls_back_to_defaults(monkeypatch, blobs):
    # An XLA that lacks an option in _CPU_COMPILER_OPTIONS compiles with its defaults.
    x, cores = blobs
    want = bilaf(KEY, x.astype(np.float32), cores, 40)
    monkeypatch.setattr(boundary, "_CPU_COMPILER_OPTIONS", {"xla_no_such_option": True})
    monkeypatch.setattr(boundary, "_CPU_PARTS", 2)
    jax.clear_caches()
    got = bilaf(KEY, x.astype(np.float32), cores, 40)
    np.testing.assert_array_equal(np.asarray(got.indices), np.asarray(want.indices))


def test_num_parts_follows_cores_with_a_cap(monkeypatch):
    x = jnp.zeros((4, 2))  # on the default (CPU) device here
    monkeypatch.setattr(boundary.os, "sched_getaffinity", lambda _: set(range(3)), raising=False)
    assert boundary._num_parts(x) == 3
    monkeypatch.setattr(boundary.os, "sched_getaffinity", lambda _: set(range(64)), raising=False)
    assert boundary._num_parts(x) == boundary._MAX_CPU_PARTS
    monkeypatch.setattr(boundary, "_CPU_PARTS", 0)
    assert boundary._num_parts(x) == 0


def test_parts_deal_batches_round_robin():
    c, p, batch = 10, 4, 2
    bucket = boundary._Bucket(np.arange(c, dtype=np.int32) + 1,
                              np.arange(c * p, dtype=np.int32).reshape(c, p),
                              np.full(c, 3, np.int32), np.arange(c, dtype=np.int32), batch)
    parts = boundary._parts(bucket, 3)  # 5 batches over 3 parts: 2, 2, 1 (+ 1 empty)
    assert [q.classes.tolist() for q in parts] == [[1, 2, 7, 8], [3, 4, 9, 10], [5, 6, 0, 0]]
    assert all(q.members.shape == (4, p) and q.batch == batch for q in parts)
    assert parts[2].counts.tolist() == [3, 3, 0, 0]
    assert boundary._parts(bucket, 1) == [bucket]
    assert len(boundary._parts(bucket, 9)) == 5


@pytest.mark.parametrize("tracked,block,cache", [(2, 1 << 22, 1 << 24), (1, 1, 1)],
                         ids=["cached", "recomputed_per_class"])
def test_paper_tracked_opponents_fallback_exact(monkeypatch, tracked, block, cache):
    # Few tracked opponents per sample: rounds where the tracked minimum exceeds the bound
    # for the untracked cores scan every core (both parameter sets do; checked by disabling
    # the scan, which makes this test fail).
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 6))
    cores = rng.choice(300, 30, replace=False)
    monkeypatch.setattr(boundary, "NUM_OPPONENTS", tracked)
    monkeypatch.setattr(boundary, "_CORE_BLOCK_ELEMENTS", block)
    monkeypatch.setattr(boundary, "_CORE_CACHE_ELEMENTS", cache)
    with jax.enable_x64(True):
        out = bilaf(KEY, x, cores, 100, opponent_penalty=1.5)
    _check(out, paper_reference(x, cores, 100, opponent_penalty=1.5), 300)


def test_official_allocation_beyond_padded_class_size():
    # A large remove fraction shrinks the kept sizes, so the script's allocation exceeds the
    # padded size P of a class's bucket: its picks repeat past P and must all be kept.
    rng = np.random.default_rng(111)
    n, k = int(rng.integers(60, 300)), int(rng.integers(2, 30))
    x = rng.normal(size=(n, 4)) * rng.uniform(0.2, 3)
    cores = rng.choice(n, k, replace=False)
    budget = int(rng.integers(n // 2, n + 1))
    with jax.enable_x64(True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = bilaf(KEY, x, cores, budget, mode="official", remove_fraction=0.95)
        ref = official_reference(x, cores, budget, remove_fraction=0.95)
    alloc = np.asarray(out.allocation)
    plan = boundary._plan(np.asarray(out.pseudo_labels), np.sort(cores), x.shape[1],
                          boundary._BATCH_ELEMENTS)
    assert any((alloc[b.classes[b.counts > 0]] > b.members.shape[1]).any() for b in plan)
    np.testing.assert_array_equal(np.asarray(out.indices), np.asarray(ref[0]))


def _script_allocation(sizes, budget):
    """The authors' allocation in Python floats: floor(size / total * B), then leftovers."""
    total = sum(sizes)
    alloc = [int(np.floor(s / total * budget)) for s in sizes]
    for _ in range(budget - sum(alloc)):
        low = min(alloc)
        j = min((i for i in range(len(sizes)) if alloc[i] == low),
                key=lambda i: (-sizes[i], i))
        alloc[j] += 1
    return alloc


def test_official_allocation_is_the_scripts_where_p_b_is_whole():
    # 22 / 55 is 0.4 as an IEEE quotient; as 22 * (1 / 55) it is 0.39999999999999997, and
    # floor(p B) then loses the unit the script keeps.
    rng = np.random.default_rng(0)
    cases = [([6, 12, 6, 22, 9], 10), ([5, 7], 12), ([1, 48], 49), ([3, 3, 3], 7)]
    cases += [(rng.integers(1, 60, rng.integers(2, 9)).tolist(), int(rng.integers(5, 80)))
              for _ in range(300)]
    allocate = jax.jit(boundary._allocate_official)  # compiled, the budget traced: as in the stage
    with jax.enable_x64(True):
        got = [allocate(jnp.asarray(s, jnp.int32), b).tolist() for s, b in cases]
    assert got == [_script_allocation(s, b) for s, b in cases]


def test_official_whole_shares_end_to_end():
    # Two classes of 5 and 7 samples and a budget of 12: p_i B = 5 and 7 exactly.
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(size=(5, 2)), 20 + rng.normal(size=(7, 2))])
    with jax.enable_x64(True):
        out = bilaf(KEY, x, [0, 5], 12, mode="official", direct=True)
    np.testing.assert_array_equal(np.asarray(out.allocation), [5, 7])
    _check(out, official_reference(x, [0, 5], 12), 12)


@pytest.mark.parametrize("x64", [False, True])
def test_paper_ring_and_kept_sizes_are_exact_floors(x64):
    R = boundary.Ratio.of
    with jax.enable_x64(x64):
        ftype = jnp.result_type(float)
        m = jnp.asarray([90, 70, 10, 33], jnp.int32)
        ring, _, keep = boundary._ring_plan(m, R(0.1), R(0.3), mode="paper", ftype=ftype)
        assert keep.tolist() == [63, 49, 7, 23] and ring.tolist() == [9, 7, 1, 3]
        _, _, keep = boundary._ring_plan(m, R(0.1), R(0.3), mode="official", ftype=ftype)
        if x64:  # the script's float64 floor: int(90 * 0.7) is 62
            assert keep.tolist() == [int(v * (1 - 0.3)) for v in (90, 70, 10, 33)] \
                == [62, 49, 7, 23]


@pytest.mark.parametrize("x64", [False, True])
def test_paper_floors_are_exact_where_float32_cannot_tell(x64):
    """floor(m P_in) and floor(m (1 - P_rm)) against exact rationals for every m up to 20,000
    and fractions of up to three decimals (float32's 1001 x 0.999 rounds to 1000), given as
    Python floats and as float32 scalars."""
    from fractions import Fraction

    m = np.arange(1, 20001)
    with jax.enable_x64(x64):
        ftype = jnp.result_type(float)
        for p in (0.001, 0.01, 0.017, 0.1, 0.3, 0.999):
            for given in (p, np.float32(p)):
                ring, _, keep = boundary._ring_plan(
                    jnp.asarray(m, jnp.int32), boundary.Ratio.of(given),
                    boundary.Ratio.of(given), mode="paper", ftype=ftype)
                q = Fraction(str(p))
                want_ring = np.maximum(1, [int(v * q) for v in m])
                want_keep = np.maximum(1, [int(v * (1 - q)) for v in m])
                np.testing.assert_array_equal(np.asarray(ring), want_ring, err_msg=str(p))
                np.testing.assert_array_equal(np.asarray(keep), want_keep, err_msg=str(p))


def test_paper_kept_count_of_a_large_class_is_exact_end_to_end():
    """A 1001-sample pseudo-class with remove_fraction = 0.001 keeps 999 in float32 (was 1000);
    a vmapped sweep over the fraction floors the same way."""
    from bilaf_jax.sweep import sweep_boundary

    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(size=(1001, 2)), 100 + rng.normal(size=(5, 2))]).astype(np.float32)
    out = bilaf(KEY, x, [0, 1001], 20, remove_fraction=0.001)
    assert int(np.asarray(out.kept)[:1001].sum()) == 999
    sw = sweep_boundary(KEY, x, [0, 1001], 20, {"remove_fraction": [0.001, 0.1]})
    assert np.asarray(sw.kept)[:, :1001].sum(1).tolist() == [999, 900]


def test_official_remove_fraction_one_is_refused():
    x, cores = _blobs(seed=7, n=60, d=3, k=3)
    with pytest.raises(ValueError, match="remove_fraction = 1 keeps no sample"):
        with jax.enable_x64(True):
            bilaf(KEY, x, cores, 12, mode="official", remove_fraction=1.0)
