# Copyright © 2026 mlx-patternkv authors.
"""Memory planner for `pkv-mlx info`: KV-cache bytes of a model under FP16, mlx-lm's quantized cache
and PatternKV, from the model's config alone (no weights loaded).

Byte counts follow the storage of each cache:
- FP16: K and V, 2 bytes per element.
- mlx-lm `QuantizedKVCache` (`--kv-bits`, group 64): `bits` per element plus an fp16 scale and bias
  per 64 elements along head_dim, for K and V.
- PatternKV: `cache.kv_bytes_per_token` (codes, scales, mins, indices) per token of allocated
  capacity, plus `cache.fixed_bytes` (the FP16 window and the pattern banks) per layer; see
  docs/DESIGN.md. This equals the `nbytes` of a cache filled a window at a time (tested).
Sliding-window layers keep an FP16 rotating cache of at most `sliding_window` tokens under every
method (PatternKV leaves them alone, and mlx-lm cannot quantize them: `RotatingKVCache.to_quantized`
raises). Linear-attention layers hold a fixed state and are not counted.
"""

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from .cache import BANK_STEP, TOKEN_STEP, fixed_bytes, kv_bytes_per_token
from .config import PatternKVConfig

FP16 = 2
MLX_GROUP = 64  # mlx-lm's default --kv-group-size


class PlannerError(Exception):
    """A model whose config cannot be read or understood, with a message for the user."""


@dataclass(frozen=True)
class KVShape:
    """What the KV cache of a model looks like."""

    n_layers: int
    full_layers: int  # layers whose cache grows with every token
    sliding_layers: int  # layers with a rotating cache of `sliding_window` tokens
    sliding_window: int
    n_kv_heads: int
    head_dim: int
    context: int | None  # the model's trained context (max_position_embeddings), if known


def text_config(cfg: dict) -> dict:
    """The language-model part of a config (multimodal configs nest it under text_config)."""
    inner = cfg.get("text_config")
    if isinstance(inner, dict) and "num_hidden_layers" in inner:
        merged = dict(cfg)
        merged.update(inner)
        return merged
    return cfg


def model_context(cfg: dict) -> int | None:
    cfg = text_config(cfg)
    for key in ("max_position_embeddings", "max_sequence_length", "seq_length", "n_ctx", "n_positions"):
        value = cfg.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def kv_shape(cfg: dict) -> KVShape:
    """Layers, KV heads and head_dim of a Hugging Face / mlx-lm config.json."""
    cfg = text_config(cfg)
    try:
        n_layers = int(cfg["num_hidden_layers"])
        n_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise PlannerError(f"the model config has no usable {e} field") from None
    n_kv_heads = int(cfg.get("num_key_value_heads") or n_heads)
    head_dim = int(cfg.get("head_dim") or hidden // n_heads)
    window = int(cfg.get("sliding_window") or 0)

    kinds = cfg.get("layer_types")
    if isinstance(kinds, list) and len(kinds) == n_layers:
        full = sum(k in ("full_attention", "attention", "global") for k in kinds)
        sliding = sum(k in ("sliding_attention", "sliding", "local") for k in kinds) if window else 0
        full += 0 if window else sum(k in ("sliding_attention", "sliding", "local") for k in kinds)
    elif cfg.get("model_type", "").startswith("gemma3") and window:
        pattern = int(cfg.get("sliding_window_pattern") or 6)
        full = sum((i + 1) % pattern == 0 for i in range(n_layers))
        sliding = n_layers - full
    else:
        full, sliding = n_layers, 0
    return KVShape(n_layers, full, sliding, window, n_kv_heads, head_dim, model_context(cfg))


def fp16_bytes(shape: KVShape, n_tokens: int) -> int:
    per_token = 2 * shape.n_kv_heads * shape.head_dim * FP16
    return shape.full_layers * per_token * n_tokens + _sliding_bytes(shape, n_tokens)


def mlx_quantized_bytes(shape: KVShape, n_tokens: int, bits: int) -> int:
    d = shape.head_dim
    per_head = d * bits / 8 + 2 * FP16 * d / MLX_GROUP  # codes + fp16 scale and bias per group
    per_token = 2 * shape.n_kv_heads * per_head
    return int(shape.full_layers * per_token * n_tokens) + _sliding_bytes(shape, n_tokens)


def patternkv_bytes(shape: KVShape, n_tokens: int, config: PatternKVConfig) -> int:
    """What a PatternKV cache holding n_tokens allocates, per full layer: the quantized part (whole
    windows are flushed; capacity grows in steps of TOKEN_STEP tokens), the FP16 window, and the
    banks (mined at the first flush, then one more pattern per flushed group up to max_patterns;
    capacity in steps of BANK_STEP). Assumes the first flush is one window (a short prompt); a long
    first prefill mines once over more tokens and grows the banks less."""
    h, d = shape.n_kv_heads, shape.head_dim
    n_quant = n_tokens // config.window * config.window  # fill-then-flush: the window holds the rest
    capacity = -(-n_quant // TOKEN_STEP) * TOKEN_STEP
    n_pat = 0
    if n_quant and (config.k_patterns or config.v_patterns):
        grown = (n_quant - config.window) // config.group_size
        n_pat = min(config.max_patterns, max(config.k_patterns, config.v_patterns) + grown)
        n_pat = min(config.max_patterns, -(-n_pat // BANK_STEP) * BANK_STEP)
    per_layer = kv_bytes_per_token(config, d, h) * capacity + fixed_bytes(config, d, h, n_pat)
    return int(shape.full_layers * per_layer) + _sliding_bytes(shape, n_tokens)


def _sliding_bytes(shape: KVShape, n_tokens: int) -> int:
    if not shape.sliding_layers:
        return 0
    return shape.sliding_layers * 2 * shape.n_kv_heads * shape.head_dim * FP16 * min(n_tokens, shape.sliding_window)


def longest_context(bytes_at, budget: int, limit: int = 1 << 40) -> int:
    """The largest n with bytes_at(n) <= budget (bytes_at grows with n), up to `limit`."""
    if budget < bytes_at(1):
        return 0
    lo, hi = 1, 2
    while hi < limit and bytes_at(hi) <= budget:
        lo, hi = hi, hi * 2
    hi = min(hi, limit)
    if bytes_at(hi) <= budget:
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if bytes_at(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def methods(shape: KVShape, base: PatternKVConfig):
    """(name, bytes_at(n) or None when the method cannot run on this model, bytes per token) for each
    row of the plan. Bytes per token: what every further token adds once the fixed parts are full."""
    d, h, full = shape.head_dim, shape.n_kv_heads, shape.full_layers
    rows = [("FP16", lambda n: fp16_bytes(shape, n), full * 2 * h * d * FP16)]
    for bits in (8, 4):
        fn = None if shape.sliding_layers else (lambda n, b=bits: mlx_quantized_bytes(shape, n, b))
        rows.append((f"mlx-lm {bits}-bit", fn, full * 2 * h * (d * bits / 8 + 2 * FP16 * d / MLX_GROUP)))
    for bits in (4, 3, 2):
        cfg = replace(base, k_bits=bits, v_bits=bits)
        rows.append((f"PatternKV {bits}-bit", lambda n, c=cfg: patternkv_bytes(shape, n, c),
                     full * kv_bytes_per_token(cfg, d, h)))
    return rows


# --------------------------------------------------------------------------- reading a model


@dataclass
class ModelInfo:
    name: str
    config: dict
    weight_bytes: int
    weight_note: str  # how weight_bytes was found


def read_model(model: str | None) -> ModelInfo:
    """Config and weight size of a model folder, a .gguf file, a Hugging Face repo or the default
    model, without loading weights."""
    if model is not None:
        path = Path(model).expanduser()
        if path.suffix.lower() == ".gguf" and path.is_file():
            return _read_gguf(path)
        if path.is_dir():
            return _read_folder(path, str(model))
        if path.exists():
            raise PlannerError(f"{model}: expected a model folder or a .gguf file")
        if model.startswith((".", "/", "~")) or model.lower().endswith(".gguf"):
            raise PlannerError(f"Model not found: {model} (no such file or folder)")
    from .models import resolve_model

    try:
        folder = Path(resolve_model(model))
    except Exception as e:  # resolution errors carry their own message (offline, unknown repo)
        raise PlannerError(f"Cannot find model {model or '(default)'}: {e}") from None
    return _read_folder(folder, model or f"{folder.name} (the default model)")


def _read_folder(path: Path, name: str) -> ModelInfo:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise PlannerError(f"{path}: no config.json, not a model folder")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise PlannerError(f"{cfg_file}: cannot read it ({e})") from None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise PlannerError(f"{path}: no *.safetensors weights, not a model folder mlx-lm can load")
    size = sum(f.stat().st_size for f in files)
    return ModelInfo(name, cfg, size, f"{len(files)} safetensors file(s)")


def _read_gguf(path: Path) -> ModelInfo:
    from .gguf import GGUFError, gguf_config, gguf_metadata, read_gguf

    try:
        reader = read_gguf(path)
        tensors = {t.name: t for t in reader.tensors}
        cfg = gguf_config(gguf_metadata(reader), tensors)
    except GGUFError as e:
        raise PlannerError(str(e)) from None
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    count = f"{n_params / 1e9:.2f}B" if n_params >= 1e9 else f"{n_params / 1e6:.1f}M" if n_params >= 1e6 else f"{n_params:,}"
    note = (f"{count} parameters at float32, as pkv-mlx converts GGUF files; "
            f"the GGUF file itself is {_gb(os.path.getsize(path))}")
    return ModelInfo(path.name, cfg, n_params * 4, note)


def _gb(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def system_memory() -> int:
    """Memory available to MLX: the GPU's working set on a Mac, the machine's RAM otherwise."""
    import mlx.core as mx

    info = mx.device_info()
    for key in ("max_recommended_working_set_size", "memory_size"):
        if info.get(key):
            return int(info[key])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def plan_table(info: ModelInfo, context: int | None, memory: int | None, base: PatternKVConfig) -> str:
    """The planner's report as text."""
    shape = kv_shape(info.config)
    context = context or shape.context or 32768
    memory = memory or system_memory()
    budget = memory - info.weight_bytes
    lines = [
        f"Model:    {info.name}: {info.config.get('model_type', '?')}, {shape.n_layers} layers, "
        f"{shape.n_kv_heads} KV heads x head_dim {shape.head_dim}, context "
        + (f"{shape.context:,} tokens" if shape.context else "unknown"),
    ]
    if shape.sliding_layers:
        lines.append(
            f"Layers:   {shape.full_layers} full-attention, {shape.sliding_layers} sliding-window "
            f"({shape.sliding_window:,} tokens, kept FP16 by every method)"
        )
    elif shape.full_layers != shape.n_layers:
        lines.append(f"Layers:   {shape.full_layers} of {shape.n_layers} keep a KV cache")
    lines += [
        f"Weights:  {_gb(info.weight_bytes)} ({info.weight_note})",
        f"Memory:   {_gb(memory)}, {_gb(max(budget, 0))} left for the KV cache next to the weights",
        f"PatternKV settings: group {base.group_size}, window {base.window}, "
        f"{base.k_patterns}/{base.v_patterns} K/V patterns (bank cap {base.max_patterns})",
        "",
    ]
    head = ("KV cache", "bytes/token", f"at {context:,} tokens", "vs FP16", "longest context in memory")
    rows = []
    fp16_at = fp16_bytes(shape, context)
    for name, fn, per_token in methods(shape, base):
        if fn is None:
            rows.append((name, "-", "n/a: mlx-lm cannot quantize sliding-window layers", "", ""))
            continue
        at = fn(context)
        fits = longest_context(fn, budget) if budget > 0 else 0
        mark = " (past the model's context)" if shape.context and fits > shape.context else ""
        rows.append((name, f"{per_token:,.0f}", _gb(at), f"{at / fp16_at:.3f}", f"{fits:,} tokens{mark}"))
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    lines.append(fmt(head).rstrip())
    lines.append("  ".join("-" * w for w in widths))
    lines += [fmt(r).rstrip() for r in rows]
    if budget <= 0:
        lines.append(f"\nThe weights alone ({_gb(info.weight_bytes)}) do not fit in {_gb(memory)}.")
    lines.append(
        "\nbytes/token: what each further token adds (all layers, K and V). Fixed costs (the FP16 window and "
        "pattern banks of PatternKV, full sliding-window caches) are in the totals. Activations are not counted."
    )
    return "\n".join(lines)
