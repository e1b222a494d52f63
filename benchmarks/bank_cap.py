"""What the bank cap costs: relative reconstruction error of the dequantized cache (vs the exact K/V)
for different `max_patterns`, over all tokens and over the last quarter (flushed when a small cap is
long reached). One layer, 8 KV heads, head_dim 128, structured synthetic K/V (benchmarks/common.py).

  python benchmarks/bank_cap.py --tokens 32768 --caps 64,128,255 --bits 2
"""

import argparse

import mlx.core as mx

from common import kv_stream, table, write_json
from mlx_patternkv import PatternKVCache, PatternKVConfig

H, D = 8, 128


def rel_err(a, b):
    return float(((a - b) ** 2).sum() / (b**2).sum())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--caps", default="64,128,255")
    p.add_argument("--bits", type=int, default=2)
    args = p.parse_args()
    t = args.tokens
    chunks = list(kv_stream(1, H, t, D, mx.float16))
    k = mx.concatenate([c[0] for c in chunks], axis=2).astype(mx.float32)
    v = mx.concatenate([c[1] for c in chunks], axis=2).astype(mx.float32)
    rows = []
    for cap in [int(c) for c in args.caps.split(",")]:
        cfg = PatternKVConfig(k_bits=args.bits, v_bits=args.bits, max_patterns=cap)
        cache = PatternKVCache(cfg)
        for ck, cv in chunks:
            cache.update_and_fetch(ck, cv)
            mx.eval(cache.state)
        kh, vh = cache.keys_and_values()
        tail = slice(3 * t // 4, t)
        rows.append({
            "max_patterns": cap, "patterns": cache.n_kpat,
            "k_err": rel_err(kh, k), "v_err": rel_err(vh, v),
            "k_err_last_quarter": rel_err(kh[:, :, tail], k[:, :, tail]),
            "v_err_last_quarter": rel_err(vh[:, :, tail], v[:, :, tail]),
            "bytes_vs_fp16": cache.nbytes / (2 * t * H * D * 2),
        })  # fmt: skip
        print(rows[-1], flush=True)
    table(rows, list(rows[0]))
    write_json("bank_cap", rows, {"tokens": t, "bits": args.bits})


if __name__ == "__main__":
    main()
