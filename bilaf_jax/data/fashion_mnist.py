"""A TFDS builder for Fashion-MNIST from local IDX gzip files (no network, no TensorFlow).

tfds' own `fashion_mnist` builder downloads and checks gzip checksums that the Debian package
`dataset-fashion-mnist` does not match, so this builder reads the four IDX files from a local
folder (the builder's manual dir) and writes array_record, readable with `as_data_source`.

The builder config is named after a digest of the four source files, so a changed or replaced
source is prepared afresh instead of silently reusing stale cached data.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from bilaf_jax.data._builders import grey_28x28_info
from bilaf_jax.data.idx import read_idx
from bilaf_jax.io import InputError, sha256_file

CLASS_NAMES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
HOW_TO_GET = (
    "install the Debian package (apt-get install dataset-fashion-mnist, files in "
    "/usr/share/datasets/fashion-mnist) or pass the folder holding the four IDX .gz files with "
    "--data-dir / data_dir= / BILAF_FASHION_MNIST_DIR"
)


def source_files(source_dir) -> dict[str, tuple[Path, Path]]:
    """The (images, labels) paths of each split; a one-line error if any is missing."""
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise InputError(f"Fashion-MNIST folder not found: {source_dir}; {HOW_TO_GET}")
    out = {}
    for split, names in SPLIT_FILES.items():
        paths = tuple(source_dir / n for n in names)
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise InputError(
                f"Fashion-MNIST file {missing[0]} missing in {source_dir}; {HOW_TO_GET}"
            )
        out[split] = paths
    return out


def source_digest(source_dir) -> str:
    """sha256 over the four source files' sha256 digests (identifies the exact source data)."""
    h = hashlib.sha256()
    for images, labels in source_files(source_dir).values():
        h.update(sha256_file(images).encode())
        h.update(sha256_file(labels).encode())
    return h.hexdigest()


def read_split(images_path, labels_path) -> tuple[np.ndarray, np.ndarray]:
    """Validated (images uint8 [n, 28, 28], labels int32 [n]) of one split."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise InputError(
            f"{images_path}: expected uint8 images [n, 28, 28], got {images.dtype} {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise InputError(
            f"{labels_path}: expected uint8 labels [n], got {labels.dtype} {labels.shape}"
        )
    if images.shape[0] == 0:  # TFDS cannot write an empty split (an AssertionError)
        raise InputError(f"{images_path} holds no images")
    if labels.shape[0] != images.shape[0]:
        raise InputError(
            f"{labels_path} holds {labels.shape[0]} labels, "
            f"{images_path} {images.shape[0]} images"
        )
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise InputError(
            f"{labels_path}: label {int(labels.max())} out of range [0, {len(CLASS_NAMES)})"
        )
    return images, labels.astype(np.int32)


class BilafFashionMnist(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST (Xiao et al. 2017) from local IDX files; 28x28 grey, 10 classes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Local IDX gzip files, array_record."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = HOW_TO_GET

    def _info(self) -> tfds.core.DatasetInfo:
        return grey_28x28_info(self, tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                               "https://github.com/zalandoresearch/fashion-mnist")

    def _split_generators(self, dl_manager):
        files = source_files(dl_manager.manual_dir)
        return {split: self._generate_examples(*paths) for split, paths in files.items()}

    def _generate_examples(self, images_path, labels_path):
        images, labels = read_split(images_path, labels_path)
        for i in range(images.shape[0]):
            yield i, {"image": images[i, :, :, None], "label": int(labels[i])}
