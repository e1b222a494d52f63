# Copyright © 2026 mlx-patternkv authors.
"""Where the fused decode-attention kernel's time goes, on a GPU (latency of chained calls, as in
benchmarks/attention.py: each call's output is the next call's query).

  --sweep   latency against the tokens per split and per lane ("split/lane"; default = kernels' rule),
            and FP16 SDPA beside it
  --parts   latency with one part of the kernel removed at a time (the kernel source is edited in
            memory; the results are wrong, only the times mean something):
              no_values      the split pass's value loop over the quantized tokens
              no_scores      the split pass's channel loop of the K scores
              no_loops       both loops above
              no_token_terms the per-token V terms of the score phase (V offsets, histogram adds)
              no_tiles       the split pass's whole tile loop (left: prologue, combine, writes)
              no_hist_adds   only the histogram adds
              no_bank        the merge's histogram x V bank product
              merge_launch_only, table_launch_only
                             the merge / the q . P_k table reduced to a launch that writes zeros
              split_launch_only
                             the split pass reduced to a launch that returns at once
              launches_only  all three at once: the cost of three launches
  32 query / 8 KV heads, head_dim 128, 2-bit, float16; prints one line per measurement and writes
  $OUT/kernel_breakdown.json (OUT defaults to results).

    python benchmarks/kernel_breakdown.py [--sweep] [--parts]
For ncu, benchmarks/profile_once.py makes the same calls without timing.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mlx.core as mx  # noqa: E402

import attention as bench  # noqa: E402
from mlx_patternkv import kernels  # noqa: E402

ORIG = kernels._text
SPLIT, MERGE, TABLE = "decode_split.metal", "decode_merge.metal", "qk_table.metal"
SPLIT_EMPTY = (SPLIT, "// ---- prologue: q,", "return;\n// ---- prologue: q,")
MERGE_EMPTY = (MERGE, "// the weights: (m_s, l_s)",
               "if (tid < D) {\n  out[(bh * R + r) * D + tid] = static_cast<QT>(0.0f);\n}\nreturn;\n// the weights")
TABLE_EMPTY = (TABLE, "if (m < MKC) {  // uniform",
               "if (m < MKC && lane < R) {\n  tab[(bh * R + lane) * MKC + m] = 0.0f;\n}\nif (false) {  // uniform")
NO_VALUES = (SPLIT, "for (int tt0 = 0; tt0 < t_stop; tt0 += VU * TPS) {", "for (int tt0 = 0; tt0 < 0; tt0 += VU * TPS) {")
NO_SCORES = (SPLIT, "for (int d0 = 0; d0 < D; d0 += KU) {", "for (int d0 = 0; d0 < 0; d0 += KU) {")
# name -> the edits (file, text, replacement) that remove the part
PARTS = {
    "no_values": [NO_VALUES],
    "no_scores": [NO_SCORES],
    "no_loops": [NO_VALUES, NO_SCORES],
    "no_tiles": [(SPLIT, "for (int tile = t_begin + warp * TS; tile < t_end;", "for (int tile = t_begin + warp * TS; tile < t_begin;")],
    "no_token_terms": [(SPLIT, "      if (j < nv) {\n        const int t = tl0 + j;", "      if (false) {\n        const int t = tl0 + j;")],
    "no_hist_adds": [(SPLIT, "pkv_atomic_add_tg(hw + r * MB + vid, pkv_as_uint(s[j][r] * hsc + 8388608.0f) - 0x4B000000u);", "")],
    "no_bank": [(MERGE, "if (VPAT) {\n  const PKV_DEVICE T* bank", "if (false) {\n  const PKV_DEVICE T* bank")],
    "merge_launch_only": [MERGE_EMPTY],
    "table_launch_only": [TABLE_EMPTY],
    "split_launch_only": [SPLIT_EMPTY],
    "launches_only": [SPLIT_EMPTY, MERGE_EMPTY, TABLE_EMPTY],
}  # fmt: skip
SWEEP = [(4096, 1, [256, 512, 1024]), (16384, 1, [256, 512, 1024, 2048]), (65536, 1, [256, 512, 1024, 2048]),
         (131072, 1, [1024, 2048, 4096]), (16384, 8, [256, 512, 1024, 2048]), (65536, 8, [512, 1024, 2048, 4096])]  # fmt: skip


def use_source(part=None):
    """Build the kernels from the package source, or with PARTS[part] edited out."""
    texts = {}
    for fname, old, new in PARTS[part] if part else []:
        text = texts.get(fname, ORIG(fname))
        if old not in text:
            raise SystemExit(f"{part}: the kernel source no longer contains the text this variant removes")
        texts[fname] = text.replace(old, new)
    kernels._text = (lambda n: texts.get(n) or ORIG(n)) if texts else ORIG
    kernels._kernel.cache_clear()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--parts", action="store_true")
    a = p.parse_args()
    if kernels.backend() is None:
        raise SystemExit("no GPU back-end: the fused kernels cannot run here")
    res = dict(sweep=[], parts=[])
    for t, b, splits in SWEEP if a.sweep else []:
        q = mx.random.normal((b, 32, 1, 128)).astype(mx.float16)
        k = mx.random.normal((b, 8, t, 128)).astype(mx.float16)
        row = dict(tokens=t, batch=b, fp16_us=1e6 * bench.latency(lambda x: mx.fast.scaled_dot_product_attention(x, k, k, scale=0.1), q))
        del k
        times = bench.bench_splits(t, b, splits, log=lambda *_: None)["times"]  # seconds, "default" first
        row |= {f"split_{st}_us": 1e6 * v for st, v in times.items()}
        print(json.dumps(row), flush=True)
        res["sweep"].append(row)
    for t, b in [(4096, 1), (65536, 1), (65536, 8)] if a.parts else []:
        q = mx.random.normal((b, 32, 1, 128)).astype(mx.float16)
        c = bench.make_cache(b, 8, 128, t, 2, 2)
        row = dict(tokens=t, batch=b)
        for part in [None, *PARTS]:
            use_source(part)
            row[f"{part or 'whole'}_us"] = 1e6 * bench.latency(lambda x: bench.kernel_call(c, x, 0.1), q)
        use_source(None)
        print(json.dumps(row), flush=True)
        res["parts"].append(row)
    out = os.environ.get("OUT", "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "kernel_breakdown.json"), "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
