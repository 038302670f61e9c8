"""A small NNX backbone (a convolution, BatchNorm and dropout) that stands in for a real one in
finetuning tests: EfficientNet-Lite0's train step takes about 20 s to compile on 2 CPU cores
(`python scripts/bench_finetune.py --image-size 64 --batch-size 4 --steps 2`: compile_s)."""

import jax
import jax.numpy as jnp
from flax import nnx


class _TinyNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), strides=2, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)

    def __call__(self, x):
        return self.drop(nnx.relu(self.bn(self.conv(x))).mean((1, 2)))


class TinyBackbone:
    """Stands in for a `bilaf_jax.backbones.Backbone` (BatchNorm and dropout included)."""

    dim = 8
    image_size = 16

    def __init__(self, seed=0):
        self.module = _TinyNet(nnx.Rngs(params=seed, dropout=seed + 1))

    def preprocess(self, images, image_size=None):
        s = image_size or self.image_size
        x = jnp.asarray(images, jnp.float32) / 255.0
        x = jnp.repeat(x, 3, -1) if x.shape[-1] == 1 else x
        return jax.image.resize(x, (x.shape[0], s, s, 3), "bilinear")
