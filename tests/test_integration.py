"""PatternKV inside mlx-lm: the right layers get it, greedy decoding at 8 bits matches the FP16 cache,
generate / stream_generate / speculative decoding / prompt-cache files / trim / deepcopy work."""

import copy
import warnings

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.generate import generate_step, speculative_generate_step
from mlx_lm.models import cache as mlx_cache

from mlx_patternkv import PatternKVCache, PatternKVConfig, install, load, make_prompt_cache
from tiny_models import CONFIGS, save_tiny, tiny_model

CFG8 = PatternKVConfig(k_bits=8, v_bits=8, group_size=32, window=64)
NEAR_TIE = 0.05  # logit gap under which a different argmax is a tie, not an error


def plain_cache(model):
    """The caches mlx-lm would make without PatternKV."""
    make = getattr(type(model), "make_cache", None)
    return make(model) if make else [mlx_cache.KVCache() for _ in model.layers]


def assert_greedy_equal(model, prompt, ref, out):
    """out equals the FP16-cache greedy tokens ref up to the first near-tie of the reference."""
    logits = teacher_forced(model, plain_cache(model), mx.concatenate([prompt, mx.array(ref)]), len(prompt))
    top2 = np.sort(np.array(logits), axis=-1)[:, -2:]
    ties = np.where(top2[:, 1] - top2[:, 0] < NEAR_TIE)[0]
    upto = ties[0] if len(ties) else len(ref)
    assert upto >= 10, "the test needs a reference with a few clear tokens"
    assert out[:upto] == ref[:upto]


def teacher_forced(model, cache, tokens, n_prompt, chunk=64):
    """Logits for every position after the prompt, prefilled in chunks, then one token at a time."""
    out = []
    for i in range(0, n_prompt, chunk):
        logits = model(tokens[None, i : min(i + chunk, n_prompt)], cache=cache)
        mx.eval(logits, [c.state for c in cache])
    out.append(logits[0, -1:])
    for i in range(n_prompt, len(tokens) - 1):
        logits = model(tokens[None, i : i + 1], cache=cache)
        mx.eval(logits)
        out.append(logits[0, -1:])
    return mx.concatenate(out)  # [n_decode, vocab]


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_caches_and_greedy_8bit(arch):
    model = tiny_model(arch)
    rng = np.random.default_rng(0)
    prompt = mx.array(rng.integers(0, 256, 200))
    # FP16 (here fp32) greedy reference
    ref = [int(t) for t, _ in generate_step(prompt, model, max_tokens=100, prompt_cache=plain_cache(model), prefill_step_size=64)]
    tokens = mx.concatenate([prompt, mx.array(ref)])
    ref_logits = teacher_forced(model, plain_cache(model), tokens, len(prompt))

    install(model, CFG8)
    cache = make_prompt_cache(model)
    kinds = [type(c).__name__ for c in cache]
    if arch == "gemma3_text":  # sliding layers keep their rotating cache
        assert kinds == ["RotatingKVCache", "RotatingKVCache", "PatternKVCache"]
    else:
        assert kinds == ["PatternKVCache"] * len(cache)
    got = teacher_forced(model, cache, tokens, len(prompt))
    pkv = [c for c in cache if isinstance(c, PatternKVCache)]
    assert pkv[0].n_quant >= 256  # decode ran over a compressed history
    top2 = mx.sort(ref_logits, axis=-1)[:, -2:]
    margin = np.array(top2[:, 1] - top2[:, 0])
    agree = np.array(got.argmax(-1)) == np.array(ref)
    assert np.all(agree | (margin < NEAR_TIE)), f"greedy token differs at {np.where(~agree)[0]} with margins {margin[~agree]}"
    assert agree.mean() >= 0.9


def test_generate_stream_generate_and_load(tmp_path):
    path = save_tiny(tmp_path / "tiny", "llama")
    model, tok = load(str(path))  # FP16 cache: nothing installed
    assert not hasattr(model, "_patternkv_config")
    prompt = "the quick brown fox jumps over the lazy dog " * 6
    ref = [r.token for r in mlx_lm.stream_generate(model, tok, prompt, max_tokens=80)]
    model, tok = load(str(path), CFG8)
    cache = mlx_lm.models.cache.make_prompt_cache(model)  # mlx-lm's own function reaches our caches
    assert all(isinstance(c, PatternKVCache) for c in cache)
    text = mlx_lm.generate(model, tok, prompt, max_tokens=80, prompt_cache=cache)
    assert cache[0].offset > 128 and cache[0].n_quant > 0
    stream = list(mlx_lm.stream_generate(model, tok, prompt, max_tokens=80))
    assert "".join(r.text for r in stream) == text  # generate and stream_generate agree
    out = [r.token for r in stream]
    assert_greedy_equal(model, mx.array(tok.encode(prompt)), ref, out)


def test_speculative_decoding_with_trims():
    model = tiny_model("llama")
    draft = tiny_model("llama", seed=1)  # a different model: many rejections, many trims
    prompt = mx.array(np.random.default_rng(1).integers(0, 256, 150))
    ref = [int(t) for t, _ in generate_step(prompt, model, max_tokens=90, prompt_cache=plain_cache(model))]
    install(model, CFG8)
    cache = make_prompt_cache(model)
    out = [int(t) for t, _, _ in speculative_generate_step(prompt, model, draft, num_draft_tokens=3, max_tokens=90, prompt_cache=cache + plain_cache(draft))]
    assert cache[0].offset == len(prompt) + len(out) - 1
    assert_greedy_equal(model, prompt, ref, out)


def test_prompt_cache_file_trim_and_deepcopy(tmp_path):
    model = tiny_model("qwen3")
    install(model, PatternKVConfig(k_bits=2, v_bits=3, group_size=32, window=32))
    prompt = mx.array(np.random.default_rng(2).integers(0, 256, (1, 170)))
    cache = make_prompt_cache(model)
    model(prompt[:, :100], cache=cache)
    model(prompt[:, 100:], cache=cache)
    copied = copy.deepcopy(cache)
    mlx_lm.models.cache.save_prompt_cache(str(tmp_path / "c.safetensors"), cache, {"k": "v"})
    loaded, meta = mlx_lm.models.cache.load_prompt_cache(str(tmp_path / "c.safetensors"), return_metadata=True)
    assert meta == {"k": "v"} and all(isinstance(c, PatternKVCache) for c in loaded)
    nxt = mx.array([[7, 8, 9]])
    want = model(nxt, cache=cache)
    for other in (loaded, copied):
        np.testing.assert_array_equal(np.array(model(nxt, cache=other)), np.array(want))
    # trim the 3 tokens again: the next logits equal the untrimmed cache's
    assert mlx_lm.models.cache.trim_prompt_cache(cache, 3) == 3
    np.testing.assert_array_equal(np.array(model(nxt, cache=cache)), np.array(want))
    assert cache[0].nbytes == sum(a.nbytes for a in cache[0]._arrays() if a is not None)


def test_corrupt_prompt_cache_file(tmp_path):
    model = tiny_model("llama")
    install(model, CFG8)
    cache = make_prompt_cache(model)
    model(mx.array([list(range(100))]), cache=cache)
    f = str(tmp_path / "c.safetensors")
    mlx_lm.models.cache.save_prompt_cache(f, cache)
    arrays, meta = mx.load(f, return_metadata=True)
    arrays = {k: (v[..., :-1] if k.endswith(".2") else v) for k, v in arrays.items()}  # truncate K codes
    mx.save_safetensors(f, arrays, meta)
    with pytest.raises(ValueError, match="corrupt or mismatched PatternKV cache state"):
        mlx_lm.models.cache.load_prompt_cache(f)


def test_unsupported_layers_keep_kvcache_with_one_warning():
    # MLA latents (deepseek_v3) and a head_dim that is not a multiple of 32
    mla = tiny_model.__globals__["importlib"].import_module("mlx_lm.models.deepseek_v3")
    args = mla.ModelArgs(
        vocab_size=64, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, n_routed_experts=None, kv_lora_rank=32, q_lora_rank=None,
        qk_rope_head_dim=16, v_head_dim=32, qk_nope_head_dim=32, max_position_embeddings=512,
    )  # fmt: skip
    for model in (mla.Model(args), tiny_model("llama", head_dim=48)):
        install(model, CFG8)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            cache = make_prompt_cache(model)
            make_prompt_cache(model)
        assert [type(c) for c in cache] == [mlx_cache.KVCache] * len(cache)
        assert len(w) == 1 and "keep a plain KVCache" in str(w[0].message)
        out = model(mx.array([[1, 2, 3]]), cache=cache)  # and it still runs
        assert out.shape[1] == 3
