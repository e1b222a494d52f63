"""Tiny random-weight mlx-lm models for tests (no weights on disk, no hub)."""

import importlib

import mlx.core as mx
from mlx_lm.utils import MODEL_REMAPPING


COMMON = dict(
    hidden_size=128, num_hidden_layers=2, intermediate_size=256, num_attention_heads=4,
    num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=272, max_position_embeddings=4096,
    rope_theta=10000.0, tie_word_embeddings=False,
)  # fmt: skip

CONFIGS = {
    "llama": dict(COMMON, model_type="llama"),
    "qwen2": dict(COMMON, model_type="qwen2"),
    "qwen3": dict(COMMON, model_type="qwen3", head_dim=64),
    "mistral": dict(COMMON, model_type="mistral", sliding_window=None),
    "phi3": dict(COMMON, model_type="phi3"),
    # sliding (RotatingKVCache) + global layers, head_dim 256, one KV head
    "gemma3_text": dict(
        COMMON, model_type="gemma3_text", num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=256, sliding_window=64, sliding_window_pattern=3,
        query_pre_attn_scalar=256,
    ),  # fmt: skip
    # does its own attention math on the fetched K/V
    "gemma2": dict(
        COMMON, model_type="gemma2", head_dim=32, query_pre_attn_scalar=32,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
    ),  # fmt: skip
}


def tiny_model(arch: str, seed: int = 0, **overrides):
    """A random-weight float32 model of mlx-lm architecture `arch`."""
    model_type = CONFIGS[arch]["model_type"]
    module = importlib.import_module(f"mlx_lm.models.{MODEL_REMAPPING.get(model_type, model_type)}")
    args = module.ModelArgs.from_dict({**CONFIGS[arch], **overrides})
    mx.random.seed(seed)
    model = module.Model(args)
    # sharper logits than the default init, so greedy decoding has few near-ties
    if "lm_head" in model:  # peakier next-token distributions: fewer near-ties in greedy tests
        model.lm_head.weight = model.lm_head.weight * 4
    mx.eval(model.parameters())
    return model


def save_tiny(path, arch: str = "llama", seed: int = 0, **overrides):
    """Write a tiny random model plus a byte-level tokenizer as an mlx-lm folder; returns the path."""
    import json
    from pathlib import Path

    from mlx.utils import tree_flatten
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {**CONFIGS[arch], **overrides}
    model = tiny_model(arch, seed, **overrides)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(config))
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}  # 256 byte tokens
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|eos|>"])  # id 256
    tok.save(str(path / "tokenizer.json"))
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    (path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|eos|>", "chat_template": template})
    )
    return path
