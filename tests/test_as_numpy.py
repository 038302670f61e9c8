"""`bilaf_jax._as_numpy.numpy_sum` gives NumPy's float sums bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bilaf_jax._as_numpy import divide, nonnegative_product, numpy_sum


def _values(rng, shape):
    # Magnitudes over six decades: most orders of summation round differently.
    return rng.random(shape) * 10.0 ** rng.uniform(-3, 3, shape)


@pytest.mark.parametrize("length", [1, 7, 8, 9, 128, 129, 263, 1000, 5000])
def test_equals_numpy_add_reduce(length):
    rng = np.random.default_rng(length)
    rows = 6
    with jax.enable_x64(True):
        a = _values(rng, (rows, length))
        counts = sorted({0, 1, 7, 8, 15, 16, 17, 127, 128, 129, 136, 137, 255, 256, 263,
                         length - 1, length, *rng.integers(0, length + 1, 8).tolist()})
        counts = [c for c in counts if 0 <= c <= length]
        fn = jax.jit(lambda a, n: numpy_sum(lambda q: a.T[q], n, length))
        for n in counts:
            got = np.asarray(fn(jnp.asarray(a), n))
            want = np.add.reduce(a[:, :n], axis=1)
            assert got.dtype == np.float64
            np.testing.assert_array_equal(got, want, err_msg=f"n = {n} of {length}")
            # the mean the authors' script takes, as NumPy divides it
            if n:
                np.testing.assert_array_equal(got / n, a[:, :n].mean(axis=1))


def test_differs_from_a_plain_sum_where_the_order_matters():
    """The orders differ on these values, so the equality above is not an accident of them."""
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        a = _values(rng, (200, 300))
        plain = np.asarray(jnp.sum(jnp.asarray(a), axis=1))
        ordered = np.asarray(numpy_sum(lambda q: jnp.asarray(a).T[q], 300, 300))
    np.testing.assert_array_equal(ordered, np.add.reduce(a, axis=1))
    left_to_right = np.zeros(200)
    for j in range(300):
        left_to_right = left_to_right + a[:, j]
    assert np.sum(left_to_right != ordered) > 50
    assert np.allclose(plain, ordered, rtol=1e-13)


def test_vmaps_over_counts_and_keeps_the_sign_of_empty_sums():
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        a = jnp.asarray(_values(rng, (4, 3, 40)))
        n = jnp.array([0, 5, 8, 40])
        got = jax.vmap(lambda a, n: numpy_sum(lambda q: a.T[q], n, 40))(a, n)
        for i in range(4):
            np.testing.assert_array_equal(np.asarray(got[i]),
                                          np.add.reduce(np.asarray(a[i])[:, :int(n[i])], axis=1))
        assert np.all(np.signbit(np.asarray(got[0])))  # -0.0, as np.add.reduce([])
    # float32 follows the same order in float32
    a32 = _values(rng, (3, 200)).astype(np.float32)
    got32 = np.asarray(numpy_sum(lambda q: jnp.asarray(a32).T[q], 200, 200))
    assert got32.dtype == np.float32
    np.testing.assert_array_equal(got32, np.add.reduce(a32, axis=1))


def test_divide_by_a_broadcast_value_is_the_ieee_quotient():
    rng = np.random.default_rng(2)
    a = _values(rng, (50, 400))
    c = rng.integers(1, 60, 50).astype(np.float64)
    with jax.enable_x64(True):
        got = np.asarray(jax.jit(divide)(a, c[:, None]))
        plain = np.asarray(jax.jit(lambda a, c: a / c)(a, c[:, None]))
    np.testing.assert_array_equal(got, a / c[:, None])
    # what the helper is for: XLA's CPU code makes the plain division a product with the
    # reciprocal
    if jax.default_backend() == "cpu":
        assert np.sum(plain != a / c[:, None]) > 0


def test_nonnegative_product_is_rounded_before_it_is_added():
    # (1 + 2^-30)^2 = 1 + 2^-29 + 2^-60: rounded first, the 2^-60 is lost, as in NumPy.
    b = 1.0 + 2.0**-30
    with jax.enable_x64(True):
        got = float(jax.jit(lambda a, b: a + nonnegative_product(b, b))(-1.0, b))
        fused = float(jax.jit(lambda a, b: a + b * b)(-1.0, b))
        rows = np.asarray(jax.jit(lambda a, b: a + nonnegative_product(b, b))(np.full(64, -1.0),
                                                                   np.full(64, b)))
    assert got == np.float64(-1.0) + np.float64(b) * np.float64(b) == 2.0**-29
    np.testing.assert_array_equal(rows, np.full(64, 2.0**-29))
    # what the helper is for: XLA's CPU code fuses the plain form (one rounding)
    if jax.default_backend() == "cpu":
        assert fused == 2.0**-29 + 2.0**-60
