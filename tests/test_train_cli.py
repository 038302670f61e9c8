"""`bilaf finetune` on cached features: outputs, and one-line errors that leave files alone."""

import importlib
import json

import numpy as np
import pytest

pytest.importorskip("jax")

import bilaf_jax.cli as cli  # noqa: E402


@pytest.fixture
def bilaf(monkeypatch):
    """`bilaf ...` in-process, with whichever subcommands exist in this checkout."""
    present = []
    for name in cli.COMMANDS:
        try:
            importlib.import_module(f"bilaf_jax.cli.cmd_{name}")
            present.append(name)
        except ImportError:
            pass
    monkeypatch.setattr(cli, "COMMANDS", tuple(present))

    def run(argv):  # the exit status, argparse's own errors (SystemExit) included
        try:
            return cli.main(argv)
        except SystemExit as e:
            return e.code
    return run


@pytest.fixture
def feats(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 12))

    def make(n):
        y = rng.integers(0, 3, n)
        return (centres[y] + 0.8 * rng.normal(size=(n, 12))).astype(np.float32), y.astype(np.int32)

    px, py = make(300)
    tx, ty = make(200)
    np.savez(tmp_path / "pool.npz", features=px, labels=py)
    np.savez(tmp_path / "test.npz", features=tx, labels=ty)
    sel = tmp_path / "sel.json"
    sel.write_text(json.dumps([int(i) for i in rng.choice(300, 40, replace=False)]))
    return tmp_path


def _args(d, workdir, mode="linear", sel=None):
    return ["finetune", "--dataset", "fashion_mnist", "--selection", str(sel or d / "sel.json"),
            "--mode", mode, "--features", str(d / "pool.npz"),
            "--test-features", str(d / "test.npz"), "--workdir", str(workdir)]


def _snapshot(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())
            if p.is_file()}


def test_linear_and_knn_write_summary_and_metrics(bilaf, feats, capsys):
    for mode in ("linear", "knn"):
        wd = feats / mode
        assert bilaf(_args(feats, wd, mode)) == 0
        out = capsys.readouterr().out
        assert f"{mode}: final_accuracy" in out
        summary = json.loads((wd / "summary.json").read_text())
        assert summary["mode"] == mode and summary["resumed_from_step"] == 0
        assert summary["num_labelled"] == 40 and summary["num_test"] == 200
        assert 0.7 < summary["final_accuracy"] <= 1.0
        correct = round(summary["final_accuracy"] * 200)
        assert summary["final_accuracy"] == correct / 200  # exact, not a float32 mean
        assert summary["config"]["mode"] == mode
        recs = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in recs] == sorted(r["step"] for r in recs)
        assert recs[-1]["eval_accuracy"] == summary["final_accuracy"]
        assert recs[-1]["step"] == summary["step"] == (100 if mode == "linear" else 0)
        if mode == "linear":
            losses = [r["train_loss"] for r in recs]
            assert losses[-1] <= losses[0]
        assert json.loads((wd / "config.json").read_text())["config"]["mode"] == mode
    # The library call agrees with the command.
    from train import linear_probe

    pool, test = np.load(feats / "pool.npz"), np.load(feats / "test.npz")
    sel = json.loads((feats / "sel.json").read_text())
    acc = linear_probe(pool["features"][sel], pool["labels"][sel], test["features"],
                       test["labels"], num_classes=3)
    assert acc == json.loads((feats / "linear" / "summary.json").read_text())["final_accuracy"]
    # Same command again: same result, no duplicated metrics.
    before = (feats / "linear" / "metrics.jsonl").read_text()
    assert bilaf(_args(feats, feats / "linear", "linear")) == 0
    assert (feats / "linear" / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("content,needle", [
    ('{"a": 1}', "JSON list"),
    ("[1, 2, 2]", "repeats index 2; `bilaf select --unique` writes each sample once"),
    ("[0, 300]", "out of range"),
    ("[-1]", "out of range"),
    ("[1, 2", "not valid JSON"),
    ("[]", "empty"),
])
def test_bad_selection_is_one_line_and_writes_nothing(bilaf, feats, capsys, content, needle):
    wd = feats / "run"
    assert bilaf(_args(feats, wd)) == 0
    before = _snapshot(wd)
    capsys.readouterr()
    bad = feats / "bad.json"
    bad.write_text(content)
    for workdir in (wd, feats / "fresh"):
        assert bilaf(_args(feats, workdir, sel=bad)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err and err.startswith("bilaf finetune: error:")
    assert _snapshot(wd) == before
    assert not (feats / "fresh").exists()


def test_workdir_of_another_config_is_refused(bilaf, feats, capsys):
    wd = feats / "run"
    assert bilaf(_args(feats, wd, "linear")) == 0
    before = _snapshot(wd)
    capsys.readouterr()
    other = feats / "other.json"
    other.write_text(json.dumps(list(range(50))))
    steps = feats / "steps.py"
    steps.write_text("def get_config():\n    return {'linear_steps': 7}\n")
    for args, diff in ((_args(feats, wd, "knn"), "(mode: 'linear' -> 'knn');"),
                       (_args(feats, wd, "linear", sel=other), "(selection_indices_sha256: "),
                       (_args(feats, wd, "linear") + ["--config", str(steps)],
                        "(linear_steps: 100 -> 7)")):
        assert bilaf(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "different config " + diff in err, err
    assert _snapshot(wd) == before


def test_settings_a_mode_does_not_read_may_change(bilaf, feats, capsys):
    """A k-NN or linear run in a workdir is not refused for other full-finetune settings (seed,
    image size; from a config file: the command's flags for them are refused in these modes)
    or the other mode's settings, also where an earlier version recorded them; its own
    settings still decide."""
    def config(name, text):
        path = feats / f"{name}.py"
        path.write_text(f"def get_config():\n    return {text}\n")
        return ["--config", str(path)]

    for mode, other_mode, own in (("knn", "{'linear_steps': 7}", "{'knn_k': 5}"),
                                  ("linear", "{'knn_k': 5}", "{'linear_steps': 7}")):
        wd = feats / mode
        assert bilaf(_args(feats, wd, mode)) == 0
        first = json.loads((wd / "summary.json").read_text())["final_accuracy"]
        identity = json.loads((wd / "config.json").read_text())["identity"]
        assert "seed" not in identity and "image_size" not in identity
        for extra in (config("full", "{'seed': 5, 'image_size': 64}"), config("other", other_mode)):
            assert bilaf(_args(feats, wd, mode) + extra) == 0
            assert json.loads((wd / "summary.json").read_text())["final_accuracy"] == first
        record = json.loads((wd / "config.json").read_text())
        record["identity"].update(seed=0, image_size=48, learning_rate=3e-3)  # as recorded before
        (wd / "config.json").write_text(json.dumps(record))
        assert bilaf(_args(feats, wd, mode) + config("full", "{'seed': 5}")) == 0
        capsys.readouterr()
        assert bilaf(_args(feats, wd, mode) + config("own", own)) == 2
        assert "different config" in capsys.readouterr().err


def test_the_same_list_in_another_layout_is_the_same_run(bilaf, feats, capsys):
    """A run is of the selection's indices in their order, not of the file's bytes: the list
    written again otherwise resumes; the same indices in another order are another run. A
    workdir recorded with the file's digest alone (as earlier versions did) resumes on the
    same file, and is recorded again with the indices' digest."""
    wd = feats / "run"
    assert bilaf(_args(feats, wd)) == 0
    def accuracy():
        return json.loads((wd / "summary.json").read_text())["final_accuracy"]

    first = accuracy()
    picked = json.loads((feats / "sel.json").read_text())
    spaced = feats / "spaced.json"
    spaced.write_text(json.dumps(picked, indent=2) + "\n")
    assert bilaf(_args(feats, wd, sel=spaced)) == 0
    assert accuracy() == first
    reordered = feats / "reordered.json"
    reordered.write_text(json.dumps(picked[::-1]))
    capsys.readouterr()
    assert bilaf(_args(feats, wd, sel=reordered)) == 2
    assert "different config (selection_indices_sha256:" in capsys.readouterr().err

    from bilaf_jax.io import sha256_file

    record = json.loads((wd / "config.json").read_text())
    del record["identity"]["selection_indices_sha256"]
    record["identity"]["selection_sha256"] = sha256_file(feats / "sel.json")
    (wd / "config.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert bilaf(_args(feats, wd, sel=spaced)) == 2  # its bytes are all that run recorded
    assert "different config (selection_sha256:" in capsys.readouterr().err
    assert bilaf(_args(feats, wd)) == 0
    assert accuracy() == first
    # recorded again with the indices' digest: the other layout now resumes too
    assert bilaf(_args(feats, wd, sel=spaced)) == 0


def test_config_file_values_of_numpy_and_pathlib_types(bilaf, feats, capsys):
    """A .py config may compute its values: NumPy scalars and paths run as the plain values they
    stand for (they were a traceback after the workdir was made, or a false range error)."""
    cfg = feats / "np_cfg.py"
    cfg.write_text("import numpy as np\nfrom pathlib import Path\n\ndef get_config():\n"
                   "    return {'mode': 'knn', 'knn_k': np.int64(5), 'knn_temperature': np.float32(0.25),\n"
                   f"            'features': Path({str(feats / 'pool.npz')!r})}}\n")
    args = ["finetune", "--selection", str(feats / "sel.json"), "--config", str(cfg),
            "--test-features", str(feats / "test.npz")]
    assert bilaf(args + ["--workdir", str(feats / "np")]) == 0
    saved = json.loads((feats / "np" / "config.json").read_text())["config"]
    assert (saved["knn_k"], saved["knn_temperature"]) == (5, 0.25)
    assert saved["features"] == str(feats / "pool.npz")
    plain = ["finetune", "--selection", str(feats / "sel.json"), "--mode", "knn",
             "--features", str(feats / "pool.npz"), "--test-features", str(feats / "test.npz")]
    plain_cfg = feats / "plain.py"
    plain_cfg.write_text("def get_config():\n    return {'knn_k': 5, 'knn_temperature': 0.25}\n")
    assert bilaf(plain + ["--config", str(plain_cfg), "--workdir", str(feats / "np")]) == 0  # resumes
    capsys.readouterr()
    bad = feats / "bad_cfg.py"
    bad.write_text("def get_config():\n    return {'mode': 'knn', 'features': [1]}\n")
    assert bilaf(args + ["--config", str(bad), "--workdir", str(feats / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "features must be a string (a path), got [1]" in err
    assert not (feats / "bad").exists()


def test_missing_inputs_are_one_line_errors(bilaf, feats, capsys):
    args = _args(feats, feats / "run")
    i = args.index("--test-features")
    assert bilaf(args[:i] + args[i + 2:]) == 2
    assert "--test-features" in capsys.readouterr().err
    args[i + 1] = str(feats / "nope.npz")
    assert bilaf(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not found" in err
    assert bilaf(_args(feats, feats / "run") + ["--config", "no_such_config"]) == 2
    assert "config not found" in capsys.readouterr().err
    assert not (feats / "run").exists()


@pytest.mark.parametrize("mode", ["linear", "knn"])
def test_labels_outside_the_classes_are_one_line_errors(bilaf, feats, capsys, mode):
    # A test label of -1 (unlabelled) would one-hot to zeros and count silently as wrong.
    with np.load(feats / "test.npz") as f:
        tx, ty = f["features"], f["labels"].copy()
    ty[::2] = -1
    np.savez(feats / "test.npz", features=tx, labels=ty)
    assert bilaf(_args(feats, feats / "run", mode)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "test labels: label -1 outside [0, 3)" in err
    assert not (feats / "run").exists()


def test_train_main_reports_bad_input_on_one_line(feats, capsys):
    from train.main import main as train_main

    args = ["--config", "fashion_mnist", "--workdir", str(feats / "run"), "mode=linear",
            f"selection={feats / 'sel.json'}", f"features={feats / 'pool.npz'}",
            f"test_features={feats / 'test.npz'}"]
    assert train_main(args + ["knn_temperature=0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "knn_temperature must be a number in (0.0, inf)" in err
    for bad, needle in (("ema_decay=abc", "ema_decay must be a number in [0.0, 1.0), got 'abc'"),
                        ("crop_scale_min=[1]", "crop_scale_min must be a number in (0.0, 1.0]")):
        assert train_main(args + [bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
    (feats / "dup.json").write_text("[1, 1]")
    assert train_main(args + [f"selection={feats / 'dup.json'}"]) == 2
    assert "repeats index 1" in capsys.readouterr().err
    assert not (feats / "run").exists()
    assert train_main(args) == 0
    assert json.loads(capsys.readouterr().out)["mode"] == "linear"


def test_train_main_takes_overrides_around_its_options_and_reports_on_one_line(feats, capsys,
                                                                             monkeypatch):
    """`python -m train.main`: KEY=VALUE overrides before and after --workdir (argparse's
    parse_args refused the later ones), and a missing config, a malformed override or Ctrl-C
    as one line (not argparse's usage block, or a traceback)."""
    import train.train
    from train.main import main as train_main

    split = ["--config", "fashion_mnist", "mode=linear", f"selection={feats / 'sel.json'}",
             "--workdir", str(feats / "run"), f"features={feats / 'pool.npz'}",
             f"test_features={feats / 'test.npz'}"]
    assert train_main(split) == 0
    assert json.loads(capsys.readouterr().out)["mode"] == "linear"
    for args, needle in ((["--config", "no_such_config", "--workdir", str(feats / "x")],
                          "config not found: no_such_config"),
                         ([*split[:2], "--workdir", str(feats / "x"), "steps"],
                          "override 'steps' is not KEY=VALUE")):
        assert train_main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("python -m train.main: error: ") and \
            needle in err, err

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train.train, "train_and_evaluate", interrupted)
    assert train_main(split) == 130
    assert capsys.readouterr().err == "python -m train.main: interrupted\n"
    assert not (feats / "x").exists()


def test_empty_paths_are_one_line_errors_and_write_nothing(bilaf, feats, capsys, monkeypatch):
    """An empty --selection / --features / --test-features / --workdir (an unset shell
    variable in quotes) is said as such: Path("") is the current folder, so it read "selection
    file . is not valid JSON", and an empty --workdir wrote the run into the current folder."""
    here = feats / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    for flag, needle in (("--selection", "selection is empty"), ("--features", "features is empty"),
                         ("--test-features", "test_features is empty"),
                         ("--workdir", "--workdir is empty")):
        args = _args(feats, feats / "run")
        args[args.index(flag) + 1] = ""
        assert bilaf(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
    assert list(here.iterdir()) == [] and not (feats / "run").exists()
    from train.train import make_config, train_and_evaluate

    config = make_config(mode="knn", selection=str(feats / "sel.json"),
                         features=str(feats / "pool.npz"), test_features=str(feats / "test.npz"))
    with pytest.raises(ValueError, match="workdir is empty"):
        train_and_evaluate(config, "")
    assert list(here.iterdir()) == []


def test_a_config_built_directly_with_numpy_values_runs(feats):
    """`train_and_evaluate` takes a `Config` built directly, NumPy scalars and paths in it as
    make_config takes them (an np.int64 passed validation, then config.json's json.dump raised
    a TypeError; an np.int64 seed or a Path selection was refused)."""
    from train.train import Config, make_config, summary_without_state, train_and_evaluate

    fields = dict(mode="linear", selection=str(feats / "sel.json"),
                  features=str(feats / "pool.npz"), test_features=str(feats / "test.npz"),
                  linear_steps=20, seed=3)
    ref = summary_without_state(train_and_evaluate(make_config(**fields), feats / "ref"))
    direct = Config(**{**fields, "linear_steps": np.int64(20), "seed": np.int64(3),
                       "selection": feats / "sel.json"})
    got = summary_without_state(train_and_evaluate(direct, feats / "direct"))
    assert got == ref and json.loads((feats / "direct" / "summary.json").read_text()) == ref
    assert json.loads((feats / "direct" / "config.json").read_text())["config"] == ref["config"]


@pytest.mark.parametrize("change,needle", [
    ({}, None),  # a matching pair runs
    ({"weights_sha256": "f" * 64}, "differ in weights_sha256"),
    ({"image_size": 32}, "differ in image_size"),
    ({"dataset": "mnist_5k"}, "differ in dataset"),
    ({"class_names": ["a", "c"]}, "differ in class_names (['a', 'b', 'c'] vs ['a', 'c'])"),
    ({"split": "train"}, "hold the same images (split 'train' and 'train' of one source): the test "
                         "features must come from the held-out split"),
    # an image folder's "all" and "train" are one folder: the source, not the split name, tells
    ({"split": "all", "source": "fashion_mnist/train/src_x"}, "hold the same images (split 'train' and 'all'"),
])
def test_features_of_another_embedding_or_the_same_split_are_refused(bilaf, feats, capsys, change,
                                                                     needle):
    """Feature files written by `bilaf extract` say how they were made; a probe fitted on one
    embedding and tested on another, or on training rows, would report a meaningless number."""
    meta = {"dataset": "fashion_mnist", "split": "train", "source": "fashion_mnist/train/src_x",
            "backbone": "efficientnet_lite0", "weights_sha256": "a" * 64, "taps": None, "dim": 12,
            "image_size": 48, "resize": "bilinear", "mean": [0.5] * 3, "std": [0.2] * 3}
    if "class_names" in change:  # image folders: label i is the i-th class folder of each
        meta["class_names"] = ["a", "b", "c"]
    test_meta = {**meta, "split": "test", "source": "fashion_mnist/test/src_x"}
    if change.get("split") == "train":
        test_meta = dict(meta)
    else:
        test_meta.update(change)
    for name, m in (("pool", meta), ("test", test_meta)):
        with np.load(feats / f"{name}.npz") as f:
            x, y = f["features"], f["labels"]
        np.savez(feats / f"{name}.npz", features=x, labels=y, meta=np.asarray(json.dumps(m)))
    if needle is None:
        assert bilaf(_args(feats, feats / "run")) == 0
        # python -m train.main names its data set itself: it must be the features'
        from train.main import main as train_main

        capsys.readouterr()
        assert train_main(["--config", "fashion_mnist", "--workdir", str(feats / "other"),
                           "mode=linear", "dataset=mnist_5k", f"selection={feats / 'sel.json'}",
                           f"features={feats / 'pool.npz'}", f"test_features={feats / 'test.npz'}"]) == 2
        assert "dataset mnist_5k but the features" in capsys.readouterr().err
        assert not (feats / "other").exists()
        return
    assert bilaf(_args(feats, feats / "run")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    assert not (feats / "run").exists()


def test_a_selection_made_on_other_rows_is_refused(bilaf, feats, capsys):
    """`bilaf select` records which data its feature rows are; `bilaf finetune` refuses to label
    rows of another data set with those indices (it used to train on them, exit 0)."""
    def with_meta(name, dataset, split):
        with np.load(feats / f"{name}.npz") as f:
            x, y = f["features"], f["labels"]
        meta = {"dataset": dataset, "split": split, "source": f"{dataset}/{split}/src_x",
                "backbone": "efficientnet_lite0", "weights_sha256": "a" * 64, "taps": None,
                "dim": 12, "image_size": 48, "resize": "bicubic", "mean": [0.5] * 3,
                "std": [0.5] * 3}
        np.savez(feats / f"{name}.npz", features=x, labels=y, meta=np.asarray(json.dumps(meta)))

    with_meta("pool", "fashion_mnist", "train")
    sel = feats / "picked.json"
    assert bilaf(["select", str(feats / "pool.npz"), "--budget", "20", "--method", "random",
                  "--out", str(sel)]) == 0
    record = json.loads((feats / "picked.meta.json").read_text())
    assert record["features"]["pool"] == {"dataset": "fashion_mnist", "split": "train",
                                          "source": "fashion_mnist/train/src_x"}
    with_meta("pool", "mnist_5k", "train")  # the same file name, other rows
    with_meta("test", "mnist_5k", "test")
    capsys.readouterr()
    args = _args(feats, feats / "run", sel=sel)
    args.remove("--dataset"), args.remove("fashion_mnist")
    assert bilaf(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "selected on dataset 'fashion_mnist'" in err, err
    assert not (feats / "run").exists()
    # --dataset must agree with the features' own data set
    assert bilaf(_args(feats, feats / "run")) == 2
    assert "dataset fashion_mnist (--dataset or --config) but --features" in capsys.readouterr().err
    # full finetuning on another data set than the selection's
    assert bilaf(["finetune", "--dataset", "mnist_5k", "--selection", str(sel), "--mode", "full",
                  "--steps", "2", "--image-size", "32", "--workdir", str(feats / "full")]) == 2
    assert "selected on dataset 'fashion_mnist'" in capsys.readouterr().err
    assert not (feats / "full").exists()


def test_warmup_steps_flag_reaches_the_config(bilaf, feats, capsys):
    """The warm-up error names a flag that exists, and the flag sets warmup_steps."""
    from tests.conftest import fashion_mnist_or_skip

    fashion_mnist_or_skip()
    args = ["finetune", "--dataset", "fashion_mnist", "--selection", str(feats / "sel.json"),
            "--mode", "full", "--steps", "6", "--image-size", "16", "--pool-size", "300",
            "--test-size", "8", "--workdir", str(feats / "full")]
    capsys.readouterr()
    assert bilaf([*args, "--warmup-steps", "6"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(warmup_steps 6)" in err and "(--warmup-steps)" in err, err
    assert not (feats / "full").exists()
    assert bilaf([*args, "--warmup-steps", "6", "--mode", "linear"]) == 2
    assert "--warmup-steps" in capsys.readouterr().err  # full mode only


def test_eval_every_flag_replaces_a_configs_interval_in_epochs(bilaf, feats, monkeypatch):
    """`--config cifar10 --eval-every 100`: the flag's interval, not "eval_every and
    eval_every_epochs, not both"."""
    import train.train

    class Seen(Exception):
        pass

    def record(config, workdir):
        raise Seen(config)

    monkeypatch.setattr(train.train, "train_and_evaluate", record)
    monkeypatch.setattr(train.train, "check_num_devices", lambda *a: None)
    args = ["finetune", "--config", "cifar10", "--selection", str(feats / "sel.json"),
            "--workdir", str(feats / "c10")]
    with pytest.raises(Seen) as flag:
        bilaf([*args, "--eval-every", "100"])
    assert (flag.value.args[0].eval_every, flag.value.args[0].eval_every_epochs) == (100, None)
    with pytest.raises(Seen) as config:
        bilaf(args)
    assert (config.value.args[0].eval_every, config.value.args[0].eval_every_epochs) == (None, 50)


def test_full_finetune_identity_records_the_backbones_preprocessing(feats):
    """A full-finetune workdir of another input preprocessing (an earlier version's) is not
    resumed: its checkpoints were trained on other inputs."""
    from bilaf_jax.backbones import preprocessing
    from train.train import _identity, make_config

    cfg = make_config(mode="full", selection=str(feats / "sel.json"))
    sel = json.loads((feats / "sel.json").read_text())
    assert _identity(cfg, sel)["preprocessing"] == preprocessing("efficientnet_lite0")
    # a setting added later enters the identity only away from what earlier runs did
    assert "crop_interpolation" not in _identity(cfg, sel)
    bicubic = make_config(mode="full", selection=str(feats / "sel.json"), crop_interpolation="bicubic")
    assert _identity(bicubic, sel)["crop_interpolation"] == "bicubic"
    with pytest.raises(ValueError, match="crop_interpolation must be one of bilinear, bicubic"):
        make_config(mode="full", selection=str(feats / "sel.json"), crop_interpolation="nearest")
    assert "preprocessing" not in _identity(make_config(
        mode="linear", selection=str(feats / "sel.json"), features=str(feats / "pool.npz"),
        test_features=str(feats / "test.npz")), sel)


def test_full_finetune_workdir_refuses_a_replaced_weight_file(feats):
    """A weight file replaced at the same path is another run: resuming its checkpoints would
    report the old weights' result. Workdirs recorded before the weights' digest still resume."""
    from train.train import _check_workdir, _claimed, _identity, make_config

    weights = feats / "w.pth"
    weights.write_bytes(b"first")
    cfg = make_config(mode="full", selection=str(feats / "sel.json"), backbone_weights=str(weights))
    sel = json.loads((feats / "sel.json").read_text())
    wd = feats / "full"
    with _claimed(wd, cfg, _identity(cfg, sel, "images")):
        (wd / "checkpoints" / "2").mkdir(parents=True)  # a finished checkpoint
    assert _check_workdir(wd, _identity(cfg, sel, "images"), cfg.selection)
    weights.write_bytes(b"second")
    with pytest.raises(ValueError, match="different config.*backbone_weights_sha256"):
        _check_workdir(wd, _identity(cfg, sel, "images"), cfg.selection)
    record = json.loads((wd / "config.json").read_text())
    del record["identity"]["backbone_weights_sha256"]
    (wd / "config.json").write_text(json.dumps(record))
    assert _check_workdir(wd, _identity(cfg, sel, "images"), cfg.selection)


def test_full_finetune_workdir_resumes_the_same_weights_named_otherwise(feats, monkeypatch):
    """The weights' digest decides, not their path: a copy of the weight file, or the default
    file named by its path, resumes (`bilaf run` keeps such a run's records as the same run);
    the default file replaced since (another version of its package) is refused."""
    from pathlib import Path

    import bilaf_jax.backbones
    from train.train import _check_workdir, _claimed, _identity, make_config

    def identity(weights):
        return _identity(make_config(mode="full", selection=str(feats / "sel.json"),
                                     backbone_weights=weights),
                         json.loads((feats / "sel.json").read_text()), "images")

    def claim(wd, weights):
        with _claimed(wd, make_config(mode="full", selection=str(feats / "sel.json"),
                                      backbone_weights=weights), identity(weights)):
            (wd / "checkpoints" / "2").mkdir(parents=True)  # a finished checkpoint

    default = feats / "default.pth"
    default.write_bytes(b"default")
    monkeypatch.setattr(bilaf_jax.backbones, "_weights_path",
                        lambda name, weights: default if weights is None else Path(weights))
    for name in ("w.pth", "copy.pth"):
        (feats / name).write_bytes(b"mine")
    claim(feats / "file", str(feats / "w.pth"))
    sel = str(feats / "sel.json")
    assert _check_workdir(feats / "file", identity(str(feats / "copy.pth")), sel)
    claim(feats / "default", None)
    assert _check_workdir(feats / "default", identity(str(default)), sel)
    default.write_bytes(b"another version")
    with pytest.raises(ValueError, match="different config.*backbone_weights_sha256"):
        _check_workdir(feats / "default", identity(None), sel)


@pytest.mark.parametrize("mode", ["linear", "knn"])
def test_an_interrupted_rerun_leaves_the_workdir_as_it_was(bilaf, feats, capsys, monkeypatch, mode):
    """Ctrl-C while the probe or k-NN runs: the finished run's metrics.jsonl is not emptied
    beside its summary.json, and a first start leaves no workdir behind."""
    import train.knn
    import train.linear

    wd = feats / "run"
    assert bilaf(_args(feats, wd, mode)) == 0
    before = _snapshot(wd)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train.linear if mode == "linear" else train.knn,
                        "linear_probe" if mode == "linear" else "knn_eval", interrupted)
    for workdir in (wd, feats / "fresh"):
        assert bilaf(_args(feats, workdir, mode)) == 130
    assert _snapshot(wd) == before
    assert not (feats / "fresh").exists()


def test_workdir_below_a_file_is_a_one_line_error(bilaf, feats, capsys):
    (feats / "file").write_text("")
    assert bilaf(_args(feats, feats / "file" / "run")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot create workdir" in err, err


def test_a_list_its_record_does_not_describe_is_refused(bilaf, feats, capsys):
    """`bilaf select` records the sha256 of the list it wrote; a list copied beside another
    selection's record was judged by that record (a false "selected on split 'test'"), or ran
    recording that other selection's provenance."""
    def with_meta(name, split):
        with np.load(feats / f"{name}.npz") as f:
            x, y = f["features"], f["labels"]
        meta = {"dataset": "fashion_mnist", "split": split, "source": f"fashion_mnist/{split}/src_x",
                "backbone": "efficientnet_lite0", "weights_sha256": "a" * 64, "taps": None,
                "dim": 12, "image_size": 48, "resize": "bicubic", "mean": [0.5] * 3,
                "std": [0.5] * 3}
        np.savez(feats / f"{name}.npz", features=x, labels=y, meta=np.asarray(json.dumps(meta)))

    with_meta("pool", "train")
    with_meta("test", "test")
    for name, features in (("picked", "pool"), ("on_test", "test"), ("other", "pool")):
        assert bilaf(["select", str(feats / f"{features}.npz"), "--budget", "20", "--method",
                      "random", "--seed", str(len(name)), "--out", str(feats / f"{name}.json")]) == 0
    picked = (feats / "picked.json").read_text()
    assert json.loads(picked) != json.loads((feats / "other.json").read_text())
    (feats / "on_test.json").write_text(picked)  # beside a record of a selection on test rows
    (feats / "other.json").write_text(picked)  # beside a record of another list of these rows
    # The list's own record passes, however the list is laid out.
    (feats / "picked.json").write_text(json.dumps(json.loads(picked), indent=2))
    assert bilaf(_args(feats, feats / "ok", sel=feats / "picked.json")) == 0
    capsys.readouterr()
    for mode in ("linear", "full"):
        if mode == "full":
            from tests.conftest import fashion_mnist_or_skip

            fashion_mnist_or_skip()  # full mode reads the pool's size from the images
        for name in ("on_test", "other"):
            args = _args(feats, feats / "run", mode, sel=feats / f"{name}.json")
            if mode == "full":
                args = args[:args.index("--features")] + ["--workdir", str(feats / "run")]
            assert bilaf(args) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1, err
            assert (f"{feats / name}.json is not the list its record {feats / name}.meta.json "
                    "describes") in err, err
            assert not (feats / "run").exists()


@pytest.mark.parametrize("mode", ["linear", "knn"])
def test_sizes_beyond_the_feature_rows_are_noted(bilaf, feats, capsys, mode):
    """A --pool-size / --test-size above the rows there are takes them all (one config serves
    files of several sizes) and says so; summary.json records the sizes used."""
    capsys.readouterr()
    args = _args(feats, feats / "big", mode) + ["--pool-size", "1000", "--test-size", "250"]
    assert bilaf(args) == 0
    err = capsys.readouterr().err
    assert err == ("bilaf finetune: note: pool_size 1000 is more than the 300 train rows of the "
                   "feature files: the run uses all 300\n"
                   "bilaf finetune: note: test_size 250 is more than the 200 test rows of the "
                   "feature files: the run uses all 200\n")
    summary = json.loads((feats / "big" / "summary.json").read_text())
    assert (summary["num_pool"], summary["num_test"]) == (300, 200)
    assert summary["config"]["pool_size"] == 1000  # what was asked, beside what was used
    # Within the rows: no note, and the sizes are the ones asked.
    assert bilaf(_args(feats, feats / "small", mode) + ["--pool-size", "299", "--test-size", "50"]) == 0
    assert capsys.readouterr().err == ""
    summary = json.loads((feats / "small" / "summary.json").read_text())
    assert (summary["num_pool"], summary["num_test"]) == (299, 50)


@pytest.mark.parametrize("mode", ["linear", "knn"])
def test_test_classes_no_labelled_sample_has_are_noted(bilaf, feats, capsys, mode):
    """An accuracy of 0 because the labelled samples share no class with the test set is said,
    not left silent; the run still goes on."""
    pool_y, test_y = np.load(feats / "pool.npz")["labels"], np.load(feats / "test.npz")["labels"]
    only_0 = feats / "only_0.json"
    only_0.write_text(json.dumps([int(i) for i in np.flatnonzero(pool_y == 0)[:20]]))
    capsys.readouterr()
    assert bilaf(_args(feats, feats / "some", mode, sel=only_0)) == 0
    err = capsys.readouterr().err
    assert err == (f"bilaf finetune: note: {int((test_y != 0).sum())} of 200 test samples have "
                   "labels never seen in training (2 of 3 test classes have no labelled sample); "
                   "they count as wrong\n")
    # No class shared: the accuracy is 0, and said why.
    with np.load(feats / "test.npz") as f:
        tx, ty = f["features"], f["labels"]
    np.savez(feats / "test.npz", features=tx[ty != 0], labels=ty[ty != 0])
    assert bilaf(_args(feats, feats / "none", mode, sel=only_0)) == 0
    out, err = capsys.readouterr()
    assert "final_accuracy 0.0000" in out
    n = int((ty != 0).sum())
    assert f"note: {n} of {n} test samples have labels never seen in training" in err
    assert err.count("\n") == 1
    assert bilaf(_args(feats, feats / "all", mode)) == 0  # every class labelled: no note
    assert capsys.readouterr().err == ""


def test_ctrl_c_during_a_checkpoint_save_is_one_line_and_resumes(bilaf, feats, capfd, monkeypatch):
    """Ctrl-C while orbax writes a checkpoint: the save finishes (it was left running in the
    background, and at exit printed tracebacks and left a tmp folder), only `interrupted` is
    printed, and the run resumes from that checkpoint to the uninterrupted run's result."""
    import signal
    import threading

    from tests.conftest import fashion_mnist_or_skip

    fashion_mnist_or_skip()
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("SIGINT reaches the main thread only")
    # Python's own Ctrl-C handler, whatever this process inherited: a shell that starts it in
    # the background sets SIGINT to ignored, and Python then leaves it ignored.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _ctrl_c_during_saves(bilaf, feats, capfd, monkeypatch)
    finally:
        signal.signal(signal.SIGINT, previous)


def _ctrl_c_during_saves(bilaf, feats, capfd, monkeypatch):
    import signal

    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from flax import nnx

    import train.train as tt
    from tests.tiny_backbone import TinyBackbone

    def backbone(config):
        bb = TinyBackbone()
        bb.module.ballast = nnx.Param(jnp.zeros(1 << 24))  # 64 MB: a save takes a while
        return bb

    monkeypatch.setattr(tt, "_load_backbone", backbone)
    args = ["finetune", "--dataset", "fashion_mnist", "--selection", str(feats / "sel.json"),
            "--mode", "full", "--steps", "6", "--warmup-steps", "1", "--batch-size", "4",
            "--image-size", "16", "--pool-size", "300", "--test-size", "16",
            "--checkpoint-every", "2"]
    assert bilaf([*args, "--workdir", str(feats / "ref")]) == 0
    digest = capfd.readouterr().out.splitlines()[-1]

    save = ocp.CheckpointManager.save

    def save_with_ctrl_c(self, step, *a, **k):
        if step == 2:
            signal.raise_signal(signal.SIGINT)  # as the save begins
        saved = save(self, step, *a, **k)
        if step == 4:
            signal.raise_signal(signal.SIGINT)  # while it is written in the background
        return saved

    monkeypatch.setattr(ocp.CheckpointManager, "save", save_with_ctrl_c)
    run = [*args, "--workdir", str(feats / "run")]
    for kept in (["2"], ["2", "4"]):
        assert bilaf(run) == 130
        assert capfd.readouterr().err == "bilaf finetune: interrupted\n"
        assert sorted(p.name for p in (feats / "run" / "checkpoints").iterdir()) == kept
    assert bilaf(run) == 0
    out = capfd.readouterr().out
    assert "resumed from step 4" in out and out.splitlines()[-1] == digest
