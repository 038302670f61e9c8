"""`bilaf extract` and `bilaf_jax.extract.extract_to_file`: output layout, resume, errors."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from bilaf_jax import backbones, cli
from bilaf_jax.data import load_arrays
from bilaf_jax.extract import extract_to_file, read_meta
from bilaf_jax.io import InputError
from tests.test_data import make_fashion_mnist

# One small configuration throughout, so the jitted forward compiles once per test session.
CFG = dict(dataset="fashion_mnist", split="train", backbone="efficientnet_lite0",
           weights="random", taps=("2",), image_size=32, batch_size=4)
ARGS = ["--dataset", "fashion_mnist", "--split", "train", "--backbone", "efficientnet_lite0",
        "--weights", "random", "--taps", "2", "--image-size", "32", "--batch-size", "4",
        "--no-progress"]


@pytest.fixture
def pool(tmp_path):
    src = tmp_path / "fmnist"
    arrays = make_fashion_mnist(src, n_train=10, n_test=3)
    return {"data_dir": src, "cache_dir": tmp_path / "cache"}, arrays


def bilaf(monkeypatch, *argv):
    monkeypatch.setattr(cli, "COMMANDS", ("extract",))  # independent of the other commands
    return cli.main(["extract", *map(str, argv)])


def test_cli_writes_features_labels_indices_meta(pool, tmp_path, monkeypatch, capsys):
    dirs, arrays = pool
    out = tmp_path / "feats.npz"
    rc = bilaf(monkeypatch, *ARGS, "--data-dir", dirs["data_dir"], "--cache-dir",
               dirs["cache_dir"], "--limit", 7, "--out", out)
    assert rc == 0, capsys.readouterr().err
    with np.load(out, allow_pickle=False) as z:
        features, labels, indices = z["features"], z["labels"], z["indices"]
    assert features.shape == (7, 24) and features.dtype == np.float32
    np.testing.assert_array_equal(labels, arrays["train"][1][:7])
    np.testing.assert_array_equal(indices, np.arange(7))
    meta = read_meta(out)
    assert meta["backbone"] == "efficientnet_lite0" and meta["image_size"] == 32
    assert meta["dataset"] == "fashion_mnist" and meta["split"] == "train" and meta["limit"] == 7
    assert meta["taps"] == ["2"] and meta["weights_sha256"] == "random(seed=0)"
    assert not (tmp_path / "feats.npz.partial").exists()
    # the same numbers as embedding the images directly
    bb = backbones.load("efficientnet_lite0", "random", taps=(2,))
    images = load_arrays("fashion_mnist", "train", limit=7, **dirs).images
    np.testing.assert_allclose(features, bb.embed(images, image_size=32, batch_size=4),
                               rtol=1e-5, atol=1e-5)
    assert "note" not in capsys.readouterr().err
    # A limit above the split's images extracts them all and says so.
    rc = bilaf(monkeypatch, *ARGS, "--data-dir", dirs["data_dir"], "--cache-dir",
               dirs["cache_dir"], "--limit", 25, "--out", tmp_path / "all.npz")
    assert rc == 0
    err = capsys.readouterr().err
    assert ("bilaf extract: note: --limit 25 is more than the 10 images of fashion_mnist train: "
            "all 10 extracted\n") in err, err
    assert read_meta(tmp_path / "all.npz")["num_images"] == 10


def test_a_limit_is_compared_by_the_rows_it_decides(pool, tmp_path):
    """A limit at or above the split's 10 images is no limit: an extraction (finished, or
    stopped part way) with one is the extraction without, and the other way round."""
    dirs, _ = pool
    out = tmp_path / "f.npz"
    _killed_after_two_batches(out, {**dirs, "limit": 25})
    res = extract_to_file(out, progress=False, **CFG, **dirs)
    assert (res.reused_batches, res.computed_batches) == (2, 1)
    finished = out.read_bytes()
    for limit in (None, 10, 40):
        again = extract_to_file(out, progress=False, limit=limit, **CFG, **dirs)
        assert again.computed_batches == 0 and out.read_bytes() == finished
    with pytest.raises(InputError, match=r"other settings \(limit None \(now 9\), num_images "
                                         r"10 \(now 9\)\)"):
        extract_to_file(out, progress=False, limit=9, **CFG, **dirs)


@pytest.mark.parametrize("meta, limit, total, same", [
    ({"limit": 7, "num_images": 7}, 7, None, True),
    ({"limit": 7, "num_images": 7}, 8, None, False),
    ({"limit": 7, "num_images": 7}, None, None, False),  # the split may hold more than 7
    ({"limit": 7, "num_images": 7}, None, 7, True),
    ({"limit": 7, "num_images": 7}, 9, 7, True),
    ({"limit": 7, "num_images": 7}, 6, 7, False),
    ({"limit": 25, "num_images": 10}, None, None, True),  # it stopped short: the whole split
    ({"limit": 25, "num_images": 10}, 10, None, True),
    ({"limit": 25, "num_images": 10}, 9, None, False),
    ({"limit": None, "num_images": 10}, 11, None, True),
    ({"limit": None, "num_images": 10}, 11, 12, False),  # the data says there are 12 now
    ({"limit": None}, 11, None, False),
    ({"limit": "25", "num_images": 10}, None, None, False),
])
def test_same_rows(meta, limit, total, same):
    from bilaf_jax.extract import same_rows

    assert same_rows(meta, limit, total) is same


def test_resume_after_interruption_gives_identical_features(pool, tmp_path):
    dirs, _ = pool
    whole = extract_to_file(tmp_path / "whole.npz", progress=False, **CFG, **dirs)
    assert (whole.reused_batches, whole.computed_batches) == (0, 3)

    out = tmp_path / "resumed.npz"

    def kill_after_second(b):
        if b == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_to_file(out, progress=False, on_batch=kill_after_second, **CFG, **dirs)
    assert not out.exists()  # never a truncated file
    partial = tmp_path / "resumed.npz.partial"
    assert sorted(p.name for p in partial.glob("batch_*.npz")) == [
        "batch_000000.npz", "batch_000001.npz"]
    res = extract_to_file(out, progress=False, **CFG, **dirs)
    assert (res.reused_batches, res.computed_batches) == (2, 1)
    assert not partial.exists()
    # batches read in the caller's thread give what reading ahead in threads gave
    extract_to_file(tmp_path / "one.npz", progress=False, read_workers=1, **CFG, **dirs)
    for other in (out, tmp_path / "one.npz"):
        with np.load(other) as a, np.load(tmp_path / "whole.npz") as b:
            for key in ("features", "labels", "indices"):
                np.testing.assert_array_equal(a[key], b[key])


def _stop_after_two_batches(b):
    """on_batch: Ctrl-C once batches 0 and 1 are on disk."""
    if b == 1:
        raise KeyboardInterrupt


def _killed_after_two_batches(out, dirs):
    """Start an extraction to `out` and stop it as `_stop_after_two_batches` does; returns
    the partial folder."""
    with pytest.raises(KeyboardInterrupt):
        extract_to_file(out, progress=False, on_batch=_stop_after_two_batches, **CFG, **dirs)
    return out.with_name(out.name + ".partial")


def test_corrupt_shard_is_recomputed_and_other_settings_refused(pool, tmp_path):
    dirs, _ = pool
    out = tmp_path / "f.npz"
    partial = _killed_after_two_batches(out, dirs)
    (partial / "batch_000000.npz").write_bytes(b"half a file")
    res = extract_to_file(out, progress=False, **CFG, **dirs)
    assert (res.reused_batches, res.computed_batches) == (1, 2)
    finished = out.read_bytes()
    cfg = dict(CFG, seed=1)  # other weights
    # A finished file is reused by the same settings and not overwritten by others.
    again = extract_to_file(out, progress=False, on_batch=_stop_after_two_batches, **CFG, **dirs)
    assert again.computed_batches == 0 and out.read_bytes() == finished
    with pytest.raises(InputError, match=r"f.npz holds features extracted with other settings "
                       r"\(weights_sha256 'random\(seed=0\)' \(now 'random\(seed=1\)'\)\); "
                       "remove it or choose another output path"):
        extract_to_file(out, progress=False, **cfg, **dirs)
    assert out.read_bytes() == finished
    out.unlink()
    with pytest.raises(KeyboardInterrupt):
        extract_to_file(out, progress=False, on_batch=_stop_after_two_batches, **CFG, **dirs)
    # An unfinished extraction's shards are neither reused nor discarded by other settings.
    before = sorted(p.read_bytes() for p in partial.iterdir())
    with pytest.raises(InputError, match=r"f.npz.partial holds 2 finished batches of an "
                       r"extraction with other settings \(weights_sha256 'random\(seed=0\)' "
                       r"\(now 'random\(seed=1\)'\)\); finish .* or remove the folder"):
        extract_to_file(out, progress=False, **cfg, **dirs)
    assert sorted(p.read_bytes() for p in partial.iterdir()) == before and not out.exists()
    shutil.rmtree(partial)
    res = extract_to_file(out, progress=False, **cfg, **dirs)
    assert res.reused_batches == 0
    assert json.loads(str(np.load(out)["meta"]))["weights_sha256"] == "random(seed=1)"
    with pytest.raises(InputError, match="output must be a .npz file"):
        extract_to_file(tmp_path / "f.npy", progress=False, **CFG, **dirs)


def test_a_loaded_random_backbone_is_recorded_with_its_own_seed(pool, tmp_path):
    dirs, _ = pool
    cfg = {k: v for k, v in CFG.items() if k not in ("backbone", "weights", "taps")}
    bb = backbones.load("efficientnet_lite0", "random", taps=(2,), seed=3)
    extract_to_file(tmp_path / "obj.npz", backbone=bb, progress=False, **cfg, **dirs)
    assert read_meta(tmp_path / "obj.npz")["weights_sha256"] == "random(seed=3)"  # was seed=0
    extract_to_file(tmp_path / "name.npz", progress=False, **dict(CFG, seed=3), **dirs)
    with np.load(tmp_path / "obj.npz") as a, np.load(tmp_path / "name.npz") as b:
        np.testing.assert_array_equal(a["features"], b["features"])
    # so the seed-0 extraction does not take them for its own
    with pytest.raises(InputError, match=r"random\(seed=3\)' \(now 'random\(seed=0\)'\)"):
        extract_to_file(tmp_path / "obj.npz", progress=False, **CFG, **dirs)


def test_a_backbone_trained_in_place_is_not_recorded_as_its_weights(pool, tmp_path):
    """Features of a module whose parameters changed after loading (trained in place) record
    a digest of the weights it holds, not the weight file (or random init) it was loaded from:
    a run asking for those weights does not take them for its own."""
    dirs, _ = pool
    cfg = {k: v for k, v in CFG.items() if k not in ("backbone", "weights", "taps")}
    bb = backbones.load("efficientnet_lite0", "random", taps=(2,), seed=3)
    mean = bb.module._bn0.mean
    made = mean[...]
    mean[...] = made + 1.0  # as a train step's BatchNorm update
    extract_to_file(tmp_path / "trained.npz", backbone=bb, progress=False, **cfg, **dirs)
    changed = read_meta(tmp_path / "trained.npz")["weights_sha256"]
    assert changed.startswith("changed:") and changed == bb.weights_id()
    # a Backbone rebuilt around the trained module still knows it changed
    assert dataclasses.replace(bb, taps=(2,)).weights_id() == changed
    with pytest.raises(InputError, match=r"weights_sha256 'changed:[0-9a-f]{64}' \(now "
                                         r"'random\(seed=3\)'\)"):
        extract_to_file(tmp_path / "trained.npz", progress=False, **dict(CFG, seed=3), **dirs)
    mean[...] = made + 0.0  # other arrays, the same values: the weights as loaded
    assert bb.weights_id() == "random(seed=3)"


def _unsupported_compression(raw: bytes) -> bytes:
    """An npz whose members name a compression method zipfile cannot read (damaged fields)."""
    raw, i = bytearray(raw), 0
    while (i := raw.find(b"PK\x01\x02", i)) >= 0:  # each central directory entry
        raw[i + 10: i + 12] = (99).to_bytes(2, "little")
        i += 4
    return bytes(raw)


def test_damaged_output_or_shard_is_one_line_error_or_recomputed(pool, tmp_path, monkeypatch,
                                                                  capsys):
    dirs, _ = pool
    out = tmp_path / "f.npz"
    shard = _killed_after_two_batches(out, dirs) / "batch_000000.npz"
    shard.write_bytes(_unsupported_compression(shard.read_bytes()))  # was NotImplementedError
    res = extract_to_file(out, progress=False, **CFG, **dirs)
    assert (res.reused_batches, res.computed_batches) == (1, 2)
    finished = out.read_bytes()
    argv = ARGS + ["--data-dir", dirs["data_dir"], "--cache-dir", dirs["cache_dir"]]
    capsys.readouterr()
    for name, content in (("empty.npz", b""),  # `touch`ed, or a failed copy: was an EOFError
                          ("method.npz", _unsupported_compression(finished)),
                          ("list.npz", None)):
        path = tmp_path / name
        if content is None:  # another program's npz with a "meta" that is no object
            np.savez(path, meta=np.asarray("[1, 2]"))
        else:
            path.write_bytes(content)
        rc = bilaf(monkeypatch, *argv, "--out", path)
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1, err
        assert f"{path} exists and is not a feature file written by `bilaf extract`" in err, err
        with pytest.raises(InputError, match="has no readable extraction metadata"):
            read_meta(path)


def test_interrupted_cli_exits_130_without_output(pool, tmp_path, monkeypatch, capsys):
    dirs, _ = pool
    import bilaf_jax.backbones as bbs

    real = bbs.make_embedder

    def failing_embedder(*a, **k):
        run = real(*a, **k)
        calls = []

        def f(x):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return run(x)

        return f

    monkeypatch.setattr(bbs, "make_embedder", failing_embedder)
    out = tmp_path / "f.npz"
    rc = bilaf(monkeypatch, *ARGS, "--data-dir", dirs["data_dir"], "--cache-dir",
               dirs["cache_dir"], "--out", out)
    assert rc == 130 and not out.exists()
    assert len(list((tmp_path / "f.npz.partial").glob("batch_*.npz"))) == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dataset", "mnist"], "unknown dataset 'mnist'"),
        (["--backbone", "resnet"], "unknown backbone 'resnet'"),
        (["--taps", "2,neck"], "bad tap"),
        (["--weights", "/no/such/file.pth"], "weight file not found"),
        (["--split", "validation"], "no split 'validation'"),
        (["--image-size", "0"], "positive integer"),
        (["--batch-size", "x"], "positive integer"),
        (["--read-workers", "0"], "positive integer"),
        (["--out", "/no/such/folder/f.npz"], "output folder does not exist"),
        (["--data-dir", "/no/such/dir"], "apt-get install dataset-fashion-mnist"),
        (["--backbone", "vit_s16", "--taps", "head"], "vit_s16 has no taps"),
    ],
)
def test_bad_inputs_are_one_line_exit_2(pool, tmp_path, monkeypatch, capsys, extra, message):
    dirs, _ = pool
    argv = ARGS + ["--data-dir", dirs["data_dir"], "--cache-dir", dirs["cache_dir"],
                   "--out", tmp_path / "f.npz"] + extra
    with pytest.raises(SystemExit) if extra[0] in ("--image-size", "--batch-size", "--read-workers") \
            else _no_raise() as exit_info:
        rc = bilaf(monkeypatch, *argv)
    if exit_info is not None and hasattr(exit_info, "value"):
        rc = exit_info.value.code
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    # (TFDS may draw its progress bars first while it prepares the data)
    assert message in err.splitlines()[-1] and "Traceback" not in err, err
    assert not (tmp_path / "f.npz").exists()


class _no_raise:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_library_errors(pool, tmp_path):
    dirs, _ = pool
    with pytest.raises(InputError, match="output path is a folder"):
        extract_to_file(tmp_path, progress=False, **CFG, **dirs)
    with pytest.raises(InputError, match="limit"):
        extract_to_file(tmp_path / "f.npz", progress=False, limit=0, **CFG, **dirs)
    with pytest.raises(InputError, match="read_workers"):
        extract_to_file(tmp_path / "f.npz", progress=False, read_workers=0, **CFG, **dirs)


def test_output_inside_the_data_folder_is_refused(pool, tmp_path):
    """An --out among the data's own files would destroy one (an IDX file) or add to the data
    (a file in an image folder's class)."""
    dirs, _ = pool
    idx_file = next(dirs["data_dir"].iterdir())
    before = idx_file.read_bytes()
    for out, match in ((idx_file, "output must be a .npz file"),
                       (dirs["data_dir"] / "features.npz", "inside the data folder .* an input")):
        with pytest.raises(InputError, match=match):
            extract_to_file(out, progress=False, **CFG, **dirs)
    assert idx_file.read_bytes() == before
    assert not (dirs["data_dir"] / "features.npz").exists()
    assert not (dirs["data_dir"] / ".features.npz.lock").exists()  # nothing added to the data


def test_image_folder_of_mixed_sizes(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, n in (("a", 3), ("b", 2)):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(n):
            mode_shape = (20 + 3 * i, 17, 3) if i % 2 else (15, 22)  # RGB and grey
            arr = rng.integers(0, 256, mode_shape, dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / cls / f"{i}.png")
    cfg = dict(CFG, dataset="image_folder", split="all")
    res = extract_to_file(tmp_path / "f.npz", data_dir=tmp_path / "imgs", progress=False, **cfg)
    assert res.num_images == 5
    with np.load(tmp_path / "f.npz") as z:
        assert z["features"].shape == (5, 24) and np.isfinite(z["features"]).all()
        np.testing.assert_array_equal(z["labels"], [0, 0, 0, 1, 1])
    assert read_meta(tmp_path / "f.npz")["class_names"] == ["a", "b"]
    with pytest.raises(InputError, match="inside the data folder"):
        extract_to_file(tmp_path / "imgs" / "a" / "f.npz", data_dir=tmp_path / "imgs",
                        progress=False, **cfg)
    assert sorted(p.name for p in (tmp_path / "imgs" / "a").iterdir()) == ["0.png", "1.png", "2.png"]


def test_an_unreadable_image_leaves_no_partial_folder(tmp_path):
    """An error before any batch is finished leaves nothing to resume from: no partial folder
    holding only its config.json."""
    from PIL import Image

    (tmp_path / "imgs" / "a").mkdir(parents=True)
    Image.new("L", (9, 9)).save(tmp_path / "imgs" / "a" / "0.png")
    (tmp_path / "imgs" / "a" / "1.png").write_text("not an image")
    out = tmp_path / "f.npz"
    with pytest.raises(InputError, match="1.png"):
        extract_to_file(out, data_dir=tmp_path / "imgs", progress=False,
                        **dict(CFG, dataset="image_folder", split="all"))
    assert not out.exists() and not out.with_name("f.npz.partial").exists()


def test_a_partial_folder_left_beside_the_finished_file_goes_on_the_rerun(pool, tmp_path,
                                                                           monkeypatch):
    """A kill after the final file is written and before its partial folder is removed (also
    half way through removing it): the rerun finds the file finished and removes the folder.
    One of other settings stays."""
    import bilaf_jax.extract as ex

    dirs, _ = pool
    out = tmp_path / "f.npz"
    partial = out.with_name("f.npz.partial")

    def killed(path, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ex.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        extract_to_file(out, progress=False, **CFG, **dirs)
    monkeypatch.undo()
    assert out.is_file() and len(list(partial.glob("batch_*.npz"))) == 3
    finished = out.read_bytes()
    res = extract_to_file(out, progress=False, **CFG, **dirs)
    assert res.computed_batches == 0 and not partial.exists() and out.read_bytes() == finished
    partial.mkdir()  # half removed: no config.json
    (partial / "batch_000001.npz").write_bytes(b"a batch")
    extract_to_file(out, progress=False, **CFG, **dirs)
    assert not partial.exists()
    partial.mkdir()
    (partial / "config.json").write_text(json.dumps({"image_size": 64}))
    extract_to_file(out, progress=False, **CFG, **dirs)
    assert (partial / "config.json").exists()


def test_unfinished_batches_resume_after_the_weights_file_moved(tmp_path):
    """The same weights at another path (a new venv, a moved file) are the same settings; other
    weights are not."""
    from bilaf_jax.extract import _prepare_partial

    partial = tmp_path / "f.npz.partial"
    config = {"weights_sha256": "a" * 64, "weights_path": "/old/w.pth", "image_size": 32}
    _prepare_partial(partial, config)
    (partial / "batch_000000.npz").write_bytes(b"a finished batch")
    moved = dict(config, weights_path="/new/w.pth")
    _prepare_partial(partial, moved)
    assert json.loads((partial / "config.json").read_text()) == moved
    assert (partial / "batch_000000.npz").read_bytes() == b"a finished batch"
    with pytest.raises(InputError, match=r"weights_sha256 'a+' \(now 'b+'\)\); finish"):
        _prepare_partial(partial, dict(moved, weights_sha256="b" * 64, weights_path="/x.pth"))
    assert json.loads((partial / "config.json").read_text()) == moved


def test_imagenet_through_mocked_tfds(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    cfg = dict(CFG, dataset="imagenet2012", split="validation")
    with tfds.testing.mock_data(num_examples=5):
        res = extract_to_file(tmp_path / "f.npz", cache_dir=tmp_path, progress=False, **cfg)
    assert res.num_images == 5
    with np.load(tmp_path / "f.npz") as z:
        assert z["features"].shape == (5, 24) and z["labels"].min() >= 0


def test_temp_files_of_a_killed_final_write_are_removed(pool, tmp_path):
    import tempfile
    from pathlib import Path

    dirs, _ = pool
    out = tmp_path / "feats.npz"
    # what a kill inside io.atomic_open's final write of `out` leaves: its temp, by its own naming
    fd, stale = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=tmp_path)
    with open(fd, "wb") as f:
        f.write(b"PK\x03\x04" + b"\0" * 1000)
    keep = [tmp_path / name for name in (
        ".other.npz.abcd1234.tmp", "feats.npz.abcd1234.tmp", ".feats.npz.abcd1234.tmp.keep",
        ".feats.npz.x.abcd1234.tmp", ".feats.npz.abcd12345.tmp", "notes.tmp")]
    for p in keep:
        p.write_text("mine")
    extract_to_file(out, progress=False, limit=4, **CFG, **dirs)
    assert out.is_file() and not Path(stale).exists()
    assert all(p.read_text() == "mine" for p in keep)


def test_temp_files_of_a_killed_final_write_to_a_long_name_are_removed(pool, tmp_path):
    """A name near the length limit: atomic_open cuts its temp's prefix short, and the
    clean-up looks for that prefix."""
    import tempfile
    from pathlib import Path

    from bilaf_jax.io import temp_prefix

    dirs, _ = pool
    out = tmp_path / ("f" * 241 + ".npz")  # 245 bytes: its lock and .partial names still fit
    fd, stale = tempfile.mkstemp(prefix=temp_prefix(out.name, tmp_path), suffix=".tmp", dir=tmp_path)
    with open(fd, "wb") as f:
        f.write(b"PK\x03\x04" + b"\0" * 1000)
    extract_to_file(out, progress=False, limit=4, **CFG, **dirs)
    assert out.is_file() and not Path(stale).exists()
    # A name whose .partial folder would not fit: one line, nothing written.
    longer = tmp_path / ("g" * 246 + ".npz")
    with pytest.raises(InputError, match="output name too long"):
        extract_to_file(longer, progress=False, limit=4, **CFG, **dirs)
    assert not any(p.name.startswith(".g") or p.name.startswith("g") for p in tmp_path.iterdir())


def test_a_second_extraction_to_the_same_output_is_refused(pool, tmp_path):
    import subprocess
    import sys
    import textwrap

    dirs, _ = pool
    out = tmp_path / "f.npz"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from bilaf_jax.io import exclusive_lock
        with exclusive_lock({str(tmp_path / '.f.npz.lock')!r}, "x"):
            print("held", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InputError, match=f"output {out} is in use by another process"):
            extract_to_file(out, progress=False, **CFG, **dirs)
        assert not out.exists() and not (tmp_path / "f.npz.partial").exists()
    finally:
        holder.kill()
        holder.wait()
    extract_to_file(out, progress=False, **CFG, **dirs)  # the lock died with its holder
    assert out.exists()


def test_partial_of_another_preprocessing_says_to_remove_it(tmp_path):
    """Batches made with a resize or normalisation this version no longer has cannot be
    finished with their own settings: the refusal says to remove them."""
    from bilaf_jax.extract import _prepare_partial

    partial = tmp_path / "f.npz.partial"
    old = {"backbone": "efficientnet_lite0", "resize": "bilinear", "mean": [0.485] * 3}
    _prepare_partial(partial, old)
    (partial / "batch_000000.npz").write_bytes(b"x")
    with pytest.raises(InputError, match=r"preprocessing or the data changed since .*: remove "
                                         r"the folder to start over"):
        _prepare_partial(partial, {**old, "resize": "bicubic"})
    with pytest.raises(InputError, match="finish that extraction with its own settings"):
        _prepare_partial(partial, {**old, "backbone": "vit_s16"})
    # another split is another source, and a flag of the run, not an earlier version's
    with pytest.raises(InputError, match="finish that extraction with its own settings"):
        _prepare_partial(partial, {**old, "split": "test", "source": "another"})


def test_selection_check_treats_image_folder_all_as_train(tmp_path):
    from bilaf_jax.extract import check_selection_pool

    sel = tmp_path / "sel.json"
    sel.write_text("[0, 1]")
    record = {"features": {"pool": {"dataset": "image_folder", "split": "all",
                                    "source": "image_folder/aaa"}}}
    (tmp_path / "sel.meta.json").write_text(json.dumps(record))
    # the same folder read as "train", copied (other file times, another fingerprint)
    check_selection_pool(sel, {"dataset": "image_folder", "split": "train",
                               "source": "image_folder/bbb"}, "the pool")
    with pytest.raises(InputError, match="selected on dataset 'image_folder'"):
        check_selection_pool(sel, {"dataset": "mnist_5k", "split": "train", "source": None},
                             "the pool")
    with pytest.raises(InputError, match="selected on split 'train'"):
        check_selection_pool(sel, {"dataset": "image_folder", "split": "val", "source": None},
                             "the pool")
