# Copyright © 2026 mlx-patternkv authors.
"""The PatternKV algorithm: mining the pattern banks, assigning vectors to patterns, the V gate, and
the residuals that get quantized. Plain functions on [N, T, D] arrays, N = sequences x KV heads: every
(sequence, head) row has its own bank and never sees another row's vectors.

See PATTERNKV.md; departures from the authors' code are noted where they happen.
"""

import math

import mlx.core as mx

from .config import NO_PATTERN


def sq_dist(x: mx.array, c: mx.array) -> mx.array:
    """Squared L2 distances: x [N, T, D], c [N, M, D] -> [N, T, M] (fp32)."""
    x = x.astype(mx.float32)
    c = c.astype(mx.float32)
    xx = (x * x).sum(-1, keepdims=True)  # [N, T, 1]
    cc = (c * c).sum(-1)[:, None, :]  # [N, 1, M]
    return mx.maximum(xx - 2 * (x @ c.swapaxes(-1, -2)) + cc, 0)


def kmeans_init(n: int, t: int, k: int, seed: int) -> mx.array:
    """k distinct random token indices per row: [n, k] int32 (seeded, reproducible)."""
    u = mx.random.uniform(shape=(n, t), key=mx.random.key(seed))
    return mx.argsort(u, axis=-1)[:, :k].astype(mx.int32)


def kmeans(x: mx.array, k: int, iters: int = 30, tol: float = 1e-4, seed: int = 0, init=None) -> mx.array:
    """Lloyd's k-means, independently per row. x: [N, T, D] -> centroids [N, min(k, T), D] fp32.

    Initial centroids are k distinct random tokens. A row stops after `iters` iterations or at the
    first iteration in which none of its centroids moved more than `tol` (L2); later iterations leave
    it frozen. An empty cluster takes the token farthest from its own centroid (the authors refill
    with a random token; the farthest token is deterministic and never duplicates a centroid).
    init: optional [N, k] initial token indices (default `kmeans_init(N, T, k, seed)`).
    """
    x = x.astype(mx.float32)
    n, t, _ = x.shape
    k = min(k, t)
    init = kmeans_init(n, t, k, seed) if init is None else init  # [N, k]
    c = mx.take_along_axis(x, init[..., None], axis=1)  # [N, k, D]
    xx = (x * x).sum(-1, keepdims=True)  # [N, T, 1]
    xt = x.swapaxes(1, 2)  # [N, D, T]
    active = mx.ones((n,), mx.bool_)
    for i in range(iters):
        new = _lloyd_step(x, xx, xt, c, k)
        shift = mx.sqrt(((new - c) ** 2).sum(-1)).max(-1)  # [N]
        c = mx.where(active[:, None, None], new, c)
        active = active & (shift > tol)
        if (i + 1) % SYNC_EVERY == 0 and i + 1 < iters and not active.any().item():
            break  # every row has converged: the remaining iterations would change nothing
    return c


SYNC_EVERY = 10  # iterations between checks for early exit (each check is a host sync)


def _lloyd_step(x, xx, xt, c, k):
    """One Lloyd iteration. x [N, T, D], xx = |x|^2 [N, T, 1], xt = x^T [N, D, T], c [N, k, D]."""
    t = x.shape[1]
    d = mx.maximum(xx - 2 * (x @ c.swapaxes(-1, -2)) + (c * c).sum(-1)[:, None, :], 0)  # [N, T, k]
    a = mx.argmin(d, axis=-1)  # [N, T]
    onehot = (a[..., None] == mx.arange(k)).astype(mx.float32)  # [N, T, k]
    counts = onehot.sum(1)  # [N, k]
    means = (xt @ onehot).swapaxes(1, 2) / mx.maximum(counts, 1)[..., None]  # [N, k, D]
    # refill empty clusters with the farthest tokens, the r-th empty one with the r-th farthest
    empty = counts == 0
    far = mx.argsort(-mx.min(d, axis=-1), axis=-1)  # [N, T], ties by index
    rank = mx.clip(mx.cumsum(empty.astype(mx.int32), axis=-1) - 1, 0, t - 1)  # [N, k]
    refill = mx.take_along_axis(x, mx.take_along_axis(far, rank, axis=-1)[..., None], axis=1)
    return mx.where(empty[..., None], refill, means)


def assign_l2(x: mx.array, bank: mx.array) -> mx.array:
    """Nearest pattern by L2. x [N, T, D], bank [N, M, D] (valid rows only) -> [N, T] uint8."""
    return mx.argmin(sq_dist(x, bank), axis=-1).astype(mx.uint8)


def nearest_minmax(x: mx.array, bank: mx.array, allowed=None, chunk_bytes: int = 1 << 25) -> mx.array:
    """Index of the nearest pattern by min-max distance d(x, c) = max_j (x_j - c_j) - min_j (x_j - c_j).

    x [N, T, D], bank [N, M, D], allowed: None or bool [T, M] (patterns a token may use).
    Returns [N, T] int32 (ties: the lower index). The [N, D, T, m] residuals are computed for a slice
    of patterns at a time and each slice is evaluated before the next is built, so at most
    chunk_bytes of them exist (reducing over a leading axis is 3-4x faster on the CPU than over the
    last one).
    """
    xt = x.astype(mx.float32).swapaxes(1, 2)[..., None]  # [N, D, T, 1]
    bt = bank.astype(mx.float32).swapaxes(1, 2)[:, :, None, :]  # [N, D, 1, M]
    n, dim, t, _ = xt.shape
    m = bt.shape[-1]
    step = max(1, chunk_bytes // (4 * n * t * dim))
    best_d = best_i = None
    for s in range(0, m, step):
        r = xt - bt[..., s : s + step]  # [N, D, T, m]
        d = r.max(1) - r.min(1)  # [N, T, m]
        if allowed is not None:
            d = mx.where(allowed[:, s : s + step], d, mx.inf)
        i = mx.argmin(d, axis=-1)
        v = mx.take_along_axis(d, i[..., None], axis=-1)[..., 0]
        if best_d is None:
            best_d, best_i = v, i.astype(mx.int32) + s
        else:
            better = v < best_d
            best_i = mx.where(better, i.astype(mx.int32) + s, best_i)
            best_d = mx.where(better, v, best_d)
        if s + step < m:
            mx.eval(best_d, best_i)
    return best_i


def chebyshev_center(x: mx.array) -> mx.array:
    """Centre of the bounding box of a group: x [N, G, D] -> [N, D] = (min + max) / 2."""
    x = x.astype(mx.float32)
    return (x.min(1) + x.max(1)) / 2


def v_gate(v: mx.array, c: mx.array, z: float) -> mx.array:
    """Keep the V pattern only where it narrows the range enough. v, c [N, T, D] -> bool [N, T].

    rho = range(v - c) / range(v); subtract c iff 1 - rho^2 >= 2 z / sqrt(5 D) * sqrt(1 + rho^4).
    A constant vector (range 0) is quantized exactly without a pattern.
    """
    v = v.astype(mx.float32)
    r = v - c.astype(mx.float32)
    rv = v.max(-1) - v.min(-1)
    rho = (r.max(-1) - r.min(-1)) / mx.where(rv > 0, rv, 1)
    # rho^2 and rho^4 as products, not mx.power (which is not always the rounded product on the CPU):
    # the same float32 operations as the fused flush kernel, so both decide every token alike
    rho2 = rho * rho
    thresh = 2 * z / math.sqrt(5 * v.shape[-1]) * mx.sqrt(1 + rho2 * rho2)
    return (rv > 0) & (1 - rho2 >= thresh)


def gather_patterns(bank: mx.array, idx: mx.array) -> mx.array:
    """bank [N, M, D], idx [N, T] -> [N, T, D] fp32; NO_PATTERN gives zeros."""
    safe = mx.where(idx == NO_PATTERN, 0, idx).astype(mx.int32)
    c = mx.take_along_axis(bank, safe[..., None], axis=1).astype(mx.float32)
    return mx.where((idx == NO_PATTERN)[..., None], 0.0, c)


def mine(xk: mx.array, xv: mx.array, cfg):
    """The first flush: mine the K and V banks from every token seen so far, xk [N, T, D], xv [N, T, Dv].
    Returns (K bank [N, k', D] or None, V bank or None) in the cache dtype. When both banks have the same
    size and width they are mined in one batched k-means (rows are independent)."""
    def run(x, k, init=None):
        return kmeans(x, k, cfg.kmeans_iters, cfg.kmeans_tol, cfg.seed, init).astype(cfg.mx_dtype)

    kk, kv = cfg.k_patterns, cfg.v_patterns
    n, t, _ = xk.shape
    if kk and kv and kk == kv and xk.shape[-1] == xv.shape[-1]:
        init = kmeans_init(n, t, min(kk, t), cfg.seed)  # the same start as two separate runs
        both = run(mx.concatenate([xk, xv], axis=0), kk, mx.concatenate([init, init], axis=0))
        return both[:n], both[n:]
    return (run(xk, kk) if kk else None), (run(xv, kv) if kv else None)


def grow_and_assign(x: mx.array, bank: mx.array, group_size: int, max_patterns: int):
    """Later flushes, one per group of `group_size` tokens of x [N, n, D], in order: each group's
    Chebyshev centre joins the bank (while the bank is under max_patterns), then the group's tokens go
    to the nearest pattern of the bank as it is after that addition, by min-max distance.

    bank: [N, M, D], the valid patterns. Returns (new patterns [N, a, D], idx [N, n] uint8).
    """
    n_rows, n, dim = x.shape
    m = bank.shape[1]
    groups = n // group_size
    add = max(0, min(groups, max_patterns - m))
    centers = chebyshev_center(x.reshape(n_rows * groups, group_size, dim)).reshape(n_rows, groups, dim)
    new = centers[:, :add].astype(bank.dtype)  # [N, a, D]
    full = mx.concatenate([bank, new], axis=1) if add else bank
    # group g may only use the patterns that existed after its own flush
    limit = mx.minimum(m + 1 + mx.arange(groups), m + add)  # [groups]
    allowed = mx.arange(m + add)[None, :] < mx.repeat(limit, group_size)[:, None]  # [n, M + a]
    idx = nearest_minmax(x, full, allowed).astype(mx.uint8)
    return new, idx


def residuals(x: mx.array, bank, idx, gate_z=None):
    """Subtract the assigned patterns. x [N, T, D], bank [N, M, D] or None (patterns off),
    idx [N, T] uint8. For V pass gate_z: tokens failing the gate keep x and get NO_PATTERN.
    Returns (r [N, T, D] fp32, idx)."""
    x = x.astype(mx.float32)
    if bank is None:
        return x, idx
    c = gather_patterns(bank, idx)
    if gate_z is not None:
        keep = v_gate(x, c, gate_z)
        idx = mx.where(keep, idx, NO_PATTERN).astype(mx.uint8)
        c = mx.where(keep[..., None], c, 0.0)
    return x - c, idx
