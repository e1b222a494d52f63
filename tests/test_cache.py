"""PatternKVCache against the plain-numpy reference (tests/reference.py): storage contents after every
update, and attention on the compressed form against dense attention over the reference's
dequantized cache."""

import copy
import zlib

import mlx.core as mx
import numpy as np
import pytest

import reference as ref
from mlx_patternkv import PatternKVCache, PatternKVConfig
from mlx_patternkv.attention import compressed_attention
from mlx_patternkv.patterns import kmeans_init

B, H, R, D = 2, 2, 3, 64

CASES = {
    # an exactly-128-token prompt, then decode steps across flushes, then a chunk
    "exact128_2bit": (PatternKVConfig(k_bits=2, v_bits=2, group_size=32, window=32, k_patterns=8, v_patterns=8), [128] + [1] * 40 + [70]),
    # chunked prefill with a window of two groups, mixed bits
    "chunked_3_4bit": (PatternKVConfig(k_bits=3, v_bits=4, group_size=64, window=128, k_patterns=16, v_patterns=4), [200, 130, 1, 1, 60]),
    # K without patterns (KIVI), V bank hitting a tiny cap
    "cap_and_kivi": (PatternKVConfig(k_bits=8, v_bits=2, group_size=32, window=64, k_patterns=0, v_patterns=5, max_patterns=7), [100, 150, 64, 1]),
    # a prompt shorter than the window: mining happens at the first flush, during decode
    "short_prompt_gate_off": (PatternKVConfig(k_bits=4, v_bits=3, group_size=128, window=128, v_gate=False), [20] + [1] * 110 + [5]),
}


def fresh_kv(rng, n):
    """fp16-representable keys/values with structure (shared directions, outlier channels) and a few
    constant vectors and a constant channel (zero-range groups)."""
    base = rng.standard_normal((B, H, 4, D)).astype(np.float32) * 2
    mix = rng.integers(0, 4, (B, H, n))
    k = np.take_along_axis(base, mix[..., None], axis=2) + 0.3 * rng.standard_normal((B, H, n, D))
    k[..., 5] *= 8  # an outlier channel
    k[..., 7] = 0.5  # a constant channel
    v = rng.standard_normal((B, H, n, D)) * rng.uniform(0.5, 2, (B, H, 1, D))
    v[:, :, ::17] = 1.25  # constant vectors
    return ref.f16(k), ref.f16(v)


def check_storage(cache, heads):
    cfg = cache.config
    q = cache.n_quant
    assert cache.offset == q + cache.n_win
    for b in range(B):
        for h in range(H):
            rh = heads[b][h]
            kw, vw = rh.dense()
            assert len(rh.window_k) == cache.n_win
            if cache.n_win:
                np.testing.assert_array_equal(np.array(cache.k_win[b, h, : cache.n_win].astype(mx.float32)), np.array(rh.window_k))
                np.testing.assert_array_equal(np.array(cache.v_win[b, h, : cache.n_win].astype(mx.float32)), np.array(rh.window_v))
            if not q:
                continue
            if cfg.k_patterns:
                np.testing.assert_allclose(np.array(cache.k_bank[b, h, : cache.n_kpat].astype(mx.float32)), np.array(rh.kbank), rtol=2e-3, atol=2e-3)
                np.testing.assert_array_equal(np.array(cache.k_idx[b, h, :q]), np.array(rh.kidx))
            if cfg.v_patterns:
                np.testing.assert_allclose(np.array(cache.v_bank[b, h, : cache.n_vpat].astype(mx.float32)), np.array(rh.vbank), rtol=2e-3, atol=2e-3)
                np.testing.assert_array_equal(np.array(cache.v_idx[b, h, :q]), np.array(rh.vidx))
            kcodes = ref.unpack(np.array(cache.k_codes[b, h]), cfg.k_bits)[:, :q]  # [D, q]
            rk = np.concatenate([c for c, _, _ in rh.kq], axis=1)
            assert np.mean(kcodes == rk) > 0.999  # equal up to rare ties at rounding boundaries
            np.testing.assert_allclose(np.array(cache.k_scales[b, h, :, : q // cfg.group_size].astype(mx.float32)), np.concatenate([s for _, s, _ in rh.kq], axis=1), rtol=2e-3, atol=1e-4)
            vcodes = ref.unpack(np.array(cache.v_codes[b, h, :q]), cfg.v_bits)
            rv = np.concatenate([c for c, _, _ in rh.vq])
            assert np.mean(vcodes == rv) > 0.999
            # the dequantized cache itself, all parts together
            k_hat, v_hat = cache.keys_and_values()
            np.testing.assert_allclose(np.array(k_hat[b, h, :q]), kw[:q], rtol=1e-3, atol=5e-3)
            np.testing.assert_allclose(np.array(v_hat[b, h, :q]), vw[:q], rtol=1e-3, atol=5e-3)


@pytest.mark.parametrize("name", list(CASES))
def test_cache_matches_reference(name):
    cfg, chunks = CASES[name]
    # A fixed seed per case (str hash() differs per process): the numpy k-means must pick exactly the
    # same clusters, and a float32 near-tie between two centroids, decided differently by the two
    # implementations' rounding, would send them apart (seen about once in ten random draws).
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    cache = PatternKVCache(cfg)

    def init_fn(b, h):
        return lambda t, k: np.array(kmeans_init(B * H, t, min(k, t), cfg.seed))[b * H + h]

    heads = [[ref.RefHead(cfg, init_fn(b, h)) for h in range(H)] for b in range(B)]
    memo = None
    for n in chunks:
        k, v = fresh_kv(rng, n)
        q = rng.standard_normal((B, H * R, n, D)).astype(np.float32)
        # dense attention over the reference's cache plus the exact new tokens
        want = np.zeros((B, H * R, n, D))
        dense = []
        for b in range(B):
            ks, vs = zip(*(heads[b][h].dense() for h in range(H)))
            kk = np.stack([np.concatenate([ks[h].reshape(-1, D), k[b, h]]) for h in range(H)])
            vv = np.stack([np.concatenate([vs[h].reshape(-1, D), v[b, h]]) for h in range(H)])
            want[b] = ref.attention(q[b], kk, vv, D**-0.5)
            dense.append((kk, vv))
        fk, fv = cache.update_and_fetch(mx.array(k), mx.array(v))
        # the returned dense K/V (one-token updates reuse the dequantized part until a flush)
        np.testing.assert_allclose(np.array(fk), np.stack([d[0] for d in dense]), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.array(fv), np.stack([d[1] for d in dense]), rtol=1e-5, atol=1e-5)
        if n == 1 and cache.n_quant:
            assert cache._qdense is not None
            if memo is not None and memo[0] == cache.n_quant:
                assert cache._qdense[2] is memo[2]  # no flush since the last step: reused
            memo = cache._qdense
        got = compressed_attention(mx.array(q), cache, D**-0.5, "causal" if n > 1 else None)
        np.testing.assert_allclose(np.array(got), want, rtol=1e-4, atol=2e-5)
        for b in range(B):
            for h in range(H):
                heads[b][h].commit(k[b, h], v[b, h])
        cache._commit()
        check_storage(cache, heads)


@pytest.mark.parametrize("n", [5, 9])  # 15 query rows per KV head: compressed form; 27: dense prefill path
def test_attention_array_mask_and_sinks(n):
    """A boolean array mask and attention sinks give what mx.fast SDPA gives on the dequantized cache."""
    cfg = PatternKVConfig(k_bits=4, v_bits=4, group_size=32, window=32, k_patterns=6, v_patterns=6)
    rng = np.random.default_rng(1)
    cache = PatternKVCache(cfg)
    k, v = fresh_kv(rng, 100)
    cache.update_and_fetch(mx.array(k), mx.array(v))
    k, v = fresh_kv(rng, n)
    kk, vv = cache.update_and_fetch(mx.array(k), mx.array(v))
    q = mx.array(rng.standard_normal((B, H * R, n, D)).astype(np.float32))
    mask = mx.array(rng.random((B, 1, n, 100 + n)) > 0.3) | (mx.arange(100 + n) == 99 + n)
    sinks = mx.array(rng.standard_normal(H * R).astype(np.float32))
    got = compressed_attention(q, cache, 0.125, mask, sinks)
    want = mx.fast.scaled_dot_product_attention(q, kk, vv, scale=0.125, mask=mask, sinks=sinks)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-5)


def test_trim_matches_a_cache_that_never_saw_the_tokens():
    """trim(n) across a flush boundary: attention afterwards equals the untrimmed cache at that point
    (the tokens moved back to the window hold their dequantized values)."""
    cfg = PatternKVConfig(k_bits=2, v_bits=2, group_size=32, window=32, k_patterns=4, v_patterns=4)
    rng = np.random.default_rng(2)
    cache = PatternKVCache(cfg)
    k, v = fresh_kv(rng, 150)
    cache.update_and_fetch(mx.array(k[:, :, :90]), mx.array(v[:, :, :90]))
    cache.update_and_fetch(mx.array(k[:, :, 90:]), mx.array(v[:, :, 90:]))
    cache._commit()
    snapshot = copy.deepcopy(cache)
    q = mx.array(rng.standard_normal((B, H * R, 1, D)).astype(np.float32))
    kn, vn = fresh_kv(rng, 1)
    # reference: the cache as it was after 90 tokens, dequantized
    full_k, full_v = snapshot.keys_and_values()
    assert cache.trim(60) == 60 and cache.offset == 90
    assert cache.n_quant == 64 and cache.n_win == 26 and cache.n_kpat == 4  # as after 90 tokens
    kk, vv = cache.update_and_fetch(mx.array(kn), mx.array(vn))
    got = compressed_attention(q, cache, 0.125, None)
    dense_k = mx.concatenate([full_k[:, :, :90], mx.array(kn)], axis=2)
    dense_v = mx.concatenate([full_v[:, :, :90], mx.array(vn)], axis=2)
    want = mx.fast.scaled_dot_product_attention(q, dense_k, dense_v, scale=0.125, mask=None)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-3, atol=2e-3)
    assert cache.trim(1000) == 91 and cache.empty() and cache.nbytes == 0


def test_state_roundtrip_and_nbytes():
    cfg = PatternKVConfig(k_bits=3, v_bits=2, group_size=32, window=64, k_patterns=8, v_patterns=8)
    rng = np.random.default_rng(3)
    cache = PatternKVCache(cfg)
    k, v = fresh_kv(rng, 200)
    cache.update_and_fetch(mx.array(k), mx.array(v))
    restored = PatternKVCache.from_state(cache.state)
    assert restored.offset == 200 and restored.config == cfg
    for a, b in zip(cache.keys_and_values(), restored.keys_and_values()):
        np.testing.assert_array_equal(np.array(a), np.array(b))
    # nbytes counts exactly the arrays held: 192 quantized tokens at capacity 1024, window of 64
    cap = 1024
    want = 2 * B * H * (
        cap * D * (3 + 2) / 8 / 2  # codes (average of K's 3 and V's 2 bits, both halves of 2*)
    )
    held = sum(a.nbytes for a in cache._arrays() if a is not None)
    assert cache.nbytes == held
    assert held > want  # scales, mins, indices, banks and window come on top


def test_bad_state_is_reported():
    cache = PatternKVCache(PatternKVConfig(window=32, group_size=32))
    rng = np.random.default_rng(4)
    k, v = fresh_kv(rng, 70)
    cache.update_and_fetch(mx.array(k), mx.array(v))
    state = list(cache.state)
    bad = list(state)
    bad[2] = bad[2][..., :-1]  # truncated K codes
    with pytest.raises(ValueError, match="corrupt or mismatched PatternKV cache state: k_codes"):
        PatternKVCache.from_state(bad)
    with pytest.raises(ValueError, match="corrupt or mismatched"):
        PatternKVCache.from_state(state[:-1] + ["{not json"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k_bits=5), "k_bits=5 is invalid: allowed one of 2, 3, 4, 8"),
        (dict(v_bits=1), "v_bits"),
        (dict(group_size=16), "group_size"),
        (dict(window=100), "window=100 is invalid: allowed a positive multiple of group_size"),
        (dict(k_patterns=300), "k_patterns"),
        (dict(max_patterns=256), "max_patterns"),
        (dict(dtype="int8"), "dtype"),
        (dict(kmeans_iters=0), "kmeans_iters"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PatternKVConfig(**kwargs)


def test_unsupported_head_dim_is_reported():
    cache = PatternKVCache()
    with pytest.raises(ValueError, match="head_dim a multiple of 32"):
        cache.update_and_fetch(mx.zeros((1, 1, 4, 80)), mx.zeros((1, 1, 4, 80)))
