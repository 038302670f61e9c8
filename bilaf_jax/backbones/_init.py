"""Building NNX modules without JAX's random initialisers.

On CPU, every distinct parameter shape makes JAX compile a threefry kernel (about 2 s each), so
initialising EfficientNet-Lite0 through `nnx.Rngs` costs ~30 s per process. Instead the module is
built abstractly (`nnx.eval_shape`) and its variables are filled from NumPy: a seeded random
init, usually overwritten at once by pretrained weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _key_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def _param_init(rng: np.random.Generator, names: list[str], shape, dtype) -> np.ndarray:
    leaf = names[-2] if names[-1] == "value" else names[-1]
    if leaf in ("bias", "mean"):
        return np.zeros(shape, dtype)
    if leaf in ("scale", "var"):
        return np.ones(shape, dtype)
    if leaf == "kernel" and len(shape) == 4:  # conv HWIO: He normal on fan-in
        fan_in = int(np.prod(shape[:-1]))
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(dtype)
    # linear kernels, class token, position embeddings: N(0, 0.02), clipped at 2 std
    return np.clip(rng.standard_normal(shape), -2, 2).astype(dtype) * np.asarray(0.02, dtype)


def build(factory, seed: int = 0):
    """`factory()` (which builds a module with any `nnx.Rngs`) as a concrete module whose
    parameters and statistics are seeded NumPy draws and whose RNG streams derive from `seed`."""
    abstract = nnx.eval_shape(factory)
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    stream = iter(range(1, 1 << 30))

    def fill(path, leaf):
        names = _key_names(path)
        dtype = leaf.dtype
        if jnp.issubdtype(dtype, jax.dtypes.prng_key):
            return jax.random.key((seed * 7919 + next(stream)) % (1 << 31))
        if names[-2:-1] == ["count"] or (len(names) > 1 and names[-2] == "count"):
            return jnp.zeros(leaf.shape, dtype)
        return jnp.asarray(_param_init(rng, names, leaf.shape, dtype))

    state = jax.tree_util.tree_map_with_path(fill, state)
    return nnx.merge(graphdef, state)
