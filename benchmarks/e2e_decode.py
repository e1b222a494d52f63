# Copyright © 2026 mlx-patternkv authors.
"""End-to-end decode on a real model (default SmolLM2-135M-Instruct), fused kernels vs portable path.

1. Greedy generation with PatternKV, once with the fused kernels (decode attention and flush) and once
   with MLX_PATTERNKV_PORTABLE=1, from the same WikiText-2 prompt: are the tokens equal? Where they
   first differ, the portable run's top-2 logit gap there says whether it was a near-tie.
2. Decode speed at a long context: prefill C tokens of WikiText-2, then time N greedy steps
   (tokens/s, the model's own forward included) with the FP16 cache, PatternKV 2-bit and 4-bit
   (fused kernels), and PatternKV on the portable path.
Prints a table and writes JSON ($OUT/e2e_decode.json, OUT defaults to results). On the CPU the fused
kernels do not exist: only the portable rows run.

    python benchmarks/e2e_decode.py [--context 8192] [--steps 128] [--greedy-prompt 1000 --greedy-tokens 200]
"""

import argparse
import json
import os
import sys
import time

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache as mlx_make_prompt_cache

from mlx_patternkv import PatternKVConfig, evaluate, kernels, load, make_prompt_cache
from mlx_patternkv.evaluate import machine, wikitext_windows

OUT = os.environ.get("OUT", "results")


def portable(flag: bool):
    if flag:
        os.environ["MLX_PATTERNKV_PORTABLE"] = "1"
    else:
        os.environ.pop("MLX_PATTERNKV_PORTABLE", None)


def prefill(model, cache, tokens):
    """All but the last token through chunked prefill (evaluate.prefill); returns the last one [1]."""
    evaluate.prefill(model, cache, tokens[:-1])
    return mx.array(tokens[-1:])


def greedy_steps(model, cache, y, n):
    """n greedy steps from token y [1]; returns (tokens, logits of each step as a list of [V] arrays)."""
    toks, logits = [], []
    for _ in range(n):
        out = model(y[None], cache=cache)[0, -1].astype(mx.float32)
        y = mx.argmax(out, keepdims=True)
        mx.eval(y, out)
        toks.append(int(y.item()))
        logits.append(out)
    return toks, logits


def greedy_check(model, tokens, n, bits):
    cfg = PatternKVConfig(k_bits=bits, v_bits=bits)
    runs = {}
    for name, flag in (("kernel", False), ("portable", True)):
        portable(flag)
        cache = make_prompt_cache(model, cfg)
        y = prefill(model, cache, tokens)
        runs[name] = greedy_steps(model, cache, y, n)
    portable(False)
    a, b = runs["kernel"][0], runs["portable"][0]
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    rec = dict(bits=bits, prompt=len(tokens), tokens=n, equal=sum(x == y for x, y in zip(a, b)), first_difference=first)
    if first is not None:
        top = mx.sort(runs["portable"][1][first])[-2:].tolist()
        rec["portable_top2_gap_at_first_difference"] = top[1] - top[0]
    return rec


def speed(model, tokens, steps, make_cache, label):
    cache = make_cache()
    t0 = time.perf_counter()
    y = prefill(model, cache, tokens)
    t_prefill = time.perf_counter() - t0
    greedy_steps(model, cache, y, 4)  # warm-up (kernel builds)
    t0 = time.perf_counter()
    greedy_steps(model, cache, y, steps)
    dt = time.perf_counter() - t0
    nbytes = sum(c.nbytes for c in cache)
    return dict(method=label, context=len(tokens), steps=steps, tokens_per_s=steps / dt, ms_per_token=1e3 * dt / steps,
                prefill_s=t_prefill, kv_mb=nbytes / 1e6)  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--greedy-prompt", type=int, default=1000)
    p.add_argument("--greedy-tokens", type=int, default=200)
    p.add_argument("--skip-greedy", action="store_true", help="only the speed part")
    p.add_argument("--skip-speed", action="store_true", help="only the greedy comparison")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="model weights (default: float16 on a GPU, float32 on the CPU)")
    a = p.parse_args()
    model, tokenizer = load(a.model)
    dtype = a.dtype or ("float16" if mx.default_device().type == mx.DeviceType.gpu else "float32")
    model.set_dtype(getattr(mx, dtype))
    has_kernels = kernels.backend() is not None
    res = dict(machine=machine(), command=" ".join(["python", *sys.argv]), kernels=kernels.backend(), dtype=dtype,
               greedy=[], speed=[])
    os.makedirs(OUT, exist_ok=True)

    def save():
        with open(os.path.join(OUT, "e2e_decode.json"), "w") as fh:
            json.dump(res, fh, indent=1)

    tokens = wikitext_windows(tokenizer, max(a.context, a.greedy_prompt) + 1, 1)[0]
    if has_kernels and not a.skip_greedy:
        for bits in (2, 4):
            res["greedy"].append(greedy_check(model, tokens[: a.greedy_prompt], a.greedy_tokens, bits))
            print(json.dumps(res["greedy"][-1]), flush=True)
            save()
    ctx = tokens[: a.context]
    runs = [("fp16", lambda: mlx_make_prompt_cache(model), False)]
    for bits in (2, 4):
        cfg = PatternKVConfig(k_bits=bits, v_bits=bits)
        if has_kernels:
            runs.append((f"pkv{bits} kernel", lambda cfg=cfg: make_prompt_cache(model, cfg), False))
        runs.append((f"pkv{bits} portable", lambda cfg=cfg: make_prompt_cache(model, cfg), True))
    for label, make, flag in [] if a.skip_speed else runs:
        portable(flag)
        try:
            res["speed"].append(speed(model, ctx, a.steps, make, label))
        except Exception as e:  # one method failing must not lose the others
            res["speed"].append(dict(method=label, error=str(e)[:300]))
        portable(False)
        print(json.dumps(res["speed"][-1]), flush=True)
        save()
    print(f"\n=== end-to-end decode, {machine()['device']}, context {a.context}, {a.steps} steps")
    for g in res["greedy"]:
        print(f"greedy {g['bits']}-bit kernel vs portable: {g['equal']}/{g['tokens']} tokens equal, first difference "
              f"{g['first_difference']}" + (f" (portable top-2 gap there {g['portable_top2_gap_at_first_difference']:.3f})"
                                            if g["first_difference"] is not None else ""))  # fmt: skip
    print(f"{'method':<16} {'tok/s':>8} {'ms/tok':>8} {'KV MB':>8}")
    for r in res["speed"]:
        if "error" in r:
            print(f"{r['method']:<16} error: {r['error'][:100]}")
        else:
            print(f"{r['method']:<16} {r['tokens_per_s']:8.1f} {r['ms_per_token']:8.2f} {r['kv_mb']:8.1f}")


if __name__ == "__main__":
    main()
