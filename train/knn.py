"""Weighted k-NN classification on frozen features, as DINO evaluates (Caron et al. 2021).

Cosine similarity between L2-normalised features; the k most similar labelled rows vote, each
with weight exp(sim / temperature) (DINO: k = 20, temperature = 0.07).

Shapes: p labelled rows (padded, with a mask), m query rows, d feature dim, C classes.
The labelled set is padded to a bucket size (`pad_to`) so that calls with different budgets
reuse one compiled program.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bilaf_jax import distances
from bilaf_jax._validation import check_count, check_positive, check_temperature
from bilaf_jax.io import InputError

MAX_COUNT = 2**31 - 1  # k or steps: a static int32 bound


class KnnOutput(NamedTuple):
    """accuracy: scalar; predictions: int32[m]; votes: [m, C] summed weights per class."""

    accuracy: jax.Array
    predictions: jax.Array
    votes: jax.Array


def bucket_size(n: int, minimum: int = 128) -> int:
    """The padded size used for a labelled set of n rows: the next power of two >= n."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def pad_rows(x, y, size: int):
    """Pad x [n, d] and y [n] with zero rows to `size`; return (x, y, mask bool[size])."""
    x = np.asarray(x)
    y = np.asarray(y)
    n = x.shape[0]
    if size < n:
        raise ValueError(f"pad size {size} is smaller than the {n} labelled rows")
    mask = np.zeros(size, bool)
    mask[:n] = True
    if size == n:
        return x, y.astype(np.int32), mask
    xp = np.zeros((size,) + x.shape[1:], x.dtype)
    xp[:n] = x
    yp = np.zeros(size, np.int32)
    yp[:n] = y
    return xp, yp, mask


@functools.partial(jax.jit, static_argnames=("k", "num_classes", "chunk_size"))
def knn_classify(train_x, train_y, train_mask, test_x, test_y, temperature=0.07, *,
                 k: int = 20, num_classes: int, chunk_size: int = 2048) -> KnnOutput:
    """DINO's weighted k-NN vote.

    train_x [p, d], train_y int[p], train_mask bool[p] (False rows never vote),
    test_x [m, d], test_y int[m]. With fewer than k valid rows, all valid rows vote.
    Ties in the vote go to the lower class id. `votes` are DINO's divided by
    exp(max_sim / temperature) per test row (the nearest neighbour weighs 1), so that small
    temperatures do not overflow; the prediction is DINO's.
    """
    k = min(k, train_x.shape[0])
    nb = distances.knn(test_x, train_x, k, "cosine", point_mask=train_mask,
                       chunk_size=chunk_size)
    valid = nb.index >= 0
    sim = jnp.where(valid, 1.0 - nb.distance, -jnp.inf)
    top = jnp.max(sim, axis=1, keepdims=True)
    weight = jnp.where(valid, jnp.exp((sim - jnp.where(valid, top, 0.0)) / temperature), 0.0)
    labels = train_y[jnp.maximum(nb.index, 0)]
    votes = jnp.einsum("mk,mkc->mc", weight, jax.nn.one_hot(labels, num_classes,
                                                            dtype=weight.dtype))
    pred = jnp.argmax(votes, axis=1).astype(jnp.int32)
    acc = jnp.mean((pred == test_y).astype(jnp.float32))
    return KnnOutput(acc, pred, votes)


def knn_eval(train_x, train_y, test_x, test_y, *, k: int = 20, temperature: float = 0.07,
             num_classes: int | None = None, pad_to: int | None = None,
             return_output: bool = False):
    """Accuracy of the weighted k-NN classifier built from the labelled rows.

    train_x [n, d] features of the labelled rows, train_y int[n]; test_x [m, d], test_y int[m].
    The labelled rows are padded to `pad_to` (default: next power of two, at least 128) so that
    different budgets share a compiled program. Returns the accuracy, count / m as a Python
    float (or the KnnOutput).

    >>> import numpy as np
    >>> x = np.eye(3, dtype=np.float32); y = np.array([0, 1, 2])
    >>> knn_eval(x, y, x, y, k=1)
    1.0
    """
    check_count(k, "k", 1, MAX_COUNT)
    check_temperature(check_positive(temperature, "temperature"))
    xp, yp, mask, tx, ty, num_classes = padded_inputs(train_x, train_y, test_x, test_y, num_classes, pad_to)
    out = knn_classify(xp, yp, mask, tx, ty, temperature, k=k, num_classes=num_classes)
    return out if return_output else exact_accuracy(out.predictions, test_y)


def exact_accuracy(predictions, labels) -> float:
    """The share of correct predictions, count / m, as a Python float (the outputs' `accuracy`
    is that share in float32: 7,344 of 10,000 reads 0.73439997)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    return int(np.count_nonzero(predictions == labels)) / len(labels)


def check_labels(num_classes: int, **labels) -> None:
    """InputError unless every array of labels (given by name) lies in [0, num_classes): one-hot
    encoding would silently turn any other label into a row of zeros."""
    for what, y in labels.items():
        y = np.asarray(y)
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            bad = int(y.min()) if y.min() < 0 else int(y.max())
            raise InputError(f"{what.replace('_', ' ')}: label {bad} outside [0, {num_classes}) "
                             f"for {num_classes} classes")


def _check_rows(x: np.ndarray, y: np.ndarray, what: str) -> None:
    """InputError unless x is [n, d] with n >= 1 and y holds n integer labels."""
    if x.ndim != 2:
        raise InputError(f"{what}_x must be 2-D [rows, features], got shape {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise InputError(f"{what}_y must hold one label per row of {what}_x ({len(x)}), got "
                         f"shape {y.shape}")
    if not len(y):
        raise InputError(f"no {what} rows ({what}_x is empty)")
    if y.dtype.kind not in "iu":
        raise InputError(f"{what}_y must be integer class labels, got dtype {y.dtype}")


def padded_inputs(train_x, train_y, test_x, test_y, num_classes, pad_to):
    """The labelled rows padded to a bucket size (with a mask) and the test arrays as JAX arrays;
    `num_classes` inferred from the labels when None."""
    train_x, train_y = np.asarray(train_x), np.asarray(train_y)
    test_x, test_y = np.asarray(test_x), np.asarray(test_y)
    _check_rows(train_x, train_y, "train")
    _check_rows(test_x, test_y, "test")
    if train_x.shape[1] != test_x.shape[1]:
        raise InputError(f"train_x has {train_x.shape[1]} features per row, test_x "
                         f"{test_x.shape[1]}")
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    check_labels(num_classes, train_labels=train_y, test_labels=test_y)
    size = pad_to or bucket_size(len(train_y))
    xp, yp, mask = pad_rows(np.asarray(train_x, np.float32), train_y, size)
    return xp, yp, mask, jnp.asarray(test_x, jnp.float32), jnp.asarray(test_y, jnp.int32), num_classes
