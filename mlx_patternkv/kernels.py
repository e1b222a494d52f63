# Copyright © 2026 mlx-patternkv authors.
"""Fused GPU kernels for PatternKV: decode attention over the compressed cache, and the flush.

The kernel bodies are Metal source (`metal/*.metal`) written against a few helper names; Apple GPUs
build them with `mx.fast.metal_kernel` after `metal/prelude_metal.h`, NVIDIA GPUs with
`mx.fast.cuda_kernel` after `metal/prelude_cuda.h`, which maps the same names (and Metal's thread
attributes) onto CUDA. Both get `metal/common.h`.

Inputs are whole cache buffers (docs/DESIGN.md's layout); lengths travel as small int32 arrays, never
as template values, so a kernel compiles once per (dtype, head_dim, GQA ratio, bits, group sizes,
patterns on/off) and never per step.

Public: `backend()`, `supports(...)`, `decode_attention(...)`, `flush(...)`.
"""

import functools
import hashlib
import math
import os
import struct
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx

_DIR = Path(__file__).parent / "metal"

NT_MERGE = 512  # threads per threadgroup of the merge (decode_merge.metal's NT)
NT_FLUSH = {"metal": 512, "cuda": 512}  # threads per threadgroup of the flush kernel (1024 was slower)
MAX_SPLITS = 255  # quantized-token splits per (sequence, KV head); the merge holds 256 weights per head
# Default split size: SPLITS_PER_HEAD splits per (sequence, KV head), at least MIN_SPLIT tokens each.
# From an H200 sweep of one decode step's latency (docs/RESULTS.md; 32 query / 8 KV heads, head_dim
# 128): the best split was 512 tokens up to 16K tokens and about 1/64 of the context beyond, at batch
# 1 and 8 alike; shorter splits lose to each threadgroup's fixed costs, longer ones leave the GPU idle.
SPLITS_PER_HEAD = 64
MIN_SPLIT = 512
# Tokens per lane in the score phase (decode_split.metal's TPL): 8 amortises a channel's loads over
# more tokens; 4 halves the tokens a SIMD group walks through one after another, which is what counts
# while the GPU has more room than work: below LANE8_WORK quantized tokens x KV heads x sequences
# (H200 sweep, RESULTS.md: 4 won at 4K and 16K tokens x 8 heads at batch 1, 8 at 64K, and at 16K
# with batch 8).
LANE8_WORK = 1 << 18
TG_BYTES = 32768  # threadgroup memory of one threadgroup (Apple GPUs' limit; CUDA allows 48 KB)
CENTER_FLOATS = 4096  # threadgroup floats for the flush's candidate centres
NO_PATTERN = 255

# name -> (input names, output names)
_KERNELS = {
    "decode_split": (
        [
            "q", "tab", "kc", "k_idx", "k_codes", "k_scales", "v_bank", "v_idx", "v_codes",
            "v_scales", "v_mins", "k_win", "v_win", "k_new", "v_new", "prm",
        ],
        ["o_part", "ml_part", "hist_part"],
    ),  # fmt: skip
    "decode_merge": (["o_part", "ml_part", "hist_part", "v_bank", "prm"], ["out"]),
    "qk_table": (["q", "k_bank", "k_scales", "k_mins", "prm"], ["tab", "kc"]),
    "flush": (["x", "bank", "prm"], ["idx", "codes", "scales", "mins", "centers"]),
}

# Test hooks: fill every kernel output with a poison value before the kernel runs (so an element a
# kernel forgets to write shows up), and print the generated source.
_POISON = False
_VERBOSE = False


def backend():
    """"metal" or "cuda" when the fused kernels can run on the default device, else None.

    None when MLX_PATTERNKV_PORTABLE=1 (or any value but 0 / empty), when the default device is the
    CPU, or when MLX has neither a Metal nor a CUDA back-end."""
    if os.environ.get("MLX_PATTERNKV_PORTABLE", "") not in ("", "0"):
        return None
    if mx.default_device().type != mx.DeviceType.gpu:
        return None
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return None


def supports(head_dim: int, n_heads: int, n_kv_heads: int, k_bits: int, v_bits: int, group_size: int) -> bool:
    """Whether `decode_attention` / `flush` handle this shape (else use the portable path):
    head_dim 64, 128 or 256 (K and V alike: the thread layouts need a divisor of 256), GQA ratio 1..8,
    bits 2/3/4/8, K group 32/64/128 tokens."""
    return (
        head_dim in (64, 128, 256)
        and n_kv_heads > 0
        and n_heads % n_kv_heads == 0
        and 1 <= n_heads // n_kv_heads <= 8
        and k_bits in (2, 3, 4, 8)
        and v_bits in (2, 3, 4, 8)
        and group_size in (32, 64, 128)
    )


# ---------------------------------------------------------------------------------------- building


@functools.lru_cache(maxsize=None)
def _text(name: str) -> str:
    return (_DIR / name).read_text()


def source(be: str, name: str):
    """(header, body) of kernel `name` for backend `be` ("metal" or "cuda")."""
    prelude = "prelude_metal.h" if be == "metal" else "prelude_cuda.h"
    return _text(prelude) + "\n" + _text("common.h"), _text(name + ".metal")


@functools.lru_cache(maxsize=None)
def _kernel(be: str, name: str):
    header, body = source(be, name)
    inputs, outputs = _KERNELS[name]
    # the source hash in the name: MLX's CUDA back-end caches compiled kernels on disk by name
    tag = hashlib.sha1((be + header + body).encode()).hexdigest()[:12]
    make = mx.fast.metal_kernel if be == "metal" else mx.fast.cuda_kernel
    return make(name=f"pkv_{name}_{tag}", input_names=inputs, output_names=outputs, source=body, header=header)


def _launch(be, name, inputs, template, grid, threadgroup, output_shapes, output_dtypes, poison=None):
    """One kernel launch. `poison`: the value unwritten outputs hold when _POISON is set."""
    return _kernel(be, name)(
        inputs=inputs,
        template=template,
        grid=grid,
        threadgroup=threadgroup,
        output_shapes=output_shapes,
        output_dtypes=output_dtypes,
        init_value=poison if _POISON else None,
        verbose=_VERBOSE,
    )


@functools.lru_cache(maxsize=None)
def _dummy(dtype):
    # more than 8 elements: Metal passes small arrays in the constant address space instead of device
    return mx.zeros((16,), dtype)


@functools.lru_cache(maxsize=256)
def _params(values: tuple) -> mx.array:
    """The int32 parameter array of a launch, made once per distinct content: every layer of a decode
    step passes the same lengths, and each fresh host array costs the GPU a transfer."""
    return mx.array(values, mx.int32)


def _lengths(n, b: int, what: str):
    """An int or B ints -> list of B python ints."""
    if isinstance(n, mx.array):
        n = n.tolist()
    if not hasattr(n, "__len__"):
        return [int(n)] * b
    n = [int(v) for v in n]
    if len(n) != b:
        raise ValueError(f"{what} has {len(n)} entries for a batch of {b}")
    return n


# ---------------------------------------------------------------------------------------- attention


def decode_attention(
    q, k_bank, k_idx, k_codes, k_scales, k_mins, v_bank, v_idx, v_codes, v_scales, v_mins,
    k_win, v_win, n_quant, n_win, k_new, v_new, scale, *, k_bits, v_bits, group_size, split_tokens=None,
    lane_tokens=None,
):  # fmt: skip
    """Attention of one query token per sequence over a PatternKV cache, in three fused launches
    (the tables that depend only on q, the split pass, the merge). Never rebuilds K or V.

    q: [B, Hq, 1, D] (the model's dtype). Cache fields as in docs/DESIGN.md, whole buffers (never
    sliced): k_bank [B, H, Mk, D] or None (K patterns off), k_idx [B, H, Tcap] uint8 or None,
    k_codes [B, H, D, Tcap*k_bits/32] uint32, k_scales / k_mins [B, H, D, Tcap/group_size],
    v_bank [B, H, Mv, D] or None, v_idx [B, H, Tcap] uint8 (255 = gate off) or None,
    v_codes [B, H, Tcap, D*v_bits/32] uint32, v_scales / v_mins [B, H, Tcap, D/Gv] (Gv read from
    the shape); the quantized arrays may be None when nothing is quantized. Bank rows past the valid
    patterns must be finite (zero) or never referenced.
    k_win, v_win: [B, H, W, D] FP16 window (or None). n_quant, n_win: int, or B ints for sequences
    of different lengths (host values: an mx.array is read back). k_new, v_new: [B, H, L, D] the
    step's new tokens, attended exactly after the window. scale: softmax scale.
    split_tokens: quantized tokens per split (rounded up to whole tiles); None picks one.
    lane_tokens: tokens per lane in the score phase, 4 or 8 (8 needs k_bits < 8 and a GQA ratio
    <= 4); None picks by the amount of work. Both are tuning knobs for benchmarks/attention.py.

    Returns [B, Hq, 1, D] in q's dtype: softmax(q K^T * scale) V over the n_quant quantized tokens,
    the n_win window rows and the L new tokens (fp32 softmax). Raises RuntimeError without a GPU
    back-end and ValueError for shapes `supports` rejects.
    """
    be = backend()
    if be is None:
        raise RuntimeError("mlx_patternkv.kernels: no GPU back-end (or MLX_PATTERNKV_PORTABLE is set)")
    return _decode_attention(
        be, q, k_bank, k_idx, k_codes, k_scales, k_mins, v_bank, v_idx, v_codes, v_scales, v_mins,
        k_win, v_win, n_quant, n_win, k_new, v_new, scale, k_bits, v_bits, group_size, split_tokens,
        lane_tokens,
    )  # fmt: skip


def _lane_tokens(work: int, r: int, k_bits: int, lane_tokens) -> int:
    """decode_split.metal's TPL: 4 or 8 (8 needs the lane's codes of a channel in one word, k_bits
    < 8, and registers for R <= 4 query heads). work: quantized tokens x KV heads x sequences."""
    if lane_tokens is None:
        lane_tokens = 8 if work >= LANE8_WORK else 4
    if lane_tokens not in (4, 8):
        raise ValueError(f"lane_tokens must be 4 or 8, got {lane_tokens}")
    return 4 if k_bits == 8 or r > 4 else lane_tokens


def _split_geometry(d: int, r: int, tpl: int, kpat: bool, vpat: bool):
    """(SIMD groups per threadgroup, tokens per tile) of decode_split.metal (its NW and TILE) for TPL
    tokens per lane: as many SIMD groups (4, 2 or 1) as fit the threadgroup memory in TG_BYTES, the
    smallest budget (Metal's)."""
    tile = 32 * tpl
    for nwarp in (4, 2, 1):
        work = max(nwarp * tile * r + (nwarp * r * 256 if vpat else 0), r * d)  # probabilities, histograms
        floats = d * r + (r * 256 if kpat else 1) + work + nwarp * 2 * r  # q, table, work, states
        if 4 * floats <= TG_BYTES:
            break
    return nwarp, tile


def _split_size(nq_max: int, nwarp: int, tile: int, split_tokens) -> int:
    """Quantized tokens per split: a whole number of tiles, a multiple of `nwarp` tiles when the
    default picks it (every SIMD group busy)."""
    if split_tokens is None:
        chunk = nwarp * tile
        split_tokens = -(-max(MIN_SPLIT, -(-nq_max // SPLITS_PER_HEAD)) // chunk) * chunk
    st = max(int(split_tokens), -(-nq_max // MAX_SPLITS), tile)
    return -(-st // tile) * tile


def _decode_attention(
    be, q, k_bank, k_idx, k_codes, k_scales, k_mins, v_bank, v_idx, v_codes, v_scales, v_mins,
    k_win, v_win, n_quant, n_win, k_new, v_new, scale, k_bits, v_bits, group_size, split_tokens, lane_tokens,
):  # fmt: skip
    arrays = (q, k_bank, k_idx, k_codes, k_scales, k_mins, v_bank, v_idx, v_codes, v_scales, v_mins, k_win, v_win, k_new, v_new)
    b = q.shape[0]
    p = _decode_plan(
        tuple(None if a is None else (a.shape, a.dtype) for a in arrays),
        tuple(_lengths(n_quant, b, "n_quant")), tuple(_lengths(n_win, b, "n_win")), float(scale),
        k_bits, v_bits, group_size, split_tokens, lane_tokens,
    )  # fmt: skip
    cdt, quant, kpat, vpat = p.cdt, p.quant, p.kpat, p.vpat
    tab = kc = _dummy(mx.float32)
    if quant:  # the q . P_k table (K patterns) and the K groups' constants
        tab, kc = _launch(be, "qk_table", [q, k_bank if kpat else _dummy(cdt), k_scales, k_mins, p.prm], *p.table)
    vb_in = v_bank if vpat else _dummy(cdt)
    inputs = [
        q, tab, kc,
        k_idx if kpat else _dummy(mx.uint8),
        k_codes if quant else _dummy(mx.uint32),
        k_scales if quant else _dummy(cdt),
        vb_in,
        v_idx if vpat else _dummy(mx.uint8),
        v_codes if quant else _dummy(mx.uint32),
        v_scales if quant else _dummy(cdt),
        v_mins if quant else _dummy(cdt),
        k_win if k_win is not None else _dummy(cdt),
        v_win if v_win is not None else _dummy(cdt),
        k_new, v_new, p.prm,
    ]  # fmt: skip
    o_part, ml_part, hist_part = _launch(be, "decode_split", inputs, *p.split)
    (out,) = _launch(be, "decode_merge", [o_part, ml_part, hist_part, vb_in, p.prm], *p.merge)
    return out


@functools.lru_cache(maxsize=64)
def _decode_plan(sig, nq, nw, scale, k_bits, v_bits, g, split_tokens, lane_tokens):
    """Checks and launch parameters of one decode-attention call, from its arrays' (shape, dtype) in
    `sig` (None for an absent array) and its lengths: the layers of a decode step share them, so a
    step works them out once (Python time per layer is what a small model's decode step is bound by).
    Returns a namespace: cdt, quant, kpat, vpat, prm, and the (template, grid, threadgroup, output
    shapes, output dtypes, poison) of the table, split and merge launches."""
    (qs, qdt), kbank, kidx, kcodes, kscales, kmins, vbank, vidx, vcodes, vscales, vmins, kwin, vwin, knew, vnew = sig
    b, hq, lq, d = qs
    h, ln = knew[0][1], knew[0][2]
    if lq != 1:
        raise ValueError(f"decode_attention takes one query token per sequence, got {lq}")
    if hq % h or not supports(d, hq, h, k_bits, v_bits, g):
        raise ValueError(f"unsupported: head_dim {d}, {hq} query / {h} KV heads, bits {k_bits}/{v_bits}, group {g}")
    if knew[0] != (b, h, ln, d) or vnew[0] != (b, h, ln, d):
        raise ValueError(f"k_new {knew[0]} / v_new {vnew[0]} do not match q {qs}")
    r = hq // h
    nq_max = max(nq)
    w = 0 if kwin is None else kwin[0][2]
    if max(nw) > w or min(nw) < 0 or min(nq) < 0:
        raise ValueError(f"n_win {list(nw)} does not fit the window of {w} rows")
    tcap = 0 if kcodes is None else kscales[0][-1] * g
    if nq_max > tcap:
        raise ValueError(f"n_quant {nq_max} exceeds the quantized capacity {tcap}")
    gv = g if vscales is None else d // vscales[0][-1]
    kpat = kbank is not None and kidx is not None and nq_max > 0 and kbank[0][2] > 0
    vpat = vbank is not None and vidx is not None and nq_max > 0 and vbank[0][2] > 0
    quant = nq_max > 0
    if quant:
        want = {
            "k_codes": (kcodes, (b, h, d, tcap * k_bits // 32)),
            "k_mins": (kmins, (b, h, d, tcap // g)),
            "v_codes": (vcodes, (b, h, tcap, d * v_bits // 32)),
            "v_scales": (vscales, (b, h, tcap, d // gv)),
            "v_mins": (vmins, (b, h, tcap, d // gv)),
        }
        for name, (a, shape) in want.items():
            if a is None or tuple(a[0]) != shape:
                raise ValueError(f"{name} has shape {None if a is None else a[0]}, expected {shape}")
        if gv not in (32, 64, 128) or d % gv:
            raise ValueError(f"V channel group {gv} is not 32, 64 or 128")
    cdt = kwin[1] if kwin is not None else (kscales[1] if kscales is not None else qdt)
    for a in [*([kbank] if kpat else []), *([vbank] if vpat else []), *([kscales, kmins, vscales, vmins] if quant else []), kwin, vwin]:
        if a is not None and a[1] != cdt:
            raise ValueError(f"cache arrays must share one dtype ({cdt}), got {a[1]}")

    tpl = _lane_tokens(sum(nq) * h, r, k_bits, lane_tokens)
    nwarp, tile = _split_geometry(d, r, tpl, kpat, vpat)
    st = _split_size(nq_max, nwarp, tile, split_tokens) if quant else tile
    nsq = -(-nq_max // st)
    ns = nsq + 1
    mkc = kbank[0][2] if kpat else 0
    mvc = vbank[0][2] if vpat else 0
    if mkc > 256 or mvc > 256:
        raise ValueError("pattern banks hold at most 256 rows (uint8 indices)")
    sbits = struct.unpack("<i", struct.pack("<f", scale * math.log2(math.e)))[0]
    prm = _params((h, tcap, w, ln, st, nsq, mkc, mvc, sbits, *(v for pair in zip(nq, nw) for v in pair)))
    f32, nan = mx.float32, float("nan")
    ngq = -(-nq_max // g)  # K groups holding quantized tokens
    ntg = -(-mkc // 8) + -(-ngq // 32)  # table threadgroups: 8 bank rows, or 32 K groups, each
    table = (
        [("QT", qdt), ("T", cdt), ("D", d), ("R", r), ("KB", k_bits), ("G", g), ("KPAT", kpat)],
        (256 * ntg, h, b), (256, 1, 1), [(b, h, r, mkc) if kpat else _dummy(f32).shape, (b, h, r, tcap // g)],
        [f32] * 2, nan,
    )  # fmt: skip
    nt = 32 * nwarp
    hshape = (b, h, ns, r, mvc) if vpat else _dummy(f32).shape  # unused without V patterns
    split = (
        [("QT", qdt), ("T", cdt), ("D", d), ("R", r), ("KB", k_bits), ("VB", v_bits), ("G", g),
         ("GV", gv), ("KPAT", kpat), ("VPAT", vpat), ("NW", nwarp), ("TPL", tpl)],
        (nt * ns, h, b), (nt, 1, 1), [(b, h, ns, r, d), (b, h, ns, r, 2), hshape], [f32] * 3, nan,
    )  # fmt: skip
    merge = (
        [("QT", qdt), ("T", cdt), ("D", d), ("R", r), ("VPAT", vpat)],
        (NT_MERGE * r, h, b), (NT_MERGE, 1, 1), [(b, hq, 1, d)], [qdt], nan,
    )  # fmt: skip
    return SimpleNamespace(cdt=cdt, quant=quant, kpat=kpat, vpat=vpat, prm=prm, table=table, split=split, merge=merge)


# ---------------------------------------------------------------------------------------- flush


def flush(
    x, bank, n_pat: int, n: int, *, bits: int, group_size: int, values: bool = False, v_group_size=None,
    max_patterns: int = 255, gate_z=None, dtype=None, x_start: int = 0,
):  # fmt: skip
    """Quantize n tokens of K (values=False) or V (values=True) in one launch: the later-flush path
    of PATTERNKV.md, group by group of `group_size` tokens.

    x: [B, H, T, D] any float dtype, whole buffer; tokens x_start .. x_start + n - 1 are flushed
    (n a multiple of group_size). bank: [B, H, M, D], rows < n_pat valid (the bank *before* this
    flush), or None when patterns are off. Group i's Chebyshev centre (min + max) / 2 joins the bank
    as row n_pat + i while n_pat + i < max_patterns; each token is assigned to the nearest pattern of
    the bank as it stands after its own group's centre joined, by min-max distance (first index on
    ties). V (values=True): gate_z is the gate's z (None: no gate, every pattern kept); a token whose
    gate fails stores index 255 and its raw vector. K residuals are quantized per channel over each
    group, V residuals per token over v_group_size channels, both like quantize.quantize.
    dtype: storage dtype of scales / mins / centres (default: the bank's, else x's).

    Returns (idx [B, H, n] uint8, codes, scales, mins, centers [B, H, n/group_size, D]):
      K: codes [B, H, D, n*bits/32] uint32, scales / mins [B, H, D, n/group_size];
      V: codes [B, H, n, D*bits/32] uint32, scales / mins [B, H, n, D/v_group_size].
    The caller writes centers[:, :, :k] into bank rows n_pat .. n_pat + k - 1, with
    k = min(n/group_size, max(0, max_patterns - n_pat)).
    """
    be = backend()
    if be is None:
        raise RuntimeError("mlx_patternkv.kernels: no GPU back-end (or MLX_PATTERNKV_PORTABLE is set)")
    return _flush(be, x, bank, n_pat, n, bits, group_size, values, v_group_size, max_patterns, gate_z, dtype, x_start)


def _flush(be, x, bank, n_pat, n, bits, g, values, gv, max_patterns, gate_z, dtype, x_start):
    b, h, tx, d = x.shape
    if n % g or n <= 0 or x_start + n > tx:
        raise ValueError(f"flush of {n} tokens from row {x_start} of {tx}: need whole groups of {g}")
    if not supports(d, h, h, bits, bits, g):
        raise ValueError(f"unsupported flush: head_dim {d}, bits {bits}, group {g}")
    gv = gv or g
    if values and (gv not in (32, 64, 128) or d % gv):
        raise ValueError(f"V channel group {gv} does not divide head_dim {d}")
    has_bank = bank is not None and n_pat > 0
    dt = dtype or (bank.dtype if bank is not None else x.dtype)
    if has_bank and (bank.shape[:2] != (b, h) or bank.shape[3] != d or n_pat > bank.shape[2]):
        raise ValueError(f"bank {bank.shape} does not match x {x.shape} with {n_pat} patterns")
    thr = -1.0 if gate_z is None else 2 * gate_z / math.sqrt(5 * d)
    ngc = CENTER_FLOATS // d
    ng = n // g
    grow = max(0, min(max_patterns - n_pat, ng)) if has_bank else 0
    if grow <= ngc:
        chunks = [(0, ng)]
    else:  # more centres than threadgroup memory holds: launch chunk by chunk, growing the bank
        chunks = [(s, min(s + ngc, ng)) for s in range(0, ng, ngc)]
    outs = []
    cur_bank, cur_np = bank, n_pat
    for g0, g1 in chunks:
        o = _flush_launch(be, x, cur_bank if has_bank else None, cur_np, x_start + g0 * g, g1 - g0,
                          bits, g, values, gv, max_patterns, thr, dt, ngc)  # fmt: skip
        outs.append(o)
        if has_bank and len(chunks) > 1:
            k = max(0, min(max_patterns - cur_np, g1 - g0))
            cur_bank = mx.concatenate([cur_bank[:, :, :cur_np], o[4][:, :, :k].astype(cur_bank.dtype)], axis=2)
            cur_np += k
    if len(outs) == 1:
        return outs[0]
    cat = lambda i, axis: mx.concatenate([o[i] for o in outs], axis=axis)  # noqa: E731
    if values:
        return cat(0, 2), cat(1, 2), cat(2, 2), cat(3, 2), cat(4, 2)
    return cat(0, 2), cat(1, 3), cat(2, 3), cat(3, 3), cat(4, 2)


def _flush_launch(be, x, bank, n_pat, x0, ng, bits, g, values, gv, max_patterns, thr, dt, ngc):
    b, h, tx, d = x.shape
    n = ng * g
    nt = NT_FLUSH[be]
    has_bank = bank is not None
    mc = bank.shape[2] if has_bank else 0
    tbits = struct.unpack("<i", struct.pack("<f", thr))[0]
    prm = _params((h, tx, x0, ng, mc, max_patterns, n_pat if has_bank else 0, tbits))
    if values:
        shapes = [(b, h, n), (b, h, n, d * bits // 32), (b, h, n, d // gv), (b, h, n, d // gv), (b, h, ng, d)]
    else:
        shapes = [(b, h, n), (b, h, d, n * bits // 32), (b, h, d, ng), (b, h, d, ng), (b, h, ng, d)]
    return _launch(
        be, "flush",
        [x, bank if has_bank else _dummy(dt), prm],
        [("XT", x.dtype), ("T", dt), ("D", d), ("BITS", bits), ("G", g), ("GV", gv), ("IS_V", bool(values)),
         ("HAS_BANK", has_bank), ("NGC", ngc), ("NTF", nt)],
        (nt * ng, h, b), (nt, 1, 1), shapes, [mx.uint8, mx.uint32, dt, dt, dt], 253.0,
    )  # fmt: skip
