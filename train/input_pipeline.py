"""Training input: deterministic per-step batch order and JAX augmentation.

Batch order and augmentation randomness are pure functions of (seed, step), so a run resumed
from a checkpoint at step t sees exactly the batches and crops an uninterrupted run sees.

Data order: positions step * b .. step * b + b - 1 of the endless stream formed by
concatenating epoch permutations; the permutation of epoch e is
`jax.random.permutation(fold_in(key(seed), e), n)`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


class BatchOrder:
    """Pool-row indices of the batch for a given step: `order(step) -> int64[batch_size]`."""

    def __init__(self, seed: int, num_examples: int, batch_size: int):
        if num_examples <= 0 or batch_size <= 0:
            raise ValueError("BatchOrder needs num_examples > 0 and batch_size > 0")
        self.key = jax.random.fold_in(jax.random.key(seed), 0x0DA7A)
        self.n = num_examples
        self.batch_size = batch_size
        self._cache: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) > 4:
                self._cache.pop(min(self._cache))
            perm = jax.random.permutation(jax.random.fold_in(self.key, epoch), self.n)
            self._cache[epoch] = np.asarray(perm)
        return self._cache[epoch]

    def __call__(self, step: int) -> np.ndarray:
        pos = step * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        epochs, offsets = np.divmod(pos, self.n)
        out = np.empty(self.batch_size, np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.permutation(int(e))[offsets[sel]]
        return out


def _crop_box(key, height: int, width: int, scale, log_ratio):
    """Sample a RandomResizedCrop box (y0, x0, h, w) as floats.

    Area fraction ~ U(scale), log aspect ratio ~ U(log_ratio); the box is clipped to the image
    (torchvision instead retries up to 10 times and then falls back to a centre crop).
    """
    k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
    area = height * width * jax.random.uniform(k_area, minval=scale[0], maxval=scale[1])
    ratio = jnp.exp(jax.random.uniform(k_ratio, minval=log_ratio[0], maxval=log_ratio[1]))
    w = jnp.clip(jnp.sqrt(area * ratio), 1.0, width)
    h = jnp.clip(jnp.sqrt(area / ratio), 1.0, height)
    y0 = jax.random.uniform(k_y) * (height - h)
    x0 = jax.random.uniform(k_x) * (width - w)
    return y0, x0, h, w


@functools.partial(jax.jit, static_argnames=("out_size",))
def random_resized_crop_and_flip(key, images, *, out_size: int, scale_min=0.08,
                                 ratio_min=3.0 / 4.0, ratio_max=4.0 / 3.0):
    """RandomResizedCrop + horizontal flip (p = 0.5) of a batch, in JAX.

    images: float [b, h, w, c] (already preprocessed/normalised) -> [b, out_size, out_size, c].
    Bilinear resampling (antialiased when shrinking) via `jax.image.scale_and_translate`.
    """
    b, height, width, c = images.shape
    scale = (scale_min, 1.0)
    log_ratio = (jnp.log(ratio_min), jnp.log(ratio_max))

    def one(key, image):
        k_box, k_flip = jax.random.split(key)
        y0, x0, h, w = _crop_box(k_box, height, width, scale, log_ratio)
        sy, sx = out_size / h, out_size / w
        out = jax.image.scale_and_translate(
            image, (out_size, out_size, c), (0, 1), jnp.stack([sy, sx]),
            jnp.stack([-y0 * sy, -x0 * sx]), method="linear", antialias=True)
        flip = jax.random.bernoulli(k_flip)
        return jnp.where(flip, out[:, ::-1], out)

    return jax.vmap(one)(jax.random.split(key, b), images)


def steps_for_epochs(epochs: float, num_examples: int, batch_size: int) -> int:
    return max(1, math.ceil(epochs * num_examples / batch_size))
