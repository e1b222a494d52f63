# Copyright © 2026 mlx-patternkv authors.
"""PatternKV KV-cache compression for MLX and mlx-lm (arXiv 2510.05176)."""

from .cache import PatternKVCache
from .config import PatternKVConfig
from .integrate import install, load, make_prompt_cache

__version__ = "0.1.0"
__all__ = ["PatternKVConfig", "PatternKVCache", "install", "load", "make_prompt_cache", "__version__"]
