"""Property-based tests of the selector contract (hypothesis).

Every selector, over tiny random pools with duplicate rows and ties (integer-valued features,
all-identical rows), budgets across the valid range and random `exclude` / `labeled` sets:
int32 indices of the right length, unique, in range, excluded rows never chosen, same key same
answer; invalid budgets raise ValueError.

Official mode reproduces the authors' script, so two documented outcomes are accepted there and
nothing else: a ValueError where the script would crash (a zero allocation, a core not in its
own pseudo-class, a core removed by denoising) and a warning, with repeated indices, where the
script repeats samples.

Budgets and pool shapes are static (each new one compiles), so pools are drawn from a few sizes
and example counts are small. `BILAF_PROPERTY_EXAMPLES=10` runs ten times as many examples.
"""

import functools
import os
import re
import warnings

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bilaf_jax.activeft import activeft
from bilaf_jax.baselines import kcenter_select, kmeans_select, random_select
from bilaf_jax.pipeline import CORE_METHODS, select

SCALE = max(1, int(os.environ.get("BILAF_PROPERTY_EXAMPLES", "1")))
POOL_SIZES = (1, 2, 9, 40)
DIMS = (1, 3, 5)
KINDS = ("normal", "integer", "identical", "duplicates")

SELECTORS = {
    "activeft": functools.partial(activeft, num_steps=3),
    "kcenter": kcenter_select,
    "kmeans": functools.partial(kmeans_select, num_iters=5),
    "random": random_select,
}

# The official-mode errors `bilaf_jax.boundary.bilaf` documents (the script's crash points).
OFFICIAL_ERRORS = re.compile(
    r"official mode: (the authors' allocation gives 0 samples"
    r"|core \d+ \(class \d+\) is nearest to core"
    r"|denoising removed core)")
OFFICIAL_REPEAT_WARNING = re.compile(r"official mode: .*repeats samples")


def _settings(examples):
    # derandomize: every run draws the same cases, so a failure in CI repeats on any machine
    # (BILAF_PROPERTY_EXAMPLES widens the search)
    return settings(max_examples=examples * SCALE, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def make_pool(kind: str, n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        x = rng.normal(size=(n, d))
    elif kind == "integer":  # raw-pixel-like: exact distance ties everywhere
        x = rng.integers(-2, 3, size=(n, d))
    elif kind == "identical":
        x = np.broadcast_to(rng.normal(size=(1, d)), (n, d))
    else:  # a few distinct rows, each repeated
        base = rng.integers(-3, 4, size=(max(1, n // 3), d))
        x = base[rng.integers(0, base.shape[0], size=n)]
    return np.ascontiguousarray(x, dtype=np.float32)


@st.composite
def problems(draw, sizes=POOL_SIZES):
    """(features [n, d], exclude or None, budget) with 1 <= budget <= n - |exclude|."""
    n = draw(st.sampled_from(sizes))
    d = draw(st.sampled_from(DIMS))
    kind = draw(st.sampled_from(KINDS))
    x = make_pool(kind, n, d, draw(st.integers(0, 2**32 - 1)))
    exclude = None
    if n > 1 and draw(st.booleans()):
        exclude = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n - 1, unique=True))
        exclude = np.array(exclude, np.int32)
    free = n - (0 if exclude is None else exclude.size)
    budget = draw(st.integers(1, free))
    return x, exclude, budget


def check_indices(idx, n, budget, exclude, unique=True):
    idx = np.asarray(idx)
    assert idx.dtype == np.int32, idx.dtype
    assert idx.shape == (budget,), (idx.shape, budget)
    assert ((idx >= 0) & (idx < n)).all(), idx
    if unique:
        assert np.unique(idx).size == budget, idx
    if exclude is not None:
        assert not np.isin(idx, exclude).any(), (idx, exclude)


@pytest.mark.parametrize("name", SELECTORS)
@given(problem=problems())
@_settings(6)
def test_selector_contract(name, problem):
    x, exclude, budget = problem
    fn = SELECTORS[name]
    kw = {} if exclude is None else {"exclude": exclude}
    out = fn(jax.random.key(7), x, budget, **kw)
    check_indices(out.indices, x.shape[0], budget, exclude)
    # Baselines and ActiveFT return ascending indices.
    assert np.all(np.diff(np.asarray(out.indices)) > 0)
    again = fn(jax.random.key(7), x.copy(), budget, **kw)
    np.testing.assert_array_equal(out.indices, again.indices)
    # Selecting every free row gives exactly the free rows.
    if budget == x.shape[0] - (0 if exclude is None else exclude.size):
        np.testing.assert_array_equal(out.indices, np.setdiff1d(np.arange(x.shape[0]), kw.get("exclude", [])))


@pytest.mark.parametrize("name", SELECTORS)
@given(problem=problems(), data=st.data())
@_settings(10)
def test_selector_rejects_invalid_budget(name, problem, data):
    x, exclude, _ = problem
    n = x.shape[0]
    free = n - (0 if exclude is None else exclude.size)
    bad = data.draw(st.sampled_from([0, -1, free + 1, n + 1, 10**9, 1.5, float(free), True, "1", None]))
    kw = {} if exclude is None else {"exclude": exclude}
    with pytest.raises(ValueError, match=r"num_samples must be|rows are not excluded"):
        SELECTORS[name](jax.random.key(0), x, bad, **kw)


def run_bilaf(x, budget, num_cores, core_method, mode, labeled, seed=3):
    """Returns (indices or None, error message or None, warning messages)."""
    core_options = {"num_steps": 2} if core_method == "activeft" else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = select(jax.random.key(seed), x, budget, method="bilaf", num_cores=num_cores,
                         core_method=core_method, mode=mode, core_options=core_options,
                         labeled=labeled)
            idx, err = np.asarray(out.indices), None
        except ValueError as e:
            idx, err = None, str(e)
    return idx, err, [str(w.message) for w in caught]


@pytest.mark.parametrize("mode", ["paper", "official"])
@given(problem=problems(sizes=(1, 9, 40)), data=st.data())
@_settings(4)
def test_bilaf_contract(mode, problem, data):
    x, labeled, budget = problem
    n = x.shape[0]
    num_cores = data.draw(st.integers(1, budget), label="num_cores")
    core_method = data.draw(st.sampled_from(CORE_METHODS), label="core_method")
    idx, err, warned = run_bilaf(x, budget, num_cores, core_method, mode, labeled)
    if mode == "paper":
        assert err is None, err
        assert not warned, warned
        check_indices(idx, n, budget, labeled)
    elif labeled is not None and labeled.size:
        assert err is not None and "need mode='paper'" in err, err
    else:
        if err is not None:
            assert OFFICIAL_ERRORS.match(err), err
            assert not warned, warned
        else:
            assert all(OFFICIAL_REPEAT_WARNING.match(w) for w in warned), warned
            # Repeats only where the script repeats, and then it says so.
            check_indices(idx, n, budget, labeled, unique=not warned)
            if not warned:
                assert np.unique(idx).size == budget
    again = run_bilaf(x.copy(), budget, num_cores, core_method, mode, labeled)
    if idx is None:
        assert again[0] is None and again[1] == err
    else:
        np.testing.assert_array_equal(idx, again[0])


@pytest.mark.parametrize("mode", ["paper", "official"])
@given(problem=problems(sizes=(1, 9, 40)), data=st.data())
@_settings(10)
def test_bilaf_rejects_invalid_budget_and_cores(mode, problem, data):
    x, labeled, budget = problem
    n = x.shape[0]
    free = n - (0 if labeled is None else labeled.size)
    bad_budget = data.draw(st.sampled_from([0, -1, free + 1, n + 1, 2.5, True, "2", None]))
    # official mode refuses a labelled pool, where the budget alone does not fail first
    want = r"budget must be|rows are not excluded"
    if mode == "official" and labeled is not None and labeled.size:
        want = r"budget must be|need mode='paper'"
    with pytest.raises(ValueError, match=want):
        select(jax.random.key(0), x, bad_budget, method="bilaf", mode=mode, labeled=labeled,
               core_method="kcenter")
    bad_cores = data.draw(st.sampled_from([0, -1, budget + 1, 1.5, True]))
    with pytest.raises(ValueError, match="num_cores must be"):
        select(jax.random.key(0), x, budget, method="bilaf", num_cores=bad_cores, mode=mode,
               core_method="kcenter")


def test_paper_mode_single_core_does_not_repeat_it():
    # With one core there is no opponent, so every candidate's boundary score is +inf: the
    # value that also marks removed candidates. The removed core must not win that tie.
    x = make_pool("normal", 9, 1, seed=0)
    for budget in (2, 9):
        idx = np.asarray(select(jax.random.key(0), x, budget, num_cores=1, core_method="kcenter").indices)
        check_indices(idx, 9, budget, None)


def test_official_mode_refuses_labelled_pools():
    # The authors' script has no labelled pool and repeats cores where a class is too small, so
    # no faithful list of `budget` new rows exists: official mode refuses, paper mode serves.
    x = make_pool("normal", 40, 3, seed=0)
    labeled = np.array([0, 1], np.int32)
    with pytest.raises(ValueError, match="need mode='paper'"):
        select(jax.random.key(0), x, 38, num_cores=2, core_method="kcenter", mode="official", labeled=labeled)
    out = select(jax.random.key(0), x, 38, num_cores=2, core_method="kcenter", labeled=labeled)
    check_indices(out.indices, 40, 38, labeled)
