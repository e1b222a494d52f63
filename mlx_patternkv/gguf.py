"""GGUF import: turn a llama.cpp GGUF file into an MLX model folder that `mlx_lm.load` reads.

    folder = convert_gguf("model.Q4_K_M.gguf", "model-mlx")   # config.json, model.safetensors, tokenizer
    model, tokenizer = mlx_lm.load(str(folder))

Every tensor is dequantized with `gguf.quants.dequantize` (numpy) and stored as float32 or float16; the
MLX model is not re-quantized. Supported: architectures llama (and Mistral, which llama.cpp files under
llama), qwen2, qwen3, gemma3; tensor types F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K,
Q6_K. What llama.cpp changed when it wrote the file is undone here:
- llama / mistral: the rows of Q and K are permuted per head (interleaved rope pairs) -> un-permuted.
- gemma3: RMSNorm weights are stored as 1 + w; mlx-lm's gemma3_text adds the 1 itself -> w = stored - 1.
- llama 3.x: rope scaling is stored as a `rope_freqs` tensor -> back to a "llama3" `rope_scaling`.
The tokenizer is rebuilt from the metadata by transformers (no torch needed), with the chat template.
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")

SUPPORTED_TYPES = tuple(
    GGMLQuantizationType[name]
    for name in (
        "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"
    )
)

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

# A new safetensors file is started after this many bytes, so peak memory stays near one shard.
SHARD_BYTES = 4 << 30

MODEL_TYPES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3_text",
}

HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}

TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Gemma 3 has four norms per block; llama.cpp calls the pre-MLP one ffn_norm.
GEMMA3_LAYER_NAMES = {
    **LAYER_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}

# GGUF tokenizer metadata -> the keys transformers' GGUF tokenizer builders read.
TOKENIZER_KEYS = {
    "tokenizer.ggml.model": "tokenizer_type",
    "tokenizer.ggml.pre": "pre_tokenizer_type",
    "tokenizer.ggml.tokens": "tokens",
    "tokenizer.ggml.scores": "scores",
    "tokenizer.ggml.token_type": "token_type",
    "tokenizer.ggml.merges": "merges",
    "tokenizer.ggml.precompiled_charsmap": "precompiled_charsmap",
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
    "tokenizer.ggml.add_space_prefix": "add_prefix_space",
}

SPECIAL_TOKENS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


class GGUFError(ValueError):
    """A GGUF file that cannot be converted: truncated, unknown architecture, unsupported tensor type."""


def log(msg):
    print(f"[mlx-patternkv] {msg}", file=sys.stderr, flush=True)


class CheckedReader(GGUFReader):
    """`GGUFReader` that names the tensor whose type is unsupported or whose data the file cuts off."""

    def _build_tensors(self, start_offs, fields):
        size = len(self.data)
        for field in fields:
            _, name, _, dims, raw_type, offset = field.parts
            name = bytes(name).decode("utf-8", "replace")
            type_id = int(raw_type[0])
            if type_id not in SUPPORTED_TYPES:
                try:
                    type_name = GGMLQuantizationType(type_id).name
                except ValueError:
                    type_name = f"unknown type id {type_id}"
                raise GGUFError(
                    f"GGUF tensor {name!r} has type {type_name}, which is not supported "
                    f"(supported: {', '.join(t.name for t in SUPPORTED_TYPES)})"
                )
            block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
            n_bytes = int(np.prod(dims, dtype=np.int64)) // block_size * type_size
            end = start_offs + int(offset[0]) + n_bytes
            if end > size:
                raise GGUFError(
                    f"GGUF tensor {name!r} needs bytes up to offset {end}, but the file has only "
                    f"{size} bytes: the file is truncated"
                )
        super()._build_tensors(start_offs, fields)


def read_gguf(path) -> GGUFReader:
    """Open a GGUF file (memory-mapped); GGUFError if it is not a complete, supported GGUF file."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"GGUF file not found: {path}")
    try:
        return CheckedReader(path)
    except GGUFError as e:
        raise GGUFError(f"{path}: {e}") from None
    except Exception as e:  # the reader fails in many ways on a cut-off header
        raise GGUFError(
            f"{path}: not a readable GGUF file, truncated or corrupt header "
            f"({type(e).__name__}: {e})"
        ) from e


def gguf_metadata(reader) -> dict:
    """All key/value metadata of the file as Python values (strings, numbers, lists)."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _field(meta, key, default=None):
    """meta[key], else the default; GGUFError naming the field when there is neither."""
    if key in meta:
        return meta[key]
    if default is None:
        raise GGUFError(f"GGUF metadata field {key!r} is missing")
    return default


def _uniform(meta, key, default=None):
    """A per-model integer that some files store per layer (a list): it must be the same for all."""
    value = _field(meta, key, default)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise GGUFError(f"GGUF metadata field {key!r} varies per layer ({value}): not supported")
        value = value[0]
    return int(value)


def architecture(meta) -> str:
    arch = _field(meta, "general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(
            f"unsupported GGUF architecture {arch!r} (field 'general.architecture'); "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    return arch


def llama3_rope_scaling(rope_freqs, base, head_dim):
    """Recover mlx-lm's "llama3" rope_scaling from llama.cpp's `rope_freqs` tensor.

    llama.cpp stores one factor per rotary frequency (1 = unchanged, `factor` = fully stretched, smooth
    in between). We fit the standard Llama 3.x parameters and check they give back the same factors.
    """
    freqs = rope_freqs.astype(np.float64)  # [head_dim // 2]
    if np.allclose(freqs, 1.0):
        return None
    scaling = {
        "rope_type": "llama3",
        "factor": float(freqs.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    wavelen = 2 * np.pi * base ** (np.arange(0, head_dim, 2) / head_dim)
    old = scaling["original_max_position_embeddings"]
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    smooth = (old / wavelen - lo) / (hi - lo)
    stretched = np.where(wavelen > old / lo, factor, 1 / ((1 - smooth) / factor + smooth))
    expect = np.where(wavelen < old / hi, 1.0, stretched)
    if expect.shape != freqs.shape or not np.allclose(expect, freqs, rtol=1e-3):
        raise GGUFError(
            "GGUF tensor 'rope_freqs.weight' does not match Llama 3 rope scaling "
            "(low/high freq factor 1/4, original context 8192): not supported"
        )
    return scaling


def rope_scaling(meta, arch):
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    factor = float(_field(meta, f"{arch}.rope.scaling.factor"))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn" and arch in ("qwen2", "qwen3"):
        scaling = {"rope_type": "yarn", "factor": factor}
        orig = meta.get(f"{arch}.rope.scaling.original_context_length")
        if orig is not None:
            scaling["original_max_position_embeddings"] = int(orig)
        return scaling
    raise GGUFError(
        f"GGUF metadata field '{arch}.rope.scaling.type' = {kind!r} is not supported for {arch}"
    )


def gguf_config(meta, tensors) -> dict:
    """config.json for mlx-lm from the metadata; `tensors` maps GGUF tensor names to reader tensors."""
    arch = architecture(meta)
    p = arch + "."
    model_type = MODEL_TYPES[arch]
    if arch == "llama" and "mistral" in str(meta.get("general.name", "")).lower():
        model_type = "mistral"  # llama.cpp stores Mistral models as llama; mlx-lm maps it back
    if "token_embd.weight" not in tensors:
        raise GGUFError("GGUF tensor 'token_embd.weight' is missing")

    hidden = _uniform(meta, p + "embedding_length")
    n_heads = _uniform(meta, p + "attention.head_count")
    head_dim = _uniform(meta, p + "attention.key_length", hidden // n_heads)
    rope_dims = _uniform(meta, p + "rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise GGUFError(
            f"GGUF metadata field '{p}rope.dimension_count' = {rope_dims} differs from the head "
            f"dimension {head_dim} (partial rotary embedding): not supported"
        )
    if _uniform(meta, p + "attention.value_length", head_dim) != head_dim:
        raise GGUFError(f"GGUF metadata field '{p}attention.value_length' differs from key_length")

    config = {
        "model_type": model_type,
        "architectures": [HF_ARCHITECTURES[model_type]],
        "hidden_size": hidden,
        "num_hidden_layers": _uniform(meta, p + "block_count"),
        "intermediate_size": _uniform(meta, p + "feed_forward_length"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": _uniform(meta, p + "attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        # float32 in the file: keep its shortest spelling (1e-05, not 9.999999747378752e-06)
        "rms_norm_eps": float(str(np.float32(_field(meta, p + "attention.layer_norm_rms_epsilon")))),
        "rope_theta": float(
            meta.get(p + "rope.freq_base", 1e6 if arch in ("qwen2", "qwen3", "gemma3") else 1e4)
        ),
        "max_position_embeddings": _uniform(meta, p + "context_length"),
        # GGUF dims of token_embd are [hidden, vocab]; the metadata vocab_size is optional
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if arch == "qwen2" and head_dim * n_heads != hidden:
        raise GGUFError(f"GGUF metadata field '{p}attention.key_length' = {head_dim}: mlx-lm's qwen2 "
                        f"needs head_dim = embedding_length / head_count")
    scaling = rope_scaling(meta, arch)
    if arch in ("llama", "mistral"):
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["mlp_bias"] = "blk.0.ffn_up.bias" in tensors
        if "rope_freqs.weight" in tensors:
            t = tensors["rope_freqs.weight"]
            freqs = dequantize(t.data, t.tensor_type)  # [head_dim // 2]
            scaling = llama3_rope_scaling(freqs, config["rope_theta"], head_dim) or scaling
    if arch == "gemma3":
        config["sliding_window"] = _uniform(meta, p + "attention.sliding_window")
        pattern = meta.get(p + "attention.sliding_window_pattern", 6)
        if isinstance(pattern, list):  # newer files: one bool per layer, True = sliding
            pattern = pattern.index(False) + 1 if False in pattern else len(pattern) + 1
        config["sliding_window_pattern"] = int(pattern)
        config["rope_local_base_freq"] = float(meta.get(p + "rope.freq_base_swa", 10000.0))
        # llama.cpp: 1/sqrt(head_dim), except Gemma 3 27B (62 layers) which uses hidden / heads
        config["query_pre_attn_scalar"] = (
            hidden // n_heads if config["num_hidden_layers"] == 62 else head_dim
        )
    if scaling is not None:
        config["rope_scaling"] = scaling

    tokens = meta.get("tokenizer.ggml.tokens") or []
    if "tokenizer.ggml.bos_token_id" in meta:
        config["bos_token_id"] = int(meta["tokenizer.ggml.bos_token_id"])
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                             "tokenizer.ggml.eom_token_id") if k in meta]
    if arch == "gemma3" and "<end_of_turn>" in tokens:  # llama.cpp ends a turn on it too
        eos.append(tokens.index("<end_of_turn>"))
    eos = list(dict.fromkeys(int(e) for e in eos))
    if eos:
        config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return config


def hf_name(name, arch) -> str | None:
    """mlx-lm / HF parameter name of a GGUF tensor; None for tensors that carry no weights."""
    if name == "rope_freqs.weight" or ".attn_rot_embd." in name:
        return None  # rope_freqs goes into config.json, attn_rot_embd is recomputed
    base, _, kind = name.rpartition(".")
    if kind not in ("weight", "bias"):
        raise GGUFError(f"GGUF tensor {name!r} has no known mlx-lm name")
    if base in TOP_NAMES:
        return f"{TOP_NAMES[base]}.{kind}"
    parts = base.split(".")
    names = GEMMA3_LAYER_NAMES if arch == "gemma3" else LAYER_NAMES
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in names:
        return f"model.layers.{parts[1]}.{names[parts[2]]}.{kind}"
    raise GGUFError(f"GGUF tensor {name!r} has no known mlx-lm name for architecture {arch}")


def unpermute(w, n_heads):
    """Undo llama.cpp's Q/K row permutation.

    w: [n_heads * head_dim, ...]; llama.cpp stores each head's rows as (head_dim // 2, 2), i.e. rope
    pairs interleaved; HF / mlx-lm keep them as (2, head_dim // 2), the two halves one after the other.
    """
    rest = w.shape[1:]
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def tensor_to_hf(tensor, arch, config) -> np.ndarray:
    """Dequantized float32 weights of one GGUF tensor in mlx-lm layout ([out, in] for linears)."""
    try:
        w = dequantize(tensor.data, tensor.tensor_type)  # numpy order: GGUF dims reversed
    except Exception as e:
        raise GGUFError(
            f"GGUF tensor {tensor.name!r} ({tensor.tensor_type.name}) could not be dequantized: {e}"
        ) from e
    w = np.asarray(w, dtype=np.float32)
    base = tensor.name.rpartition(".")[0]
    if arch in ("llama", "mistral"):
        if base.endswith(".attn_q"):
            w = unpermute(w, config["num_attention_heads"])
        elif base.endswith(".attn_k"):
            w = unpermute(w, config["num_key_value_heads"])
    if arch == "gemma3" and base.endswith("norm"):
        w = w - 1.0  # stored as 1 + w
    return w


def write_tokenizer(meta, out_dir):
    """tokenizer.json + tokenizer_config.json (with the chat template) rebuilt from GGUF metadata."""
    from tokenizers import pre_tokenizers, processors

    from transformers import PreTrainedTokenizerFast

    try:  # transformers >= 5.18; this module needs no torch (its siblings do)
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError as e:
        raise ImportError(
            "rebuilding a GGUF tokenizer needs transformers >= 5.18 "
            "(transformers.integrations.gguf.gguf_tokenizer_mapping)"
        ) from e

    arch = architecture(meta)
    tokens = _field(meta, "tokenizer.ggml.tokens")
    tokenizer_dict = {new: meta[old] for old, new in TOKENIZER_KEYS.items() if old in meta}
    try:
        backend, extra = convert_gguf_tokenizer("llama" if arch == "mistral" else arch, tokenizer_dict)
    except Exception as e:
        raise GGUFError(
            f"cannot rebuild the tokenizer from GGUF metadata (tokenizer.ggml.model = "
            f"{meta.get('tokenizer.ggml.model')!r}): {e}"
        ) from e

    if meta.get("tokenizer.ggml.pre") == "smollm":
        # SmolLM's own tokenizer.json: every digit alone, then GPT-2 byte-level splitting
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])

    special = {
        name: tokens[int(meta[key])] for name, key in SPECIAL_TOKENS.items() if key in meta
    }
    # BOS as llama.cpp adds it: the flag, or by default for sentencepiece ("llama") vocabularies
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama"))
    bos = special.get("bos_token")
    adds_bos = bos is not None and backend.encode("a").ids[:1] == [backend.token_to_id(bos)]
    if add_bos and bos is not None and not adds_bos:
        bos_id = int(meta["tokenizer.ggml.bos_token_id"])
        template = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
        old = backend.post_processor
        backend.post_processor = processors.Sequence([old, template]) if old else template
    elif not add_bos and adds_bos:
        backend.post_processor = None

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=meta.get("tokenizer.chat_template"),
        **{**extra, **special},  # the file's special tokens win over a converter's guesses
    )
    tokenizer.save_pretrained(str(out_dir))
    # Name the generic fast class (every transformers version has it) and keep the template in the
    # config as well as in chat_template.jinja, for transformers versions that read only one of them.
    path = Path(out_dir) / "tokenizer_config.json"
    tokenizer_config = json.loads(path.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if meta.get("tokenizer.chat_template"):
        tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]
    path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))


def write_weights(reader, arch, config, out_dir, dtype):
    """model.safetensors (or numbered shards when over SHARD_BYTES) in mlx-lm names."""
    shards, shard, shard_bytes = [], {}, 0
    for i, tensor in enumerate(reader.tensors):
        name = hf_name(tensor.name, arch)
        if name is None:
            continue
        w = mx.array(tensor_to_hf(tensor, arch, config)).astype(dtype)
        shard[name] = w
        shard_bytes += w.nbytes
        if shard_bytes >= SHARD_BYTES:
            shards.append(_save_shard(shard, out_dir, len(shards)))
            shard, shard_bytes = {}, 0
        if (i + 1) % 50 == 0:
            log(f"  {i + 1}/{len(reader.tensors)} tensors")
    if shard:
        shards.append(_save_shard(shard, out_dir, len(shards)))
    if len(shards) == 1:
        shards[0][0].rename(out_dir / "model.safetensors")
        return
    weight_map = {}
    for path, names in shards:
        weight_map.update({n: path.name for n in names})
    with open(out_dir / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)


def _save_shard(weights, out_dir, index):
    path = out_dir / f"model-{index + 1:05d}.safetensors"
    mx.save_safetensors(str(path), weights, metadata={"format": "mlx"})
    return path, list(weights)


def convert_gguf(gguf_path, out_dir, dtype="float32") -> Path:
    """Convert a GGUF file into an MLX model folder at `out_dir` (which must not exist or be empty).

    The folder is written under a temporary name beside `out_dir` and renamed when complete, so a
    crash never leaves a half-written model behind. GGUFError (a ValueError) for a truncated or corrupt
    file, an unknown architecture or an unsupported tensor type; FileExistsError if `out_dir` is taken.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"output folder already exists and is not empty: {out_dir}")

    reader = read_gguf(gguf_path)
    meta = gguf_metadata(reader)
    arch = architecture(meta)
    tensors = {t.name: t for t in reader.tensors}
    config = gguf_config(meta, tensors)
    for t in reader.tensors:
        hf_name(t.name, arch)  # fail on unknown tensors before any work
    log(
        f"converting {gguf_path.name}: {arch}, {config['num_hidden_layers']} layers, "
        f"{len(tensors)} tensors -> {dtype}"
    )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        with open(tmp / "config.json", "w") as f:
            json.dump(config, f, indent=2)
        write_weights(reader, arch, config, tmp, DTYPES[dtype])
        write_tokenizer(meta, tmp)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        tmp.rename(out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if out_dir.exists():
            raise FileExistsError(f"output folder appeared while converting: {out_dir}") from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out_dir}")
    return out_dir
