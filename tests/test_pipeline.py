"""`select`, the one-call pipeline."""

import json

import jax
import numpy as np
import pytest

from bilaf_jax.pipeline import METHODS, default_num_cores, select


@pytest.fixture(scope="module")
def pool(digits):
    return digits[0][:400]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_returns_budget_unique_indices(method, pool):
    out = select(jax.random.key(0), pool, 40, method=method, num_cores=8 if method == "bilaf" else None,
                 core_options=dict(num_steps=20) if method in ("bilaf", "activeft") else None)
    idx = np.asarray(out.indices)
    assert idx.shape == (40,) and idx.dtype == np.int32
    assert len(np.unique(idx)) == 40 and idx.min() >= 0 and idx.max() < len(pool)
    assert set(np.asarray(out.core_indices).tolist()) <= set(idx.tolist())


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_bilaf_blocks_start_with_their_cores(mode, pool):
    out = select(jax.random.key(1), pool, 50, num_cores=10, mode=mode, core_method="kcenter")
    cores = np.asarray(out.core_indices)
    idx = np.asarray(out.indices)
    labels = np.asarray(out.boundary.pseudo_labels)
    # Class blocks in ascending core order, each opening with its core.
    starts = [i for i in range(len(idx)) if i == 0 or labels[idx[i]] != labels[idx[i - 1]]]
    np.testing.assert_array_equal(idx[starts], cores)


def test_core_stage_same_randomness_with_or_without_boundary(pool):
    a = select(jax.random.key(7), pool, 30, num_cores=6, core_method="kcenter")
    b = select(jax.random.key(7), pool, 30, num_cores=6, core_method="kcenter", mode="official")
    np.testing.assert_array_equal(a.core_indices, b.core_indices)


@pytest.mark.parametrize("method", ["bilaf", "kcenter", "random"])
def test_labeled_rows_are_never_selected(method, pool):
    labeled = np.arange(0, 400, 9)
    out = select(jax.random.key(0), pool, 30, method=method, labeled=labeled,
                 num_cores=6 if method == "bilaf" else None, core_method="kcenter")
    idx = np.asarray(out.indices)
    assert idx.shape == (30,) and len(np.unique(idx)) == 30
    assert not set(idx.tolist()) & set(labeled.tolist())


def test_labeled_rows_act_as_cores_in_bilaf(pool):
    labeled = np.array([5, 77, 300])
    out = select(jax.random.key(0), pool, 30, num_cores=6, core_method="kcenter", labeled=labeled)
    used = np.asarray(out.boundary.pseudo_labels)
    # Every labelled row heads its own pseudo-class in the boundary stage.
    assert len(np.unique(used)) == 9
    assert len(set(used[labeled].tolist())) == 3


def test_default_num_cores_matches_paper_settings():
    assert default_num_cores(500) == 50  # CIFAR-10 1%
    assert default_num_cores(2500) == 250  # CIFAR-100 5%
    assert default_num_cores(64058) == 6405  # ImageNet 5%
    assert default_num_cores(5) == 1
    for bad in (0, -5, 2.5, True):  # no core count for no budget (was 1)
        with pytest.raises(ValueError, match="budget must be a positive integer"):
            default_num_cores(bad)


def test_bad_arguments(pool):
    key = jax.random.key(0)
    for kwargs, match in [
        (dict(method="nope"), "unknown method"),
        (dict(core_method="nope"), "unknown core_method"),
        (dict(mode="nope"), "unknown mode"),
        (dict(num_cores=41), "num_cores"),
        (dict(method="random", num_cores=3), "num_cores"),
        (dict(labeled=[1, 1]), "repeated"),
        (dict(precision="float16"), "unknown precision"),
        (dict(precision="bfloat16", core_options=dict(precision="float32")), "conflicts"),
    ]:
        with pytest.raises(ValueError, match=match):
            select(key, pool, 40, **kwargs)
    with pytest.raises(ValueError, match="budget"):
        select(key, pool, 401)


def test_precision_reaches_both_stages(pool, monkeypatch):
    """select(precision=...) runs ActiveFT and the boundary assignment at that precision."""
    from bilaf_jax import boundary, pipeline

    seen = {}
    assign, core = boundary._assign_jit, pipeline._CORE_SELECTORS["activeft"]
    monkeypatch.setattr(boundary, "_assign_jit",
                        lambda *a, **k: seen.setdefault("assign", k["precision"]) and assign(*a, **k))
    monkeypatch.setitem(pipeline._CORE_SELECTORS, "activeft",
                        lambda *a, **k: seen.setdefault("activeft", k.get("precision")) and core(*a, **k))
    out = select(jax.random.key(0), pool, 40, num_cores=8, precision="bfloat16",
                 core_options=dict(num_steps=20))
    assert seen == {"activeft": "bfloat16", "assign": "bfloat16"}
    assert len(np.unique(np.asarray(out.indices))) == 40


@pytest.mark.parametrize("bad,message", [
    (dict(mode="official", precision="bfloat16"), "official mode computes in float64"),
    (dict(mode="official", remove_fraction=1.0), "remove_fraction = 1 keeps no sample"),
    (dict(ring_fraction=0.0), r"ring_fraction must be in \(0, 1\]"),
    (dict(opponent_penalty=0.0), "opponent_penalty")])
def test_bad_boundary_settings_fail_before_stage_1(monkeypatch, bad, message):
    from bilaf_jax import pipeline

    def stage_1(*args, **kwargs):
        raise AssertionError("ActiveFT ran before the boundary settings were checked")

    monkeypatch.setitem(pipeline._CORE_SELECTORS, "activeft", stage_1)
    x = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=message):  # not the AssertionError of stage_1
        select(jax.random.key(0), x, 10, num_cores=3, **bad)


def test_official_mode_through_select_and_the_commands_matches_the_script(digits, tmp_path):
    """`select`, `bilaf select` and `bilaf run`'s boundary stage compute official mode in
    float64 as the script does: on float32 features far from the origin (where float32
    distances lose the last digits), their picks equal the script's reference."""
    from bilaf_jax.cli import main
    from bilaf_jax.experiment import boundary_from_cores
    from tests.reference_boundary import official_reference

    noise = np.random.default_rng(0).normal(size=(500, 64))
    x = (digits[0][:500] / 16 + 30 + 1e-3 * noise).astype(np.float32)
    out = select(jax.random.key(0), x, 120, num_cores=12, core_method="kcenter", mode="official")
    cores = np.asarray(out.core_indices)
    want = official_reference(x.astype(np.float64), cores, 120)[0]
    np.testing.assert_array_equal(np.asarray(out.indices), want)
    np.testing.assert_array_equal(
        np.asarray(boundary_from_cores(0, x, cores, 120, mode="official").indices), want)
    np.save(tmp_path / "f.npy", x)
    assert main(["select", str(tmp_path / "f.npy"), "--budget", "120", "--cores", "12",
                 "--core-method", "kcenter", "--mode", "official", "--seed", "0",
                 "--out", str(tmp_path / "sel.json")]) == 0
    assert json.loads((tmp_path / "sel.json").read_text()) == [int(i) for i in want]


def test_labelled_rows_act_as_cores_and_are_not_picked_again(digits):
    """A labelled pool in paper mode equals the reference run with the labelled rows added to
    the new cores and the budget raised by their number, labelled rows then left out."""
    from tests.reference_boundary import paper_reference

    x = (digits[0][:300] @ np.random.default_rng(0).normal(size=(64, 8))).astype(np.float32)
    labeled = np.array([5, 77, 150, 299])
    out = select(jax.random.key(1), x, 40, num_cores=6, core_method="kcenter", labeled=labeled)
    cores = np.asarray(out.core_indices)
    assert not set(cores.tolist()) & set(labeled.tolist())
    ref = paper_reference(x.astype(np.float64), np.sort(np.concatenate([cores, labeled])), 44)[0]
    want = [i for i in ref if i not in set(labeled.tolist())]
    np.testing.assert_array_equal(np.asarray(out.indices), want)


def test_boundary_settings_given_as_arrays_to_a_baseline_are_named(pool):
    """A NumPy array was compared with its default and failed with "truth value of an array
    is ambiguous", naming nothing."""
    with pytest.raises(ValueError, match="ring_fraction configure BiLAF's boundary stage"):
        select(jax.random.key(0), pool, 40, method="random", ring_fraction=np.array([0.1, 0.2]))
