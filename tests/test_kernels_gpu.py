# Copyright © 2026 mlx-patternkv authors.
"""The fused kernels on a real GPU (Metal or CUDA), against the numpy references of
test_kernels_metal.py and the portable path, with poisoned outputs. Skipped without a GPU back-end;
benchmarks/gpu_check.py runs the full sweep and the timings."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_patternkv import kernels
from mlx_patternkv.config import PatternKVConfig
from test_kernels_metal import f32, random_cache, ref_decode, ref_flush, ref_quantize, run_decode, to_np, unpack

pytestmark = pytest.mark.skipif(kernels.backend() is None, reason="no Metal or CUDA back-end")


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(kernels, "_POISON", True)


@pytest.mark.parametrize(
    "d,r,kb,vb,g,nq,nw,ln,kp,vp,qdt,tpl",
    [
        (128, 4, 2, 2, 128, [1024, 384, 0, 128], [127, 0, 5, 64], 1, True, True, mx.float16, 4),
        (128, 4, 2, 2, 128, [1024, 384, 0, 128], [127, 0, 5, 64], 1, True, True, mx.float16, 8),
        (64, 3, 3, 3, 64, [256], [0], 1, True, True, mx.bfloat16, 8),
        (256, 8, 8, 4, 32, [96, 160], [1, 31], 2, True, False, mx.float16, None),
        (128, 1, 4, 8, 128, [0], [17], 1, False, True, mx.float16, None),
    ],
)  # fmt: skip
def test_gpu_decode_matches_reference(d, r, kb, vb, g, nq, nw, ln, kp, vp, qdt, tpl):
    rng = np.random.default_rng(d * r + kb)
    cfg = PatternKVConfig(k_bits=kb, v_bits=vb, group_size=g, window=128)
    c = random_cache(rng, len(nq), 2, r, d, kb, vb, g, 1024, 128, ln, 40, 36, nq, mx.float16, qdt, kp, vp,
                     gv=cfg.v_group_size(d))  # fmt: skip
    scale = 1 / math.sqrt(d)
    got = f32(run_decode(kernels.backend(), c, nq, nw, scale, None, tpl)).astype(np.float64)
    want = ref_decode(c, nq, nw, scale)
    assert np.isfinite(got).all()
    tol = 2e-2 if qdt == mx.bfloat16 else 4e-3
    np.testing.assert_allclose(got, want, atol=tol * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize("values,bits,d,g,gv,n,n_pat,gate", [(False, 2, 128, 128, 128, 256, 100, None),
                                                             (True, 3, 64, 64, 64, 128, 9, 1.645)])  # fmt: skip
def test_gpu_flush_matches_reference(values, bits, d, g, gv, n, n_pat, gate):
    rng = np.random.default_rng(bits + d)
    b, h = 2, 2
    xn = rng.standard_normal((b, h, n, d)).astype(np.float32)
    bank = mx.array(rng.standard_normal((b, h, 128, d)).astype(np.float16))
    idx, codes, scales, mins, centers = kernels.flush(
        mx.array(xn), bank, n_pat, n, bits=bits, group_size=g, values=values, v_group_size=gv, gate_z=gate,
    )  # fmt: skip
    ridx, res, rcen = ref_flush(xn, f32(bank), n_pat, n, bits, g, values, gv, 255, gate)
    np.testing.assert_array_equal(to_np(idx), ridx)
    np.testing.assert_array_equal(f32(centers), rcen)
    if values:
        q, s, m = ref_quantize(res.reshape(b, h, n, d // gv, gv), bits)
    else:
        q, s, m = ref_quantize(res.reshape(b, h, n // g, g, d).transpose(0, 1, 4, 2, 3), bits)
    np.testing.assert_array_equal(unpack(to_np(codes), bits).reshape(q.shape), q)
    np.testing.assert_array_equal(f32(scales), s.reshape(f32(scales).shape))
    np.testing.assert_array_equal(f32(mins), m.reshape(f32(mins).shape))
