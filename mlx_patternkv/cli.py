# Copyright © 2026 mlx-patternkv authors.
"""`pkv-mlx`: chat, one-shot generation, long-document Q&A, an OpenAI-compatible server and a memory
planner, all with the PatternKV compressed KV cache. Flags follow mlx-lm's commands."""

import argparse
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import (
    KVCache,
    QuantizedKVCache,
    can_trim_prompt_cache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)
from mlx_lm.sample_utils import make_sampler

from . import __version__
from .cache import PatternKVCache
from .config import PatternKVConfig
from .documents import DocumentError, document_hash, read_document
from .integrate import install, load
from .models import cache_dir, resolve_model
from .planner import PlannerError, kv_shape, longest_context, model_context, plan_table, read_model

DEFAULT_MAX_TOKENS = 256
DEFAULT_GENERATE_MAX_TOKENS = 100  # mlx_lm.generate's default
DEFAULT_PREFILL_STEP_SIZE = 2048  # mlx-lm's default
DEFAULT_DOC_PREFILL_STEP_SIZE = 512  # smaller steps give a live progress bar on long documents
DOC_CACHE_FORMAT = "pkv-document-1"
CHAT_FORMAT = "pkv-chat-1"
QUESTION_MARK = "\u2063PKV-QUESTION\u2063"  # placeholder where the question goes in the document prompt
DOC_INTRO = "Read the following document, then answer the question after it.\n\n<document>\n"
DOC_OUTRO = "\n</document>\n\n"

CHAT_HELP = """Commands:
  /stats        tokens in context, KV cache bytes (and what FP16 would hold), speed of the last turn
  /save FILE    save the conversation with its compressed cache
  /load FILE    load a conversation saved with /save
  /reset        start over (a document chat keeps its document)
  /help         this list
  /quit         exit (also Ctrl-D, or Ctrl-C at the prompt)
Ctrl-C during an answer stops it."""


# ----------------------------------------------------------------------------- small helpers


def fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def status(msg: str):
    """A progress or status line for the user (stderr, so stdout carries only the answer)."""
    click.echo(msg, err=True)


def cache_offset(cache) -> int:
    """Tokens the cache holds (the first layer that counts them)."""
    for c in cache:
        offset = getattr(c, "offset", None)
        if isinstance(offset, int):
            return offset
    return 0


def kv_nbytes(cache) -> int:
    return sum(c.nbytes for c in cache)


def fp16_nbytes(cache, shape) -> int:
    """What these caches would take as FP16 K/V: PatternKV and plain KVCache layers at 2 bytes per
    element for the tokens they hold, other caches (sliding-window, linear) as they are."""
    per_token = 2 * shape.n_kv_heads * shape.head_dim * 2
    total = 0
    for c in cache:
        if isinstance(c, (PatternKVCache, KVCache, QuantizedKVCache)):
            total += c.offset * per_token
        else:
            total += c.nbytes
    return total


def kv_label(config) -> str:
    if config is None:
        return "uncompressed (mlx-lm's KVCache in the model's dtype)"
    pat = (
        "no patterns"
        if not (config.k_patterns or config.v_patterns)
        else f"{config.k_patterns}/{config.v_patterns} K/V patterns"
    )
    return (
        f"PatternKV (K {config.k_bits}-bit, V {config.v_bits}-bit, group {config.group_size}, "
        f"window {config.window}, {pat})"
    )


def kv_settings(config) -> str:
    """The KV settings as a string that keys saved caches."""
    return "fp16" if config is None else config.to_json()


# ----------------------------------------------------------------------------- shared options


def parse_json_object(ctx, param, value):
    if value is None:
        return {}
    try:
        obj = json.loads(value)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not valid JSON ({e.msg} at position {e.pos})") from None
    if not isinstance(obj, dict):
        raise click.BadParameter('must be a JSON object, e.g. \'{"enable_thinking": false}\'')
    return obj


def model_option(f):
    return click.option(
        "--model",
        default=None,
        metavar="PATH|REPO|GGUF",
        help="Local MLX model folder, Hugging Face repo id or .gguf file. "
        "Default: SmolLM2-135M-Instruct (works offline).",
    )(f)


def kv_options(f):
    options = [
        click.option(
            "--kv",
            type=click.Choice(["patternkv", "fp16"]),
            default="patternkv",
            show_default=True,
            help="KV cache: PatternKV compression, or mlx-lm's plain cache to compare.",
        ),
        click.option("--kv-bits", type=int, help="Residual bits of keys and values: 2, 3, 4 or 8 [default: 4]."),
        click.option("--k-bits", type=int, help="Residual bits of keys (overrides --kv-bits)."),
        click.option("--v-bits", type=int, help="Residual bits of values (overrides --kv-bits)."),
        click.option("--group-size", type=int, help="Tokens per K group, channels per V group: 32, 64, 128 [default: 128]."),
        click.option("--window", type=int, help="Recent tokens kept in FP16, a multiple of --group-size [default: 128]."),
        click.option("--patterns", type=int, help="Pattern bank size for K and V; 0 turns patterns off [default: 32]."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def sampling_options(max_tokens):
    def decorate(f):
        options = [
            click.option(
                "--max-tokens", "-m", type=click.IntRange(min=1), default=max_tokens, show_default=True,
                help="Maximum number of tokens to generate.",
            ),
            click.option("--temp", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Sampling temperature."),
            click.option("--top-p", type=click.FloatRange(0, 1), default=1.0, show_default=True, help="Sampling top-p."),
            click.option("--seed", type=int, default=None, help="PRNG seed."),
        ]
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def template_options(f):
    options = [
        click.option("--system-prompt", default=None, help="System prompt for the chat template."),
        click.option(
            "--chat-template-args",
            callback=parse_json_object,
            default=None,
            metavar="JSON",
            help='Extra arguments for the chat template, e.g. \'{"enable_thinking": false}\'.',
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def kv_config(kv, kv_bits=None, k_bits=None, v_bits=None, group_size=None, window=None, patterns=None):
    """The PatternKVConfig the KV flags ask for; None for --kv fp16."""
    given = {
        "k_bits": k_bits if k_bits is not None else kv_bits,
        "v_bits": v_bits if v_bits is not None else kv_bits,
        "group_size": group_size,
        "window": window,
        "k_patterns": patterns,
        "v_patterns": patterns,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if kv == "fp16":
        if given:
            status("Note: --kv fp16 keeps mlx-lm's plain cache; the PatternKV settings are ignored.")
        return None
    try:
        return PatternKVConfig(**given)
    except ValueError as e:
        raise click.UsageError(f"Invalid KV settings: {e}") from None


def load_model(model, config):
    """(model, tokenizer, local folder), or a clean error for the user."""
    try:
        path = Path(resolve_model(model))
    except Exception as e:  # resolution fails with ValueError/OSError/RuntimeError, each with its message
        raise click.ClickException(f"Cannot load model {model or '(default)'}: {e}") from None
    try:
        m, tokenizer = load(str(path), config)
    except Exception as e:
        raise click.ClickException(f"Cannot load model from {path}: {type(e).__name__}: {e}") from None
    with contextlib.suppress(AttributeError, TypeError):  # we check lengths ourselves, with numbers
        tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    return m, tokenizer, path


def read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def context_limit(config: dict, tokenizer):
    limit = model_context(config)
    if limit is None:
        limit = getattr(tokenizer, "model_max_length", None)
        if not isinstance(limit, int) or limit > 10_000_000:
            limit = None
    return limit


def model_key(path: Path) -> str:
    """Identifies the model a cache was made with: the folder, its config and its weight files."""
    path = Path(path).resolve()
    h = hashlib.sha256()
    with contextlib.suppress(OSError):
        h.update((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return f"{path}#{h.hexdigest()[:16]}"


# ----------------------------------------------------------------------------- the conversation


class Interrupt:
    """SIGINT handler for the time of one answer: the first Ctrl-C asks the answer to stop, a second
    one before it has stopped raises KeyboardInterrupt."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.requested = False
        try:
            self.previous = signal.signal(signal.SIGINT, self.handle)
        except ValueError:  # not the main thread
            self.previous = None
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


@dataclass
class TurnStats:
    prompt_new: int = 0
    prompt_reused: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory: float = 0.0
    finish_reason: str | None = None


class ContextFull(click.ClickException):
    def __init__(self, used, context):
        self.used, self.context = used, context
        super().__init__(
            f"The conversation needs {used:,} tokens but the model's context is {context:,} tokens. "
            f"Use /reset to start over."
        )


class Conversation:
    """A chat whose whole history lives in one cache: each turn feeds only the tokens the cache does
    not hold yet. `tokens` are the tokens in the cache; `text` is the text they spell when known, so
    the next prompt can be taken as the rendered conversation past that text."""

    def __init__(self, model, tokenizer, *, system_prompt=None, template_args=None, context=None,
                 prefill_step_size=DEFAULT_PREFILL_STEP_SIZE, raw=False):
        self.model = model
        self.raw = raw  # no chat template: the user's text is the prompt (generate --ignore-chat-template)
        self.tokenizer = tokenizer
        self.template_args = template_args or {}
        self.context = context
        self.prefill_step_size = prefill_step_size
        self.head = [{"role": "system", "content": system_prompt}] if system_prompt else []
        self.first_user_prefix = ""  # document chats put the document before the first message
        self.reset(make_prompt_cache(model))

    def reset(self, cache, tokens=(), text=""):
        self.cache = cache
        self.tokens = list(tokens)
        self.text = text
        self.messages = []
        self.anchor = (text, list(tokens))  # what a /reset of a document chat goes back to
        self.last = None

    # -- prompt building
    def render(self, messages, add_generation_prompt=True) -> str:
        if self.raw:
            return "".join(m["content"] for m in messages if m["role"] == "user")
        messages = self.head + messages
        if self.tokenizer.has_chat_template:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **self.template_args
            )
        # no template: a plain transcript
        text = (self.tokenizer.bos_token or "") + "".join(
            f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages
        )
        return text + ("Assistant:" if add_generation_prompt else "")

    def encode(self, text: str) -> list:
        # a rendered chat template brings its own special tokens; a raw prompt gets the tokenizer's
        return self.tokenizer.encode(text, add_special_tokens=self.raw and not self.tokens)

    def user_message(self, text: str) -> dict:
        if not any(m["role"] == "user" for m in self.messages):
            text = self.first_user_prefix + text
        return {"role": "user", "content": text}

    def document_prompt(self, document: str):
        """(prefix text, text after the question) of the prompt that asks about `document`."""
        self.first_user_prefix = DOC_INTRO + document + DOC_OUTRO
        rendered = self.render([{"role": "user", "content": self.first_user_prefix + QUESTION_MARK}])
        if rendered.count(QUESTION_MARK) != 1:
            raise click.ClickException("The model's chat template does not keep the message text as is.")
        prefix, after = rendered.split(QUESTION_MARK)
        return prefix, after

    def _prompt(self, messages):
        """The tokens to feed for `messages` (trimming the cache back where it disagrees)."""
        full = self.render(messages)
        if self.text is not None and full.startswith(self.text) and len(full) > len(self.text):
            return full, self.encode(full[len(self.text):])
        anchor_text, anchor_tokens = self.anchor
        if anchor_text and full.startswith(anchor_text):
            wanted = anchor_tokens + self.encode(full[len(anchor_text):])
        else:
            wanted = self.encode(full)
        common = 0
        for a, b in zip(self.tokens, wanted):
            if a != b:
                break
            common += 1
        common = min(common, len(wanted) - 1)  # at least one token to feed
        drop = len(self.tokens) - common
        if drop and can_trim_prompt_cache(self.cache):
            trim_prompt_cache(self.cache, drop)
        elif drop:
            self.cache = make_prompt_cache(self.model)
            common = 0
        self.tokens = self.tokens[:common]
        self.text = None
        return full, wanted[common:]

    # -- one turn
    def reply(self, text, *, max_tokens, sampler, write, interrupt=None):
        """Answer the user message `text`, streaming the answer through `write`. Returns the answer."""
        messages = self.messages + [self.user_message(text)]
        full, new = self._prompt(messages)
        used = len(self.tokens) + len(new)
        if self.context is not None:
            room = self.context - used
            if room < 1:
                raise ContextFull(used, self.context)
            max_tokens = min(max_tokens, room)
        stats = TurnStats(prompt_new=len(new), prompt_reused=len(self.tokens))
        generated, parts = [], []
        response = None
        with contextlib.closing(
            stream_generate(
                self.model, self.tokenizer, mx.array(new), max_tokens=max_tokens, sampler=sampler,
                prompt_cache=self.cache, prefill_step_size=self.prefill_step_size,
            )
        ) as responses:
            for response in responses:
                generated.append(response.token)
                if response.text:
                    parts.append(response.text)
                    write(response.text)
                if interrupt is not None and interrupt.requested:
                    stats.finish_reason = "interrupted"
                    break
        if response is not None:
            stats.prompt_tps = response.prompt_tps
            stats.generation_tokens = len(generated)
            stats.generation_tps = response.generation_tps
            stats.peak_memory = response.peak_memory
            stats.finish_reason = stats.finish_reason or response.finish_reason
        answer = "".join(parts)

        # what the cache holds now: the prompt and the generated tokens the model has seen
        held = cache_offset(self.cache)
        prompt_len = len(self.tokens) + len(new)
        all_tokens = self.tokens + new + generated
        if held > len(all_tokens):  # cannot happen with mlx-lm's generate; start over rather than guess
            self.cache = make_prompt_cache(self.model)
            self.tokens, self.text = [], ""
        else:
            self.tokens = all_tokens[:held]
            self.text = full + self.tokenizer.decode(generated[: held - prompt_len]) if held >= prompt_len else None
        self.messages = messages + [{"role": "assistant", "content": answer}]
        self.last = stats
        return answer

    # -- statistics
    def stats_lines(self, shape, config):
        n = cache_offset(self.cache)
        now, fp16 = kv_nbytes(self.cache), fp16_nbytes(self.cache, shape)
        ratio = f" ({now / fp16:.2f}x)" if fp16 else ""
        limit = f" of the model's {self.context:,}" if self.context else ""
        lines = [
            f"Context:   {n:,} tokens{limit}, {len(self.messages)} messages",
            f"KV cache:  {fmt_bytes(now)} now; an FP16 cache would hold {fmt_bytes(fp16)}{ratio}",
            f"           {kv_label(config)}",
        ]
        if self.last is not None:
            s = self.last
            lines.append(
                f"Last turn: {s.prompt_new:,} new prompt tokens ({s.prompt_reused:,} reused from the cache) "
                f"at {s.prompt_tps:.1f} tok/s; {s.generation_tokens:,} tokens generated at "
                f"{s.generation_tps:.1f} tok/s; peak memory {s.peak_memory:.3f} GB"
            )
        return lines

    # -- saving
    def save(self, file, extra):
        meta = dict(extra)
        meta.update(
            format=CHAT_FORMAT,
            messages=json.dumps(self.messages),
            tokens=json.dumps(self.tokens),
            text=json.dumps(self.text),
            anchor=json.dumps(self.anchor),
            first_user_prefix=json.dumps(self.first_user_prefix),
            checksum=state_digest(self.cache),
        )
        save_prompt_cache(file, self.cache, meta)

    def load(self, file, extra):
        """Load a conversation saved by `save`; a message for the user if it does not fit."""
        try:
            cache, meta = load_prompt_cache(file, return_metadata=True)
            digest = state_digest(cache)  # reads every byte (mx.load is lazy)
        except Exception as e:
            return f"Cannot load {file}: not a readable conversation file ({type(e).__name__}: {e})"
        if meta.get("format") != CHAT_FORMAT:
            return f"Cannot load {file}: not a conversation saved by /save"
        if meta.get("checksum") != digest:
            return f"Cannot load {file}: the file is corrupt (its contents do not match its checksum)"
        for key, want in extra.items():
            if meta.get(key) != want:
                return f"Cannot load {file}: it was saved with another {key} ({meta.get(key)!r})"
        if [type(c).__name__ for c in cache] != [type(c).__name__ for c in make_prompt_cache(self.model)]:
            return f"Cannot load {file}: its caches do not match this model's layers"
        tokens = json.loads(meta["tokens"])
        if cache_offset(cache) != len(tokens):
            return f"Cannot load {file}: it holds {cache_offset(cache)} tokens but lists {len(tokens)}"
        self.cache = cache
        self.tokens = tokens
        self.text = json.loads(meta["text"])
        self.messages = json.loads(meta["messages"])
        text, toks = json.loads(meta["anchor"])
        self.anchor = (text, toks)
        self.first_user_prefix = json.loads(meta["first_user_prefix"])
        return None


# ----------------------------------------------------------------------------- the chat loop


def chat_loop(conv: Conversation, *, max_tokens, sampler, shape, config, identity, reset_fn=None):
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    out = sys.stdout

    def write(text):
        out.write(text)
        out.flush()

    interrupt = Interrupt()
    while True:
        try:
            line = input(">> ")
        except (EOFError, KeyboardInterrupt):
            print()
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            arg = arg.strip()
            if cmd in ("/quit", "/exit", "/q"):
                break
            elif cmd == "/help":
                print(CHAT_HELP)
            elif cmd == "/stats":
                print("\n".join(conv.stats_lines(shape, config)))
            elif cmd == "/reset":
                if reset_fn is not None:
                    reset_fn()
                else:
                    conv.reset(make_prompt_cache(conv.model))
                print("Conversation reset.")
            elif cmd in ("/save", "/load"):
                if not arg:
                    print(f"Usage: {cmd} FILE")
                    continue
                file = str(Path(arg).expanduser())
                if not file.endswith(".safetensors"):
                    file += ".safetensors"
                if cmd == "/save":
                    try:
                        conv.save(file, identity)
                        print(f"Saved {len(conv.messages)} messages and {len(conv.tokens):,} cached tokens "
                              f"({fmt_bytes(os.path.getsize(file))}) to {file}")
                    except (OSError, RuntimeError, ValueError) as e:
                        print(f"Cannot save to {file}: {e}")
                else:
                    error = conv.load(file, identity) if os.path.exists(file) else f"No such file: {file}"
                    print(error or f"Loaded {len(conv.messages)} messages and {len(conv.tokens):,} cached "
                                   f"tokens from {file}")
            else:
                print(f"Unknown command {cmd}. Type /help for the list.")
            continue

        try:
            with interrupt:
                conv.reply(line, max_tokens=max_tokens, sampler=sampler, write=write, interrupt=interrupt)
        except ContextFull as e:
            print(e.message)
            continue
        except KeyboardInterrupt:  # second Ctrl-C before the answer stopped
            print()
            break
        print()
        if conv.last.finish_reason == "interrupted":
            print("[stopped]")
        elif conv.last.finish_reason == "length":
            print(f"[stopped at --max-tokens {max_tokens}]" if conv.last.generation_tokens >= max_tokens
                  else "[stopped: the model's context is full]")
    print("Bye.")


# ----------------------------------------------------------------------------- documents


class Progress:
    """One status line for the document prefill: tokens done, tokens/s, time left, KV bytes.
    Speed and time left come from the latest step: later steps attend to more history and are slower."""

    def __init__(self, total, shape):
        self.total = total
        self.shape = shape
        self.start = self.last_time = time.perf_counter()
        self.last_done = 0
        self.tty = sys.stderr.isatty()

    def update(self, done, cache):
        now = time.perf_counter()
        tps = (done - self.last_done) / max(now - self.last_time, 1e-9)
        self.last_done, self.last_time = done, now
        if done < self.total:
            when = "ETA " + fmt_time((self.total - done) / tps if tps > 0 else 0)
        else:
            when = "took " + fmt_time(now - self.start)
        width = 24
        filled = int(width * done / self.total)
        line = (
            f"Prefill {done:,}/{self.total:,} tokens [{'#' * filled}{'.' * (width - filled)}] "
            f"{100 * done / self.total:3.0f}% | {tps:,.0f} tok/s | {when} | "
            f"KV {fmt_bytes(kv_nbytes(cache))} (FP16 {fmt_bytes(fp16_nbytes(cache, self.shape))})"
        )
        if self.tty:
            sys.stderr.write("\r" + line + "\x1b[K" + ("\n" if done >= self.total else ""))
            sys.stderr.flush()
        else:
            status(line)


def prefill(model, cache, tokens, step, progress):
    """Run the model over all `tokens` into `cache`, `step` tokens at a time."""
    done = 0
    for i in range(0, len(tokens), step):
        chunk = tokens[i : i + step]
        model(mx.array(chunk)[None], cache=cache)  # the logits are never evaluated, so never computed
        mx.eval([c.state for c in cache])
        done += len(chunk)
        progress.update(done, cache)
        mx.clear_cache()


def load_document_cache(path: Path, expected: dict, model, n_tokens: int):
    """(cache, None) when the file at `path` holds this document's cache, else (None, why not)."""
    try:
        cache, meta = load_prompt_cache(str(path), return_metadata=True)
        digest = state_digest(cache)  # reads every byte (mx.load is lazy)
    except Exception as e:  # any failure to read it means the file is damaged
        return None, f"is unreadable ({type(e).__name__}: {str(e)[:200]})"
    if meta.get("checksum") != digest:
        return None, "is corrupt (its contents do not match the checksum saved with it)"
    for key, want in expected.items():
        have = meta.get(key)
        if have != want:
            show = lambda v: v if v is None or len(v) < 80 else v[:77] + "..."  # noqa: E731
            return None, f"was made with other settings ({key}: {show(have)!r}, expected {show(want)!r})"
    want_types = [type(c).__name__ for c in make_prompt_cache(model)]
    if [type(c).__name__ for c in cache] != want_types:
        return None, "does not match this model's layers"
    if cache_offset(cache) != n_tokens:
        return None, f"holds {cache_offset(cache):,} tokens instead of {n_tokens:,}"
    return cache, None


def state_digest(cache) -> str:
    """sha256 of everything a cache list saves (safetensors files carry no checksum of their own)."""
    h = hashlib.sha256()
    for key, value in tree_flatten([c.state for c in cache]):
        h.update(key.encode())
        if isinstance(value, mx.array):
            a = np.asarray(value.view(mx.uint16) if value.dtype == mx.bfloat16 else value)
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


def save_document_cache(path: Path, cache, meta) -> bool:
    meta = dict(meta, checksum=state_digest(cache))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.safetensors")
    try:
        save_prompt_cache(str(tmp), cache, meta)
        os.replace(tmp, path)
        return True
    except (OSError, RuntimeError, ValueError) as e:
        status(f"Warning: could not save the document cache to {path}: {e}")
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False


def fit_document(conv, document, budget):
    """The longest start of `document` (cut at a space) whose prompt prefix takes <= budget tokens."""
    def size(n):
        prefix, _ = conv.document_prompt(document[:n])
        return len(conv.encode(prefix))

    lo = longest_context(size, budget, limit=len(document))
    cut = document.rfind(" ", 0, lo)
    return document[: cut if cut > lo // 2 else lo]


def fit_or_explain(conv, document, prefix_tokens, question_tokens, max_tokens, truncate, has_question):
    """A document prompt too long for the context: with --truncate, cut the document to fit (and say
    so); otherwise an error with the numbers and the choices."""
    context = conv.context
    doc_tokens = len(conv.encode(document))
    overhead = len(prefix_tokens) - doc_tokens  # instructions and chat template around the document
    need = len(prefix_tokens) + question_tokens + max_tokens
    room = context - overhead - question_tokens - max_tokens  # document tokens that fit
    what = "the question" if has_question else "room for a question"
    if truncate and room >= 64:
        document = fit_document(conv, document, context - question_tokens - max_tokens)
        prefix, after = conv.document_prompt(document)
        kept = len(conv.encode(document))
        status(f"--truncate: the model reads the first {kept:,} of the document's {doc_tokens:,} tokens "
               f"({100 * (1 - kept / doc_tokens):.0f}% left out) to fit its {context:,}-token context.")
        return document, prefix, after, conv.encode(prefix)
    if truncate:
        lines = [f"Even with --truncate there is no room for the document: {what} and up to {max_tokens:,} "
                 f"answer tokens take {overhead + question_tokens + max_tokens:,} of the model's {context:,} tokens."]
    else:
        lines = [f"The document is too long for this model: it takes {doc_tokens:,} tokens; with {what} and up "
                 f"to {max_tokens:,} answer tokens the prompt needs {need:,} tokens, but the model's context is "
                 f"{context:,} tokens."]
    lines.append("Choices:")
    if room >= 64 and not truncate:
        lines.append(f"  --truncate      keep the first ~{room:,} tokens of the document "
                     f"(leaves out {doc_tokens - room:,}, {100 * (1 - room / doc_tokens):.0f}%)")
    fit_answer = context - len(prefix_tokens) - question_tokens
    if fit_answer >= 1:
        lines.append(f"  --max-tokens N  a shorter answer: up to {fit_answer:,} tokens fit with the whole document")
    elif truncate:
        lines.append("  --max-tokens N  a shorter answer leaves room for part of the document")
    lines.append("  --model M       a model with a longer context")
    raise click.ClickException("\n".join(lines))


# ----------------------------------------------------------------------------- commands


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pkv-mlx")
def cli():
    """PatternKV for MLX: chat, generate, ask questions about long documents and serve models with a
    compressed KV cache (pattern indices + 2/3/4/8-bit residuals).

    \b
    Examples:
      pkv-mlx chat
      pkv-mlx generate --prompt "Write a haiku about the sea" --kv-bits 2
      pkv-mlx ask --doc report.pdf "What are the main findings?"
      pkv-mlx serve --port 8080
      pkv-mlx info --context 32768 --memory 16
    """


@cli.command(short_help="Interactive chat in the terminal.")
@model_option
@kv_options
@sampling_options(DEFAULT_MAX_TOKENS)
@template_options
@click.option("--prefill-step-size", type=click.IntRange(min=1), default=DEFAULT_PREFILL_STEP_SIZE, show_default=True,
              help="Prompt tokens processed at a time.")
def chat(model, kv, kv_bits, k_bits, v_bits, group_size, window, patterns, max_tokens, temp, top_p, seed,
         system_prompt, chat_template_args, prefill_step_size):
    """Interactive chat in the terminal; one compressed cache across turns.

    Each turn processes only the new tokens. Commands: /stats, /save FILE, /load FILE, /reset,
    /help, /quit. Ctrl-C stops an answer; Ctrl-C at the prompt or Ctrl-D exits.

    \b
    Example:
      pkv-mlx chat --model mlx-community/Qwen3-0.6B-4bit --kv-bits 2 --max-tokens 512
    """
    config = kv_config(kv, kv_bits, k_bits, v_bits, group_size, window, patterns)
    if seed is not None:
        mx.random.seed(seed)
    m, tokenizer, path = load_model(model, config)
    cfg = read_config(path)
    conv = Conversation(m, tokenizer, system_prompt=system_prompt, template_args=chat_template_args,
                        context=context_limit(cfg, tokenizer), prefill_step_size=prefill_step_size)
    print(f"pkv-mlx chat | model {model or path.name} | KV {kv_label(config)}")
    print("Type a message and press Enter. /help lists the commands; Ctrl-C stops an answer, Ctrl-D exits.")
    chat_loop(conv, max_tokens=max_tokens, sampler=make_sampler(temp, top_p), shape=kv_shape(cfg), config=config,
              identity={"model": model_key(path), "kv": kv_settings(config)})


@cli.command(short_help="One answer to stdout, like mlx_lm.generate.")
@model_option
@kv_options
@sampling_options(DEFAULT_GENERATE_MAX_TOKENS)
@template_options
@click.option("--prompt", "-p", required=True, help="The prompt, or '-' to read it from stdin.")
@click.option("--ignore-chat-template", is_flag=True, help="Use the raw prompt without the chat template.")
@click.option("--prefill-step-size", type=click.IntRange(min=1), default=DEFAULT_PREFILL_STEP_SIZE, show_default=True,
              help="Prompt tokens processed at a time.")
@click.option("--verbose/--quiet", default=True, show_default=True,
              help="Print the statistics, or only the answer.")
def generate(model, kv, kv_bits, k_bits, v_bits, group_size, window, patterns, max_tokens, temp, top_p, seed,
             system_prompt, chat_template_args, prompt, ignore_chat_template, prefill_step_size, verbose):
    """One answer to stdout, like mlx_lm.generate, with statistics and KV bytes.

    \b
    Examples:
      pkv-mlx generate --prompt "Explain KV caches in two sentences"
      cat notes.txt | pkv-mlx generate --prompt - --kv-bits 3 --max-tokens 200
    """
    config = kv_config(kv, kv_bits, k_bits, v_bits, group_size, window, patterns)
    if prompt == "-":
        prompt = sys.stdin.read()
    else:
        prompt = prompt.replace("\\n", "\n").replace("\\t", "\t")
    if not prompt.strip():
        raise click.UsageError("The prompt is empty.")
    if seed is not None:
        mx.random.seed(seed)
    m, tokenizer, path = load_model(model, config)
    cfg = read_config(path)
    conv = Conversation(m, tokenizer, system_prompt=system_prompt, template_args=chat_template_args,
                        context=context_limit(cfg, tokenizer), prefill_step_size=prefill_step_size,
                        raw=ignore_chat_template or not tokenizer.has_chat_template)
    started = False

    def write(text):
        nonlocal started
        if verbose and not started:
            print("=" * 10)
        started = True
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        conv.reply(prompt, max_tokens=max_tokens, sampler=make_sampler(temp, top_p), write=write)
    except ContextFull as e:
        raise click.ClickException(
            f"The prompt takes {e.used:,} tokens but the model's context is {e.context:,} tokens."
        ) from None
    s = conv.last
    if not verbose:
        print()
        return
    if not started:
        print("=" * 10 + "\nNo text generated for this prompt")
    print("\n" + "=" * 10)
    print(f"Prompt: {s.prompt_new} tokens, {s.prompt_tps:.3f} tokens-per-sec")
    print(f"Generation: {s.generation_tokens} tokens, {s.generation_tps:.3f} tokens-per-sec")
    print(f"Peak memory: {s.peak_memory:.3f} GB")
    now, fp16 = kv_nbytes(conv.cache), fp16_nbytes(conv.cache, kv_shape(cfg))
    print(f"KV cache: {fmt_bytes(now)} for {cache_offset(conv.cache)} tokens "
          f"(FP16 would hold {fmt_bytes(fp16)}, {now / max(fp16, 1):.2f}x), {kv_label(config)}")


@cli.command(short_help="Questions about a long document (its cache is saved and reused).")
@model_option
@kv_options
@sampling_options(DEFAULT_MAX_TOKENS)
@template_options
@click.option("--doc", "doc_path", required=True, type=click.Path(dir_okay=True, path_type=Path),
              help="The document: .txt, .md, .html or .pdf.")
@click.argument("question", required=False)
@click.option("--truncate", is_flag=True,
              help="If the document is longer than the model's context, keep its beginning.")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the saved document cache.")
@click.option("--prefill-step-size", type=click.IntRange(min=1), default=DEFAULT_DOC_PREFILL_STEP_SIZE,
              show_default=True, help="Document tokens processed at a time.")
def ask(model, kv, kv_bits, k_bits, v_bits, group_size, window, patterns, max_tokens, temp, top_p, seed,
        system_prompt, chat_template_args, doc_path, question, truncate, no_cache, prefill_step_size):
    """Questions about a long document; its compressed cache is saved and reused.

    The document is processed once (with a progress bar) and its compressed cache saved in
    $MLX_PATTERNKV_CACHE or ~/.cache/mlx-patternkv, keyed by model, document and KV settings; later
    questions load it instead. Without QUESTION, opens a chat about the document.

    \b
    Examples:
      pkv-mlx ask --doc paper.pdf "What dataset do the authors use?"
      pkv-mlx ask --doc notes.md --kv-bits 2          # chat about the document
    """
    config = kv_config(kv, kv_bits, k_bits, v_bits, group_size, window, patterns)
    try:
        document = read_document(doc_path)
    except DocumentError as e:
        raise click.ClickException(str(e)) from None
    if question is not None and not question.strip():
        raise click.UsageError("The question is empty.")
    if seed is not None:
        mx.random.seed(seed)
    m, tokenizer, path = load_model(model, config)
    cfg = read_config(path)
    shape = kv_shape(cfg)
    conv = Conversation(m, tokenizer, system_prompt=system_prompt, template_args=chat_template_args,
                        context=context_limit(cfg, tokenizer))
    prefix, after = conv.document_prompt(document)
    prefix_tokens = conv.encode(prefix)
    question_tokens = len(conv.encode(question + after)) if question else len(conv.encode(after)) + 32
    if conv.context is not None and len(prefix_tokens) + question_tokens + max_tokens > conv.context:
        document, prefix, after, prefix_tokens = fit_or_explain(
            conv, document, prefix_tokens, question_tokens, max_tokens, truncate, bool(question)
        )

    doc_sha = document_hash(document)
    expected = {
        "format": DOC_CACHE_FORMAT,
        "model": model_key(path),
        "document": doc_sha,
        "kv": kv_settings(config),
        "prompt": hashlib.sha256(json.dumps(prefix_tokens).encode()).hexdigest(),
    }
    key = hashlib.sha256(json.dumps([expected["model"], expected["kv"], expected["prompt"]]).encode()).hexdigest()
    cache_file = cache_dir() / "documents" / f"{doc_sha[:16]}-{key[:16]}.safetensors"

    cache = None
    if not no_cache and cache_file.exists():
        tic = time.perf_counter()
        cache, why = load_document_cache(cache_file, expected, m, len(prefix_tokens))
        if cache is None:
            status(f"The saved document cache {cache_file} {why}; rebuilding it.")
        else:
            status(f"Loaded the cached document: {len(prefix_tokens):,} tokens, KV {fmt_bytes(kv_nbytes(cache))} "
                   f"(FP16 {fmt_bytes(fp16_nbytes(cache, shape))}) in {time.perf_counter() - tic:.2f} s from {cache_file}")
    if cache is None:
        cache = make_prompt_cache(m)
        status(f"Reading {doc_path.name}: {len(prefix_tokens):,} tokens with {kv_label(config)}")
        progress = Progress(len(prefix_tokens), shape)
        try:
            prefill(m, cache, prefix_tokens, prefill_step_size, progress)
        except KeyboardInterrupt:
            raise click.ClickException("Interrupted while reading the document; nothing was saved.") from None
        elapsed = time.perf_counter() - progress.start
        status(f"Document prefill: {len(prefix_tokens):,} tokens in {elapsed:.1f} s "
               f"({len(prefix_tokens) / elapsed:,.1f} tok/s); KV {fmt_bytes(kv_nbytes(cache))}, "
               f"FP16 would hold {fmt_bytes(fp16_nbytes(cache, shape))}")
        if not no_cache and save_document_cache(cache_file, cache, expected):
            status(f"Saved the document cache ({fmt_bytes(cache_file.stat().st_size)}) to {cache_file}")

    conv.reset(cache, prefix_tokens, prefix)
    sampler = make_sampler(temp, top_p)
    if question is None:
        print(f"pkv-mlx ask | {doc_path.name} ({len(prefix_tokens):,} tokens) | model {model or path.name} | "
              f"KV {kv_label(config)}")
        print("Ask questions about the document. /help lists the commands; Ctrl-C stops an answer, Ctrl-D exits.")

        def reset_fn():
            fresh, _ = load_document_cache(cache_file, expected, m, len(prefix_tokens)) if cache_file.exists() else (None, None)
            if fresh is None:
                fresh = make_prompt_cache(m)
                prefill(m, fresh, prefix_tokens, prefill_step_size, Progress(len(prefix_tokens), shape))
            conv.reset(fresh, prefix_tokens, prefix)

        chat_loop(conv, max_tokens=max_tokens, sampler=sampler, shape=shape, config=config,
                  identity={"model": model_key(path), "kv": kv_settings(config)}, reset_fn=reset_fn)
        return

    with Interrupt() as interrupt:
        conv.reply(question, max_tokens=max_tokens, sampler=sampler, interrupt=interrupt,
                   write=lambda t: (sys.stdout.write(t), sys.stdout.flush()))
    print()
    s = conv.last
    if s.finish_reason == "interrupted":
        status("[stopped]")
    status(f"Question: {s.prompt_new:,} new tokens at {s.prompt_tps:.1f} tok/s (document: "
           f"{len(prefix_tokens):,} tokens from the cache) | Answer: {s.generation_tokens:,} tokens at "
           f"{s.generation_tps:.1f} tok/s | KV {fmt_bytes(kv_nbytes(conv.cache))} "
           f"(FP16 {fmt_bytes(fp16_nbytes(conv.cache, shape))}) | peak memory {s.peak_memory:.3f} GB")


def make_model_provider(cli_args, config):
    """mlx_lm.server's ModelProvider, loading models through our resolver (.gguf, default model) and
    installing PatternKV on every model it loads."""
    from mlx_lm import server

    class PatternKVModelProvider(server.ModelProvider):
        def _load(self, model_path, adapter_path=None, draft_model_path=None):
            resolved = str(resolve_model(model_path))
            draft = str(resolve_model(draft_model_path)) if draft_model_path else None
            super()._load(resolved, adapter_path, draft)
            if config is not None:
                install(self.model, config)
                if self.draft_model is not None:
                    install(self.draft_model, config)
                # the server batches only when every cache can merge; PatternKV serves sequentially otherwise
                self.is_batchable = self.draft_model is None and all(
                    hasattr(c, "merge") for c in make_prompt_cache(self.model)
                )
            caches = make_prompt_cache(self.model)
            n = sum(isinstance(c, PatternKVCache) for c in caches)
            logging.info(f"KV cache: {kv_label(config)}; {n} of {len(caches)} layers use PatternKVCache")
            self.model_key = (model_path, adapter_path, draft_model_path)  # the name the requests use

    return PatternKVModelProvider(cli_args)


@cli.command(short_help="OpenAI-compatible server (mlx_lm.server) with PatternKV caches.")
@model_option
@kv_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Host to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port to listen on.")
@click.option("--max-tokens", "-m", type=click.IntRange(min=1), default=512, show_default=True,
              help="Default maximum number of tokens per request.")
@click.option("--temp", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Default sampling temperature.")
@click.option("--top-p", type=click.FloatRange(0, 1), default=1.0, show_default=True, help="Default sampling top-p.")
@click.option("--chat-template-args", callback=parse_json_object, default=None, metavar="JSON",
              help="Arguments for the chat template, e.g. '{\"enable_thinking\": false}'.")
@click.option("--prompt-cache-size", type=click.IntRange(min=0), default=10, show_default=True,
              help="Distinct KV caches kept for prompt reuse across requests.")
@click.option("--prompt-cache-bytes", default=None, help="Byte budget of those caches (e.g. 2GB).")
@click.option("--prefill-step-size", type=click.IntRange(min=1), default=DEFAULT_PREFILL_STEP_SIZE, show_default=True,
              help="Prompt tokens processed at a time.")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]), default="INFO",
              show_default=True)
def serve(model, kv, kv_bits, k_bits, v_bits, group_size, window, patterns, host, port, max_tokens, temp, top_p,
          chat_template_args, prompt_cache_size, prompt_cache_bytes, prefill_step_size, log_level):
    """OpenAI-compatible server (mlx_lm.server) with PatternKV caches.

    Serves /v1/chat/completions and /v1/completions (with streaming) and reuses prompt caches across
    requests, as mlx_lm.server does.

    \b
    Example:
      pkv-mlx serve --port 8080 --kv-bits 4
      curl localhost:8080/v1/chat/completions -H 'Content-Type: application/json' \\
           -d '{"messages": [{"role": "user", "content": "Hello"}]}'
    """
    from mlx_lm import server
    from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START
    from mlx_lm.utils import _parse_size

    config = kv_config(kv, kv_bits, k_bits, v_bits, group_size, window, patterns)
    try:
        path = Path(resolve_model(model))
    except Exception as e:
        raise click.ClickException(f"Cannot load model {model or '(default)'}: {e}") from None
    try:
        cache_bytes = _parse_size(prompt_cache_bytes) if prompt_cache_bytes else None
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--prompt-cache-bytes") from None
    args = argparse.Namespace(
        model=str(path), adapter_path=None, host=host, port=port, allowed_origins=["*"],
        draft_model=None, num_draft_tokens=3, trust_remote_code=False, log_level=log_level,
        chat_template="", use_default_chat_template=False, temp=temp, top_p=top_p, top_k=0,
        min_p=0.0, max_tokens=max_tokens, chat_template_args=chat_template_args,
        decode_concurrency=32, prompt_concurrency=8, prefill_step_size=prefill_step_size,
        prompt_cache_size=prompt_cache_size, prompt_cache_bytes=cache_bytes,
        kv_bits=None, kv_group_size=64, quantized_kv_start=DEFAULT_QUANTIZED_KV_START,  # mlx-lm's own quantizer: off
        pipeline=False,
    )
    logging.basicConfig(level=getattr(logging, log_level), format="%(asctime)s - %(levelname)s - %(message)s")
    provider = make_model_provider(args, config)
    try:
        provider.load("default_model", None, "default_model")  # fail here, not in the server thread
    except Exception as e:
        raise click.ClickException(f"Cannot load model from {path}: {type(e).__name__}: {e}") from None
    logging.info(f"pkv-mlx serve: model {path} on http://{host}:{port}")
    signal.signal(signal.SIGTERM, stop_server)  # `kill` shuts down as cleanly as Ctrl-C
    server.run(host, port, provider)
    # The server has stopped and joined its threads. Exit now: at interpreter teardown after
    # mlx_lm.server, MLX's C++ destructors abort ("terminate called without an active exception")
    # about one run in three, with mlx_lm.server itself too.
    logging.info("pkv-mlx serve: stopped")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def stop_server(signum, frame):
    raise KeyboardInterrupt


@cli.command(short_help="Memory planner: KV bytes and the longest context that fits.")
@model_option
@click.option("--context", type=click.IntRange(min=1), default=None,
              help="Tokens to plan for [default: the model's context].")
@click.option("--memory", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Memory in GB for weights and KV cache [default: this machine's].")
@click.option("--group-size", type=int, help="PatternKV group size (32, 64, 128) [default: 128].")
@click.option("--window", type=int, help="PatternKV FP16 window [default: 128].")
@click.option("--patterns", type=int, help="PatternKV bank size; 0 turns patterns off [default: 32].")
def info(model, context, memory, group_size, window, patterns):
    """Memory planner: KV bytes per token and at N tokens for FP16, mlx-lm's 8/4-bit caches and
    PatternKV at 4/3/2 bits, and the longest context that fits next to the weights. Reads only the
    model's config; no weights are loaded.

    \b
    Example:
      pkv-mlx info --model Qwen/Qwen3-8B --context 32768 --memory 16
    """
    base = kv_config("patternkv", None, None, None, group_size, window, patterns)
    try:
        model_info = read_model(model)
        print(plan_table(model_info, context, int(memory * 1e9) if memory else None, base))
    except PlannerError as e:
        raise click.ClickException(str(e)) from None


@cli.command("eval", context_settings=dict(ignore_unknown_options=True, allow_extra_args=True, help_option_names=[]))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def eval_command(args):
    """Quality of the compressed cache against FP16: perplexity, KL, top-1 agreement, needle in a
    haystack, GSM8K, bytes and peak memory (`pkv-mlx eval --help` lists the options).

    \b
    Example:
      pkv-mlx eval --quick --methods fp16,pkv2,kivi2
    """
    from .evaluate import main as eval_main

    sys.exit(eval_main(list(args)))


def main():
    cli(prog_name="pkv-mlx")


if __name__ == "__main__":
    main()
