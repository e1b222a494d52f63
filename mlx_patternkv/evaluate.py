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

Writes `quality.json` (every raw figure, rewritten atomically after each unit of work, so an interrupted
run leaves its results), `quality.md` and PNG plots into out_dir. Text comes from `data_dir()`.

Long runs in pieces (e.g. calls of a remote machine with a time limit):
    --deadline-s S    start no unit of work that would end after S seconds, then write the report
    --resume JSON     go on from an interrupted run's quality.json (same settings), skipping its units
    --report A.json B.json --out DIR    merge pieces (other methods / parts / cells) into one report
A unit that raises (e.g. mlx-lm's `quantized_matmul` on shapes MLX's CUDA backend lacks) is recorded in
results["errors"] and in the report; the other units go on. `--dtype float16` runs the model in float16.
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
import traceback
from datetime import datetime
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from .cache import PatternKVCache
from .config import PatternKVConfig
from .integrate import _model_caches, make_prompt_cache, patch_attention

CHUNK = 2048  # mlx-lm's prefill step
_T0 = time.monotonic()  # when the harness was imported: `--deadline-s` counts from here


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
    # diagnostics: 2 bits on one side only
    "pkv-k2v4": lambda model: patternkv(model, PatternKVConfig(k_bits=2, v_bits=4)),
    "pkv-k4v2": lambda model: patternkv(model, PatternKVConfig(k_bits=4, v_bits=2)),
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


def ppl_pass(model, make_cache, tokens, contexts, scored, decode, chunk, refs=None, rows=None):
    """One method on one token window (len >= max(contexts) + 1). For each context C (ascending):
    prefill up to C - scored tokens, score tokens C - scored .. C - 1 on a copy of the cache (the last
    context on the cache itself). refs: {C: FP16 logprobs} or None (this is the FP16 pass: its own
    logprobs are the reference and are returned in the rows under "logprobs"). rows: a dict to fill
    (context -> row) as each context finishes, so a caller keeps the finished ones if the pass raises."""
    rows = {} if rows is None else rows
    cache = make_cache(model)
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    pos = 0
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
        row = dict(
            history=h, scored=scored, decode=min(decode, scored), chunk=chunk, nll=nll, kl=kl, agree=agree,
            **cache_bytes(scratch), peak_bytes=mx.get_peak_memory(), base_bytes=base,
            seconds=time.perf_counter() - t0,
        )  # fmt: skip
        if refs is None:
            row["logprobs"] = lp
            row["kv_elements_per_token"] = kv_elements_per_token(scratch)
        rows[c] = row
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


DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

# Settings that change what a part's figures mean: a resumed run, and the pieces of a merge, must agree
# on them (the lists -- methods, contexts, needle cells, GSM8K problems -- may differ between pieces).
PART_KEYS = {
    "ppl": ("scored", "decode", "chunk", "segments", "dtype"),
    "needle": ("needle_max_tokens", "dtype"),
    "gsm8k": ("gsm8k_max_tokens", "dtype"),
}
PARTS = tuple(PART_KEYS)


def model_dtype(model) -> str:
    """The dtype of the model's floating-point parameters, e.g. "float16" (the first one found)."""
    for _, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            return str(v.dtype).rsplit(".", 1)[-1]
    return "unknown"


def _error(part, method, where: dict, exc) -> dict:
    """What one failed unit of work leaves in results["errors"]."""
    return dict(part=part, method=method, **where, error=f"{type(exc).__name__}: {exc}"[:4000],
                traceback=traceback.format_exc()[-4000:])  # fmt: skip


def _window(r, i):
    return r.get("window", i)  # files written before the field existed list windows in order


def _unit_keys(results) -> set:
    """The units of work that have results: ("ppl", method, context, window), ("needle", method, context,
    depth), ("gsm8k", method, index)."""
    keys = set()
    for name, per in results["ppl"].items():
        for c, runs in per.items():
            keys |= {("ppl", name, int(c), _window(r, i)) for i, r in enumerate(runs)}
    for name, cells in results["needle"].items():
        keys |= {("needle", name, r["context"], r["depth"]) for r in cells}
    for name, rs in results["gsm8k"].items():
        keys |= {("gsm8k", name, r.get("index", i)) for i, r in enumerate(rs)}
    return keys


def _error_key(e) -> tuple:
    """The unit an error entry belongs to (ppl errors: the whole pass over one window)."""
    where = {"ppl": ("window",), "needle": ("context", "depth"), "gsm8k": ("index",)}[e["part"]]
    return (e["part"], e["method"], *(e.get(k) for k in where))


def run_eval(model=None, methods=None, preset="quick", out_dir="results", progress=True, command=None,
             dtype=None, deadline=None, resume=None, plots=True, **overrides) -> dict:
    """Measure `methods` (names in METHODS; default: the preset's) with `preset` ("quick" or "full";
    overrides: any preset key, e.g. contexts=[1024], gsm8k=0, needle_contexts=[]) on `model` (None:
    SmolLM2-135M-Instruct; a path, .gguf file or Hugging Face repo id). Writes quality.json /
    quality.md / *.png into out_dir; returns the results dict. command: recorded in the report.

    dtype: "float32" / "float16" / "bfloat16" casts the model's weights after loading (None: as stored;
    the default model is converted to float32). The dtype used is recorded in settings["dtype"].
    A unit of work (one method on one text window, needle cell or GSM8K problem) that raises is recorded
    in results["errors"] and the run goes on. deadline: a `time.monotonic()` value; no unit is started
    that would likely end after it (judged by the last unit of the same kind), and the report is written
    with results["incomplete"] saying what is left. resume: results of an earlier run (a dict or the
    path of its quality.json) with the same model and settings: its units (also failed ones) are kept
    and not run again."""
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
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    methods = ["fp16"] + [m for m in methods if m != "fp16"]  # FP16 is the reference, measured first
    settings["methods"] = methods
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(resume, (str, Path)):
        resume = json.loads(Path(resume).read_text())

    t_start = time.perf_counter()
    m, tokenizer = load(model)
    if dtype is not None:
        m.set_dtype(DTYPES[dtype])
    settings["dtype"] = model_dtype(m)
    s = settings
    label = model or "SmolLM2-135M-Instruct (default)"
    if resume is not None:
        differ = {k: (resume["settings"].get(k), v) for k, v in s.items() if resume["settings"].get(k) != v}
        if resume.get("model") != label:
            differ["model"] = (resume.get("model"), label)
        if differ:
            raise ValueError("cannot resume a run with other settings (earlier, now): "
                             + ", ".join(f"{k} {a!r}, {b!r}" for k, (a, b) in differ.items()))
    contexts = sorted(s["contexts"])
    windows = wikitext_windows(tokenizer, contexts[-1] + 1, s["segments"]) if contexts else []
    cells = [(c, d) for c in sorted(s["needle_contexts"]) for d in s["needle_depths"]]
    problems = gsm8k_problems(s["gsm8k"]) if s["gsm8k"] else []
    haystack = None
    if cells:
        from .needle import essays

        haystack = tokenizer.encode(essays()[: 8 * max(c for c, _ in cells)], add_special_tokens=False)

    results = dict(
        model=label, preset=preset, settings=settings,
        machine=machine(), started=datetime.now().isoformat(timespec="seconds"),
        command=command or f"run_eval({model!r}, {methods!r}, {preset!r}, {str(out_dir)!r}, **{overrides!r})", ppl={}, needle={}, gsm8k={}, elapsed_s=0.0,
        errors=[],
    )  # fmt: skip
    elapsed_before = 0.0
    if resume is not None:
        for part in PARTS:
            results[part] = copy.deepcopy(resume[part])
        results["errors"] = copy.deepcopy(resume.get("errors", []))
        crashed = resume.get("running")  # the unit the earlier process was in when it ended
        if crashed:
            results["errors"].append(dict(crashed, error="the process ended during this unit of work (a crash, or "
                                          "killed at a time limit); not retried on resume"))  # fmt: skip
        results["notes"] = list(resume.get("notes", []))
        results["started"] = resume.get("started", results["started"])
        results["resumed"] = resume.get("resumed", []) + [
            dict(started=datetime.now().isoformat(timespec="seconds"), command=results["command"])]
        elapsed_before = resume.get("elapsed_s", 0.0)
    path = out_dir / "quality.json"

    def save():
        results["elapsed_s"] = elapsed_before + time.perf_counter() - t_start
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, path)  # a run killed while writing still leaves the last whole file

    done = _unit_keys(results)
    failed = {_error_key(e) for e in results["errors"]}

    def is_done(part, name, key):
        if part == "ppl":  # one pass over window `key` feeds every context
            return (part, name, key) in failed or all(("ppl", name, c, key) in done for c in contexts)
        return (part, name, *key) in done or (part, name, *key) in failed

    units = [("ppl", name, w) for name in methods for w in range(len(windows))]
    units += [("needle", name, cell) for cell in cells for name in methods]  # cell by cell: all methods
    units += [("gsm8k", name, (i,)) for i in range(len(problems)) for name in methods]
    todo = [u for u in units if not is_done(*u)]
    bar = _progress(len(todo), progress)
    refs = [None] * len(windows)  # FP16 log-probabilities per window and context, the reference of KL

    def fp16_refs(w):
        """FP16 log-probabilities of window w per context (a resumed run recomputes them)."""
        if refs[w] is None:
            rows = {}
            try:
                ppl_pass(m, METHODS["fp16"], windows[w], contexts, s["scored"], s["decode"], s["chunk"], rows=rows)
            finally:  # also on failure: the contexts finished before it are kept, and are the reference
                refs[w] = {c: r.pop("logprobs") for c, r in rows.items()}
                if not is_done("ppl", "fp16", w):
                    for c, r in rows.items():
                        results["ppl"].setdefault("fp16", {}).setdefault(str(c), []).append(dict(r, window=w))
                else:  # resumed: the stored FP16 rows stay; say how closely this pass reproduced them
                    old = {int(c): r for c, runs in results["ppl"].get("fp16", {}).items()
                           for i, r in enumerate(runs) if _window(r, i) == w}
                    diff = max((abs(a - b) for c, r in rows.items() if c in old
                                for a, b in zip(r["nll"], old[c]["nll"])), default=0.0)
                    results.setdefault("notes", []).append(
                        f"fp16 pass over window {w} rerun as the reference of a resumed run: contexts "
                        f"{sorted(rows)}, max |NLL difference| to the stored rows {diff:.3g}")
        return refs[w]

    def run_unit(part, name, key):
        if part == "ppl":
            w = key
            if name == "fp16":
                try:
                    fp16_refs(w)
                    mx.synchronize()
                except Exception as e:
                    c = next((c for c in contexts if c not in refs[w]), None)
                    results["errors"].append(_error("ppl", name, dict(window=w, context=c), e))
                return
            try:
                ref = fp16_refs(w)
            except Exception as e:  # only when resuming: the fp16 unit itself was done earlier
                ref = refs[w]
                results.setdefault("notes", []).append(f"fp16 rerun over window {w} failed: {type(e).__name__}: {e}")
            ctxs = [c for c in contexts if c in ref]
            if not ctxs:
                e = RuntimeError("no FP16 reference for this window (the fp16 pass failed)")
                results["errors"].append(dict(part="ppl", method=name, window=w, context=contexts[0], error=str(e)))
                return
            rows = {}
            try:
                ppl_pass(m, METHODS[name], windows[w], ctxs, s["scored"], s["decode"], s["chunk"], ref, rows=rows)
                mx.synchronize()  # an asynchronous GPU error belongs to this unit
                if len(ctxs) < len(contexts):
                    missing = [c for c in contexts if c not in ctxs]
                    results["errors"].append(dict(part="ppl", method=name, window=w, context=missing[0],
                                                  error=f"not measured at {missing}: no FP16 reference there"))
            except Exception as e:
                c = next((c for c in ctxs if c not in rows), None)
                results["errors"].append(_error("ppl", name, dict(window=w, context=c), e))
            for c, r in rows.items():
                results["ppl"].setdefault(name, {}).setdefault(str(c), []).append(dict(r, window=w))
        elif part == "needle":
            c, d = key
            try:
                r = needle_cell(m, tokenizer, METHODS[name], haystack, c, d, s["needle_max_tokens"])
                mx.synchronize()
            except Exception as e:
                results["errors"].append(_error("needle", name, dict(context=c, depth=d), e))
                return
            results["needle"].setdefault(name, []).append(r)
        else:
            (i,) = key
            try:
                r = gsm8k_problem(m, tokenizer, METHODS[name], problems[i], s["gsm8k_max_tokens"])
                mx.synchronize()
            except Exception as e:
                results["errors"].append(_error("gsm8k", name, dict(index=i), e))
                return
            r["index"] = i
            ref = next((f for f in results["gsm8k"].get("fp16", []) if f.get("index") == i), None)
            r["same_as_fp16"] = True if name == "fp16" else None if ref is None else r["tokens"] == ref["tokens"]
            results["gsm8k"].setdefault(name, []).append(r)

    took = {}  # seconds of the last unit per (part, method) and per part: the time the next one needs
    for name, per in results["ppl"].items():  # a resumed run starts from the stored times
        took["ppl", name] = took["ppl"] = sum(runs[-1]["seconds"] for runs in per.values() if runs)
    for part in ("needle", "gsm8k"):
        for name, rows in results[part].items():
            if rows:
                took[part, name] = took[part] = rows[-1]["seconds"]
    for k, (part, name, key) in enumerate(todo):
        need = took.get((part, name), took.get(part, 0.0))
        if deadline is not None and time.monotonic() + 1.2 * need > deadline:
            results["incomplete"] = dict(reason="deadline", units_left=len(todo) - k, units_total=len(units),
                                         next=f"{part} {name} {key}")  # fmt: skip
            print(f"\nstopping before the deadline: {len(todo) - k} of {len(units)} units left "
                  f"(run again with --resume {path} to go on)", file=sys.stderr, flush=True)
            break
        if part == "ppl":
            where, at = f"window {key + 1}/{len(windows)}", dict(window=key)
        elif part == "needle":
            where, at = f"{key[0]} tokens depth {key[1]}%", dict(context=key[0], depth=key[1])
        else:
            where, at = f"problem {key[0] + 1}/{len(problems)}", dict(index=key[0])
        bar.set_description(f"{part} {name} {where}")
        n_errors = len(results["errors"])
        results["running"] = dict(part=part, method=name, **at)  # a resumed run skips it if this process dies in it
        save()
        t0 = time.monotonic()
        run_unit(part, name, key)
        took[part, name] = took[part] = time.monotonic() - t0
        results.pop("running")
        if len(results["errors"]) > n_errors:
            mx.clear_cache()
            error = results["errors"][-1]["error"][:300]
            print(f"\n{part} {name} {where} failed: {error}", file=sys.stderr, flush=True)
        save()
        bar.update(1)
    else:
        results.pop("incomplete", None)
    bar.close()
    save()
    report(results, out_dir, plots=plots)
    return results


def _progress(total, enabled):
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None and sys.stderr.isatty():
        return tqdm(total=total, disable=not enabled, file=sys.stderr, dynamic_ncols=True)

    class Plain:  # without tqdm or a terminal (a log file): one line per step on stderr
        n = 0
        t0 = time.monotonic()

        def set_description(self, d):
            self.d = d

        def update(self, k):
            self.n += k
            if enabled:
                print(f"[{self.n}/{total} {time.monotonic() - self.t0:.0f}s] {self.d}", file=sys.stderr, flush=True)

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
    try:
        info["device_name"] = mx.device_info().get("device_name")
    except Exception:  # not in every MLX version / backend
        pass
    return info


# ----------------------------------------------------------------------------- summaries and report


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def _by_window(runs) -> dict:
    return {_window(r, i): r for i, r in enumerate(runs)}


def ppl_table(results) -> list:
    """One row per (context, method): ppl, its change over FP16, mean KL, top-1 agreement, bytes, peak.
    The FP16 reference of a row is taken over the same text windows as the row's own runs."""
    rows = []
    fp = results["ppl"].get("fp16", {})
    ctxs = sorted({int(c) for per in results["ppl"].values() for c in per})
    for c in ctxs:
        fp_runs = _by_window(fp.get(str(c), []))
        elems = next(iter(fp_runs.values()))["kv_elements_per_token"] if fp_runs else None
        for name, per in results["ppl"].items():
            runs = _by_window(per.get(str(c), []))
            if not runs:
                continue
            ws = sorted(runs)
            runs = [runs[w] for w in ws]
            ref = [fp_runs[w] for w in ws] if all(w in fp_runs for w in ws) else None
            ref_nll = [x for r in ref for x in r["nll"]] if ref else None
            ref_ppl = math.exp(_mean(ref_nll)) if ref else None
            nll = [x for r in runs for x in r["nll"]]
            kl = [x for r in runs for x in r["kl"]]
            agree = [x for r in runs for x in r["agree"]]
            nd = [r["decode"] for r in runs]
            kl_dec = [x for r, k in zip(runs, nd) for x in r["kl"][:k]]
            kl_chk = [x for r, k in zip(runs, nd) for x in r["kl"][k:]]
            ppl = math.exp(_mean(nll))
            used = _mean([r["used_bytes"] for r in runs])
            se = None  # standard error of the perplexity change, from the paired per-token NLL differences
            if ref_nll and len(ref_nll) == len(nll) > 1:
                d = [a - b for a, b in zip(nll, ref_nll)]
                se = 100 * ppl / ref_ppl * math.sqrt(sum((x - _mean(d)) ** 2 for x in d) / (len(d) - 1) / len(d))
            row = dict(
                context=c, method=name, ppl=ppl, d_ppl_pct=100 * (ppl / ref_ppl - 1) if ref_ppl else None, d_ppl_se=se,
                kl=_mean(kl), kl_decode=_mean(kl_dec), kl_chunk=_mean(kl_chk), top1=_mean(agree),
                bytes_per_token=used / c, bits_per_elem=8 * used / (c * elems) if elems else None,
                nbytes_mb=_mean([r["nbytes"] for r in runs]) / 1e6,
                peak_mb=max(r["peak_bytes"] for r in runs) / 1e6,
                peak_over_base_mb=max(r["peak_bytes"] - r["base_bytes"] for r in runs) / 1e6,
                tokens_scored=len(nll), windows=len(ws), seconds=sum(r["seconds"] for r in runs),
            )  # fmt: skip
            rows.append(row)
    return rows


def needle_table(results) -> list:
    rows = []
    errors = [e for e in results.get("errors", []) if e["part"] == "needle"]
    for name, cells in results["needle"].items():
        row = {"method": name, "accuracy": _mean([r["found"] for r in cells]), "cells": len(cells)}
        if errors:
            row["errors"] = sum(e["method"] == name for e in errors)
        for c in sorted({r["context"] for r in cells}):
            row[f"{c // 1024}K" if c % 1024 == 0 else str(c)] = _mean([r["found"] for r in cells if r["context"] == c])
        rows.append(row)
    return rows


def gsm8k_table(results) -> list:
    """Accuracy per method; same_as_fp16 / answer_as_fp16 over the problems FP16 has too (by index)."""
    fp = {r.get("index", i): r for i, r in enumerate(results["gsm8k"].get("fp16", []))}
    rows = []
    for name, rs in results["gsm8k"].items():
        paired = [(r, fp[r.get("index", i)]) for i, r in enumerate(rs) if r.get("index", i) in fp]
        rows.append({"method": name, "accuracy": _mean([r["correct"] for r in rs]),
                     "same_as_fp16": _mean([r["tokens"] == f["tokens"] for r, f in paired]),
                     "answer_as_fp16": _mean([r["pred"] == f["pred"] for r, f in paired]),
                     "problems": len(rs), "mean_tokens": _mean([len(r["tokens"]) for r in rs])})  # fmt: skip
    return rows


def error_table(results) -> list:
    """One row per failed unit of work: where, and the first line of the error."""
    rows = []
    for e in results.get("errors", []):
        where = " ".join(f"{k} {e[k]}" for k in ("window", "context", "depth", "index") if e.get(k) is not None)
        first = (e.get("error") or "").strip().splitlines()
        rows.append({"part": e["part"], "method": e["method"], "at": where,
                     "error": (first[0] if first else "")[:200].replace("|", "/")})
    return rows


def merge_results(items) -> dict:
    """One results dict from the quality.json of several runs that are pieces of one measurement (other
    methods, parts, contexts, needle cells or GSM8K problems, or a run and its resumption). items:
    [(label, results)], label naming the file in the report. Needs the same model, device and MLX
    version, and for each part (ppl, needle, gsm8k) the same measurement settings (PART_KEYS) among the
    files that hold results of it; fp16 results where other methods have ppl or GSM8K results.
    ValueError otherwise. A unit of work in several files is taken from the first one."""
    items = list(items)
    if not items:
        raise ValueError("nothing to merge")
    problems = []
    for what, get in (("model", lambda r: r["model"]),
                      ("device", lambda r: f"{r['machine']['device']} {r['machine'].get('gpu', '')}".strip()),
                      ("mlx version", lambda r: r["machine"].get("mlx"))):  # fmt: skip
        seen = {}
        for label, r in items:
            seen.setdefault(get(r), []).append(label)
        if len(seen) > 1:
            problems.append(f"{what} differs: " + "; ".join(f"{v!r} in {', '.join(ls)}" for v, ls in seen.items()))
    for part, keys in PART_KEYS.items():
        having = [(label, r) for label, r in items if r[part]]
        for k in keys:
            seen = {}
            for label, r in having:
                seen.setdefault(json.dumps(r["settings"].get(k)), []).append(label)
            if len(seen) > 1:
                problems.append(f"{part} setting {k!r} differs: "
                                + "; ".join(f"{v} in {', '.join(ls)}" for v, ls in seen.items()))
    if problems:
        raise ValueError("cannot merge these results:\n  " + "\n  ".join(problems))

    first = items[0][1]
    settings = dict(first["settings"])
    for part, keys in PART_KEYS.items():
        having = [r for _, r in items if r[part]]
        for k in keys:
            if having and k in having[0]["settings"]:
                settings[k] = having[0]["settings"][k]
    names = list(dict.fromkeys(n for _, r in items for n in r["settings"].get("methods", [])))
    names += [n for _, r in items for part in PARTS for n in r[part] if n not in names]
    names = ["fp16"] + sorted((n for n in dict.fromkeys(names) if n != "fp16"),
                              key=lambda n: list(METHODS).index(n) if n in METHODS else len(METHODS))
    settings["methods"] = names
    for k, part in (("contexts", "ppl"), ("needle_contexts", "needle"), ("needle_depths", "needle")):
        settings[k] = sorted({x for _, r in items if r[part] for x in r["settings"].get(k, [])})
    settings["gsm8k"] = max([r["settings"].get("gsm8k", 0) for _, r in items if r["gsm8k"]], default=0)
    presets = {r.get("preset") for _, r in items}
    merged = dict(
        model=first["model"], preset=presets.pop() if len(presets) == 1 else "mixed", settings=settings,
        machine=first["machine"], started=min(r["started"] for _, r in items),
        command=(f"merged from {len(items)} files: " + " + ".join(r["command"] for _, r in items)
                 if len(items) > 1 else first["command"]),
        ppl={}, needle={}, gsm8k={}, elapsed_s=sum(r.get("elapsed_s", 0.0) for _, r in items), errors=[], notes=[],
        merged_from=[dict(path=label, started=r["started"], elapsed_s=r.get("elapsed_s", 0.0), command=r["command"],
                          preset=r.get("preset"), machine=r["machine"], units=len(_unit_keys(r)),
                          incomplete=r.get("incomplete")) for label, r in items],
    )  # fmt: skip

    kept, dups, fp16_diff = {}, 0, 0.0
    for label, r in items:
        for name, per in r["ppl"].items():
            for c, runs in per.items():
                for i, row in enumerate(runs):
                    key = ("ppl", name, int(c), _window(row, i))
                    if key in kept:
                        dups += 1
                        if name == "fp16":
                            fp16_diff = max([fp16_diff] + [abs(a - b) for a, b in zip(row["nll"], kept[key]["nll"])])
                        continue
                    kept[key] = row = dict(row, window=_window(row, i))
                    merged["ppl"].setdefault(name, {}).setdefault(str(int(c)), []).append(row)
        for name, cells in r["needle"].items():
            for row in cells:
                key = ("needle", name, row["context"], row["depth"])
                if key in kept:
                    dups += 1
                    continue
                kept[key] = row
                merged["needle"].setdefault(name, []).append(row)
        for name, rs in r["gsm8k"].items():
            for i, row in enumerate(rs):
                key = ("gsm8k", name, row.get("index", i))
                if key in kept:
                    dups += 1
                    continue
                kept[key] = row = dict(row, index=row.get("index", i))
                merged["gsm8k"].setdefault(name, []).append(row)
        merged["notes"] += [f"{label}: {n}" for n in r.get("notes", [])]
    order = {n: i for i, n in enumerate(names)}
    for part in PARTS:
        merged[part] = dict(sorted(merged[part].items(), key=lambda kv: order.get(kv[0], len(order))))
    for per in merged["ppl"].values():
        for c in list(per):
            per[c] = sorted(per[c], key=lambda row: row["window"])
        per.update(dict(sorted(per.items(), key=lambda kv: int(kv[0]))))
    for part in ("needle", "gsm8k"):
        for name, rows in merged[part].items():
            rows.sort(key=(lambda x: (x["context"], x["depth"])) if part == "needle" else (lambda x: x["index"]))

    errors_seen = set()
    for label, r in items:
        ended = [dict(r["running"], error="the process ended during this unit of work (a crash, or killed at a "
                      "time limit)")] if r.get("running") else []  # fmt: skip
        for e in r.get("errors", []) + ended:
            key = _error_key(e)
            if e["part"] == "ppl":
                measured = all(("ppl", e["method"], c, e.get("window")) in kept for c in r["settings"]["contexts"])
            else:
                measured = key in kept
            if not measured and key not in errors_seen:
                errors_seen.add(key)
                merged["errors"].append(dict(e, file=label))

    for part in ("ppl", "gsm8k"):
        if any(n != "fp16" for n in merged[part]) and "fp16" not in merged[part]:
            raise ValueError(f"cannot merge these results: no file has fp16 {part} results, "
                             "the reference of the others")
    fp_ppl = {(k[2], k[3]) for k in kept if k[:2] == ("ppl", "fp16")}
    gaps = sorted({(k[2], k[3]) for k in kept if k[0] == "ppl" and (k[2], k[3]) not in fp_ppl})
    if gaps:
        merged["notes"].append(f"no fp16 ppl rows at (context, window) {gaps}: those rows have no deltas")
    fp_gsm = {k[2] for k in kept if k[:2] == ("gsm8k", "fp16")}
    gaps = sorted({k[2] for k in kept if k[0] == "gsm8k" and k[2] not in fp_gsm})
    if gaps:
        merged["notes"].append(f"no fp16 GSM8K result for problems {gaps}: left out of same_as_fp16 / answer_as_fp16")
    if dups:
        merged["notes"].append(f"{dups} units of work were in several files; the first file's were kept (largest "
                               f"|difference| between copies of fp16 per-token NLL: {fp16_diff:.3g})")
    return merged


PPL_COLS = ["context", "method", "ppl", "d_ppl_pct", "d_ppl_se", "kl", "kl_decode", "kl_chunk", "top1", "bytes_per_token",
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


def report(results, out_dir, echo=True, plots=True) -> str:
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
    errors = error_table(results)
    if errors:
        parts.append(("Errors (units of work that raised; the run went on without them)", errors, None))
    if echo:
        for title, rows, cols in parts:
            print(f"\n{title}\n{text_table(rows, cols)}")
        if results.get("incomplete"):
            print(f"\nINCOMPLETE: {results['incomplete']}")
    plots = write_plots(results, out_dir) if plots else []
    m = results["machine"]
    md = [
        f"# KV-cache quality: {results['model']}",
        "",
        f"Preset `{results['preset']}`, {results['started']}, {results['elapsed_s'] / 60:.1f} min on "
        f"{m['device']}{' ' + m['device_name'] if m.get('device_name') else ''} ({m['platform']}, {m['cpus']} CPUs, "
        f"mlx {m['mlx']}), model weights in {s.get('dtype', 'the stored dtype')}.",
        f"Command: `{results['command']}`" if not results.get("merged_from") else "Command: see below",
    ]
    for r in results.get("resumed", []):
        md.append(f"Resumed {r['started']}: `{r['command']}`")
    if results.get("merged_from"):
        md += ["", f"Merged from {len(results['merged_from'])} files (the first file's figures win where several "
               "hold the same unit):"]
        md += [f"- `{f['path']}`: {f['started']}, {f['elapsed_s'] / 60:.1f} min, {f['units']} units"
               + (f", stopped early ({f['incomplete']['reason']}, {f['incomplete']['units_left']} units left)"
                  if f.get("incomplete") else "")
               + f"; `{f['command']}`" for f in results["merged_from"]]
    inc = results.get("incomplete")
    if inc:
        md += ["", f"**Incomplete**: stopped ({inc['reason']}) with {inc['units_left']} of {inc['units_total']} "
               f"units of work left, next `{inc['next']}`."]
    for note in results.get("notes", []):
        md += ["", f"Note: {note}"]
    md += [
        "",
        f"Settings: `{json.dumps(s)}`",
        "",
        f"Scoring: for context C, C - {s['scored']} tokens of WikiText-2 go through chunked prefill (2048-token "
        f"chunks); the next {s['scored']} tokens are scored, {s['decode']} one step at a time then chunks of "
        f"{s['chunk']}; {s['segments']} text window(s). d_ppl_se is the standard error of d_ppl_pct (paired per-token "
        "NLL differences). KL is KL(FP16 || method) of the next-token distribution (nats), top1 the share of positions where the argmax equals FP16's. bytes_per_token and bits_per_elem "
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
    p.add_argument("--out", default=None, help="output folder (default: results; with --report: the JSON's folder)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots (quality.json and quality.md only)")
    p.add_argument("--report", metavar="JSON", nargs="+",
                   help="only redo the tables, report and plots of a quality.json (written beside it), or merge "
                        "several quality.json files (pieces of one measurement) into --out")
    p.add_argument("--dtype", choices=list(DTYPES), help="cast the model's weights (default: as stored; the default "
                   "model is converted to float32; use float16 or bfloat16 on a GPU)")
    p.add_argument("--deadline-s", type=float, metavar="SECONDS",
                   help="start no unit of work that would end later than SECONDS after start; then write the report")
    p.add_argument("--resume", metavar="JSON", help="go on from the quality.json of an interrupted run with the same "
                   "settings (its units are kept, not run again); a missing file starts afresh")
    p.add_argument("--contexts", type=_ints, help="override: contexts, e.g. 2048,4096 ('' for none)")
    p.add_argument("--scored", type=int, help="override: scored tokens per context")
    p.add_argument("--segments", type=int, help="override: WikiText-2 windows")
    p.add_argument("--needle-contexts", type=_ints, help="override: needle contexts ('' for none)")
    p.add_argument("--needle-depths", type=_ints, help="override: needle depths in percent")
    p.add_argument("--gsm8k", type=int, help="override: GSM8K problems (0 for none)")
    p.set_defaults(preset="quick")
    a = p.parse_args(argv)
    if a.report:
        try:
            items = [(f, json.loads(Path(f).read_text())) for f in a.report]
            if len(items) == 1 and a.out is None:
                report(items[0][1], Path(a.report[0]).parent, plots=not a.no_plots)
                return 0
            if a.out is None:
                raise ValueError("merging several files needs --out (the folder for the merged report)")
            merged = merge_results(items)
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "quality.json").write_text(json.dumps(merged, indent=1))
        report(merged, out, plots=not a.no_plots)
        return 0
    overrides = {k: v for k, v in dict(contexts=a.contexts, scored=a.scored, segments=a.segments,
                 needle_contexts=a.needle_contexts, needle_depths=a.needle_depths, gsm8k=a.gsm8k).items()
                 if v is not None}  # fmt: skip
    methods = [x.strip() for x in a.methods.split(",")] if a.methods else None
    resume = None
    if a.resume:
        if Path(a.resume).is_file():
            resume = a.resume
        else:
            print(f"--resume: {a.resume} does not exist (yet): starting afresh", file=sys.stderr)
    deadline = _T0 + a.deadline_s if a.deadline_s is not None else None
    try:
        run_eval(a.model, methods, a.preset, a.out or "results", progress=not a.no_progress,
                 command=f"{prog} {shlex.join(argv)}", dtype=a.dtype, deadline=deadline, resume=resume,
                 plots=not a.no_plots, **overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
