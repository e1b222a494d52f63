# Copyright © 2026 mlx-patternkv authors.
"""Decode-attention calls for a profiler (ncu), untimed: python benchmarks/profile_once.py TOKENS BATCH BITS [SPLIT [dense]]
("dense": nothing quantized, only the FP16 window and the new token).

    ncu --kernel-name regex:pkv_decode --launch-skip 3 --launch-count 3 python benchmarks/profile_once.py 65536 1 2
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mlx.core as mx  # noqa: E402

import attention as bench  # noqa: E402

t, b, bits = (int(v) for v in sys.argv[1:4])
st = int(sys.argv[4]) if len(sys.argv) > 4 else None
c = bench.make_cache(b, 8, 128, t, bits, bits)
if len(sys.argv) > 5:
    c.n_quant = 0
q = mx.random.normal((b, 32, 1, 128)).astype(mx.float16)
for _ in range(3):
    mx.eval(bench.kernel_call(c, q, 128**-0.5, st))
