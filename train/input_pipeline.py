"""Training input: deterministic per-step batch order and JAX augmentation (torchvision's
RandomResizedCrop and horizontal flip, as the paper's recipe).

Batch order and augmentation randomness are pure functions of (seed, step), so a run resumed
from a checkpoint at step t sees exactly the batches and crops an uninterrupted run sees.

Data order (`BatchOrder`, sampler "wrap"): positions step * b .. step * b + b - 1 of the
endless stream formed by concatenating epoch lists; the list of epoch e is the permutation
`jax.random.permutation(fold_in(fold_in(key(seed), 0x0DA7A), e), n)`, each row repeated r times
in a row (repeated augmentation, r = 1 by default). `DeitOrder` (sampler "deit") cuts each
epoch's list as the authors' DeiT script's repeated-augmentation sampler does.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


class BatchOrder:
    """Pool-row indices of the batch for a given step: `order(step) -> int64[batch_size]`.

    `repeats`: each row `repeats` times in a row per epoch (repeated augmentation: the copies
    get crops of their own), so an epoch has n * repeats samples."""

    def __init__(self, seed: int, num_examples: int, batch_size: int, repeats: int = 1):
        if num_examples <= 0 or batch_size <= 0 or repeats <= 0:
            raise ValueError("BatchOrder needs num_examples, batch_size and repeats > 0")
        self.key = jax.random.fold_in(jax.random.key(seed), 0x0DA7A)
        self.num_examples = num_examples
        self.repeats = repeats
        self.n = num_examples * repeats  # samples in an epoch's list
        self.batch_size = batch_size
        self._cache: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        """int64[n * repeats]: epoch `epoch`'s list of rows."""
        if epoch not in self._cache:
            if len(self._cache) > 4:
                self._cache.pop(min(self._cache))
            perm = jax.random.permutation(jax.random.fold_in(self.key, epoch), self.num_examples)
            self._cache[epoch] = np.repeat(np.asarray(perm, np.int64), self.repeats)
        return self._cache[epoch]

    def __call__(self, step: int) -> np.ndarray:
        pos = step * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        epochs, offsets = np.divmod(pos, self.n)
        out = np.empty(self.batch_size, np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.permutation(int(e))[offsets[sel]]
        return out


def deit_epoch_samples(num_examples: int, repeats: int, replicas: int = 1) -> int:
    """Samples in an epoch of the repeated-augmentation sampler of the authors' DeiT script
    (its `RASampler`, all `replicas` together): each replica takes
    floor(max(1, n // 256) * 256 / replicas) samples, at most its share of the n * repeats
    copies (the list padded to divide evenly, see `DeitOrder`). So at n <= 511 an epoch is 256
    samples, about 256 / repeats images."""
    selected = max(1, num_examples // 256) * 256 // replicas
    share = -(-num_examples * repeats // replicas)
    return replicas * min(selected, share)


class DeitOrder(BatchOrder):
    """Batches as the authors' DeiT script's sampler gives them, all replicas together: each
    epoch the first `deit_epoch_samples` of its list (`BatchOrder.permutation`, rows repeated,
    then, where `replicas` does not divide its length, its first entries again until it does,
    as their sampler pads), cut into batches of `batch_size` (the global batch: per-device
    batch x devices), the last one smaller. `order(step) -> int64[b]`, b = batch_size but at
    an epoch's end. `replicas`: the GPUs their script would run on (`sampler_replicas`)."""

    def __init__(self, seed: int, num_examples: int, batch_size: int, repeats: int = 1,
                 replicas: int = 1):
        super().__init__(seed, num_examples, batch_size, repeats)
        self.replicas = replicas
        self.epoch_samples = deit_epoch_samples(num_examples, repeats, replicas)
        self.steps_per_epoch = -(-self.epoch_samples // batch_size)

    def batch_sizes(self) -> list[int]:
        """The sizes of an epoch's batches, in order."""
        last = self.epoch_samples - (self.steps_per_epoch - 1) * self.batch_size
        return [self.batch_size] * (self.steps_per_epoch - 1) + [last]

    def __call__(self, step: int) -> np.ndarray:
        epoch, k = divmod(step, self.steps_per_epoch)
        samples = self.permutation(epoch)
        pad = -len(samples) % self.replicas
        if pad:  # their sampler's padding (a copy of the list, so only where it is needed)
            samples = np.concatenate([samples, samples[:pad]])
        return samples[:self.epoch_samples][k * self.batch_size:(k + 1) * self.batch_size]


# Attempts torchvision's RandomResizedCrop makes before its centre-crop fallback.
CROP_ATTEMPTS = 10


def crop_box(key, height: int, width: int, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)):
    """A RandomResizedCrop box `(top, left, h, w)`, int32 scalars, as torchvision samples it.

    Up to `CROP_ATTEMPTS` tries of area fraction ~ U(scale) and log aspect ratio ~ U(log ratio),
    rounded to whole pixels; the first that fits the `height x width` image is placed uniformly
    at random. If none fits: the centre crop of the whole image, its aspect ratio clamped into
    `ratio`.
    """
    k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
    u_area = jax.random.uniform(k_area, (CROP_ATTEMPTS,))
    u_ratio = jax.random.uniform(k_ratio, (CROP_ATTEMPTS,))
    return box_from_uniforms(u_area, u_ratio, jax.random.uniform(k_top), jax.random.uniform(k_left),
                             height, width, scale, ratio)


def box_from_uniforms(u_area, u_ratio, u_top, u_left, height: int, width: int, scale, ratio):
    """`crop_box` given its uniform draws: u_area, u_ratio [attempts], u_top, u_left scalars in [0, 1)."""
    area = height * width * (scale[0] + u_area * (scale[1] - scale[0]))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = jnp.exp(log_lo + u_ratio * (log_hi - log_lo))
    # jnp.round is round-half-to-even, as Python's round.
    ws = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    hs = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
    first = jnp.argmax(fits)
    # Centre-crop fallback, computed in Python: it depends only on the image's shape.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fb_w, fb_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fb_w, fb_h = int(round(height * max(ratio))), height
    else:
        fb_w, fb_h = width, height
    found = fits.any()
    h = jnp.where(found, hs[first], fb_h)
    w = jnp.where(found, ws[first], fb_w)
    # torch.randint(0, n + 1): uniform over the n + 1 placements.
    top = jnp.where(found, jnp.floor(u_top * (height - h + 1)).astype(jnp.int32), (height - fb_h) // 2)
    left = jnp.where(found, jnp.floor(u_left * (width - w + 1)).astype(jnp.int32), (width - fb_w) // 2)
    return top, left, h, w


INTERPOLATIONS = ("bilinear", "bicubic")


def _filter(x, method: str):
    """PIL's resampling filters (as torch's antialiased interpolate): the triangle, or Keys'
    cubic with a = -0.5."""
    x = jnp.abs(x)
    if method == "bilinear":
        return jnp.maximum(0.0, 1.0 - x)
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return jnp.where(x < 1, near, jnp.where(x < 2, far, 0.0))


def resize_weights(start, length, in_size: int, out_size: int, method: str = "bilinear"):
    """[out_size, in_size] weights that resample pixels start .. start + length - 1 of an axis to
    out_size pixels: bilinear or bicubic, antialiased when shrinking (PIL's filters, as torch's
    `interpolate(mode=method, antialias=True)`); pixels outside the crop get no weight.
    """
    if method not in INTERPOLATIONS:
        raise ValueError(f"method must be one of {', '.join(INTERPOLATIONS)}, got {method!r}")
    scale = length / out_size
    filter_scale = jnp.maximum(scale, 1.0)  # the filter widens with the shrink factor
    support = (1.0 if method == "bilinear" else 2.0) * filter_scale
    centre = scale * (jnp.arange(out_size) + 0.5)
    lo = jnp.maximum(jnp.floor(centre - support + 0.5), 0.0)
    hi = jnp.minimum(jnp.floor(centre + support + 0.5), length)
    x = jnp.arange(in_size) - start  # crop-local pixel index
    w = _filter((x[None, :] + 0.5 - centre[:, None]) / filter_scale, method)
    w = jnp.where((x[None, :] >= lo[:, None]) & (x[None, :] < hi[:, None]), w, 0.0)
    return w / w.sum(axis=1, keepdims=True)


@functools.partial(jax.jit, static_argnames=("out_size", "scale_min", "ratio_min", "ratio_max",
                                              "interpolation"))
def random_resized_crop_and_flip(key, images, *, out_size: int, scale_min=0.08,
                                 ratio_min=3.0 / 4.0, ratio_max=4.0 / 3.0,
                                 interpolation: str = "bilinear"):
    """torchvision's RandomResizedCrop(out_size, scale=(scale_min, 1)) + RandomHorizontalFlip, in JAX.

    images: float [b, h, w, c] (already preprocessed/normalised) -> [b, out_size, out_size, c].
    Integer crop boxes as `crop_box`; bilinear or bicubic (DeiT's training crops) resampling of
    the crop alone, antialiased when shrinking (`resize_weights`).
    """
    b, height, width, c = images.shape

    def one(key, image):
        k_box, k_flip = jax.random.split(key)
        top, left, h, w = crop_box(k_box, height, width, (scale_min, 1.0), (ratio_min, ratio_max))
        rows = resize_weights(top, h, height, out_size, interpolation).astype(image.dtype)
        cols = resize_weights(left, w, width, out_size, interpolation).astype(image.dtype)
        out = jnp.einsum("oh,hwc,pw->opc", rows, image, cols)
        flip = jax.random.bernoulli(k_flip)
        return jnp.where(flip, out[:, ::-1], out)

    return jax.vmap(one)(jax.random.split(key, b), images)


def steps_for_epochs(epochs: float, num_examples: int, batch_size: int) -> int:
    """Steps in `epochs` epochs of ceil(n / b) batches each (a data loader's epoch that keeps its
    last, short batch; here every batch is full, taken from the stream), at least 1. The run's
    length and its warm-up both count epochs this way."""
    per_epoch = -(-num_examples // batch_size)
    # rounded first: 0.1 * 30 is 3.0000000000000004 in floating point
    return max(1, math.ceil(round(epochs * per_epoch, 9)))
