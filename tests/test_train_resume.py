"""Full finetune: an interrupted run, started again, ends exactly where an uninterrupted one does.

Two kinds of interruption: in-process (`max_steps_this_run`, with the real EfficientNet-Lite0 at
random weights on 16 px images) and a real SIGKILL of a child process (a small NNX backbone so
that the child starts fast).
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from tests.tiny_backbone import TinyBackbone  # noqa: E402
from train.train import make_config, train_and_evaluate  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _fashion_mnist_or_skip():
    from tests.conftest import fashion_mnist_or_skip

    fashion_mnist_or_skip()


def _tree_equal(a, b):
    def data(x):
        return np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                          else x)

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(data(x), data(y)) for x, y in zip(la, lb, strict=True))


def _selection(tmp_path, ids):
    path = tmp_path / "sel.json"
    path.write_text(json.dumps(ids))
    return str(path)


def test_resume_after_interrupt_is_exact_real_backbone(tmp_path):
    _fashion_mnist_or_skip()
    from bilaf_jax import backbones

    # One backbone object serves every run: runs never write into the module they wrap.
    bb = backbones.load("efficientnet_lite0", "random")
    sel = _selection(tmp_path, list(range(0, 120, 5)))  # 24 labelled
    cfg = make_config(selection=sel, backbone_weights="random", image_size=16, steps=4,
                      batch_size=4, checkpoint_every=2, log_every=1, eval_every=2,
                      pool_size=200, test_size=16, ema_decay=0.5, warmup_steps=1)
    full = train_and_evaluate(cfg, tmp_path / "a", backbone=bb)
    part = train_and_evaluate(cfg, tmp_path / "b", backbone=bb, max_steps_this_run=3)
    assert part == {"interrupted": True, "step": 3, "resumed_from_step": 0}
    assert not (tmp_path / "b" / "summary.json").exists()
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:  # a kill in the middle of a line
        f.write('{"step": 4, "train_lo')
    rest = train_and_evaluate(cfg, tmp_path / "b", backbone=bb)
    assert rest["resumed_from_step"] == 2 and full["resumed_from_step"] == 0
    assert _tree_equal(full["state"], rest["state"])  # params, BN stats, optimiser, EMA, RNG
    sa = json.loads((tmp_path / "a" / "summary.json").read_text())
    sb = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert sa["final_accuracy"] == sb["final_accuracy"]
    assert sa["params_digest"] == sb["params_digest"]
    assert sa["step"] == sb["step"] == 4
    assert {k: v for k, v in sa.items() if k != "resumed_from_step"} == \
        {k: v for k, v in sb.items() if k != "resumed_from_step"}
    # Metrics: the line of step 3 (written before the interrupt) is not duplicated, the cut
    # line is gone.
    ma = (tmp_path / "a" / "metrics.jsonl").read_text()
    mb = (tmp_path / "b" / "metrics.jsonl").read_text()
    assert ma == mb
    recs = [json.loads(line) for line in mb.splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all("train_loss" in r and np.isfinite(r["train_loss"]) for r in recs)
    assert [r["step"] for r in recs if "eval_accuracy" in r] == [2, 4]
    assert recs[-1]["eval_accuracy"] == sa["final_accuracy"]
    # Starting a finished run again changes nothing: its record still says where it resumed
    # (it said 4, for a run that had not been interrupted, before).
    summaries = {w: (tmp_path / w / "summary.json").read_text() for w in "ab"}
    for w, resumed in (("a", 0), ("b", 2)):
        again = train_and_evaluate(cfg, tmp_path / w, backbone=bb)
        assert again["final_accuracy"] == sa["final_accuracy"]
        assert again["resumed_from_step"] == resumed
        assert (tmp_path / w / "summary.json").read_text() == summaries[w]
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == ma
    # A different config in the same workdir is refused before anything is written.
    with pytest.raises(ValueError, match="different config"):
        train_and_evaluate(make_config(**{**cfg.__dict__, "steps": 5}), tmp_path / "a",
                           backbone=bb)
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == ma


def _child_config(sel):
    return make_config(selection=sel, image_size=16, steps=60, batch_size=4,
                       checkpoint_every=10, log_every=5, eval_every=30, pool_size=200,
                       test_size=16, ema_decay=0.9, warmup_steps=5)


def child_main(workdir, sel, step_delay):
    """Run in a child process: the small-backbone run, slowed down so it can be killed midway."""
    import train.train as tt

    if step_delay:
        step_fn = tt._train_step_fn

        def slow(*a, **k):
            fn = step_fn(*a, **k)

            def run(*args):
                time.sleep(step_delay)
                return fn(*args)
            return run
        tt._train_step_fn = slow
    train_and_evaluate(_child_config(sel), workdir, backbone=TinyBackbone())


def _spawn(workdir, sel, delay):
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
            "from tests.test_train_resume import child_main; "
            f"child_main({str(workdir)!r}, {sel!r}, {delay!r})")
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def test_sigkill_then_rerun_matches_uninterrupted_run(tmp_path):
    _fashion_mnist_or_skip()
    sel = _selection(tmp_path, list(range(0, 200, 4)))  # 50 labelled
    workdir = tmp_path / "killed"
    proc = _spawn(workdir, sel, 0.1)
    first = workdir / "checkpoints" / "10"
    deadline = time.time() + 300
    while not first.is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert first.is_dir(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else ""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (workdir / "summary.json").exists()
    killed_at = max(int(json.loads(line)["step"])
                    for line in (workdir / "metrics.jsonl").read_text().splitlines()
                    if line.strip().startswith("{") and line.strip().endswith("}"))
    assert 10 <= killed_at < 60

    again = _spawn(workdir, sel, 0.0)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err.decode()[-2000:]

    train_and_evaluate(_child_config(sel), tmp_path / "ref", backbone=TinyBackbone())
    s_killed = json.loads((workdir / "summary.json").read_text())
    s_ref = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert s_killed["resumed_from_step"] >= 10 and s_ref["resumed_from_step"] == 0
    assert s_killed["final_accuracy"] == s_ref["final_accuracy"]
    assert s_killed["params_digest"] == s_ref["params_digest"]
    assert (workdir / "metrics.jsonl").read_text() == (tmp_path / "ref" / "metrics.jsonl").read_text()


def test_full_mode_reads_only_labelled_pool_rows_and_imagenet_validation(tmp_path, monkeypatch):
    """ImageNet's pool never fits in memory: full mode reads the selected rows of the train split
    and the test rows of the labelled held-out split (ImageNet: validation), nothing else."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from bilaf_jax import data

    real, read = data.data_source, {}

    def recording(name, split, **kwargs):
        src = real(name, split, **kwargs)
        getitems = src._getitems

        def spy(rows):
            read.setdefault(split, []).extend(int(r) for r in rows)
            return getitems(rows)
        src._getitems = spy
        return src

    monkeypatch.setattr(data, "data_source", recording)
    sel = _selection(tmp_path, [5, 1, 7])
    with tfds.testing.mock_data(num_examples=10):  # ImageNet images of varying sizes
        config = make_config(dataset="imagenet2012", data_dir=str(tmp_path / "tfds"),
                             selection=sel, image_size=16, steps=3, batch_size=2,
                             checkpoint_every=3, log_every=1, test_size=4, warmup_steps=1)
        summary = train_and_evaluate(config, tmp_path / "run", backbone=TinyBackbone())
    assert sorted(read) == ["train", "validation"]
    assert read["train"] == [5, 1, 7] and read["validation"] == [0, 1, 2, 3]
    assert summary["num_classes"] == 1000 and summary["num_test"] == 4 and summary["step"] == 3
    assert summary["num_pool"] == 10 and not any("pool_size" in n for n in summary["notes"])
    # DeiT's evaluation crop (configs/imagenet.py) on images of varying sizes; a pool_size above
    # the split's images takes them all and says so
    with tfds.testing.mock_data(num_examples=10):
        cropped = train_and_evaluate(make_config(**{**config.__dict__, "eval_crop_fraction": 0.875,
                                                    "pool_size": 25}),
                                     tmp_path / "crop", backbone=TinyBackbone())
    assert cropped["num_test"] == 4 and cropped["config"]["eval_crop_fraction"] == 0.875
    assert cropped["num_pool"] == 10 and cropped["notes"][0] == (
        "pool_size 25 is more than the 10 train rows of imagenet2012: the run uses all 10")


def data_parallel_check(tmp_path):
    """Body of test_data_parallel_full_finetune, run in a fresh process by the test."""
    tmp_path = Path(tmp_path)
    sel = _selection(tmp_path, list(range(0, 200, 5)))  # 40 labelled
    base = dict(selection=sel, image_size=16, steps=6, batch_size=8, eval_batch_size=6,
                checkpoint_every=3, log_every=1, pool_size=200, test_size=16, ema_decay=0.5,
                warmup_steps=1)
    one = train_and_evaluate(make_config(**base), tmp_path / "one", backbone=TinyBackbone())
    cfg = make_config(**base, num_devices=8)
    full = train_and_evaluate(cfg, tmp_path / "eight", backbone=TinyBackbone())
    params = full["state"]["params"]
    assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(params))
    for a, b in zip(jax.tree.leaves(one["state"]["params"]), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    assert abs(full["final_accuracy"] - one["final_accuracy"]) <= 1 / 16  # at most one flipped near-tie

    part = train_and_evaluate(cfg, tmp_path / "resumed", backbone=TinyBackbone(), max_steps_this_run=4)
    assert part["interrupted"] and part["step"] == 4
    rest = train_and_evaluate(cfg, tmp_path / "resumed", backbone=TinyBackbone())
    assert rest["resumed_from_step"] == 3
    assert _tree_equal(full["state"], rest["state"])
    assert (tmp_path / "eight" / "metrics.jsonl").read_text() == \
        (tmp_path / "resumed" / "metrics.jsonl").read_text()


def test_data_parallel_full_finetune(tmp_path):
    """num_devices=8 (simulated CPU devices): the state is replicated, each batch split over
    the devices; the run follows the one-device run up to float reduction order, and an
    interrupted data-parallel run resumes exactly.

    In a fresh process: late in a long test session, XLA's CPU compiler has crashed (SIGSEGV)
    compiling this 8-device program, which compiles and runs in a process of its own."""
    _fashion_mnist_or_skip()
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices; see conftest.py")
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import tests.conftest; "
            "from tests.test_train_resume import data_parallel_check; "
            f"data_parallel_check({str(tmp_path)!r})")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_num_devices_checks(tmp_path):
    sel = _selection(tmp_path, [0, 1])
    with pytest.raises(ValueError, match="multiple of num_devices"):
        make_config(selection=sel, batch_size=6, num_devices=4)
    make_config(selection=sel, batch_size=8, eval_batch_size=30, num_devices=4)  # evaluation pads
    with pytest.raises(ValueError, match="num_devices must be a positive integer"):
        make_config(selection=sel, num_devices=0)
    from train.train import _placement

    many = jax.device_count() + 1
    with pytest.raises(ValueError, match=f"num_devices is {many} but only {many - 1} device"):
        _placement(many)
    # Refused before the data are looked for (the folder here does not exist) or a file written.
    cfg = make_config(selection=sel, batch_size=many, num_devices=many,
                      data_dir=str(tmp_path / "absent"))
    with pytest.raises(ValueError, match=f"num_devices is {many} but only"):
        train_and_evaluate(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_each_run_trains_with_its_own_settings_in_one_process(tmp_path):
    """Compiled train steps are cached per process; a run must never get a step compiled for
    another run's label smoothing, EMA, crop scale or image size."""
    _fashion_mnist_or_skip()
    import train.train as tt

    sel = _selection(tmp_path, list(range(0, 80, 4)))
    base = dict(selection=sel, image_size=16, steps=2, batch_size=4, log_every=1,
                pool_size=80, test_size=8, warmup_steps=1, label_smoothing=0.0, ema_decay=0.0)
    variants = {"label_smoothing": 0.4, "ema_decay": 0.5, "crop_scale_min": 0.5,
                "image_size": 24, "nesterov": True, "grad_clip_norm": 0.1,
                "crop_interpolation": "bicubic", "head_init": "normal", "warmup_lr": 1e-3,
                "repeated_augmentation": 2}
    bb = TinyBackbone()
    first = train_and_evaluate(make_config(**base), tmp_path / "base", backbone=bb)
    after_base = {}
    for name, value in variants.items():
        after_base[name] = train_and_evaluate(make_config(**{**base, name: value}),
                                              tmp_path / f"{name}_1", backbone=bb)
    for name, value in variants.items():
        tt._STEP_CACHE.clear()  # as in a fresh process
        alone = train_and_evaluate(make_config(**{**base, name: value}),
                                   tmp_path / f"{name}_2", backbone=bb)
        assert _tree_equal(after_base[name]["state"], alone["state"]), name
        assert not _tree_equal(first["state"], alone["state"]), name  # the setting took effect


def test_eval_every_need_not_align_with_log_every(tmp_path):
    _fashion_mnist_or_skip()
    sel = _selection(tmp_path, list(range(0, 80, 4)))
    cfg = make_config(selection=sel, image_size=16, steps=7, batch_size=4, log_every=2,
                      eval_every=3, pool_size=80, test_size=8, warmup_steps=1)
    train_and_evaluate(cfg, tmp_path / "w", backbone=TinyBackbone())
    recs = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [2, 3, 4, 6, 7]
    assert [r["step"] for r in recs if "eval_accuracy" in r] == [3, 6, 7]
    assert all(np.isfinite(r["train_loss"]) for r in recs)
    # best_accuracy: the best evaluation along the way (the earliest where tied), as the
    # authors' script reports it; final_accuracy is the last.
    summary = json.loads((tmp_path / "w" / "summary.json").read_text())
    evals = [(r["eval_accuracy"], r["step"]) for r in recs if "eval_accuracy" in r]
    best = max(a for a, _ in evals)
    assert summary["best_accuracy"] == best
    assert summary["best_step"] == min(st for a, st in evals if a == best)
    assert summary["final_accuracy"] == evals[-1][0]


def test_full_mode_labels_outside_num_classes_are_an_error(tmp_path):
    _fashion_mnist_or_skip()
    sel = _selection(tmp_path, list(range(0, 80, 4)))
    cfg = make_config(selection=sel, image_size=16, steps=2, batch_size=4, pool_size=80,
                      test_size=8, num_classes=3)
    with pytest.raises(ValueError, match=r"label \d+ outside \[0, 3\)"):
        train_and_evaluate(cfg, tmp_path / "w", backbone=TinyBackbone())
    assert not (tmp_path / "w" / "config.json").exists()


def test_warmup_as_long_as_the_run_is_refused_before_writing(tmp_path):
    _fashion_mnist_or_skip()
    sel = _selection(tmp_path, list(range(0, 80, 4)))  # 20 labelled: 5 steps of 4 an epoch
    cfg = make_config(selection=sel, image_size=16, steps=6, batch_size=4, pool_size=80,
                      test_size=8)  # 5 warm-up epochs = 25 steps
    with pytest.raises(ValueError, match=r"warm-up \(5 warm-up epochs of 5 steps = 25\) is not "
                                         r"shorter than the run \(6 steps\)"):
        train_and_evaluate(cfg, tmp_path / "w", backbone=TinyBackbone())
    assert not (tmp_path / "w").exists()


def test_bad_image_size_for_the_backbone_writes_nothing(tmp_path):
    _fashion_mnist_or_skip()
    from bilaf_jax import backbones

    sel = _selection(tmp_path, list(range(0, 80, 4)))
    cfg = make_config(selection=sel, backbone="vit_s16", backbone_weights="random", image_size=40,
                      steps=2, batch_size=4, pool_size=80, test_size=8, warmup_steps=1)
    bb = backbones.load("vit_s16", "random")
    with pytest.raises(ValueError, match="multiple of 16"):
        train_and_evaluate(cfg, tmp_path / "w", backbone=bb)
    assert not (tmp_path / "w").exists()  # the same command with a good size may use the workdir


def test_ema_averages_batchnorm_statistics_too(tmp_path):
    """As timm's ModelEma: after one step with decay d, every float leaf of the EMA (weights and
    BatchNorm statistics) is d * initial + (1 - d) * trained; RNG state is the live one."""
    _fashion_mnist_or_skip()
    sel = _selection(tmp_path, list(range(0, 80, 4)))
    cfg = make_config(selection=sel, image_size=16, steps=1, batch_size=4, pool_size=80,
                      test_size=8, warmup_steps=0, ema_decay=0.25)
    bb = TinyBackbone()
    init_mean = np.asarray(bb.module.bn.mean[...])
    out = train_and_evaluate(cfg, tmp_path / "w", backbone=bb)
    ema_params, ema_rest = out["state"]["ema"]
    live_rest = out["state"]["rest"]
    mean = ema_rest["backbone"]["bn"]["mean"][...]
    live_mean = live_rest["backbone"]["bn"]["mean"][...]
    assert not np.allclose(live_mean, init_mean)
    np.testing.assert_allclose(mean, 0.25 * init_mean + 0.75 * live_mean, rtol=1e-6, atol=1e-7)
    assert not np.allclose(mean, live_mean)
    assert _tree_equal(ema_rest["backbone"]["drop"], live_rest["backbone"]["drop"])


def _image_folder(root, classes, seed, n=(6, 3)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "test"), n, strict=True):
        for cls in classes[split]:
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                    root / split / cls / f"{i}.png")
    return root


def test_full_mode_workdir_refuses_other_images_but_resumes_on_a_copy(tmp_path):
    """data_dir is a path, not identity: other images in its place are refused, a copy of the
    same images (new file times) resumes."""
    import shutil

    classes = {"train": ["a", "b"], "test": ["a", "b"]}
    folder_a = _image_folder(tmp_path / "A", classes, seed=0)
    folder_b = _image_folder(tmp_path / "B", classes, seed=1)  # same names, other pixels
    folder_c = tmp_path / "C"
    shutil.copytree(folder_a, folder_c, copy_function=shutil.copy)  # file times not kept
    sel = _selection(tmp_path, list(range(12)))
    base = dict(dataset="image_folder", selection=sel, image_size=16, steps=4, batch_size=4,
                warmup_steps=1, checkpoint_every=1, log_every=1)
    whole = train_and_evaluate(make_config(**base, data_dir=str(folder_a)), tmp_path / "whole",
                               backbone=TinyBackbone())
    train_and_evaluate(make_config(**base, data_dir=str(folder_a)), tmp_path / "w",
                       backbone=TinyBackbone(), max_steps_this_run=2)
    with pytest.raises(ValueError, match="different config.*data_sha256"):
        train_and_evaluate(make_config(**base, data_dir=str(folder_b)), tmp_path / "w",
                           backbone=TinyBackbone())
    # another config is refused before any image is read
    from bilaf_jax import data

    def no_reading(*args, **kwargs):
        raise AssertionError("images read")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "load_rows", no_reading)
        with pytest.raises(ValueError, match=r"different config \(steps: 4 -> 5\)"):
            train_and_evaluate(make_config(**{**base, "steps": 5}, data_dir=str(folder_a)),
                               tmp_path / "w", backbone=TinyBackbone())
    resumed = train_and_evaluate(make_config(**base, data_dir=str(folder_c)), tmp_path / "w",
                                 backbone=TinyBackbone())
    assert resumed["resumed_from_step"] == 2
    assert _tree_equal(whole["state"], resumed["state"])


def test_a_class_folder_added_since_is_another_run(tmp_path):
    """An image folder's classes are its class folders: one added (or removed) without any of
    the images read changes the head, not the images' digest. The same command is refused as
    another config (it was an orbax shape error after the workdir was claimed); a workdir
    recorded before the class count resumes."""
    classes = {"train": ["a", "b"], "test": ["a", "b"]}
    folder = _image_folder(tmp_path / "A", classes, seed=0)
    sel = _selection(tmp_path, list(range(12)))
    cfg = make_config(dataset="image_folder", data_dir=str(folder), selection=sel, image_size=16,
                      steps=4, batch_size=4, warmup_steps=1, checkpoint_every=1, log_every=1)
    whole = train_and_evaluate(cfg, tmp_path / "whole", backbone=TinyBackbone())
    wd = tmp_path / "w"
    train_and_evaluate(cfg, wd, backbone=TinyBackbone(), max_steps_this_run=2)
    before = {p.name: p.read_bytes() for p in wd.iterdir() if p.is_file()}
    for split in ("train", "test"):
        (folder / split / "c").mkdir()
    with pytest.raises(ValueError, match=r"different config \(resolved_num_classes: 2 -> 3\)"):
        train_and_evaluate(cfg, wd, backbone=TinyBackbone())
    assert {p.name: p.read_bytes() for p in wd.iterdir() if p.is_file()} == before
    for split in ("train", "test"):
        (folder / split / "c").rmdir()
    record = json.loads((wd / "config.json").read_text())
    del record["identity"]["resolved_num_classes"]
    (wd / "config.json").write_text(json.dumps(record))
    resumed = train_and_evaluate(cfg, wd, backbone=TinyBackbone())
    assert resumed["resumed_from_step"] == 2
    assert _tree_equal(whole["state"], resumed["state"])


def test_a_resume_may_change_the_evaluation_batch_and_checkpoint_interval(tmp_path):
    """eval_batch_size is how many test images go through at once, not what the run computes
    (num_devices already rounds it): a run that ran out of memory evaluating resumes with a
    smaller one, to the uninterrupted run's state, metrics and summary, also where the workdir
    recorded it as identity. So does one given another checkpoint interval."""
    _fashion_mnist_or_skip()
    sel = _selection(tmp_path, list(range(0, 80, 4)))
    base = dict(selection=sel, image_size=16, steps=4, batch_size=4, log_every=1, eval_every=2,
                checkpoint_every=2, pool_size=80, test_size=8, warmup_steps=1)
    whole = train_and_evaluate(make_config(**base), tmp_path / "whole", backbone=TinyBackbone())
    wd = tmp_path / "w"
    train_and_evaluate(make_config(**base), wd, backbone=TinyBackbone(), max_steps_this_run=3)
    record = json.loads((wd / "config.json").read_text())
    record["identity"]["eval_batch_size"] = 256
    (wd / "config.json").write_text(json.dumps(record))
    resumed = train_and_evaluate(make_config(**{**base, "checkpoint_every": 3}, eval_batch_size=3),
                                 wd, backbone=TinyBackbone())
    assert resumed["resumed_from_step"] == 2
    assert _tree_equal(whole["state"], resumed["state"])
    assert (wd / "metrics.jsonl").read_text() == (tmp_path / "whole" / "metrics.jsonl").read_text()
    sa, sb = (json.loads((w / "summary.json").read_text()) for w in (tmp_path / "whole", wd))
    assert {k: v for k, v in sa.items() if k not in ("resumed_from_step", "config")} == \
        {k: v for k, v in sb.items() if k not in ("resumed_from_step", "config")}


def test_full_mode_image_folders_with_other_classes_are_refused(tmp_path):
    folder = _image_folder(tmp_path / "A", {"train": ["a", "b", "c"], "test": ["a", "c"]}, seed=0)
    sel = _selection(tmp_path, list(range(9)))
    cfg = make_config(dataset="image_folder", data_dir=str(folder), selection=sel, image_size=16,
                      steps=2, batch_size=4, warmup_steps=1)
    with pytest.raises(ValueError, match=r"different class folders \(\['a', 'b', 'c'\] vs "
                                         r"\['a', 'c'\]\)"):
        train_and_evaluate(cfg, tmp_path / "w", backbone=TinyBackbone())
    assert not (tmp_path / "w").exists()


def test_epochs_and_warmup_epochs_count_the_same_steps(tmp_path):
    """An epoch is ceil(labelled / batch) steps for the run and its warm-up alike: 20 labels in
    batches of 32, 8 epochs of 1 step with 5 of warm-up, runs 8 steps."""
    _fashion_mnist_or_skip()
    from train.input_pipeline import steps_for_epochs

    assert steps_for_epochs(8, 20, 32) == 8 and steps_for_epochs(20, 500, 32) == 320
    assert steps_for_epochs(0.1, 300, 10) == 3 and steps_for_epochs(0.01, 5, 10) == 1
    sel = _selection(tmp_path, list(range(0, 80, 4)))
    cfg = make_config(selection=sel, image_size=16, epochs=8, warmup_epochs=5, batch_size=32,
                      pool_size=80, test_size=8, log_every=1)
    out = train_and_evaluate(cfg, tmp_path / "w", backbone=TinyBackbone())
    assert out["step"] == 8
    lrs = [r["learning_rate"] for r in map(json.loads, open(tmp_path / "w" / "metrics.jsonl"))
           if "learning_rate" in r]
    assert np.argmax(lrs) == 5  # 5 warm-up steps: step 6 takes the peak rate, schedule(5)
    # a fraction of a warm-up step is a step, as for the run (round() made 2.5 epochs 2 steps)
    cfg = dataclasses.replace(cfg, warmup_epochs=2.5)
    train_and_evaluate(cfg, tmp_path / "half", backbone=TinyBackbone())
    lrs = [r["learning_rate"] for r in map(json.loads, open(tmp_path / "half" / "metrics.jsonl"))
           if "learning_rate" in r]
    assert np.argmax(lrs) == 3


def test_the_authors_recipe_runs_their_epochs_and_resumes_exactly(tmp_path):
    """sampler 'deit' with 3 repeats: 20 labels make epochs of 60 samples, batches of 32 and
    28 (a second compiled step); schedule 'deit' runs epochs + 1 = 3 epochs, 6 steps, at the
    per-epoch rates; a run stopped after the first short batch resumes exactly."""
    _fashion_mnist_or_skip()
    from train.train import deit_learning_rate

    sel = _selection(tmp_path, list(range(0, 80, 4)))
    cfg = make_config(selection=sel, image_size=16, epochs=2, warmup_epochs=1, batch_size=32,
                      pool_size=80, test_size=8, log_every=1, sampler="deit",
                      repeated_augmentation=3, schedule="deit", learning_rate=3e-3,
                      warmup_lr=1e-4, min_lr=1e-5, head_init="normal", checkpoint_every=2,
                      eval_every_epochs=2)
    bb = TinyBackbone()
    full = train_and_evaluate(cfg, tmp_path / "full", backbone=bb)
    assert full["step"] == 6
    recs = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    # after epochs 0 and 2 (0-based, as their `epoch % eval_interval == 0`), at its steps 2, 6
    assert [r["step"] for r in recs if "eval_accuracy" in r] == [2, 6]
    lrs = [r["learning_rate"] for r in recs]
    want = np.asarray(deit_learning_rate(cfg, 2)(jnp.arange(6)))
    np.testing.assert_allclose(lrs, want, rtol=1e-6)
    mid = 1e-5 + 0.5 * (3e-3 - 1e-5)  # the cosine half way (t = 1 of 2 epochs)
    np.testing.assert_allclose(want, [1e-4, 1e-4, 1e-4, 1e-4, mid, mid], rtol=1e-5)
    part = train_and_evaluate(cfg, tmp_path / "part", backbone=bb, max_steps_this_run=2)
    assert part["step"] == 2
    rest = train_and_evaluate(cfg, tmp_path / "part", backbone=bb)
    assert rest["resumed_from_step"] == 2 and _tree_equal(full["state"], rest["state"])
    # and it is another run than the default recipe's
    other = train_and_evaluate(dataclasses.replace(cfg, sampler="wrap"), tmp_path / "wrap",
                               backbone=bb)
    assert not _tree_equal(full["state"], other["state"])


def test_crops_from_the_images_as_stored(tmp_path, monkeypatch):
    """crop_from 'stored': the train step crops Fashion-MNIST's 28 px images themselves (the
    authors' transform on CIFAR's 32 px), not images resized to image_size first; sources of
    varying sizes are refused before anything is written."""
    _fashion_mnist_or_skip()
    import train.input_pipeline as ip
    import train.train as tt

    seen = []
    crop = ip.random_resized_crop_and_flip

    def recording(key, images, **kwargs):
        seen.append((images.shape[1:3], kwargs["out_size"]))
        return crop(key, images, **kwargs)

    monkeypatch.setattr(ip, "random_resized_crop_and_flip", recording)
    monkeypatch.setattr(tt, "_STEP_CACHE", {})  # traced again, with the recording crop
    sel = _selection(tmp_path, list(range(0, 80, 4)))
    base = dict(selection=sel, image_size=16, steps=2, batch_size=4, pool_size=80, test_size=8,
                warmup_steps=1)
    stored = train_and_evaluate(make_config(**base, crop_from="stored"), tmp_path / "s",
                                backbone=TinyBackbone())
    resized = train_and_evaluate(make_config(**base), tmp_path / "r", backbone=TinyBackbone())
    assert seen == [((28, 28), 16), ((16, 16), 16)]
    assert not _tree_equal(stored["state"], resized["state"])
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=10):  # ImageNet images of varying sizes
        cfg = make_config(dataset="imagenet2012", data_dir=str(tmp_path / "tfds"),
                          selection=_selection(tmp_path, [1, 2]), image_size=16, steps=2,
                          batch_size=2, test_size=4, warmup_steps=1, crop_from="stored")
        with pytest.raises(ValueError, match="crop_from 'stored' crops the images as stored, "
                                             "but imagenet2012's differ in size"):
            train_and_evaluate(cfg, tmp_path / "in", backbone=TinyBackbone())
    assert not (tmp_path / "in").exists()


def test_deit_batches_that_do_not_split_over_the_devices_are_refused(tmp_path):
    _fashion_mnist_or_skip()
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices; see conftest.py")
    sel = _selection(tmp_path, list(range(0, 80, 4)))
    cfg = make_config(selection=sel, image_size=16, epochs=1, batch_size=32, pool_size=80,
                      test_size=8, sampler="deit", repeated_augmentation=3, num_devices=8)
    with pytest.raises(ValueError, match=r"batches of \[32, 28\]; 28 does not split over 8 "
                                         "devices"):
        train_and_evaluate(cfg, tmp_path / "w", backbone=TinyBackbone())
    assert not (tmp_path / "w").exists()


def test_a_start_stopped_before_any_result_does_not_claim_the_workdir(tmp_path):
    """A run of another config stopped before its first checkpoint, metrics line or summary
    left nothing to lose: a new config takes the workdir. Once it has a checkpoint, it is
    refused as before."""
    _fashion_mnist_or_skip()
    sel = _selection(tmp_path, list(range(0, 80, 4)))
    base = dict(selection=sel, image_size=16, steps=4, batch_size=4, pool_size=80, test_size=8,
                warmup_steps=1, checkpoint_every=2, log_every=2)
    wd = tmp_path / "w"
    stopped = train_and_evaluate(make_config(**base, seed=1), wd, backbone=TinyBackbone(),
                                 max_steps_this_run=0)
    assert stopped["interrupted"] and (wd / "config.json").exists()
    other = make_config(**base, seed=2)
    halfway = train_and_evaluate(other, wd, backbone=TinyBackbone(), max_steps_this_run=2)
    assert halfway["step"] == 2 and json.loads((wd / "config.json").read_text())["config"]["seed"] == 2
    with pytest.raises(ValueError, match="holds a run of a different config"):
        train_and_evaluate(make_config(**base, seed=1), wd, backbone=TinyBackbone())
    done = train_and_evaluate(other, wd, backbone=TinyBackbone())
    assert done["resumed_from_step"] == 2 and done["step"] == 4


def test_a_workdir_in_use_by_another_process_is_refused(tmp_path):
    """Two processes writing one workdir's checkpoints would corrupt them: the second start
    is refused while the first holds the workdir, and writes nothing."""
    _fashion_mnist_or_skip()
    from bilaf_jax.io import exclusive_lock

    sel = _selection(tmp_path, list(range(0, 80, 4)))
    cfg = make_config(selection=sel, image_size=16, steps=2, batch_size=4, pool_size=80,
                      test_size=8, warmup_steps=1)
    wd = tmp_path / "w"
    wd.mkdir()
    with exclusive_lock(wd / ".lock", "the other run"):  # flock: per open file, so this conflicts
        with pytest.raises(ValueError, match=f"workdir {wd} is in use by another process"):
            train_and_evaluate(cfg, wd, backbone=TinyBackbone())
    assert sorted(p.name for p in wd.iterdir()) == [".lock"]
    assert train_and_evaluate(cfg, wd, backbone=TinyBackbone())["step"] == 2


@pytest.mark.parametrize("mode", ["full", "linear"])
def test_a_workdir_in_use_is_refused_before_the_data_is_read(tmp_path, monkeypatch, mode):
    """The refusal comes at once, not after the images are read and preprocessed (minutes on
    ImageNet) or the probe is fitted, which the run would then throw away."""
    import bilaf_jax.data
    import train.train as tt
    from bilaf_jax.io import exclusive_lock

    def never(*args, **kwargs):
        raise AssertionError("data read although the workdir is in use")

    monkeypatch.setattr(bilaf_jax.data, "data_source", never)
    monkeypatch.setattr(tt, "load_features", never)
    sel = _selection(tmp_path, [0, 1, 2])
    cfg = make_config(mode=mode, selection=sel, steps=2, warmup_steps=1,
                      **({} if mode == "full" else {"features": "pool.npz",
                                                    "test_features": "test.npz"}))
    wd = tmp_path / "w"
    wd.mkdir()
    with exclusive_lock(wd / ".lock", "the other run"):
        with pytest.raises(ValueError, match=f"workdir {wd} is in use by another process"):
            train_and_evaluate(cfg, wd, backbone=TinyBackbone())
    assert sorted(p.name for p in wd.iterdir()) == [".lock"]


def test_a_damaged_checkpoint_is_one_line_and_the_run_kept(tmp_path):
    """A checkpoint damaged on disk (a data file cut short) is named in one line, with what to
    do, and the run's files are left as they were (it was a traceback of hundreds of lines)."""
    _fashion_mnist_or_skip()
    sel = _selection(tmp_path, list(range(0, 80, 4)))
    cfg = make_config(selection=sel, image_size=16, steps=4, batch_size=4, checkpoint_every=2,
                      log_every=1, pool_size=80, test_size=8, warmup_steps=1)
    wd = tmp_path / "w"
    train_and_evaluate(cfg, wd, backbone=TinyBackbone(), max_steps_this_run=3)
    data = [p for p in (wd / "checkpoints" / "2").rglob("*") if p.parent.name == "d"]
    assert data, sorted(p.name for p in (wd / "checkpoints").rglob("*"))
    for path in data:
        path.write_bytes(path.read_bytes()[:40])
    before = {p: p.read_bytes() for p in wd.rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(ValueError, match=r"^checkpoint 2 in .*checkpoints cannot be read \(.*\); "
                                         r"move that folder away to resume from the checkpoint "
                                         r"before it$"):
        train_and_evaluate(cfg, wd, backbone=TinyBackbone())
    assert {p: p.read_bytes() for p in wd.rglob("*") if p.is_file() and p.name != ".lock"} == before
