"""Placing a pool of features across devices.

Every selector runs on one device or many: pass features placed with
`NamedSharding(mesh, P("data", None))` and XLA partitions the row-wise work (matmuls against
centroids, nearest-centre assignment, k-center distance updates) across the mesh; results equal
the single-device ones. Write stages for one device; only this module knows about meshes.

JAX requires a sharded axis to divide evenly, so a pool whose size n is not a multiple of the
device count is padded: `shard_rows` appends zero rows and returns the padded array with the true
row count, and every selector takes `num_rows=n` meaning "rows at and after n are padding: never
selected, never counted".

On several hosts, call `jax.distributed.initialize()` first (scripts do this with
`--distributed`); the mesh then spans all processes' devices and `shard_rows` places each
process's rows (see `make_mesh`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


class ShardedPool(NamedTuple):
    """features: [n_pad, d] placed row-sharded; num_rows: n, the real rows (a prefix)."""

    features: jax.Array
    num_rows: int


def make_mesh(num_devices: int | None = None, axis: str = "data") -> Mesh:
    """A 1-D mesh over the first `num_devices` devices (default: all, across processes)."""
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices must be in [1, {len(devices)}], got {num_devices}")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (axis,), axis_types=(AxisType.Auto,))


def shard_rows(features, mesh: Mesh, axis: str = "data") -> ShardedPool:
    """Pad `features` [n, d] with zero rows to a multiple of the mesh axis and shard its rows.

    >>> mesh = make_mesh(1)
    >>> pool = shard_rows(np.ones((5, 2), np.float32), mesh)
    >>> pool.features.shape, pool.num_rows
    ((5, 2), 5)
    """
    features = np.asarray(features) if not isinstance(features, jax.Array) else features
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D [n, d], got shape {tuple(features.shape)}")
    n = features.shape[0]
    parts = mesh.shape[axis]
    pad = (-n) % parts
    if pad:
        features = jnp.concatenate([jnp.asarray(features), jnp.zeros((pad, features.shape[1]), features.dtype)])
    mesh = _auto(mesh)
    return ShardedPool(jax.device_put(features, NamedSharding(mesh, P(axis, None))), n)


def _auto(mesh: Mesh) -> Mesh:
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def as_auto_sharded(features):
    """Features placed with a NamedSharding over Explicit mesh axes (the default of
    `jax.make_mesh`), re-placed on the same devices with Auto axes so that XLA may partition the
    selectors' gathers and dynamic slices freely. Anything else is returned unchanged."""
    sharding = getattr(features, "sharding", None)
    if isinstance(features, jax.Array) and isinstance(sharding, NamedSharding) and not isinstance(
        features, jax.core.Tracer
    ):
        mesh = sharding.mesh
        if isinstance(mesh, Mesh) and any(t != AxisType.Auto for t in mesh.axis_types):
            return jax.device_put(features, NamedSharding(_auto(mesh), sharding.spec))
    return features
