# Copyright © 2026 mlx-patternkv authors.
"""Which layers, K or V: compress one layer at a time and measure the damage.

For each layer i of the model (default SmolLM2-135M-Instruct), every layer keeps the FP16 cache except
layer i, which gets `--method` (PatternKV 2-bit by default), or K-only / V-only 2-bit (the other side
at 8 bits) with --split-kv. The harness's perplexity pass (evaluate.ppl_pass: chunked prefill, then
scored tokens one step at a time and in chunks) gives the KL from FP16 and the perplexity change.
Prints a table sorted by layer and writes JSON ($OUT/layer_sensitivity.json, OUT defaults to results).

    python benchmarks/layer_sensitivity.py [--context 2048] [--scored 128] [--split-kv]
"""

import argparse
import json
import math
import os
import sys

import mlx.core as mx

from mlx_patternkv import PatternKVCache, PatternKVConfig, load
from mlx_patternkv.evaluate import _model_caches, machine, ppl_pass, wikitext_windows
from mlx_patternkv.integrate import patch_attention

OUT = os.environ.get("OUT", "results")


def one_layer(layer: int, config: PatternKVConfig):
    """make_cache for ppl_pass: the model's own caches, layer `layer` replaced by PatternKV."""

    def make(model):
        caches = _model_caches(model)
        caches[layer] = PatternKVCache(config)
        return caches

    return make


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--scored", type=int, default=128)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--split-kv", action="store_true", help="also K-only and V-only low bits (the other side 8-bit)")
    a = p.parse_args()
    model, tokenizer = load(a.model)
    patch_attention()
    tokens = wikitext_windows(tokenizer, a.context + 1, 1)[0]
    args = dict(contexts=[a.context], scored=a.scored, decode=a.decode, chunk=16)
    ref = ppl_pass(model, _model_caches, tokens, **args)[a.context]
    refs = {a.context: ref["logprobs"]}
    ref_ppl = math.exp(sum(ref["nll"]) / len(ref["nll"]))
    variants = {"kv": PatternKVConfig(k_bits=a.bits, v_bits=a.bits)}
    if a.split_kv:
        variants["k"] = PatternKVConfig(k_bits=a.bits, v_bits=8)
        variants["v"] = PatternKVConfig(k_bits=8, v_bits=a.bits)
    n_layers = len(_model_caches(model))
    res = dict(machine=machine(), command=" ".join(["python", *sys.argv]), context=a.context, scored=a.scored,
               fp16_ppl=ref_ppl, rows=[])  # fmt: skip
    os.makedirs(OUT, exist_ok=True)
    for layer in range(n_layers):
        row = dict(layer=layer)
        for name, cfg in variants.items():
            r = ppl_pass(model, one_layer(layer, cfg), tokens, refs=refs, **args)[a.context]
            row[f"{name}_kl"] = sum(r["kl"]) / len(r["kl"])
            row[f"{name}_d_ppl_pct"] = 100 * (math.exp(sum(r["nll"]) / len(r["nll"])) / ref_ppl - 1)
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        with open(os.path.join(OUT, "layer_sensitivity.json"), "w") as fh:
            json.dump(res, fh, indent=1)
    cols = [c for c in res["rows"][0] if c != "layer"]
    print(f"\n=== one layer at {a.bits} bits, the rest FP16: {a.context} tokens, {a.scored} scored, FP16 ppl {ref_ppl:.2f}")
    print("layer " + " ".join(f"{c:>12}" for c in cols))
    for row in res["rows"]:
        print(f"{row['layer']:5d} " + " ".join(f"{row[c]:12.4f}" for c in cols))
    mx.clear_cache()


if __name__ == "__main__":
    main()
