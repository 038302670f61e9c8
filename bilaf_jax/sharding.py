"""Placing a pool of features across devices.

Every selector runs on one device or many: pass features placed with
`NamedSharding(mesh, P("data", None))` and XLA partitions the row-wise work (matmuls against
centroids, nearest-centre assignment, k-center distance updates) across the mesh; results equal
the single-device ones, except where an exact tie is decided by a sum over rows (ActiveFT's
gradient, k-means' centres), which the devices add in another order. Write stages for one
device; only this module knows about meshes.

JAX requires a sharded axis to divide evenly, so a pool whose size n is not a multiple of the
device count is padded: `shard_rows` appends zero rows and returns the padded array with the true
row count, and every selector takes `num_rows=n` meaning "rows at and after n are padding: never
selected, never counted".

On several hosts, every process runs the same program on the same features: call
`initialize_distributed` (`jax.distributed.initialize`) before any other JAX call; the mesh of
`make_mesh()` then spans all processes' devices, `shard_rows` keeps on each process only the rows
of its own devices, and `select`, `bilaf` and `sweep` return the whole result on every process
(`process_local`). Only the main process (`is_main_process`) should write files. `bilaf select`
and the scripts do all this with `--distributed` (and `--mesh`, see `parse_mesh`).
"""

from __future__ import annotations

import functools
import numbers
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
        # slicing the device list needs an int, and True would quietly mean one device
        if isinstance(num_devices, bool) or not isinstance(num_devices, (numbers.Integral, np.integer)):
            raise ValueError(f"num_devices must be an integer, got {num_devices!r}")
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices must be in [1, {len(devices)}], got {num_devices}")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (axis,), axis_types=(AxisType.Auto,))


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, on_wait=None) -> None:
    """Join a multi-process run (`jax.distributed.initialize`); call before any other JAX call.

    With no arguments JAX detects the cluster (SLURM, Open MPI, Cloud TPU, ...); elsewhere give
    the coordinator's "host:port" (process 0's address), the number of processes and this
    process's id in [0, num_processes). `on_wait`: called once the arguments are checked, just
    before joining, which blocks until every process has joined (JAX gives up after 5 min).
    """
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError("give all of coordinator, num_processes and process_id, or none of them "
                         "(to let JAX detect the cluster)")
    if num_processes is not None:
        if num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {num_processes}")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
        if ":" not in coordinator:
            raise ValueError(f"coordinator must be host:port, got {coordinator!r}")
    if on_wait is not None:
        on_wait()
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    except ValueError as e:
        if any(given):
            raise
        # JAX found no cluster it knows (SLURM, Open MPI, Cloud TPU, ...) to read them from
        raise ValueError(f"no cluster detected ({str(e).strip()}); give the coordinator "
                         "host:port, the number of processes and this process's id "
                         "(--coordinator, --num-processes, --process-id)") from None


def is_main_process() -> bool:
    """True on the process that writes results (process 0; always true in a single process)."""
    return jax.process_index() == 0


def parse_mesh(text: str | int | None) -> int | None:
    """A `--mesh` value as a device count: None or "none" -> None (one device, unsharded),
    "all" -> every device of every process, "N" -> the first N devices (1 <= N <= count)."""
    if text is None or str(text).strip().lower() in ("", "none"):
        return None
    text = str(text).strip().lower()
    count = jax.device_count()
    if text == "all":
        return count
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"mesh must be 'all', 'none' or a device count, got {text!r}") from None
    if not 1 <= value <= count:
        raise ValueError(f"mesh must be between 1 and the {count} devices available, got {value}")
    if jax.process_count() > 1 and value != count:
        raise ValueError(f"across {jax.process_count()} processes the mesh must span all {count} "
                         f"devices (mesh 'all'), got {value}")
    return value


def shard_rows(features, mesh: Mesh, axis: str = "data") -> ShardedPool:
    """Pad `features` [n, d] with zero rows to a multiple of the mesh axis and shard its rows.

    Where x64 is off, float64 features are placed as float32 (JAX's rule); call it under
    `jax.enable_x64(True)` to keep them float64 for official mode's boundary stage.

    >>> mesh = make_mesh(1)
    >>> pool = shard_rows(np.ones((5, 2), np.float32), mesh)
    >>> pool.features.shape, pool.num_rows
    ((5, 2), 5)
    """
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh (make_mesh()), got {mesh!r:.60}")
    if axis not in mesh.shape:
        raise ValueError(f"mesh has no axis {axis!r} (its axes: {tuple(mesh.shape)})")
    if not isinstance(features, jax.Array):
        from bilaf_jax._validation import check_features

        # Checked here, as the selectors check host features: placed with x64 off, float64
        # values below float32's range would arrive as 0 and those above it as inf.
        features = check_features(features)
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D [n, d], got shape {tuple(features.shape)}")
    n = features.shape[0]
    parts = mesh.shape[axis]
    pad = (-n) % parts
    if pad:
        # Pad where the rows are: a host array stays on the host until device_put sends each
        # device only its own block.
        xp = np if isinstance(features, np.ndarray) else jnp
        features = xp.concatenate([features, xp.zeros((pad, features.shape[1]), features.dtype)])
    mesh = _auto(mesh)
    return ShardedPool(jax.device_put(features, NamedSharding(mesh, P(axis, None))), n)


def real_rows(features, num_rows: int | None):
    """The first `num_rows` rows of a padded pool (all of them for None): for stages that
    gather rows per pseudo-class and need no padding to tell apart."""
    if num_rows is None or num_rows == features.shape[0]:
        return features
    return _prefix(features, int(num_rows))


@functools.partial(jax.jit, static_argnums=1)
def _prefix(features, num_rows):
    return features[:num_rows]


def to_host(x) -> np.ndarray:
    """A NumPy copy of the whole of `x`. An array spread over several processes' devices is
    gathered first (every process gets all of it): `np.asarray` alone would fail there."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def process_local(tree):
    """`tree` with each array that spans several processes replaced by a copy of its whole
    value on this process's default device (outputs of a multi-process run, ready for NumPy)."""
    def local(x):
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and not x.is_fully_addressable:
            return jnp.asarray(to_host(x))
        return x

    return jax.tree.map(local, tree)


def place(features, mesh: Mesh | None):
    """(features, num_rows) for the selectors: unchanged with no mesh, else `shard_rows`."""
    if mesh is None:
        return features, None
    pool = shard_rows(features, mesh)
    return pool.features, pool.num_rows


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
