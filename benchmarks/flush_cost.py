# Copyright © 2026 mlx-patternkv authors.
"""What the later flushes cost during decoding, against the decode-attention step they come with.

One layer's PatternKVCache (batch 1, 32 query / 8 KV heads, head_dim 128, group 128, window 128, bits 2
and 4) filled to a context of T - 1 tokens (prefill chunks of 2048: the first mines the banks, later
ones grow them), so that n_quant = T - window and the window holds window - 1 tokens. Then:
  (a) flush: one more token fills the window; the time of `_commit()` (what update_and_fetch does at the
      next step: the 128-token K and V flush of cache.py, bank growth, window reset), with the fused
      flush kernel (kernels.flush, a GPU back-end) and with MLX_PATTERNKV_PORTABLE=1 (MLX ops); also
      the two kernels.flush launches alone (kernels_only_ms: K and V, the rest is _commit's other ops);
  (b) decode: one decode-attention step at context T, attention.compressed_attention on the cache (the
      fused decode kernel on a GPU, the portable path elsewhere);
and reports the flush amortized per token (flush / window) as a percentage of the decode step, for both
flush paths. Times are wall-clock medians of build + mx.eval over trials after warm-up (each flush trial
starts from a fresh copy of the filled cache). Also checks that both flush paths store identical bytes.

    python benchmarks/flush_cost.py                # T = 8192, bits 2 and 4 (meant for a GPU)
    python benchmarks/flush_cost.py --quick        # T = 1024, fewer trials (runs on the CPU too)

Prints a table and writes $OUT/flush_cost.json (OUT defaults to "results"). Without a GPU back-end
only the portable flush is timed (the kernel path is reported unavailable).
"""

import argparse
import copy
import os
import time

import mlx.core as mx
import numpy as np

from common import kv_stream, table, write_json
from mlx_patternkv import PatternKVCache, PatternKVConfig, kernels
from mlx_patternkv.attention import compressed_attention

HQ, H, D = 32, 8, 128
PORTABLE_ENV = "MLX_PATTERNKV_PORTABLE"


class portable_env:
    """Set (True) or clear (False) MLX_PATTERNKV_PORTABLE for a block, restoring it afterwards."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        self.saved = os.environ.get(PORTABLE_ENV)
        if self.on:
            os.environ[PORTABLE_ENV] = "1"
        else:
            os.environ.pop(PORTABLE_ENV, None)

    def __exit__(self, *exc):
        if self.saved is None:
            os.environ.pop(PORTABLE_ENV, None)
        else:
            os.environ[PORTABLE_ENV] = self.saved


def arrays(cache):
    return [a for a in cache._arrays() if a is not None]


def filled_cache(cfg, b, t, dtype, seed=0):
    """A cache holding t - 1 tokens (t - window quantized, window - 1 in the window), evaluated, plus
    the (k, v) of token t, [B, H, 1, D]."""
    stream = kv_stream(b, H, t, D, dtype, seed)
    cache = PatternKVCache(cfg)
    left = t - 1
    last = None
    for k, v in stream:
        take = min(left, k.shape[2])
        if take:
            cache.update_and_fetch(k[:, :, :take], v[:, :, :take])
            cache._commit()
            mx.eval(arrays(cache))
            left -= take
        if take < k.shape[2]:
            last = (k[:, :, take : take + 1], v[:, :, take : take + 1])
    assert cache.n_quant == t - cfg.window and cache.n_win == cfg.window - 1, (cache.n_quant, cache.n_win)
    mx.eval(last)
    return cache, last


def flush_once(base, new_kv):
    """One window-filling step from a copy of `base`: returns (seconds of _commit + eval, the cache)."""
    c = copy.deepcopy(base)
    mx.eval(arrays(c))
    c.update_and_fetch(*new_kv)
    c._fetched = None  # nothing else holds the dense view (as after a layer's attention)
    mx.synchronize()
    t0 = time.perf_counter()
    c._commit()
    mx.eval(arrays(c))
    dt = time.perf_counter() - t0
    return dt, c


def time_flush(base, new_kv, portable: bool, warmup: int, trials: int):
    with portable_env(portable):
        for _ in range(warmup):
            flush_once(base, new_kv)
        ts = sorted(flush_once(base, new_kv)[0] for _ in range(trials))
        _, c = flush_once(base, new_kv)
    return 1000 * ts[len(ts) // 2], c


def time_kernels_only(base, new_kv, warmup: int, trials: int):
    """Median ms of the two kernels.flush launches alone (K and V, the inputs _commit gives them)."""
    cfg, c = base.config, base
    fk = mx.concatenate([c.k_win[:, :, : c.n_win].astype(mx.float32), new_kv[0].astype(mx.float32)], axis=2)
    fv = mx.concatenate([c.v_win[:, :, : c.n_win].astype(mx.float32), new_kv[1].astype(mx.float32)], axis=2)
    mx.eval(fk, fv)
    n, g = cfg.window, cfg.group_size

    def run():
        k = kernels.flush(fk, c.k_bank, c.n_kpat, n, bits=cfg.k_bits, group_size=g, max_patterns=cfg.max_patterns, dtype=cfg.mx_dtype)
        v = kernels.flush(fv, c.v_bank, c.n_vpat, n, bits=cfg.v_bits, group_size=g, values=True,
                          v_group_size=cfg.v_group_size(D), max_patterns=cfg.max_patterns,
                          gate_z=cfg.v_gate_z if cfg.v_gate else None, dtype=cfg.mx_dtype)  # fmt: skip
        return [*k, *v]

    for _ in range(warmup):
        mx.eval(run())
    ts = []
    for _ in range(trials):
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(run())
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return 1000 * ts[len(ts) // 2]


def time_decode(base, new_kv, q, warmup: int, trials: int):
    c = copy.deepcopy(base)
    c.update_and_fetch(*new_kv)  # the pending decode token: attention sees T tokens
    scale = D**-0.5
    for _ in range(warmup):
        mx.eval(compressed_attention(q, c, scale))
    ts = []
    for _ in range(trials):
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(compressed_attention(q, c, scale))
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return 1000 * ts[len(ts) // 2]


def identical(a, b) -> bool:
    """Same counters and the same bytes in every array."""
    names = ("n_quant", "n_win", "n_kpat", "n_vpat", "offset")
    if any(getattr(a, n) != getattr(b, n) for n in names):
        return False
    for x, y in zip(a._arrays(), b._arrays()):
        if (x is None) != (y is None):
            return False
        if x is not None:
            if x.shape != y.shape or x.dtype != y.dtype:
                return False
            if x.dtype == mx.bfloat16:
                x, y = x.view(mx.uint16), y.view(mx.uint16)
            xa, ya = np.array(x), np.array(y)
            isz = xa.dtype.itemsize
            view = {1: np.uint8, 2: np.uint16, 4: np.uint32}[isz]
            if not np.array_equal(xa.view(view), ya.view(view)):
                return False
    return True


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="context 1024, fewer trials (a CPU smoke run)")
    p.add_argument("--context", type=int, default=None, help="tokens T (default 8192, --quick 1024)")
    p.add_argument("--bits", default="2,4")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--trials", type=int, default=None, help="timed trials per measurement (default 21, --quick 5)")
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args()
    t = a.context or (1024 if a.quick else 8192)
    trials = a.trials or (5 if a.quick else 21)
    warmup = 1 if a.quick else a.warmup
    g = w = 128
    gpu = mx.default_device().type == mx.DeviceType.gpu
    dtype = mx.float16 if gpu else mx.float32
    with portable_env(False):
        be = kernels.backend()
    print(f"device {mx.default_device()}, kernel back-end {be or 'none'}; B={a.batch}, {HQ}q/{H}kv heads, "
          f"D={D}, group {g}, window {w}, context {t}, {trials} trials")  # fmt: skip
    if be is None:
        print("fused flush kernel unavailable here (no GPU back-end, or the kernel path is off): "
              "timing the portable flush only")  # fmt: skip
    rows = []
    for bits in [int(x) for x in a.bits.split(",")]:
        cfg = PatternKVConfig(k_bits=bits, v_bits=bits, group_size=g, window=w)
        t0 = time.perf_counter()
        base, new_kv = filled_cache(cfg, a.batch, t, dtype, seed=bits)
        fill_s = time.perf_counter() - t0
        q = mx.random.normal((a.batch, HQ, 1, D), key=mx.random.key(bits)).astype(dtype)
        mx.eval(q)
        kernel_ok = be is not None and kernels.supports(D, HQ, H, bits, bits, g)
        row = dict(bits=bits, context=t, n_kpat=base.n_kpat, n_vpat=base.n_vpat)
        row["flush_portable_ms"], port_cache = time_flush(base, new_kv, True, warmup, trials)
        if kernel_ok:
            row["flush_kernel_ms"], kern_cache = time_flush(base, new_kv, False, warmup, trials)
            row["identical"] = identical(port_cache, kern_cache)
            with portable_env(False):
                row["kernels_only_ms"] = time_kernels_only(base, new_kv, warmup, trials)
        else:
            row["flush_kernel_ms"] = row["kernels_only_ms"] = row["identical"] = None
        row["decode_path"] = "kernel" if be is not None and kernels.supports(D, HQ, H, bits, bits, g) else "portable"
        try:
            with portable_env(False):
                row["decode_ms"] = time_decode(base, new_kv, q, warmup, trials)
        except Exception as e:  # report the flush times even if the decode step fails
            row["decode_ms"] = None
            row["decode_error"] = str(e)[:300]
            print(f"decode attention failed: {e}", flush=True)
        for path in ("kernel", "portable"):
            f = row[f"flush_{path}_ms"]
            row[f"flush_{path}_per_token_ms"] = None if f is None else f / w
            ok = f is not None and row["decode_ms"]
            row[f"{path}_pct_of_decode"] = 100 * f / w / row["decode_ms"] if ok else None
        rows.append(row)
        print(f"bits {bits}: filled in {fill_s:.1f} s; " + ", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    print()
    table(rows, ["bits", "context", "flush_kernel_ms", "kernels_only_ms", "flush_portable_ms", "decode_ms", "decode_path",
                 "kernel_pct_of_decode", "portable_pct_of_decode", "identical"])  # fmt: skip
    print("pct_of_decode: (flush time / window) / decode-attention step time x 100, one layer; kernels_only_ms:\n"
          "the two kernels.flush launches alone (K, V), the rest of flush_kernel_ms is _commit's other work")  # fmt: skip
    write_json(
        "flush_cost", rows,
        dict(backend=be, batch=a.batch, heads=[HQ, H], head_dim=D, group_size=g, window=w, trials=trials,
             dtype=str(dtype), kernel_available=be is not None),
    )  # fmt: skip


if __name__ == "__main__":
    main()
