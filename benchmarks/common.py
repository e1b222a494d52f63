"""Shared bits of the benchmark scripts: filling caches, timing, writing results."""

import json
import os
import platform
import time
from datetime import date
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from mlx_patternkv import PatternKVCache, PatternKVConfig

CHUNK = 2048  # mlx-lm's default prefill step


def kv_stream(b, h, t, d, dtype, seed=0):
    """Keys/values with the structure real ones have (shared directions, outlier channels), in
    chunks of CHUNK tokens: yields (k, v) [B, H, n, D]."""
    key = mx.random.key(seed)
    k1, k2, k3 = mx.random.split(key, 3)
    centers = mx.random.normal((b, h, 16, d), key=k1) * 2
    scale = 1 + 6 * (mx.random.uniform(shape=(1, h, 1, d), key=k2) > 0.97)  # a few outlier channels
    for i, s in enumerate(range(0, t, CHUNK)):
        n = min(CHUNK, t - s)
        ka, kb, kc = mx.random.split(mx.random.key(i + 17 * seed + 1), 3)
        which = mx.random.randint(0, 16, (b, h, n), key=ka)
        base = mx.take_along_axis(centers, which[..., None], axis=2)
        k = (base + 0.5 * mx.random.normal((b, h, n, d), key=kb)) * scale
        v = mx.random.normal((b, h, n, d), key=kc) * 0.7 + 0.5 * base
        yield k.astype(dtype), v.astype(dtype)


def make_cache(method: str, bits: int = None):
    """method: fp16 | mlx-q (mlx-lm QuantizedKVCache, group 64) | kivi (ours, no patterns) | patternkv."""
    if method == "fp16":
        return KVCache()
    if method == "mlx-q":
        return QuantizedKVCache(group_size=64, bits=bits)
    if method == "kivi":
        return PatternKVCache(PatternKVConfig(k_bits=bits, v_bits=bits, k_patterns=0, v_patterns=0))
    if method == "patternkv":
        return PatternKVCache(PatternKVConfig(k_bits=bits, v_bits=bits))
    raise ValueError(f"unknown method {method}")


def fill(cache, b, h, t, d, dtype, seed=0):
    """Prefill `cache` with t tokens in CHUNK-token updates (no attention), evaluating each chunk."""
    for k, v in kv_stream(b, h, t, d, dtype, seed):
        if isinstance(cache, KVCache):
            k, v = k.astype(mx.float16), v.astype(mx.float16)  # the FP16 baseline stores fp16
        cache.update_and_fetch(k, v)
        mx.eval(cache.state)
    return cache


def timeit(fn, warmup=3, iters=20):
    """Median wall time of fn() (which returns arrays to evaluate), in ms."""
    for _ in range(warmup):
        mx.eval(fn())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1000 * times[len(times) // 2]


def machine():
    dev = mx.default_device()
    info = {"device": str(dev), "platform": platform.platform(), "mlx": mx.__version__, "date": date.today().isoformat()}
    if mx.cuda.is_available():
        info["gpu"] = "cuda"
    return info


def write_json(name, rows, extra=None):
    out = Path(os.environ.get("OUT", "results"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **(extra or {}), "rows": rows}, indent=1))
    print(f"wrote {path}")


def table(rows, cols):
    """Print rows (dicts) as a fixed-width table."""
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(cols, widths)))


def _fmt(x):
    if isinstance(x, float):
        return f"{x:.4g}"
    return "" if x is None else str(x)
