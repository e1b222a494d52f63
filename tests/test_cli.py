# Copyright © 2026 mlx-patternkv authors.
"""`pkv-mlx` end to end on a tiny random-weight llama saved to a temporary folder: every command through
click's CliRunner, the chat in a real pseudo-terminal, the server over HTTP."""

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from mlx_patternkv import __version__, cli as cli_module
from mlx_patternkv.cli import cli
from mlx_patternkv.config import PatternKVConfig
from mlx_patternkv.documents import DocumentError, read_document
from mlx_patternkv.planner import (
    fp16_bytes,
    kv_shape,
    longest_context,
    mlx_quantized_bytes,
    patternkv_bytes,
)

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "the a an of to in is was and or but not it this that on at by for with from as be are were has have had "
    "do does did can will would could should may might must one two three four five six seven eight nine ten "
    "red green blue black white small large old new good bad first last long short high low river city king "
    "queen house tree book song war peace ship road stone water fire earth wind light dark what who where when "
    "why how which answer question document about tell me you i we they he she his her its their day night "
    "year month time world people man woman child story name place law team game film album"
).split()
SPECIAL = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CONTEXT = 2048
EOS = 2


def make_tiny_model(path: Path) -> Path:
    """A 2-layer llama (4 query / 2 KV heads, head_dim 32) with random weights and a word-level
    tokenizer with a chat template. The EOS row of lm_head is zero, so the EOS logit is always 0 while
    the largest of the ~190 others is positive: greedy answers run to --max-tokens, which makes
    lengths (and the chat's Ctrl-C test) deterministic."""
    from mlx_lm.models import llama
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    path.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(SPECIAL)}
    for w in WORDS + list(".,?!:'\"-") + [str(i) for i in range(10)]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "chat_template": TEMPLATE, "model_max_length": CONTEXT,
    }))  # fmt: skip
    config = {
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "rms_norm_eps": 1e-5,
        "vocab_size": len(vocab), "max_position_embeddings": CONTEXT, "tie_word_embeddings": False,
        "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": EOS,
    }  # fmt: skip
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    weights["lm_head.weight"][EOS] = 0
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    (path / "config.json").write_text(json.dumps(config))
    return path


def words(n, seed):
    import random

    rng = random.Random(seed)
    text = "the king of the river city was old and the queen had a green house by the water . " \
           "the ship came at night with fire and light .".split()  # fmt: skip
    return " ".join(rng.choice(text) for _ in range(n))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama"))


@pytest.fixture()
def cache_env(tmp_path, monkeypatch):
    folder = tmp_path / "pkv-cache"
    monkeypatch.setenv("MLX_PATTERNKV_CACHE", str(folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return folder


def run(args, input=None):
    try:
        runner = CliRunner(mix_stderr=False)  # click 8.1: keep stderr apart (8.2+ always does)
    except TypeError:
        runner = CliRunner()
    return runner.invoke(cli, args, input=input, prog_name="pkv-mlx")


def assert_clean_failure(result, *needles, code=None):
    """A failure the user caused: non-zero exit, the message, no traceback, no stray exception."""
    assert result.exit_code != 0, result.stdout + result.stderr
    if code is not None:
        assert result.exit_code == code, result.stdout + result.stderr
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    text = result.stdout + result.stderr
    assert "Traceback" not in text
    for needle in needles:
        assert needle in text, text


# ----------------------------------------------------------------------------- basic commands


def test_version_and_help():
    result = run(["--version"])
    assert result.exit_code == 0 and __version__ in result.output
    for command in ("chat", "generate", "ask", "serve", "info"):
        result = run([command, "--help"])
        assert result.exit_code == 0, result.output
        assert "Example" in result.output and "pkv-mlx " + command in result.output
    for flag in ("--kv-bits", "--k-bits", "--v-bits", "--group-size", "--window", "--patterns", "--kv",
                 "--max-tokens", "--temp", "--top-p", "--seed", "--system-prompt", "--chat-template-args"):
        assert flag in run(["generate", "--help"]).output


def test_generate(tiny, cache_env):
    result = run(["generate", "--model", tiny, "--prompt", "who was the king ?", "--max-tokens", "20", "--kv-bits", "2"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    answer = out.split("=" * 10)[1].strip()
    assert len(answer.split()) >= 10  # 20 tokens of words
    assert "Prompt: 8 tokens" in out  # <|user|> who was the king ? <|end|> <|assistant|>
    assert "Generation: 20 tokens" in out and "Peak memory:" in out
    assert re.search(r"KV cache: .* for 28 tokens \(FP16 would hold .*PatternKV \(K 2-bit, V 2-bit", out)

    fp16 = run(["generate", "--model", tiny, "--prompt", "-", "--kv", "fp16", "-m", "5", "--quiet"],
               input="who was the king ?")
    assert fp16.exit_code == 0, fp16.output
    assert "=====" not in fp16.stdout and len(fp16.stdout.split()) == 5

    raw = run(["generate", "--model", tiny, "-p", "the king", "--ignore-chat-template", "-m", "3"])
    assert raw.exit_code == 0 and "Prompt: 2 tokens" in raw.stdout  # "the king", no template around it


# ----------------------------------------------------------------------------- ask and its cache


def test_ask_saves_and_reuses_the_document_cache(tiny, cache_env, tmp_path, monkeypatch):
    doc = tmp_path / "story.md"
    doc.write_text("# The story\n\n" + words(700, seed=1))
    args = ["ask", "--model", tiny, "--doc", str(doc), "-m", "24", "--prefill-step-size", "256", "who was the king ?"]

    first = run(args)
    assert first.exit_code == 0, first.output
    assert "Reading story.md: 722 tokens" in first.stderr
    progress = re.findall(r"Prefill ([\d,]+)/722 tokens .*\| ([\d,]+) tok/s \| (ETA|took) \S+ \| KV ", first.stderr)
    assert [p[0] for p in progress] == ["256", "512", "722"]
    assert "Saved the document cache" in first.stderr
    files = list((cache_env / "documents").glob("*.safetensors"))
    assert len(files) == 1
    answer = first.stdout.strip()
    assert len(answer.split()) >= 12

    # the second run must load the cache: prefilling is an error now
    def no_prefill(*a, **k):
        raise AssertionError("prefilled the document again")

    with monkeypatch.context() as patch:
        patch.setattr(cli_module, "prefill", no_prefill)
        second = run(args)
    assert second.exit_code == 0, second.output
    assert "Loaded the cached document: 722 tokens" in second.stderr
    assert "Reading" not in second.stderr and "Prefill" not in second.stderr
    assert second.stdout.strip() == answer  # greedy: same answer from the saved cache
    assert "document: 722 tokens from the cache" in second.stderr

    # a corrupted file (bytes changed inside the data) is detected and rebuilt
    data = bytearray(files[0].read_bytes())
    data[-600:-560] = bytes(40)
    files[0].write_bytes(bytes(data))
    third = run(args)
    assert third.exit_code == 0, third.output
    assert f"The saved document cache {files[0]} is corrupt" in third.stderr
    assert "rebuilding it" in third.stderr and "Saved the document cache" in third.stderr
    assert third.stdout.strip() == answer

    # a cut-off file too
    files[0].write_bytes(files[0].read_bytes()[: files[0].stat().st_size // 2])
    fourth = run(args)
    assert fourth.exit_code == 0, fourth.output
    assert "is unreadable" in fourth.stderr and "rebuilding it" in fourth.stderr
    assert fourth.stdout.strip() == answer

    # a file made with other KV settings, found where this one belongs
    fp16 = run(args + ["--kv", "fp16"])
    assert fp16.exit_code == 0, fp16.output
    fp16_file = next(f for f in (cache_env / "documents").glob("*.safetensors") if f != files[0])
    shutil.copy(fp16_file, files[0])
    fifth = run(args)
    assert fifth.exit_code == 0, fifth.output
    assert "was made with other settings (kv: 'fp16'" in fifth.stderr
    assert fifth.stdout.strip() == answer
    assert "Loaded the cached document" in run(args).stderr  # and it was rebuilt right


def test_ask_reads_html_and_pdf(tiny, cache_env, tmp_path):
    html = tmp_path / "page.html"
    html.write_text(
        "<html><head><title>the river</title><style>p {color: red}</style></head><body>"
        "<script>var king = 1;</script><h1>the city</h1><p>the king was old &amp; the queen had a house"
        "</p></body></html>"
    )
    text = read_document(html)
    assert text == "the river\n\nthe city\nthe king was old & the queen had a house"

    pdf = tmp_path / "story.pdf"
    write_pdf(pdf, ["the king of the river city", "the queen had a green house"])
    assert read_document(pdf) == "the king of the river city\n\nthe queen had a green house"

    for doc in (html, pdf):
        result = run(["ask", "--model", tiny, "--doc", str(doc), "-m", "5", "who was the king ?"])
        assert result.exit_code == 0, result.output
        assert len(result.stdout.split()) == 5


def write_pdf(path, pages):
    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    writer = PdfWriter()
    for text in pages:
        page = writer.add_blank_page(612, 792)
        font = DictionaryObject({
            NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
            NameObject("/BaseFont"): NameObject("/Helvetica"),
        })  # fmt: skip
        page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})})
        stream = DecodedStreamObject()
        stream.set_data(f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode())
        page.replace_contents(stream)
    writer.write(str(path))


def test_ask_context_overflow_and_truncate(tiny, cache_env, tmp_path):
    doc = tmp_path / "long.txt"
    doc.write_text(words(3000, seed=2))
    args = ["ask", "--model", tiny, "--doc", str(doc), "-m", "10", "who was the king ?"]
    result = run(args)
    assert_clean_failure(
        result, "it takes 3,000 tokens", "the prompt needs 3,036 tokens", "the model's context is 2,048 tokens",
        "--truncate", "keep the first ~2,012 tokens", "--model M", code=1,
    )
    assert not (cache_env / "documents").exists()  # nothing was cut silently, nothing computed

    result = run(args + ["--truncate"])
    assert result.exit_code == 0, result.output
    assert "--truncate: the model reads the first 2,012 of the document's 3,000 tokens (33% left out)" in result.stderr
    assert len(result.stdout.split()) == 10

    result = run(args[:-3] + ["-m", "2040", "--truncate", "who ?"])
    assert_clean_failure(result, "Even with --truncate there is no room", "--max-tokens N", code=1)


def test_ask_without_question_chats_about_the_document(tiny, cache_env, tmp_path):
    doc = tmp_path / "notes.txt"
    doc.write_text(words(300, seed=3))
    result = run(["ask", "--model", tiny, "--doc", str(doc), "-m", "8"],
                 input="who was the king ?\nand the queen ?\n/stats\n/reset\n/stats\n/quit\n")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Ask questions about the document" in out
    stats = re.findall(r"Context: +([\d,]+) tokens of the model's 2,048, (\d+) messages", out)
    # document prompt 319 tokens + question 7 + answer 8; the second turn adds 8 + 8
    assert stats[0] == ("350", "4")
    assert re.search(r"Last turn: 8 new prompt tokens \(334 reused from the cache\)", out)
    assert stats[1] == ("319", "0")  # /reset goes back to the document
    assert out.rstrip().endswith("Bye.")


# ----------------------------------------------------------------------------- chat


def test_chat_commands_through_stdin(tiny, cache_env, tmp_path):
    saved = tmp_path / "conv"
    result = run(["chat", "--model", tiny, "-m", "6", "--system-prompt", "you are a king"],
                 input=f"who was the king ?\n/save {saved}\n/reset\n/stats\n/load {saved}\n/stats\n"
                       f"and the queen ?\n/stats\n/load {tmp_path / 'nothing'}\n/help\n/what\n")  # then EOF
    assert result.exit_code == 0, result.output
    out = result.stdout
    # <|system|> you are a king <|end|> <|user|> who was the king ? <|end|> <|assistant|> + 6 answer tokens
    assert "Saved 2 messages and 20 cached tokens" in out
    assert "Conversation reset." in out
    contexts = re.findall(r"Context: +([\d,]+) tokens", out)
    assert contexts == ["0", "20", "34"]
    assert re.search(r"Last turn: 8 new prompt tokens \(20 reused from the cache\)", out)
    assert "No such file" in out and "/save FILE" in out and "Unknown command /what" in out
    assert out.rstrip().endswith("Bye.")

    # a conversation saved with other KV settings is refused with its reason, and so is a damaged file
    other = run(["chat", "--model", tiny, "--kv", "fp16"], input=f"/load {saved}\n/quit\n")
    assert other.exit_code == 0 and "it was saved with another kv" in other.stdout
    file = Path(f"{saved}.safetensors")
    data = bytearray(file.read_bytes())
    data[-100:-90] = bytes(10)
    file.write_bytes(bytes(data))
    damaged = run(["chat", "--model", tiny], input=f"/load {saved}\n/stats\n/quit\n")
    assert damaged.exit_code == 0 and "the file is corrupt" in damaged.stdout
    assert re.search(r"Context: +0 tokens", damaged.stdout)


class Terminal:
    """A child process on a pseudo-terminal that is its controlling terminal, so Ctrl-C is a real
    SIGINT from the terminal driver, as for a person at a keyboard."""

    def __init__(self, argv, env):
        import pty

        self.master, slave = pty.openpty()
        boot = (
            "import fcntl, runpy, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
            f"sys.argv = {['pkv-mlx'] + argv!r}; runpy.run_module('mlx_patternkv.cli', run_name='__main__')"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", boot], stdin=slave, stdout=slave, stderr=slave, env=env,
            start_new_session=True, cwd=str(REPO),
        )
        os.close(slave)
        self.screen = ""

    def read(self, timeout):
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", data.decode("utf-8", "replace"))
        self.screen += text
        return bool(data)

    def expect(self, pattern, start, timeout=60):
        """Wait until `pattern` appears on the screen after position `start`; its match."""
        deadline = time.time() + timeout
        while True:
            m = re.compile(pattern).search(self.screen, start)
            if m:
                return m
            if time.time() > deadline or (not self.read(0.2) and self.proc.poll() is not None):
                raise AssertionError(f"{pattern!r} not on screen; screen:\n{self.screen[start:]}")

    def type(self, text):
        os.write(self.master, text.encode())

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.master)


def child_env(cache):
    env = dict(os.environ, MLX_PATTERNKV_CACHE=str(cache), HF_HUB_OFFLINE="1", TERM="xterm")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def test_chat_in_a_terminal(tiny, cache_env):
    term = Terminal(["chat", "--model", tiny, "--max-tokens", "300"], child_env(cache_env))
    try:
        pos = term.expect(r">> ", 0, timeout=120).end()
        for question in ("who was the king ?", "and the queen ?"):
            term.type(question + "\r")
            pos = term.expect(re.escape("[stopped at --max-tokens 300]") + r"\n>> ", pos).end()

        term.type("/stats\r")
        m = term.expect(r"Context: +([\d,]+) tokens of the model's 2,048, 4 messages.*\n"
                        r"KV cache: +(.*) now; an FP16 cache would hold (.*) \((.*)x\)\n.*PatternKV.*\n"
                        r"Last turn: (\d+) new prompt tokens \(([\d,]+) reused from the cache\)", pos)
        # <|user|> who was the king ? <|end|> <|assistant|>, 300 answer tokens, then
        # <|end|> <|user|> and the queen ? <|end|> <|assistant|>, 300 more: all in one cache
        assert int(m.group(1).replace(",", "")) == 8 + 300 + 8 + 300
        assert int(m.group(5)) == 8 and int(m.group(6).replace(",", "")) == 308  # only new tokens processed
        assert float(m.group(4)) < 1  # compressed below FP16 at 616 tokens
        pos = term.expect(r"\n>> ", m.end()).end()  # type only at the prompt: else the line is echoed twice

        # Ctrl-C while the answer streams: it stops, and the chat goes on
        term.type("tell me about the ship\r")
        m = term.expect(r"tell me about the ship\n", pos)
        term.expect(r"(\S+ ){5}", m.end())  # a few words of the answer are on the screen
        term.type("\x03")
        pos = term.expect(r"\[stopped\]\n>> ", m.end()).end()
        term.type("/stats\r")
        m = term.expect(r"Last turn: \d+ new prompt tokens \([\d,]+ reused from the cache\) at [\d.]+ tok/s; "
                        r"(\d+) tokens generated", pos)
        assert 5 <= int(m.group(1)) < 300, term.screen[-3000:]
        pos = term.expect(r"\n>> ", m.end()).end()

        term.type("/quit\r")
        term.expect(r"Bye\.", pos)
        assert term.proc.wait(timeout=30) == 0
        assert "Traceback" not in term.screen
    finally:
        term.close()

    # Ctrl-D at the prompt exits cleanly too
    term = Terminal(["chat", "--model", tiny, "--kv", "fp16"], child_env(cache_env))
    try:
        pos = term.expect(r">> ", 0, timeout=120).end()
        term.type("\x04")
        term.expect(r"Bye\.", pos)
        assert term.proc.wait(timeout=30) == 0
    finally:
        term.close()


# ----------------------------------------------------------------------------- serve


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port, path, body, stream=False):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )
    with urllib.request.urlopen(req, timeout=60) as response:
        assert response.status == 200
        if not stream:
            return json.loads(response.read())
        events = []
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("data: "):
                events.append(line[6:])
        return events


def test_serve(tiny, cache_env, tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_patternkv.cli", "serve", "--model", tiny, "--port", str(port), "--kv-bits", "3"],
        stdout=log, stderr=subprocess.STDOUT, env=child_env(cache_env), cwd=str(REPO),
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.3)

        question = [{"role": "user", "content": "who was the king ?"}]
        reply = post(port, "/v1/chat/completions", {"messages": question, "max_tokens": 12})
        assert reply["object"] == "chat.completion"
        choice = reply["choices"][0]
        assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
        assert len(choice["message"]["content"].split()) >= 6
        assert reply["usage"]["prompt_tokens"] == 8 and reply["usage"]["completion_tokens"] == 12

        follow_up = question + [choice["message"], {"role": "user", "content": "and the queen ?"}]
        events = post(port, "/v1/chat/completions", {"messages": follow_up, "max_tokens": 8, "stream": True}, stream=True)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert len(text.split()) >= 4
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"

        # the follow-up's prompt starts with the first exchange: mlx-lm's prompt cache reuses it
        reply = post(port, "/v1/chat/completions", {"messages": follow_up, "max_tokens": 4})
        assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] >= 8 + 12

        completion = post(port, "/v1/completions", {"prompt": "the king of the river", "max_tokens": 5})
        assert completion["object"] == "text_completion" and completion["choices"][0]["text"].strip()

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log.seek(0)
    text = log.read()
    assert "KV cache: PatternKV (K 3-bit, V 3-bit" in text and "2 of 2 layers use PatternKVCache" in text
    assert "pkv-mlx serve: stopped" in text and "Traceback" not in text


# ----------------------------------------------------------------------------- info (memory planner)


def test_info_on_a_model_folder(tiny):
    result = run(["info", "--model", tiny, "--context", "4096", "--memory", "0.001"])
    assert result.exit_code == 0, result.output
    rows = {line.split("  ")[0].strip(): line for line in result.stdout.splitlines()}
    # 2 layers x K,V x 2 heads x head_dim 32 x 2 bytes
    assert re.search(r"^FP16 +512 +2\.10 MB +1\.000 ", rows["FP16"])  # 4,096 x 512
    # 4-bit codes (16 B) + fp16 scale and bias per 64 channels (2 B), x2 (K, V) x2 heads x2 layers
    assert re.search(r"^mlx-lm 4-bit +144 ", rows["mlx-lm 4-bit"])
    # K: 16 B codes + scale/min per channel per 128 tokens (1 B) + 1 B index; V: 16 + 4 + 1; x2 heads x2 layers
    assert re.search(r"^PatternKV 4-bit +156 ", rows["PatternKV 4-bit"])
    # at 4,096 tokens: 156 x 4,096 + FP16 windows (2 x 128 x 32 x 2 B x 2 heads) + banks of 32 mined
    # + 31 grown patterns, room for 64 (2 x 64 x 32 x 2 B x 2 heads), per layer, x2 layers = 737,280 B
    assert re.search(r"^PatternKV 4-bit +156 +737\.28 KB ", rows["PatternKV 4-bit"])
    weights = (Path(tiny) / "model.safetensors").stat().st_size
    assert f"Weights:  {weights / 1e3:.2f} KB (1 safetensors file(s))" in result.stdout
    assert f" {(1_000_000 - weights) // 512:,} tokens" in rows["FP16"]  # what is left of 1 MB, at 512 B/token

    result = run(["info", "--model", tiny, "--memory", "0.0001"])
    assert result.exit_code == 0 and "do not fit in" in result.stdout


def test_planner_matches_a_real_cache():
    """The planner's PatternKV bytes equal the nbytes of a cache filled one window at a time."""
    from mlx_patternkv.cache import PatternKVCache

    shape = kv_shape({"num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                      "hidden_size": 256, "head_dim": 64})
    mx.random.seed(1)
    for config in (PatternKVConfig(k_bits=2, v_bits=2), PatternKVConfig(k_bits=4, v_bits=3, k_patterns=0, v_patterns=0),
                   PatternKVConfig(k_bits=3, v_bits=4, group_size=64, window=128)):
        cache = PatternKVCache(config)
        for n in range(128, 4096 + 1, 128):
            keys, values = mx.random.normal((2, 1, 2, 128, 64)).astype(mx.float16)
            cache.update_and_fetch(keys, values)
            if n in (128, 1024, 1152, 4096):
                assert cache.nbytes == patternkv_bytes(shape, n, config), (config, n)
        keys, values = mx.random.normal((2, 1, 2, 77, 64)).astype(mx.float16)
        cache.update_and_fetch(keys, values)
        assert cache.nbytes == patternkv_bytes(shape, 4096 + 77, config), config


def test_planner_figures():
    gemma = {"model_type": "gemma3_text", "num_hidden_layers": 12, "num_attention_heads": 4, "hidden_size": 1024,
             "num_key_value_heads": 1, "head_dim": 256, "sliding_window": 512, "sliding_window_pattern": 6,
             "max_position_embeddings": 32768}
    shape = kv_shape(gemma)
    assert (shape.full_layers, shape.sliding_layers, shape.head_dim) == (2, 10, 256)
    # sliding layers stop growing at their window
    assert fp16_bytes(shape, 10_000) - fp16_bytes(shape, 9_000) == 2 * 2 * 256 * 2 * 1000
    llama = {"num_hidden_layers": 32, "num_attention_heads": 32, "hidden_size": 4096, "num_key_value_heads": 8}
    shape = kv_shape(llama)
    n = 32768
    base = PatternKVConfig()
    ratios = {b: patternkv_bytes(shape, n, PatternKVConfig(k_bits=b, v_bits=b)) / fp16_bytes(shape, n) for b in (2, 4)}
    assert 0.13 < ratios[2] < 0.16 and 0.25 < ratios[4] < 0.29  # DESIGN goals: <= 0.16 / 0.29 at head_dim 128
    assert mlx_quantized_bytes(shape, n, 8) / fp16_bytes(shape, n) == pytest.approx((128 + 8) / 256)
    assert longest_context(lambda t: patternkv_bytes(shape, t, base), 10**9) > longest_context(lambda t: fp16_bytes(shape, t), 10**9)


def test_info_reads_gguf_metadata(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "small.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(4)
    writer.add_context_length(4096)
    writer.add_embedding_length(256)
    writer.add_feed_forward_length(512)
    writer.add_head_count(8)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tensor("token_embd.weight", np.zeros((100, 256), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = run(["info", "--model", str(path), "--memory", "1"])
    assert result.exit_code == 0, result.output
    assert "4 layers, 2 KV heads x head_dim 32, context 4,096 tokens" in result.stdout
    assert "25,600 parameters at float32" in result.stdout
    assert re.search(r"^FP16 +1,024 +4\.19 MB", result.stdout, re.M)  # 4 x 2 x 2 x 32 x 2, x 4,096 tokens


# ----------------------------------------------------------------------------- bad input


def test_bad_input_gives_a_message_and_no_traceback(tiny, cache_env, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(words(50, seed=4))
    ask = ["ask", "--model", tiny, "-m", "4"]

    assert_clean_failure(run(ask + ["--doc", str(tmp_path / "missing.txt"), "who ?"]), "Document not found", code=1)
    assert_clean_failure(run(ask + ["--doc", str(tmp_path), "who ?"]), "is a folder", code=1)
    (tmp_path / "doc.docx").write_bytes(b"PK\x03\x04")
    assert_clean_failure(run(ask + ["--doc", str(tmp_path / "doc.docx"), "who ?"]),
                         "Unsupported document type '.docx'", "Supported: .txt, .md, .html, .htm, .pdf", code=1)
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not a pdf")
    assert_clean_failure(run(ask + ["--doc", str(tmp_path / "broken.pdf"), "who ?"]), "not a readable PDF", code=1)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert_clean_failure(run(ask + ["--doc", str(tmp_path / "latin1.txt"), "who ?"]), "not UTF-8 text", code=1)
    (tmp_path / "empty.md").write_text("  \n")
    assert_clean_failure(run(ask + ["--doc", str(tmp_path / "empty.md"), "who ?"]), "Document has no text", code=1)
    assert_clean_failure(run(ask + ["--doc", str(doc), "  "]), "The question is empty", code=2)

    assert_clean_failure(run(["generate", "--model", str(tmp_path / "no-model"), "-p", "hi"]),
                         "Cannot load model", "no-model", code=1)
    (tmp_path / "not-a-model").mkdir()
    assert_clean_failure(run(["chat", "--model", str(tmp_path / "not-a-model")]), "not a model folder", code=1)
    assert_clean_failure(run(["info", "--model", str(tmp_path / "nothing.gguf")]), "not found", code=1)

    assert_clean_failure(run(["generate", "--model", tiny, "-p", "hi", "--kv-bits", "5"]),
                         "Invalid KV settings", "k_bits=5", "one of 2, 3, 4, 8", code=2)
    assert_clean_failure(run(["generate", "--model", tiny, "-p", "hi", "--v-bits", "1"]), "v_bits=1", code=2)
    assert_clean_failure(run(["generate", "--model", tiny, "-p", "hi", "--group-size", "48"]), "group_size=48", code=2)
    assert_clean_failure(run(["generate", "--model", tiny, "-p", "hi", "--window", "100"]),
                         "window=100", "multiple of group_size", code=2)
    assert_clean_failure(run(["generate", "--model", tiny, "-p", "hi", "--patterns", "300"]), "k_patterns=300", code=2)
    assert_clean_failure(run(["generate", "--model", tiny, "-p", "hi", "--chat-template-args", "{oops"]),
                         "--chat-template-args", "not valid JSON", code=2)
    assert_clean_failure(run(["generate", "--model", tiny, "-p", "hi", "--max-tokens", "0"]), "--max-tokens", code=2)
    assert_clean_failure(run(["generate", "--model", tiny, "-p", "the " * 2100, "--ignore-chat-template"]),
                         "The prompt takes 2,100 tokens but the model's context is 2,048 tokens", code=1)
    assert not (cache_env / "documents").exists()


def test_read_document_errors(tmp_path):
    with pytest.raises(DocumentError, match="not found"):
        read_document(tmp_path / "x.txt")
    (tmp_path / "bom.txt").write_bytes("\ufeffthe king".encode("utf-8"))
    assert read_document(tmp_path / "bom.txt") == "the king"
    (tmp_path / "utf16.md").write_bytes("the queen".encode("utf-16"))
    assert read_document(tmp_path / "utf16.md") == "the queen"
    (tmp_path / "crlf.txt").write_bytes(b"a\r\nb\rc")
    assert read_document(tmp_path / "crlf.txt") == "a\nb\nc"
    write_pdf(tmp_path / "blank.pdf", [""])
    with pytest.raises(DocumentError, match="no extractable text"):
        read_document(tmp_path / "blank.pdf")
