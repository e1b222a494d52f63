# Copyright © 2026 mlx-patternkv authors.
"""Chained latency of the fused decode attention for the package in a given source tree, so that two
versions can be compared on one GPU in back-to-back runs (A/B):

    git archive REV mlx_patternkv benchmarks | tar -x -C /tmp/old
    python benchmarks/kernel_latency.py /tmp/old; python benchmarks/kernel_latency.py .

Prints one JSON line: microseconds per call (benchmarks/attention.py's latency: 20 chained calls,
median of 5 trials), 2 bits, 32 query / 8 KV heads, head_dim 128, "BxTOKENS" keys.
"""
import json
import os
import sys

tree = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), ".."))
sys.path[:0] = [tree, os.path.join(tree, "benchmarks")]
import mlx.core as mx  # noqa: E402

import attention as bench  # noqa: E402
import mlx_patternkv  # noqa: E402

if not mlx_patternkv.__file__.startswith(tree):
    raise SystemExit(f"imported {mlx_patternkv.__file__}, not the package in {tree} (an editable install wins?)")
if bench.kernels.backend() is None:
    raise SystemExit("no GPU back-end: the fused kernels cannot run here")
res = {}
for t, b in [(4096, 1), (16384, 1), (65536, 1), (131072, 1), (16384, 8), (65536, 8)]:
    c = bench.make_cache(b, 8, 128, t, 2, 2)
    q = mx.random.normal((b, 32, 1, 128)).astype(mx.float16)
    res[f"{b}x{t}"] = round(bench.latency(lambda x: bench.kernel_call(c, x, 128**-0.5), q) * 1e6, 1)
    del c
print(json.dumps(res))
