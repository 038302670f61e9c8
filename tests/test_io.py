"""Atomic writes and feature loading."""

import json
import os

import numpy as np
import pytest

from bilaf_jax import io


def test_atomic_write_replaces_whole_file_with_plain_permissions(tmp_path):
    path = tmp_path / "sel.json"
    io.write_json_atomic(path, [1, 2, 3])
    assert json.loads(path.read_text()) == [1, 2, 3]
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["sel.json"]


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sel.json"
    io.write_json_atomic(path, [1])
    with pytest.raises(RuntimeError):
        with io.atomic_open(path) as f:
            f.write(b"[2, 3")
            raise RuntimeError("killed")
    assert json.loads(path.read_text()) == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["sel.json"]


def test_load_features_formats_and_errors(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.save(tmp_path / "f.npy", x)
    np.savez(tmp_path / "f.npz", features=x, labels=np.arange(4))
    got, labels = io.load_features(tmp_path / "f.npy")
    np.testing.assert_array_equal(got, x)
    assert labels is None
    got, labels = io.load_features(tmp_path / "f.npz")
    np.testing.assert_array_equal(labels, np.arange(4))
    got, labels = io.load_features(tmp_path / "f.npy", label_column=True)
    np.testing.assert_array_equal(got, x[:, :2])
    np.testing.assert_array_equal(labels, x[:, 2].astype(int))
    (tmp_path / "bad.npy").write_text("not numpy")
    # "bad.npy is not a NumPy .npy/.npz file (it starts with neither ...)", not NumPy's advice
    # to load it as a pickle
    for path, match in [(tmp_path / "missing.npy", "not found"),
                        (tmp_path / "bad.npy", r"bad.npy is not a NumPy .npy/.npz file \(it starts "
                                               r"with neither the .npy header nor a zip archive's\)$"),
                        (tmp_path, "folder")]:
        with pytest.raises(io.InputError, match=match):
            io.load_features(path)
    # object arrays: a whole file that is not numbers (it was called corrupt or not NumPy)
    objects = np.array([[1.0, None]], dtype=object)
    np.save(tmp_path / "obj.npy", objects)
    np.savez(tmp_path / "obj.npz", features=objects)
    for name in ("obj.npy", "obj.npz"):
        with pytest.raises(io.InputError, match="holds an array of Python objects"):
            io.load_features(tmp_path / name)
    np.save(tmp_path / "nan.npy", np.array([[np.nan, 1.0]]))
    with pytest.raises(io.InputError, match="NaN"):
        io.load_features(tmp_path / "nan.npy")


def test_check_identity_reads_a_missing_setting_as_none(tmp_path):
    """A setting added later with default None leaves earlier workdirs usable; any other change
    is refused, naming the setting."""
    rec = tmp_path / "config.json"
    rec.write_text(json.dumps({"identity": {"steps": 5, "lr": 0.1}}))
    io.check_identity(rec, {"steps": 5, "lr": 0.1, "eval_crop_fraction": None}, tmp_path)
    with pytest.raises(io.InputError, match=r"different config \(eval_crop_fraction: None -> 0.875\)"):
        io.check_identity(rec, {"steps": 5, "lr": 0.1, "eval_crop_fraction": 0.875}, tmp_path)
    with pytest.raises(io.InputError, match=r"\(lr: 0.1 -> None\)"):
        io.check_identity(rec, {"steps": 5}, tmp_path)
    # a key recorded only by later versions: compared where the record has it
    later = {"steps": 5, "lr": 0.1, "weights_sha256": "ab"}
    io.check_identity(rec, later, tmp_path, added_later=("weights_sha256",))
    rec.write_text(json.dumps({"identity": {**later, "weights_sha256": "cd"}}))
    with pytest.raises(io.InputError, match=r"\(weights_sha256: 'cd' -> 'ab'\)"):
        io.check_identity(rec, later, tmp_path, added_later=("weights_sha256",))
    rec.write_text(json.dumps({"identity": [5]}))  # was an AttributeError
    with pytest.raises(io.InputError, match="unreadable config.json .its identity is a list"):
        io.check_identity(rec, later, tmp_path)


def test_a_folder_where_the_lock_file_goes_is_named(tmp_path):
    (tmp_path / "x.lock").mkdir()
    with pytest.raises(io.InputError, match=r"features x.npz: its lock file .*x.lock is a folder; remove it"):
        with io.exclusive_lock(tmp_path / "x.lock", "features x.npz"):
            pass
    # any other reason the lock file cannot be opened (a read-only file system, a file where a
    # folder should be) is one line too, not an OSError's traceback
    (tmp_path / "file").write_text("")
    with pytest.raises(io.InputError, match=r"^workdir w: cannot open its lock file .*file/.lock \(Not a directory\)$"):
        with io.exclusive_lock(tmp_path / "file" / ".lock", "workdir w"):
            pass


def test_damaged_files_and_odd_values_are_one_line_input_errors(tmp_path):
    """Each was a traceback or a silent wrong value: a damaged member of a compressed .npz
    (zlib.error), labels beyond 64-bit integers (cast to int64's minimum), a JSON list nested
    thousands deep (RecursionError), a folder given as a list ("not valid JSON"), a config
    that is not a .py file (AttributeError)."""
    x = np.random.default_rng(0).normal(size=(200, 10))
    np.savez_compressed(tmp_path / "c.npz", features=x)
    data = bytearray((tmp_path / "c.npz").read_bytes())
    data[200:400] = bytes(b ^ 0xFF for b in data[200:400])  # inside the compressed array
    (tmp_path / "c.npz").write_bytes(bytes(data))
    with pytest.raises(io.InputError, match=r"c.npz is corrupt \(Error -3 while decompressing"):
        io.load_features(tmp_path / "c.npz")
    for labels in (np.array([1e30, 0.0]), np.array([2**63 + 1, 0], np.uint64)):
        np.savez(tmp_path / "l.npz", features=x[:2], labels=labels)
        with pytest.raises(io.InputError, match="out of the range of class ids"):
            io.load_features(tmp_path / "l.npz")
    np.savez(tmp_path / "l.npz", features=x[:2], labels=np.array([2.0**52, 3.0]))
    np.testing.assert_array_equal(io.load_features(tmp_path / "l.npz")[1], [2**52, 3])
    (tmp_path / "deep.json").write_text("[" * 100_000)
    with pytest.raises(io.InputError, match="deep.json is not valid JSON"):
        io.load_index_list(tmp_path / "deep.json")
    assert io.read_selection_record(tmp_path / "deep.json") is None
    (tmp_path / "deep.meta.json").write_text("[" * 100_000)
    assert io.read_selection_record(tmp_path / "deep.json") is None
    with pytest.raises(io.InputError, match="unreadable deep.json"):
        io.check_identity(tmp_path / "deep.json", {}, tmp_path)
    with pytest.raises(io.InputError, match="exists and is not a selection result"):
        io.check_replaceable(tmp_path / "deep.json", ["indices"], "selection")
    (tmp_path / "folder").mkdir()
    with pytest.raises(io.InputError, match="--labeled path is a folder, not a file"):
        io.load_index_list(tmp_path / "folder", name="--labeled")
    (tmp_path / "cfg.txt").write_text("def get_config():\n    return {}\n")
    with pytest.raises(io.InputError, match=r"cfg.txt is not a Python file \(.py\)"):
        io.call_get_config(tmp_path / "cfg.txt")


@pytest.mark.parametrize("name", ["a" * 250 + ".json", "é" * 120 + ".json", "with spaces ü.json"])
def test_atomic_write_to_a_long_or_unicode_name(tmp_path, name):
    """A name the file system takes, up to its 255 bytes, whose temporary sibling
    `.NAME.xxxxxxxx.tmp` would not fit: the write failed with "File name too long"."""
    path = tmp_path / name
    io.write_json_atomic(path, [1, 2])
    assert json.loads(path.read_text()) == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_arrays_sha256_hashes_dtype_shape_and_bytes():
    import hashlib

    from bilaf_jax.io import arrays_sha256

    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    naive = hashlib.sha256()
    for a in (x, x[:, ::2].copy()):
        naive.update(f"{a.dtype.str}{a.shape}".encode())
        naive.update(a.tobytes())
    assert arrays_sha256(x, x[:, ::2]) == naive.hexdigest()  # a strided view as its copy
    assert arrays_sha256(x) != arrays_sha256(x.reshape(4, 3)) != arrays_sha256(x.astype(np.float64))
    assert arrays_sha256(np.zeros((0, 3), np.float32)) != arrays_sha256(np.zeros((3, 0), np.float32))
