"""Argument checks shared by the public functions.

Every public selection function validates its concrete inputs here, before anything is traced,
so that bad input fails with a `ValueError` naming the problem instead of a shape error deep
inside XLA. Inputs that are already tracers (a caller jitting or vmapping over them) can only be
checked for shape; their values are the caller's responsibility.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np


def is_traced(x) -> bool:
    """True when `x` is an abstract value inside a jit/vmap/grad trace."""
    return isinstance(x, jax.core.Tracer)


# One small program rather than two eager ops (each eager op compiles on its first use). NaN
# propagates through max, so a finite result means every value is finite.
_max_abs = jax.jit(lambda x: jnp.max(jnp.abs(x)))


def check_features(features, name: str = "features"):
    """Return `features` as a floating JAX/NumPy array of shape [n, d], or raise ValueError.

    Checks: array-like, 2-D, n > 0 and d > 0, real numbers, all finite, small enough that
    squared norms do not overflow and (unless all zero) large enough that squares do not
    underflow (when concrete). Integer and 8- or 16-bit float inputs are converted
    to float32 (distances and scores need its precision; `precision=` chooses low-precision
    matmuls), other byte orders and widths to native float32 / float64; float32 and float64
    are kept.
    """
    if features is None:
        raise ValueError(f"{name} is None; expected an array of shape [n, d]")
    from bilaf_jax.sharding import as_auto_sharded

    features = as_auto_sharded(features)
    if not isinstance(features, (jax.Array, np.ndarray)):
        try:
            features = np.asarray(features)
        except Exception as e:  # ragged lists and the like
            raise ValueError(f"{name} is not an array: {e}") from None
    if features.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n, d], got shape {tuple(features.shape)}")
    n, d = features.shape
    if n == 0 or d == 0:
        raise ValueError(f"{name} is empty: shape {tuple(features.shape)}")
    dtype = np.dtype(features.dtype)
    # jnp.issubdtype also knows ml_dtypes' floats and ints (bfloat16, float8_*, int4), which
    # NumPy's does not: they are real numbers too.
    if dtype == np.bool_ or not (
        jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
    ):
        raise ValueError(f"{name} must hold real numbers, got dtype {dtype}")
    if jnp.issubdtype(dtype, jnp.integer) or dtype.itemsize < 4:
        features = features.astype(np.float32)
    elif dtype not in (np.dtype(np.float32), np.dtype(np.float64)):  # big-endian, long double
        features = features.astype(np.float32 if dtype.itemsize == 4 else np.float64)
    if not is_traced(features):
        on_host = isinstance(features, np.ndarray) or (
            features.is_fully_addressable
            and all(dev.platform == "cpu" for dev in features.devices()))
        # Host memory: NumPy reads it in place (no program to compile on a first call), and
        # max / min need no temporary copy of the features.
        if on_host:
            x = np.asarray(features)
            largest = max(abs(float(x.max())), abs(float(x.min())))
        else:
            largest = float(_max_abs(features))
        if not np.isfinite(largest):
            raise ValueError(f"{name} contains NaN or Inf values")
        # The type JAX computes in: float64 input becomes float32 unless x64 is enabled.
        computed = jax.dtypes.canonicalize_dtype(features.dtype)
        info = np.finfo(computed)
        if d * largest * largest > float(info.max) / 4:
            raise ValueError(
                f"{name} hold values up to {largest:.3g}: squared distances between rows "
                f"overflow {np.dtype(computed).name}; rescale the features")
        if 0 < largest and largest * largest < float(info.tiny) / float(info.eps):
            # Squares below the normal range lose their precision (CPUs flush them to zero):
            # every distance would look alike, and the picks would be the first rows.
            raise ValueError(
                f"{name} hold values of at most {largest:.3g}: squared distances between rows "
                f"underflow {np.dtype(computed).name}; rescale the features")
    return features


def check_count(value, name: str, low: int, high: int) -> int:
    """Return `value` as a Python int in [low, high], or raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def check_indices(indices, n: int, name: str, length: int | None = None) -> np.ndarray:
    """Return `indices` as int32 NumPy [m], checking 1-D, length, range [0, n) and uniqueness."""
    if is_traced(indices):
        raise ValueError(f"{name} must be concrete (not traced inside jit/vmap)")
    arr = np.asarray(indices)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype == np.bool_:  # a mask read as indices would mean rows 0 and 1
        raise ValueError(f"{name} must hold row indices, not a boolean mask (use np.flatnonzero)")
    if arr.size and arr.dtype.kind == "O":  # e.g. a pandas column of Python ints
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must hold integers, got dtype object") from None
    if arr.size and arr.dtype.kind not in "iuf":  # strings and the like (np.mod fails on them)
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    if length is not None and arr.shape[0] != length:
        raise ValueError(f"{name} must have length {length}, got {arr.shape[0]}")
    # Range before the cast to int64: 1e20 or a uint64 above 2**63 would wrap to a negative.
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        bad = arr[(arr < 0) | (arr >= n)][0]
        raise ValueError(f"{name} out of range [0, {n}): {int(bad)}")
    arr = arr.astype(np.int64)
    uniq, counts = np.unique(arr, return_counts=True)
    if uniq.size != arr.size:
        raise ValueError(f"{name} has repeated entries, e.g. {int(uniq[counts > 1][0])}")
    return arr.astype(np.int32)


def check_key(key, name: str = "key"):
    """Return `key` if it is one PRNG key (`jax.random.key(seed)`, or a raw uint32 key of
    `jax.random.PRNGKey`), traced or not; else ValueError. JAX's own errors (for a seed such as
    0: "invalid PRNG key data: expected key_data to have ndim, shape, and dtype attributes")
    neither name the argument nor say what to pass."""
    dtype = getattr(key, "dtype", None)
    shape = tuple(getattr(key, "shape", ()))
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        single = shape == ()
    elif isinstance(dtype, np.dtype) and dtype == np.uint32 and len(shape) >= 1:
        single = len(shape) == 1  # its length is the PRNG implementation's to check
    else:
        raise ValueError(f"{name} must be a PRNG key such as jax.random.key(0), got "
                         f"{type(key).__name__} {key!r:.60}")
    if not single:
        raise ValueError(f"{name} must be a single PRNG key, got a batch of shape {shape}; "
                         "use jax.vmap to run one selection per key")
    return key


def check_flag(value, name: str, allow_none: bool = False):
    """Return `value` as a Python bool (None kept if `allow_none`), or raise ValueError: a
    string such as "false" would otherwise count as True."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    expected = "True, False or None" if allow_none else "True or False"
    raise ValueError(f"{name} must be {expected}, got {value!r}")


def _real_array(value, name: str) -> np.ndarray:
    """`value` as a NumPy array of real numbers, or ValueError: np.isfinite would fail on a
    string or None with a TypeError naming nothing, and a complex number would pass."""
    v = np.asarray(value)
    if v.dtype != np.bool_ and not (jnp.issubdtype(v.dtype, jnp.floating)
                                    or jnp.issubdtype(v.dtype, jnp.integer)):
        raise ValueError(f"{name} must be a real number, got {value!r:.60}")
    return v


def check_positive(value, name: str, allow_zero: bool = False):
    """Check a traceable hyperparameter when concrete; pass tracers through unchanged."""
    if is_traced(value):
        return value
    v = _real_array(value, name)
    if v.ndim != 0:
        raise ValueError(f"{name} must be a scalar, got shape {v.shape}")
    ok = np.isfinite(v) and (v >= 0 if allow_zero else v > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")
    return value


def check_fraction(value, name: str, low_open: bool = False, high_open: bool = False):
    """Check a traceable fraction in [0, 1] (ends optionally open) when concrete."""
    if is_traced(value):
        return value
    v = _real_array(value, name)
    if v.ndim != 0 or not np.isfinite(v):
        raise ValueError(f"{name} must be a finite scalar, got {value!r}")
    lo_ok = v > 0 if low_open else v >= 0
    hi_ok = v < 1 if high_open else v <= 1
    if not (lo_ok and hi_ok):
        lo = "(0" if low_open else "[0"
        hi = "1)" if high_open else "1]"
        raise ValueError(f"{name} must be in {lo}, {hi}, got {value!r}")
    return value


def check_pool(features, num_rows=None):
    """`check_features`, plus the count of real rows: all of them, or `num_rows` (a prefix; the
    rest is padding added to shard the rows evenly, see `bilaf_jax.sharding`).
    Returns (features, num_rows)."""
    features = check_features(features)
    n = features.shape[0]
    if num_rows is None:
        return features, n
    return features, check_count(num_rows, "num_rows", 1, n)


def check_temperature(value, name: str = "temperature"):
    """A positive temperature must survive float32: tau and 1 / tau both finite and nonzero
    there (1e-39 passes a float64 check but becomes inf in the similarities)."""
    if is_traced(value):
        return value
    with np.errstate(over="ignore", divide="ignore"):
        tau = np.float32(value)
        inverse = np.float32(1.0) / tau
    if not np.isfinite(tau):
        raise ValueError(f"{name} {float(value):g} is too large for float32 (at most 3.4e+38)")
    if not (tau > 0 and np.isfinite(inverse)):
        raise ValueError(f"{name} {float(value):g} is not representable in float32 (1 / {name} "
                         "must be finite): use a value of at least 1e-30")
    return value


def check_float32(value, name: str):
    """A hyperparameter ActiveFT computes with in float32 must be a normal float32 number:
    1e39 becomes inf (NaN centroids) and 1e-46 zero (no gradient) without a word."""
    if is_traced(value):
        return value
    with np.errstate(over="ignore", under="ignore"):
        v32 = np.float32(value)
    if not np.isfinite(v32):
        raise ValueError(f"{name} {float(value):g} is too large for float32 (at most 3.4e+38)")
    if value != 0 and abs(v32) < np.finfo(np.float32).tiny:
        raise ValueError(f"{name} {float(value):g} is too small for float32 (at least 1.2e-38)")
    return value


def check_exclude(exclude, num_rows: int, num_samples: int, total: int | None = None):
    """Turn `exclude` (indices of already-labelled rows, or None) into a bool mask or None.

    Indices must lie in [0, num_rows); the mask has `total` entries (default num_rows), padding
    rows left False. Raises ValueError when indices are invalid or fewer than `num_samples` rows
    remain.
    """
    if exclude is None:
        return None
    idx = check_indices(exclude, num_rows, "exclude")
    if num_rows - idx.size < num_samples:
        raise ValueError(f"only {num_rows - idx.size} rows are not excluded, fewer than the {num_samples} requested")
    mask = np.zeros(num_rows if total is None else total, bool)
    mask[idx] = True
    return mask


def unavailable_rows(excluded, n: int, num_rows: int):
    """bool[n] of rows a selector may not pick (excluded or padding), or None when all may be."""
    if excluded is None and num_rows == n:
        return None
    mask = np.zeros(n, bool) if excluded is None else excluded.copy()
    mask[num_rows:] = True
    return mask
