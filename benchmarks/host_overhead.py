# Copyright © 2026 mlx-patternkv authors.
"""Host time to build one decode step's graph: SmolLM2-135M, FP16 cache against PatternKV.

A small model's decode step is bound by host work per layer (the cache's bookkeeping, building MLX
ops, launching kernels), not by the GPU. This times the Python call `model(token, cache=cache)`
alone, i.e. the lazy graph building, never its evaluation, for:
  fp16             mlx-lm's KVCache
  pkv portable     PatternKVCache, attention on MLX ops (what the CPU runs)
  pkv kernels      PatternKVCache, attention and flushes through kernels.py. Without a GPU back-end
                   the launches are replaced by stand-ins that return zeros of the right shapes, so
                   the figure is the Python and graph-building time of the kernel path only (on a GPU
                   the real launches run).
Then the Python time of one `kernels.decode_attention` call alone (launches excluded). Prints a
table and writes $OUT/host_overhead.json (OUT defaults to results).

    python benchmarks/host_overhead.py [--context 2048] [--steps 60] [--bits 2]
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mlx.core as mx  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache as mlx_prompt_cache  # noqa: E402

import mlx_patternkv  # noqa: E402
from common import table, write_json  # noqa: E402
from mlx_patternkv import evaluate, kernels  # noqa: E402
from mlx_patternkv.config import PatternKVConfig  # noqa: E402
from mlx_patternkv.integrate import patch_attention  # noqa: E402


def _stand_in(be, name, inputs, template, grid, threadgroup, output_shapes, output_dtypes, poison=None):
    return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]


def call_time(trials=5, n=5000):
    """Median microseconds of Python per kernels.decode_attention call, its launches excluded (they
    return arrays made once): SmolLM2's attention shape (9 query / 3 KV heads, head_dim 64), 8K tokens."""
    import attention as bench

    c = bench.make_cache(1, 3, 64, 8192, 2, 2)
    q = mx.random.normal((1, 9, 1, 64)).astype(mx.float16)
    outs = {}

    def made_once(be, name, inputs, template, grid, threadgroup, output_shapes, output_dtypes, poison=None):
        if name not in outs:
            outs[name] = _stand_in(be, name, inputs, template, grid, threadgroup, output_shapes, output_dtypes)
        return outs[name]

    real = kernels._launch
    kernels._launch = made_once
    try:
        ts = []
        for _ in range(trials):
            t0 = time.perf_counter()
            for _ in range(n):
                kernels._decode_attention("cuda", q, c.k_bank, c.k_idx, c.k_codes, c.k_scales, c.k_mins, c.v_bank,
                                          c.v_idx, c.v_codes, c.v_scales, c.v_mins, c.k_win, c.v_win, c.n_quant,
                                          c.n_win, c.k_new, c.v_new, 0.125, 2, 2, 128, None, None)  # fmt: skip
            ts.append((time.perf_counter() - t0) / n)
    finally:
        kernels._launch = real
    return 1e6 * sorted(ts)[len(ts) // 2]


def build_times(model, cache, context, steps):
    """Median and mean seconds of building one decode step's graph, after a prefill of `context`."""
    evaluate.prefill(model, cache, list(range(1000, 1000 + context)))
    y = mx.array([[5]])
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(y, cache=cache)
        ts.append(time.perf_counter() - t0)
        mx.eval(out)
    ts.sort()
    return ts[len(ts) // 2], sum(ts) / len(ts)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--steps", type=int, default=60, help="decode steps timed (more than a window: flushes included)")
    p.add_argument("--bits", type=int, default=2)
    a = p.parse_args()
    model, _ = mlx_patternkv.load(a.model)
    patch_attention()
    cfg = PatternKVConfig(k_bits=a.bits, v_bits=a.bits)
    gpu = kernels.backend() is not None
    rows = []
    for label in ("fp16", "pkv portable", "pkv kernels"):
        if label == "pkv portable":
            os.environ["MLX_PATTERNKV_PORTABLE"] = "1"
        else:
            os.environ.pop("MLX_PATTERNKV_PORTABLE", None)
        real_backend, real_launch = kernels.backend, kernels._launch
        if label == "pkv kernels" and not gpu:
            kernels.backend, kernels._launch = (lambda: "cuda"), _stand_in
        try:
            cache = mlx_prompt_cache(model) if label == "fp16" else mlx_patternkv.make_prompt_cache(model, cfg)
            med, mean = build_times(model, cache, a.context, a.steps)
        finally:
            kernels.backend, kernels._launch = real_backend, real_launch
        rows.append(dict(cache=label, median_ms=1e3 * med, mean_ms=1e3 * mean,
                         launches="real" if gpu or label != "pkv kernels" else "stand-ins"))  # fmt: skip
    os.environ.pop("MLX_PATTERNKV_PORTABLE", None)
    call_us = call_time()
    print(f"\n=== host time to build one decode step, {mx.default_device()}, context {a.context}, {a.bits}-bit")
    table(rows, ["cache", "median_ms", "mean_ms", "launches"])
    print(f"Python per kernels.decode_attention call, launches excluded: {call_us:.1f} us")
    write_json("host_overhead", rows, dict(context=a.context, steps=a.steps, bits=a.bits, decode_attention_call_us=call_us))


if __name__ == "__main__":
    main()
