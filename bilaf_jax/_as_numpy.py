"""Float arithmetic as NumPy does it, where XLA's compiled code does otherwise.

The authors' script averages with `np.mean` over rows (intra-class distance, density) and
divides with IEEE quotients. Where two samples' values are equal in the script's arithmetic
(common on integer-valued features), the last bit decides which one its sorts and argmins
take, so official mode computes these values bit for bit as NumPy does:

- `numpy_sum`: float addition is not associative, and XLA sums in its own order.
  `np.add.reduce` over a contiguous axis of n values (NumPy's `pairwise_sum`; the tests
  check it against the installed NumPy) computes:
    n < 8          -0.0 + a_0 + a_1 + ... + a_{n-1}, left to right;
    8 <= n <= 128  eight running sums r_j = a_j + a_{j+8} + a_{j+16} + ... over the first
                   n - n % 8 values, then ((r_0 + r_1) + (r_2 + r_3)) + ((r_4 + r_5) + (r_6 + r_7)),
                   then the last n % 8 values one at a time;
    n > 128        sum(a[:h]) + sum(a[h:]), h = n // 2 rounded down to a multiple of 8.
- `nonnegative_product`: XLA's CPU backend fuses x * y + z into one multiply-add, rounding
  once where NumPy rounds the product and then the sum.
- `divide`: XLA rewrites a division by a broadcast value into a product with its reciprocal,
  which is often one unit off in the last place (the tests show such quotients).

`tests/test_as_numpy.py` checks these against NumPy bit for bit.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

_BLOCK = 128  # NumPy's PW_BLOCKSIZE
_LANES = 8    # its unroll factor


def _levels(length: int) -> int:
    """Halvings after which every piece of at most `length` values is one block.

    The right part of a split of n is the larger, n - h <= n // 2 + 8; iterating that bound
    (non-decreasing in n) covers every n <= length. Extra levels cost nothing in the result:
    a block splits into itself and an empty piece, whose sum -0.0 adds exactly."""
    levels = 0
    while length > _BLOCK:
        length = length // 2 + _LANES
        levels += 1
    return levels


def numpy_sum(take, n, length: int):
    """The float sum NumPy gives for the first `n` of `length` values, bit for bit.

    take: positions int32[...] (each < length) -> the values there, [*positions.shape, R]
          (R sums side by side, e.g. one per column of a distance matrix: whole rows
          gathered).
    n:    int32 scalar (traced is fine), 0 <= n <= length; positions >= n are never used.
    length: static bound on n.
    Returns [R]. Sums of no values are -0.0, as NumPy's.
    """
    n = jnp.asarray(n, jnp.int32)
    levels = _levels(length)
    # The split tree, one level at a time: a piece (offset, size) > _BLOCK becomes its two
    # halves, a block becomes itself and an empty piece, so every leaf sits at the last level.
    offset, size = jnp.zeros(1, jnp.int32), n[None]
    for _ in range(levels):
        half = size // 2
        left = jnp.where(size > _BLOCK, half - half % _LANES, size)
        offset = jnp.stack([offset, offset + left], axis=1).reshape(-1)
        size = jnp.stack([left, size - left], axis=1).reshape(-1)
    unrolled = size - size % _LANES  # [L] values that go through the eight running sums

    def at(step, limit):
        """Values at offset + step (step int32[L, 8] or [L]), -0.0 where step >= limit."""
        shape = (-1,) + (1,) * (step.ndim - 1)
        vals = take(jnp.clip(offset.reshape(shape) + step, 0, max(length - 1, 0)))
        return jnp.where((step < limit.reshape(shape))[..., None], vals, -0.0)

    lanes = jnp.broadcast_to(jnp.arange(_LANES, dtype=jnp.int32), (offset.shape[0], _LANES))
    first = at(lanes, size)                                          # [L, 8, R]
    # n < 8 (only the whole sum can be so short): left to right from -0.0.
    short = jnp.full(first.shape[:1] + first.shape[2:], -0.0, first.dtype)
    for j in range(_LANES):
        short = short + first[:, j]

    # Blocks: eight running sums, each strictly in order (a loop, not unrolled: this runs
    # inside the class programs, whose compile time it would add to) ...
    def lane_step(t, run):
        return run + at(t * _LANES + lanes, unrolled)

    steps = -(-min(length, _BLOCK) // _LANES)  # positions past `length` are never used
    run = lax.fori_loop(1, max(steps, 1), lane_step, first)
    r = [run[:, j] for j in range(_LANES)]
    block = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))

    # ... then the fixed pairing, and the last n % 8 values one at a time.
    block = lax.fori_loop(0, _LANES - 1, lambda u, b: b + at(unrolled + u, size), block)
    leaves = jnp.where((size < _LANES)[:, None], short, block)      # [L, R]
    for _ in range(levels):
        leaves = leaves[0::2] + leaves[1::2]
    return leaves[0]


def divide(a, b):
    """a / b as IEEE quotients, for `b` broadcastable to `a`'s shape (e.g. [C, 1] per row).

    The barrier hides the broadcast from XLA's rewrite of x / broadcast(y) into
    x * broadcast(1 / y); elementwise division of equal shapes is IEEE on XLA's CPU backend."""
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    shape = jnp.broadcast_shapes(a.shape, b.shape)
    dtype = jnp.result_type(a, b)
    return jnp.broadcast_to(a, shape).astype(dtype) / lax.optimization_barrier(
        jnp.broadcast_to(b, shape).astype(dtype))


def nonnegative_product(a, b):
    """a * b for products that are >= 0 (or NaN), rounded to their dtype before anything adds
    to them (see the module docstring).

    max(p, 0) is p for such products; it stands between the product and the addition, so the
    compiler cannot fuse the two. (Neither an optimization barrier nor a product by a barriered
    1 stopped that fusion on XLA's CPU backend.)"""
    return jnp.maximum(jnp.asarray(a) * jnp.asarray(b), 0)
