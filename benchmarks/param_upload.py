# Copyright © 2026 mlx-patternkv authors.
"""What a fresh host-made parameter array costs a chained GPU launch (CUDA back-end).

An empty kernel chained 50 times with the same small int32 array as an input, then with a fresh
`mx.array` of the same values each call; then the fused decode attention (2 bits, batch 1, 32 query /
8 KV heads, head_dim 128) at 4K and 64K tokens with kernels.py's parameter-array cache, and with the
cache cleared before every call, beside FP16 SDPA. Microseconds per call, benchmarks/attention.py's
latency.

    python benchmarks/param_upload.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mlx.core as mx  # noqa: E402

import attention as bench  # noqa: E402
from mlx_patternkv import kernels  # noqa: E402

if kernels.backend() != "cuda":
    raise SystemExit("needs MLX's CUDA back-end")
lat = bench.latency
k = mx.fast.cuda_kernel(name="pkv_empty2", input_names=["a", "p"], output_names=["o"],
                        source="if (a[0] > 1e30f) { o[0] = a[0] + p[0]; } else { o[threadIdx.x] = a[threadIdx.x]; }")  # fmt: skip
a = mx.zeros((16,))
P = mx.array(list(range(13)), mx.int32)
run = lambda x, p: k(inputs=[x, p], grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(16,)], output_dtypes=[mx.float32])[0]  # noqa: E731
print("empty same prm", lat(lambda x: run(x, P), a, 50, 5) * 1e6)
print("empty fresh prm", lat(lambda x: run(x, mx.array(list(range(13)), mx.int32)), a, 50, 5) * 1e6)
for t, b in [(4096, 1), (65536, 1)]:
    c = bench.make_cache(b, 8, 128, t, 2, 2)
    q = mx.random.normal((b, 32, 1, 128)).astype(mx.float16)
    print(t, b, "kernel cached prm", lat(lambda x: bench.kernel_call(c, x, 0.1), q) * 1e6)

    def fresh(x):  # the launch plan holds the parameter array too
        kernels._params.cache_clear()
        kernels._decode_plan.cache_clear()
        return bench.kernel_call(c, x, 0.1)

    print(t, b, "kernel fresh prm", lat(fresh, q) * 1e6)
    kv = mx.random.normal((b, 8, t, 128)).astype(mx.float16)
    print(t, b, "fp16", lat(lambda x: mx.fast.scaled_dot_product_attention(x, kv, kv, scale=0.1), q) * 1e6)
