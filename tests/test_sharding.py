"""Row-sharded pools on 8 simulated CPU devices give the same selections as unsharded ones."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bilaf_jax.activeft import activeft
from bilaf_jax.pipeline import select
from bilaf_jax.sharding import make_mesh, shard_rows

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices; see conftest.py")


def _pool(n):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 12)) * 3
    return (centres[rng.integers(0, 6, n)] + rng.normal(size=(n, 12))).astype(np.float32)


CASES = [
    ("random", {}),
    ("kcenter", {}),
    ("kmeans", {}),
    ("activeft", dict(core_options=dict(num_steps=15))),
    ("bilaf", dict(num_cores=6, core_options=dict(num_steps=15))),
    ("bilaf", dict(num_cores=6, core_method="kcenter", mode="official")),
]


@pytest.mark.parametrize("method, kwargs", CASES)
def test_sharded_equals_unsharded(method, kwargs):
    x = _pool(1001)  # not divisible by 8: padded by shard_rows
    pool = shard_rows(x, make_mesh(8))
    assert len(pool.features.sharding.device_set) == 8
    want = select(jax.random.key(0), x, 48, method=method, **kwargs)
    got = select(jax.random.key(0), pool.features, 48, method=method, num_rows=pool.num_rows, **kwargs)
    np.testing.assert_array_equal(got.indices, want.indices)


def test_explicit_mesh_from_make_mesh_is_accepted():
    x = _pool(1008)
    mesh = jax.make_mesh((8,), ("data",))  # Explicit axes by default
    xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    for method in ("kcenter", "activeft"):
        kw = dict(core_options=dict(num_steps=10)) if method == "activeft" else {}
        want = select(jax.random.key(1), x, 20, method=method, **kw).indices
        got = select(jax.random.key(1), xs, 20, method=method, **kw).indices
        np.testing.assert_array_equal(got, want)


def test_minibatch_activeft_sharded_with_padding():
    x = _pool(1001)
    pool = shard_rows(x, make_mesh(8))
    want = activeft(jax.random.key(2), x, 10, num_steps=10, batch_size=300)
    got = activeft(jax.random.key(2), pool.features, 10, num_steps=10, batch_size=300, num_rows=pool.num_rows)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_allclose(got.losses, want.losses, rtol=1e-5)


def test_num_rows_validation():
    x = _pool(16)
    with pytest.raises(ValueError, match="num_rows"):
        select(jax.random.key(0), x, 4, method="random", num_rows=17)
    with pytest.raises(ValueError, match="budget"):
        select(jax.random.key(0), x, 12, method="random", num_rows=10)
