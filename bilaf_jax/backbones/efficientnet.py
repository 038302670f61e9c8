"""EfficientNet-Lite0 (Tan & Le 2019, the "lite" edge variant) as a Flax NNX module.

EfficientNet-B0's layout without squeeze-excite, with ReLU6, BatchNorm eps 1e-3 and TF "SAME"
padding (which `nnx.Conv(padding="SAME")` is). Parameter names follow the lukemelas PyTorch port
(`_conv_stem`, `_blocks.{i}._expand_conv`, ...) so `load_torch_state_dict` maps them one to one.
Activations are NHWC throughout.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from bilaf_jax.backbones.torch_pickle import StateDictReader
from bilaf_jax.io import InputError

# (expand ratio, kernel, stride, out channels) of the 16 MBConv blocks; stem 32, head 1280.
LITE0_BLOCKS = (
    (1, 3, 1, 16), (6, 3, 2, 24), (6, 3, 1, 24), (6, 5, 2, 40), (6, 5, 1, 40),
    (6, 3, 2, 80), (6, 3, 1, 80), (6, 3, 1, 80), (6, 5, 1, 112), (6, 5, 1, 112),
    (6, 5, 1, 112), (6, 5, 2, 192), (6, 5, 1, 192), (6, 5, 1, 192), (6, 5, 1, 192),
    (6, 3, 1, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3
BN_MOMENTUM = 0.99  # torch momentum 0.01


def check_taps(taps) -> tuple:
    """Normalise a taps spec: block indices 0..15 and/or "head"; default ("head",)."""
    if taps is None:
        return ("head",)
    if isinstance(taps, (str, int)):
        taps = (taps,)
    out = []
    for t in taps:
        if isinstance(t, str) and t.strip().lower() == "head":
            out.append("head")
            continue
        try:
            i = int(t)
        except (TypeError, ValueError):
            raise InputError(f"bad tap {t!r}: use block indices 0-15 and/or 'head'") from None
        if not 0 <= i < len(LITE0_BLOCKS) or isinstance(t, bool):
            raise InputError(f"bad tap {t!r}: block indices run 0-{len(LITE0_BLOCKS) - 1}")
        out.append(i)
    if not out or len(set(out)) != len(out):
        raise InputError(f"taps must be non-empty and distinct, got {tuple(taps)!r}")
    return tuple(out)


def taps_dim(taps) -> int:
    return sum(HEAD_CHANNELS if t == "head" else LITE0_BLOCKS[t][3] for t in taps)


# CPU depthwise convolutions as shifted products (False: XLA's own grouped convolution, which
# `scripts/bench_extract.py --compare-depthwise` times against it; read when a forward traces).
SHIFTED_DEPTHWISE_ON_CPU = True


def depthwise_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """`lax.conv_general_dilated` drop-in: on CPU, depthwise NHWC convs as k*k shifted products.

    XLA's CPU grouped convolution is several times slower than this fused sum of shifted slices
    on the Lite0 shapes (`scripts/bench_extract.py --compare-depthwise`); other backends and
    other convolutions go to `lax.conv_general_dilated`.
    """
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    simple = (
        SHIFTED_DEPTHWISE_ON_CPU and jax.default_backend() == "cpu"
        and lhs.ndim == 4 and rhs.shape[2] == 1 and feature_group_count == lhs.shape[-1]
        and rhs.shape[3] == lhs.shape[-1]
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and (dimension_numbers is None or dimension_numbers == nhwc)
        and not kwargs.get("preferred_element_type")
    )
    if not simple:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                        rhs_dilation, dimension_numbers, feature_group_count,
                                        precision=precision, **kwargs)
    kh, kw = rhs.shape[0], rhs.shape[1]
    sh, sw = window_strides
    pads = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), (sh, sw), padding) \
        if isinstance(padding, str) else [tuple(p) for p in padding]
    x = jnp.pad(lhs, ((0, 0), pads[0], pads[1], (0, 0)))
    oh = (x.shape[1] - kh) // sh + 1
    ow = (x.shape[2] - kw) // sw + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = x[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :] * rhs[i, j, 0]
            out = tap if out is None else out + tap
    return out


def _bn(n, rngs):
    return nnx.BatchNorm(n, epsilon=BN_EPS, momentum=BN_MOMENTUM, rngs=rngs)


class MBConv(nnx.Module):
    """Inverted residual: 1x1 expand, kxk depthwise, 1x1 project (no squeeze-excite)."""

    def __init__(self, cin, cout, expand, kernel, stride, drop_connect, *, rngs: nnx.Rngs):
        mid = cin * expand
        self._expand_conv = (
            nnx.Conv(cin, mid, (1, 1), use_bias=False, rngs=rngs) if expand != 1 else None
        )
        self._bn0 = _bn(mid, rngs) if expand != 1 else None
        self._depthwise_conv = nnx.Conv(
            mid, mid, (kernel, kernel), strides=stride, padding="SAME",
            feature_group_count=mid, use_bias=False, conv_general_dilated=depthwise_conv,
            rngs=rngs,
        )
        self._bn1 = _bn(mid, rngs)
        self._project_conv = nnx.Conv(mid, cout, (1, 1), use_bias=False, rngs=rngs)
        self._bn2 = _bn(cout, rngs)
        self.residual = stride == 1 and cin == cout
        # Stochastic depth (per-sample drop of the residual branch), off in eval mode and at rate 0.
        self.drop_connect = (
            nnx.Dropout(drop_connect, broadcast_dims=(1, 2, 3), rngs=rngs) if self.residual else None
        )

    def __call__(self, x):
        h = x
        if self._expand_conv is not None:
            h = jax.nn.relu6(self._bn0(self._expand_conv(h)))
        h = jax.nn.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        if self.residual:
            if self.drop_connect is not None:
                h = self.drop_connect(h)
            h = h + x
        return h


class EfficientNetLite(nnx.Module):
    """EfficientNet-Lite0. `module(x)`: preprocessed f32 [b, s, s, 3] -> pooled taps f32 [b, dim].

    `taps` picks which global-average-pooled activations are concatenated into the embedding:
    block indices (0-15, output of that block) and/or "head" (the 1280-d pooled head, default).
    `logits(x)` -> [b, num_classes] through the ImageNet classifier `_fc` (on the head features).
    """

    def __init__(self, *, taps=("head",), num_classes: int = 1000, dropout: float = 0.2,
                 drop_connect: float = 0.2, rngs: nnx.Rngs):
        self.taps = check_taps(taps)
        self.dim = taps_dim(self.taps)
        self.num_classes = num_classes
        self._conv_stem = nnx.Conv(3, STEM_CHANNELS, (3, 3), strides=2, padding="SAME",
                                   use_bias=False, rngs=rngs)
        self._bn0 = _bn(STEM_CHANNELS, rngs)
        blocks, cin = [], STEM_CHANNELS
        for expand, kernel, stride, cout in LITE0_BLOCKS:
            blocks.append(MBConv(cin, cout, expand, kernel, stride, 0.0, rngs=rngs))
            cin = cout
        self._blocks = nnx.List(blocks)
        self.set_drop_path(drop_connect)
        self._conv_head = nnx.Conv(cin, HEAD_CHANNELS, (1, 1), use_bias=False, rngs=rngs)
        self._bn1 = _bn(HEAD_CHANNELS, rngs)
        self._dropout = nnx.Dropout(dropout, rngs=rngs)
        self._fc = nnx.Linear(HEAD_CHANNELS, num_classes, rngs=rngs)

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth of block i (residual blocks only) at `rate * i / 16`, EfficientNet's
        own rule (its ImageNet training used rate 0.2)."""
        for i, block in enumerate(self._blocks):
            if block.drop_connect is not None:
                block.drop_connect.rate = rate * i / len(self._blocks)

    def forward_features(self, x):
        """(embedding [b, dim] of the chosen taps, pooled head features [b, 1280])."""
        h = jax.nn.relu6(self._bn0(self._conv_stem(x)))
        pooled = {}
        last_tap = max((t for t in self.taps if t != "head"), default=-1)
        for i, block in enumerate(self._blocks):
            h = block(h)
            if i in self.taps:
                pooled[i] = jnp.mean(h, axis=(1, 2))
            if "head" not in self.taps and i == last_tap:
                break
        head = None
        if "head" in self.taps:
            head = jnp.mean(jax.nn.relu6(self._bn1(self._conv_head(h))), axis=(1, 2))
            pooled["head"] = head
        emb = jnp.concatenate([pooled[t] for t in self.taps], axis=-1)
        return emb, head

    def __call__(self, x):
        return self.forward_features(x)[0]

    def logits(self, x):
        h = jax.nn.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            h = block(h)
        head = jnp.mean(jax.nn.relu6(self._bn1(self._conv_head(h))), axis=(1, 2))
        return self._fc(self._dropout(head))


def _conv(torch_w: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(np.transpose(torch_w, (2, 3, 1, 0)))  # OIHW -> HWIO


def load_torch_state_dict(module: EfficientNetLite, sd: Mapping[str, np.ndarray]) -> None:
    """Copy a lukemelas-layout EfficientNet-Lite0 state dict into `module` (in place)."""
    reader = StateDictReader(sd, "EfficientNet-Lite0")
    take = reader.take

    def conv(layer: nnx.Conv, key):
        kh, kw, i, o = layer.kernel.get_value().shape
        layer.kernel.set_value(_conv(take(key + ".weight", (o, i, kh, kw))))

    def bn(layer: nnx.BatchNorm, key):
        n = layer.scale.get_value().shape[0]
        layer.scale.set_value(jnp.asarray(take(key + ".weight", (n,))))
        layer.bias.set_value(jnp.asarray(take(key + ".bias", (n,))))
        layer.mean.set_value(jnp.asarray(take(key + ".running_mean", (n,))))
        layer.var.set_value(jnp.asarray(take(key + ".running_var", (n,))))

    conv(module._conv_stem, "_conv_stem")
    bn(module._bn0, "_bn0")
    for i, block in enumerate(module._blocks):
        p = f"_blocks.{i}."
        if block._expand_conv is not None:
            conv(block._expand_conv, p + "_expand_conv")
            bn(block._bn0, p + "_bn0")
        conv(block._depthwise_conv, p + "_depthwise_conv")
        bn(block._bn1, p + "_bn1")
        conv(block._project_conv, p + "_project_conv")
        bn(block._bn2, p + "_bn2")
    conv(module._conv_head, "_conv_head")
    bn(module._bn1, "_bn1")
    fc_w = take("_fc.weight", (module.num_classes, HEAD_CHANNELS))
    module._fc.kernel.set_value(jnp.asarray(fc_w.T))
    module._fc.bias.set_value(jnp.asarray(take("_fc.bias", (module.num_classes,))))
    reader.check_all_used("num_batches_tracked")
