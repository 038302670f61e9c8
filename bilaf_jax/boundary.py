"""Stage 2 of BiLAF: denoise each pseudo-class, then pick boundary samples (paper Sec. 3.3).

`bilaf(key, features, core_indices, budget)` assigns every pool sample to its nearest core
(pseudo-classes), shrinks each pseudo-class with Iterative Density-based Clustering (IDC,
Eq. 3), splits the budget over the classes, and picks per class the samples with the lowest
boundary score (Eq. 4-7), removing the neighbours of every pick.

Two modes:
  "paper"     the equations and Algorithm 1 as written (see `bilaf`).
  "official"  the authors' released script, quirks included (see `bilaf`), so that with
              float64 features under `jax.enable_x64(True)` the selected list is identical,
              index for index, on tie-free features.

Layout: pseudo-classes have different sizes, so each class is padded to a static size P
(powers of two, then quarter-octave steps) and classes of equal P form a bucket. The budget
split comes first (IDC's kept sizes follow from the class sizes alone); then one jitted
program per bucket takes its classes a batch at a time (similar sizes together): it builds
each class's [P, P] distance matrix once, runs IDC for the whole batch in lockstep, and runs
the selection rounds of the whole batch together, so one class's long loop does not
serialise the others. On a CPU device the batches of a bucket are dealt over one part per
core and the parts run in threads: XLA runs a program's loops on one thread, programs called
from several threads side by side. Work and memory per class are O(P^2); nothing of size
[n, n] or [n, K] is ever built. The budget is not a compile-time constant of these
programs: a new budget on the same pool recompiles nothing heavy. The bucket plan is made on
the host from the pseudo-labels, so `bilaf` itself is not jittable, but its float
hyperparameters (`remove_fraction`, `ring_fraction`, `opponent_penalty`) stay traceable in
both modes:
`jax.vmap(lambda p: bilaf(key, f, c, B, remove_fraction=p).indices)(ps)` works.

On CPU, XLA's sort, top-k and argmin are slow (a sort costs ~90 ns per element; see
`scripts/bench_reductions.py`), so every ordering here is a chain of plain min-reductions:
ring members and removed candidates are taken one at a time as (value, tie-key) minima, many
at once by a bisection over the bits of the key (`_smallest_set`), and each new cluster
member's distances are inserted into every row's sorted list of its k nearest members
(`_insert`), k entries per row laid over a leading axis with the rows as vector lanes.

Dimension glossary: see `bilaf_jax.distances`. Here also P (padded class size), C (classes in
a batch), T (opponent cores kept per sample), S (picks kept per class).
"""

from __future__ import annotations

import concurrent.futures
import fractions
import functools
import os
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bilaf_jax import distances
from bilaf_jax._as_numpy import divide, nonnegative_product, numpy_sum
from bilaf_jax._validation import (
    check_count,
    check_flag,
    check_fraction,
    check_indices,
    check_pool,
    check_positive,
    is_traced,
)
from bilaf_jax.sharding import process_local, real_rows, to_host

MODES = ("paper", "official")
# Opponent cores tracked per sample in paper mode (Eq. 7 min); an exact scan over all K cores
# runs only in rounds where the tracked minimum of some candidate could be beaten by an
# untracked core (see `scores` in `_process_batch`).
NUM_OPPONENTS = 16
# The official script masks the own core with this value before taking the min.
_OWN_CORE_DISTANCE = 1e9 + 7
_MIN_PAD = 16
# Bucket planning heuristic (see _group_pads): a weight for compiling one more bucket program
# and one per padded distance-matrix element per feature dimension. These are weights, not
# measured costs: a bucket program takes about 0.7-0.9 s to compile for the 50,000-sample
# benchmark on a 2-core CPU (`scripts/bench_boundary.py --profile`), and padding costs less
# than its weight, but padding is paid on every call and compilation once per process (or
# once per machine with the compilation cache). A lower compile weight leans towards less
# padding and a faster steady state, a higher one towards fewer programs and a faster first
# call.
_COMPILE_SECONDS = 1.0
_ELEMENT_SECONDS = 6e-11
# Classes processed together: at most this many elements in their [C, P, max(P, d)] arrays.
# Small batches keep a batch's matrices in cache: on the 50,000-sample mixture
# (`scripts/bench_boundary.py --clusters 100 --budgets 2500 --in-process --batch-elements N`)
# 2^21 ran 0.276 / 0.357 s steady (official / paper), 2^20 0.276 / 0.393 s, 2^22 0.328 /
# 0.441 s. On accelerators a batch's loop steps are short kernels whose launch latency, not
# their work, sets the pace, and the steps of one batch follow each other: a batch takes about
# as many steps as its largest class has samples. At ImageNet scale (n = 1,281,167, K = 6,405;
# `python scripts/bench_scale.py --plan-steps 21,23,25,27`) the batches' steps add up to 210,477
# at 2^21 elements, 55,838 at 2^23, 15,557 at 2^25 and 5,584 at 2^27, so accelerators take
# 2^25 (arrays of 128 MB in float32). Not yet timed on a GPU: `scripts/gpu_bench.sh` times
# 2^23 / 2^25 / 2^27.
_BATCH_ELEMENTS = 1 << 21
_ACCELERATOR_BATCH_ELEMENTS = 1 << 25
# Bucket parts run at once on a CPU device (None: the CPU cores this process may use, at most
# _MAX_CPU_PARTS; 0: plain jitted calls, as on other devices; see `_num_parts`).
_CPU_PARTS = None
_MAX_CPU_PARTS = 16
# XLA options for the class programs on CPU: XLA's older fusion code generator compiles
# them faster (see BENCHMARKS.md; on a first call compilation dominates).
_CPU_COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False}
# Elements of the [c, P, K] distances to all cores in a paper-mode full Eq. 7 scan, and the
# most kept per batch between rounds (beyond that they are recomputed each time needed).
_CORE_BLOCK_ELEMENTS = 1 << 22
_CORE_CACHE_ELEMENTS = 1 << 24
# Rows (and columns) per block of the within-class distances (blocks past a batch's largest
# class are skipped).
_ROW_BLOCK = 64
# Candidates removed per round one at a time; larger quotas are found by bisection.
_EXTRACT_QUOTA = 24


class BilafOutput(NamedTuple):
    """Result of `bilaf`.

    indices: int32[B] selected pool indices: class blocks in ascending core order, each block
      starting with its core, then in pick order. Official mode may repeat samples (warned).
    pseudo_labels: int32[n] position (in the sorted core list) of each sample's pseudo-class.
    kept: bool[n] True for samples left in their pseudo-class after IDC denoising.
    boundary_score: float[n] Eq. 4 boundary score before any opponent penalty, over the
      denoised classes; +inf for samples not kept (and everywhere when K == 1 in paper mode).
    allocation: int32[K] budget given to each pseudo-class.
    """

    indices: jax.Array
    pseudo_labels: jax.Array
    kept: jax.Array
    boundary_score: jax.Array
    allocation: jax.Array


# --------------------------------------------------------------------------------------------
# Stage A: assignment to the nearest core and the nearest opponent cores, and the budget split
# (one program: it needs only the class sizes).


class _Assignment(NamedTuple):
    features: jax.Array       # [n, d] rows measured (normalised and/or translated), or None
                              # where they are the input (returning it would copy it)
    cores: jax.Array          # [K, d] core features
    labels: jax.Array         # int32[n]
    core_dist: jax.Array      # [n, T1] distances to the T1 nearest cores, ascending
    core_index: jax.Array     # int32[n, T1] their positions
    allocation: jax.Array     # int32[K] budget per class
    use_all: jax.Array        # bool, paper mode: denoising waived (too few kept samples)


def _direct_chunk(rows: int, d: int, chunk_size: int) -> int:
    # Explicit differences cost [c, rows, d] per block: keep a block near 2^24 elements.
    return max(1, min(chunk_size, (1 << 24) // max(1, rows * d)))


def _ordered_chunk(rows: int, chunk_size: int) -> int:
    # `distances.pairwise(direct=True)` adds feature after feature into one [c, rows] sum:
    # 2^18 elements (2 MB in float64) stay in cache, and blocks that large keep the loop's
    # per-feature steps few.
    return max(1, min(chunk_size, (1 << 18) // max(1, rows)))


def _rows(features, *, normalize, centre):
    """The rows every distance is measured on: normalised if asked, then translated by
    `distances.centring_shift` if `centre` (the Gram form's accuracy; distances unchanged)."""
    x = distances.normalize(features) if normalize else features
    return x - distances.centring_shift(x) if centre else x


@functools.partial(jax.jit, static_argnames=("normalize",))
def _needs_centring(features, *, normalize):
    return jnp.any(distances.centring_shift(_rows(features, normalize=normalize, centre=False)) != 0)


def _assign(features, core_indices, budget, ring_fraction, remove_fraction, *, num_nearest,
            normalize, centre, direct, chunk_size, mode, precision=None):
    x = _rows(features, normalize=normalize, centre=centre)
    cores = x[core_indices]
    chunk = _ordered_chunk(cores.shape[0], chunk_size) if direct else chunk_size
    nb = distances.knn(x, cores, num_nearest, "euclidean", chunk_size=chunk, direct=direct,
                       precision=precision)
    if precision is not None:
        nb = _remeasure(x, cores, nb.index, _direct_chunk(num_nearest, x.shape[1], chunk_size))
    labels = nb.index[:, 0]
    if mode == "paper":  # a core always belongs to its own pseudo-class
        labels = labels.at[core_indices].set(jnp.arange(core_indices.shape[0], dtype=jnp.int32))
    sizes = jnp.bincount(labels, length=core_indices.shape[0]).astype(jnp.int32)
    alloc, use_all = _split_budget(sizes, budget, ring_fraction, remove_fraction, mode=mode,
                                   dtype=x.dtype)
    return _Assignment(x if normalize or centre else None, cores, labels, nb.distance, nb.index,
                       alloc, use_all)


_assign_jit = jax.jit(_assign, static_argnames=("num_nearest", "normalize", "centre", "direct",
                                                "chunk_size", "mode", "precision"))


def _remeasure(x, cores, index, chunk_size):
    """The nearest cores found with reduced-precision matmuls, measured again in the features'
    precision (explicit differences) and re-sorted by (distance, position). Reduced precision
    thus only shortlists each sample's T1 nearest cores; its labels and the distances that the
    boundary scores use are exact among them. [n, d], [K, d], int32[n, T1] -> Neighbours."""

    def block(rows):
        xb, ib = x[rows], index[rows]
        diff = xb[:, None, :] - cores[ib]  # [c, T1, d]
        dist = jnp.sqrt(jnp.sum(diff * diff, axis=-1))
        return lax.sort((dist, ib), dimension=1, num_keys=2)

    dist, idx = distances.map_rows(block, jnp.arange(x.shape[0]), chunk_size)
    return distances.Neighbours(dist, idx)


# --------------------------------------------------------------------------------------------
# Host-side plan: classes grouped by padded size.


class _Bucket(NamedTuple):
    classes: np.ndarray       # int32[C] class ids; padding classes carry id 0 and count 0
    members: np.ndarray       # int32[C, P] pool indices, ascending; padding = 0
    counts: np.ndarray        # int32[C] class sizes
    core_local: np.ndarray    # int32[C] position of the core among the members
    batch: int                # classes processed together (divides C)


def _pad_size(m: int) -> int:
    """Smallest padded class size >= m: powers of two up to 512, then quarter-octave steps
    (1024, 1280, 1536, 1792, 2048, 2560, ...) so that big classes waste at most 25% per side."""
    if m <= 512:
        return max(_MIN_PAD, 1 << int(np.ceil(np.log2(max(m, 1)))))
    step = 1 << (int(np.floor(np.log2(m - 1))) - 2)
    return int(-(-m // step) * step)


def _batch_elements(x: jax.Array) -> int:
    """Element budget of a class batch's arrays for features `x` (by the devices holding it)."""
    on_cpu = all(dev.platform == "cpu" for dev in x.devices())
    return _BATCH_ELEMENTS if on_cpu else _ACCELERATOR_BATCH_ELEMENTS


def _batching(c: int, p: int, d: int, elements: int) -> tuple[int, int]:
    """(padded class count, batch): as few equal batches as `elements` per array allows."""
    most = max(1, elements // (p * max(p, d)))
    num = -(-c // most)
    batch = -(-c // num)
    return num * batch, batch


def _group_pads(counts: np.ndarray, d: int) -> np.ndarray:
    """Padded size per class: power-of-two sizes, with neighbouring sizes merged into one
    bucket where the extra padded work costs less than compiling another bucket program.

    Optimal contiguous grouping of the size grid by dynamic programming over
    cost(group) = _COMPILE_SECONDS + sum(classes x P_group^2) x per-element weight
    (weights, not measured seconds: see the constants).
    """
    pads = np.array([_pad_size(int(m)) for m in counts])
    grid = np.unique(pads)
    num = np.array([np.sum(pads == g) for g in grid], np.float64)
    per_element = (d + 32) * _ELEMENT_SECONDS
    best = np.full(grid.size + 1, np.inf)
    best[0] = 0.0
    cut = np.zeros(grid.size + 1, int)
    for hi in range(1, grid.size + 1):
        for lo in range(hi):
            cost = best[lo] + _COMPILE_SECONDS + num[lo:hi].sum() * float(grid[hi - 1]) ** 2 \
                * per_element
            if cost < best[hi]:
                best[hi], cut[hi] = cost, lo
    target = np.zeros(grid.size, grid.dtype)
    hi = grid.size
    while hi > 0:
        lo = cut[hi]
        target[lo:hi] = grid[hi - 1]
        hi = lo
    return target[np.searchsorted(grid, pads)]


def _parts(bucket: _Bucket, num: int) -> list[_Bucket]:
    """The bucket's batches dealt over `num` parts of equal shape (so one program serves
    them all; the last batches of a part may be empty classes). Batches go round-robin:
    sizes ascend along the bucket, so the parts get similar work."""
    batches = bucket.classes.shape[0] // bucket.batch
    num = max(1, min(num, batches))
    if num == 1:
        return [bucket]
    per = -(-batches // num)
    out = []
    for part in range(num):
        ids = np.arange(part, batches, num)
        rows = (ids[:, None] * bucket.batch + np.arange(bucket.batch)).reshape(-1)
        pad = (per - ids.size) * bucket.batch
        out.append(_Bucket(*(np.concatenate([v[rows], np.zeros((pad,) + v.shape[1:], v.dtype)])
                             for v in bucket[:4]), bucket.batch))
    return out


def _num_parts(x: jax.Array) -> int:
    """Bucket parts to run at once: the CPU cores when `x` lives on one CPU device (XLA runs
    one program's loops on one thread; programs called from several threads run side by
    side), else 0 (plain jitted calls)."""
    devices = x.devices()
    if len(devices) != 1 or next(iter(devices)).platform != "cpu":
        return 0
    if _CPU_PARTS is not None:
        return _CPU_PARTS
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # Each part holds one batch's arrays while it runs (in paper mode up to about 100 MB in
    # float32, 150 MB in float64: the cached distances to every core).
    return max(1, min(cores or 1, _MAX_CPU_PARTS))


def _plan(labels: np.ndarray, core_indices: np.ndarray, d: int,
          batch_elements: int) -> list[_Bucket]:
    num_classes = core_indices.shape[0]
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=num_classes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pads = _group_pads(counts, d)
    buckets = []
    for p in np.unique(pads):
        ids = np.nonzero(pads == p)[0]
        # Similar sizes share a batch: its loops run as long as its largest class needs.
        ids = ids[np.argsort(counts[ids], kind="stable")]
        c, batch = _batching(ids.size, int(p), d, batch_elements)
        classes = np.zeros(c, np.int32)
        members = np.zeros((c, p), np.int32)
        cnt = np.zeros(c, np.int32)
        core_local = np.zeros(c, np.int32)
        for row, j in enumerate(ids):
            mem = order[starts[j]:starts[j] + counts[j]]
            classes[row], cnt[row] = j, counts[j]
            members[row, :counts[j]] = mem
            core_local[row] = int(np.searchsorted(mem, core_indices[j]))
        buckets.append(_Bucket(classes, members, cnt, core_local, batch))
    return buckets


# --------------------------------------------------------------------------------------------
# Stage B: IDC denoising (Eq. 3), one pseudo-class at a time (vmapped over a batch of classes).


def _class_distances(xc, valid, rows, *, direct):
    """[C, P, P] Euclidean distances within each padded class of a batch `xc` [C, P, d]:
    exactly symmetric (rows can stand in for columns), 0 on the diagonal and off the class
    (every reader masks padding; zeros there let sums run over whole rows).

    Only [_ROW_BLOCK, _ROW_BLOCK] blocks on or above the diagonal and inside the first `rows`
    rows (the batch's largest class; the rest is padding in every class) are computed; each
    is mirrored below. direct=True: from explicit differences as scipy's cdist, one class at a
    time ((a - b)^2 == (b - a)^2, so the mirror is what cdist gives); else the Gram form.
    """
    num, p, _ = xc.shape
    block = min(p, _ROW_BLOCK)  # divides P (see _pad_size)
    # Block pairs (i <= j) ordered by j: those inside the first nb blocks come first.
    pairs = np.array([(i, j) for j in range(p // block) for i in range(j + 1)], np.int32)
    pair_i, pair_j = jnp.asarray(pairs[:, 0]), jnp.asarray(pairs[:, 1])
    nb = (rows + block - 1) // block
    tri = jnp.arange(block)[:, None] < jnp.arange(block)[None, :]

    def pair_distances(xi, xj):
        if direct:  # one class at a time bounds the [block, block, d] differences in flight
            return lax.map(lambda ab: distances.pairwise(*ab, "euclidean", direct=True),
                           (xi, xj))
        return jax.vmap(lambda u, v: distances.pairwise(u, v, "euclidean"))(xi, xj)

    def fill(t, dist):
        bi, bj = pair_i[t] * block, pair_j[t] * block
        part = pair_distances(lax.dynamic_slice_in_dim(xc, bi, block, axis=1),
                              lax.dynamic_slice_in_dim(xc, bj, block, axis=1))
        # A diagonal block keeps its upper triangle (the Gram form is not exactly symmetric
        # and leaves sqrt(rounding) on the diagonal; a sample is at 0 from itself).
        sym = jnp.where(tri, part, jnp.where(tri.T, jnp.swapaxes(part, 1, 2), 0.0))
        part = jnp.where(bi == bj, sym, part)
        vi = lax.dynamic_slice_in_dim(valid, bi, block, axis=1)
        vj = lax.dynamic_slice_in_dim(valid, bj, block, axis=1)
        part = jnp.where(vi[:, :, None] & vj[:, None, :], part, 0.0)
        zero = jnp.zeros((), bi.dtype)
        dist = lax.dynamic_update_slice(dist, part, (zero, bi, bj))
        return lax.dynamic_update_slice(dist, jnp.swapaxes(part, 1, 2), (zero, bj, bi))

    return lax.fori_loop(0, nb * (nb + 1) // 2, fill, jnp.zeros((num, p, p), xc.dtype))


class ScriptFailure(ValueError):
    """Official mode reached a state where the authors' script fails (divides by zero, or loses
    a core); `bilaf run` records these as failed selections."""


class Ratio(NamedTuple):
    """A fraction hyperparameter: its float `value`, and where it was given as a number, the
    same as `num / den` in lowest terms (int32; den = 0 when traced), so paper mode's floors are
    exact: float32 cannot tell 1001 x 0.999 = 999.999 from 1000."""

    value: jax.Array
    num: jax.Array
    den: jax.Array

    @classmethod
    def of(cls, p) -> Ratio:
        if isinstance(p, cls):
            return p
        if is_traced(p):
            return cls(p, jnp.int32(0), jnp.int32(0))
        v = np.asarray(p)[()]
        # the shortest decimal of the value (0.1 for float32(0.1)): the number the user wrote
        exact = fractions.Fraction(np.format_float_positional(v, unique=True, trim="0"))
        num, den = exact.numerator, exact.denominator
        if not 0 <= num <= den or den * (num + 1) >= 2**31:  # int32 sums would overflow
            num = den = 0
        return cls(p, jnp.int32(num), jnp.int32(den))


def _times(m, f: Ratio, *, ftype, ceil=False):
    """floor(m f) (or ceil) for int32 m: exact from num / den where known, else in float
    allowing a few ulps towards the nearest integer (90 (1 - 0.3) is 63, not 62.99999)."""
    den = jnp.maximum(f.den, 1)
    q, r = m // den, m % den  # m num / den = q num + r num / den, with r num < 2**31
    exact = q * f.num + ((r * f.num + den - 1) // den if ceil else (r * f.num) // den)
    x = m.astype(ftype) * jnp.asarray(f.value, ftype)
    slack = 8 * jnp.finfo(ftype).eps * x
    approx = (jnp.ceil(x - slack) if ceil else jnp.floor(x + slack)).astype(jnp.int32)
    return jnp.where(f.den > 0, exact, approx).astype(jnp.int32)


def _ring_plan(m, ring_fraction, remove_fraction, *, mode, ftype):
    """Ring size, cluster target and kept count of IDC for a class of `m` samples.

    The kept count depends only on m, so the budget can be split before denoising runs.
    """
    ring_fraction, remove_fraction = Ratio.of(ring_fraction), Ratio.of(remove_fraction)
    if mode == "official":  # the script's float arithmetic: int(90 * (1 - 0.3)) is 62
        # Python floats are float64 whatever the features' dtype (float32 makes that 63); JAX
        # computes in float64 where x64 is enabled, as `select` and the CLI do.
        ftype = jnp.result_type(float)
        ring = jnp.floor(m.astype(ftype) * ring_fraction.value).astype(jnp.int32)
        ring = jnp.maximum(1, ring)
        target = ring * (m // ring)  # the remainder after the last full ring is dropped
        keep = jnp.floor(target.astype(ftype) * (1.0 - remove_fraction.value)).astype(jnp.int32)
        return ring, target, jnp.where(m < 10, m, keep)  # the script skips small classes
    # The equations' floors: floor(m (1 - P_rm)) = m - ceil(m P_rm).
    ring = jnp.maximum(1, _times(m, ring_fraction, ftype=ftype))
    keep = m - _times(m, remove_fraction, ftype=ftype, ceil=True)
    return ring, m, jnp.where(m > 0, jnp.maximum(keep, 1), 0)


class _RingState(NamedTuple):
    """IDC state of a batch of classes (leading axis C)."""

    in_cluster: jax.Array  # bool[C, P]
    position: jax.Array    # int32[C, P] inclusion position; P for samples never included
    near: jax.Array        # [C, V, k, P] the k nearest cluster members of each row,
                           # ascending: distance, and (official mode, V = 2) the value the
                           # script averages for it (see `_idc`)
    size: jax.Array        # int32[C] current cluster sizes


def _insert(near, new):
    """Insert `new` [C, V, R] into each column of `near` [C, V, k, R], ascending in its
    first value (+inf padded), after the entries equal to it (+inf: no change); the other
    V - 1 values move along."""
    new = new[:, :, None]
    prev = jnp.concatenate([near[:, :, :1], near[:, :, :-1]], axis=2)
    if near.shape[1] == 1:  # values only: a clamp
        return jnp.minimum(near, jnp.maximum(prev.at[:, :, 0].set(-jnp.inf), new))
    # The new entry's slot (entries <= it stay), then one select: entry j keeps its value
    # before the slot, takes the new one at it, and its predecessor's after it.
    slot = jnp.sum(near[:, :1] <= new[:, :1], axis=2, keepdims=True)
    j = lax.broadcasted_iota(jnp.int32, near.shape, 2)
    return jnp.where(j < slot, near, jnp.where(j == slot, new, prev))


def _idc(dist, valid, m, core, ring_fraction, remove_fraction, *, mode, num_neighbors):
    """Inclusion positions [C, P] and kept mask [C, P] of a batch of classes (Eq. 3);
    `dist` [C, P, P] (padding never read), `m` [C] class sizes, `core` [C] local core ids.

    Each ring appends its samples one at a time, lowest (key, local id) first, so positions
    follow the script's tuple sort; each appended sample's distances go at once into every
    row's running k nearest cluster members (after equal entries: the lower position wins
    a tie, as in the script's stable sort). The last ring inserts nothing: no density is
    read after it. Classes run in lockstep; loop bounds are the batch's largest.
    """
    num, p, _ = dist.shape
    local = jnp.arange(p, dtype=jnp.int32)
    batch = jnp.arange(num)
    ftype = dist.dtype
    ring, target, keep = _ring_plan(m, ring_fraction, remove_fraction, mode=mode, ftype=ftype)
    k = min(num_neighbors, p)

    def append(s, key, count, *, insert):
        def one(j, s):
            go = j < count                                                   # [C]
            free = valid & ~s.in_cluster
            low = jnp.min(jnp.where(free, key, jnp.inf), axis=1, keepdims=True)
            i = jnp.min(jnp.where(free & (key == low), local, p), axis=1)
            hit = (local[None, :] == i[:, None]) & go[:, None]
            near = s.near
            if insert:
                new = jnp.where(go[:, None], dist[batch, jnp.minimum(i, p - 1)], jnp.inf)
                if mode == "official":
                    # The script averages the distance to the sample whose local id equals
                    # the member's position (rows for columns: dist is symmetric).
                    new = jnp.stack([new, dist[batch, jnp.minimum(s.size, p - 1)]], axis=1)
                near = _insert(s.near, new.reshape(num, -1, p))
            return _RingState(s.in_cluster | hit,
                              jnp.where(hit, s.size[:, None], s.position),
                              near, s.size + go.astype(jnp.int32))

        return lax.fori_loop(0, jnp.max(count), one, s)

    values = 2 if mode == "official" else 1
    state = _RingState(jnp.zeros((num, p), bool), jnp.full((num, p), p, jnp.int32),
                       jnp.full((num, values, k, p), jnp.inf, ftype), jnp.zeros(num, jnp.int32))
    first_key = dist[batch, core]
    if mode == "paper":
        first_key = jnp.where(local[None, :] == core[:, None], -jnp.inf, first_key)

    def ring_key(s):
        """The first ring: nearest to the core; later rings: lowest density (Eq. 3)."""
        count = jnp.clip(s.size, 1, k)
        vals = s.near[:, -1]  # official: the script's values; paper: the distances
        if mode == "official":  # np.mean of the values in the script's order
            total = jax.vmap(lambda v, c: numpy_sum(lambda q: v[q], c, k))(vals, count)
        else:
            use = jnp.arange(k)[None, :, None] < count[:, None, None]
            total = jnp.sum(jnp.where(use, vals, 0.0), axis=1)
        density = divide(total, count.astype(ftype)[:, None])
        return jnp.where((s.size == 0)[:, None], first_key, density)

    # Every ring but a class's last inserts its samples into the k-NN lists; then the last
    # rings of all classes only append.
    def more(s):
        return s.size + ring < target

    state = lax.while_loop(
        lambda s: jnp.any(more(s)),
        lambda s: append(s, ring_key(s), jnp.where(more(s), ring, 0), insert=True), state)
    state = append(state, ring_key(state), target - state.size, insert=False)
    kept = state.in_cluster & (state.position < keep[:, None])
    if mode == "paper":
        return state.position, kept
    skip = (m < 10)[:, None]  # the script leaves small classes untouched
    kept = jnp.where(skip, valid, kept)
    position = jnp.where(skip, jnp.where(valid, local, p), state.position)
    return position, kept


# --------------------------------------------------------------------------------------------
# Budget allocation (step 4).


def _allocate_official(sizes, budget):
    """floor(p_i B), then each leftover unit to the smallest allocation (ties: larger class,
    then lower index), as the script does. May give 0 or more than the class size."""
    ftype = jnp.result_type(float)
    # The script's p_i is an IEEE quotient; as a product with the reciprocal 22 / 55 is
    # 0.39999999999999997, not 0.4, and floor then loses a unit where p_i B is whole.
    prop = divide(sizes.astype(ftype), jnp.sum(sizes).astype(ftype))
    alloc = jnp.floor(prop * budget).astype(jnp.int32)

    def body(state):
        alloc, left = state
        low = alloc == jnp.min(alloc)
        big = low & (sizes == jnp.max(jnp.where(low, sizes, -1)))
        return alloc.at[jnp.argmax(big)].add(1), left - 1


    alloc, _ = lax.while_loop(lambda s: s[1] > 0, body, (alloc, budget - jnp.sum(alloc)))
    return alloc


def _allocate_paper(caps, budget):
    """Largest remainder (Hamilton) with 1 <= B_i <= caps_i; needs K <= budget <= sum(caps).

    Quota q_i = B caps_i / sum(caps); start from clip(floor(q_i), 1, caps_i); then add units
    to the largest remainders q_i - B_i (ties: lower index) or take units from the smallest.
    """
    ftype = jnp.result_type(float)
    quota = caps.astype(ftype) * budget / jnp.sum(caps).astype(ftype)
    alloc = jnp.clip(jnp.floor(quota).astype(jnp.int32), 1, caps)

    def body(alloc):
        rem = quota - alloc.astype(ftype)
        short = jnp.sum(alloc) < budget
        up = jnp.argmax(jnp.where(alloc < caps, rem, -jnp.inf))
        down = jnp.argmin(jnp.where(alloc > 1, rem, jnp.inf))
        return jnp.where(short, alloc.at[up].add(1), alloc.at[down].add(-1))

    return lax.while_loop(lambda a: jnp.sum(a) != budget, body, alloc)


# --------------------------------------------------------------------------------------------
# Stage C: boundary scores and iterative selection (steps 3, 5), a batch of classes at once.


class _Global(NamedTuple):
    """Arrays every class reads: pool features, core features, nearest cores per sample."""

    features: jax.Array   # [n, d]
    cores: jax.Array      # [K, d]
    core_dist: jax.Array  # [n, T1]
    core_index: jax.Array  # int32[n, T1]


class _Class(NamedTuple):
    """One padded class, or a batch of them with a leading axis."""

    cls: jax.Array        # int32 class id
    members: jax.Array    # int32[P] pool indices, ascending
    count: jax.Array      # int32 class size m (0: padding class)
    core: jax.Array       # int32 local id of the core


class _Pick(NamedTuple):
    """Selection state of a batch of classes (leading axis C)."""

    picks: jax.Array      # int32[C, S] pool indices in pick order
    cand: jax.Array       # bool[C, P] remaining candidates
    to_cores: jax.Array   # [C, P, K] distances to every core once a full scan ran (paper), or a
                          # [1, 1, 1] placeholder where that would be too big
    have_cores: jax.Array  # bool, to_cores filled
    intra: jax.Array      # [C, P] sum of distances to the remaining candidates (paper)
    hits: jax.Array       # [C, K] penalty factor per opponent class
    factor: jax.Array     # [C, T1, P] paper: hits of each sample's tracked opponents, kept
                          # alongside (no gather per round); official: [1, 1, 1] placeholder
    node: jax.Array       # int32[C] local id of the last pick
    t: jax.Array          # int32[C] picks made


def _opponents_official(core_dist, core_index, own):
    """The script's d_inter and opponent: own core masked by 1e9+7, first argmin."""
    if core_dist.shape[1] == 1:
        shape = own.shape
        return jnp.full(shape, _OWN_CORE_DISTANCE, core_dist.dtype), own
    d1, i1 = core_dist[:, 1], core_index[:, 1]
    big = jnp.asarray(_OWN_CORE_DISTANCE, core_dist.dtype)
    outer = jnp.minimum(d1, big)
    opp = jnp.where(d1 < big, i1, jnp.where(d1 == big, jnp.minimum(own, i1), own))
    return outer, opp


def _eq7_term(d_inter, factor, d_intra):
    """One term of Eq. 7, (D_l delta^{t_l} - a) / max(D_l, a), with `factor` = delta^{t_l};
    0 where both distances are 0."""
    den = jnp.maximum(d_inter, d_intra)
    return jnp.where(den > 0, (d_inter * factor - d_intra) / jnp.where(den > 0, den, 1.0), 0.0)


def _all_core_terms(to_cores, own, intra_mean, hits):
    """Eq. 7 over every core but the own, min_l (D_l delta^{t_l} - a) / max(D_l, a):
    to_cores [P, K], own int32[P], intra_mean [P], hits [K] (delta^{t_l}) -> [P]."""
    f = _eq7_term(to_cores, hits[None, :], intra_mean[:, None])
    other = jnp.arange(hits.shape[0], dtype=own.dtype)[None, :] != own[:, None]
    return jnp.min(jnp.where(other, f, jnp.inf), axis=1)


def _first(mask, *keys):
    """[C, P] one-hot of the lexicographically smallest (keys...) entry where `mask`, per row
    (all False in rows without one); every key is [C, P] and the last must be unique."""
    for key in keys:
        big = jnp.inf if jnp.issubdtype(key.dtype, jnp.floating) else jnp.iinfo(key.dtype).max
        low = jnp.min(jnp.where(mask, key, big), axis=1, keepdims=True)
        mask = mask & (key == low)
    return mask


def _sortable(key):
    """Unsigned integers in the order of the float `key` (-inf < ... < +inf; no NaN)."""
    itype, utype = (jnp.int64, jnp.uint64) if key.dtype == jnp.float64 else (jnp.int32,
                                                                               jnp.uint32)
    key = jnp.where(key == 0, jnp.zeros_like(key), key)  # -0.0 sorts as +0.0
    bits = lax.bitcast_convert_type(key, itype)
    sign = jnp.asarray(jnp.iinfo(itype).min, itype)
    # Negative floats: flip all bits but the sign; then flip the sign for an unsigned order.
    flipped = jnp.where(bits < 0, ~bits | sign, bits)
    return lax.bitcast_convert_type(flipped ^ sign, utype)


def _smallest_set(mask, key, tie, count):
    """[C, P] mask of the `count` [C] entries of lowest (key, tie) where `mask`, per row.

    The count-th smallest key comes from a bisection over its bits (32 or 64 counting passes,
    whatever the count); entries equal to it are taken in tie order, one at a time (ties are
    rare). `tie` must be unique within `mask`.
    """
    u = _sortable(key)
    nbits = 8 * u.dtype.itemsize
    one = jnp.asarray(1, u.dtype)

    def bit(b, t):
        # (b is a Python int when jit is disabled)
        trial = t | (one << jnp.asarray(nbits - 1 - b).astype(u.dtype))
        below = jnp.sum(mask & (u < trial[:, None]), axis=1)
        return jnp.where(below < count, trial, t)

    t = lax.fori_loop(0, nbits, bit, jnp.zeros(key.shape[0], u.dtype))  # the count-th key
    take = mask & (u < t[:, None])
    need = count - jnp.sum(take, axis=1)
    equal = mask & (u == t[:, None])

    def tied(state):
        take, equal, need = state
        first = _first(equal & (need > 0)[:, None], tie)
        return take | first, equal & ~first, need - jnp.any(first, axis=1)

    take, _, _ = lax.while_loop(lambda s: jnp.any((s[2] > 0) & jnp.any(s[1], axis=1)), tied,
                                (take, equal, need))
    return take


def _process_batch(g, c, use_all, alloc, ring_fraction, remove_fraction, opponent_penalty, *,
                   mode, num_neighbors, direct, chunk_size, width):
    """Denoise and select one batch of classes (leading axis C) of padded size P.

    Returns picks int32[C, S], boundary score [C, P], kept bool[C, P], core kept bool[C].
    """
    num, p = c.members.shape
    num_classes = g.cores.shape[0]
    local = jnp.arange(p, dtype=jnp.int32)
    valid = local[None, :] < c.count[:, None]
    xc = g.features[c.members]                                             # [C, P, d]
    row_limit = jnp.max(c.count)  # rows past the batch's largest class: padding in all
    dist = _class_distances(xc, valid, row_limit, direct=direct)
    position, kept = _idc(dist, valid, c.count, c.core, ring_fraction, remove_fraction,
                          mode=mode, num_neighbors=num_neighbors)
    core_kept = jnp.take_along_axis(kept, c.core[:, None], axis=1)[:, 0]
    ftype = dist.dtype

    own = jnp.broadcast_to(c.cls[:, None], (num, p))
    od, oi = g.core_dist[c.members], g.core_index[c.members]              # [C, P, T1]
    if mode == "official":
        pool = kept
        tie = position
        outer, opp = jax.vmap(_opponents_official)(od, oi, own)
    else:
        pool = jnp.where(use_all, valid, kept)
        tie = jnp.broadcast_to(local, (num, p))
        valid_list = jnp.isfinite(od)
        other = valid_list & (oi != own[..., None])
        has_opp = jnp.any(other, axis=2)
        slot = jnp.arange(oi.shape[2], dtype=jnp.int32)
        first_other = jnp.min(jnp.where(other, slot, oi.shape[2] - 1), axis=2)
        near_opp = jnp.take_along_axis(oi, first_other[..., None], axis=2)[..., 0]
        # Tracked opponents laid out [C, T1, P]: the min over them runs across the leading
        # axis with the samples as vector lanes.
        od_t, oi_t, other_t = (jnp.swapaxes(v, 1, 2) for v in (od, oi, other))
    size = jnp.sum(pool, axis=1).astype(jnp.int32)
    if mode == "official":
        # The script's np.mean over each row of its distance matrix between the kept members,
        # which it lists in inclusion order: the same sum, in NumPy's order (whole rows
        # gathered: dist is symmetric).
        order = jnp.zeros((num, p), jnp.int32).at[jnp.arange(num)[:, None], position].set(
            jnp.broadcast_to(local, (num, p)), mode="drop")
        intra0 = jax.vmap(lambda dc, oc, sc: numpy_sum(lambda q: dc[oc[q]], sc, p))(
            dist, order, size)
        inner = divide(intra0, size.astype(ftype)[:, None])  # fixed: the script never updates it
    else:
        # Pinned, as every product of the stage: a GPU's default float32 dot is TF32, whose
        # 10-bit inputs would make these sums (and so the scores) differ from the CPU's.
        intra0 = jnp.einsum("cij,cj->ci", dist, pool.astype(ftype),     # sums to the pool
                            precision=lax.Precision.HIGHEST)
    sizef = size.astype(ftype)
    budget = jnp.where(c.count > 0, alloc[c.cls], 0)                      # padding: nothing
    quota = size // jnp.maximum(budget, 1)
    full_list = g.core_index.shape[1] >= num_classes  # every opponent is tracked
    every = jnp.arange(num_classes, dtype=jnp.int32)
    penalty = jnp.asarray(opponent_penalty).astype(ftype)

    def rows(a, i):
        """a[c, i[c]] for a [C, P, ...] and i int32[C] (whole rows gathered at once)."""
        return a[jnp.arange(a.shape[0]), i]

    def tracked_scores(a, factor):
        """Eq. 7 over the tracked opponents (as `_all_core_terms`, laid out [C, T1, P])."""
        f = _eq7_term(od_t, factor, a[:, None, :])
        return jnp.min(jnp.where(other_t, f, jnp.inf), axis=1)

    def core_one(x):
        """[P, K] distances from one class's rows to every core."""
        if direct:
            chunk = _ordered_chunk(num_classes, chunk_size)
            return distances.pairwise_chunked(x, g.cores, "euclidean", chunk_size=chunk,
                                              direct=True)
        return distances.pairwise(x, g.cores, "euclidean")

    per_map = min(num, max(1, _CORE_BLOCK_ELEMENTS // (p * num_classes)))
    cache = num * p * num_classes <= _CORE_CACHE_ELEMENTS

    def full_scores(a, hits, to_cores):
        if cache:
            return jax.vmap(_all_core_terms)(to_cores, own, a, hits)
        return _map_blocks(lambda v: _all_core_terms(core_one(v[0]), *v[1:]),
                           (xc, own, a, hits), per_map)

    def scores(s):
        """Scores of every row [C, P] and the (possibly filled) core-distance cache."""
        if mode == "official":
            penalised = nonnegative_product(outer, jnp.take_along_axis(s.hits, opp, axis=1))
            sc = (penalised - inner) / jnp.maximum(outer, inner)
            return jnp.where(jnp.isnan(sc), -jnp.inf, sc), s.to_cores, s.have_cores
        remaining = jnp.sum(s.cand, axis=1).astype(ftype)
        a = s.intra / jnp.maximum(remaining, 1.0)[:, None]
        tracked = tracked_scores(a, s.factor)
        if full_list:
            return tracked, s.to_cores, s.have_cores
        # Each term grows with D_l and with its factor (delta >= 1), and every untracked
        # core is at least as far as the farthest tracked one, D_T1: where the tracked
        # minimum is at most the unpenalised term at D_T1, it is the exact Eq. 7 minimum.
        # Otherwise scan every core for the whole batch (late rounds of long selections).
        floor = _eq7_term(od_t[:, -1, :], 1.0, a)
        need = jnp.any(s.cand & (tracked > floor)) | (opponent_penalty < 1)
        to_cores, have = s.to_cores, s.have_cores
        if cache:
            to_cores = lax.cond(need & ~have,
                                lambda: _map_blocks(core_one, xc, per_map),
                                lambda: to_cores)
            have = have | need
        sc = lax.cond(need, full_scores, lambda *_: tracked, a, s.hits, to_cores)
        return sc, to_cores, have

    def round_(s):
        active = s.t < budget
        key = rows(dist, s.node)                                            # [C, P]
        if mode == "paper":
            key = jnp.where(local[None, :] == s.node[:, None], -jnp.inf, key)
        quota_now = jnp.where(active, quota, 0)

        def remove(j, carry):
            # The candidate of lowest (distance to the last pick, tie key) leaves.
            cand, intra = carry
            mask = cand & (j < quota_now)[:, None]
            if mode == "official":
                return cand & ~_first(mask, key, tie), intra
            # Paper: the tie key is the local id, so the (key, id) minimum is found as an id.
            low = jnp.min(jnp.where(mask, key, jnp.inf), axis=1, keepdims=True)
            i = jnp.min(jnp.where(mask & (key == low), local, p), axis=1)  # p: none left
            gone = jnp.where((i < p)[:, None], rows(dist, jnp.minimum(i, p - 1)), 0.0)
            # Algorithm 1: d_intra over the shrinking set.
            return cand & (local[None, :] != i[:, None]), intra - gone

        def remove_bulk(cand, intra):
            # Large quotas (small budgets): one bisection instead of many extractions.
            out = _smallest_set(cand, key, tie, quota_now)
            if mode == "paper":
                intra = intra - jnp.einsum("cij,cj->ci", dist, out.astype(ftype),
                                           precision=lax.Precision.HIGHEST)
            return cand & ~out, intra

        cand, intra = lax.cond(
            jnp.max(quota_now) > _EXTRACT_QUOTA, remove_bulk,
            lambda *carry: lax.fori_loop(0, jnp.max(quota_now), remove, carry), s.cand, s.intra)
        hits, factor = s.hits, s.factor
        if mode == "official":
            # The previous pick's opponent is penalised at the start of this round.
            prev = jnp.take_along_axis(opp, s.node[:, None], axis=1)
            hit = active & (s.node != c.core)
            hits = jnp.where(hit[:, None] & (every[None, :] == prev), hits * penalty,
                             hits)
        sc, to_cores, have = scores(s._replace(cand=cand, intra=intra, hits=hits))
        # Lowest score; ties: nearest to the last pick, then the tie key.
        sc = jnp.where(cand, sc, jnp.inf)
        new_hot = _first(cand, sc, key, tie)
        new = jnp.min(jnp.where(new_hot, local, p - 1), axis=1)
        if mode == "paper":
            # The pick faces its nearest other core; later scores feel the penalty.
            face = active & jnp.take_along_axis(has_opp, new[:, None], axis=1)[:, 0]
            opp_new = jnp.take_along_axis(near_opp, new[:, None], axis=1)
            hits = jnp.where(face[:, None] & (every[None, :] == opp_new),
                             hits * penalty, hits)
            factor = jnp.where(face[:, None, None] & (oi_t == opp_new[:, :, None]),
                               factor * penalty, factor)
        slot = jnp.arange(s.picks.shape[1])[None, :] == s.t[:, None]
        chosen = jnp.take_along_axis(c.members, new[:, None], axis=1)
        picks = jnp.where(active[:, None] & slot, chosen, s.picks)
        return _Pick(picks, cand, to_cores, have, intra, hits, factor,
                     jnp.where(active, new, s.node), s.t + active.astype(jnp.int32))

    first = jnp.take_along_axis(c.members, c.core[:, None], axis=1)
    picks = jnp.zeros((num, width), jnp.int32).at[:, 0].set(first[:, 0])
    hits0 = jnp.ones((num, num_classes), ftype)
    cache_shape = (num, p, num_classes) if cache and mode == "paper" and not full_list \
        else (1, 1, 1)
    factor0 = jnp.ones(od_t.shape if mode == "paper" else (1, 1, 1), ftype)
    start = _Pick(picks, pool, jnp.zeros(cache_shape, ftype), jnp.asarray(False),
                  jnp.where(pool, intra0, 0.0), hits0, factor0, c.core,
                  jnp.ones(num, jnp.int32))
    final = lax.while_loop(lambda s: jnp.any(s.t < budget), round_, start)

    # Boundary score before penalties, for inspection.
    if mode == "official":
        bs = (outer - inner) / jnp.maximum(outer, inner)
    else:
        bs = tracked_scores(jnp.where(pool, intra0, 0.0) / jnp.maximum(sizef, 1.0)[:, None],
                            factor0)
    bs = jnp.where(pool & jnp.isfinite(bs), bs, jnp.inf)
    return final.picks, bs, pool & valid, core_kept


def _map_blocks(f, xs, block: int):
    """`f` over the leading axis of the arrays `xs`, `block` rows at a time: one vmap where a
    block holds them all, else `lax.map` over zero-padded whole blocks.

    Not `lax.map(f, xs, batch_size=block)`: inside a vmapped sweep (hyperparameters batched,
    this `lax.cond` branch taken per setting) its one-step scan returned other rows' values
    on jaxlib 0.10.2 CPU (tests/test_sweep.py: the vmapped Eq. 7 scan equals separate runs).
    """
    n = jax.tree.leaves(xs)[0].shape[0]
    if block >= n:
        return jax.vmap(f)(xs)
    nb = -(-n // block)

    def split(v):
        v = jnp.concatenate([v, jnp.zeros((nb * block - n,) + v.shape[1:], v.dtype)])
        return v.reshape((nb, block) + v.shape[1:])

    out = lax.map(jax.vmap(f), jax.tree.map(split, xs))
    return jax.tree.map(lambda v: v.reshape((nb * block,) + v.shape[2:])[:n], out)


def _bucket(g, c, use_all, alloc, ring_fraction, remove_fraction, opponent_penalty, *,
            batch, **static):
    """`_process_batch` over the classes of one bucket, `batch` classes at a time."""
    def one(cb):
        return _process_batch(g, cb, use_all, alloc, ring_fraction, remove_fraction,
                              opponent_penalty, **static)

    split = jax.tree.map(lambda v: v.reshape((-1, batch) + v.shape[1:]), c)
    out = lax.map(one, split)
    return jax.tree.map(lambda v: v.reshape((-1,) + v.shape[2:]), out)


_bucket_jit = jax.jit(_bucket, static_argnames=("batch", "mode", "num_neighbors", "direct",
                                                "chunk_size", "width"))


def _compile(lowered):
    """Compile a class program for the CPU with _CPU_COMPILER_OPTIONS, or with XLA's
    defaults where this XLA does not know an option (any other error is raised)."""
    if _CPU_COMPILER_OPTIONS:
        try:
            return lowered.compile(compiler_options=_CPU_COMPILER_OPTIONS)
        except RuntimeError as e:  # jax's XLA runtime error
            if "No such compile option" not in str(e):
                raise
    return lowered.compile()


def _run_buckets(g, buckets, args, most, static):
    """Run every bucket: (results, layout), one (picks, score, kept, core kept) tuple and one
    _Class per program call. `args`: the traceable arguments after the class layout; `most`:
    official mode's largest allocation (int[K] per class, or an int bound), else None.

    On one CPU device each bucket is compiled once (`_compile`) and its parts run in threads
    side by side (`_parts`); traced arguments (e.g. vmap over a hyperparameter) or other
    devices take one jitted call per bucket.
    """
    traced = any(map(is_traced, jax.tree.leaves((g, args))))
    num_parts = 0 if traced else _num_parts(g.features)  # 0: plain jitted calls
    if num_parts:  # arrays, not Python scalars: threads do not see this one's x64 setting
        args = jax.tree.map(jnp.asarray, args)

    def run(program, c):
        return jax.block_until_ready(program(g, c, *args))

    results, layout = [], []
    with concurrent.futures.ThreadPoolExecutor(max(num_parts, 1)) as pool:
        for bucket in buckets:
            p = bucket.members.shape[1]
            # Picks per class: at most P, except where official mode repeats samples.
            width = p
            if most is not None:
                top = most if np.ndim(most) == 0 else int(np.max(most[bucket.classes]))
                width = max(p, 1 << int(np.ceil(np.log2(max(top, 1)))))
            parts = [_Class(*(jnp.asarray(v) for v in part[:4]))
                     for part in _parts(bucket, max(num_parts, 1))]
            kw = dict(batch=bucket.batch, width=width, **static)
            if num_parts:  # compile here (once), then run the parts side by side
                program = _compile(_bucket_jit.lower(g, parts[0], *args, **kw))
                results += [pool.submit(run, program, c) for c in parts]
            else:
                results.append(_bucket_jit(g, parts[0], *args, **kw))
            layout += parts
        results = [r.result() if isinstance(r, concurrent.futures.Future) else r
                   for r in results]
    return results, layout


# --------------------------------------------------------------------------------------------
# Public entry point.


def check_options(*, mode, num_neighbors, ring_fraction, remove_fraction, opponent_penalty,
                  precision):
    """Validate `bilaf`'s hyperparameters (a ValueError naming the problem); `select` calls it
    before stage 1, so a bad one fails before minutes of ActiveFT. Returns (num_neighbors,
    precision), the latter None for full float32 precision."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    num_neighbors = check_count(num_neighbors, "num_neighbors", 1, 1 << 30)
    ring_fraction, remove_fraction = (f.value if isinstance(f, Ratio) else f
                                      for f in (ring_fraction, remove_fraction))
    check_fraction(ring_fraction, "ring_fraction", low_open=True)
    check_fraction(remove_fraction, "remove_fraction")
    if mode == "official" and not is_traced(remove_fraction) and float(remove_fraction) >= 1:
        raise ValueError("official mode: remove_fraction = 1 keeps no sample of any pseudo-class "
                         "of 10 or more (the authors' script never ends there); use a value "
                         "below 1")
    check_positive(opponent_penalty, "opponent_penalty")
    if distances.resolve_precision(precision) == lax.Precision.HIGHEST:  # also checks names
        precision = None
    if mode == "official" and precision is not None:
        raise ValueError("official mode computes in float64 as the authors' script does; "
                         f"precision {precision!r} applies to mode='paper' only")
    return num_neighbors, precision


def bilaf(key, features, core_indices, budget: int, *, mode: str = "paper",
          num_neighbors: int = 10, ring_fraction=0.1, remove_fraction=0.1,
          opponent_penalty=1.1, normalize: bool = False,
          chunk_size: int = distances.DEFAULT_CHUNK, direct: bool | None = None,
          precision=None, num_rows: int | None = None) -> BilafOutput:
    """Select `budget` samples: the cores plus the boundary samples of each pseudo-class.

    Args:
      key: unused (the stage is deterministic); kept for the selectors' common signature.
      features: [n, d] pool features (finite). Euclidean distances on them as given, or on
        L2-normalised rows with `normalize=True` (the paper's text; the script does not).
      core_indices: [K] distinct pool indices of the core samples (stage 1). They are sorted
        ascending first; that order defines the pseudo-class ids.
      budget: B, with K <= B <= n (a Python int: it fixes the output shape; the class
        programs do not depend on it).
      mode: "paper" or "official" (static).
      num_neighbors: k of the IDC density (Eq. 3) (static).
      ring_fraction: P_in, ring size max(1, floor(m P_in)) (traceable).
      remove_fraction: P_rm, share of each class dropped by denoising (traceable).
      opponent_penalty: delta of the opponent penalty (traceable).
      chunk_size: rows per block in the assignment pass (static).
      direct: Euclidean distances from explicit differences (as scipy's cdist) instead of the
        Gram expansion ||x||^2 + ||y||^2 - 2 x.y. Default: True in official mode with float64
        features (exact parity with the script), else False (faster). The Gram form's error
        grows with the rows' distance from the origin, about sqrt(eps) ||x|| (two identical
        rows of norm 50 in float32 can lie 0.05 apart); a pool whose mean lies farther from
        the origin than its rows' RMS distance from that mean is therefore measured
        translated to its mean (`distances.centring_shift`; distances do not change), or
        to the mean rounded to integers where every feature is an integer, which keeps the
        exact ties of such pools (raw pixels) exact. Ties between exact duplicates of other
        features need direct=True.
      precision: of the assignment's [n, K] distance matmuls, paper mode: "float32" (default),
        "bfloat16" or "tensorfloat32" (NVIDIA GPUs), both accumulating in float32 (see
        `bilaf_jax.distances`). They only shortlist each sample's nearest cores: the
        shortlist is measured again in float32, so labels and scores change only where the
        true nearest core missed the shortlist. Official mode takes "float32" only.
      num_rows: the real rows of a pool padded to shard evenly (`bilaf_jax.sharding`): rows
        from `num_rows` on are dropped first; pseudo_labels etc. then have num_rows entries.

    Paper mode (Algorithm 1): every sample joins its nearest core (a core always its own
    class); IDC grows each class from its core in rings of max(1, floor(m P_in)) samples of
    lowest density distance rho(x) = mean distance to its k nearest cluster members (Eq. 3),
    the last ring possibly partial, then keeps the first max(1, floor(m (1 - P_rm))) included
    (the core first); both floors are exact for the decimal a fraction prints as, in any
    float type (90 (1 - 0.3) keeps 63, 1001 (1 - 0.001) keeps 999); a fraction traced by your
    own jit/vmap is floored in float arithmetic, within a few ulps. The budget goes by largest
    remainder in proportion to the kept sizes with 1 <= B_i <= |U_i|; if the kept samples
    number fewer than B, denoising is waived (the candidates are the whole pseudo-classes).
    Each class starts with its core; after each pick the floor(|U_i| / B_i) candidates
    nearest to it (itself first) leave the candidate set, and the next pick is the candidate
    of lowest Eq. 7 score
    min_l (D(x, c_l) delta^{t_l} - d_intra(x)) / max(D(x, c_l), d_intra(x)), where d_intra is
    the mean distance to the remaining candidates and t_l counts the earlier non-core picks of
    this class whose nearest other core is c_l. Ties: nearest to the last pick, then lower
    index. d_intra is kept as a running sum over the shrinking candidate set, so scores equal
    in exact arithmetic (integer-valued features) can differ in their last bits; the tie rule
    applies to scores equal in floating point. Never repeats an index.

    Official mode (the authors' `density_cluster.py`): no core override; classes under 10
    samples skip IDC; the samples left after the last full ring are dropped; rho averages the
    distances to the class samples whose local ids equal the positions of the k nearest
    cluster members; allocation floor(p_i B) then smallest-allocation-first; d_intra fixed
    over the denoised class; only the nearest opponent is penalised, at the start of the next
    round; each round removes the floor(|U_i| / B_i) candidates first in (distance to the last
    pick, inclusion position) order and takes the first argmin. Its counts (ring, kept,
    allocation) are the script's Python float64 arithmetic where JAX has x64 enabled (`select`
    and the CLI enable it), else float32 (int(90 * 0.7) may then be 63, not 62). Raises ValueError where the
    script would crash (a zero allocation, a core not its own nearest core, a core removed by
    denoising) and warns where it repeats samples. Under `jit`/`vmap` with traced
    hyperparameters nothing can raise: a setting where the script would crash returns indices
    that are all -1.

    Returns:
      BilafOutput (indices int32[B], pseudo_labels int32[n], kept bool[n],
      boundary_score [n], allocation int32[K]).

    Example:
      >>> import jax, numpy as np
      >>> f = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
      >>> out = bilaf(jax.random.key(0), f, [3, 50, 120], 12)
      >>> out.indices.shape, [int(i) for i in out.indices[:1]]
      ((12,), [3])
    """
    del key
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    features, num_rows = check_pool(features, num_rows)
    if is_traced(features):
        raise ValueError("features must be concrete: bilaf plans its class buckets on the host")
    features = real_rows(features, num_rows)
    n, d = features.shape
    core = np.sort(check_indices(core_indices, n, "core_indices"))
    num_classes = core.shape[0]
    if num_classes == 0:
        raise ValueError("core_indices is empty; need at least one core sample")
    budget = check_count(budget, "budget", num_classes, n)
    chunk_size = check_count(chunk_size, "chunk_size", 1, 1 << 30)
    num_neighbors, precision = check_options(
        mode=mode, num_neighbors=num_neighbors, ring_fraction=ring_fraction,
        remove_fraction=remove_fraction, opponent_penalty=opponent_penalty, precision=precision)
    features = jnp.asarray(features)
    # bool("false") is True: a string flag would silently mean the opposite
    direct = check_flag(direct, "direct", allow_none=True)
    normalize = check_flag(normalize, "normalize")
    if direct is None:
        direct = mode == "official" and features.dtype == jnp.float64

    num_nearest = min(num_classes, 2 if mode == "official" else NUM_OPPONENTS + 1)
    core_j = jnp.asarray(core, jnp.int32)
    ring_fraction, remove_fraction = Ratio.of(ring_fraction), Ratio.of(remove_fraction)
    # Explicit differences need no translation; the Gram form does where the pool lies far
    # from the origin (decided here, so a pool near it is not copied).
    centre = not direct and bool(to_host(_needs_centring(features, normalize=normalize)))
    a = _assign_jit(features, core_j, jnp.int32(budget), ring_fraction, remove_fraction,
                    num_nearest=num_nearest, normalize=normalize, centre=centre, direct=direct,
                    chunk_size=chunk_size, mode=mode, precision=precision)
    labels = to_host(a.labels)
    if mode == "official":
        wrong = np.nonzero(labels[core] != np.arange(num_classes))[0]
        if wrong.size:
            j = int(wrong[0])
            raise ScriptFailure(
                f"official mode: core {int(core[j])} (class {j}) is nearest to core "
                f"{int(core[labels[core[j]]])} (class {int(labels[core[j]])}), so it is not in "
                "its own pseudo-class (duplicate core features?); the authors' script fails "
                "here. Use mode='paper' or distinct cores.")

    alloc, use_all = a.allocation, a.use_all
    concrete = not is_traced(alloc)
    alloc_host = to_host(alloc) if concrete else None
    if mode == "official" and concrete:
        zero = np.nonzero(alloc_host == 0)[0]
        if zero.size:
            raise ScriptFailure(
                f"official mode: the authors' allocation gives 0 samples to "
                f"{zero.size} pseudo-class(es) (e.g. class {int(zero[0])}, core "
                f"{int(core[zero[0]])}); their script divides by zero there. Raise the "
                "budget or use mode='paper'.")

    g = _Global(features if a.features is None else a.features, a.cores, a.core_dist,
                a.core_index)
    static = dict(mode=mode, num_neighbors=num_neighbors, direct=direct, chunk_size=chunk_size)
    args = (use_all, alloc, ring_fraction, remove_fraction, opponent_penalty)
    most = None  # official mode: room for the picks where the script repeats samples
    if mode == "official":
        most = alloc_host if concrete else budget
    buckets = _plan(labels, core, d, _batch_elements(features))
    results, layout = _run_buckets(g, buckets, args, most, static)
    # Results are traced where a hyperparameter is (vmap over the penalty), even with a
    # concrete allocation.
    concrete = concrete and not any(map(is_traced, jax.tree.leaves(results)))
    if concrete:
        # Concrete results: gather on the host (no program to compile per budget).
        host = jax.tree.map(to_host, (results, layout))
        out, score, kept, core_lost = _assemble(*host, alloc_host, n=n, budget=budget, xp=np)
        out, score, kept = jnp.asarray(out), jnp.asarray(score), jnp.asarray(kept)
    else:
        out, score, kept, core_lost = _assemble_jit(results, layout, alloc, n=n,
                                                    budget=budget)
        if mode == "official":
            # Traced: where the script would crash (see below), a selection of -1s, not a list
            # it could never produce.
            out = jnp.where(jnp.any(alloc == 0) | (core_lost >= 0), -1, out)
    if mode == "official" and concrete:
        lost = int(core_lost)
        if lost >= 0:
            raise ScriptFailure(
                f"official mode: denoising removed core {int(core[lost])} from its own "
                f"pseudo-class {lost} (duplicate rows around the core?); the authors' script "
                "fails here. Use mode='paper'.")
        uniq = np.unique(np.asarray(out)).size
        if uniq < budget:
            warnings.warn(
                f"official mode: the authors' allocation exceeds some denoised class sizes, "
                f"so the selection repeats samples ({uniq} unique of {budget}), as their "
                "script does.", stacklevel=2)
    # Several processes: each returns the whole result (see bilaf_jax.sharding).
    return process_local(BilafOutput(out, a.labels, kept, score, alloc.astype(jnp.int32)))


def _split_budget(class_sizes, budget, ring_fraction, remove_fraction, *, mode, dtype):
    """Budget per class from the kept sizes IDC will leave (known from the class sizes)."""
    _, _, kept = _ring_plan(class_sizes, ring_fraction, remove_fraction, mode=mode, ftype=dtype)
    if mode == "official":
        return _allocate_official(kept, budget), jnp.asarray(False)
    # Paper mode waives denoising if the kept samples cannot fill the budget.
    use_all = jnp.sum(kept) < budget
    return _allocate_paper(jnp.where(use_all, class_sizes, kept), budget), use_all



def _assemble(results, layout, alloc, *, n, budget, xp=jnp):
    """Class blocks in class order -> indices [B]; per-sample score and kept [n]; the first
    class whose core was denoised away (-1: none). `xp`: jax.numpy (traced) or numpy."""

    def scatter(target, where, values):  # target[where] = values, out-of-range dropped
        if xp is jnp:
            return target.at[where].set(values, mode="drop")
        keep = where < target.shape[0]
        target[where[keep]] = values[keep]
        return target

    num_classes = alloc.shape[0]
    offsets = xp.cumsum(alloc) - alloc
    out = xp.zeros(budget, xp.int32)
    score = xp.full(n, xp.inf, results[0][1].dtype)
    kept = xp.zeros(n, bool)
    core_lost = num_classes
    for (picks, bs, kept_b, core_kept), c in zip(results, layout, strict=True):
        slot = xp.arange(picks.shape[1])[None, :]
        live = (slot < alloc[c.cls][:, None]) & (c.count > 0)[:, None]
        where = xp.where(live, offsets[c.cls][:, None] + slot, budget)
        out = scatter(out, where.reshape(-1), picks.reshape(-1))
        valid = xp.arange(c.members.shape[1])[None, :] < c.count[:, None]
        idx = xp.where(valid, c.members, n).reshape(-1)
        score = scatter(score, idx, bs.reshape(-1))
        kept = scatter(kept, idx, kept_b.reshape(-1))
        lost = xp.where((c.count > 0) & ~core_kept, c.cls, num_classes)
        core_lost = xp.minimum(core_lost, xp.min(lost))
    return out, score, kept, xp.where(core_lost == num_classes, -1, core_lost)


_assemble_jit = jax.jit(_assemble, static_argnames=("n", "budget"))
