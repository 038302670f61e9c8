"""`bilaf run`: outputs, resume after interruption, config wiring, one-line errors.

The pipeline runs on tiny injected features (written where `bilaf run` caches its extracted
features), so no backbone or data set is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from bilaf_jax import experiment, run_configs
from bilaf_jax.cli import main
from bilaf_jax.experiment import METHODS, Interrupted, RunConfig
from bilaf_jax.io import InputError


def _blobs(n, num_classes, d, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(num_classes, d))
    y = np.arange(n) % num_classes
    x = centres[y] + rng.normal(size=(n, d))
    return np.abs(x).astype(np.float32), y.astype(np.int32)  # non-negative, like pooled ReLU6


def _inject_features(workdir, n=240, m=90, d=24, config=None, seed=0):
    """Feature files as `config`'s extraction would label them (default: tiny_config())."""
    config = tiny_config() if config is None else config
    folder = workdir / "features"
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows, blobs_seed in (("pool", n, seed), ("test", m, seed + 1)):
        x, y = _blobs(rows, 4, d, blobs_seed)
        meta = {**experiment.expected_feature_meta(config, name), "dim": d}
        np.savez(folder / f"{name}.npz", features=x, labels=y, indices=np.arange(rows),
                 meta=np.asarray(json.dumps(meta)))


def _edit_feature_meta(path, **changes) -> dict:
    """Rewrite a feature file's extraction metadata with `changes`; returns the metadata before."""
    with np.load(path) as z:
        arrays = dict(z)
    meta = json.loads(str(arrays["meta"]))
    np.savez(path, **{**arrays, "meta": np.asarray(json.dumps({**meta, **changes}))})
    return meta


def tiny_config(**changes) -> RunConfig:
    base = RunConfig(name="tiny", pool_size=240, test_size=90, budget_fractions=(0.05, 0.1),
                     seeds=(0, 1), num_cores=4, activeft_steps=20, selection_dim=8,
                     methods=METHODS, evals=("linear", "knn"), notes="tiny test config")
    return base._replace(**changes)


def _strip_timing(records):
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in records]


def test_outputs_and_records(tmp_path):
    wd = tmp_path / "run"
    _inject_features(wd)
    config = tiny_config()
    out = experiment.run_experiment(config, wd, progress=False)
    for name in ("results.json", "results.md", "accuracy_vs_budget.png", "pca_map.png", "run.json"):
        assert (wd / name).is_file(), name
    for name in ("accuracy_vs_budget.png", "pca_map.png"):
        assert (wd / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((wd / "results.json").read_text())
    assert res == json.loads(json.dumps(out.results))
    assert res["budgets"] == [12, 24]
    recs = res["records"]
    assert len(recs) == len(METHODS) * 2 * 2 * 2
    keys = {(r["method"], r["budget"], r["seed"], r["eval"]) for r in recs}
    assert len(keys) == len(recs)
    for r in recs:
        assert {"method", "budget", "seed", "eval", "accuracy", "selection_seconds"} <= set(r)
        if r.get("error") is None:
            assert 0.0 <= r["accuracy"] <= 1.0 and r["selection_seconds"] > 0
    assert res["environment"]["jax"] == jax.__version__
    assert res["environment"]["cpu"] == experiment.cpu_description()
    # The feature hashes are those of the arrays the run used.
    feats = experiment.load_or_extract_features(config, wd, progress=False)
    assert res["features_sha256"] == experiment.features_sha256(feats)
    other = feats._replace(pool=feats.pool.copy())
    other.pool[0, 0] = np.nextafter(other.pool[0, 0], np.float32(np.inf))
    assert experiment.features_sha256(other)["pool"] != res["features_sha256"]["pool"]
    assert experiment.features_sha256(other)["test"] == res["features_sha256"]["test"]
    assert res["config"]["name"] == "tiny" and res["selection_dim"] == 8
    # selections: right sizes, in range; bilaf blocks start with their cores
    for m in METHODS:
        sel = json.loads((wd / "selections" / m / "b24_s1.json").read_text())
        assert len(sel["indices"]) == 24 and all(0 <= i < 240 for i in sel["indices"])
        if m.startswith("bilaf"):
            assert set(sel["core_indices"]) <= set(sel["indices"])
            assert len(sel["core_indices"]) == 4
        elif m != "bilaf-official":
            assert sel["num_unique"] == 24
    md = (wd / "results.md").read_text()
    assert "BiLAF: K = 4 ActiveFT cores (20 steps), fixed across budgets.  \ntiny test config  \n" in md
    assert "| bilaf-paper |" in md and "## Linear probe on frozen features (`linear`)" in md
    assert "## Weighted k-NN on frozen features (k = 20, cosine, as DINO) (`knn`)" in md
    assert "- B = 12:" in md and "bilaf-paper" in md and "vs" not in md.split("## Linear")[0]


def test_resume_after_interruptions_gives_identical_records(tmp_path):
    config = tiny_config(methods=("random", "activeft", "bilaf-paper", "bilaf-official"))
    ref = tmp_path / "ref"
    _inject_features(ref)
    full = experiment.run_experiment(config, ref, progress=False).results

    wd = tmp_path / "resumed"
    _inject_features(wd)
    with pytest.raises(Interrupted):
        experiment.run_experiment(config, wd, progress=False, stop_after=5)
    before = {p: p.read_bytes() for p in wd.rglob("*.json") if p.name != "run.json"}
    assert len(before) == 5 and not (wd / "results.json").exists()
    stops = 0
    while True:
        try:
            out = experiment.run_experiment(config, wd, progress=False, stop_after=7)
            break
        except Interrupted:
            stops += 1
    assert stops > 2
    for p, data in before.items():  # finished pieces are reused, not redone
        assert p.read_bytes() == data
    assert _strip_timing(out.results["records"]) == _strip_timing(full["records"])
    # a further call recomputes nothing and reproduces the same records exactly
    again = experiment.run_experiment(config, wd, progress=False, stop_after=1).results
    assert again["records"] == out.results["records"]


def test_bilaf_from_cached_cores_equals_select():
    from bilaf_jax.pipeline import select

    x, _ = _blobs(240, 4, 8, 5)  # the tiny runs' shapes: compiled programs are shared
    for mode in ("paper", "official"):
        ref = select(jax.random.key(3), x, 24, method="bilaf", num_cores=4, mode=mode,
                     core_options={"num_steps": 20})
        cores = select(jax.random.key(3), x, 4, method="activeft",
                       core_options={"num_steps": 20}).indices
        got = experiment.boundary_from_cores(3, x, np.asarray(cores), 24, mode=mode)
        np.testing.assert_array_equal(np.sort(np.asarray(cores)), np.asarray(ref.core_indices))
        np.testing.assert_array_equal(np.asarray(got.indices), np.asarray(ref.indices))


def test_projection_keeps_geometry():
    x, _ = _blobs(100, 3, 20, 0)
    z, kept = experiment.project(x, 20)
    assert kept == 1.0
    z, kept = experiment.project(x, 6)
    s = np.linalg.svd(x.astype(np.float64), compute_uv=False)  # singular values, descending
    assert z.shape == (100, 6) and kept == pytest.approx(np.sum(s[:6] ** 2) / np.sum(s ** 2), rel=1e-6)
    # the projection is onto the top 6 right singular vectors: it keeps exactly that energy
    assert np.sum(z.astype(np.float64) ** 2) == pytest.approx(np.sum(s[:6] ** 2), rel=1e-5)
    z2, _ = experiment.project(x, 6)
    np.testing.assert_array_equal(z, z2)
    full, _ = experiment.project(np.pad(x, ((0, 0), (0, 5))), 20)
    np.testing.assert_allclose(full @ full.T, x.astype(np.float64) @ x.T, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("name", sorted(run_configs.CONFIGS))
def test_configs_validate_and_dry_run(name, tmp_path, capsys):
    config = run_configs.get(name)
    experiment.validate(config)
    argv = ["run", "--config", name, "--dry-run", "--workdir", str(tmp_path / "w")]
    if config.backbone == "vit_s16":  # DINO weights come from the user: the dry run checks them
        assert main(argv) == 2
        assert "vit_s16 needs a weight file" in capsys.readouterr().err
        assert main(argv + ["--weights", str(tmp_path / "dino.pth")]) == 2
        assert "weight file not found" in capsys.readouterr().err
        (tmp_path / "dino.pth").write_bytes(b"not read by a dry run")
        argv += ["--weights", str(tmp_path / "dino.pth")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"config {name}" in out
    assert not (tmp_path / "w").exists()


def test_dry_run_checks_the_workdir_and_data_folder(tmp_path, capsys):
    wd = tmp_path / "w"
    made_for = tiny_config()
    _inject_features(wd, config=made_for)
    experiment.run_experiment(made_for._replace(methods=("random",), seeds=(0,)), wd, progress=False)
    cfg = _tiny_config_file(tmp_path)
    assert main(["run", "--config", cfg, "--dry-run", "--workdir", str(wd)]) == 0
    capsys.readouterr()
    (tmp_path / "x").mkdir()
    other = _tiny_config_file(tmp_path / "x", num_cores=5)
    assert main(["run", "--config", other, "--dry-run", "--workdir", str(wd)]) == 2
    assert "different config" in capsys.readouterr().err
    assert main(["run", "--quick", "--dry-run", "--data-dir", str(tmp_path / "nope"),
                 "--workdir", str(tmp_path / "q")]) == 2
    assert "data folder not found" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
    # features already extracted: as the run, the dry run needs no data folder but to finetune
    cached = ["run", "--config", cfg, "--dry-run", "--workdir", str(wd), "--data-dir", str(tmp_path / "nope")]
    assert main(cached) == 0
    capsys.readouterr()
    (tmp_path / "f").mkdir()
    finetunes = _tiny_config_file(tmp_path / "f", evals=("linear", "knn", "full"))
    assert main(["run", "--config", finetunes, *cached[3:]]) == 2
    assert "data folder not found" in capsys.readouterr().err
    # a pool larger than the data: the plan printed would not be the run's
    (tmp_path / "big").mkdir()
    big = _tiny_config_file(tmp_path / "big", dataset="mnist_5k", pool_size=10_000)
    assert main(["run", "--config", big, "--dry-run", "--workdir", str(tmp_path / "b")]) == 2
    assert "pool_size 10000 exceeds the 4000 train images of mnist_5k" in capsys.readouterr().err


def test_a_pool_size_beyond_the_data_is_refused_before_extracting(tmp_path):
    """MNIST-5k has 4,000 train images: a pool of 5,000 would run on 4,000 with other budgets
    than the dry run printed."""
    wd = tmp_path / "w"
    config = tiny_config(dataset="mnist_5k", pool_size=5000, methods=("random",))
    with pytest.raises(InputError, match="pool_size 5000 exceeds the 4000 train images of mnist_5k"):
        experiment.run_experiment(config, wd, progress=False)
    assert not (wd / "features").exists()


def test_default_and_full_config_contents(tmp_path):
    d = run_configs.default()
    assert d.pool_size == 10_000 and d.test_size is None and d.dataset == "fashion_mnist"
    assert experiment.budgets_for(d, 10_000) == [100, 200, 500]
    assert len(d.seeds) >= 5 and set(d.methods) == set(METHODS)
    assert d.num_cores <= 100
    q = run_configs.quick()
    assert experiment.budgets_for(q, q.pool_size) == [20, 40, 100]
    m = run_configs.mnist_5k()
    assert m.dataset == "mnist_5k" and m.pool_size is None and m.test_size is None
    assert experiment.budgets_for(m, 4_000) == [80, 200, 400] and m.num_cores == 80 // 5
    f = run_configs.full()
    assert f.pool_size is None and f.image_size == 224 and "full" in f.evals
    assert experiment.budgets_for(f, 60_000) == [600, 1200, 3000]
    cfg = experiment.finetune_config(f, tmp_path / "sel.json", 2, 60_000)
    assert (cfg.mode, cfg.image_size, cfg.pool_size, cfg.seed) == ("full", 224, 60_000, 2)
    assert cfg.backbone == "efficientnet_lite0" and cfg.dataset == "fashion_mnist"
    c10 = run_configs.paper_cifar10()
    assert c10.backbone == "vit_s16" and c10.num_cores == 50
    assert experiment.budgets_for(c10, 50_000) == [250, 500, 1000]
    cfg = experiment.finetune_config(c10._replace(weights="w.pth"), tmp_path / "s.json", 0, 50_000)
    assert (cfg.backbone, cfg.backbone_weights, cfg.learning_rate) == ("vit_s16", "w.pth", 3e-3)


def test_finetune_settings_the_run_sets_itself_are_refused(tmp_path, capsys):
    """They were overwritten without a word: a finetune backbone of vit_s16 trained Lite0."""
    cfg = _tiny_config_file(tmp_path, evals=("full",),
                            finetune={"steps": 5, "backbone": "vit_s16", "seed": 7})
    err = _one_line_exit_2(capsys, ["run", "--config", cfg, "--dry-run", "--workdir",
                                    str(tmp_path / "w")])
    assert ("finetune sets backbone, seed, which the run sets itself (backbone: set "
            "finetune_backbone; seed: each selection's seed)") in err


def test_config_file(tmp_path):
    p = tmp_path / "mine.py"
    p.write_text("def get_config():\n    return {'seeds': (0, 1, 2), 'num_cores': 10}\n")
    c = run_configs.get(str(p))
    assert c.name == "mine" and c.seeds == (0, 1, 2) and c.num_cores == 10
    # the default's notes explain the default's K, not this config's
    assert run_configs.default().notes and c.notes == ""
    p.write_text("def get_config():\n    return {'bogus': 1}\n")
    with pytest.raises(ValueError, match="bogus"):
        run_configs.get(str(p))


def _replace_selection(wd, change):
    """Rewrite the cached random B = 12, seed 0 selection's indices as `change(indices)` does
    (a selection made again differently, as another version or machine may)."""
    sel = wd / "selections" / "random" / "b12_s0.json"
    rec = json.loads(sel.read_text())
    rec["indices"] = change(rec["indices"])
    sel.write_text(json.dumps(rec))


def _one_line_exit_2(capsys, argv):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys):
    err = _one_line_exit_2(capsys, ["run", "--config", "nope", "--workdir", str(tmp_path / "w")])
    assert "unknown run config 'nope'" in err
    err = _one_line_exit_2(capsys, ["run", "--config", str(tmp_path / "missing.py"),
                                    "--workdir", str(tmp_path / "w")])
    assert "not found" in err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = _one_line_exit_2(capsys, ["run", "--quick", "--workdir", str(blocker)])
    assert "not a folder" in err
    err = _one_line_exit_2(capsys, ["run", "--quick", "--workdir", str(blocker / "sub")])
    assert "cannot create workdir" in err
    err = _one_line_exit_2(capsys, ["run", "--quick", "--config", "full", "--workdir", "x"])
    assert "contradict" in err
    with pytest.raises(SystemExit) as e:  # argparse: missing --workdir
        main(["run"])
    assert e.value.code == 2


def test_workdir_of_another_config_is_refused(tmp_path, capsys):
    wd = tmp_path / "run"
    _inject_features(wd)
    experiment._check_workdir(wd, tiny_config())
    with pytest.raises(ValueError, match="different config"):
        experiment.run_experiment(tiny_config(num_cores=3), wd, progress=False)
    # changing only what caches do not depend on is fine
    experiment._check_workdir(wd, tiny_config(seeds=(0, 1, 2), evals=("knn",)))


def test_full_finetune_evaluation_wiring(tmp_path, monkeypatch):
    """The "full" evaluation hands train_and_evaluate a valid config per selection (faked run)."""
    import train.train

    calls = []

    def fake_train_and_evaluate(config, workdir):
        sel = json.loads(open(config.selection).read())
        calls.append((config, str(workdir), sel))
        return {"final_accuracy": 0.25 + 0.001 * len(sel), "step": 2,
                "best_accuracy": 0.5 + 0.001 * len(sel), "best_step": 1}

    monkeypatch.setattr(train.train, "train_and_evaluate", fake_train_and_evaluate)
    wd = tmp_path / "run"
    config = tiny_config(methods=("random", "bilaf-paper"), evals=("knn", "full"), seeds=(0,),
                         finetune={"epochs": 2.0, "batch_size": 8}, image_size=32)
    _inject_features(wd, config=config)
    out = experiment.run_experiment(config, wd, progress=False)
    assert len(calls) == 4 and len({w for _, w, _ in calls}) == 4
    for cfg, _, sel in calls:
        assert (cfg.mode, cfg.pool_size, cfg.test_size, cfg.seed) == ("full", 240, 90, 0)
        assert (cfg.epochs, cfg.batch_size, cfg.image_size) == (2.0, 8, 32)
        assert cfg.backbone == "efficientnet_lite0" and sel == sorted(set(sel))
    full = [r for r in out.results["records"] if r["eval"] == "full"]
    assert {r["budget"] for r in full} == {12, 24}
    assert all(r["accuracy"] == 0.25 + 0.001 * r["num_labelled"] for r in full)
    assert all((r["best_accuracy"], r["best_step"]) == (0.5 + 0.001 * r["num_labelled"], 1)
               for r in full)


def test_verdict_uses_a_paired_t_test():
    def recs(method, accs):
        return [{"method": method, "budget": 10, "seed": s, "eval": "knn", "accuracy": a}
                for s, a in enumerate(accs)]

    base = recs("random", [0.50, 0.52, 0.48, 0.51, 0.49])
    clear = base + recs("bilaf-paper", [0.53, 0.55, 0.50, 0.54, 0.52])
    assert experiment.verdict(clear, "bilaf-paper", "random", 10, "knn").startswith(
        "bilaf-paper beats random (+2.8 points")
    noisy = base + recs("bilaf-paper", [0.60, 0.45, 0.47, 0.52, 0.50])
    text = experiment.verdict(noisy, "bilaf-paper", "random", 10, "knn")
    assert "is ahead of random" in text and "not significant over 5 seeds" in text
    worse = base + recs("bilaf-paper", [0.40, 0.41, 0.39, 0.42, 0.40])
    assert "loses to random" in experiment.verdict(worse, "bilaf-paper", "random", 10, "knn")
    assert "no comparable" in experiment.verdict(base, "bilaf-paper", "random", 10, "knn")


@pytest.mark.parametrize("name,test_split", [("paper_imagenet", "validation"),
                                             ("paper_cifar10", "test"), ("default", "test")])
def test_features_come_from_the_labelled_held_out_split(name, test_split, tmp_path, monkeypatch):
    """ImageNet's results are on its validation split: TFDS' imagenet2012 "test" has no labels."""
    import bilaf_jax.extract as ex

    calls = []

    def record(path, *, dataset, split, **kwargs):
        calls.append((path.name, dataset, split))
        x, y = _blobs(12, 3, 5, len(calls))
        meta = experiment.expected_feature_meta(config, path.stem)
        np.savez(path, features=x, labels=y, indices=np.arange(12),
                 meta=np.asarray(json.dumps({**meta, "dim": 5})))

    monkeypatch.setattr(ex, "extract_to_file", record)
    # (the mock's 12 rows are the whole pool)
    config = run_configs.get(name)._replace(selection_dim=None, weights="random", pool_size=None)
    experiment.load_or_extract_features(config, tmp_path, progress=False, backbone=object())
    dataset = config.dataset
    assert calls == [("pool.npz", dataset, "train"), ("test.npz", dataset, test_split)]


def _tiny_config_file(tmp_path, **changes):
    """A .py run config holding tiny_config(**changes) (its name is the file's stem, 'tiny')."""
    p = tmp_path / "tiny.py"
    settings = {k: v for k, v in tiny_config(**changes)._asdict().items() if k != "name"}
    p.write_text(f"def get_config():\n    return {settings!r}\n")
    return str(p)


def test_a_run_that_made_nothing_does_not_hold_its_workdir(tmp_path, capsys):
    wd = tmp_path / "w"
    cfg = _tiny_config_file(tmp_path)
    err = _one_line_exit_2(capsys, ["run", "--config", cfg, "--workdir", str(wd), "--weights",
                                    str(tmp_path / "typo.pth"), "--compile-cache", "off",
                                    "--no-progress"])
    assert "weight file not found" in err
    fixed = tiny_config(weights="random", methods=("random",), seeds=(0,), evals=("knn",))
    experiment._check_workdir(wd, fixed)  # the corrected command is not refused
    assert json.loads((wd / "run.json").read_text())["identity"]["weights"] == "random"
    assert not (wd / "features").exists()  # the failed run made nothing
    _inject_features(wd, config=fixed)
    experiment.run_experiment(fixed, wd, progress=False)
    # a workdir holding results still refuses another config
    with pytest.raises(ValueError, match="different config"):
        experiment.run_experiment(fixed._replace(num_cores=5), wd, progress=False)
    assert json.loads((wd / "run.json").read_text())["identity"]["weights"] == "random"


@pytest.mark.parametrize("changes,field", [
    ({"seeds": 3}, "seeds"),
    ({"seeds": [0, True]}, "seeds"),
    ({"seeds": [0, 2**64]}, "seeds"),
    ({"budget_fractions": 0.05}, "budget_fractions"),
    ({"budget_fractions": ["0.05"]}, "budget_fractions"),
    ({"remove_fraction": "x"}, "remove_fraction"),
    ({"remove_fraction": float("nan")}, "remove_fraction"),
    ({"finetune": 5, "evals": ("full",)}, "finetune"),
    ({"finetune": {"epochs": "x"}, "evals": ["knn", "full"]}, "finetune"),
    ({"finetune": {"bogus": 1}, "evals": ("full",)}, "finetune"),
    ({"methods": "random"}, "methods"),
    ({"methods": [["random"]]}, "methods"),
    ({"evals": None}, "evals"),
    ({"pool_size": 2.5}, "pool_size"),
    ({"dataset": ["fashion_mnist"]}, "dataset"),
    ({"backbone": None}, "backbone"),
    ({"weights": 3}, "weights"),
    ({"data_dir": 3}, "data_dir"),
    ({"notes": None}, "notes"),
    ({"finetune_backbone": 1}, "finetune_backbone"),
    ({"name": 5}, "name"),
])
def test_config_file_of_wrong_types_is_a_one_line_error(changes, field, tmp_path, capsys):
    p = tmp_path / "bad.py"
    p.write_text(f"def get_config():\n    return {changes!r}\n".replace("nan", "float('nan')"))
    err = _one_line_exit_2(capsys, ["run", "--config", str(p), "--dry-run",
                                    "--workdir", str(tmp_path / "w")])
    assert f"{field} must" in err or f"{field}:" in err, err


def test_config_file_lists_and_numpy_numbers_are_accepted(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.pth").write_bytes(b"weights")  # identified by its sha256, never loaded here
    p = tmp_path / "lists.py"
    p.write_text("import pathlib\nimport numpy as np\n\ndef get_config():\n    return {"
                 "'seeds': [np.int64(0), 1], 'budget_fractions': [0.02, np.float32(0.05)], "
                 "'methods': ['random', 'bilaf-paper'], 'evals': ['knn'], "
                 "'pool_size': np.int64(1000), 'weights': pathlib.Path('w.pth')}\n")
    assert main(["run", "--config", str(p), "--dry-run", "--workdir", str(tmp_path / "w")]) == 0
    assert "seeds [0, 1], methods ['random', 'bilaf-paper']" in capsys.readouterr().out
    got = experiment.validate(run_configs.get(str(p)))
    assert (got.seeds, got.methods, got.evals, got.weights) == (
        (0, 1), ("random", "bilaf-paper"), ("knn",), "w.pth")
    assert type(got.pool_size) is int and all(type(f) is float for f in got.budget_fractions)
    # the identity written to run.json is that of the same config written with tuples
    same = run_configs.default()._replace(name="lists", seeds=(0, 1), budget_fractions=(0.02, 0.05),
                                          methods=("random", "bilaf-paper"), evals=("knn",),
                                          pool_size=1000, weights="w.pth")
    assert experiment.identity(got) == experiment.identity(same)


def test_damaged_cached_features_are_one_line_errors(tmp_path, capsys):
    wd = tmp_path / "w"
    _inject_features(wd)
    cfg = _tiny_config_file(tmp_path)
    argv = ["run", "--config", cfg, "--workdir", str(wd), "--compile-cache", "off", "--no-progress"]
    pool = wd / "features" / "pool.npz"
    good = pool.read_bytes()
    pool.write_bytes(good[:len(good) // 2])  # cut short from outside
    err = _one_line_exit_2(capsys, argv)
    assert f"{pool} is damaged" in err and "delete it" in err
    assert len(pool.read_bytes()) == len(good) // 2  # nothing is deleted for the user
    pool.write_bytes(good)
    sel = wd / "features" / "selection.npz"
    sel.write_bytes(b"")
    err = _one_line_exit_2(capsys, argv)
    assert f"{sel} is damaged" in err
    np.savez(sel, features=np.zeros((5, 8), np.float32), retained_energy=np.asarray(0.9))
    with pytest.raises(ValueError, match="selection.npz is damaged"):
        experiment.run_experiment(tiny_config(), wd, progress=False)
    np.savez(sel, other=np.zeros(3))
    with pytest.raises(ValueError, match="selection.npz is damaged .no array 'features'"):
        experiment.run_experiment(tiny_config(), wd, progress=False)


def test_damaged_cached_records_are_made_again(tmp_path, monkeypatch, capsys):
    import train.train

    seen = []

    def fake_train_and_evaluate(config, workdir):
        sel = json.loads(open(config.selection).read())
        seen.append(sel)
        return {"final_accuracy": 0.25 + 0.001 * len(sel), "step": 2,
                "best_accuracy": 0.5 + 0.001 * len(sel), "best_step": 1}

    monkeypatch.setattr(train.train, "train_and_evaluate", fake_train_and_evaluate)
    wd = tmp_path / "w"
    _inject_features(wd)
    config = tiny_config(methods=("random", "bilaf-paper"), seeds=(0,), evals=("knn", "full"))
    first = experiment.run_experiment(config, wd, progress=False).results["records"]
    capsys.readouterr()
    damaged = {
        wd / "selections" / "bilaf-paper" / "b12_s0.json": b'{"method": "bilaf-pa',
        wd / "selections" / "cores" / "activeft_k4_s0.json": b"{}",
        wd / "selections" / "random" / "b24_s0.json": b'{"method": "random", "budget": 24}',
        wd / "selections" / "random" / "b24_s0.indices.json": b"[1, 2",
        wd / "evals" / "knn" / "random_b12_s0.json": b"[]",
        wd / "evals" / "full" / "random_b24_s0.json": b"\xff\xfe",
    }
    for path, data in damaged.items():
        assert path.is_file(), path
        path.write_bytes(data)
    seen.clear()
    again = experiment.run_experiment(config, wd, progress=False).results["records"]
    assert _strip_timing(again) == _strip_timing(first)
    err = capsys.readouterr().err
    for path in damaged:
        if not path.name.endswith(".indices.json"):  # a copy of the selection, rewritten quietly
            assert f"{path} is damaged; making it again" in err
        json.loads(path.read_text())
    assert len(seen) == 1 and len(seen[0]) == 24  # the remade eval trained on the right selection


def test_feature_files_of_another_config_are_refused(tmp_path):
    """Cached or copied-in features must be what this config would extract: the same data set,
    split, pool size, backbone, image size and weights (a resumed run must not mix them)."""
    wd = tmp_path / "w"
    made_for = tiny_config(image_size=32)
    _inject_features(wd, config=made_for)
    with pytest.raises(ValueError, match=r"pool.npz was made with image_size 32, but this run's "
                                         r"config asks for 48; move .* away"):
        experiment.run_experiment(tiny_config(), wd, progress=False)
    with pytest.raises(ValueError, match="was made with limit 240, but .* asks for 300"):
        experiment.run_experiment(made_for._replace(pool_size=300), wd, progress=False)
    with pytest.raises(ValueError, match="was made with weights_sha256 '[0-9a-f]{64}', but .* "
                                         "asks for 'random.seed=0.'"):
        experiment.run_experiment(made_for._replace(weights="random"), wd, progress=False)
    assert not (wd / "results.json").exists()
    experiment.run_experiment(made_for._replace(methods=("random",), seeds=(0,)), wd, progress=False)


def test_features_of_another_preprocessing_are_refused(tmp_path):
    """Features extracted with another resize or normalisation than the backbone's own (say, by
    an earlier version) are not reused."""
    wd = tmp_path / "w"
    _inject_features(wd)
    _edit_feature_meta(wd / "features" / "pool.npz", resize="bilinear",
                       mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    with pytest.raises(ValueError, match=r"pool.npz was made with resize 'bilinear', but this "
                                         r"run's config asks for 'bicubic'"):
        experiment.run_experiment(tiny_config(), wd, progress=False)


def test_the_default_weights_named_by_path_are_the_same_run(tmp_path):
    from bilaf_jax.backbones import _weights_path

    default = _weights_path("efficientnet_lite0_taps", None)
    copy = tmp_path / "copy.pth"
    copy.write_bytes(default.read_bytes())
    other = tmp_path / "other.pth"
    data = default.read_bytes()
    other.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    base = tiny_config()
    assert experiment.identity(base._replace(weights=str(default))) == experiment.identity(base)
    assert experiment.identity(base._replace(weights=str(copy))) == experiment.identity(base)
    ident = experiment.identity(base._replace(weights=str(other)))
    assert ident["weights"].startswith("sha256:") and ident != experiment.identity(base)


def test_a_workdir_in_use_by_another_run_is_refused(tmp_path):
    """A second run in the same workdir (another process holding its lock) stops at once with a
    one-line error and changes nothing; the lock dies with its process."""
    import subprocess
    import sys
    import textwrap

    wd = tmp_path / "w"
    wd.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from bilaf_jax.io import exclusive_lock
        with exclusive_lock({str(wd / experiment.LOCK_NAME)!r}, "x"):
            print("held", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=f"workdir {wd} is in use by another process"):
            experiment.run_experiment(tiny_config(), wd, progress=False)
        assert sorted(p.name for p in wd.iterdir()) == [experiment.LOCK_NAME]  # no run.json
    finally:
        holder.kill()
        holder.wait()
    _inject_features(wd)  # the lock file left behind is no piece of a run
    experiment.run_experiment(tiny_config(methods=("random",), seeds=(0,)), wd, progress=False)


def test_selections_copied_from_a_run_of_other_settings_are_refused(tmp_path):
    """A selection or core record says what it was made with; one copied in from a workdir of
    another K (or an earlier version, which did not say) is refused, not reused."""
    import shutil

    src, dst = tmp_path / "k4", tmp_path / "k6"
    _inject_features(src)
    config = tiny_config(methods=("bilaf-paper", "activeft"), seeds=(0,), evals=("knn",))
    experiment.run_experiment(config, src, progress=False)
    rec = json.loads((src / "selections" / "bilaf-paper" / "b12_s0.json").read_text())
    assert rec["made_with"]["num_cores"] == 4 and rec["made_with"]["remove_fraction"] == 0.1
    _inject_features(dst)
    shutil.copytree(src / "selections", dst / "selections")
    with pytest.raises(ValueError, match=r"b12_s0.json was made with num_cores 4 \(this run: 6\); "
                                         r"remove it"):
        experiment.run_experiment(config._replace(num_cores=6), dst, progress=False)
    assert not (dst / "run.json").exists()  # refused before the workdir is claimed
    # activeft's records do not depend on K: reused by a K = 6 run
    experiment.run_experiment(config._replace(num_cores=6, methods=("activeft",)), dst,
                              progress=False)
    dst = tmp_path / "again"
    _inject_features(dst)
    shutil.copytree(src / "selections", dst / "selections")
    old = dst / "selections" / "activeft" / "b24_s0.json"
    rec = json.loads(old.read_text())
    del rec["made_with"]
    old.write_text(json.dumps(rec))
    with pytest.raises(ValueError, match="b24_s0.json records no settings"):
        experiment.run_experiment(config._replace(methods=("activeft",)), dst, progress=False)


def test_evaluations_follow_their_selection(tmp_path, capsys):
    """An evaluation record remembers the selection it evaluated; a selection made again
    differently (its record removed, another seed's cores) gets a new evaluation."""
    wd = tmp_path / "w"
    _inject_features(wd)
    config = tiny_config(methods=("random",), seeds=(0,), evals=("knn",))
    first = experiment.run_experiment(config, wd, progress=False).results["records"]
    _replace_selection(wd, lambda picked: list(range(12)))
    capsys.readouterr()
    again = experiment.run_experiment(config, wd, progress=False).results["records"]
    err = capsys.readouterr().err
    assert "note: 1 cached evaluation record was made from another selection" in err
    assert err.rstrip().endswith("made it again: " + str(wd / "evals" / "knn" / "random_b12_s0.json"))
    before = {r["budget"]: r["basis"] for r in first}
    after = {r["budget"]: r["basis"] for r in again}
    assert after[12] != before[12] and after[24] == before[24]  # only the changed one redone


def test_pieces_made_from_other_features_are_made_again(tmp_path, capsys):
    """Features extracted again (moved away, or replaced) differ from those the cached pieces
    were made from: the projection, the selections, BiLAF's cores and the evaluations on
    features are made again, and the run ends as a fresh run on the new features."""
    config = tiny_config(methods=("random", "bilaf-paper"), seeds=(0,))
    fresh = tmp_path / "fresh"
    _inject_features(fresh, seed=5)
    want = experiment.run_experiment(config, fresh, progress=False).results
    wd = tmp_path / "w"
    _inject_features(wd)
    first = experiment.run_experiment(config, wd, progress=False).results
    _inject_features(wd, seed=5)  # pool.npz and test.npz replaced; selection.npz left
    capsys.readouterr()
    again = experiment.run_experiment(config, wd, progress=False).results
    err = capsys.readouterr().err
    assert again["features_sha256"] == want["features_sha256"] != first["features_sha256"]
    assert _strip_timing(again["records"]) == _strip_timing(want["records"])
    assert "selection.npz was made from other pool features (or by an earlier" in err
    # 4 selections and the cores of seed 0; 4 selections x 2 evaluations
    assert "note: 5 cached selection records were made from other features" in err
    assert "note: 8 cached evaluation records were made from another selection, other " in err
    capsys.readouterr()
    assert experiment.run_experiment(config, wd, progress=False).results["records"] == \
        again["records"]  # nothing made again a second time
    assert capsys.readouterr().err == ""


def test_bilaf_selections_follow_their_cores(tmp_path, capsys):
    """A seed's cores are those of every budget and mode: cores made again differently (their
    record damaged, then remade on another machine) make the seed's cached BiLAF selections
    again from them, not kept beside new ones on the new cores."""
    wd = tmp_path / "w"
    _inject_features(wd)
    config = tiny_config(methods=("random", "bilaf-paper", "bilaf-official"), seeds=(0,),
                         evals=("knn",))
    experiment.run_experiment(config, wd, progress=False)
    path = wd / "selections" / "cores" / "activeft_k4_s0.json"
    cores = json.loads(path.read_text())
    cores["indices"] = sorted(set(range(8)) - set(cores["indices"]))[:4]
    path.write_text(json.dumps(cores))
    capsys.readouterr()
    out = experiment.run_experiment(config, wd, progress=False)
    assert "note: 4 cached selection records were made from " in capsys.readouterr().err
    for r in out.results["records"]:
        sel = json.loads((wd / "selections" / r["method"] / f"b{r['budget']}_s0.json").read_text())
        if r["method"] != "random":
            assert sel["core_indices"] == cores["indices"], (r["method"], r["budget"])
    experiment.run_experiment(config, wd, progress=False)
    assert capsys.readouterr().err == ""


def _relabel(path, change):
    """Rewrite a feature file's labels as `change(labels)` does, its features and metadata kept
    (the same images labelled otherwise)."""
    with np.load(path) as z:
        arrays = dict(z)
    np.savez(path, **{**arrays, "labels": change(arrays["labels"])})


def test_evaluations_follow_the_labels(tmp_path, capsys):
    """The feature hashes cover the feature arrays alone; labels decide the classes and the
    accuracies. Pool or test labels that change make the evaluations on features again (not the
    selections, which never see labels), as a fresh run on the relabelled files."""
    config = tiny_config(methods=("random", "bilaf-paper"), seeds=(0,))
    fresh = tmp_path / "fresh"
    _inject_features(fresh)
    wd = tmp_path / "w"
    _inject_features(wd)
    experiment.run_experiment(config, wd, progress=False)
    selections = {p: p.read_bytes() for p in (wd / "selections").rglob("*.json")}
    for part, change in (("pool", lambda y: (y + 1) % 4), ("test", lambda y: y[::-1].copy())):
        for folder in (fresh, wd):
            _relabel(folder / "features" / f"{part}.npz", change)
        want = experiment.run_experiment(config, fresh, progress=False).results
        capsys.readouterr()
        again = experiment.run_experiment(config, wd, progress=False).results
        err = capsys.readouterr().err
        assert _strip_timing(again["records"]) == _strip_timing(want["records"]), part
        assert "note: 8 cached evaluation records were made from " in err
        assert {p: p.read_bytes() for p in selections} == selections  # selections kept
    assert experiment.run_experiment(config, wd, progress=False).results["records"] == \
        again["records"]
    assert capsys.readouterr().err == ""


def test_statistics_edge_cases():
    from scipy import stats

    assert experiment.t_critical(11) == pytest.approx(stats.t.ppf(0.975, 11))
    assert experiment.t_critical(11) > 2.2  # was 2.0 beyond 10 degrees of freedom

    def recs(method, accs):
        return [{"method": method, "budget": 10, "seed": s, "eval": "knn", "accuracy": a}
                for s, a in enumerate(accs)]

    # two seeds, each one test image (of 10,000) ahead: no spread, but +0.0 points shown
    tiny = recs("random", [0.5, 0.6]) + recs("bilaf-paper", [0.5001, 0.6001])
    text = experiment.verdict(tiny, "bilaf-paper", "random", 10, "knn")
    assert text.startswith("bilaf-paper is level with random (+0.0 points")
    behind = recs("random", [0.5001, 0.6001]) + recs("bilaf-paper", [0.5, 0.6])
    assert "is level with random (+0.0 points" in experiment.verdict(behind, "bilaf-paper",
                                                                     "random", 10, "knn")
    # 12 seeds, paired p = 0.06: not significant (the old 2.0 cut-off said "beats")
    d = np.array([2.0, 1.5, 2.5, -1.0, 1.0, 2.0, 1.2, -0.8, 1.8, 0.4, 1.1, -0.2]) / 100
    p = stats.ttest_rel(0.5 + d, np.full(12, 0.5)).pvalue
    rows = recs("random", [0.5] * 12) + recs("bilaf-paper", list(0.5 + d))
    text = experiment.verdict(rows, "bilaf-paper", "random", 10, "knn")
    assert ("beats" in text) == (p < 0.05), (p, text)
    one = experiment.summarize(recs("random", [0.9]))[("random", 10, "knn")]
    assert one[2] == 1 and np.isnan(one[1])
    assert experiment.format_cell(*one, total=5) == "90.0 (n=1)"
    assert experiment.format_cell(0.5, 0.01, 5, total=5) == "50.0 ± 1.0"
    assert experiment.format_cell(np.nan, np.nan, 0) == "failed"


def test_numpy_float32_budget_fractions_are_taken_as_written():
    got = experiment.validate(tiny_config(budget_fractions=(np.float32(0.01), np.float32(0.02),
                                                            np.float32(0.05)), pool_size=10_000))
    assert experiment.budgets_for(got, 10_000) == [100, 200, 500]


def test_only_the_authors_script_failures_are_recorded_as_failed_selections(tmp_path,
                                                                           monkeypatch):
    import bilaf_jax.pipeline
    from bilaf_jax.boundary import ScriptFailure

    wd = tmp_path / "w"
    _inject_features(wd)
    config = tiny_config(methods=("kmeans",), seeds=(0,), evals=("knn",))

    def broken(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(bilaf_jax.pipeline, "select", broken)
    with pytest.raises(ValueError, match="a bug"):
        experiment.run_experiment(config, wd, progress=False)
    assert not (wd / "selections" / "kmeans" / "b12_s0.json").exists()

    def script_fails(*args, **kwargs):
        raise ScriptFailure("official mode: the authors' script divides by zero")

    monkeypatch.setattr(bilaf_jax.pipeline, "select", script_fails)
    out = experiment.run_experiment(config, wd, progress=False)
    assert all("divides by zero" in r["error"] for r in out.results["records"])
    assert "## Failed runs" in out.markdown


def test_repeated_samples_are_labelled_once_and_reported(tmp_path, monkeypatch):
    wd = tmp_path / "w"
    _inject_features(wd)
    config = tiny_config(methods=("random",), seeds=(0,), evals=("knn",))
    experiment.run_experiment(config, wd, progress=False)
    _replace_selection(wd, lambda picked: picked[:10] + picked[:2])  # 12 picks, 10 samples
    out = experiment.run_experiment(config, wd, progress=False)
    knn = [r for r in out.results["records"] if r["budget"] == 12][0]
    assert knn["num_labelled"] == 10
    assert "- random B = 12 seed 0: 10 distinct samples" in out.markdown


def test_a_stale_pca_map_is_removed(tmp_path, capsys):
    wd = tmp_path / "w"
    _inject_features(wd)
    experiment.run_experiment(tiny_config(methods=("random", "bilaf-paper"), seeds=(0,),
                                          evals=("knn",)), wd, progress=False)
    assert (wd / "pca_map.png").is_file()
    out = experiment.run_experiment(tiny_config(methods=("random", "bilaf-paper"), seeds=(0,),
                                                evals=("knn",), name="tiny2"), wd, progress=False)
    assert "pca_map.png" in out.written
    (wd / "selections" / "bilaf-paper").rename(wd / "elsewhere")
    config = tiny_config(methods=("random",), seeds=(0,), evals=("knn",))
    out = experiment.run_experiment(config, wd, progress=False)
    assert "pca_map.png" not in out.written and not (wd / "pca_map.png").exists()


def test_features_of_other_data_are_refused(tmp_path):
    """Where the data set is on this machine, feature files must come from exactly that data
    (its fingerprint), not only from a data set of the same name."""
    from tests.conftest import fashion_mnist_or_skip

    fashion_mnist_or_skip()
    wd = tmp_path / "w"
    _inject_features(wd)
    meta = _edit_feature_meta(wd / "features" / "pool.npz", source="fashion_mnist/train/other")
    assert meta["source"]  # injected as this machine's data
    with pytest.raises(ValueError, match="pool.npz was made with source 'fashion_mnist/train/other'"):
        experiment.run_experiment(tiny_config(), wd, progress=False)


def test_features_of_an_image_folder_whose_classes_changed_are_refused(tmp_path):
    """An image folder's fingerprint covers its images; a class folder added without images
    shifts the labels of the classes after it, and is refused too. A size limit is compared
    by the rows it decides."""
    from bilaf_jax.extract import extract_to_file, read_meta
    from tests.test_train_resume import _image_folder

    folder = _image_folder(tmp_path / "data", {"train": ["a", "c"], "test": ["a", "c"]}, seed=0)
    config = tiny_config(dataset="image_folder", data_dir=str(folder), pool_size=None,
                         test_size=None, backbone="efficientnet_lite0", weights="random",
                         image_size=32)
    wd = tmp_path / "w"
    (wd / "features").mkdir(parents=True)
    for part, split in (("pool", "train"), ("test", "test")):
        extract_to_file(wd / "features" / f"{part}.npz", dataset="image_folder", split=split,
                        backbone="efficientnet_lite0", weights="random", image_size=32,
                        data_dir=str(folder), progress=False)
    for part in ("pool", "test"):  # the run takes them as its own
        experiment._check_feature_meta(config, wd / "features" / f"{part}.npz", part)
    # A size limit at or above the split's images is no limit: the same features.
    n = read_meta(wd / "features" / "pool.npz")["num_images"]
    for pool_size in (n, n + 1):
        experiment._check_feature_meta(config._replace(pool_size=pool_size),
                                       wd / "features" / "pool.npz", "pool")
    with pytest.raises(ValueError, match=rf"pool.npz was made with limit None, but this run's "
                                         rf"config asks for {n - 1}"):
        experiment._check_feature_meta(config._replace(pool_size=n - 1),
                                       wd / "features" / "pool.npz", "pool")
    (folder / "train" / "b").mkdir()  # "c" is now class 2
    with pytest.raises(ValueError, match=r"pool.npz was made with class_names \['a', 'c'\], but "
                                         r"this run's config asks for \['a', 'b', 'c'\]"):
        experiment._check_feature_meta(config, wd / "features" / "pool.npz", "pool")


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("run_*.py")),
                         ids=lambda p: p.stem)
def test_every_run_config_file_passes_a_dry_run(path, tmp_path, capsys):
    """The config files the README names load, validate and plan (the paper's with random
    weights: DINO's file is not on this machine)."""
    extra = ["--weights", "random"] if path.stem.startswith("run_paper_") else []
    assert main(["run", "--config", str(path), "--dry-run", "--workdir", str(tmp_path / "w"),
                 *extra]) == 0, capsys.readouterr().err
    assert "selections" in capsys.readouterr().out and not (tmp_path / "w").exists()


def test_unusable_compile_cache_is_said_when_asked_for(tmp_path, monkeypatch, capsys):
    """A cache is an optimisation: a folder that cannot be one is run without, with a note
    when the user named it (flag or environment), silently for the default."""
    from bilaf_jax.cli.cmd_run import enable_compile_cache

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert enable_compile_cache(str(blocker)) is None
    assert f"note: compilation cache {blocker} unusable" in capsys.readouterr().err
    monkeypatch.setenv("BILAF_COMPILE_CACHE", str(blocker / "sub"))
    assert enable_compile_cache(None) is None
    assert "unusable" in capsys.readouterr().err
    monkeypatch.delenv("BILAF_COMPILE_CACHE")
    monkeypatch.setenv("HOME", str(blocker))  # the default folder cannot be made either
    assert enable_compile_cache(None) is None
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("value,expected", [(None, 0.2), ("1.5", 1.5), ("-3", 0.0), ("abc", 0.2),
                                            ("nan", 0.2), ("inf", 0.2)])
def test_compile_cache_threshold_from_the_environment(monkeypatch, value, expected):
    from bilaf_jax.cli.cmd_run import cache_min_seconds

    if value is None:
        monkeypatch.delenv("BILAF_COMPILE_CACHE_MIN_SECONDS", raising=False)
    else:
        monkeypatch.setenv("BILAF_COMPILE_CACHE_MIN_SECONDS", value)
    assert cache_min_seconds() == expected


def test_version_and_module_entry_point():
    import subprocess
    import sys

    import bilaf_jax

    out = subprocess.run([sys.executable, "-m", "bilaf_jax.cli", "--version"], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == f"bilaf {bilaf_jax.__version__}"
    bad = subprocess.run([sys.executable, "-m", "bilaf_jax.cli", "select"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("bilaf select: error:")


def test_config_file_keys_that_are_not_strings_are_a_one_line_error(tmp_path, capsys):
    p = tmp_path / "keys.py"
    p.write_text("def get_config():\n    return {'seeds': (0,), 5: 1, 'bogus': 2}\n")
    err = _one_line_exit_2(capsys, ["run", "--config", str(p), "--dry-run",
                                    "--workdir", str(tmp_path / "w")])
    assert "unknown run config key(s): 5, bogus" in err


def test_dry_run_refuses_a_workdir_the_run_could_not_make(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for workdir in (blocker / "sub", blocker / "sub" / "deeper"):
        err = _one_line_exit_2(capsys, ["run", "--quick", "--dry-run", "--workdir", str(workdir)])
        assert f"cannot create workdir {workdir}: Not a directory" in err
    assert main(["run", "--quick", "--dry-run", "--workdir", str(tmp_path / "a" / "b")]) == 0
    assert not (tmp_path / "a").exists()


def test_empty_workdir_is_refused(tmp_path, capsys, monkeypatch):
    """`--workdir "$UNSET"` would run in the current folder."""
    monkeypatch.chdir(tmp_path)
    for extra in ([], ["--dry-run"]):
        err = _one_line_exit_2(capsys, ["run", "--quick", "--workdir", "", *extra])
        assert "--workdir is empty" in err
    assert list(tmp_path.iterdir()) == []


def test_an_activeft_batch_beyond_the_pool_is_refused_before_any_work(tmp_path, capsys):
    """ActiveFT refuses it only at its first selection, after the features were extracted."""
    cfg = _tiny_config_file(tmp_path, activeft_batch_size=241)
    err = _one_line_exit_2(capsys, ["run", "--config", cfg, "--dry-run",
                                    "--workdir", str(tmp_path / "w")])
    assert "activeft_batch_size 241 exceeds the pool size 240" in err
    ok = tiny_config(activeft_batch_size=241, methods=("random", "kmeans"))
    assert experiment.validate(ok).activeft_batch_size == 241  # not used by these methods
    assert experiment.validate(tiny_config(activeft_batch_size=240)).activeft_batch_size == 240


def test_the_report_records_the_command_main_was_given(tmp_path, capsys):
    """Called in-process, `main(argv)` runs argv: sys.argv is the host program's (pytest's)."""
    wd = tmp_path / "w"
    config = tiny_config(methods=("random",), seeds=(0,), evals=("knn",))
    _inject_features(wd, config=config)
    cfg = _tiny_config_file(tmp_path, methods=("random",), seeds=(0,), evals=("knn",))
    argv = ["run", "--config", cfg, "--workdir", str(wd), "--compile-cache", "off", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    command = "bilaf " + " ".join(argv)
    assert f"Command: `{command}`" in (wd / "results.md").read_text()
    assert json.loads((wd / "results.json").read_text())["command"] == command


def test_a_run_stopped_in_its_first_extraction_batch_does_not_hold_its_workdir(tmp_path,
                                                                              monkeypatch):
    """Ctrl-C before the first batch is on disk leaves only the extraction's lock file (and its
    settings): nothing was made, so a corrected config takes the workdir over."""
    import bilaf_jax.extract as ex

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ex, "_extract", interrupted)
    wd = tmp_path / "w"
    mistyped = tiny_config(pool_size=None, weights="random", image_size=32)
    with pytest.raises(KeyboardInterrupt):
        experiment.run_experiment(mistyped, wd, progress=False, backbone=object())
    assert (wd / "features" / ".pool.npz.lock").exists()
    fixed = tiny_config(methods=("random",), seeds=(0,), evals=("knn",))
    experiment._check_workdir(wd, fixed)  # not "a different config"
    assert json.loads((wd / "run.json").read_text())["identity"]["image_size"] == 48


@pytest.mark.parametrize("recorded", ["indices", "file"])
def test_full_finetuning_of_a_selection_made_again_differently_is_redone(tmp_path, monkeypatch,
                                                                         capsys, recorded):
    """The finetuning folder of the old selection would be refused by train (another
    selection_indices_sha256, or selection_sha256 where an earlier version recorded the file's
    digest): it is moved aside, kept, and the evaluation made again."""
    import train.train
    from bilaf_jax.io import indices_sha256, sha256_file, write_json_atomic

    trained = []
    earlier_version = [recorded == "file"]  # the first runs' records, as earlier versions wrote them

    def fake_train_and_evaluate(config, workdir):
        if earlier_version[0]:
            ident = {"selection_sha256": sha256_file(config.selection)}
        else:
            ident = {"selection_indices_sha256": indices_sha256(json.loads(open(config.selection).read()))}
        # refuses another selection's run, as train does
        train.train._check_workdir(workdir, ident, config.selection)
        workdir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(workdir / "config.json", {"identity": ident})
        write_json_atomic(workdir / "summary.json", {"final_accuracy": 0.5})
        trained.append(json.loads(open(config.selection).read()))
        return {"final_accuracy": 0.25 + 0.001 * len(trained[-1]), "step": 1}

    monkeypatch.setattr(train.train, "train_and_evaluate", fake_train_and_evaluate)
    wd = tmp_path / "w"
    _inject_features(wd)
    config = tiny_config(methods=("random",), seeds=(0,), evals=("full",))
    experiment.run_experiment(config, wd, progress=False)
    _replace_selection(wd, lambda picked: list(range(12)))
    trained.clear()
    earlier_version[0] = False
    capsys.readouterr()
    out = experiment.run_experiment(config, wd, progress=False)
    assert trained == [list(range(12))]  # only the changed selection is finetuned again
    folder = wd / "finetune" / "random_b12_s0"
    err = capsys.readouterr().err
    aside = [p for p in folder.parent.iterdir() if p.name.startswith("random_b12_s0.selection-")]
    assert len(aside) == 1 and (aside[0] / "summary.json").exists()
    assert f"{folder} finetuned another selection; moved it to {aside[0].name}" in err
    assert folder.is_dir()
    assert [r["num_labelled"] for r in out.results["records"]] == [12, 24]


def test_full_finetuning_is_kept_where_only_the_data_folder_moved(tmp_path, monkeypatch, capsys):
    """data_dir is where the images are, not what they are (train resumes a copy; the features
    check the data's fingerprint): a resumed run given the data elsewhere keeps its hours of
    finetuning, as its run.json does."""
    import train.train

    trained = []

    def fake_train_and_evaluate(config, workdir):
        trained.append(config.data_dir)
        return {"final_accuracy": 0.5, "step": 1}

    monkeypatch.setattr(train.train, "train_and_evaluate", fake_train_and_evaluate)
    wd = tmp_path / "w"
    _inject_features(wd)
    config = tiny_config(methods=("random",), seeds=(0,), evals=("full",),
                         data_dir=str(tmp_path / "data"))
    first = experiment.run_experiment(config, wd, progress=False).results["records"]
    assert len(trained) == 2
    capsys.readouterr()
    moved = config._replace(data_dir=str(tmp_path / "moved"))
    again = experiment.run_experiment(moved, wd, progress=False).results["records"]
    assert len(trained) == 2 and again == first
    assert "made them again" not in capsys.readouterr().err


def test_full_finetuning_is_kept_where_the_same_weights_are_named_otherwise(tmp_path,
                                                                           monkeypatch, capsys):
    """The default weight file named by its path (or a copy of a weight file named by the
    copy's) is the same run (`identity`): its finetuning evaluations are kept, not trained
    again."""
    import train.train
    from bilaf_jax.backbones import _weights_path

    trained = []

    def fake_train_and_evaluate(config, workdir):
        trained.append(config.backbone_weights)
        return {"final_accuracy": 0.5, "step": 1}

    monkeypatch.setattr(train.train, "train_and_evaluate", fake_train_and_evaluate)
    default = _weights_path("efficientnet_lite0_taps", None)
    for name in ("mine.pth", "copy.pth"):  # identified by their sha256, never loaded here
        (tmp_path / name).write_bytes(b"my weights")
    for i, (given, named) in enumerate(((None, str(default)),
                                        (str(tmp_path / "mine.pth"), str(tmp_path / "copy.pth")))):
        wd = tmp_path / f"w{i}"
        config = tiny_config(methods=("random",), seeds=(0,), evals=("full",), weights=given)
        _inject_features(wd, config=config)
        first = experiment.run_experiment(config, wd, progress=False).results["records"]
        trained.clear()
        capsys.readouterr()
        again = experiment.run_experiment(config._replace(weights=named), wd,
                                          progress=False).results["records"]
        assert trained == [] and again == first, given
        assert "made them again" not in capsys.readouterr().err
