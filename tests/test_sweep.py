"""Hyperparameter sweeps: vmapped grids equal separate runs; quality measures equal naive NumPy.

The pool is 4 well-separated clusters of 40 points, so every core set of one point per
cluster gives the same pseudo-class sizes and the boundary programs compile once.
"""

import json

import jax
import numpy as np
import pytest

from bilaf_jax import sweep as S
from bilaf_jax.activeft import activeft
from bilaf_jax.boundary import bilaf
from bilaf_jax.pipeline import select

BOUNDARY_GRID = {"remove_fraction": [0.1, 0.3], "ring_fraction": [0.1, 0.25],
                 "opponent_penalty": [1.1, 1.5]}
BUDGET = 16
STEPS = 20


@pytest.fixture(scope="module")
def pool():
    rng = np.random.default_rng(0)
    centres = 10.0 * np.eye(4, 16)
    labels = np.repeat(np.arange(4), 40)
    x = centres[labels] + rng.normal(size=(160, 16))
    # The sample nearest each cluster mean is that cluster's core.
    cores = np.array([40 * c + np.argmin(np.linalg.norm(x[labels == c] - x[labels == c].mean(0), axis=1))
                      for c in range(4)])
    return x.astype(np.float32), labels, cores


def _naive_mean_nearest(x, idx):
    x = x.astype(np.float64)
    d = np.sqrt(((x[:, None, :] - x[None, idx, :]) ** 2).sum(-1))
    return d.min(axis=1).mean()


def _naive_entropy(counts):
    p = np.asarray(counts, float) / np.sum(counts)
    h = -sum(v * np.log(v) for v in p if v > 0)
    return h / np.log(len(counts))


# ------------------------------------------------------------------------------- stage sweeps


@pytest.mark.parametrize("per_batch", [None, 2])
def test_activeft_sweep_equals_separate_runs(digits, per_batch):
    x = digits[0][:300]
    key = jax.random.key(3)
    grid = {"temperature": [0.05, 0.1], "learning_rate": [1e-3, 1e-2], "balance": [1.0, 0.5]}
    out = S.sweep_activeft(key, x, 8, grid, num_steps=STEPS, settings_per_batch=per_batch)
    assert out.indices.shape == (8, 8) and out.losses.shape == (8, STEPS)
    # Cartesian product, first parameter slowest.
    np.testing.assert_allclose(out.params["temperature"], [0.05] * 4 + [0.1] * 4)
    np.testing.assert_allclose(out.params["balance"], [1.0, 0.5] * 4)
    for i in (0, 3, 5, 6):
        one = activeft(key, x, 8, num_steps=STEPS, temperature=out.params["temperature"][i],
                       learning_rate=out.params["learning_rate"][i],
                       balance=out.params["balance"][i])
        np.testing.assert_array_equal(out.indices[i], one.indices)
        np.testing.assert_allclose(out.losses[i], one.losses, rtol=1e-5)


def test_boundary_sweep_equals_separate_runs(pool):
    x, _, cores = pool
    key = jax.random.key(0)
    out = S.sweep_boundary(key, x, cores, BUDGET, BOUNDARY_GRID)
    seq = S.sweep_boundary(key, x, cores, BUDGET, BOUNDARY_GRID, settings_per_batch=1)
    assert out.indices.shape == (8, BUDGET) and out.kept.shape == (8, 160)
    distinct = set()
    for i in range(8):
        p = {k: float(v[i]) for k, v in out.params.items()}
        one = bilaf(key, x, cores, BUDGET, **p)
        np.testing.assert_array_equal(out.indices[i], one.indices)
        np.testing.assert_array_equal(seq.indices[i], one.indices)
        np.testing.assert_array_equal(out.kept[i], one.kept)
        np.testing.assert_array_equal(out.allocation[i], one.allocation)
        np.testing.assert_array_equal(out.pseudo_labels, one.pseudo_labels)
        distinct.add(tuple(np.asarray(one.indices)))
    assert len(distinct) > 1  # the grid does change the selection


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_boundary_sweep_with_more_cores_than_tracked_opponents(mode):
    """K = 20 > NUM_OPPONENTS + 1: paper mode's Eq. 7 scans every core (always, with a penalty
    below 1). That scan, inside the vmapped sweep, once returned other rows' distances (13 of
    40 picks differed from separate runs); official mode vmaps over the penalty too."""
    from tests.reference_boundary import official_reference, paper_reference

    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 6))
    cores = np.sort(rng.choice(150, 20, replace=False))
    if mode == "official":
        jax.config.update("jax_enable_x64", True)  # official mode is exact in float64
    try:
        grid = {"opponent_penalty": [0.8, 0.9, 1.1], "remove_fraction": [0.1, 0.2]}
        if mode == "paper":
            x = x.astype(np.float32)
            out = S.sweep_boundary(jax.random.key(0), x, cores, 40, grid)
            indices, params = out.indices, out.params
        else:  # sweep_boundary is paper mode; official mode vmapped by hand, over the penalty
            pen = np.asarray(grid["opponent_penalty"])  # alone (a concrete allocation)
            indices = np.concatenate([jax.vmap(
                lambda a, r=r: bilaf(jax.random.key(0), x, cores, 40, mode=mode,
                                     opponent_penalty=a, remove_fraction=r).indices)(pen)
                for r in grid["remove_fraction"]])
            params = {"opponent_penalty": np.tile(pen, 2),
                      "remove_fraction": np.repeat(grid["remove_fraction"], 3)}
        for i in range(6):
            p = {k: float(v[i]) for k, v in params.items()}
            ref = (paper_reference if mode == "paper" else official_reference)(x, cores, 40, **p)
            np.testing.assert_array_equal(indices[i], ref[0])
    finally:
        jax.config.update("jax_enable_x64", False)


def test_sweep_rows_match_select_and_naive_measures(pool):
    x, labels, _ = pool
    key = jax.random.key(3)  # its ActiveFT cores fall one per cluster (no new class sizes)
    grid = {"temperature": [0.07, 0.2], **BOUNDARY_GRID}
    out = S.sweep(key, x, BUDGET, grid, num_cores=4, labels=labels, num_steps=STEPS)
    records = S.to_records(out)
    assert len(records) == 16 and out.indices.shape == (16, BUDGET)
    assert list(out.core_setting) == [0] * 8 + [1] * 8
    for i in (0, 13):
        r = records[i]
        ref = select(key, x, BUDGET, num_cores=4,
                     core_options=dict(num_steps=STEPS, temperature=r["temperature"]),
                     remove_fraction=r["remove_fraction"], ring_fraction=r["ring_fraction"],
                     opponent_penalty=r["opponent_penalty"])
        idx = np.asarray(ref.indices)
        np.testing.assert_array_equal(out.indices[i], idx)
        np.testing.assert_array_equal(out.core_indices[r["core_setting"]], ref.core_indices)
        np.testing.assert_allclose(r["mean_distance"], _naive_mean_nearest(x, idx), rtol=1e-4)
        np.testing.assert_allclose(r["core_mean_distance"],
                                   _naive_mean_nearest(x, np.asarray(ref.core_indices)), rtol=1e-4)
        np.testing.assert_allclose(r["activeft_final_loss"], ref.core.losses[-1], rtol=1e-6)
        # Pseudo-labels by brute force: nearest core, cores in their own class.
        cores = np.asarray(ref.core_indices)
        d = ((x[:, None, :].astype(np.float64) - x[None, cores]) ** 2).sum(-1)
        pseudo = d.argmin(1)
        pseudo[cores] = np.arange(4)
        kept = np.asarray(ref.boundary.kept)
        np.testing.assert_allclose(r["selected_balance"],
                                   _naive_entropy(np.bincount(pseudo[idx], minlength=4)), rtol=1e-12)
        np.testing.assert_allclose(r["pool_balance"],
                                   _naive_entropy(np.bincount(pseudo[kept], minlength=4)), rtol=1e-12)
        assert r["label_count"] == len(set(labels[idx].tolist()))
        np.testing.assert_allclose(r["label_balance"],
                                   _naive_entropy(np.bincount(labels[idx], minlength=4)), rtol=1e-12)


# ------------------------------------------------------------------------------- measures


def test_mean_nearest_distance_equals_naive(digits):
    x = digits[0][:500]
    rng = np.random.default_rng(0)
    idx = np.stack([rng.choice(500, 37, replace=False) for _ in range(3)])
    got = S.mean_nearest_distances(x, idx, chunk_size=64)  # several chunks, last one padded
    want = [_naive_mean_nearest(x, i) for i in idx]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(S.mean_nearest_distance(x, idx[0], chunk_size=64), want[0], rtol=1e-6)


def test_mean_nearest_distance_checks_num_rows_and_indices():
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    for bad, match in ((dict(num_rows=0), "num_rows"), (dict(num_rows=99), "num_rows"),
                       (dict(num_rows=3), r"indices must lie in \[0, 3\)")):
        with pytest.raises(ValueError, match=match):
            S.mean_nearest_distance(x, np.array([0, 5]), **bad)
        with pytest.raises(ValueError, match=match):
            S.mean_nearest_distances(x, np.array([[0, 5]]), **bad)


def test_selected_rows_are_at_zero_from_themselves():
    # Large offsets make the Gram expansion's cancellation noise visible; the measure re-measures
    # the nearest pair from differences, so selecting every row gives exactly 0.
    x = (np.random.default_rng(1).normal(size=(300, 16)) + 100.0).astype(np.float32)
    assert float(S.mean_nearest_distance(x, np.arange(300), chunk_size=64)) == 0.0


def test_entropy_and_label_coverage():
    assert S.normalized_entropy([3, 3, 3]) == pytest.approx(1.0)
    assert S.normalized_entropy([0, 7, 0]) == 0.0
    assert S.normalized_entropy([5]) == 1.0
    np.testing.assert_allclose(S.normalized_entropy([1, 2, 3, 0]), _naive_entropy([1, 2, 3, 0]))
    for bad in ([-1, 2], [[1, 2]], [1, np.nan]):  # -1 gave 0.0
        with pytest.raises(ValueError, match="non-negative counts"):
            S.normalized_entropy(bad)
    # Labels need not be 0..C-1; the entropy is over the labels present in the pool.
    labels = np.array([7, 7, 3, 3, 9, 9, 9, 42])
    assert S.label_coverage(labels, [0, 1, 2]) == (2, pytest.approx(_naive_entropy([1, 2, 0, 0])))
    count, bal = S.label_coverage(labels, [0, 2, 4, 7])
    assert count == 4 and bal == pytest.approx(1.0)


# ------------------------------------------------------------------------------- bad grids


@pytest.mark.parametrize("specs, match", [
    (["tau=0.1"], "unknown grid parameter 'tau'"),
    (["num_steps=100,200"], "'num_steps' is not a traceable hyperparameter"),
    (["num_neighbors=5"], "'num_neighbors' is not a traceable"),
    (["temperature="], "empty value"),
    (["temperature=0.1,,0.2"], "empty value"),
    (["temperature"], "name=v1,v2"),
    (["=0.1"], "name=v1,v2"),
    (["temperature=0.1,abc"], "'abc' is not a number"),
    (["temperature=0.1", "temperature=0.2"], "given twice"),
    (["temperature=0"], r"temperature=0 is out of range \(0, inf\)"),
    (["remove_fraction=1.5"], r"out of range \[0, 1\]"),
    (["ring_fraction=0"], r"out of range \(0, 1\]"),
    (["opponent_penalty=nan"], "out of range"),
    (["learning_rate=0.1,0.1"], r"repeats a value \(in float32\): \[0.1, 0.1\]$"),  # not np.float64(0.1)
    (["temperature=0.1,0.1000000001"], r"repeats a value \(in float32\)"),  # one setting twice
    (["opponent_penalty=1e308"], r"must fit float32, got \[1e\+308\]"),
    (["temperature=1e40"], r"temperature 1e\+40 is too large for float32"),  # not "at least 1e-30"
    (["balance=1e-46"], r"balance=0 is out of range \(0, inf\)"),  # 0 in float32
])
def test_bad_grid_specs(specs, match):
    with pytest.raises(ValueError, match=match):
        S.parse_grid(specs)


@pytest.mark.parametrize("grid, match", [
    ({"temperature": []}, "has no values"),
    ({"temperature": "0.1"}, "1-D sequence"),
    ({"batch_size": [10]}, "not a traceable"),
    ({"balance": [[1.0]]}, "1-D sequence"),
])
def test_bad_grids(grid, match):
    with pytest.raises(ValueError, match=match):
        S.check_grid(grid)
    with pytest.raises(ValueError, match=match):
        S.sweep(jax.random.key(0), np.ones((10, 2), np.float32), 4, grid)


# ------------------------------------------------------------------------------- CLI


def _cli():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "sweep.py"
    spec = importlib.util.spec_from_file_location("sweep_cli", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_writes_records(pool, tmp_path, capsys):
    x, labels, _ = pool
    np.savez(tmp_path / "f.npz", features=x, labels=labels)
    out = tmp_path / "r.json"
    code = _cli().main([str(tmp_path / "f.npz"), "--budget", str(BUDGET), "--cores", "4",
                        "--steps", str(STEPS), "--grid", "remove_fraction=0.1,0.3",
                        "--grid", "ring_fraction=0.1,0.25", "--grid", "opponent_penalty=1.1,1.5",
                        "--out", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert len(data["records"]) == 8 and data["config"]["has_labels"]
    from bilaf_jax.io import sha256_file

    assert data["config"]["features"] == str((tmp_path / "f.npz").resolve())
    assert data["config"]["features_sha256"] == sha256_file(tmp_path / "f.npz")
    assert {"mean_distance", "selected_balance", "pool_balance", "label_count",
            "label_balance"} <= set(data["records"][0])
    table = capsys.readouterr().out
    assert table.startswith("| temperature |") and table.count("\n| 0.07 |") == 8
    # No ActiveFT step: no final loss, written as null (NaN is not JSON)
    code = _cli().main([str(tmp_path / "f.npz"), "--budget", str(BUDGET), "--cores", "4",
                        "--steps", "0", "--out", str(out)])
    assert code == 0 and "NaN" not in out.read_text()
    assert json.loads(out.read_text())["records"][0]["activeft_final_loss"] is None
    # A percentage of the pool, as `bilaf select` takes it.
    code = _cli().main([str(tmp_path / "f.npz"), "--budget", f"{100 * BUDGET // len(x)}%",
                        "--cores", "4", "--steps", "0", "--out", str(out)])
    assert code == 0 and json.loads(out.read_text())["config"]["budget"] == BUDGET


@pytest.mark.parametrize("extra, match", [
    (["--grid", "bogus=1"], "unknown grid parameter"),
    (["--grid", "num_steps=1,2"], "not a traceable"),
    (["--grid", "temperature="], "empty value"),
    (["--budget", "0"], "--budget must be in"),
    (["--cores", "99"], "--cores must be in"),
    (["--settings-per-batch", "0"], "--settings-per-batch"),
    (["--sequential", "--settings-per-batch", "2"], "not allowed with"),
    (["--budget", "x"], "--budget must be an integer or a percentage"),
    (["--budget", "150%"], "--budget"),
])
def test_cli_bad_input_exits_2_with_one_line(pool, tmp_path, capsys, extra, match):
    x, _, _ = pool
    np.save(tmp_path / "f.npy", x)
    args = [str(tmp_path / "f.npy"), "--budget", "16", "--out", str(tmp_path / "r.json"), *extra]
    try:
        code = _cli().main(args)
    except SystemExit as e:  # argparse errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("sweep.py: error:"), err
    assert match in err
    assert not (tmp_path / "r.json").exists()


def test_cli_missing_file_and_bad_output_folder(tmp_path, capsys):
    cli = _cli()
    assert cli.main([str(tmp_path / "none.npz"), "--budget", "4", "--out", str(tmp_path / "r.json")]) == 2
    assert "not found" in capsys.readouterr().err
    np.save(tmp_path / "f.npy", np.ones((10, 2), np.float32))
    assert cli.main([str(tmp_path / "f.npy"), "--budget", "4", "--out",
                     str(tmp_path / "no" / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "output folder does not exist" in err
    # The output is checked before the sweep: not a folder, never the features file itself.
    for out, needle in ((tmp_path, "is a folder"), (tmp_path / "f.npy", "is an input file")):
        assert cli.main([str(tmp_path / "f.npy"), "--budget", "4", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err
    np.testing.assert_array_equal(np.load(tmp_path / "f.npy"), np.ones((10, 2), np.float32))
    for bad, needle in ((["--seed", str(2**32)], "seed must lie in"),
                        (["--num-neighbors", "0"], "num_neighbors"),
                        (["--grid", "temperature=1e-39"], "not representable in float32")):
        try:
            code = cli.main([str(tmp_path / "f.npy"), "--budget", "4", "--out",
                             str(tmp_path / "r.json"), *bad])
        except SystemExit as e:  # argparse's own errors
            code = e.code
        assert code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
    np.savez(tmp_path / "l.npz", features=np.ones((10, 2), np.float32), labels=np.zeros(9))
    assert cli.main([str(tmp_path / "l.npz"), "--budget", "4", "--out",
                     str(tmp_path / "r.json")]) == 2
    assert "labels must have shape (10,)" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_mean_nearest_distance_with_a_large_common_offset():
    rng = np.random.default_rng(5)
    x = (1000.0 + rng.normal(size=(300, 16))).astype(np.float32)
    idx = rng.choice(300, 20, replace=False)
    d = np.sqrt(((x[:, None, :].astype(np.float64) - x[idx][None]) ** 2).sum(-1)).min(1)
    got = float(S.mean_nearest_distance(x, idx))
    np.testing.assert_allclose(got, d.mean(), rtol=1e-5)


def test_sweep_checks_boundary_settings_before_activeft(monkeypatch):
    def activeft_sweep(*args, **kwargs):
        raise AssertionError("the ActiveFT sweep ran before the boundary settings were checked")

    monkeypatch.setattr(S, "sweep_activeft", activeft_sweep)
    x = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="num_neighbors"):
        S.sweep(jax.random.key(0), x, 10, {"temperature": [0.07]}, num_neighbors=0)


def test_settings_per_batch_key_and_normalize_are_checked(monkeypatch):
    """settings_per_batch=0 or -2 ran silently one setting at a time and 1.5 failed inside
    range(); normalize="false" normalised; a seed for the key failed inside JAX. All before
    the ActiveFT sweep."""
    def activeft_sweep(*args, **kwargs):
        raise AssertionError("the ActiveFT sweep ran before the settings were checked")

    monkeypatch.setattr(S, "sweep_activeft", activeft_sweep)
    x = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
    key = jax.random.key(0)
    for bad, match in ((0, r"settings_per_batch must be in \[1,"), (-2, "settings_per_batch must be in"),
                       (1.5, "settings_per_batch must be an integer"),
                       (True, "settings_per_batch must be an integer")):
        with pytest.raises(ValueError, match=match):
            S.sweep(key, x, 10, {"temperature": [0.07]}, settings_per_batch=bad)
        with pytest.raises(ValueError, match=match):
            S.sweep_boundary(key, x, [0, 5], 10, settings_per_batch=bad)
    with pytest.raises(ValueError, match="normalize must be True or False, got 'false'"):
        S.sweep(key, x, 10, normalize="false")
    with pytest.raises(ValueError, match="normalize must be True or False"):
        S.sweep_boundary(key, x, [0, 5], 10, normalize="false")
    with pytest.raises(ValueError, match="key must be a PRNG key"):
        S.sweep(0, x, 10)


def test_mean_nearest_distance_checks_shapes_and_dtypes():
    """These were errors from inside JAX (an empty gather, a float indexer, a broadcast)."""
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    for idx, match in (([], "indices is empty"), ([1.0, 2.0], "integer row numbers, got dtype float64"),
                       ([[0, 1]], "indices must be 1-D"), ([True, False], "got dtype bool")):
        with pytest.raises(ValueError, match=match):
            S.mean_nearest_distance(x, idx)
    with pytest.raises(ValueError, match="indices must be 2-D"):
        S.mean_nearest_distances(x, [0, 1])
    with pytest.raises(ValueError, match=r"features must be 2-D \[n, d\]"):
        S.mean_nearest_distance(x[0], [0])


def test_mean_nearest_distance_converts_features_as_the_selectors_do():
    """int8 differences wrapped around (NaN), uint8 ones too (a wrong mean), float16 squares
    overflowed (inf); bool was a TypeError from inside JAX and NaN passed through."""
    rng = np.random.default_rng(2)
    idx = np.array([0, 7, 11])
    for x in (rng.integers(-100, 100, size=(40, 3)).astype(np.int8),
              rng.integers(0, 250, size=(40, 3)).astype(np.uint8),
              (300 * rng.normal(size=(40, 3))).astype(np.float16)):
        want = _naive_mean_nearest(x, idx)
        np.testing.assert_allclose(float(S.mean_nearest_distance(x, idx)), want, rtol=1e-5)
        np.testing.assert_allclose(S.mean_nearest_distances(x, idx[None]), [want], rtol=1e-5)
    with pytest.raises(ValueError, match="must hold real numbers, got dtype bool"):
        S.mean_nearest_distance(np.ones((4, 2), bool), [0])
    with pytest.raises(ValueError, match="NaN"):
        S.mean_nearest_distance(np.full((4, 2), np.nan, np.float32), [0])


def test_cli_never_replaces_a_bilaf_run_results_file(tmp_path, capsys):
    """A `bilaf run` results.json holds "config" and "records" too; --out onto it replaced it."""
    np.save(tmp_path / "f.npy", np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32))
    results = tmp_path / "results.json"
    text = json.dumps({"config": {"name": "default"}, "records": [{"method": "random"}]})
    results.write_text(text)
    assert _cli().main([str(tmp_path / "f.npy"), "--budget", "6", "--steps", "0",
                        "--out", str(results)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a sweep.py result" in err
    assert results.read_text() == text


def test_labels_of_objects_are_refused_by_name():
    from bilaf_jax.sweep import sweep

    x = np.random.default_rng(0).normal(size=(12, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="labels must be class ids"):
        sweep(jax.random.key(0), x, 4, {"temperature": [0.07]}, num_cores=2, num_steps=1,
              labels=[None] * 12)


# ------------------------------------------------------------------------------- audit fixes


@pytest.mark.parametrize("name", ["balance", "learning_rate"])
def test_grid_refuses_subnormal_values_that_activeft_refuses(name):
    """1e-40 is a float32 subnormal: activeft refuses it, the grid took it and the sweep ran it
    (balance: log flushed to -inf, every loss exactly 0)."""
    x = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=f"{name} 1e-40 is too small for float32"):
        activeft(jax.random.key(0), x, 3, num_steps=2, **{name: 1e-40})
    with pytest.raises(ValueError, match=f"grid value {name} 1e-40 is too small for float32"):
        S.parse_grid([f"{name}=1e-3,1e-40"])
    with pytest.raises(ValueError, match="too small for float32"):
        S.sweep_activeft(jax.random.key(0), x, 3, {name: [1e-40]}, num_steps=2)
    assert S.check_grid({name: [0.0 if name == "learning_rate" else 1.0, 2e-38]})  # normal: kept


def test_activeft_sweep_of_float64_features_warns_nothing(recwarn):
    """float64 NumPy features without x64 asked JAX for float64 settings: one UserWarning per
    hyperparameter ("Explicitly requested dtype float64 ... truncated")."""
    x = np.random.default_rng(0).normal(size=(60, 4))
    out = S.sweep_activeft(jax.random.key(0), x, 3, {"temperature": [0.05, 0.1]}, num_steps=3)
    assert not [w for w in recwarn if "float64" in str(w.message)]
    want = S.sweep_activeft(jax.random.key(0), x.astype(np.float32), 3, {"temperature": [0.05, 0.1]},
                            num_steps=3)
    np.testing.assert_array_equal(out.indices, want.indices)


def test_activeft_sweep_under_a_users_vmap_and_jit():
    x = np.random.default_rng(0).normal(size=(80, 5)).astype(np.float32)
    grid = {"temperature": [0.05, 0.1]}
    keys = jax.random.split(jax.random.key(0), 2)
    got = jax.vmap(lambda k: S.sweep_activeft(k, x, 4, grid, num_steps=4).indices)(keys)
    for i in range(2):
        np.testing.assert_array_equal(got[i], S.sweep_activeft(keys[i], x, 4, grid, num_steps=4).indices)
    jitted = jax.jit(lambda f: S.sweep_activeft(keys[0], f, 4, grid, num_steps=4).indices)(x)
    np.testing.assert_array_equal(jitted, got[0])


def test_whole_sweep_under_jit_or_vmap_is_refused_by_name(monkeypatch):
    """The boundary stage needs concrete cores: under a user's jit the sweep ran the whole
    ActiveFT sweep, then failed in JAX with a ConcretizationTypeError naming no argument."""
    def activeft_sweep(*args, **kwargs):
        raise AssertionError("the ActiveFT sweep ran before the traced input was refused")

    monkeypatch.setattr(S, "sweep_activeft", activeft_sweep)
    x = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="sweep needs concrete features and key"):
        jax.jit(lambda f: S.sweep(key, f, 8, num_cores=2, num_steps=2).indices)(x)
    with pytest.raises(ValueError, match="sweep needs concrete features and key"):
        jax.vmap(lambda k: S.sweep(k, x, 8, num_cores=2, num_steps=2).indices)(jax.random.split(key, 2))


def test_fixed_arguments_are_checked_by_name():
    """chunk_size=2.5 or None failed inside JAX or NumPy ("Shapes must be 1D sequences ...",
    "'<=' not supported ..."); batch_size=[5] failed as "unhashable type: 'list'"."""
    x = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    for bad in (2.5, None, "64", 0):
        with pytest.raises(ValueError, match="chunk_size must be"):
            S.mean_nearest_distance(x, [1, 2], chunk_size=bad)
        with pytest.raises(ValueError, match="chunk_size must be"):
            S.mean_nearest_distances(x, [[1, 2]], chunk_size=bad)
    for bad, match in ((dict(batch_size=[5]), "batch_size must be an integer"),
                       (dict(batch_size=41), r"batch_size must be in \[1, 40\]"),
                       (dict(num_steps=-1), "num_steps must be in"),
                       (dict(chunk_size=[8]), "chunk_size must be an integer")):
        with pytest.raises(ValueError, match=match):
            S.sweep_activeft(jax.random.key(0), x, 3, num_steps=bad.pop("num_steps", 2), **bad)


def test_normalized_entropy_of_a_balanced_histogram_is_exactly_one():
    """H(p) / log C rounded to 1.0000000000000002 for 5 equal counts (outside [0, 1]) and
    0.9999999999999998 for 3, so a perfectly balanced selection did not read as 1."""
    for c in range(2, 40):
        assert S.normalized_entropy([7] * c) == 1.0, c
    rng = np.random.default_rng(0)
    for _ in range(200):
        counts = rng.integers(0, 5, size=int(rng.integers(2, 30)))
        assert 0.0 <= S.normalized_entropy(counts) <= 1.0
        if counts.sum():
            np.testing.assert_allclose(S.normalized_entropy(counts), _naive_entropy(counts), rtol=1e-12)
