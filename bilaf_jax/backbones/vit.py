"""ViT-S/16 (DeiT-S layout, as trained by DINO, Caron et al. 2021) as a Flax NNX module.

Matches DINO's `vision_transformer.py`: 16x16 patch conv, CLS token, learned position embedding
(resized for other input sizes as DINO's `interpolate_pos_encoding`: torch's bicubic, a = -0.75,
with scale factor (g + 0.1) / 14 for a g x g patch grid), pre-norm blocks (LayerNorm eps 1e-6, 6-head
attention with qkv bias, GELU MLP x4), final LayerNorm. The embedding is the CLS token after the
final LayerNorm (384-d). There is no classifier head.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bilaf_jax.backbones.torch_pickle import StateDictReader
from bilaf_jax.io import InputError

LN_EPS = 1e-6


class Attention(nnx.Module):
    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, x):
        b, n, d = x.shape
        hd = d // self.heads
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [b, n, h, hd]
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (hd**-0.5)
        att = jax.nn.softmax(att, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, n, d)
        return self.proj(out)


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(dim, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float, *,
                 rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, epsilon=LN_EPS, rngs=rngs)
        self.attn = Attention(dim, heads, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, epsilon=LN_EPS, rngs=rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), rngs=rngs)
        # Stochastic depth for finetuning; identity in eval mode or at rate 0.
        self.drop_path = nnx.Dropout(drop_path, broadcast_dims=(1, 2), rngs=rngs)

    def __call__(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nnx.Module):
    """`module(x)`: preprocessed f32 [b, s, s, 3] (s a multiple of `patch`) -> CLS f32 [b, dim]."""

    def __init__(self, *, patch: int = 16, dim: int = 384, depth: int = 12, heads: int = 6,
                 mlp_ratio: float = 4.0, train_size: int = 224, drop_path: float = 0.0,
                 rngs: nnx.Rngs):
        self.patch, self.dim, self.train_size = patch, dim, train_size
        self.patch_embed = nnx.Conv(3, dim, (patch, patch), strides=patch, padding="VALID",
                                    rngs=rngs)
        grid = train_size // patch
        init = nnx.initializers.truncated_normal(0.02)
        self.cls_token = nnx.Param(init(rngs.params(), (1, 1, dim)))
        self.pos_embed = nnx.Param(init(rngs.params(), (1, grid * grid + 1, dim)))
        self.blocks = nnx.List([Block(dim, heads, mlp_ratio, 0.0, rngs=rngs) for _ in range(depth)])
        self.set_drop_path(drop_path)
        self.norm = nnx.LayerNorm(dim, epsilon=LN_EPS, rngs=rngs)

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth rising linearly from 0 (first block) to `rate` (last), as DeiT."""
        depth = len(self.blocks)
        for i, block in enumerate(self.blocks):
            block.drop_path.rate = rate * i / max(depth - 1, 1)

    def _pos_embed(self, gh: int, gw: int):
        pos = self.pos_embed[...]
        grid = int(round((pos.shape[1] - 1) ** 0.5))
        if (gh, gw) == (grid, grid):
            return pos
        patch_pos = pos[0, 1:].reshape(grid, grid, self.dim)
        rows, cols = dino_resize_matrix(grid, gh), dino_resize_matrix(grid, gw)
        patch_pos = jnp.einsum("oi,pj,ijd->opd", rows, cols, patch_pos,
                               precision=jax.lax.Precision.HIGHEST)
        return jnp.concatenate([pos[:, :1], patch_pos.reshape(1, gh * gw, self.dim)], axis=1)

    def tokens(self, x):
        """All tokens after the final LayerNorm, [b, 1 + (s/patch)^2, dim]."""
        b = x.shape[0]
        h = self.patch_embed(x)  # [b, gh, gw, dim]
        gh, gw = h.shape[1], h.shape[2]
        h = h.reshape(b, gh * gw, self.dim)
        cls = jnp.broadcast_to(self.cls_token[...], (b, 1, self.dim))
        h = jnp.concatenate([cls, h], axis=1) + self._pos_embed(gh, gw)
        for block in self.blocks:
            h = block(h)
        return self.norm(h)

    def __call__(self, x):
        return self.tokens(x)[:, 0]


def dino_resize_matrix(size: int, out: int) -> np.ndarray:
    """f32 [out, size]: DINO's position-embedding resize along one axis as a matrix.

    DINO calls `torch.nn.functional.interpolate(mode="bicubic", scale_factor=(out + 0.1) /
    size)` (the 0.1 avoids floating-point error in the output size), so the source coordinate
    of output pixel o is (o + 0.5) / scale - 0.5, the cubic kernel has a = -0.75, and taps
    beyond the border repeat the edge value.
    """
    a, scale = -0.75, (out + 0.1) / size
    src = (np.arange(out) + 0.5) / scale - 0.5
    base = np.floor(src)
    w = np.zeros((out, size), np.float64)
    for k in range(-1, 3):
        x = np.abs(src - (base + k))
        kernel = np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                          ((a * x - 5 * a) * x + 8 * a) * x - 4 * a)
        np.add.at(w, (np.arange(out), np.clip(base + k, 0, size - 1).astype(int)), kernel)
    return w.astype(np.float32)


def strip_checkpoint(obj) -> dict:
    """The backbone state dict inside a DINO checkpoint (teacher preferred; prefixes removed)."""
    if not isinstance(obj, Mapping):
        raise InputError("weight file does not hold a state dict")
    for key in ("teacher", "student", "model", "state_dict"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    out = {}
    for k, v in obj.items():
        k = str(k)
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith("head.") or not isinstance(v, np.ndarray):
            continue  # DINO projection head / non-tensor entries
        out[k] = v
    return out


def load_torch_state_dict(module: VisionTransformer, sd: Mapping[str, np.ndarray]) -> None:
    """Copy a DINO/DeiT ViT state dict into `module` (in place)."""
    reader = StateDictReader(sd, "ViT-S/16")
    take = reader.take

    def linear(layer: nnx.Linear, key):
        i, o = layer.kernel.get_value().shape
        layer.kernel.set_value(jnp.asarray(take(key + ".weight", (o, i)).T))
        layer.bias.set_value(jnp.asarray(take(key + ".bias", (o,))))

    def norm(layer: nnx.LayerNorm, key):
        n = layer.scale.get_value().shape[0]
        layer.scale.set_value(jnp.asarray(take(key + ".weight", (n,))))
        layer.bias.set_value(jnp.asarray(take(key + ".bias", (n,))))

    d, p = module.dim, module.patch
    w = take("patch_embed.proj.weight", (d, 3, p, p))
    module.patch_embed.kernel.set_value(jnp.asarray(np.transpose(w, (2, 3, 1, 0))))
    module.patch_embed.bias.set_value(jnp.asarray(take("patch_embed.proj.bias", (d,))))
    module.cls_token.set_value(jnp.asarray(take("cls_token", (1, 1, d))))
    module.pos_embed.set_value(jnp.asarray(take("pos_embed", module.pos_embed.get_value().shape)))
    for i, block in enumerate(module.blocks):
        q = f"blocks.{i}."
        norm(block.norm1, q + "norm1")
        linear(block.attn.qkv, q + "attn.qkv")
        linear(block.attn.proj, q + "attn.proj")
        norm(block.norm2, q + "norm2")
        linear(block.mlp.fc1, q + "mlp.fc1")
        linear(block.mlp.fc2, q + "mlp.fc2")
    norm(module.norm, "norm")
    reader.check_all_used()
