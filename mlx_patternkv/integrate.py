# Copyright © 2026 mlx-patternkv authors.
"""mlx-lm glue: put PatternKV caches into a model and route its attention to the compressed path.

- `install(model, config)` sets `model.make_cache`, which `mlx_lm.generate`, `stream_generate`, the
  server, `cache_prompt` and speculative decoding all call, so every full-attention layer gets a
  `PatternKVCache`; sliding-window, linear-attention and other caches are kept as the model made them.
- mlx-lm's `scaled_dot_product_attention` is replaced in `mlx_lm.models.base` and in every imported
  model module (they import it by name). The replacement runs the compressed attention when the keys
  are the ones our cache just returned, and mlx-lm's own function otherwise.
- Models doing their own attention math (gemma2, olmo, ...) read the lazily dequantized K/V our cache
  returns, so they stay correct.
"""

import sys
import warnings

import mlx.nn as nn
from mlx_lm.models import base
from mlx_lm.models import cache as mlx_cache

from .attention import compressed_attention
from .cache import PatternKVCache
from .config import PatternKVConfig

# load_prompt_cache finds cache classes by name in mlx_lm.models.cache
mlx_cache.PatternKVCache = PatternKVCache

_mlx_sdpa = getattr(base.scaled_dot_product_attention, "_mlx_original", base.scaled_dot_product_attention)


def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
    if isinstance(cache, PatternKVCache) and cache.fetched(keys, values):
        return compressed_attention(queries, cache, scale=scale, mask=mask, sinks=sinks)
    return _mlx_sdpa(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)


scaled_dot_product_attention._mlx_original = _mlx_sdpa


def patch_attention():
    """Install our SDPA in mlx_lm.models.base and every already-imported mlx_lm model module."""
    base.scaled_dot_product_attention = scaled_dot_product_attention
    for name, module in list(sys.modules.items()):
        if name.startswith("mlx_lm.models.") and getattr(module, "scaled_dot_product_attention", None) is _mlx_sdpa:
            module.scaled_dot_product_attention = scaled_dot_product_attention


def _unsupported_reason(layer):
    """Why a layer's KV cannot be stored by PatternKV, or None."""
    attn = getattr(layer, "self_attn", None) or getattr(layer, "attention", None)
    if attn is None:
        return None
    if hasattr(attn, "kv_lora_rank"):
        return "it caches MLA latents, not per-head keys and values"
    head_dim = getattr(attn, "head_dim", None)
    if isinstance(head_dim, int) and head_dim % 32:
        return f"its head_dim {head_dim} is not a multiple of 32"
    return None


def _model_caches(model):
    """The caches the model itself would make (ignoring an installed PatternKV make_cache)."""
    make = getattr(type(model), "make_cache", None)
    if make is not None:
        return make(model)
    return [mlx_cache.KVCache() for _ in model.layers]


def make_prompt_cache(model: nn.Module, config: PatternKVConfig = None) -> list:
    """The model's cache list with every plain full-attention `KVCache` replaced by a PatternKVCache.

    config: None uses the one given to `install` (or the defaults)."""
    config = config or getattr(model, "_patternkv_config", None) or PatternKVConfig()
    caches = _model_caches(model)
    layers = getattr(model, "layers", [])
    skipped = []
    for i, c in enumerate(caches):
        if type(c) is not mlx_cache.KVCache:
            continue
        reason = _unsupported_reason(layers[i]) if len(caches) == len(layers) else None
        if reason:
            skipped.append((i, reason))
        else:
            caches[i] = PatternKVCache(config)
    if skipped and not getattr(model, "_patternkv_warned", False):
        i, reason = skipped[0]
        warnings.warn(
            f"PatternKV: {len(skipped)} layer(s) keep a plain KVCache (layer {i}: {reason})", stacklevel=2
        )
        model._patternkv_warned = True
    return caches


def install(model: nn.Module, config: PatternKVConfig = None) -> nn.Module:
    """Make every cache mlx-lm builds for `model` a PatternKV cache where the layer allows it."""
    config = config or PatternKVConfig()
    patch_attention()
    model._patternkv_config = config
    model.make_cache = lambda: make_prompt_cache(model, config)
    return model


def load(model: str = None, config: PatternKVConfig = None, **kwargs):
    """Load a model (local folder, Hugging Face repo id, .gguf file, or None for the default
    SmolLM2-135M-Instruct) with mlx-lm and install PatternKV on it (FP16 cache when config is None).
    Extra keyword arguments go to `mlx_lm.load`. Returns (model, tokenizer)."""
    import mlx_lm

    from .models import resolve_model

    path = resolve_model(model)
    m, tokenizer = mlx_lm.load(str(path), **kwargs)
    if config is not None:
        install(m, config)
    return m, tokenizer
