# Copyright © 2026 mlx-patternkv authors.
"""PatternKVCache with its flushes routed through the fused flush kernel (kernels.flush), on Linux
without a GPU: kernels.backend is patched to say "metal" and every kernel launch runs the generated
Metal source compiled with clang++ against the shim of test_kernels_metal.py (threadgroups on the CPU,
outputs poisoned first). A cache fed through the kernel must hold exactly the bytes of a cache fed the
same tokens through the portable MLX-ops path, after every update. Every test name contains `metal`.

The cache is driven directly (update_and_fetch + _commit), never through attention, so the decode
kernel is not involved (a launch of any kernel but "flush" fails the test).
"""

import mlx.core as mx
import numpy as np
import pytest

from mlx_patternkv import PatternKVCache, PatternKVConfig, kernels
from test_kernels_metal import emulate, metal_source, to_np
from test_kernels_metal import pytestmark  # noqa: F401  (needs clang++: skipped without it, outside CI)

FIELDS = (
    "k_bank", "k_idx", "k_codes", "k_scales", "k_mins",
    "v_bank", "v_idx", "v_codes", "v_scales", "v_mins", "k_win", "v_win",
)  # fmt: skip
COUNTERS = ("offset", "n_quant", "n_win", "n_kpat", "n_vpat", "k_mined", "v_mined", "first_flush")


@pytest.fixture
def metal_flush(monkeypatch):
    """kernels.backend() answers state["backend"]; launches run emulated. Returns (state, launches)."""
    state = {"backend": None}
    launches = []

    def launch(be, name, inputs, template, grid, threadgroup, output_shapes, output_dtypes, poison=None):
        assert be == "metal" and name == "flush", f"unexpected launch of {name} on {be}"
        src = metal_source(name, inputs, template, grid, threadgroup, output_shapes, output_dtypes)
        launches.append(name)
        return emulate(src, inputs, output_shapes, output_dtypes, grid, threadgroup, poison)

    monkeypatch.setattr(kernels, "_launch", launch)
    monkeypatch.setattr(kernels, "_POISON", True)
    monkeypatch.setattr(kernels, "backend", lambda: state["backend"])
    return state, launches


def kv(rng, b, h, n, d, dtype=np.float16):
    """Keys / values with pattern structure (a few shared directions), an outlier and a constant
    channel, and some constant value vectors (zero range: gate off, scale 0)."""
    base = rng.standard_normal((b, h, 6, d)).astype(np.float32) * 2
    pick = lambda: np.take_along_axis(base, rng.integers(0, 6, (b, h, n))[..., None], axis=2)  # noqa: E731
    k = pick() + 0.3 * rng.standard_normal((b, h, n, d))
    k[..., 3] *= 8
    k[..., 9] = 0.75
    v = pick() + 0.4 * rng.standard_normal((b, h, n, d)) * rng.uniform(0.5, 2, (b, h, 1, d))
    v[:, :, ::13] = -1.5
    return mx.array(k.astype(dtype)), mx.array(v.astype(dtype))


def raw(a: mx.array) -> np.ndarray:
    """The array's bytes, as unsigned integers (bit-exact comparison, NaN and -0 included)."""
    x = np.ascontiguousarray(to_np(a))
    return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def assert_identical(a: PatternKVCache, b: PatternKVCache, where: str):
    for c in COUNTERS:
        assert getattr(a, c) == getattr(b, c), f"{where}: {c} {getattr(a, c)} != {getattr(b, c)}"
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f"{where}: {f} is None in one cache only"
        if x is None:
            continue
        assert x.shape == y.shape and x.dtype == y.dtype, f"{where}: {f} {x.shape} {x.dtype} vs {y.shape} {y.dtype}"
        np.testing.assert_array_equal(raw(x), raw(y), err_msg=f"{where}: {f}")


def expected_launches(cfg: PatternKVConfig, chunks, d: int) -> int:
    """Flush launches the cache must make: one per part (K, V) and flush that the kernel takes (a flush of
    one window that is a later flush, or any such flush of a part without patterns), more when the new
    centres exceed threadgroup memory. Multi-window (prefill) flushes take the portable path."""
    w, g, ngc = cfg.window, cfg.group_size, kernels.CENTER_FLOATS // d
    n_win = n_quant = count = 0
    n_pat = {"k": 0, "v": 0}
    for n in chunks:
        total = n_win + n
        nf = total // w * w
        if nf:
            ng = nf // g
            for part, mined in (("k", cfg.k_patterns), ("v", cfg.v_patterns)):
                if mined and n_quant == 0:
                    n_pat[part] = min(mined, total)  # k-means on the portable path
                    continue
                grow = max(0, min(cfg.max_patterns - n_pat[part], ng)) if mined else 0
                if nf == w:
                    count += 1 if grow <= ngc else -(-ng // ngc)
                n_pat[part] += grow
            n_quant += nf
        n_win = total - nf
    return count


def run_both(state, cfg, chunks, b=2, h=2, d=64, seed=0, in_dtype=np.float16):
    """Feed the same chunks to a portable cache and a kernel cache; compare after every update."""
    rng = np.random.default_rng(seed)
    portable, fused = PatternKVCache(cfg), PatternKVCache(cfg)
    for step, n in enumerate(chunks):
        k, v = kv(rng, b, h, n, d, in_dtype)
        for cache, be in ((portable, None), (fused, "metal")):
            state["backend"] = be
            cache.update_and_fetch(k, v)
            cache._commit()
            mx.eval([a for a in cache._arrays() if a is not None])
        state["backend"] = None
        assert_identical(portable, fused, f"after chunk {step} ({n} tokens)")
    return portable, fused


CASES = {
    # prompt past the first flush (k-means), then decode steps crossing two flush boundaries; gate on
    "decode_2bit_gate": (PatternKVConfig(k_bits=2, v_bits=2, group_size=32, window=32, k_patterns=8, v_patterns=8), [40] + [1] * 58),
    # chunked prefill (multi-window flushes: portable) mixed with window flushes of two groups (the bank
    # grows group by group inside the kernel); gate off
    "chunked_3bit_nogate": (PatternKVConfig(k_bits=3, v_bits=3, group_size=64, window=128, k_patterns=16, v_patterns=4, v_gate=False), [200, 300, 1, 60, 70, 128]),
    # the bank cap is hit inside a 2-group window flush (K 7 -> 8), V reaches it exactly (6 -> 8), later
    # flushes at the cap; bfloat16 storage
    "cap_inside_flush_bf16": (PatternKVConfig(k_bits=2, v_bits=3, group_size=32, window=64, k_patterns=5, v_patterns=6, max_patterns=8, dtype="bfloat16"), [64, 64, 64, 64]),
    # patterns off (KIVI): every flush, the first included, goes through the kernel; float32 storage
    "kivi_2_3bit_f32": (PatternKVConfig(k_bits=2, v_bits=3, group_size=32, window=32, k_patterns=0, v_patterns=0, dtype="float32"), [50, 1, 13, 1, 40]),
    # K without patterns, V mined with a gate: K fused from the start, V from the second flush
    "mixed_kivi_k": (PatternKVConfig(k_bits=3, v_bits=2, group_size=32, window=64, k_patterns=0, v_patterns=8), [70, 1, 60, 64]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_metal_flush_wired_matches_portable(metal_flush, name):
    state, launches = metal_flush
    cfg, chunks = CASES[name]
    portable, fused = run_both(state, cfg, chunks, seed=len(name))
    want = expected_launches(cfg, chunks, 64)
    assert want > 0 and launches.count("flush") == want, (launches.count("flush"), want)
    assert fused.n_quant > fused.first_flush or not (cfg.k_patterns and cfg.v_patterns)  # a later flush happened
    if cfg.v_patterns and cfg.v_gate:  # the gate was exercised both ways in the fused flushes
        vi = to_np(fused.v_idx)[:, :, fused.first_flush : fused.n_quant]
        assert (vi == 255).any() and (vi != 255).any()
    if cfg.max_patterns < 255:
        assert fused.n_kpat == fused.n_vpat == cfg.max_patterns


def test_metal_flush_wired_more_centres_than_threadgroup_memory(metal_flush):
    """A 17-group window at head_dim 256 (threadgroup memory holds 16 centres): kernels.flush launches
    twice per part, growing the bank in between; the cache still matches the portable path."""
    state, launches = metal_flush
    d = 256
    assert kernels.CENTER_FLOATS // d == 16
    cfg = PatternKVConfig(k_bits=2, v_bits=2, group_size=32, window=17 * 32, k_patterns=4, v_patterns=4)
    chunks = [17 * 32, 17 * 32 + 7]
    run_both(state, cfg, chunks, b=1, h=1, d=d, seed=5)
    assert launches.count("flush") == expected_launches(cfg, chunks, d) == 4


def test_metal_flush_wired_unsupported_shape_stays_portable(metal_flush):
    """head_dim 96 is not a kernel shape: every flush takes the portable path, no launch."""
    state, launches = metal_flush
    cfg = PatternKVConfig(k_bits=2, v_bits=2, group_size=32, window=32, k_patterns=4, v_patterns=0)
    run_both(state, cfg, [40, 30], b=1, h=2, d=96, seed=6)
    assert launches == []


def test_metal_flush_wired_portable_env_forces_mlx_ops(monkeypatch):
    """MLX_PATTERNKV_PORTABLE=1 wins over a GPU back-end: with kernels.backend() itself (device and
    Metal availability faked, launches emulated), no launch with the variable set, launches without."""
    launches = []

    def launch(be, name, inputs, template, grid, threadgroup, output_shapes, output_dtypes, poison=None):
        assert be == "metal" and name == "flush"
        src = metal_source(name, inputs, template, grid, threadgroup, output_shapes, output_dtypes)
        launches.append(name)
        return emulate(src, inputs, output_shapes, output_dtypes, grid, threadgroup, poison)

    class FakeGPU:
        type = mx.DeviceType.gpu

    monkeypatch.setattr(kernels, "_launch", launch)
    monkeypatch.setattr(kernels.mx, "default_device", lambda: FakeGPU())
    monkeypatch.setattr(kernels.mx.metal, "is_available", lambda: True)
    cfg = PatternKVConfig(k_bits=4, v_bits=2, group_size=32, window=32, k_patterns=4, v_patterns=4)
    caches = {}
    for env in ("1", "0"):
        monkeypatch.setenv("MLX_PATTERNKV_PORTABLE", env)
        assert kernels.backend() == (None if env == "1" else "metal")
        rng = np.random.default_rng(8)
        caches[env] = cache = PatternKVCache(cfg)
        for n in (40, 30):
            cache.update_and_fetch(*kv(rng, 1, 2, n, 64))
        cache._commit()
        if env == "1":
            assert launches == []
    assert launches == ["flush", "flush"]  # the second flush, K and V
    assert_identical(caches["1"], caches["0"], "portable env vs kernel")
