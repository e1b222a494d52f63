"""Decode attention time, one query token, batch 1, 32 query / 8 KV heads, head_dim 128: PatternKV's
portable path (MLX ops) vs `mx.fast.scaled_dot_product_attention` on a dense cache and mlx-lm's
quantized SDPA at the same bits, measured side by side in one run.

  python benchmarks/decode_attention.py                          # 4K, 16K, 32K; bits 2 and 4
  python benchmarks/decode_attention.py --contexts 4096 --bits 4

On the CPU the dense baseline is float32 (MLX's CPU float16 matmul has no BLAS and would flatter us);
on a GPU it is float16.
"""

import argparse

import mlx.core as mx
from mlx_lm.models.base import quantized_scaled_dot_product_attention

from common import fill, make_cache, table, timeit, write_json
from mlx_patternkv.attention import compressed_attention

HQ, H, D = 32, 8, 128


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="4096,16384,32768")
    p.add_argument("--bits", default="2,4")
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    gpu = mx.default_device() == mx.gpu
    dense_dtype = mx.float16 if gpu else mx.float32
    scale = D**-0.5
    rows = []
    for t in [int(x) for x in args.contexts.split(",")]:
        q = mx.random.normal((1, HQ, 1, D)).astype(dense_dtype)
        kn, vn = (mx.random.normal((1, H, 1, D)).astype(dense_dtype) for _ in range(2))
        dense = fill(make_cache("fp16"), 1, H, t - 1, D, dense_dtype)  # + the decode token = t
        k, v = dense.update_and_fetch(kn.astype(mx.float16), vn.astype(mx.float16))
        k, v = k.astype(dense_dtype), v.astype(dense_dtype)
        mx.eval(k, v)
        row = {"tokens": t, "dense_ms": timeit(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale), iters=args.iters)}
        del dense, k, v
        for bits in [int(b) for b in args.bits.split(",")]:
            mq = fill(make_cache("mlx-q", bits), 1, H, t - 1, D, dense_dtype)
            qk, qv = mq.update_and_fetch(kn, vn)
            mx.eval(qk, qv)
            try:
                row[f"mlxq{bits}_ms"] = timeit(
                    lambda: quantized_scaled_dot_product_attention(q * 1, qk, qv, scale=scale, mask=None, group_size=64, bits=bits),
                    iters=args.iters,
                )
            except RuntimeError as e:  # MLX's CUDA quantized_matmul rejects some shapes
                row[f"mlxq{bits}_ms"] = None
                row[f"mlxq{bits}_error"] = str(e)[:120]
            del mq, qk, qv
            pk = fill(make_cache("patternkv", bits), 1, H, t - 1, D, dense_dtype)
            pk.update_and_fetch(kn, vn)  # the pending decode token
            row[f"pkv{bits}_ms"] = timeit(lambda: compressed_attention(q, pk, scale), iters=args.iters)
            row[f"pkv{bits}/dense"] = row[f"pkv{bits}_ms"] / row["dense_ms"]
            if row[f"mlxq{bits}_ms"]:
                row[f"pkv{bits}/mlxq{bits}"] = row[f"pkv{bits}_ms"] / row[f"mlxq{bits}_ms"]
            del pk
        rows.append(row)
        print(row, flush=True)
    cols = ["tokens", "dense_ms"] + [c for b in args.bits.split(",") for c in (f"mlxq{b}_ms", f"pkv{b}_ms", f"pkv{b}/mlxq{b}", f"pkv{b}/dense")]
    table(rows, cols)
    write_json("decode_attention", rows, {"dense_dtype": str(dense_dtype), "heads": [HQ, H], "head_dim": D})


if __name__ == "__main__":
    main()
