"""Naive NumPy references for stage 1 (ActiveFT) and the baselines, written from the spec.

Loops and full matrices on purpose: these are the slow, obviously-correct versions the JAX
functions are checked against.
"""

from __future__ import annotations

import numpy as np


def normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def activeft_loss_and_grad(theta, feats, tau, lam):
    """The authors' loss and its gradient w.r.t. theta, derived by hand.

    theta [K, d] free centroids; feats [n, d] normalised rows.
    loss = mean_i log(e_i + lam S_p(i)) - log e_i, e_i = exp(f_i.c_p(i)/tau),
    S_j = sum_k exp(stopgrad(c_k).c_j/tau).
    """
    theta = np.asarray(theta, np.float64)
    feats = np.asarray(feats, np.float64)
    n = feats.shape[0]
    raw_norms = np.linalg.norm(theta, axis=1, keepdims=True)
    norms = np.maximum(raw_norms, 1e-12)  # torch's normalize: x / max(||x||, eps)
    c = theta / norms
    sim = feats @ c.T / tau  # [n, K]
    p = sim.argmax(axis=1)
    s = sim[np.arange(n), p]
    e = np.exp(s)
    gram = np.exp(c @ c.T / tau)  # [k, j]
    big_s = gram.sum(axis=0)
    loss = np.mean(np.log(e + lam * big_s[p]) - s)
    # Gradient w.r.t. normalised centroids.
    g_c = np.zeros_like(c)
    ds_dc = (gram[:, :, None] * c[:, None, :]).sum(axis=0) / tau  # [j, d]: dS_j/dc_j
    for i in range(n):
        j = p[i]
        denom = e[i] + lam * big_s[j]
        g_c[j] += (e[i] / denom - 1.0) * feats[i] / tau  # through s_i
        g_c[j] += lam / denom * ds_dc[j]  # through S_j
    g_c /= n
    # Through c = theta / max(|theta|, eps); where the norm is clamped only the division remains.
    g_theta = np.where(raw_norms >= 1e-12, (g_c - c * np.sum(g_c * c, axis=1, keepdims=True)) / norms,
                       g_c / norms)
    return loss, g_theta


def greedy_match(points, centres, similarity=False, exclude=()):
    """Centres in order take their nearest (or most similar) point not yet taken and not
    excluded (lowest index on ties)."""
    if similarity:
        score = -(centres @ points.T)
    else:
        score = ((centres[:, None, :].astype(np.float64) - points[None].astype(np.float64)) ** 2).sum(-1)
    taken, out = {int(i) for i in exclude}, []
    for j in range(centres.shape[0]):
        for i in np.argsort(score[j], kind="stable"):
            if int(i) not in taken:
                taken.add(int(i))
                out.append(int(i))
                break
    return np.array(out)


def activeft(features, init_indices, num_steps=300, tau=0.07, lr=1e-3, lam=1.0, exclude=(),
             batches=None):
    """Full-batch ActiveFT with a NumPy Adam (torch defaults: betas 0.9/0.999, eps 1e-8).
    `exclude`: labelled rows, part of the objective but never matched. `batches`: the
    ImageNet variant, a list of num_steps row-index arrays: step t's data term is over those
    rows only (the Gram term over all K centroids, as always).

    Returns (indices ascending, matched in centroid order, losses)."""
    feats = normalize(np.asarray(features, np.float64))
    theta = feats[np.asarray(init_indices)].copy()
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    b1, b2, eps = 0.9, 0.999, 1e-8
    losses = []
    for t in range(1, num_steps + 1):
        rows = feats if batches is None else feats[np.asarray(batches[t - 1])]
        loss, g = activeft_loss_and_grad(theta, rows, tau, lam)
        losses.append(loss)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat = m / (1 - b1**t)
        vhat = v / (1 - b2**t)
        theta = theta - lr * mhat / (np.sqrt(vhat) + eps)
    matched = greedy_match(feats, normalize(theta), similarity=True, exclude=exclude)
    return np.sort(matched), matched, np.array(losses)


def kcenter(features, num_samples, first):
    """Farthest-point greedy from row `first`; ties to the lowest index; a chosen row is never
    chosen again (duplicates: once all left are at distance 0, the lowest unchosen row)."""
    x = np.asarray(features, np.float64)
    chosen = [int(first)]
    for _ in range(1, num_samples):
        d = np.min(((x[:, None, :] - x[chosen][None]) ** 2).sum(-1), axis=1)
        d[chosen] = -1.0
        chosen.append(int(np.argmax(d)))
    return np.array(chosen)
