"""GGUF import: tiny GGUF files written here with gguf.GGUFWriter, converted, loaded with mlx-lm, and
checked against the same weights loaded straight into the mlx-lm model class.

The reference weights are the random weights after the quantization error of their GGUF type, decoded
here independently of `gguf.quants.dequantize` for Q4_0, Q4_1, Q8_0 and the K-quants (whose blocks are
also encoded here: the gguf package only dequantizes them). Q5_0, Q5_1 and BF16 use the gguf package's
own round trip as the reference.
"""

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize
from mlx_lm.utils import _get_classes as get_model_classes

from mlx_patternkv.gguf import GGUFError, convert_gguf

SEQ = 24

BASE = dict(
    hidden_size=256, num_hidden_layers=2, intermediate_size=512, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6, max_position_embeddings=2048,
)  # fmt: skip

# gguf architecture, general.name, reference mlx-lm config
CASES = {
    "llama": ("llama", "Tiny Llama", dict(BASE, model_type="llama", rope_theta=10000.0,
                                          tie_word_embeddings=True)),
    "mistral": ("llama", "Tiny Mistral v0.3", dict(BASE, model_type="mistral", rope_theta=1e6,
                                                   tie_word_embeddings=False)),
    "qwen2": ("qwen2", "Tiny Qwen2", dict(BASE, model_type="qwen2", rope_theta=1e6,
                                          tie_word_embeddings=False)),
    "qwen3": ("qwen3", "Tiny Qwen3", dict(BASE, model_type="qwen3", rope_theta=1e6,
                                          tie_word_embeddings=True)),
    # 6 layers: llama.cpp's fixed pattern (5 sliding, 1 global); window 8 < SEQ
    "gemma3": ("gemma3", "Tiny Gemma3", dict(BASE, model_type="gemma3_text", num_hidden_layers=6,
                                             rope_theta=1e6, rope_local_base_freq=10000.0,
                                             sliding_window=8, sliding_window_pattern=6,
                                             query_pre_attn_scalar=64, tie_word_embeddings=True)),
}  # fmt: skip

TYPES = [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.F16, Q.F32, Q.Q5_0, Q.Q5_1, Q.BF16]
MAX_ERR = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 5e-3, Q.Q8_0: 0.01, Q.Q6_K: 0.04, Q.Q5_0: 0.06,
           Q.Q5_1: 0.06, Q.Q5_K: 0.08, Q.Q4_0: 0.15, Q.Q4_1: 0.15, Q.Q4_K: 0.15}  # fmt: skip

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ---------------------------------------------------------------------------------------------------
# tokenizers


def byte_level_vocab():
    """GPT-2 style byte-level BPE: 3 control tokens, the 256 byte symbols, a few merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges = ["h e", "l l", "o r", "Ġ w", "Ġw or", "l d", "he ll", "Ġ h", "Ġh e", "Ġhe ll"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + list(bytes_to_unicode().values())
    tokens += [m.replace(" ", "") for m in merges]
    types = [3] * 3 + [1] * (len(tokens) - 3)
    return dict(model="gpt2", pre="qwen2", tokens=tokens, types=types, merges=merges,
                bos=1, eos=2, add_bos=False)  # fmt: skip


def sentencepiece_vocab():
    """Gemma style sentencepiece: specials, byte fallback tokens, letters and a few pieces."""
    pieces = ["▁", *"abcdefghijklmnopqrstuvwxyz", "▁h", "he", "ll", "▁w", "or", "ld", "▁he", "llo",
              "▁hello", "▁world"]  # fmt: skip
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tokens += [f"<0x{i:02X}>" for i in range(256)] + pieces
    types = [3, 3, 3, 2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 262 + [-float(i) for i in range(len(pieces))]
    return dict(model="llama", pre="default", tokens=tokens, types=types, scores=scores,
                bos=2, eos=1, add_bos=True)  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# quantization: (raw data for GGUFWriter, the float32 weights a correct reader must give back)


def f16_bytes(x):  # [n] -> [n, 2]
    return np.asarray(x, np.float32).astype(np.float16).view(np.uint8).reshape(-1, 2)


def f16(x):
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def decode_q4_0(raw, shape):
    b = raw.reshape(-1, 18)
    d = b[:, :2].copy().view(np.float16).astype(np.float32)  # [n, 1]
    qs = b[:, 2:]
    q = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.float32) - 8  # [n, 32]
    return (d * q).reshape(shape)


def decode_q4_1(raw, shape):
    b = raw.reshape(-1, 20)
    d = b[:, :2].copy().view(np.float16).astype(np.float32)
    m = b[:, 2:4].copy().view(np.float16).astype(np.float32)
    qs = b[:, 4:]
    q = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.float32)
    return (d * q + m).reshape(shape)


def decode_q8_0(raw, shape):
    b = raw.reshape(-1, 34)
    d = b[:, :2].copy().view(np.float16).astype(np.float32)
    q = b[:, 2:].copy().view(np.int8).astype(np.float32)
    return (d * q).reshape(shape)


def encode_q45_k(w, bits):
    """Q4_K / Q5_K blocks of 256: 8 sub-blocks of 32, 6-bit scales and mins, fp16 d and dmin."""
    rows = w.shape[0]
    x = w.reshape(-1, 8, 32).astype(np.float32)  # [n, 8, 32]
    n, nmax = x.shape[0], 2**bits - 1
    lo, hi = np.minimum(x.min(-1), 0), np.maximum(x.max(-1), 0)  # [n, 8]
    scale, mins = (hi - lo) / nmax, -lo
    d, dmin = f16(scale.max(-1) / 63), f16(mins.max(-1) / 63)  # [n]
    sc = np.clip(np.round(scale / np.maximum(d, 1e-30)[:, None]), 0, 63).astype(np.uint8)
    mn = np.clip(np.round(mins / np.maximum(dmin, 1e-30)[:, None]), 0, 63).astype(np.uint8)
    step = d[:, None] * sc.astype(np.float32)  # [n, 8]
    off = dmin[:, None] * mn.astype(np.float32)
    q = np.round((x + off[..., None]) / np.maximum(step, 1e-30)[..., None])
    q = np.clip(q, 0, nmax).astype(np.uint8)  # [n, 8, 32]
    expected = step[..., None] * q.astype(np.float32) - off[..., None]

    scales = np.zeros((n, 12), np.uint8)
    scales[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    low = q & 15
    qs = (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(n, 128)  # sub-blocks 2c / 2c+1 share bytes
    parts = [f16_bytes(d), f16_bytes(dmin), scales]
    if bits == 5:
        high = (q >> 4) & 1  # [n, 8, 32]
        qh = np.zeros((n, 32), np.uint8)
        for j in range(8):
            qh |= high[:, j] << j
        parts.append(qh)
    parts.append(qs)
    return np.concatenate(parts, axis=1).reshape(rows, -1), expected.reshape(w.shape)


def encode_q6_k(w):
    """Q6_K blocks of 256: 16 sub-blocks of 16, int8 scales, fp16 d, 6-bit codes offset by 32."""
    rows = w.shape[0]
    x = w.reshape(-1, 16, 16).astype(np.float32)  # [n, 16, 16]
    n = x.shape[0]
    scale = np.abs(x).max(-1) / 31  # [n, 16]
    d = f16(scale.max(-1) / 127)  # [n]
    sc = np.clip(np.round(scale / np.maximum(d, 1e-30)[:, None]), 0, 127).astype(np.int8)
    step = d[:, None] * sc.astype(np.float32)  # [n, 16]
    q = np.clip(np.round(x / np.maximum(step, 1e-30)[..., None]), -32, 31)
    expected = step[..., None] * q.astype(np.float32)
    q = (q + 32).astype(np.uint8).reshape(n, 256)

    low = (q & 15).reshape(n, 2, 2, 64)  # position h*128 + s*64 + b
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    high = (q >> 4).reshape(n, 2, 4, 32)  # position h*128 + k*32 + b
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6))
    parts = [ql, qh.reshape(n, 64), sc.view(np.uint8), f16_bytes(d)]
    return np.concatenate(parts, axis=1).reshape(rows, -1), expected.reshape(w.shape)


def encode(w, qtype):
    """(raw, expected) for weights w [rows, cols] stored as qtype."""
    if qtype == Q.F32:
        return w.astype(np.float32), w.astype(np.float32)
    if qtype == Q.F16:
        return w.astype(np.float16), f16(w)
    if qtype in (Q.Q4_K, Q.Q5_K):
        return encode_q45_k(w, 4 if qtype == Q.Q4_K else 5)
    if qtype == Q.Q6_K:
        return encode_q6_k(w)
    raw = quantize(w.astype(np.float32), qtype)
    decode = {Q.Q4_0: decode_q4_0, Q.Q4_1: decode_q4_1, Q.Q8_0: decode_q8_0}.get(qtype)
    expected = decode(raw, w.shape) if decode else dequantize(raw, qtype)
    return raw, expected


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_block_codecs_agree_with_gguf(qtype):
    """The blocks encoded / decoded here mean what the gguf package says they mean."""
    w = np.random.default_rng(0).normal(size=(4, 512)).astype(np.float32)
    raw, expected = encode(w, qtype)
    np.testing.assert_allclose(dequantize(raw, qtype), expected, rtol=1e-6, atol=1e-6)
    err = np.sqrt(np.mean((expected - w) ** 2) / np.mean(w**2))
    assert 0 < err < MAX_ERR[qtype]


# ---------------------------------------------------------------------------------------------------
# writing GGUF files the way llama.cpp does


def permute(w, n_heads):
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute (rows of Q / K, per head)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(name, arch):
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    layer = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
        "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
        "post_attention_layernorm": "post_attention_norm" if arch == "gemma3" else "ffn_norm",
        "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }  # fmt: skip
    base, kind = name.rsplit(".", 1)
    if base in top:
        return f"{top[base]}.{kind}"
    _, _, i, rest = base.split(".", 3)
    return f"blk.{i}.{layer[rest]}.{kind}"


def random_weights(cfg, vocab, seed=0):
    """HF / mlx-lm named float32 weights of the reference config."""
    rng = np.random.default_rng(seed)
    h, f, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    mt = cfg["model_type"]

    def lin(o, i):
        return (rng.normal(size=(o, i)) / np.sqrt(i)).astype(np.float32)

    def norm(n):
        return (1 + 0.1 * rng.normal(size=n)).astype(np.float32)

    if mt == "gemma3_text":  # mlx-lm adds 1 itself: the stored w is around 0
        norm = lambda n: (0.1 * rng.normal(size=n)).astype(np.float32)  # noqa: E731
    w = {"model.embed_tokens.weight": rng.normal(size=(vocab, h)).astype(np.float32),
         "model.norm.weight": norm(h)}  # fmt: skip
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = lin(vocab, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(h)
        w[p + "post_attention_layernorm.weight"] = norm(h)
        w[p + "self_attn.q_proj.weight"] = lin(nq * hd, h)
        w[p + "self_attn.k_proj.weight"] = lin(nkv * hd, h)
        w[p + "self_attn.v_proj.weight"] = lin(nkv * hd, h)
        w[p + "self_attn.o_proj.weight"] = lin(h, nq * hd)
        w[p + "mlp.gate_proj.weight"] = lin(f, h)
        w[p + "mlp.up_proj.weight"] = lin(f, h)
        w[p + "mlp.down_proj.weight"] = lin(h, f)
        if mt == "qwen2":
            for n, o in (("q", nq), ("k", nkv), ("v", nkv)):
                w[p + f"self_attn.{n}_proj.bias"] = (0.1 * rng.normal(size=o * hd)).astype(np.float32)
        if mt in ("qwen3", "gemma3_text"):
            w[p + "self_attn.q_norm.weight"] = norm(hd)
            w[p + "self_attn.k_norm.weight"] = norm(hd)
        if mt == "gemma3_text":
            w[p + "pre_feedforward_layernorm.weight"] = norm(h)
            w[p + "post_feedforward_layernorm.weight"] = norm(h)
    return w


def llama3_rope_freqs(base, dim, factor=8.0, low=1.0, high=4.0, old=8192):
    """llama.cpp's rope_freqs tensor for Llama 3 rope scaling (convert_hf_to_gguf.py)."""
    out = []
    for freq in 1.0 / (base ** (np.arange(0, dim, 2) / dim)):
        wavelen = 2 * np.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def write_gguf(path, arch, name, cfg, vocab, weights, type_offset=0, rope_freqs=None):
    """Write weights as llama.cpp would; returns the weights a correct reader gives back."""
    w = GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if arch == "gemma3":
        w.add_sliding_window(cfg["sliding_window"])
    w.add_tokenizer_model(vocab["model"])
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if "merges" in vocab:
        w.add_token_merges(vocab["merges"])
    if "scores" in vocab:
        w.add_token_scores(vocab["scores"])
    w.add_bos_token_id(vocab["bos"])
    w.add_eos_token_id(vocab["eos"])
    w.add_add_bos_token(vocab["add_bos"])
    w.add_chat_template(CHAT_TEMPLATE)

    expected, k = {}, type_offset
    for hf, x in weights.items():
        gname = gguf_name(hf, arch)
        stored = x
        if arch == "llama" and ".attn_q." in gname:
            stored = permute(x, cfg["num_attention_heads"])
        if arch == "llama" and ".attn_k." in gname:
            stored = permute(x, cfg["num_key_value_heads"])
        if arch == "gemma3" and gname.endswith("norm.weight"):
            stored = x + 1  # llama.cpp stores Gemma norms as 1 + w
        if x.ndim == 1:  # norms and biases stay F32, as llama.cpp keeps them
            qtype = Q.F32
        else:
            qtype, k = TYPES[k % len(TYPES)], k + 1
        raw, back = encode(stored, qtype)
        w.add_tensor(gname, raw, raw_dtype=qtype)
        # quantization is per row, so un-permuting what was read = quantizing the un-permuted rows
        if arch == "llama" and ".attn_q." in gname:
            back = permute_back(back, cfg["num_attention_heads"])
        if arch == "llama" and ".attn_k." in gname:
            back = permute_back(back, cfg["num_key_value_heads"])
        if arch == "gemma3" and gname.endswith("norm.weight"):
            back = back - 1
        expected[hf] = (back, qtype)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def permute_back(w, n_heads):
    """Inverse of `permute`, written from its definition: (h, half, 2) rows -> (h, 2, half)."""
    out = np.empty_like(w)
    half = w.shape[0] // n_heads // 2
    for h in range(n_heads):
        for j in range(half):
            for t in range(2):
                out[h * 2 * half + t * half + j] = w[h * 2 * half + j * 2 + t]
    return out


def reference_model(cfg, weights):
    model_cls, args_cls = get_model_classes(cfg)
    vocab_size = weights["model.embed_tokens.weight"].shape[0]
    model = model_cls(args_cls.from_dict(dict(cfg, vocab_size=vocab_size)))
    weights = model.sanitize({k: mx.array(v) for k, v in weights.items()})
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


# ---------------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("case", list(CASES))
def test_convert_matches_reference(case, tmp_path):
    arch, name, cfg = CASES[case]
    vocab = sentencepiece_vocab() if arch == "gemma3" else byte_level_vocab()
    weights = random_weights(cfg, len(vocab["tokens"]), seed=len(case))
    rope_freqs = None
    if case == "llama":
        rope_freqs = llama3_rope_freqs(cfg["rope_theta"], cfg["head_dim"])
        cfg = dict(cfg, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192})  # fmt: skip
    path = tmp_path / f"{case}.gguf"
    expected = write_gguf(path, arch, name, cfg, vocab, weights, type_offset=len(case),
                          rope_freqs=rope_freqs)  # fmt: skip
    for hf, (back, qtype) in expected.items():
        err = np.sqrt(np.mean((back - weights[hf]) ** 2) / np.mean(weights[hf] ** 2))
        assert err <= MAX_ERR[qtype] + 1e-6, (hf, qtype.name, err)
    if arch != "gemma3":
        assert {q for _, q in expected.values()} >= set(TYPES), "every type is exercised"

    out = convert_gguf(path, tmp_path / "mlx")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, "mlx"])  # no temp left

    config = json.loads((out / "config.json").read_text())
    for key, value in cfg.items():
        if key == "rope_theta":
            assert config[key] == pytest.approx(value)
        elif key == "rms_norm_eps":
            assert config[key] == pytest.approx(value, rel=1e-6)
        else:
            assert config[key] == value, key
    assert config["vocab_size"] == len(vocab["tokens"])

    model, tokenizer = mlx_lm.load(str(out))
    ref = reference_model(cfg, {k: b for k, (b, _) in expected.items()})
    ids = mx.array(np.random.default_rng(1).integers(0, len(vocab["tokens"]), size=(1, SEQ)))
    got, want = model(ids), ref(ids)
    assert got.dtype == mx.float32
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4)
    # and not trivially: the un-quantized weights give visibly different logits
    raw = reference_model(cfg, weights)(ids)
    assert float(mx.abs(raw - want).max()) > 1e-3

    # the tokenizer rebuilt from the metadata
    text = "hello world, xyz!"
    enc = tokenizer.encode(text)
    assert tokenizer.decode(enc, skip_special_tokens=True) == text
    assert (enc[0] == vocab["bos"]) == vocab["add_bos"]
    assert tokenizer.eos_token_id == vocab["eos"]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # generation (with the model's own caches: rotating ones for Gemma 3) runs
    text = mlx_lm.generate(model, tokenizer, "hello", max_tokens=SEQ, verbose=False)
    assert isinstance(text, str)


def test_float16_output(tmp_path):
    arch, name, cfg = CASES["qwen3"]
    vocab = byte_level_vocab()
    weights = random_weights(cfg, len(vocab["tokens"]))
    write_gguf(tmp_path / "m.gguf", arch, name, cfg, vocab, weights)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "mlx16", dtype="float16")
    w = mx.load(str(out / "model.safetensors"))
    assert all(v.dtype == mx.float16 for v in w.values())
    model, _ = mlx_lm.load(str(out))
    assert model(mx.array([[1, 2, 3]])).dtype == mx.float16


def test_sharded_output(tmp_path, monkeypatch):
    """Big models are written in several safetensors files (peak memory ~ one shard); same logits."""
    import mlx_patternkv.gguf as gguf_module

    arch, name, cfg = CASES["qwen2"]
    vocab = byte_level_vocab()
    write_gguf(tmp_path / "m.gguf", arch, name, cfg, vocab, random_weights(cfg, len(vocab["tokens"])))
    one = convert_gguf(tmp_path / "m.gguf", tmp_path / "one")
    monkeypatch.setattr(gguf_module, "SHARD_BYTES", 1 << 20)
    many = convert_gguf(tmp_path / "m.gguf", tmp_path / "many")
    files = sorted(p.name for p in many.glob("*.safetensors"))
    assert len(files) > 2 and "model.safetensors" not in files
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == files
    ids = mx.array([[5, 6, 7, 8]])
    a, b = mlx_lm.load(str(one))[0](ids), mlx_lm.load(str(many))[0](ids)
    assert mx.array_equal(a, b)


def small_gguf(path, arch="llama", tensors=None, block_count=True):
    """A GGUF file with the llama metadata of CASES['llama'] and the given tensors."""
    _, _, cfg = CASES["llama"]
    vocab = byte_level_vocab()
    w = GGUFWriter(str(path), arch)
    w.add_context_length(64)
    w.add_embedding_length(cfg["hidden_size"])
    if block_count:
        w.add_block_count(1)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model(vocab["model"])
    w.add_token_list(vocab["tokens"])
    w.add_token_merges(vocab["merges"])
    for name, (raw, qtype) in (tensors or {}).items():
        w.add_tensor(name, raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_truncated_file(tmp_path):
    arch, name, cfg = CASES["qwen3"]
    vocab = byte_level_vocab()
    path = tmp_path / "full.gguf"
    write_gguf(path, arch, name, cfg, vocab, random_weights(cfg, len(vocab["tokens"])))
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=r"GGUF tensor '[\w.]+' .* truncated"):
        convert_gguf(cut, tmp_path / "out")
    cut.write_bytes(data[:200])  # inside the metadata
    with pytest.raises(ValueError, match="truncated or corrupt header"):
        convert_gguf(cut, tmp_path / "out")
    cut.write_bytes(b"")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        convert_gguf(cut, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_tensor_type(tmp_path):
    h = CASES["llama"][2]["hidden_size"]
    q2k = np.zeros((4, h // 256 * 84), np.uint8)  # 4 rows of valid-sized Q2_K blocks
    path = small_gguf(tmp_path / "q2k.gguf", tensors={
        "token_embd.weight": (np.zeros((4, h), np.float32), Q.F32),
        "blk.0.attn_q.weight": (q2k, Q.Q2_K),
    })  # fmt: skip
    with pytest.raises(ValueError, match=r"'blk\.0\.attn_q\.weight' has type Q2_K, which is not supp"):
        convert_gguf(path, tmp_path / "out")


def test_unknown_architecture_and_tensor(tmp_path):
    h = CASES["llama"][2]["hidden_size"]
    embd = {"token_embd.weight": (np.zeros((4, h), np.float32), Q.F32)}
    path = small_gguf(tmp_path / "phi.gguf", arch="phi3", tensors=embd)
    with pytest.raises(ValueError, match=r"architecture 'phi3' \(field 'general.architecture'\)"):
        convert_gguf(path, tmp_path / "out")
    mystery = {"blk.0.mystery.weight": (np.zeros(h, np.float32), Q.F32)}
    path = small_gguf(tmp_path / "odd.gguf", tensors={**embd, **mystery})
    with pytest.raises(ValueError, match=r"'blk\.0\.mystery\.weight' has no known mlx-lm name"):
        convert_gguf(path, tmp_path / "out")
    path = small_gguf(tmp_path / "nofield.gguf", tensors=embd, block_count=False)
    with pytest.raises(ValueError, match=r"GGUF metadata field 'llama.block_count' is missing"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failed_conversion_leaves_nothing(tmp_path):
    """A failure after the weights were written (here: the tokenizer) removes the temporary folder."""
    arch, name, cfg = CASES["qwen3"]
    vocab = dict(byte_level_vocab(), model="bogus")
    write_gguf(tmp_path / "m.gguf", arch, name, cfg, vocab, random_weights(cfg, len(vocab["tokens"])))
    with pytest.raises(ValueError, match="cannot rebuild the tokenizer"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_existing_output_folder(tmp_path):
    arch, name, cfg = CASES["qwen3"]
    vocab = byte_level_vocab()
    write_gguf(tmp_path / "m.gguf", arch, name, cfg, vocab, random_weights(cfg, len(vocab["tokens"])))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="dtype"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out2", dtype="int8")
