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

Layout: pseudo-classes have different sizes, so each class is processed padded to a static
size P (a power of two >= its size) and classes are grouped into buckets of equal P; every
bucket is one jitted `lax.map`/`lax.scan` over its classes. Work and memory per class are
O(P^2) (its distance matrix); nothing of size [n, n] or [n, K] is ever built. The bucket plan
is made on the host from the pseudo-labels, so `bilaf` itself is not jittable, but its float
hyperparameters (`remove_fraction`, `ring_fraction`, `opponent_penalty`) stay traceable in both
modes: `jax.vmap(lambda p: bilaf(key, f, c, B, remove_fraction=p).indices)(ps)` works.

Dimension glossary: see `bilaf_jax.distances`. Here also P (padded class size), C (classes in
a bucket), T (opponent cores kept per sample).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bilaf_jax import distances
from bilaf_jax._validation import (
    check_count,
    check_features,
    check_fraction,
    check_indices,
    check_positive,
    is_traced,
)

MODES = ("paper", "official")
# Opponent cores tracked per sample in paper mode (Eq. 7 min); an exact full scan over all K
# cores runs only in rounds where every tracked opponent of some candidate is penalised.
NUM_OPPONENTS = 16
# The official script masks the own core with this value before taking the min.
_OWN_CORE_DISTANCE = 1e9 + 7
_MIN_PAD = 16
# Bucket planning heuristic (see _group_pads): rough seconds to compile one bucket program,
# and seconds per padded distance-matrix element per feature dimension.
_COMPILE_SECONDS = 1.0
_ELEMENT_SECONDS = 6e-11
# Elements of one [c, P] (or [P, P]) block handled at once by the batched class map.
_BATCH_ELEMENTS = 1 << 22
_REMOVE_CHUNK = 16
# Largest [P, K] block of distances to all cores kept per class (paper Eq. 7 scans).
_CORE_CACHE_ELEMENTS = 1 << 23
# Cluster members merged into the running k-NN lists per step of IDC.
_MERGE_CHUNK = 64


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
# Stage A: assignment to the nearest core and the nearest opponent cores.


class _Assignment(NamedTuple):
    features: jax.Array       # [n, d], normalised when asked
    labels: jax.Array         # int32[n]
    core_dist: jax.Array      # [n, T1] distances to the T1 nearest cores, ascending
    core_index: jax.Array     # int32[n, T1] their positions


def _direct_chunk(rows: int, d: int, chunk_size: int) -> int:
    # Explicit differences cost [c, rows, d] per block: keep a block near 2^24 elements.
    return max(1, min(chunk_size, (1 << 24) // max(1, rows * d)))


def _assign(features, core_indices, *, num_nearest, normalize, direct, chunk_size, mode):
    x = distances.normalize(features) if normalize else features
    cores = x[core_indices]
    chunk = _direct_chunk(cores.shape[0], x.shape[1], chunk_size) if direct else chunk_size
    nb = distances.knn(x, cores, num_nearest, "euclidean", chunk_size=chunk, direct=direct)
    labels = nb.index[:, 0]
    if mode == "paper":  # a core always belongs to its own pseudo-class
        labels = labels.at[core_indices].set(jnp.arange(core_indices.shape[0], dtype=jnp.int32))
    return _Assignment(x, labels, nb.distance, nb.index)


_assign_jit = jax.jit(_assign, static_argnames=("num_nearest", "normalize", "direct",
                                                "chunk_size", "mode"))


# --------------------------------------------------------------------------------------------
# Host-side plan: classes grouped by padded size.


class _Bucket(NamedTuple):
    classes: np.ndarray       # int32[C] class ids; padding classes carry id 0 and count 0
    members: np.ndarray       # int32[C, P] pool indices, ascending; padding = 0
    counts: np.ndarray        # int32[C] class sizes
    core_local: np.ndarray    # int32[C] position of the core among the members


def _pad_size(m: int) -> int:
    """Smallest padded class size >= m: powers of two up to 512, then quarter-octave steps
    (1024, 1280, 1536, 1792, 2048, 2560, ...) so that big classes waste at most 25% per side."""
    if m <= 512:
        return max(_MIN_PAD, 1 << int(np.ceil(np.log2(max(m, 1)))))
    step = 1 << (int(np.floor(np.log2(m - 1))) - 2)
    return int(-(-m // step) * step)


def _pad_count(c: int, p: int) -> int:
    """Classes per bucket: the next of 1, 2, 3, 4, 6, 8, 12, ... (few distinct lengths, at most
    1.5x padding), rounded up to a multiple of the batch when larger than one batch."""
    v = 1
    while v < c:
        v = v + v // 2 if (v & (v - 1)) == 0 and v >= 2 else (v * 4 // 3 if v >= 3 else v + 1)
    batch = _batch(p)
    return v if v <= batch else -(-v // batch) * batch


def _batch(p: int) -> int:
    return max(1, _BATCH_ELEMENTS // (p * p))


def _group_pads(counts: np.ndarray, d: int) -> np.ndarray:
    """Padded size per class: power-of-two sizes, with neighbouring sizes merged into one
    bucket where the extra padded work costs less than compiling another bucket program.

    Optimal contiguous grouping of the size grid by dynamic programming over
    cost(group) = _COMPILE_SECONDS + sum(classes x P_group^2) x per-element seconds.
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


def _plan(labels: np.ndarray, core_indices: np.ndarray, d: int) -> list[_Bucket]:
    num_classes = core_indices.shape[0]
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=num_classes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pads = _group_pads(counts, d)
    buckets = []
    for p in np.unique(pads):
        ids = np.nonzero(pads == p)[0]
        c = _pad_count(ids.size, int(p))
        classes = np.zeros(c, np.int32)
        members = np.zeros((c, p), np.int32)
        cnt = np.zeros(c, np.int32)
        core_local = np.zeros(c, np.int32)
        for row, j in enumerate(ids):
            mem = order[starts[j]:starts[j] + counts[j]]
            classes[row], cnt[row] = j, counts[j]
            members[row, :counts[j]] = mem
            core_local[row] = int(np.searchsorted(mem, core_indices[j]))
        buckets.append(_Bucket(classes, members, cnt, core_local))
    return buckets


# --------------------------------------------------------------------------------------------
# Stage B: IDC denoising (Eq. 3), one pseudo-class at a time.


def _class_distances(xc, direct, chunk_size):
    if direct:
        chunk = _direct_chunk(xc.shape[0], xc.shape[1], chunk_size)
        dist = distances.pairwise_chunked(xc, xc, "euclidean", chunk_size=chunk, direct=True)
    else:
        dist = distances.pairwise(xc, xc, "euclidean")
    # The Gram form leaves sqrt(rounding) ~ 1e-4..1e-8 on the diagonal; a sample is at 0.
    return jnp.where(jnp.eye(xc.shape[0], dtype=bool), 0.0, dist)


def _ranks(key, tie, mask):
    """Rank of each entry among `mask`ed ones by (key, tie); unmasked entries rank last."""
    key = jnp.where(mask, key, jnp.inf)
    tie = jnp.where(mask, tie, jnp.iinfo(jnp.int32).max)  # after masked-in entries of key +inf
    perm = jnp.lexsort((tie, key)).astype(jnp.int32)
    return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=jnp.int32))


class _RingState(NamedTuple):
    in_cluster: jax.Array  # bool[P]
    position: jax.Array    # int32[P] inclusion position; P for samples never included
    order: jax.Array       # int32[P + W] local id at each inclusion position (padded)
    near_dist: jax.Array   # [P, k] distances to the k nearest cluster members, ascending
    near_pos: jax.Array    # int32[P, k] their inclusion positions
    size: jax.Array        # int32 current cluster size


class _Denoised(NamedTuple):
    position: jax.Array    # int32[C, P] inclusion order (the tie key of official selection)
    kept: jax.Array        # bool[C, P]
    intra_kept: jax.Array  # [C, P] sum of distances to the kept members
    intra_all: jax.Array   # [C, P] sum of distances to all members


def _idc(dist, valid, m, core, ring_fraction, remove_fraction, *, mode, num_neighbors):
    """Inclusion positions and kept mask of one class; `dist` [P, P] is +inf off the class."""
    p = dist.shape[0]
    local = jnp.arange(p, dtype=jnp.int32)
    ftype = dist.dtype
    mf = m.astype(ftype)
    ring = jnp.maximum(1, jnp.floor(mf * ring_fraction).astype(jnp.int32))
    if mode == "official":
        target = ring * (m // ring)  # the remainder after the last full ring is dropped
    else:
        target = m
    k = min(num_neighbors, p)

    width = min(p, _MERGE_CHUNK)

    def absorb(s, start):
        """Merge cluster positions [start, s.size) into every row's running k nearest."""

        def merge(j, carry):
            near_dist, near_pos = carry
            first = start + j * width
            cols = lax.dynamic_slice(s.order, (first,), (width,))
            pos = first + jnp.arange(width, dtype=jnp.int32)
            block = jnp.where((pos < s.size)[None, :], dist[:, cols], jnp.inf)
            # Running entries come first and hold earlier positions: ties keep the earlier.
            both = jnp.concatenate([near_dist, block], axis=1)
            both_pos = jnp.concatenate([near_pos, jnp.broadcast_to(pos, block.shape)], axis=1)
            near, idx = distances.smallest_k(both, k)
            return near, jnp.take_along_axis(both_pos, idx, axis=1)

        steps = (s.size - start + width - 1) // width
        near = lax.fori_loop(0, steps, merge, (s.near_dist, s.near_pos))
        return s._replace(near_dist=near[0], near_pos=near[1])

    first_key = dist[core]
    if mode == "paper":
        first_key = jnp.where(local == core, -jnp.inf, first_key)
    rank = _ranks(first_key, local, valid)
    first_size = jnp.minimum(ring, target)
    take = valid & (rank < first_size)
    position = jnp.where(take, rank, p).astype(jnp.int32)
    order = jnp.zeros(p + width, jnp.int32).at[position].set(local, mode="drop")
    state = _RingState(take, position, order, jnp.full((p, k), jnp.inf, ftype),
                       jnp.zeros((p, k), jnp.int32), first_size)
    state = absorb(state, 0)

    def not_done(s):
        return s.size < target

    def add_ring(s):
        count = jnp.minimum(k, s.size)
        use = jnp.arange(k) < count
        if mode == "official":
            # The script averages distances to the class samples whose local ids equal the
            # positions of the nearest cluster members.
            vals = jnp.take_along_axis(dist, s.near_pos, axis=1)
        else:
            vals = s.near_dist
        density = jnp.sum(jnp.where(use[None, :], vals, 0.0), axis=1) / count.astype(ftype)
        cand = valid & ~s.in_cluster
        r = _ranks(density, local, cand)
        add = jnp.minimum(ring, target - s.size)
        new = cand & (r < add)
        position = jnp.where(new, s.size + r, s.position)
        order = s.order.at[jnp.where(new, position, p + width)].set(local, mode="drop")
        grown = s._replace(in_cluster=s.in_cluster | new, position=position, order=order,
                           size=s.size + add)
        return absorb(grown, s.size)

    state = lax.while_loop(not_done, add_ring, state)
    keep = jnp.floor(state.size.astype(ftype) * (1.0 - remove_fraction)).astype(jnp.int32)
    if mode == "paper":
        keep = jnp.maximum(keep, 1)
        kept = state.in_cluster & (state.position < keep)
        return state.position, kept
    skip = m < 10  # the script leaves small classes untouched
    kept = jnp.where(skip, valid, state.in_cluster & (state.position < keep))
    position = jnp.where(skip, jnp.where(valid, local, p), state.position)
    return position, kept


def _denoise_bucket(x, members, counts, core_local, ring_fraction, remove_fraction, *,
                    mode, num_neighbors, direct, chunk_size):
    p = members.shape[1]

    def one_class(args):
        mem, m, core = args
        valid = jnp.arange(p) < m
        dist = _class_distances(x[mem], direct, chunk_size)
        both = valid[:, None] & valid[None, :]
        dist = jnp.where(both, dist, jnp.inf)
        position, kept = _idc(dist, valid, m, core, ring_fraction, remove_fraction,
                              mode=mode, num_neighbors=num_neighbors)
        finite = jnp.where(both, dist, 0.0)
        intra_kept = jnp.sum(jnp.where(kept[None, :], finite, 0.0), axis=1)
        intra_all = jnp.sum(finite, axis=1)
        return _Denoised(position, kept, intra_kept, intra_all)

    batch = min(members.shape[0], _batch(p))  # divides the class count (see _plan)
    return lax.map(one_class, (members, counts, core_local), batch_size=batch)



# --------------------------------------------------------------------------------------------
# Budget allocation (step 4).


def _allocate_official(sizes, budget):
    """floor(p_i B), then each leftover unit to the smallest allocation (ties: larger class,
    then lower index), as the script does. May give 0 or more than the class size."""
    ftype = jnp.result_type(float)
    prop = sizes.astype(ftype) / jnp.sum(sizes).astype(ftype)
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
# Stage C: boundary scores and iterative selection (steps 3, 5).


class _Global(NamedTuple):
    """Per-sample arrays the selection reads (all [n] or [n, T1])."""

    features: jax.Array
    cores: jax.Array
    core_dist: jax.Array
    core_index: jax.Array
    labels: jax.Array


class _PickState(NamedTuple):
    out: jax.Array        # int32[B] the whole output, written block by block
    cand: jax.Array       # bool[P] remaining candidates
    intra: jax.Array      # [P] sum of distances to the remaining set (paper)
    hits: jax.Array       # [K] penalty factor per opponent class
    node: jax.Array       # int32 local id of the last pick
    t: jax.Array          # int32 picks made in this class
    to_cores: jax.Array   # [P, K] distances to all cores once needed (paper), else [1, 1]
    have_cores: jax.Array  # bool, to_cores filled


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


def _paper_terms(od, oi, own, intra_mean, hits, valid_list):
    """Eq. 7 over the tracked opponents: min_l (D_l delta^{t_l} - a) / max(D_l, a)."""
    a = intra_mean[:, None]
    num = od * hits[oi] - a
    den = jnp.maximum(od, a)
    f = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
    f = jnp.where(valid_list & (oi != own[:, None]), f, jnp.inf)
    return jnp.min(f, axis=1)


def _select_bucket(out, g, classes, members, counts, core_local, den, alloc, offsets,
                   use_all, opponent_penalty, *, mode, direct, chunk_size):
    p = members.shape[1]
    num_classes = g.cores.shape[0]
    local = jnp.arange(p, dtype=jnp.int32)
    ftype = g.features.dtype
    full_list = g.core_index.shape[1] >= num_classes  # every opponent is tracked

    def one_class(out, args):
        cls, mem, m, core, d = args
        budget_i = jnp.where(m > 0, alloc[cls], 0)  # padding classes pick nothing
        offset = offsets[cls]
        valid = local < m
        xc = g.features[mem]
        own = jnp.full((p,), cls, jnp.int32)
        od, oi = g.core_dist[mem], g.core_index[mem]
        if mode == "official":
            pool = d.kept
            intra0 = d.intra_kept
            tie = d.position
            outer, opp = _opponents_official(od, oi, own)
        else:
            pool = jnp.where(use_all, valid, d.kept)
            intra0 = jnp.where(use_all, d.intra_all, d.intra_kept)
            tie = local
            valid_list = jnp.isfinite(od)
            other = valid_list & (oi != own[:, None])
            has_opp = jnp.any(other, axis=1)
            near_opp = jnp.take_along_axis(oi, jnp.argmax(other, axis=1)[:, None], 1)[:, 0]
        size = jnp.sum(pool).astype(jnp.int32)
        quota = size // jnp.maximum(budget_i, 1)
        sizef = size.astype(ftype)

        def all_cores():
            if direct:
                chunk = _direct_chunk(num_classes, xc.shape[1], chunk_size)
                return distances.pairwise_chunked(xc, g.cores, "euclidean", chunk_size=chunk,
                                                  direct=True)
            return distances.pairwise(xc, g.cores, "euclidean")

        every = jnp.broadcast_to(jnp.arange(num_classes, dtype=jnp.int32), (p, num_classes))
        cache = mode == "paper" and not full_list and p * num_classes <= _CORE_CACHE_ELEMENTS

        def scores(s):
            """Scores of all rows and the (possibly filled) distance cache."""
            if mode == "official":
                inner = intra0 / sizef
                num = outer * s.hits[opp] - inner
                return num / jnp.maximum(outer, inner), s.to_cores, s.have_cores
            remaining = jnp.sum(s.cand).astype(ftype)
            a = s.intra / jnp.maximum(remaining, 1.0)
            if full_list:
                return _paper_terms(od, oi, own, a, s.hits, valid_list), s.to_cores, s.have_cores
            # The tracked opponents give the exact Eq. 7 minimum while one of them is
            # unpenalised (delta >= 1); otherwise scan all cores.
            hit = s.hits[oi] != 1.0
            tracked_all_hit = jnp.any(s.cand & jnp.all(hit | ~valid_list | (oi == own[:, None]),
                                                       axis=1))
            need_full = tracked_all_hit | (opponent_penalty < 1)
            ones = jnp.ones((p, num_classes), bool)
            if cache:
                to_cores = lax.cond(need_full & ~s.have_cores, lambda _: all_cores(),
                                    lambda _: s.to_cores, None)
                have = s.have_cores | need_full
                sc = lax.cond(need_full,
                              lambda _: _paper_terms(to_cores, every, own, a, s.hits, ones),
                              lambda _: _paper_terms(od, oi, own, a, s.hits, valid_list), None)
                return sc, to_cores, have
            sc = lax.cond(need_full,
                          lambda _: _paper_terms(all_cores(), every, own, a, s.hits, ones),
                          lambda _: _paper_terms(od, oi, own, a, s.hits, valid_list), None)
            return sc, s.to_cores, s.have_cores

        def not_done(s):
            return s.t < budget_i

        def pick(s):
            node_x = xc[s.node][None]
            if direct:
                dist = distances.pairwise(node_x, xc, "euclidean", direct=True)[0]
            else:
                dist = distances.pairwise(node_x, xc, "euclidean")[0]
            dist = dist.at[s.node].set(0.0)
            key = dist if mode == "official" else jnp.where(local == s.node, -jnp.inf, dist)
            rank = _ranks(key, tie, s.cand)
            removed = s.cand & (rank < quota)
            cand = s.cand & ~removed
            intra = s.intra
            if mode == "paper":
                # Algorithm 1: d_intra over the shrinking set; subtract the removed columns
                # a chunk at a time (they are the first `quota` in rank order).
                perm = jnp.zeros(p, jnp.int32).at[rank].set(local)

                def sub(j, intra):
                    cols = lax.dynamic_slice(perm, (j * _REMOVE_CHUNK,), (_REMOVE_CHUNK,))
                    live = (j * _REMOVE_CHUNK + jnp.arange(_REMOVE_CHUNK)) < quota
                    dc = distances.pairwise(xc, xc[cols], "euclidean", direct=direct)
                    return intra - jnp.sum(jnp.where(live[None, :], dc, 0.0), axis=1)

                steps = (quota + _REMOVE_CHUNK - 1) // _REMOVE_CHUNK
                perm = jnp.concatenate([perm, jnp.zeros(_REMOVE_CHUNK, jnp.int32)])
                intra = lax.fori_loop(0, steps, sub, intra)
            hits = s.hits
            if mode == "official":
                # The previous pick's opponent is penalised at the start of this round.
                hits = jnp.where(s.node != core, hits.at[opp[s.node]].multiply(opponent_penalty),
                                 hits)
            score, to_cores, have_cores = scores(s._replace(cand=cand, intra=intra, hits=hits))
            if mode == "official":
                score = jnp.where(jnp.isnan(score), -jnp.inf, score)  # numpy argmin picks NaN
            # Lowest score; ties: nearest to the last pick, then the tie key.
            score = jnp.where(cand, score, jnp.inf)
            tied = cand & (score == jnp.min(score))
            new = distances.first_argmin(jnp.where(tied, rank, jnp.iinfo(jnp.int32).max))[1]
            if mode == "paper":
                # The pick faces its nearest other core; later scores feel the penalty.
                hits = jnp.where(has_opp[new], hits.at[near_opp[new]].multiply(opponent_penalty),
                                 hits)
            out = s.out.at[offset + s.t].set(mem[new])
            return _PickState(out, cand, intra, hits, new, s.t + 1, to_cores, have_cores)

        hits0 = jnp.ones(num_classes, ftype)
        out = jnp.where(budget_i > 0, out.at[offset].set(mem[core]), out)
        cache_shape = (p, num_classes) if cache else (1, 1)
        start = _PickState(out, pool, jnp.where(pool, intra0, 0.0), hits0, core, jnp.int32(1),
                           jnp.zeros(cache_shape, ftype), jnp.asarray(False))
        final = lax.while_loop(not_done, pick, start)

        # Boundary score before penalties, for inspection.
        if mode == "official":
            inner = intra0 / sizef
            bs = (outer - inner) / jnp.maximum(outer, inner)
        else:
            a = jnp.where(pool, intra0, 0.0) / jnp.maximum(sizef, 1.0)
            bs = _paper_terms(od, oi, own, a, hits0, valid_list)
        bs = jnp.where(pool & jnp.isfinite(bs), bs, jnp.inf)
        kept = pool & valid
        return final.out, (bs, kept)

    out, (bs, kept) = lax.scan(one_class, out, (classes, members, counts, core_local, den))
    return out, bs, kept



# --------------------------------------------------------------------------------------------
# Public entry point.


def bilaf(key, features, core_indices, budget: int, *, mode: str = "paper",
          num_neighbors: int = 10, ring_fraction=0.1, remove_fraction=0.1,
          opponent_penalty=1.1, normalize: bool = False,
          chunk_size: int = distances.DEFAULT_CHUNK, direct: bool | None = None) -> BilafOutput:
    """Select `budget` samples: the cores plus the boundary samples of each pseudo-class.

    Args:
      key: unused (the stage is deterministic); kept for the selectors' common signature.
      features: [n, d] pool features (finite). Euclidean distances on them as given, or on
        L2-normalised rows with `normalize=True` (the paper's text; the script does not).
      core_indices: [K] distinct pool indices of the core samples (stage 1). They are sorted
        ascending first; that order defines the pseudo-class ids.
      budget: B, with K <= B <= n (static).
      mode: "paper" or "official" (static).
      num_neighbors: k of the IDC density (Eq. 3) (static).
      ring_fraction: P_in, ring size max(1, floor(m P_in)) (traceable).
      remove_fraction: P_rm, share of each class dropped by denoising (traceable).
      opponent_penalty: delta of the opponent penalty (traceable).
      chunk_size: rows per block in the assignment pass (static).
      direct: Euclidean distances from explicit differences (as scipy's cdist) instead of the
        Gram expansion. Default: True in official mode with float64 features (exact parity
        with the script), else False (faster).

    Paper mode (Algorithm 1): every sample joins its nearest core (a core always its own
    class); IDC grows each class from its core in rings of max(1, floor(m P_in)) samples of
    lowest density distance rho(x) = mean distance to its k nearest cluster members (Eq. 3),
    the last ring possibly partial, then keeps the first max(1, floor(m (1 - P_rm))) included
    (the core first). The budget goes by largest remainder in proportion to the kept sizes
    with 1 <= B_i <= |U_i|; if the kept samples number fewer than B, denoising is waived (the
    candidates are the whole pseudo-classes). Each class starts with its core; after each pick
    the floor(|U_i| / B_i) candidates nearest to it (itself first) leave the candidate set, and
    the next pick is the candidate of lowest Eq. 7 score
    min_l (D(x, c_l) delta^{t_l} - d_intra(x)) / max(D(x, c_l), d_intra(x)), where d_intra is
    the mean distance to the remaining candidates and t_l counts the earlier non-core picks of
    this class whose nearest other core is c_l. Ties: nearest to the last pick, then lower
    index. Never repeats an index.

    Official mode (the authors' `density_cluster.py`): no core override; classes under 10
    samples skip IDC; the samples left after the last full ring are dropped; rho averages the
    distances to the class samples whose local ids equal the positions of the k nearest
    cluster members; allocation floor(p_i B) then smallest-allocation-first; d_intra fixed
    over the denoised class; only the nearest opponent is penalised, at the start of the next
    round; each round removes the floor(|U_i| / B_i) candidates first in (distance to the last
    pick, inclusion position) order and takes the first argmin. Raises ValueError where the
    script would crash (a zero allocation, a core not its own nearest core, a core removed by
    denoising) and warns where it repeats samples.

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
    features = check_features(features)
    n, d = features.shape
    if is_traced(features):
        raise ValueError("features must be concrete: bilaf plans its class buckets on the host")
    core = np.sort(check_indices(core_indices, n, "core_indices"))
    num_classes = core.shape[0]
    if num_classes == 0:
        raise ValueError("core_indices is empty; need at least one core sample")
    budget = check_count(budget, "budget", num_classes, n)
    num_neighbors = check_count(num_neighbors, "num_neighbors", 1, 1 << 30)
    chunk_size = check_count(chunk_size, "chunk_size", 1, 1 << 30)
    check_fraction(ring_fraction, "ring_fraction", low_open=True)
    check_fraction(remove_fraction, "remove_fraction")
    check_positive(opponent_penalty, "opponent_penalty")
    features = jnp.asarray(features)
    if direct is None:
        direct = mode == "official" and features.dtype == jnp.float64
    direct = bool(direct)
    normalize = bool(normalize)

    num_nearest = min(num_classes, 2 if mode == "official" else NUM_OPPONENTS + 1)
    core_j = jnp.asarray(core, jnp.int32)
    a = _assign_jit(features, core_j, num_nearest=num_nearest, normalize=normalize,
                    direct=direct, chunk_size=chunk_size, mode=mode)
    labels = np.asarray(a.labels)
    if mode == "official":
        wrong = np.nonzero(labels[core] != np.arange(num_classes))[0]
        if wrong.size:
            j = int(wrong[0])
            raise ValueError(
                f"official mode: core {int(core[j])} (class {j}) is nearest to core "
                f"{int(core[labels[core[j]]])} (class {int(labels[core[j]])}), so it is not in "
                "its own pseudo-class (duplicate core features?); the authors' script fails "
                "here. Use mode='paper' or distinct cores.")

    plan = _plan(labels, core, d)
    buckets = tuple(tuple(jnp.asarray(v) for v in bucket) for bucket in plan)
    class_sizes = jnp.asarray(np.bincount(labels, minlength=num_classes).astype(np.int32))
    res = _stages_jit(a, core_j, buckets, class_sizes, ring_fraction, remove_fraction,
                      opponent_penalty, mode=mode, num_neighbors=num_neighbors, direct=direct,
                      chunk_size=chunk_size, budget=budget)
    if mode == "official" and not is_traced(res.alloc):
        lost = int(res.core_lost)
        if lost >= 0:
            raise ValueError(
                f"official mode: denoising removed core {int(core[lost])} from its own "
                f"pseudo-class {lost} (duplicate rows around the core?); the authors' script "
                "fails here. Use mode='paper'.")
        zero = np.nonzero(np.asarray(res.alloc) == 0)[0]
        if zero.size:
            raise ValueError(
                f"official mode: the authors' allocation gives 0 samples to "
                f"{zero.size} pseudo-class(es) (e.g. class {int(zero[0])}, core "
                f"{int(core[zero[0]])}); their script divides by zero there. Raise the "
                "budget or use mode='paper'.")
        uniq = np.unique(np.asarray(res.out)).size
        if uniq < budget:
            warnings.warn(
                f"official mode: the authors' allocation exceeds some denoised class sizes, "
                f"so the selection repeats samples ({uniq} unique of {budget}), as their "
                "script does.", stacklevel=2)
    return BilafOutput(res.out, a.labels, res.kept, res.score, res.alloc)


class _StagesOut(NamedTuple):
    out: jax.Array
    kept: jax.Array
    score: jax.Array
    alloc: jax.Array
    core_lost: jax.Array  # first class whose core was denoised away (official), else -1


def _stages(a, core_j, buckets, class_sizes, ring_fraction, remove_fraction, opponent_penalty,
            *, mode, num_neighbors, direct, chunk_size, budget):
    """Denoise every bucket, allocate, select every bucket: one compiled program."""
    n = a.features.shape[0]
    num_classes = core_j.shape[0]
    static = dict(mode=mode, direct=direct, chunk_size=chunk_size)
    dens = [_denoise_bucket(a.features, members, counts, core_local, ring_fraction,
                            remove_fraction, num_neighbors=num_neighbors, **static)
            for _, members, counts, core_local in buckets]
    kept_sizes = jnp.zeros(num_classes, jnp.int32)
    core_lost = jnp.int32(num_classes)
    for (classes, _, counts, core_local), den in zip(buckets, dens, strict=True):
        kept_sizes = kept_sizes.at[classes].add(jnp.sum(den.kept, axis=1).astype(jnp.int32))
        core_kept = jnp.take_along_axis(den.kept, core_local[:, None], axis=1)[:, 0]
        lost = jnp.where((counts > 0) & ~core_kept, classes, num_classes)
        core_lost = jnp.minimum(core_lost, jnp.min(lost))
    core_lost = jnp.where(core_lost == num_classes, -1, core_lost)

    if mode == "official":
        alloc = _allocate_official(kept_sizes, budget)
        use_all = jnp.asarray(False)
    else:
        use_all = jnp.sum(kept_sizes) < budget
        alloc = _allocate_paper(jnp.where(use_all, class_sizes, kept_sizes), budget)
    offsets = jnp.cumsum(alloc) - alloc

    g = _Global(a.features, a.features[core_j], a.core_dist, a.core_index, a.labels)
    out = jnp.zeros(budget, jnp.int32)
    score = jnp.full(n, jnp.inf, a.core_dist.dtype)
    kept = jnp.zeros(n, bool)
    for (classes, members, counts, core_local), den in zip(buckets, dens, strict=True):
        out, bs_b, kept_b = _select_bucket(out, g, classes, members, counts, core_local, den,
                                           alloc, offsets, use_all, opponent_penalty, **static)
        valid = jnp.arange(members.shape[1])[None, :] < counts[:, None]
        idx = jnp.where(valid, members, n).reshape(-1)
        score = score.at[idx].set(bs_b.reshape(-1), mode="drop")
        kept = kept.at[idx].set(kept_b.reshape(-1), mode="drop")
    return _StagesOut(out, kept, score, alloc.astype(jnp.int32), core_lost)


_stages_jit = jax.jit(_stages, static_argnames=("mode", "num_neighbors", "direct", "chunk_size",
                                                "budget"))
