# Copyright © 2026 mlx-patternkv authors.
"""Attention computed on the compressed cache, never rebuilding K or V.

For query q and quantized token t with K pattern i_t, residual codes r_t, V pattern j_t:
    score_t = (q P_k^T)[i_t] + q r_t^T                   (pattern table looked up by index)
    out     = sum_t p_t r^v_t + sum_m S_m P_v[m] + window and new-token part,
    S_m     = sum of p_t over quantized tokens with V pattern m and the gate on (a scatter-add).
Both residual products are `mx.quantized_matmul` on the stored codes. Softmax is in fp32.

Decode and short chunks use this form; long chunks (prefill) use fused SDPA over the dequantized
history (see COMPRESSED_ROWS). On a GPU, decode goes to the fused kernel of `kernels.py` (Metal, or
CUDA from the same source); elsewhere, or with MLX_PATTERNKV_PORTABLE=1, to the MLX-ops path here.
"""

import mlx.core as mx

from . import kernels
from .config import NO_PATTERN

# Decode and short chunks (at most this many query rows per KV head: query heads per KV head x
# tokens) attend on the compressed form. Longer chunks (prefill) attend with mx.fast SDPA over the
# lazily dequantized history, window and chunk: the same math, and 3x faster on the CPU than
# quantized_matmul with many rows (which MLX 0.32's CUDA backend also fails to launch beyond a few
# dozen rows). The dense copy lives for one layer's attention only.
COMPRESSED_ROWS = 16


def compressed_attention(queries, cache, scale: float, mask=None, sinks=None):
    """queries: [B, Hq, L, D] for the L pending tokens of `cache` (a PatternKVCache after
    update_and_fetch). mask: None, "causal" or an array broadcastable to [B, Hq, L, offset] (bool, or
    additive). sinks: None or [Hq] logits of attention sinks. Returns [B, Hq, L, Dv] in queries' dtype.
    """
    k_new, v_new = cache.pending  # [B, H, L, D]
    b, hq, n_q, _ = queries.shape
    if cache.n_quant == 0 or hq // k_new.shape[1] * n_q > COMPRESSED_ROWS:
        keys, values = cache._fetched or cache.keys_and_values()  # [B, H, offset, D], lazy
        cache._qdense = None  # evaluated below: not kept beyond this step (cache.py: _dense)
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask, sinks=sinks)
    cfg = cache.config
    d = queries.shape[-1]
    if (
        n_q == 1 and mask is None and sinks is None and v_new.shape[-1] == d and kernels.backend()
        and kernels.supports(d, hq, k_new.shape[1], cfg.k_bits, cfg.v_bits, cfg.group_size)
    ):  # fmt: skip
        return kernels.decode_attention(
            queries, cache.k_bank, cache.k_idx, cache.k_codes, cache.k_scales, cache.k_mins,
            cache.v_bank, cache.v_idx, cache.v_codes, cache.v_scales, cache.v_mins,
            cache.k_win, cache.v_win, cache.n_quant, cache.n_win, k_new, v_new, scale,
            k_bits=cfg.k_bits, v_bits=cfg.v_bits, group_size=cfg.group_size,
        )  # fmt: skip
    if isinstance(mask, mx.array):
        if mask.ndim < 4:
            mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        mask = mx.broadcast_to(mask, (mask.shape[0], hq, n_q, cache.offset))
    return _attend(queries, cache, k_new, v_new, scale, mask, sinks)


def _attend(q, cache, k_new, v_new, scale, mask, sinks):
    """Queries q [B, Hq, l, D] of the l pending tokens, on the compressed form."""
    cfg = cache.config
    b, hq, l, d = q.shape
    h, n_new = k_new.shape[1], k_new.shape[2]
    r = hq // h
    nq, nw = cache.n_quant, cache.n_win
    qf = (q.astype(mx.float32) * scale).reshape(b, h, r * l, d)  # rows ordered (head in group, query)

    # ---- scores: quantized history [.., Tcap], then window + new tokens [.., nw + n_new]
    parts = []
    if nq:
        cap = cache.k_scales.shape[-1] * cfg.group_size
        s = mx.quantized_matmul(
            qf, cache.k_codes, cache.k_scales, cache.k_mins,
            transpose=False, group_size=cfg.group_size, bits=cfg.k_bits,
        )  # [B, H, R*l, Tcap]  fmt: skip
        if cache.k_idx is not None:
            table = qf @ cache.k_bank.astype(mx.float32).swapaxes(-1, -2)  # [B, H, R*l, Mcap]
            s = s + mx.take_along_axis(table, cache.k_idx[:, :, None, :].astype(mx.int32), axis=-1)
        if mask is not None and not isinstance(mask, str):
            s = _apply(s, mask[..., :nq], b, h, r, l, cap)
        parts.append(mx.where(mx.arange(cap) < nq, s, _NEG))
    dense_k = k_new.astype(mx.float32)
    dense_v = v_new.astype(mx.float32)
    if nw:
        dense_k = mx.concatenate([cache.k_win[:, :, :nw].astype(mx.float32), dense_k], axis=2)
        dense_v = mx.concatenate([cache.v_win[:, :, :nw].astype(mx.float32), dense_v], axis=2)
    s = qf @ dense_k.swapaxes(-1, -2)  # [B, H, R*l, nw + n_new]
    if isinstance(mask, str):  # causal among the new tokens; history fully visible
        qpos = mx.arange(l)[:, None]  # [l, 1]
        kpos = mx.arange(nw + n_new)[None] - nw  # [1, nw + n_new]
        s = mx.where(mx.tile(kpos <= qpos, (r, 1)), s, _NEG)
    elif mask is not None:
        s = _apply(s, mask[..., nq:], b, h, r, l, nw + n_new)
    parts.append(s)
    if sinks is not None:
        sk = mx.broadcast_to(sinks.astype(mx.float32).reshape(1, h, r, 1), (b, h, r, l))
        parts.append(sk.reshape(b, h, r * l, 1))
    p = mx.softmax(mx.concatenate(parts, axis=-1), axis=-1)  # fp32

    # ---- output
    out = None
    if nq:
        pq = p[..., :cap]
        out = mx.quantized_matmul(
            pq, cache.v_codes, cache.v_scales, cache.v_mins,
            transpose=False, group_size=cfg.v_group_size(dense_v.shape[-1]), bits=cfg.v_bits,
        )  # [B, H, R*l, Dv]  fmt: skip
        if cache.v_idx is not None:
            bank = cache.v_bank.astype(mx.float32)  # [B, H, Mcap, Dv]
            out = out + pattern_bins(pq, cache.v_idx)[..., : bank.shape[2]] @ bank
    pd = p[..., cap if nq else 0 :][..., : nw + n_new]
    od = pd @ dense_v
    out = od if out is None else out + od
    return out.reshape(b, hq, l, -1).astype(q.dtype)


_NEG = mx.finfo(mx.float32).min


def pattern_bins(p, idx):
    """S[.., m] = sum of p[.., t] over tokens t with idx[t] == m (NO_PATTERN tokens are dropped).
    p: [B, H, R, T] fp32, idx: [B, H, T] uint8 -> [B, H, R, 255] (bins of every possible index)."""
    b, h, rows, t = p.shape
    nb = NO_PATTERN + 1
    base = (mx.arange(b * h * rows) * nb).reshape(b, h, rows, 1)
    flat = (base + idx[:, :, None, :].astype(mx.int32)).reshape(-1)
    bins = mx.zeros((b * h * rows * nb,), mx.float32).at[flat].add(p.reshape(-1))
    return bins.reshape(b, h, rows, nb)[..., :NO_PATTERN]


def _rows(mask, b, h, r, l, width, pad_value):
    """A [Bm, Hq, l, n] mask as [Bm, H, R*l, width] (padded with pad_value up to width)."""
    m = mask.reshape(mask.shape[0], h, r * l, mask.shape[-1])
    if width > m.shape[-1]:
        pad = mx.full((*m.shape[:-1], width - m.shape[-1]), pad_value, m.dtype)
        m = mx.concatenate([m, pad], axis=-1)
    return m


def _apply(s, mask, b, h, r, l, width):
    """Apply a bool or additive mask [Bm, Hq, l, n] to scores s [B, H, R*l, width]."""
    if mask.dtype == mx.bool_:
        return mx.where(_rows(mask, b, h, r, l, width, False), s, _NEG)
    return s + _rows(mask.astype(mx.float32), b, h, r, l, width, 0.0)
