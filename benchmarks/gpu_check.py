# Copyright © 2026 mlx-patternkv authors.
"""Everything the fused kernels need checked on a GPU, in one run (see ../shared/device/README.md):

1. decode attention, kernels vs the portable path (attention.compressed_attention, per sequence) and
   vs a float64 numpy reference, with poisoned outputs (NaN before the kernels run): head_dim
   64/128/256, GQA 1-8, bits 2/3/4/8 (K and V apart), K groups 32/64/128, patterns on/off, batch 1
   and 4 with different lengths per sequence, including 0 quantized and 0 window tokens;
2. flush, kernels vs a numpy reference and vs the later-flush path of cache.py (poison 253);
3. timings: benchmarks/attention.py side by side, the split size, the flush.
Prints a short table last and writes everything to $OUT/gpu_check.json (or ./gpu_check.json).

    python benchmarks/gpu_check.py [--quick]
"""

import argparse
import json
import os
import sys
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import mlx.core as mx  # noqa: E402

import attention as bench  # noqa: E402
from mlx_patternkv import kernels  # noqa: E402
from mlx_patternkv.config import PatternKVConfig  # noqa: E402
from test_kernels_metal import f32, random_cache, ref_decode, ref_flush, ref_quantize, run_decode, to_np, unpack  # noqa: E402

OUT = os.environ.get("OUT", ".")
RESULT = {"env": {}, "decode": [], "flush": [], "bench": {}, "errors": []}


def log(*a):
    print(*a, flush=True)


def portable(c, nq, nw, scale, cfg):
    """The portable path, one sequence at a time (it takes one length for the whole batch)."""
    from types import SimpleNamespace

    from mlx_patternkv.attention import compressed_attention

    outs = []
    for bi in range(c.q.shape[0]):
        s = slice(bi, bi + 1)
        cut = lambda a: None if a is None else a[s]  # noqa: E731
        # nothing quantized: the portable path attends over the dense history, the window and new rows
        dense = None
        if nq[bi] == 0:
            dense = tuple(mx.concatenate([w[s, :, : nw[bi]], new[s]], axis=2) for w, new in ((c.k_win, c.k_new), (c.v_win, c.v_new)))
        cache = SimpleNamespace(
            _fetched=dense,
            config=cfg, pending=(c.k_new[s], c.v_new[s]), offset=nq[bi] + nw[bi] + c.k_new.shape[2],
            n_quant=nq[bi], n_win=nw[bi], k_bank=cut(c.k_bank), k_idx=cut(c.k_idx), k_codes=cut(c.k_codes),
            k_scales=cut(c.k_scales), k_mins=cut(c.k_mins), v_bank=cut(c.v_bank), v_idx=cut(c.v_idx),
            v_codes=cut(c.v_codes), v_scales=cut(c.v_scales), v_mins=cut(c.v_mins), k_win=cut(c.k_win),
            v_win=cut(c.v_win),
        )  # fmt: skip
        outs.append(compressed_attention(c.q[s], cache, scale=scale))
    return mx.concatenate(outs, axis=0)


def decode_cases(quick):
    """(variants, [length sets]): each variant compiles once and runs every length set."""
    q16, bf = mx.float16, mx.bfloat16
    cases = [
        # D, R, K bits, V bits, K group, K patterns, V patterns, q dtype
        (128, 4, 2, 2, 128, True, True, q16),
        (128, 4, 4, 4, 128, True, True, q16),
        (256, 8, 3, 8, 64, True, True, bf),
        (256, 2, 8, 3, 128, False, True, q16),
        (64, 3, 4, 2, 32, True, False, q16),
        (64, 3, 2, 2, 128, True, True, q16),
        (128, 1, 3, 4, 64, False, False, bf),
        (64, 5, 2, 3, 128, True, True, q16),
        (128, 8, 8, 2, 32, True, True, q16),
    ]
    cases = [dict(zip(("d", "r", "kb", "vb", "g", "kp", "vp", "qdt"), c)) for c in cases]
    if quick:
        cases = cases[:3]
    lengths = [
        # (n_quant per sequence, n_win per sequence, new tokens); batch = len(n_quant)
        ([3 * 128, 11 * 128, 0, 7 * 128], [127, 0, 1, 64], 1),  # batch 4: 0 quantized, 0 window, all differ
        ([0], [37], 2),  # nothing quantized, two new tokens
        ([9 * 128], [0], 1),  # batch 1, empty window
        ([20000 + 77, 3000], [5, 128], 1),  # many splits, partial tiles
    ]
    return cases, lengths


def check_decode(quick, deadline=float("inf")):
    cases, lengths = decode_cases(quick)
    kernels._POISON = True
    worst = 0.0
    for case in cases:
        d, r, kb, vb, g = case["d"], case["r"], case["kb"], case["vb"], case["g"]
        for (nq, nw, ln), tpl in [(lens, tpl) for lens in lengths for tpl in (4, 8)]:
            if time.time() > deadline:
                if "decode checks stopped at the deadline" not in RESULT["errors"]:
                    RESULT["errors"].append("decode checks stopped at the deadline")
                break
            b, h = len(nq), 2
            rng = np.random.default_rng(len(RESULT["decode"]))
            cfg = PatternKVConfig(k_bits=kb, v_bits=vb, group_size=g, window=128)
            tcap = max(1024, -(-max(nq) // 1024) * 1024)
            c = random_cache(rng, b, h, r, d, kb, vb, g, tcap, 128, ln, 37, 33, nq, mx.float16, case["qdt"],
                             case["kp"], case["vp"], gv=cfg.v_group_size(d))  # fmt: skip
            scale = d**-0.5
            rec = dict(case, qdt=str(case["qdt"]), nq=nq, nw=nw, ln=ln, lane_tokens=tpl)
            try:
                got = f32(run_decode(kernels.backend(), c, nq, nw, scale, None, tpl)).astype(np.float64)
                want = ref_decode(c, nq, nw, scale)
                top = np.abs(want).max()
                rec["err_ref"] = float(np.abs(got - want).max() / top)
                rec["finite"] = bool(np.isfinite(got).all())
                try:
                    port = f32(portable(c, nq, nw, scale, cfg)).astype(np.float64)
                    rec["err_portable"] = float(np.abs(got - port).max() / top)
                    rec["err_portable_ref"] = float(np.abs(port - want).max() / top)
                except Exception as e:
                    rec["portable_error"] = str(e)[:200]
                tol = 2e-2 if case["qdt"] == mx.bfloat16 else 4e-3
                rec["ok"] = rec["finite"] and rec["err_ref"] < tol and rec.get("err_portable", 1.0) < 2 * tol
                worst = max(worst, rec["err_ref"])
            except Exception as e:
                rec["ok"] = False
                rec["error"] = traceback.format_exc()[-1500:]
            RESULT["decode"].append(rec)
            if not rec["ok"]:
                log("DECODE FAIL", json.dumps(rec)[:2000])
    kernels._POISON = False
    n_ok = sum(r["ok"] for r in RESULT["decode"])
    log(f"decode: {n_ok}/{len(RESULT['decode'])} ok, worst relative error vs fp64 reference {worst:.2e}")


def check_flush(quick, deadline=float("inf")):
    from mlx_patternkv import patterns
    from mlx_patternkv.quantize import quantize

    kernels._POISON = True
    cases = [
        # values, bits, d, g, gv, n, n_pat, max_p, gate
        (False, 2, 128, 128, 128, 128, 200, 255, None),
        (True, 2, 128, 128, 128, 128, 200, 255, 1.645),
        (False, 3, 64, 64, 64, 256, 20, 255, None),
        (True, 3, 256, 128, 128, 384, 30, 31, 1.645),
        (False, 4, 256, 32, 32, 96, 0, 255, None),
        (True, 8, 64, 128, 64, 128, 7, 255, None),
        (True, 4, 128, 128, 128, 40 * 128, 100, 255, 1.645),  # more groups than threadgroup memory holds
    ]
    if quick:
        cases = cases[:3]
    for values, bits, d, g, gv, n, n_pat, max_p, gate in cases:
        if time.time() > deadline:
            RESULT["errors"].append("flush checks stopped at the deadline")
            break
        rec = dict(values=values, bits=bits, d=d, g=g, gv=gv, n=n, n_pat=n_pat, max_p=max_p, gate=gate)
        try:
            rng = np.random.default_rng(n + d + bits)
            b, h = 2, 3
            xn = (rng.standard_normal((b, h, n + 5, d)) * rng.uniform(0.2, 3, (1, 1, 1, d))).astype(np.float32)
            x = mx.array(xn)
            bank = mx.array(rng.standard_normal((b, h, 256, d)).astype(np.float16)) if n_pat else None
            idx, codes, scales, mins, centers = kernels.flush(
                x, bank, n_pat, n, bits=bits, group_size=g, values=values, v_group_size=gv, max_patterns=max_p,
                gate_z=gate, dtype=mx.float16, x_start=5,
            )  # fmt: skip
            ridx, res, rcen = ref_flush(xn, f32(bank) if bank is not None else None, n_pat, n, bits, g, values, gv, max_p, gate, 5)
            rec["idx_mismatch"] = int((to_np(idx) != ridx).sum())
            if values:
                q, s, m = ref_quantize(res.reshape(b, h, n, d // gv, gv), bits)
            else:
                q, s, m = ref_quantize(res.reshape(b, h, n // g, g, d).transpose(0, 1, 4, 2, 3), bits)
            rec["code_mismatch"] = int((unpack(to_np(codes), bits).reshape(q.shape) != q).sum())
            rec["scale_mismatch"] = int((f32(scales) != s.reshape(f32(scales).shape)).sum())
            rec["min_mismatch"] = int((f32(mins) != m.reshape(f32(mins).shape)).sum())
            rec["center_mismatch"] = int((f32(centers) != rcen).sum())
            if not values and n_pat and n <= 512:  # the cache's own later-flush path
                rows = b * h
                xk = x[:, :, 5 : 5 + n].reshape(rows, n, d)
                valid = bank[:, :, :n_pat].reshape(rows, n_pat, d)
                new, k_idx = patterns.grow_and_assign(xk, valid, g, max_p)
                rk, _ = patterns.residuals(xk, mx.concatenate([valid, new], axis=1), k_idx)
                wc, ws, wm = quantize(rk.reshape(b, h, n, d).swapaxes(-1, -2), bits, g, mx.float16)
                rec["cache_path_idx_mismatch"] = int((to_np(idx).reshape(rows, n) != to_np(k_idx)).sum())
                rec["cache_path_code_words_mismatch"] = int((to_np(codes) != to_np(wc)).sum())
            bad = sum(v for k, v in rec.items() if k.endswith("mismatch"))
            rec["ok"] = bad == 0
        except Exception:
            rec["ok"] = False
            rec["error"] = traceback.format_exc()[-1500:]
        RESULT["flush"].append(rec)
        if not rec["ok"]:
            log("FLUSH FAIL", json.dumps(rec)[:2000])
    kernels._POISON = False
    log(f"flush: {sum(r['ok'] for r in RESULT['flush'])}/{len(RESULT['flush'])} ok")


def save():
    with open(os.path.join(OUT, "gpu_check.json"), "w") as fh:
        json.dump(RESULT, fh, indent=1, default=str)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="fewer cases and lengths")
    p.add_argument("--skip-checks", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--budget", type=float, default=540, help="seconds: later steps are skipped past it")
    a = p.parse_args()
    be = kernels.backend()
    RESULT["env"] = dict(mlx=mx.__version__, device=str(mx.default_device()), backend=be)
    log(json.dumps(RESULT["env"]))
    if be is None:
        raise SystemExit("no GPU back-end")
    t0 = time.time()
    if not a.skip_checks:
        for step, share in ((check_decode, 0.25), (check_flush, 0.32)):
            try:
                step(a.quick, t0 + share * a.budget)
            except Exception:
                RESULT["errors"].append(traceback.format_exc()[-2000:])
                log(RESULT["errors"][-1])
            save()
    RESULT["env"]["check_s"] = time.time() - t0
    if not a.skip_bench:
        try:
            bw = bench.copy_bandwidth()
            RESULT["bench"]["copy_bandwidth"] = bw
            log(f"copy bandwidth (read + write) {bw / 1e12:.2f} TB/s")
            lengths = [4096, 65536] if a.quick else [4096, 16384, 65536, 131072]
            RESULT["bench"]["overheads"] = bench.bench_overheads(log=log)
            RESULT["bench"]["splits"] = [
                bench.bench_splits(4096, 1, [1024, 2048], log=log),
                bench.bench_splits(65536, 1, [1024, 2048, 4096], log=log),
                bench.bench_splits(65536, 8, [1024, 2048, 4096, 8192], log=log),
            ]
            save()
            RESULT["bench"]["flush"] = [bench.bench_flush(1, log=log), bench.bench_flush(8, log=log)]
            save()
            RESULT["bench"]["attention"] = rows = []
            try:
                rows += bench.bench_attention(lengths, [1], log=log, deadline=t0 + 0.8 * a.budget)
                rows += bench.bench_attention(lengths, [8], log=log, deadline=t0 + 0.95 * a.budget)
            except bench.DeviceError as e:
                RESULT["errors"].append(f"device fault, benchmark stopped: {e}"[:2000])
                log(RESULT["errors"][-1])
        except Exception:
            RESULT["errors"].append(traceback.format_exc()[-2000:])
            log(RESULT["errors"][-1])
    RESULT["env"]["total_s"] = time.time() - t0
    save()
    table()


def table():
    """The short table, last."""
    bw = RESULT["bench"].get("copy_bandwidth")
    dec = RESULT["decode"]
    log("\n=== correctness")
    log(f"decode cases ok {sum(r['ok'] for r in dec)}/{len(dec)}; worst err vs fp64 ref "
        f"{max([r.get('err_ref', 0) for r in dec] or [0]):.2e}, vs portable {max([r.get('err_portable', 0) for r in dec] or [0]):.2e}")  # fmt: skip
    log(f"flush cases ok {sum(r['ok'] for r in RESULT['flush'])}/{len(RESULT['flush'])}")
    rows = RESULT["bench"].get("attention") or []
    if rows:
        log(f"\n=== decode attention, 32q/8kv heads, D 128 (us per call); copy bw {bw / 1e12:.2f} TB/s (read+write)")
        log(f"{'B':>2} {'tokens':>7} {'fp16':>8} {'q2 mlx':>8} {'q4 mlx':>8} {'pkv2 k':>8} {'pkv2 p':>8} {'pkv4 k':>8} {'pkv4 p':>8} "
            f"{'fp16 bw%':>8} {'pkv2 bw%':>8} {'pkv4 bw%':>8}")  # fmt: skip
        us = lambda v: f"{v * 1e6:8.1f}" if v else f"{'-':>8}"  # noqa: E731
        for r in rows:
            pct = lambda nbytes, s: f"{100 * nbytes / s / bw:8.0f}" if s else f"{'-':>8}"  # noqa: E731
            g = r.get
            log(f"{r['batch']:>2} {r['tokens']:>7} {us(g('fp16_sdpa_s'))} {us(g('mlxlm_q2_s'))} {us(g('mlxlm_q4_s'))} "
                f"{us(g('pkv2_kernel_s'))} {us(g('pkv2_portable_s'))} {us(g('pkv4_kernel_s'))} {us(g('pkv4_portable_s'))} "
                f"{pct(g('fp16_bytes', 0), g('fp16_sdpa_s'))} {pct(g('pkv2_bytes', 0), g('pkv2_kernel_s'))} {pct(g('pkv4_bytes', 0), g('pkv4_kernel_s'))}")  # fmt: skip
    if RESULT["bench"].get("overheads"):
        log("overheads (us): " + ", ".join(f"{k}={v * 1e6:.1f}" for k, v in RESULT["bench"]["overheads"].items()))
    for f in RESULT["bench"].get("flush") or []:
        log(f"flush B={f['batch']}: K {f['k_s'] * 1e6:.1f} us, V {f['v_s'] * 1e6:.1f} us per layer (one 128-token group, 254 patterns)")
    for s in RESULT["bench"].get("splits") or []:
        log(f"split sweep B={s['batch']} {s['tokens']} tokens (us): " + ", ".join(f"{k}={v * 1e6:.1f}" for k, v in s["times"].items()))
    if RESULT["errors"]:
        log(f"{len(RESULT['errors'])} errors, see gpu_check.json")


if __name__ == "__main__":
    main()
