"""Naive NumPy references of BiLAF stage 2 (both modes), written from the spec.

Plain loops, full float64 matrices, no attempt at speed: the JAX stage must agree with these
index for index on tie-free features. `official_reference` restates the semantics of the
authors' script (including its quirks, see the spec's "The authors' code differs from the
paper"); `paper_reference` restates the paper's equations as `bilaf_jax.boundary.bilaf`
documents them.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
from scipy.spatial.distance import cdist

OWN = 1e9 + 7


def _sorted_by(keys):
    """Positions sorted by the tuples in `keys` (a list of tuples)."""
    return [i for _, i in sorted((k, i) for i, k in enumerate(keys))]


def official_reference(features, core_indices, budget, *, num_neighbors=10, ring_fraction=0.1,
                       remove_fraction=0.1, opponent_penalty=1.1):
    """Returns (indices list, labels, kept bool[n], allocation, boundary score float64[n]: the
    script's (outer - inner) / max(outer, inner) before penalties, +inf where not kept or not
    a number)."""
    x = np.asarray(features, np.float64)
    n = x.shape[0]
    cores = sorted(int(c) for c in core_indices)
    num_classes = len(cores)
    labels = np.argmin(cdist(x, x[cores]), axis=1)
    classes = [[i for i in range(n) if labels[i] == j] for j in range(num_classes)]

    denoised = []
    for j, members in enumerate(classes):
        m = len(members)
        if m < 10:
            denoised.append(list(members))
            continue
        if cores[j] not in members:
            raise ValueError("core not in its own class")
        home = members.index(cores[j])
        dist = cdist(x[members], x[members])
        ring = int(m * ring_fraction) or 1
        cluster = _sorted_by([(dist[home, i],) for i in range(m)])[:ring]
        for _ in range(2, m // ring + 1):
            inside = set(cluster)
            scored = []
            for i in range(m):
                if i in inside:
                    continue
                to_cluster = [dist[i, c] for c in cluster]
                nearest_positions = _sorted_by([(v,) for v in to_cluster])[:num_neighbors]
                # positions in the cluster list reused as local sample ids
                scored.append((np.mean([dist[i, p] for p in nearest_positions]), i))
            scored.sort()
            cluster += [i for _, i in scored[:ring]]
        cluster = cluster[:int(len(cluster) * (1 - remove_fraction))]
        denoised.append([members[i] for i in cluster])

    sizes = np.array([len(u) for u in denoised])
    share = sizes / sizes.sum()
    alloc = np.floor(share * budget).astype(int)
    while alloc.sum() < budget:
        best = 0
        for i in range(num_classes):
            if alloc[i] < alloc[best] or (alloc[i] == alloc[best] and share[i] > share[best]):
                best = i
        alloc[best] += 1
    if (alloc == 0).any():
        raise ValueError("zero allocation")

    out = []
    score = np.full(n, np.inf)
    for j, u in enumerate(denoised):
        size = len(u)
        dist = cdist(x[u], x[u])
        inner = dist.mean(axis=1)
        to_cores = cdist(x[u], x[cores])
        to_cores[:, j] = OWN
        outer = to_cores.min(axis=1)
        opp = to_cores.argmin(axis=1)
        with np.errstate(invalid="ignore"):
            bs = (outer - inner) / np.maximum(outer, inner)
        score[u] = np.where(np.isnan(bs), np.inf, bs)
        if cores[j] not in u:
            raise ValueError("core removed")
        home = u.index(cores[j])
        picks = [home]
        quota = size // alloc[j]
        cand = list(range(size))
        penalty = np.ones(num_classes)
        while len(picks) < alloc[j]:
            last = picks[-1]
            cand = [cand[i] for i in _sorted_by([(dist[last, c], c) for c in cand])][quota:]
            if last != home:
                penalty[opp[last]] *= opponent_penalty
            scores = [(outer[c] * penalty[opp[c]] - inner[c]) / max(outer[c], inner[c])
                      for c in cand]
            picks.append(cand[int(np.argmin(scores))])
        out += [u[i] for i in picks]
    kept = np.zeros(n, bool)
    for u in denoised:
        kept[u] = True
    return out, labels, kept, alloc, score


def paper_reference(features, core_indices, budget, *, num_neighbors=10, ring_fraction=0.1,
                    remove_fraction=0.1, opponent_penalty=1.1, normalize=False):
    """Returns (indices list, labels, kept bool[n], allocation, boundary_score [n])."""
    x = np.asarray(features, np.float64)
    if normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n = x.shape[0]
    cores = sorted(int(c) for c in core_indices)
    num_classes = len(cores)
    to_cores = cdist(x, x[cores])
    labels = np.argmin(to_cores, axis=1)
    labels[cores] = np.arange(num_classes)
    classes = [[i for i in range(n) if labels[i] == j] for j in range(num_classes)]

    kept_lists = []
    for j, members in enumerate(classes):
        m = len(members)
        home = members.index(cores[j])
        dist = cdist(x[members], x[members])
        # The equations' floors, in exact rational arithmetic (the fractions as written).
        ring = max(1, math.floor(m * Fraction(str(ring_fraction))))
        first = [(-np.inf if i == home else dist[home, i], i) for i in range(m)]
        cluster = [i for _, i in sorted(first)][:ring]
        while len(cluster) < m:
            inside = set(cluster)
            scored = []
            for i in range(m):
                if i in inside:
                    continue
                near = np.sort(dist[i, cluster])[:num_neighbors]
                scored.append((near.mean(), i))
            scored.sort()
            cluster += [i for _, i in scored[:min(ring, m - len(cluster))]]
        keep = max(1, math.floor(m * (1 - Fraction(str(remove_fraction)))))
        kept_lists.append(sorted(members[i] for i in cluster[:keep]))

    caps = np.array([len(u) for u in kept_lists])
    if caps.sum() < budget:  # denoising waived
        kept_lists = classes
        caps = np.array([len(u) for u in classes])
    quota = caps.astype(np.float64) * budget / caps.sum()
    alloc = np.clip(np.floor(quota).astype(int), 1, caps)
    while alloc.sum() != budget:
        rem = quota - alloc
        if alloc.sum() < budget:
            i = int(np.argmax(np.where(alloc < caps, rem, -np.inf)))
            alloc[i] += 1
        else:
            i = int(np.argmin(np.where(alloc > 1, rem, np.inf)))
            alloc[i] -= 1

    def score(i, own, a, penalty):
        best = np.inf
        for c in range(num_classes):
            if c == own:
                continue
            d = to_cores[i, c]
            den = max(d, a)
            best = min(best, (d * penalty[c] - a) / den if den > 0 else 0.0)
        return best

    def nearest_opponent(i, own):
        others = [(to_cores[i, c], c) for c in range(num_classes) if c != own]
        return min(others)[1] if others else None

    out = []
    boundary = np.full(n, np.inf)
    for j, u in enumerate(kept_lists):
        block = cdist(x[u], x[u])
        dist = {(a, b): block[ia, ib] for ia, a in enumerate(u) for ib, b in enumerate(u)}
        for i in u:
            a = sum(dist[i, other] for other in u) / len(u)
            boundary[i] = score(i, j, a, np.ones(num_classes))
        picks = [cores[j]]
        quota = len(u) // alloc[j]
        cand = set(u)
        penalty = np.ones(num_classes)
        while len(picks) < alloc[j]:
            last = picks[-1]
            order = sorted(cand, key=lambda c: (-np.inf if c == last else dist[last, c], c))
            cand -= set(order[:quota])
            best = None
            for c in cand:
                a = sum(dist[c, other] for other in cand) / len(cand)
                key = (score(c, j, a, penalty), dist[last, c], c)
                best = key if best is None or key < best else best
            pick = best[2]
            opp = nearest_opponent(pick, j)
            if opp is not None:
                penalty[opp] *= opponent_penalty
            picks.append(pick)
        out += picks
    kept = np.zeros(n, bool)
    for u in kept_lists:
        kept[u] = True
    return out, labels, kept, alloc, boundary
