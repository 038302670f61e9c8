"""The finetuned model: a pretrained backbone (from `bilaf_jax.backbones`) plus a linear head."""

from __future__ import annotations

import jax
from flax import nnx


class Classifier(nnx.Module):
    """logits = head(backbone(x)).

    backbone: an nnx.Module mapping preprocessed float images [b, s, s, 3] to features [b, dim].
    head_init "zeros": the head starts at zero (big_vision's `head_zeroinit`), so step 0
    predicts uniformly and the backbone's pretrained features are not disturbed by a random
    head. "normal": normal with std 0.02, as timm's ViT (DeiT) starts its head (its truncation
    at +-2, absolute, is 100 standard deviations away); the bias starts at zero either way.
    """

    def __init__(self, backbone: nnx.Module, dim: int, num_classes: int, *, rngs: nnx.Rngs,
                 head_init: str = "zeros"):
        if head_init not in ("zeros", "normal"):
            raise ValueError(f"head_init must be zeros or normal, got {head_init!r}")
        init = (nnx.initializers.zeros_init() if head_init == "zeros"
                else nnx.initializers.normal(0.02))
        self.backbone = backbone
        self.head = nnx.Linear(dim, num_classes, kernel_init=init, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.backbone(x))


def set_drop_path(backbone: nnx.Module, rate: float) -> bool:
    """Set the backbone's stochastic-depth (drop-path) rate by its own rule: rising linearly to
    `rate` over a ViT's blocks (DeiT), `rate * i / 16` over EfficientNet's (its own).

    Returns False when the backbone has no drop-path layers (only `rate == 0` is then exact).
    """
    setter = getattr(backbone, "set_drop_path", None)
    if setter is None:
        return False
    setter(rate)
    return True
