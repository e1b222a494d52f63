# Copyright © 2026 mlx-patternkv authors.
"""Asymmetric min-max quantization, packed exactly like `mx.quantize` so that `mx.dequantize` and
`mx.quantized_matmul` read our codes directly.

PATTERNKV.md's quantizer: scale = (max - min) / (2^b - 1), code = round((x - min) / scale),
x_hat = code * scale + min, scale and min stored in the cache dtype. (`mx.quantize` itself moves the
bias so that 0 is exact, which is a different quantizer: we only borrow its layout, and dequantize
with `mx.dequantize(codes, scales, mins)`.)
"""

import mlx.core as mx


def pack(codes: mx.array, bits: int) -> mx.array:
    """Pack codes < 2**bits along the last axis, LSB first, into uint32 words.

    codes: [..., N] with N a multiple of 32 -> [..., N * bits // 32] uint32.
    Codes of 3 bits straddle word boundaries, as in `mx.quantize`.
    """
    *lead, n = codes.shape
    c = codes.reshape(*lead, n // 32, 32).astype(mx.uint32)  # [..., N/32, 32]
    pos = mx.arange(32) * bits  # first bit of each code in the 32*bits-bit stream
    word, shift = pos // 32, pos % 32
    spills = (shift + bits) > 32  # codes whose top bits go into the next word
    low = mx.left_shift(c, shift.astype(mx.uint32))
    high = mx.right_shift(c, (32 - shift).astype(mx.uint32) % 32)
    words = []
    for w in range(bits):
        # bits of different codes never overlap, so a sum is an OR
        part = mx.where(word == w, low, 0) + mx.where(spills & (word == w - 1), high, 0)
        words.append(part.sum(-1).astype(mx.uint32))
    return mx.stack(words, axis=-1).reshape(*lead, n // 32 * bits)


def quantize(x: mx.array, bits: int, group_size: int, dtype=mx.float16):
    """Quantize x [..., N] along the last axis in groups of `group_size`.

    Returns (codes [..., N * bits // 32] uint32, scales [..., N / group_size], mins [..., N / group_size]),
    scales and mins in `dtype`. The codes are computed against the stored (rounded) scale and min, so
    that dequantization reproduces exactly what was measured. A zero-range group gets scale 0, code 0.
    """
    *lead, n = x.shape
    xg = x.astype(mx.float32).reshape(*lead, n // group_size, group_size)
    lo, hi = xg.min(-1), xg.max(-1)
    scales = ((hi - lo) / (2**bits - 1)).astype(dtype)
    mins = lo.astype(dtype)
    s = scales.astype(mx.float32)[..., None]
    safe = mx.where(s > 0, s, 1.0)
    q = mx.round((xg - mins.astype(mx.float32)[..., None]) / safe)
    q = mx.where(s > 0, mx.clip(q, 0, 2**bits - 1), 0).astype(mx.uint32)
    return pack(q.reshape(*lead, n), bits), scales, mins
