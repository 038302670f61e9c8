"""Row-sharded pools on 8 simulated CPU devices give the same selections as unsharded ones."""

from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bilaf_jax.activeft import activeft
from bilaf_jax.pipeline import select
from bilaf_jax.sharding import make_mesh, shard_rows

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices; see conftest.py")


def _pool(n):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 12)) * 3
    return (centres[rng.integers(0, 6, n)] + rng.normal(size=(n, 12))).astype(np.float32)


CASES = [
    ("random", {}),
    ("kcenter", {}),
    ("kmeans", {}),
    ("activeft", dict(core_options=dict(num_steps=15))),
    ("bilaf", dict(num_cores=6, core_options=dict(num_steps=15))),
    ("bilaf", dict(num_cores=6, core_method="kcenter", mode="official")),
]


@pytest.mark.parametrize("method, kwargs", CASES)
def test_sharded_equals_unsharded(method, kwargs):
    x = _pool(1001)  # not divisible by 8: padded by shard_rows
    pool = shard_rows(x, make_mesh(8))
    assert len(pool.features.sharding.device_set) == 8
    want = select(jax.random.key(0), x, 48, method=method, **kwargs)
    got = select(jax.random.key(0), pool.features, 48, method=method, num_rows=pool.num_rows, **kwargs)
    np.testing.assert_array_equal(got.indices, want.indices)


def test_explicit_mesh_from_make_mesh_is_accepted():
    x = _pool(1008)
    mesh = jax.make_mesh((8,), ("data",))  # Explicit axes by default
    xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    for method in ("kcenter", "activeft"):
        kw = dict(core_options=dict(num_steps=10)) if method == "activeft" else {}
        want = select(jax.random.key(1), x, 20, method=method, **kw).indices
        got = select(jax.random.key(1), xs, 20, method=method, **kw).indices
        np.testing.assert_array_equal(got, want)
    from bilaf_jax.sweep import mean_nearest_distance, mean_nearest_distances

    idx = np.arange(0, 1008, 50)  # the measures take such a pool too (they raised)
    np.testing.assert_allclose(mean_nearest_distance(xs, idx), mean_nearest_distance(x, idx), rtol=1e-6)
    np.testing.assert_allclose(mean_nearest_distances(xs, idx[None]), mean_nearest_distances(x, idx[None]),
                               rtol=1e-6)


def test_minibatch_activeft_sharded_with_padding():
    x = _pool(1001)
    pool = shard_rows(x, make_mesh(8))
    want = activeft(jax.random.key(2), x, 10, num_steps=10, batch_size=300)
    got = activeft(jax.random.key(2), pool.features, 10, num_steps=10, batch_size=300, num_rows=pool.num_rows)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_allclose(got.losses, want.losses, rtol=1e-5)


def test_boundary_stage_and_measures_on_a_padded_pool():
    """bilaf, sweep_boundary and the mean-distance measures called directly on a padded,
    sharded pool: the padding rows are neither selected nor measured."""
    from bilaf_jax.boundary import bilaf
    from bilaf_jax.sweep import mean_nearest_distance, mean_nearest_distances, sweep_boundary

    x = _pool(1001)
    pool = shard_rows(x, make_mesh(8))
    cores = np.arange(0, 1001, 167)
    for mode in ("paper", "official"):
        want = bilaf(jax.random.key(0), x, cores, 48, mode=mode)
        got = bilaf(jax.random.key(0), pool.features, cores, 48, mode=mode, num_rows=1001)
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(got.pseudo_labels, want.pseudo_labels)
    grid = {"remove_fraction": [0.1, 0.2]}
    want = sweep_boundary(jax.random.key(0), x, cores, 48, grid)
    got = sweep_boundary(jax.random.key(0), pool.features, cores, 48, grid, num_rows=1001)
    np.testing.assert_array_equal(got.indices, want.indices)
    idx = np.asarray(want.indices)
    np.testing.assert_allclose(mean_nearest_distance(pool.features, idx[0], num_rows=1001),
                               mean_nearest_distance(x, idx[0]), rtol=1e-6)
    np.testing.assert_allclose(mean_nearest_distances(pool.features, idx, num_rows=1001),
                               mean_nearest_distances(x, idx), rtol=1e-6)


def test_num_rows_validation():
    x = _pool(16)
    with pytest.raises(ValueError, match="num_rows"):
        select(jax.random.key(0), x, 4, method="random", num_rows=17)
    with pytest.raises(ValueError, match="budget"):
        select(jax.random.key(0), x, 12, method="random", num_rows=10)


def test_sweep_sharded_with_padding_equals_unsharded():
    from bilaf_jax.sweep import sweep

    x = _pool(1001)
    pool = shard_rows(x, make_mesh(8))
    grid = {"temperature": [0.05, 0.1], "remove_fraction": [0.1, 0.2]}
    want = sweep(jax.random.key(3), x, 40, grid, num_cores=5, num_steps=10)
    got = sweep(jax.random.key(3), pool.features, 40, grid, num_cores=5, num_steps=10,
                num_rows=pool.num_rows)
    np.testing.assert_array_equal(got.core_indices, want.core_indices)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_allclose(got.mean_distance, want.mean_distance, rtol=1e-5)
    np.testing.assert_array_equal(got.selected_balance, want.selected_balance)
    # the measures of the core stage see no padding rows either
    np.testing.assert_allclose(got.core_mean_distance, want.core_mean_distance, rtol=1e-5)
    np.testing.assert_allclose(got.core_loss, want.core_loss, rtol=1e-5)
    np.testing.assert_array_equal(got.pool_balance, want.pool_balance)


# ---- the command line: --mesh, and one selection spread over two processes -----------------


def _select_args(features, out, *extra):
    return [str(features), "--budget", "48", "--cores", "6", "--steps", "15", "--out", str(out),
            "--compile-cache", "off", *extra]


def test_select_cli_mesh_equals_one_device(tmp_path):
    import json

    from bilaf_jax.cli import main

    np.save(tmp_path / "f.npy", _pool(1001))
    assert main(["select", *_select_args(tmp_path / "f.npy", tmp_path / "one.json")]) == 0
    assert main(["select", *_select_args(tmp_path / "f.npy", tmp_path / "mesh.json", "--mesh", "all")]) == 0
    one, mesh = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "mesh.json"))
    assert mesh == one and len(one) == 48
    meta = json.loads((tmp_path / "mesh.meta.json").read_text())
    assert meta["device"]["mesh"] == 8 and meta["device"]["processes"] == 1
    # --verify re-runs on any mesh and must agree.
    assert main(["select", "--verify", str(tmp_path / "one.json"), "--mesh", "3", "--compile-cache", "off"]) == 0


def test_select_cli_mesh_keeps_float64_features(tmp_path, capsys):
    """Official mode computes in float64: float64 features on a mesh are placed as float64
    (they were float32 there, and near-duplicate rows that only float64 tells apart gave
    other picks). Values beyond float32's range are refused on a mesh as without one (they
    were read as 0 there, and selected from)."""
    import json

    from bilaf_jax.cli import main

    x = _pool(301).astype(np.float64)
    rng = np.random.default_rng(0)
    y = np.concatenate([x, x + rng.normal(size=x.shape) * 1e-11])[:451]  # ties in float32 only
    y = y[rng.permutation(len(y))]
    np.save(tmp_path / "f.npy", y)
    args = ["--budget", "60", "--cores", "6", "--steps", "50", "--mode", "official",
            "--compile-cache", "off"]
    for name, extra in (("one", []), ("mesh", ["--mesh", "all"])):
        assert main(["select", str(tmp_path / "f.npy"), *args, "--out", str(tmp_path / f"{name}.json"),
                     *extra]) == 0
    one, mesh = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "mesh"))
    assert mesh == one
    want32 = select(jax.random.key(0), y.astype(np.float32), 60, num_cores=6, mode="official",
                    core_options=dict(num_steps=50))
    assert np.asarray(want32.indices).tolist() != one  # float32 would pick otherwise
    capsys.readouterr()
    np.save(tmp_path / "tiny.npy", y * 1e-200)
    for extra in ([], ["--mesh", "all"]):
        assert main(["select", str(tmp_path / "tiny.npy"), "--budget", "30", "--out",
                     str(tmp_path / "t.json"), *extra]) == 2
        assert "squared distances between rows underflow float32" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--mesh", "9"], "between 1 and the 8 devices"),
    (["--mesh", "two"], "mesh must be 'all'"),
    (["--coordinator", "localhost:1234"], "need --distributed"),
    (["--distributed", "--coordinator", "localhost:1234"], "give all of coordinator"),
    (["--distributed", "--coordinator", "localhost:1234", "--num-processes", "2", "--process-id", "2"],
     r"process_id must be in \[0, 2\)"),
])
def test_select_cli_bad_mesh_options(tmp_path, capsys, argv, message):
    from bilaf_jax.cli import main

    np.save(tmp_path / "f.npy", _pool(64))
    assert main(["select", *_select_args(tmp_path / "f.npy", tmp_path / "s.json", *argv)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "s.json").exists()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_processes(command, num_processes=2, devices_per_process=2, worker_args=None):
    """Start `command` once per process, each with its own simulated CPU devices, and return
    their (returncode, stderr) after all finish. The processes find each other through the
    `bilaf` options `--distributed --coordinator ...`, or, with `worker_args`, through
    tests/distributed_worker.py's positional arguments."""
    import os
    import subprocess

    port = _free_port()
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}

    def argv(i):
        if worker_args is not None:
            return [*command, f"localhost:{port}", str(num_processes), str(i), *worker_args]
        return [*command, "--distributed", "--coordinator", f"localhost:{port}",
                "--num-processes", str(num_processes), "--process-id", str(i)]

    procs = [subprocess.Popen(argv(i), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(num_processes)]
    results = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=240)
            results.append((p.returncode, err))
    finally:
        for p in procs:
            p.kill()
    return results


# Rows sharded evenly over the 4 devices (slow: the in-process 8-device tests cover even
# sharding, and 1001 covers this path with padding); padded.
@pytest.mark.parametrize("n", [pytest.param(1000, marks=pytest.mark.slow), 1001])
def test_two_processes_every_selector_equals_one_device(tmp_path, n):
    """Every selector on a pool sharded over 2 processes x 2 devices (jax.distributed) returns,
    on every process, the one-device selection."""
    import json
    import sys
    from pathlib import Path

    from bilaf_jax.pipeline import select
    from tests.distributed_worker import BUDGET, CASES

    x = _pool(n)
    np.save(tmp_path / "f.npy", x)
    worker = Path(__file__).with_name("distributed_worker.py")
    results = _run_processes([sys.executable, str(worker)], worker_args=[str(tmp_path / "f.npy"),
                                                                         str(tmp_path / "out.json")])
    for code, err in results:
        assert code == 0, err[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())
    for name, kwargs in CASES.items():
        want = select(jax.random.key(0), x, BUDGET, **kwargs)
        assert got[name] == np.asarray(want.indices).tolist(), name


def test_two_processes_select_and_sweep_equal_one_device(tmp_path):
    """`bilaf select` and scripts/sweep.py over 2 processes x 2 devices with --distributed:
    process 0 writes exactly the one-device result; process 1 writes nothing."""
    import json
    import sys
    from pathlib import Path

    from bilaf_jax.pipeline import select
    from bilaf_jax.sweep import sweep, to_records

    x = _pool(1000)
    np.save(tmp_path / "f.npy", x)
    bilaf = [sys.executable, "-c", "import sys; from bilaf_jax.cli import main; sys.exit(main())", "select",
             *_select_args(tmp_path / "f.npy", tmp_path / "dist.json")]
    for code, err in _run_processes(bilaf):
        assert code == 0, err[-2000:]
    want = select(jax.random.key(0), x, 48, num_cores=6, core_options=dict(num_steps=15))
    assert json.loads((tmp_path / "dist.json").read_text()) == np.asarray(want.indices).tolist()
    meta = json.loads((tmp_path / "dist.meta.json").read_text())
    assert meta["device"]["processes"] == 2 and meta["device"]["mesh"] == 4

    script = Path(__file__).resolve().parents[1] / "scripts" / "sweep.py"
    grid = ["--grid", "temperature=0.05,0.1", "--grid", "remove_fraction=0.1,0.2"]
    sweep_cmd = [sys.executable, str(script), str(tmp_path / "f.npy"), "--budget", "40", "--cores", "5",
                 "--steps", "10", *grid, "--out", str(tmp_path / "sweep.json")]
    for code, err in _run_processes(sweep_cmd):
        assert code == 0, err[-2000:]
    got = json.loads((tmp_path / "sweep.json").read_text())
    assert got["config"]["processes"] == 2
    want = to_records(sweep(jax.random.key(0), x, 40, {"temperature": [0.05, 0.1], "remove_fraction": [0.1, 0.2]},
                            num_cores=5, num_steps=10))
    assert len(got["records"]) == len(want) == 4
    for g, w in zip(got["records"], want, strict=True):
        assert g.keys() == w.keys()
        np.testing.assert_allclose([g[k] for k in w], [w[k] for k in w], rtol=1e-5)


def test_joining_with_a_coordinator_says_it_waits(monkeypatch, capsys):
    """Joining blocks silently until every process has joined; the command says so first."""
    import argparse

    from bilaf_jax import sharding
    from bilaf_jax.cli import setup_mesh

    calls = []

    def join(*args, on_wait=None):
        calls.append(args)
        if on_wait is not None:
            on_wait()

    monkeypatch.setattr(sharding, "initialize_distributed", join)
    args = argparse.Namespace(distributed=True, coordinator="10.0.0.1:1234", num_processes=2,
                              process_id=1, mesh="1")
    setup_mesh(args)
    assert calls == [("10.0.0.1:1234", 2, 1)]
    assert capsys.readouterr().err == ("note: joining the run of 2 processes at 10.0.0.1:1234; "
                                       "this waits for all of them\n")
