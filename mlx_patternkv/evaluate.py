# Copyright © 2026 mlx-patternkv authors.
"""Quality of KV caches against the FP16 cache, on tokens whose history is compressed.

Methods (`METHODS`, name -> function returning a fresh cache list for a model):
    fp16              the model's own caches (mlx-lm `KVCache`, in the model's dtype)
    mlx-q8/q4/q2      mlx-lm `QuantizedKVCache(group_size=64, bits=b)`, quantized from the first token
    kivi2/4           our cache with patterns off: per-channel K / per-token V, FP16 window (KIVI)
    pkv2/3/4          PatternKV (defaults of `PatternKVConfig`: 32 mined patterns, group and window 128)

Parts (each measured for every method, FP16 first):
    ppl     perplexity, mean KL(FP16 || method) of the next-token distribution, top-1 agreement with
            FP16, at contexts C of 2K/4K/8K tokens: the first C - N tokens of a WikiText-2 window go
            through chunked prefill (2048-token chunks, as `generate`), then the next N tokens are
            scored: the first `decode` one step at a time, the rest in chunks of `chunk` tokens (so
            both decode and prefill-over-compressed-history are measured). One pass per method feeds
            the longest context; the shorter ones are scored on copies of the cache taken on the way.
            Bytes at C tokens (`nbytes`, and the used part: PatternKV's `state` arrays, the other
            caches' `keys_and_values()`), peak memory (`mx.get_peak_memory`) of the pass.
    needle  a 7-digit pass key at depth 0-100% of Paul Graham essays of 1K-8K tokens, greedy answer,
            found = the exact key in the output (`needle.py`).
    gsm8k   the first n GSM8K test problems, chat template, greedy, exact numeric match of the
            number after the last "answer is" (else the last number); also whether the output is
            token-identical to FP16's.

    run_eval(model=None, methods=None, preset="quick", out_dir="results") -> results dict
    main(argv)        # command line: `pkv-mlx eval`, `python -m mlx_patternkv.evaluate`, benchmarks/quality.py

Writes `quality.json` (every raw figure, rewritten after each step, so an interrupted run leaves
its results), `quality.md` and PNG plots into out_dir. Text comes from `data_dir()`.
"""

import argparse
import copy
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from datetime import datetime
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from .cache import PatternKVCache
from .config import PatternKVConfig
from .integrate import _model_caches, make_prompt_cache, patch_attention

CHUNK = 2048  # mlx-lm's prefill step


# ----------------------------------------------------------------------------- methods


def mlx_quantized(model, bits: int) -> list:
    """mlx-lm's own quantized cache (what --kv-bits gives, here from the first token on)."""
    return [QuantizedKVCache(group_size=64, bits=bits) if type(c) is KVCache else c for c in _model_caches(model)]


def patternkv(model, config: PatternKVConfig) -> list:
    patch_attention()  # attention on the compressed form (make_prompt_cache alone does not patch)
    return make_prompt_cache(model, config)


METHODS = {
    "fp16": _model_caches,
    "mlx-q8": lambda model: mlx_quantized(model, 8),
    "mlx-q4": lambda model: mlx_quantized(model, 4),
    "mlx-q2": lambda model: mlx_quantized(model, 2),
    "kivi4": lambda model: patternkv(model, PatternKVConfig(k_bits=4, v_bits=4, k_patterns=0, v_patterns=0)),
    "kivi2": lambda model: patternkv(model, PatternKVConfig(k_bits=2, v_bits=2, k_patterns=0, v_patterns=0)),
    "pkv4": lambda model: patternkv(model, PatternKVConfig(k_bits=4, v_bits=4)),
    "pkv3": lambda model: patternkv(model, PatternKVConfig(k_bits=3, v_bits=3)),
    "pkv2": lambda model: patternkv(model, PatternKVConfig(k_bits=2, v_bits=2)),
    # diagnostics (not in the presets): patterns on one side only
    "pkv2-k": lambda model: patternkv(model, PatternKVConfig(k_bits=2, v_bits=2, v_patterns=0)),
    "pkv2-v": lambda model: patternkv(model, PatternKVConfig(k_bits=2, v_bits=2, k_patterns=0)),
}

PRESETS = {
    # about 6-10 minutes on 2 CPU cores with SmolLM2-135M
    "quick": dict(
        methods=["fp16", "kivi2", "pkv2", "pkv4"], contexts=[2048], scored=128, decode=16, chunk=16,
        segments=1, needle_contexts=[1024], needle_depths=[25, 75], needle_max_tokens=12,
        gsm8k=1, gsm8k_max_tokens=64,
    ),  # fmt: skip
    "full": dict(
        methods=["fp16", "mlx-q8", "mlx-q4", "mlx-q2", "kivi4", "kivi2", "pkv4", "pkv3", "pkv2"],
        contexts=[2048, 4096, 8192], scored=256, decode=64, chunk=16, segments=2,
        needle_contexts=[1024, 2048, 4096, 8192], needle_depths=[0, 25, 50, 75, 100], needle_max_tokens=12,
        gsm8k=20, gsm8k_max_tokens=256,
    ),  # fmt: skip
}


# ----------------------------------------------------------------------------- data


def data_dir() -> Path:
    """`$MLX_PATTERNKV_DATA`, else `../shared/data` beside this checkout (wikitext2-test.txt, gsm8k-test.jsonl)."""
    env = os.environ.get("MLX_PATTERNKV_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def _data_file(name) -> Path:
    path = data_dir() / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: set MLX_PATTERNKV_DATA to a folder holding wikitext2-test.txt (WikiText-2 raw "
            f"test split, rows joined with blank lines) and gsm8k-test.jsonl (GSM8K test split)"
        )
    return path


def wikitext_windows(tokenizer, n_tokens: int, segments: int) -> list:
    """`segments` token windows of n_tokens each, starting at article boundaries spread over WikiText-2."""
    text = _data_file("wikitext2-test.txt").read_text(encoding="utf-8")
    out = []
    for s in range(segments):
        start = s * len(text) // segments
        if s:
            m = re.compile(r"\n \= [^=\n]+ \= \n").search(text, start)  # next article title
            start = m.start() + 1 if m else start
        chars = 6 * n_tokens
        while True:
            ids = tokenizer.encode(text[start : start + chars], add_special_tokens=False)
            if len(ids) > n_tokens or start + chars >= len(text):
                break
            chars *= 2
        if len(ids) < n_tokens:
            raise ValueError(f"WikiText-2 from character {start} has {len(ids)} tokens, {n_tokens} needed")
        out.append(ids[:n_tokens])
    return out


def gsm8k_problems(n: int) -> list:
    """The first n test problems: dicts with question and gold (a number as a string)."""
    rows = []
    with open(_data_file("gsm8k-test.jsonl"), encoding="utf-8") as f:
        for line in f:
            if len(rows) == n:
                break
            r = json.loads(line)
            rows.append({"question": r["question"], "gold": r["answer"].split("####")[-1].strip().replace(",", "")})
    return rows


# ----------------------------------------------------------------------------- measuring


def prefill(model, cache, tokens):
    """Feed tokens (list or [T] array) in CHUNK-token steps without computing logits, as generate does."""
    tokens = mx.array(tokens)
    for i in range(0, tokens.size, CHUNK):
        model(tokens[None, i : i + CHUNK], cache=cache)  # logits are never evaluated
        mx.eval([c.state for c in cache])
        mx.clear_cache()


def score(model, cache, inputs, decode: int, chunk: int) -> mx.array:
    """Log-probabilities of the next token after each of inputs [N]: the first `decode` inputs one step
    at a time, the rest `chunk` at a time. Returns [N, vocab] float32."""
    inputs = mx.array(inputs)
    n, out, i = inputs.size, [], 0
    while i < n:
        step = 1 if i < decode else min(chunk, n - i)
        logits = model(inputs[None, i : i + step], cache=cache)[0].astype(mx.float32)  # [step, V]
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        mx.eval(lp)
        out.append(lp)
        i += step
    return mx.concatenate(out)


def token_metrics(logprobs, targets, ref_logprobs):
    """Per token: NLL of the target, KL(ref || logprobs), top-1 agreement with ref. Inputs [N, V], [N]."""
    targets = mx.array(targets)
    nll = -mx.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0]
    kl = mx.sum(mx.exp(ref_logprobs) * (ref_logprobs - logprobs), axis=-1)
    agree = mx.argmax(logprobs, axis=-1) == mx.argmax(ref_logprobs, axis=-1)
    return nll.tolist(), kl.tolist(), agree.tolist()


def cache_bytes(cache) -> dict:
    """nbytes (everything held, spare capacity included) and used bytes (the part holding the tokens:
    PatternKV's `state` arrays, the other caches' `keys_and_values()`)."""
    used = 0
    for c in cache:
        arrays = c.state if isinstance(c, PatternKVCache) else c.keys_and_values()
        used += sum(a.nbytes for _, a in tree_flatten(arrays) if isinstance(a, mx.array))
    return {"nbytes": sum(c.nbytes for c in cache), "used_bytes": used}


def kv_elements_per_token(cache) -> int:
    """Key + value elements one token adds over all layers, from a filled plain KVCache list."""
    return sum(c.keys.shape[1] * c.keys.shape[3] + c.values.shape[1] * c.values.shape[3] for c in cache)


def ppl_pass(model, make_cache, tokens, contexts, scored, decode, chunk, refs=None):
    """One method on one token window (len >= max(contexts) + 1). For each context C (ascending):
    prefill up to C - scored tokens, score tokens C - scored .. C - 1 on a copy of the cache (the last
    context on the cache itself). refs: {C: FP16 logprobs} or None (this is the FP16 pass: its own
    logprobs are the reference and are returned in the rows under "logprobs")."""
    cache = make_cache(model)
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    rows, pos = {}, 0
    contexts = sorted(contexts)
    for c in contexts:
        t0 = time.perf_counter()
        h = c - scored
        prefill(model, cache, tokens[pos:h])
        pos = h
        scratch = cache if c == contexts[-1] else copy.deepcopy(cache)
        lp = score(model, scratch, tokens[h:c], decode, chunk)
        ref = lp if refs is None else refs[c]
        nll, kl, agree = token_metrics(lp, tokens[h + 1 : c + 1], ref)
        rows[c] = dict(
            history=h, scored=scored, decode=min(decode, scored), chunk=chunk, nll=nll, kl=kl, agree=agree,
            **cache_bytes(scratch), peak_bytes=mx.get_peak_memory(), base_bytes=base,
            seconds=time.perf_counter() - t0,
        )  # fmt: skip
        if refs is None:
            rows[c]["logprobs"] = lp
            rows[c]["kv_elements_per_token"] = kv_elements_per_token(scratch)
        del scratch, lp
    return rows


def greedy(model, cache, prompt, max_tokens, eos, stop=None, tokenizer=None):
    """Greedy tokens after prompt (generate_step: chunked prefill, then decode), until eos or stop(text)."""
    from mlx_lm.generate import generate_step

    out = []
    for tok, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens, prompt_cache=cache):
        tok = int(tok)
        if tok in eos:
            break
        out.append(tok)
        if stop and stop(tokenizer.decode(out)):
            break
    return out


def needle_cell(model, tokenizer, make_cache, haystack, context, depth, max_tokens):
    from .needle import found, needle_prompt, pass_key

    key = pass_key(context, depth)
    prompt = needle_prompt(tokenizer, haystack, context, depth, key)
    t0 = time.perf_counter()
    out = greedy(model, make_cache(model), prompt, max_tokens, set(tokenizer.eos_token_ids))
    text = tokenizer.decode(out)
    return dict(context=context, depth=depth, key=key, prompt_tokens=len(prompt), output=text,
                found=found(text, key), seconds=time.perf_counter() - t0)  # fmt: skip


GSM8K_INSTRUCTION = "\nSolve it step by step, then give the final answer as a number after 'The answer is'."
_ANSWER = re.compile(r"answer is[^\n]*?(-?\$?\s*[\d,]*\.?\d+)", re.IGNORECASE)


def gsm8k_answer(text: str):
    """The number after the last 'answer is', else the last number in text; None if there is none."""
    m = _ANSWER.findall(text)
    nums = m or re.findall(r"-?[\d,]*\.?\d+", text)
    if not nums:
        return None
    s = nums[-1].replace(",", "").replace("$", "").replace(" ", "")
    try:
        x = float(s)
    except ValueError:
        return None
    return str(int(x)) if x == int(x) else str(x)


def _answered(text: str) -> bool:
    """Stop once a line stating the answer is complete."""
    i = text.lower().rfind("answer is")
    return i >= 0 and "\n" in text[i:]


def gsm8k_problem(model, tokenizer, make_cache, problem, max_tokens):
    messages = [{"role": "user", "content": problem["question"] + GSM8K_INSTRUCTION}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    t0 = time.perf_counter()
    out = greedy(model, make_cache(model), prompt, max_tokens, set(tokenizer.eos_token_ids), _answered, tokenizer)
    text = tokenizer.decode(out)
    pred = gsm8k_answer(text)
    gold = gsm8k_answer(problem["gold"])
    return dict(gold=gold, pred=pred, correct=pred is not None and pred == gold, output=text, tokens=out,
                prompt_tokens=len(prompt), seconds=time.perf_counter() - t0)  # fmt: skip


# ----------------------------------------------------------------------------- the run


def run_eval(model=None, methods=None, preset="quick", out_dir="results", progress=True, command=None,
             **overrides) -> dict:
    """Measure `methods` (names in METHODS; default: the preset's) with `preset` ("quick" or "full";
    overrides: any preset key, e.g. contexts=[1024], gsm8k=0, needle_contexts=[]) on `model` (None:
    SmolLM2-135M-Instruct; a path, .gguf file or Hugging Face repo id). Writes quality.json /
    quality.md / *.png into out_dir; returns the results dict. command: recorded in the report."""
    from .integrate import load

    settings = dict(PRESETS[preset])
    unknown = set(overrides) - set(settings)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}; known: {sorted(settings)}")
    settings.update(overrides)
    methods = list(methods or settings["methods"])
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown methods {bad}; known: {', '.join(METHODS)}")
    methods = ["fp16"] + [m for m in methods if m != "fp16"]  # FP16 is the reference, measured first
    settings["methods"] = methods
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    m, tokenizer = load(model)
    s = settings
    contexts = sorted(s["contexts"])
    windows = wikitext_windows(tokenizer, contexts[-1] + 1, s["segments"]) if contexts else []
    cells = [(c, d) for c in sorted(s["needle_contexts"]) for d in s["needle_depths"]]
    problems = gsm8k_problems(s["gsm8k"]) if s["gsm8k"] else []
    haystack = None
    if cells:
        from .needle import essays

        haystack = tokenizer.encode(essays()[: 8 * max(c for c, _ in cells)], add_special_tokens=False)

    results = dict(
        model=model or "SmolLM2-135M-Instruct (default)", preset=preset, settings=settings,
        machine=machine(), started=datetime.now().isoformat(timespec="seconds"),
        command=command or f"run_eval({model!r}, {methods!r}, {preset!r}, {str(out_dir)!r}, **{overrides!r})", ppl={}, needle={}, gsm8k={}, elapsed_s=0.0,
    )  # fmt: skip
    path = out_dir / "quality.json"

    def save():
        results["elapsed_s"] = time.perf_counter() - t_start
        path.write_text(json.dumps(results, indent=1))

    total = len(methods) * (len(windows) + len(cells) + len(problems))
    bar = _progress(total, progress)

    # perplexity / KL / agreement: one pass per (method, window)
    refs = [None] * len(windows)
    for name in methods:
        results["ppl"][name] = {}
        for w, tokens in enumerate(windows):
            bar.set_description(f"ppl {name} window {w + 1}/{len(windows)}")
            rows = ppl_pass(m, METHODS[name], tokens, contexts, s["scored"], s["decode"], s["chunk"], refs[w])
            if name == "fp16":
                refs[w] = {c: r.pop("logprobs") for c, r in rows.items()}
            for c, r in rows.items():
                results["ppl"][name].setdefault(str(c), []).append(r)
            save()
            bar.update(1)
    del refs

    # needle grid: cell by cell, every method on each cell (a partial run covers all methods)
    for c, d in cells:
        for name in methods:
            bar.set_description(f"needle {name} {c} tokens depth {d}%")
            r = needle_cell(m, tokenizer, METHODS[name], haystack, c, d, s["needle_max_tokens"])
            results["needle"].setdefault(name, []).append(r)
            save()
            bar.update(1)

    # GSM8K: problem by problem, every method on each problem
    for i, p in enumerate(problems):
        for name in methods:
            bar.set_description(f"gsm8k {name} problem {i + 1}/{len(problems)}")
            r = gsm8k_problem(m, tokenizer, METHODS[name], p, s["gsm8k_max_tokens"])
            r["index"] = i
            r["same_as_fp16"] = r["tokens"] == results["gsm8k"]["fp16"][i]["tokens"] if name != "fp16" else True
            results["gsm8k"].setdefault(name, []).append(r)
            save()
            bar.update(1)
    bar.close()
    save()
    report(results, out_dir)
    return results


def _progress(total, enabled):
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        return tqdm(total=total, disable=not enabled, file=sys.stderr, dynamic_ncols=True)

    class Plain:  # fallback without tqdm: one line per step on stderr
        n = 0

        def set_description(self, d):
            self.d = d

        def update(self, k):
            self.n += k
            if enabled:
                print(f"[{self.n}/{total}] {self.d}", file=sys.stderr, flush=True)

        def close(self):
            pass

    return Plain()


def machine() -> dict:
    info = {"device": str(mx.default_device()), "platform": platform.platform(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "mlx": mx.__version__, "python": platform.python_version(),
            "date": datetime.now().date().isoformat(), "loadavg": os.getloadavg()}  # fmt: skip
    try:
        import mlx_lm

        info["mlx_lm"] = mlx_lm.__version__
    except AttributeError:
        pass
    if mx.cuda.is_available():
        info["gpu"] = "cuda"
    elif mx.metal.is_available():
        info["gpu"] = "metal"
    return info


# ----------------------------------------------------------------------------- summaries and report


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def ppl_table(results) -> list:
    """One row per (context, method): ppl, its change over FP16, mean KL, top-1 agreement, bytes, peak."""
    rows = []
    fp = results["ppl"].get("fp16", {})
    ctxs = sorted({int(c) for per in results["ppl"].values() for c in per})
    for c in ctxs:
        ref = fp.get(str(c))
        elems = ref[0]["kv_elements_per_token"] if ref else None
        ref_ppl = math.exp(_mean([x for r in ref for x in r["nll"]])) if ref else None
        for name, per in results["ppl"].items():
            runs = per.get(str(c))
            if not runs:
                continue
            nll = [x for r in runs for x in r["nll"]]
            kl = [x for r in runs for x in r["kl"]]
            agree = [x for r in runs for x in r["agree"]]
            nd = [r["decode"] for r in runs]
            kl_dec = [x for r, k in zip(runs, nd) for x in r["kl"][:k]]
            kl_chk = [x for r, k in zip(runs, nd) for x in r["kl"][k:]]
            ppl = math.exp(_mean(nll))
            used = _mean([r["used_bytes"] for r in runs])
            row = dict(
                context=c, method=name, ppl=ppl, d_ppl_pct=100 * (ppl / ref_ppl - 1) if ref_ppl else None,
                kl=_mean(kl), kl_decode=_mean(kl_dec), kl_chunk=_mean(kl_chk), top1=_mean(agree),
                bytes_per_token=used / c, bits_per_elem=8 * used / (c * elems) if elems else None,
                nbytes_mb=_mean([r["nbytes"] for r in runs]) / 1e6,
                peak_mb=max(r["peak_bytes"] for r in runs) / 1e6,
                peak_over_base_mb=max(r["peak_bytes"] - r["base_bytes"] for r in runs) / 1e6,
                tokens_scored=len(nll), seconds=sum(r["seconds"] for r in runs),
            )  # fmt: skip
            rows.append(row)
    return rows


def needle_table(results) -> list:
    rows = []
    for name, cells in results["needle"].items():
        row = {"method": name, "accuracy": _mean([r["found"] for r in cells]), "cells": len(cells)}
        for c in sorted({r["context"] for r in cells}):
            row[f"{c // 1024}K" if c % 1024 == 0 else str(c)] = _mean([r["found"] for r in cells if r["context"] == c])
        rows.append(row)
    return rows


def gsm8k_table(results) -> list:
    return [
        {"method": name, "accuracy": _mean([r["correct"] for r in rs]), "same_as_fp16": _mean([r["same_as_fp16"] for r in rs]),
         "answer_as_fp16": _mean([r["pred"] == f["pred"] for r, f in zip(rs, results["gsm8k"]["fp16"])]),
         "problems": len(rs), "mean_tokens": _mean([len(r["tokens"]) for r in rs])}
        for name, rs in results["gsm8k"].items()
    ]  # fmt: skip


PPL_COLS = ["context", "method", "ppl", "d_ppl_pct", "kl", "kl_decode", "kl_chunk", "top1", "bytes_per_token",
            "bits_per_elem", "peak_mb", "peak_over_base_mb"]  # fmt: skip


def fmt(x) -> str:
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        return f"{x:.3g}" if abs(x) < 0.01 and x != 0 else f"{x:.4g}" if abs(x) < 1000 else f"{x:.0f}"
    return "" if x is None else str(x)


def text_table(rows, cols=None) -> str:
    cols = cols or list(dict.fromkeys(k for r in rows for k in r))
    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def md_table(rows, cols=None) -> str:
    cols = cols or list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def report(results, out_dir, echo=True) -> str:
    """Tables on the terminal, quality.md and the plots in out_dir (also for a partial quality.json)."""
    out_dir = Path(out_dir)
    ppl, needle, gsm = ppl_table(results), needle_table(results), gsm8k_table(results)
    s = results["settings"]
    parts = []
    if ppl:
        parts.append(("Perplexity, KL from FP16, top-1 agreement (WikiText-2)", ppl, PPL_COLS))
    if needle:
        parts.append(("Needle in a haystack (accuracy)", needle, None))
    if gsm:
        parts.append(("GSM8K (greedy, chat template)", gsm, None))
    if echo:
        for title, rows, cols in parts:
            print(f"\n{title}\n{text_table(rows, cols)}")
    plots = write_plots(results, out_dir)
    m = results["machine"]
    md = [
        f"# KV-cache quality: {results['model']}",
        "",
        f"Preset `{results['preset']}`, {results['started']}, {results['elapsed_s'] / 60:.1f} min on "
        f"{m['device']} ({m['platform']}, {m['cpus']} CPUs, mlx {m['mlx']}).",
        f"Command: `{results['command']}`",
        "",
        f"Settings: `{json.dumps(s)}`",
        "",
        f"Scoring: for context C, C - {s['scored']} tokens of WikiText-2 go through chunked prefill (2048-token "
        f"chunks); the next {s['scored']} tokens are scored, {s['decode']} one step at a time then chunks of "
        f"{s['chunk']}; {s['segments']} text window(s). KL is KL(FP16 || method) of the next-token distribution "
        "(nats), top1 the share of positions where the argmax equals FP16's. bytes_per_token and bits_per_elem "
        "count the used arrays of every layer's cache at C tokens (FP16 window, banks, indices, scales "
        "included); `fp16` is the model's own KVCache in the model's dtype. peak_mb is `mx.get_peak_memory()` "
        "over the pass (weights included), peak_over_base_mb the part above the memory in use before it.",
    ]
    for title, rows, cols in parts:
        md += ["", f"## {title}", "", md_table(rows, cols)]
    if plots:
        md += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    text = "\n".join(md) + "\n"
    (out_dir / "quality.md").write_text(text)
    if echo:
        print(f"\nwrote {out_dir / 'quality.json'}, {out_dir / 'quality.md'}" + "".join(f", {p}" for p in plots))
    return text


def write_plots(results, out_dir) -> list:
    """quality_vs_bytes.png, kl_vs_context.png, needle_grid.png (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return []
    out, rows = [], ppl_table(results)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    names = list(dict.fromkeys([*results["ppl"], *results["needle"]]))
    color = {name: f"C{i % 10}" for i, name in enumerate(names)}  # one colour per method in every plot
    if rows:
        c_max = max(r["context"] for r in rows)
        last = [r for r in rows if r["context"] == c_max]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, key, label in ((axes[0], "kl", "mean KL from FP16 (nats)"), (axes[1], "d_ppl_pct", "perplexity change vs FP16 (%)")):
            for r in last:
                if key == "kl" and r["method"] == "fp16":  # 0 on a log axis
                    continue
                x = r["bytes_per_token"] / 1e3
                ax.scatter(x, r[key], color=color[r["method"]])
                ax.annotate(r["method"], (x, r[key]), textcoords="offset points", xytext=(4, 3), fontsize=8)
            ax.set_xlabel(f"KV bytes per token at {c_max} tokens (KB, all layers)")
            ax.set_ylabel(label)
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_formatter(plain)
            if key == "kl":
                ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both")
        fig.suptitle(f"Quality vs cache size ({results['model']}; fp16 = the model's own cache dtype)", fontsize=10)
        fig.tight_layout()
        out.append(out_dir / "quality_vs_bytes.png")
        fig.savefig(out[-1], dpi=120)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for name in results["ppl"]:
            pts = sorted((r["context"], r["kl"]) for r in rows if r["method"] == name)
            if name != "fp16" and pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name, color=color[name])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("mean KL from FP16 (nats)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out.append(out_dir / "kl_vs_context.png")
        fig.savefig(out[-1], dpi=120)
        plt.close(fig)

    if results["needle"]:
        names = list(results["needle"])  # the grids' cell colours say found / not found
        ctxs = sorted({r["context"] for rs in results["needle"].values() for r in rs})
        depths = sorted({r["depth"] for rs in results["needle"].values() for r in rs})
        fig, axes = plt.subplots(1, len(names), figsize=(1.2 + 1.6 * len(names), 2.6), squeeze=False)
        for ax, name in zip(axes[0], names):
            grid = [[float("nan")] * len(ctxs) for _ in depths]
            for r in results["needle"][name]:
                grid[depths.index(r["depth"])][ctxs.index(r["context"])] = float(r["found"])
            ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
            ax.set_title(name, fontsize=9)
            ax.set_xticks(range(len(ctxs)), [f"{c // 1024}K" for c in ctxs], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths], fontsize=7)
        axes[0][0].set_ylabel("needle depth")
        fig.suptitle("Needle found (green) per context and depth", fontsize=10)
        fig.tight_layout()
        out.append(out_dir / "needle_grid.png")
        fig.savefig(out[-1], dpi=120)
        plt.close(fig)
    return out


# ----------------------------------------------------------------------------- command line


def _ints(s):
    return [int(x) for x in s.split(",") if x.strip()]


def main(argv=None, prog="pkv-mlx eval") -> int:
    """`pkv-mlx eval` / benchmarks/quality.py. Returns an exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(
        prog=prog,
        description="KV-cache quality vs FP16: perplexity, KL, top-1 agreement, needle, GSM8K, bytes, peak memory.",
    )
    p.add_argument("--model", default=None, help="model folder, .gguf file or Hugging Face repo (default: SmolLM2-135M-Instruct)")
    p.add_argument("--methods", default=None, help=f"comma-separated, from: {', '.join(METHODS)} (default: the preset's)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="preset", action="store_const", const="quick", help="the quick preset (default)")
    g.add_argument("--full", dest="preset", action="store_const", const="full", help="the full preset")
    p.add_argument("--out", default="results", help="output folder (default: results)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--report", metavar="JSON", help="only redo the tables, report and plots of a quality.json")
    p.add_argument("--contexts", type=_ints, help="override: contexts, e.g. 2048,4096")
    p.add_argument("--scored", type=int, help="override: scored tokens per context")
    p.add_argument("--segments", type=int, help="override: WikiText-2 windows")
    p.add_argument("--needle-contexts", type=_ints, help="override: needle contexts ('' for none)")
    p.add_argument("--needle-depths", type=_ints, help="override: needle depths in percent")
    p.add_argument("--gsm8k", type=int, help="override: GSM8K problems (0 for none)")
    p.set_defaults(preset="quick")
    a = p.parse_args(argv)
    if a.report:
        results = json.loads(Path(a.report).read_text())
        report(results, Path(a.report).parent)
        return 0
    overrides = {k: v for k, v in dict(contexts=a.contexts, scored=a.scored, segments=a.segments,
                 needle_contexts=a.needle_contexts, needle_depths=a.needle_depths, gsm8k=a.gsm8k).items()
                 if v is not None}  # fmt: skip
    methods = [x.strip() for x in a.methods.split(",")] if a.methods else None
    try:
        run_eval(a.model, methods, a.preset, a.out, progress=not a.no_progress, command=f"{prog} {shlex.join(argv)}",
                 **overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
