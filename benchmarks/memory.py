"""KV bytes and peak memory: PatternKV vs the FP16 cache vs mlx-lm's QuantizedKVCache.

Part 1 (bytes): `nbytes` of one layer (8 KV heads, head_dim 128) after a chunked prefill of T tokens,
over the FP16 KVCache's `nbytes`, every overhead counted (banks, indices, scales/mins, FP16 window,
spare capacity).
Part 2 (peak): `mx.get_peak_memory()` of a chunked prefill of T tokens plus 64 decode steps through
attention (32 query / 8 KV heads, head_dim 128) over `--layers` layers of caches.

  python benchmarks/memory.py                        # both parts
  python benchmarks/memory.py --part bytes
  python benchmarks/memory.py --part peak --contexts 4096,8192 --dtype float32
"""

import argparse

import mlx.core as mx
from mlx_lm.models.base import scaled_dot_product_attention as mlx_sdpa

from common import CHUNK, fill, kv_stream, make_cache, table, write_json
from mlx_patternkv.attention import compressed_attention
from mlx_patternkv.cache import PatternKVCache


def bytes_part(contexts, heads=8, head_dim=128):
    rows = []
    for t in contexts:
        fp16 = fill(make_cache("fp16"), 1, heads, t, head_dim, mx.float16).nbytes
        for bits in (2, 3, 4, 8):
            row = {"tokens": t, "bits": bits, "fp16_MiB": fp16 / 2**20}
            for method in ("patternkv", "kivi", "mlx-q"):
                c = fill(make_cache(method, bits), 1, heads, t, head_dim, mx.float16)
                row[method] = c.nbytes / fp16
                if method == "patternkv":
                    row["patterns"] = c.n_kpat
                    row["window_share"] = (c.k_win.nbytes + c.v_win.nbytes) / fp16
                    row["bank_share"] = (c.k_bank.nbytes + c.v_bank.nbytes) / fp16
            rows.append(row)
    return rows


def attend(cache, q, k, v, mask):
    keys, values = cache.update_and_fetch(k, v)
    scale = q.shape[-1] ** -0.5
    if isinstance(cache, PatternKVCache):
        return compressed_attention(q, cache, scale, mask)
    return mlx_sdpa(q, keys, values, cache, scale=scale, mask=mask)


def peak_part(contexts, methods, layers, dtype, hq=32, h=8, d=128, decode=64):
    rows = []
    for t in contexts:
        for method in methods:
            name, _, bits = method.partition(":")
            mx.clear_cache()
            mx.reset_peak_memory()
            base = mx.get_active_memory()
            caches = [make_cache(name, int(bits) if bits else None) for _ in range(layers)]
            try:
                run_context(caches, t, decode, hq, h, d, dtype)
            except RuntimeError as e:  # MLX's CUDA quantized_matmul rejects some shapes
                rows.append({"tokens": t, "method": method, "error": str(e)[:120]})
                print(rows[-1], flush=True)
                continue
            peak = (mx.get_peak_memory() - base) / 2**20
            kv = sum(c.nbytes for c in caches) / 2**20
            rows.append({"tokens": t, "method": method, "peak_MiB": peak, "kv_MiB": kv})
            print(rows[-1], flush=True)
            del caches
    return rows


def run_context(caches, t, decode, hq, h, d, dtype):
    """Prefill t tokens in chunks, then `decode` single-token steps, attention in every layer."""
    pos = 0
    for k, v in kv_stream(1, h, t + decode, d, dtype):
        # prefill in chunks, then one token at a time once the prompt is in
        steps = [(k, v)] if pos + k.shape[2] <= t else [(k[:, :, i : i + 1], v[:, :, i : i + 1]) for i in range(k.shape[2])]
        for kk, vv in steps:
            n = kk.shape[2]
            q = mx.random.normal((1, hq, n, d)).astype(dtype)
            for c in caches:  # layers run one after the other, as in a model
                q = attend(c, q, kk, vv, "causal" if n > 1 else None)
            mx.eval(q, [c.state for c in caches])
            pos += n


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["bytes", "peak", "all"], default="all")
    p.add_argument("--contexts", default="4096,32768")
    p.add_argument("--peak-contexts", default="4096,16384,32768")
    p.add_argument("--methods", default="fp16,mlx-q:4,mlx-q:2,patternkv:4,patternkv:2")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dtype", default="float16")
    args = p.parse_args()
    if args.part in ("bytes", "all"):
        rows = bytes_part([int(x) for x in args.contexts.split(",")])
        table(rows, ["tokens", "bits", "fp16_MiB", "patternkv", "kivi", "mlx-q", "patterns", "window_share", "bank_share"])
        write_json("memory_bytes", rows)
    if args.part in ("peak", "all"):
        rows = peak_part([int(x) for x in args.peak_contexts.split(",")], args.methods.split(","), args.layers, getattr(mx, args.dtype))
        table(rows, ["tokens", "method", "peak_MiB", "kv_MiB"])
        write_json("memory_peak", rows, {"layers": args.layers, "dtype": args.dtype})


if __name__ == "__main__":
    main()
