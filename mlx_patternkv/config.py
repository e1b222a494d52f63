# Copyright © 2026 mlx-patternkv authors.
"""Settings of the PatternKV cache."""

from dataclasses import asdict, dataclass
import json

import mlx.core as mx

BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128)
DTYPES = ("float16", "bfloat16", "float32")
# uint8 indices; the value 255 marks a V token whose gate is off (no pattern added back)
NO_PATTERN = 255
MAX_PATTERNS = 255


@dataclass(frozen=True)
class PatternKVConfig:
    """How a PatternKV cache stores keys and values.

    k_bits / v_bits: residual bits for keys / values (2, 3, 4 or 8).
    group_size: tokens per K quantization group (per channel) and channels per V group (per token;
        clipped to a divisor of head_dim).
    window: FP16 tokens kept before a flush (a multiple of group_size). Fill-then-flush: when the
        window holds `window` tokens they are all quantized.
    k_patterns / v_patterns: size of the bank mined by k-means at the first flush; 0 turns patterns
        off (plain per-channel-K / per-token-V quantization, KIVI-style).
    max_patterns: bank cap (indices are uint8). At the cap, flushes stop adding patterns and assign
        to the existing bank.
    kmeans_iters / kmeans_tol / seed: Lloyd iterations, stop when no centroid moves more than tol,
        seed for the initial centroids.
    v_gate / v_gate_z: subtract the V pattern only where the test of PATTERNKV.md passes.
    dtype: dtype of the stored floating-point parts (banks, scales, mins, window).
    """

    k_bits: int = 4
    v_bits: int = 4
    group_size: int = 128
    window: int = 128
    k_patterns: int = 32
    v_patterns: int = 32
    max_patterns: int = MAX_PATTERNS
    kmeans_iters: int = 30
    kmeans_tol: float = 1e-4
    seed: int = 0
    v_gate: bool = True
    v_gate_z: float = 1.645
    dtype: str = "float16"

    def __post_init__(self):
        def bad(field, allowed):
            value = getattr(self, field)
            raise ValueError(f"PatternKVConfig.{field}={value!r} is invalid: allowed {allowed}")

        for field in ("k_bits", "v_bits"):
            if getattr(self, field) not in BITS:
                bad(field, "one of 2, 3, 4, 8")
        if self.group_size not in GROUP_SIZES:
            bad("group_size", "one of 32, 64, 128")
        if not isinstance(self.window, int) or self.window < self.group_size or self.window % self.group_size:
            bad("window", f"a positive multiple of group_size ({self.group_size})")
        if not isinstance(self.max_patterns, int) or not 1 <= self.max_patterns <= MAX_PATTERNS:
            bad("max_patterns", f"an integer in 1..{MAX_PATTERNS} (indices are uint8, 255 is reserved)")
        for field in ("k_patterns", "v_patterns"):
            value = getattr(self, field)
            if not isinstance(value, int) or not 0 <= value <= self.max_patterns:
                bad(field, f"an integer in 0..max_patterns ({self.max_patterns}); 0 turns patterns off")
        if not isinstance(self.kmeans_iters, int) or self.kmeans_iters < 1:
            bad("kmeans_iters", "an integer >= 1")
        if not self.kmeans_tol >= 0:
            bad("kmeans_tol", "a number >= 0")
        if not isinstance(self.seed, int):
            bad("seed", "an integer")
        if not isinstance(self.v_gate, bool):
            bad("v_gate", "True or False")
        if not self.v_gate_z > 0:
            bad("v_gate_z", "a number > 0")
        if self.dtype not in DTYPES:
            bad("dtype", "one of " + ", ".join(DTYPES))

    @property
    def mx_dtype(self):
        return getattr(mx, self.dtype)

    def v_group_size(self, head_dim: int) -> int:
        """Channels per V group: the largest of 32/64/128 that is <= group_size and divides head_dim."""
        for g in sorted(GROUP_SIZES, reverse=True):
            if g <= self.group_size and head_dim % g == 0:
                return g
        raise ValueError(f"head_dim {head_dim} is not a multiple of 32: PatternKV cannot store it")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PatternKVConfig":
        return cls(**json.loads(text))
