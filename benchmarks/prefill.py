"""Prefill cost of pattern mining: chunked prefill (2048-token chunks, as mlx-lm) of WikiText-2 text
with the FP16 cache, our cache without patterns (KIVI), and PatternKV; the time inside k-means is
measured separately.

  python benchmarks/prefill.py                       # SmolLM2-135M (default model), 2K and 8K tokens
  python benchmarks/prefill.py --contexts 2048 --model PATH
"""

import argparse
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from common import CHUNK, table, write_json
import mlx_patternkv.patterns as patterns
from mlx_patternkv import PatternKVConfig, load, make_prompt_cache

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2-test.txt"

kmeans_seconds = 0.0
_kmeans = patterns.kmeans


def timed_kmeans(*args, **kwargs):
    global kmeans_seconds
    mx.eval(args[0])  # the model's forward pass up to this layer is not mining time
    t0 = time.perf_counter()
    out = _kmeans(*args, **kwargs)
    mx.eval(out)
    kmeans_seconds += time.perf_counter() - t0
    return out


patterns.kmeans = timed_kmeans


def prefill(model, cache, tokens):
    t0 = time.perf_counter()
    for i in range(0, len(tokens), CHUNK):
        model(tokens[None, i : i + CHUNK], cache=cache)
        mx.eval([c.state for c in cache])
    return time.perf_counter() - t0


def main():
    global kmeans_seconds
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--contexts", default="2048,8192")
    p.add_argument("--bits", type=int, default=2)
    args = p.parse_args()
    model, tok = load(args.model)
    text = DATA.read_text()[:400_000]
    ids = mx.array(tok.encode(text))
    rows = []
    for t in [int(x) for x in args.contexts.split(",")]:
        tokens = ids[:t]
        row = {"tokens": t}
        for name, cfg in (
            ("fp16", None),
            ("kivi", PatternKVConfig(k_bits=args.bits, v_bits=args.bits, k_patterns=0, v_patterns=0)),
            ("patternkv", PatternKVConfig(k_bits=args.bits, v_bits=args.bits)),
        ):
            cache = make_prompt_cache(model, cfg) if cfg else [KVCache() for _ in model.layers]
            prefill(model, cache, tokens[:CHUNK])  # warm-up (compiles, allocates)
            cache = make_prompt_cache(model, cfg) if cfg else [KVCache() for _ in model.layers]
            kmeans_seconds = 0.0
            row[f"{name}_s"] = prefill(model, cache, tokens)
            if name == "patternkv":
                row["kmeans_s"] = kmeans_seconds
        row["mining_share"] = row["kmeans_s"] / row["patternkv_s"]
        row["patterns_vs_kivi"] = row["patternkv_s"] / row["kivi_s"] - 1
        row["patternkv_vs_fp16"] = row["patternkv_s"] / row["fp16_s"] - 1
        rows.append(row)
        print(row, flush=True)
    table(rows, ["tokens", "fp16_s", "kivi_s", "patternkv_s", "kmeans_s", "mining_share", "patterns_vs_kivi", "patternkv_vs_fp16"])
    write_json("prefill", rows, {"model": args.model or "SmolLM2-135M-Instruct (default)", "bits": args.bits})


if __name__ == "__main__":
    main()
