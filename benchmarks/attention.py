# Copyright © 2026 mlx-patternkv authors.
"""Decode-attention benchmark on a GPU (absolute times only mean something there).

One query token per sequence over a context of T tokens, 32 query / 8 KV heads, head_dim 128, side by
side in one run:
  fp16_sdpa   mx.fast.scaled_dot_product_attention on an FP16 cache of T tokens
  mlxlm_q{b}  mlx-lm's quantized SDPA (mx.quantize'd K/V, group 64, b bits)
  pkv_kernel  our fused kernels (kernels.decode_attention) on a PatternKV cache at b bits
  pkv_port    our portable path (attention.compressed_attention) on the same cache
Each attention time is the latency of one call: the median over trials of (one mx.eval of a chain of
`reps` calls, each call's output the next call's query) / reps, as the layers of a decode step
depend on each other. Launch overheads are included, Python graph building is not. (Independent
calls in one mx.eval may run concurrently on MLX's CUDA back-end, which hides a kernel's latency; the
results of 2026-11-30 before this change were measured that way.) Bytes are what each method must
read; the card's copy bandwidth is measured in the same run.

    python benchmarks/attention.py [--lengths 4096 16384 65536 131072] [--batches 1 8] [--json out.json]
"""

import argparse
import json
import math
import time
from types import SimpleNamespace

import mlx.core as mx

from mlx_patternkv import kernels
from mlx_patternkv.config import PatternKVConfig


def latency(fn, x, reps=20, trials=5):
    """Median seconds per call of fn(x) -> array shaped like x, `reps` calls chained in one mx.eval."""
    mx.eval(fn(x))
    ts = []
    for _ in range(trials):
        y = x
        for _ in range(reps):
            y = fn(y)
        t0 = time.perf_counter()
        mx.eval(y)
        ts.append((time.perf_counter() - t0) / reps)
    ts.sort()
    return ts[len(ts) // 2]


def timeit(fn, reps=20, trials=5):
    """Median seconds per call of fn() (an mx.array or list), `reps` independent calls in one mx.eval
    (throughput: they may overlap on the GPU)."""
    mx.eval(fn())
    ts = []
    for _ in range(trials):
        outs = [fn() for _ in range(reps)]
        t0 = time.perf_counter()
        mx.eval(outs)
        ts.append((time.perf_counter() - t0) / reps)
    ts.sort()
    return ts[len(ts) // 2]


def copy_bandwidth(nbytes=2 << 30):
    """Bytes read + written per second by an elementwise copy of an nbytes buffer."""
    x = mx.random.uniform(shape=(nbytes // 2,)).astype(mx.float16)
    mx.eval(x)
    t = timeit(lambda: x + 1, reps=10, trials=5)
    return 2 * nbytes / t


def _words(shape):
    return mx.random.randint(-(2**31), 2**31 - 1, shape).view(mx.uint32)


def make_cache(b, h, d, t, kb, vb, g=128, window=128, n_pat=255, dtype=mx.float16, seed=0):
    """Random PatternKV cache fields for a context of t tokens: n_quant whole windows, the rest in the
    window but one, and one new token. Banks hold n_pat patterns (255 = the uint8 cap)."""
    mx.random.seed(seed)
    nq = (t - 1) // window * window
    nw = t - 1 - nq
    cfg = PatternKVConfig(k_bits=kb, v_bits=vb, group_size=g, window=window)
    gv = cfg.v_group_size(d)
    tcap = max(-(-nq // 1024) * 1024, 1024)  # capacity grows in steps of 1024 like cache.py
    u = lambda shape, lo, hi: mx.random.uniform(lo, hi, shape).astype(dtype)  # noqa: E731
    c = SimpleNamespace(
        k_bank=mx.random.normal((b, h, n_pat, d)).astype(dtype),
        k_idx=mx.random.randint(0, n_pat, (b, h, tcap)).astype(mx.uint8),
        k_codes=_words((b, h, d, tcap * kb // 32)),
        k_scales=u((b, h, d, tcap // g), 0.01, 0.2),
        k_mins=u((b, h, d, tcap // g), -0.5, 0.0),
        v_bank=mx.random.normal((b, h, n_pat, d)).astype(dtype),
        v_idx=mx.where(mx.random.uniform(shape=(b, h, tcap)) < 0.3, 255, mx.random.randint(0, n_pat, (b, h, tcap))).astype(mx.uint8),
        v_codes=_words((b, h, tcap, d * vb // 32)),
        v_scales=u((b, h, tcap, d // gv), 0.01, 0.2),
        v_mins=u((b, h, tcap, d // gv), -0.5, 0.0),
        k_win=mx.random.normal((b, h, window, d)).astype(dtype),
        v_win=mx.random.normal((b, h, window, d)).astype(dtype),
        k_new=mx.random.normal((b, h, 1, d)).astype(dtype),
        v_new=mx.random.normal((b, h, 1, d)).astype(dtype),
        n_quant=nq, n_win=nw, config=cfg, kb=kb, vb=vb, group=g, gv=gv,
    )  # fmt: skip
    c.offset = nq + nw + 1
    c.pending = (c.k_new, c.v_new)
    mx.eval(list(v for v in vars(c).values() if isinstance(v, mx.array)))
    return c


def kernel_call(c, q, scale, split_tokens=None, lane_tokens=None):
    return kernels.decode_attention(
        q, c.k_bank, c.k_idx, c.k_codes, c.k_scales, c.k_mins, c.v_bank, c.v_idx, c.v_codes, c.v_scales,
        c.v_mins, c.k_win, c.v_win, c.n_quant, c.n_win, c.k_new, c.v_new, scale,
        k_bits=c.kb, v_bits=c.vb, group_size=c.group, split_tokens=split_tokens, lane_tokens=lane_tokens,
    )  # fmt: skip


def portable_call(c, q, scale):
    from mlx_patternkv.attention import compressed_attention

    return compressed_attention(q, c, scale=scale)


def pkv_bytes(c, b, h, d, n_pat):
    """Bytes the fused kernels must read: codes, scales, mins, indices, window, new tokens, banks."""
    nq, nw, g, gv = c.n_quant, c.n_win, c.group, c.gv
    per = nq * d * (c.kb + c.vb) / 8 + 2 * 2 * d * nq / g + 2 * 2 * nq * d / gv + 2 * nq
    per += 2 * 2 * (nw + 1) * d + 2 * 2 * n_pat * d
    return b * h * per


class DeviceError(RuntimeError):
    """A GPU fault: the device context is gone, nothing more can run in this process."""


def _timed(row, key, fn, q, reps, trials, log):
    """row[key + "_s"] = latency of fn(q), or None and row[key + "_error"]; a fault that leaves the
    device unusable (illegal address) raises DeviceError naming the method."""
    try:
        row[key + "_s"] = latency(fn, q, reps, trials)
        mx.synchronize()
    except Exception as e:
        row[key + "_s"] = None
        row[key + "_error"] = str(e)[:300]
        log(f"{key} failed: {str(e)[:300]}")
        if "illegal" in str(e) or "cuda" in str(e).lower() and "fail" in str(e).lower():
            raise DeviceError(f"{key}: {e}") from None


def bench_attention(lengths, batches, bits=(2, 4), hq=32, h=8, d=128, reps=20, trials=5, log=print, deadline=None,
                    baselines=True):  # fmt: skip
    from mlx_lm.models.base import quantized_scaled_dot_product_attention

    rows = []
    scale = 1 / math.sqrt(d)
    for b in batches:
        for t in lengths:
            if deadline is not None and time.time() > deadline:
                log(f"skipped B={b} T={t}: out of time")
                continue
            q = mx.random.normal((b, hq, 1, d)).astype(mx.float16)
            k = mx.random.normal((b, h, t, d)).astype(mx.float16)
            v = mx.random.normal((b, h, t, d)).astype(mx.float16)
            mx.eval(q, k, v)
            row = dict(batch=b, tokens=t)
            rows.append(row)
            _timed(row, "fp16_sdpa", lambda x: mx.fast.scaled_dot_product_attention(x, k, v, scale=scale), q, reps, trials, log)
            row["fp16_bytes"] = 2 * k.nbytes
            for nb in bits if baselines else ():
                qk, qv = mx.quantize(k, group_size=64, bits=nb), mx.quantize(v, group_size=64, bits=nb)
                mx.eval(qk, qv)
                _timed(row, f"mlxlm_q{nb}",
                       lambda x: quantized_scaled_dot_product_attention(x, qk, qv, scale, None, group_size=64, bits=nb),
                       q, reps, trials, log)  # fmt: skip
                del qk, qv
            del k, v
            for nb in bits:
                c = make_cache(b, h, d, t, nb, nb)
                row[f"pkv{nb}_bytes"] = pkv_bytes(c, b, h, d, c.k_bank.shape[2])
                _timed(row, f"pkv{nb}_kernel", lambda x: kernel_call(c, x, scale), q, reps, trials, log)
                if baselines:
                    _timed(row, f"pkv{nb}_portable", lambda x: portable_call(c, x, scale), q, max(2, reps // 4), 3, log)
                del c
            log(json.dumps(row))
    return rows


def bench_overheads(log=print):
    """Fixed costs: an empty custom kernel launch, and FP16 SDPA / our kernels at a tiny context."""
    k = mx.fast.cuda_kernel if kernels.backend() == "cuda" else mx.fast.metal_kernel
    empty = k(name="pkv_empty", input_names=["a"], output_names=["o"], source="if (a[0] > 1e30f) { o[0] = a[0]; }")
    a = mx.zeros((16,))
    res = {"empty_kernel": latency(lambda x: empty(inputs=[x], grid=(32, 1, 1), threadgroup=(32, 1, 1),
                                                   output_shapes=[(16,)], output_dtypes=[mx.float32])[0], a, 50, 5)}  # fmt: skip
    q = mx.random.normal((1, 32, 1, 128)).astype(mx.float16)
    kv = mx.random.normal((1, 8, 256, 128)).astype(mx.float16)
    res["fp16_sdpa_256_tokens"] = latency(lambda x: mx.fast.scaled_dot_product_attention(x, kv, kv, scale=0.1), q, 50, 5)
    c = make_cache(1, 8, 128, 256, 2, 2)
    res["pkv2_256_tokens"] = latency(lambda x: kernel_call(c, x, 0.1), q, 50, 5)
    c.k_bank = c.k_idx = None
    res["pkv2_256_tokens_no_kpatterns"] = latency(lambda x: kernel_call(c, x, 0.1), q, 50, 5)
    log(json.dumps({"overheads": res}))
    return res


def bench_splits(t, b, split_list, bits=2, hq=32, h=8, d=128, log=print, lane_list=(4, 8)):
    """Kernel time against the tokens per split and per lane ("split/lane"; "default" is the
    kernel's own choice of both)."""
    c = make_cache(b, h, d, t, bits, bits)
    q = mx.random.normal((b, hq, 1, d)).astype(mx.float16)
    out = {"default": latency(lambda x: kernel_call(c, x, d**-0.5), q)}
    for st in split_list:
        for tpl in lane_list:
            out[f"{st}/{tpl}"] = latency(lambda x: kernel_call(c, x, d**-0.5, st, tpl), q)
    res = dict(tokens=t, batch=b, times=out)
    log(json.dumps({"split_sweep": res}))
    return res


def bench_flush(b, h=8, d=128, bits=2, g=128, n_pat=254, log=print):
    """One flush of a full window (one group of g tokens), K and V, bank of n_pat patterns."""
    x = mx.random.normal((b, h, g, d))
    bank = mx.random.normal((b, h, 255, d)).astype(mx.float16)
    mx.eval(x, bank)
    tk = timeit(lambda: kernels.flush(x, bank, n_pat, g, bits=bits, group_size=g), 10, 5)
    gv = PatternKVConfig(group_size=g).v_group_size(d)
    tv = timeit(lambda: kernels.flush(x, bank, n_pat, g, bits=bits, group_size=g, values=True, v_group_size=gv, gate_z=1.645), 10, 5)
    res = dict(batch=b, k_s=tk, v_s=tv)
    log(json.dumps({"flush": res}))
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--json", default=None)
    p.add_argument("--no-baselines", action="store_true", help="FP16 SDPA and our kernel only")
    a = p.parse_args()
    if kernels.backend() is None:
        raise SystemExit("no GPU back-end: the fused kernels cannot run here")
    bw = copy_bandwidth()
    rows = bench_attention(a.lengths, a.batches, baselines=not a.no_baselines)
    print(f"copy bandwidth (read + write): {bw / 1e12:.2f} TB/s")
    for r in rows:
        print(r)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(copy_bandwidth=bw, rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
