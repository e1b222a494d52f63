# Copyright © 2026 mlx-patternkv authors.
"""`PatternKVCache`: the compressed storage of one attention layer, as an mlx-lm cache.

Layout (docs/DESIGN.md has the table): per sequence b and KV head h, pattern banks, uint8 pattern
indices, the K residual quantized per channel over groups of G tokens (stored transposed, [D, T]),
the V residual quantized per token over groups of Gv channels ([T, D]) and an FP16 window of the
most recent tokens. Nothing else is kept: no full-precision copy of a quantized token exists.

Tokens of an update are *pending* until the next update (or any read of the state): attention over a
chunk sees the compressed history plus the chunk's own exact keys and values, as in the paper's
prefill, and only then are they committed to the window and, when it is full, flushed.
"""

import json

import mlx.core as mx
from mlx_lm.models.cache import _BaseCache, create_attention_mask

from . import kernels, patterns
from .config import NO_PATTERN, PatternKVConfig
from .quantize import quantize

STATE_VERSION = 1
TOKEN_STEP = 1024  # quantized-token capacity grows by this many tokens (a multiple of 128)
BANK_STEP = 32  # bank capacity grows by this many patterns


def _patterns_of(bank, idx, dtype):
    """bank [B, H, M, D], idx [B, H, T] uint8 -> the pattern of every token [B, H, T, D] in dtype;
    zeros where idx is NO_PATTERN."""
    safe = mx.where(idx == NO_PATTERN, 0, idx).astype(mx.int32)
    c = mx.take_along_axis(bank, safe[..., None], axis=2).astype(dtype)
    return mx.where((idx == NO_PATTERN)[..., None], mx.array(0, dtype), c)


def _grow(x: mx.array, axis: int, extra: int) -> mx.array:
    shape = list(x.shape)
    shape[axis] = extra
    return mx.concatenate([x, mx.zeros(shape, x.dtype)], axis=axis)


class PatternKVCache(_BaseCache):
    """KV cache storing keys and values as pattern index + low-bit residual (PatternKV)."""

    def __init__(self, config: PatternKVConfig = None):
        self.config = config or PatternKVConfig()
        self.offset = 0
        self.dtype = mx.float32  # dtype of the model's keys (seen at the last update)
        self._reset()

    def _reset(self):
        self.n_quant = 0  # quantized tokens (a multiple of the window)
        self.n_win = 0  # tokens in the FP16 window
        self.n_kpat = self.n_vpat = 0  # valid patterns
        self.k_mined = self.v_mined = 0  # patterns found by k-means at the first flush
        self.first_flush = 0  # tokens quantized by the first flush (assigned to the mined bank)
        self.k_bank = self.k_idx = self.k_codes = self.k_scales = self.k_mins = None
        self.v_bank = self.v_idx = self.v_codes = self.v_scales = self.v_mins = None
        self.k_win = self.v_win = None
        self.pending = None  # (keys, values) [B, H, L, D] of the last update, not yet committed
        self._fetched = None  # the lazy dense (keys, values) returned by the last update
        # (n_quant, dtype, k, v): the lazy dequantized quantized tokens of one-token updates, built
        # once per flush instead of once per decode step (building the graph costs host time)
        self._qdense = None

    # ------------------------------------------------------------------ mlx-lm cache protocol
    def update_and_fetch(self, keys, values):
        """keys, values: [B, H_kv, L, D] (keys after RoPE). Returns lazily dequantized K/V of every
        token, [B, H_kv, offset, D]; they cost nothing unless a model with its own attention math
        reads them (our attention works on the compressed form)."""
        self._commit()
        if keys.shape[-1] % 32 or values.shape[-1] % 32:
            raise ValueError(
                f"PatternKV needs head_dim a multiple of 32, got keys {keys.shape[-1]}, values {values.shape[-1]}"
            )
        if self.k_win is not None and keys.shape[:2] != self.k_win.shape[:2]:
            raise ValueError(
                f"batch/heads changed: cache holds {tuple(self.k_win.shape[:2])}, update has {tuple(keys.shape[:2])}"
            )
        self.pending = (keys, values)
        self.dtype = keys.dtype
        self.offset += keys.shape[2]
        self._fetched = self._dense(keys.dtype, reuse=keys.shape[2] == 1)
        return self._fetched

    def fetched(self, keys, values) -> bool:
        """True when (keys, values) are the arrays the last update returned, unchanged."""
        return self._fetched is not None and keys is self._fetched[0] and values is self._fetched[1]

    def keys_and_values(self):
        """Lazily dequantized K/V of every token, in the dtype of the model's keys."""
        return self._dense(self.pending[0].dtype if self.pending else self.dtype)

    def make_mask(self, *args, **kwargs):
        return create_attention_mask(*args, offset=self.offset, **kwargs)

    def size(self):
        return self.offset

    def empty(self):
        return self.offset == 0

    def is_trimmable(self):
        return True

    def trim(self, n: int) -> int:
        """Drop the last n tokens. Tokens of a partially kept window-sized block go back into the
        window as their dequantized values (what attention saw), and patterns added by flushes of
        dropped blocks leave the banks, so the cache equals one that never saw the dropped tokens,
        up to those tokens' quantization."""
        self._commit()
        self._qdense = None
        n = max(0, min(n, self.offset))
        keep = self.offset - n
        self.offset = keep
        if keep >= self.n_quant:
            self.n_win = keep - self.n_quant
            return n
        if keep == 0:
            self._reset()
            return n
        w = self.config.window
        keep_q = keep // w * w
        if keep > keep_q:
            k, v = self._dequant(keep_q, keep)  # [B, H, keep - keep_q, D] fp32
            self.k_win[:, :, : keep - keep_q] = k.astype(self.k_win.dtype)
            self.v_win[:, :, : keep - keep_q] = v.astype(self.v_win.dtype)
        self.n_win = keep - keep_q
        self.n_quant = keep_q
        if keep_q == 0:
            self.n_kpat = self.n_vpat = self.k_mined = self.v_mined = self.first_flush = 0
        else:
            self.first_flush = min(self.first_flush, keep_q)
            grown = (keep_q - self.first_flush) // self.config.group_size
            cap = self.config.max_patterns
            self.n_kpat = min(cap, self.k_mined + grown) if self.k_mined else 0
            self.n_vpat = min(cap, self.v_mined + grown) if self.v_mined else 0
        for bank, m in ((self.k_bank, self.n_kpat), (self.v_bank, self.n_vpat)):
            if bank is not None:
                bank[:, :, m:] = 0
        return n

    @property
    def nbytes(self) -> int:
        """Every byte this cache holds (banks, indices, codes, scales, mins, window, spare capacity)."""
        self._commit()
        return sum(a.nbytes for a in self._arrays() if a is not None)

    def _arrays(self):
        return (
            self.k_bank, self.k_idx, self.k_codes, self.k_scales, self.k_mins,
            self.v_bank, self.v_idx, self.v_codes, self.v_scales, self.v_mins,
            self.k_win, self.v_win,
        )  # fmt: skip

    @property
    def state(self):
        """Arrays trimmed to what is used, plus a JSON string with the counters and the config."""
        self._commit()
        q, nw = self.n_quant, self.n_win
        cfg = self.config
        kw, vw, g = q * cfg.k_bits // 32, q * cfg.v_bits // 32, q // cfg.group_size

        def cut(a, n, axis):
            return None if a is None else a[(slice(None),) * axis + (slice(0, n),)]

        arrays = (
            cut(self.k_bank, self.n_kpat, 2), cut(self.k_idx, q, 2),
            cut(self.k_codes, kw, 3), cut(self.k_scales, g, 3), cut(self.k_mins, g, 3),
            cut(self.v_bank, self.n_vpat, 2), cut(self.v_idx, q, 2),
            cut(self.v_codes, q, 2), cut(self.v_scales, q, 2), cut(self.v_mins, q, 2),
            cut(self.k_win, nw, 2), cut(self.v_win, nw, 2),
        )  # fmt: skip
        meta = dict(
            version=STATE_VERSION, config=json.loads(cfg.to_json()), offset=self.offset,
            n_quant=q, n_win=nw, n_kpat=self.n_kpat, n_vpat=self.n_vpat,
            k_mined=self.k_mined, v_mined=self.v_mined, first_flush=self.first_flush,
            dtype=str(self.dtype).rsplit(".", 1)[-1],
        )  # fmt: skip
        return (*arrays, json.dumps(meta))

    @state.setter
    def state(self, v):
        try:
            *arrays, meta = v
            meta = json.loads(meta)
            if meta.get("version") != STATE_VERSION:
                raise ValueError(f"state version {meta.get('version')}, expected {STATE_VERSION}")
            self.config = PatternKVConfig(**meta["config"])
            self._reset()
            self.dtype = getattr(mx, meta["dtype"])
            for name in ("offset", "n_quant", "n_win", "n_kpat", "n_vpat", "k_mined", "v_mined", "first_flush"):
                setattr(self, name, int(meta[name]))
            if len(arrays) != 12:
                raise ValueError(f"expected 12 arrays, got {len(arrays)}")
            (self.k_bank, self.k_idx, self.k_codes, self.k_scales, self.k_mins,
             self.v_bank, self.v_idx, self.v_codes, self.v_scales, self.v_mins,
             k_win, v_win) = arrays  # fmt: skip
            if k_win is not None:
                w = self.config.window
                self.k_win = _grow(k_win, 2, w - k_win.shape[2])
                self.v_win = _grow(v_win, 2, w - v_win.shape[2])
            self._check()
            self._fit_capacity()
        except (ValueError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
            raise ValueError(f"corrupt or mismatched PatternKV cache state: {e}") from None

    def _check(self):
        """Validate shapes and counters after a state load."""
        cfg, q = self.config, self.n_quant
        if self.k_win is None:
            if self.offset or q or self.n_win:
                raise ValueError("counters say tokens are stored but no arrays were given")
            return
        b, h, w, d = self.k_win.shape
        dv = self.v_win.shape[-1]
        if w != cfg.window or self.v_win.shape[:3] != (b, h, w):
            raise ValueError(f"window arrays {self.k_win.shape} / {self.v_win.shape} do not match the config")
        if self.offset != q + self.n_win or q % cfg.window or self.n_win >= cfg.window:
            raise ValueError(f"inconsistent counters offset={self.offset} n_quant={q} n_win={self.n_win}")
        gv = cfg.v_group_size(dv)
        want = {
            "k_codes": (b, h, d, q * cfg.k_bits // 32),
            "k_scales": (b, h, d, q // cfg.group_size),
            "k_mins": (b, h, d, q // cfg.group_size),
            "v_codes": (b, h, q, dv * cfg.v_bits // 32),
            "v_scales": (b, h, q, dv // gv),
            "v_mins": (b, h, q, dv // gv),
        }
        if cfg.k_patterns:
            want |= {"k_bank": (b, h, self.n_kpat, d), "k_idx": (b, h, q)}
        if cfg.v_patterns:
            want |= {"v_bank": (b, h, self.n_vpat, dv), "v_idx": (b, h, q)}
        if q == 0:  # nothing quantized yet: no quantized arrays at all
            want = {}
            for name in ("k_bank", "k_idx", "k_codes", "k_scales", "k_mins", "v_bank", "v_idx", "v_codes", "v_scales", "v_mins"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} given but no token is quantized")
        for name, shape in want.items():
            a = getattr(self, name)
            if a is None or tuple(a.shape) != shape:
                got = None if a is None else tuple(a.shape)
                raise ValueError(f"{name} has shape {got}, expected {shape}")

    def _fit_capacity(self):
        """Give loaded arrays the capacity a cache grown token by token has, so that attention runs on
        the same shapes and gives bit-identical results."""
        if not self.n_quant:
            return
        b, h, _, d = self.k_win.shape
        dv = self.v_win.shape[-1]
        want = -(-self.n_quant // TOKEN_STEP) * TOKEN_STEP
        self._reserve(want - self.n_quant, b, h, d, dv)
        for name, m, dim in (("k_bank", self.n_kpat, d), ("v_bank", self.n_vpat, dv)):
            if getattr(self, name) is not None:
                self._reserve_bank(name, min(self.config.max_patterns, -(-m // BANK_STEP) * BANK_STEP), b, h, dim)

    def __deepcopy__(self, memo):
        self._commit()
        new = PatternKVCache.__new__(PatternKVCache)
        for k, v in self.__dict__.items():
            new.__dict__[k] = mx.array(v) if isinstance(v, mx.array) else v
        new._fetched = new._qdense = None
        return new

    # ------------------------------------------------------------------ storage internals
    def _dense(self, dtype, reuse=False):
        """Lazy dense K/V of every token (quantized part dequantized), [B, H, offset, D]. reuse: take
        the quantized part from (and keep it in) self._qdense while no flush changed it. Only
        one-token updates reuse, and attention.compressed_attention drops the memo when it attends
        over the dense K/V: an evaluated copy kept until the next flush would hold the whole history
        in full precision. (A model whose attention bypasses mlx-lm's scaled_dot_product_attention
        evaluates it every step anyway; for it the copy stays between steps.)"""
        ks, vs = [], []
        if self.n_quant:
            memo = self._qdense
            if reuse and memo is not None and memo[0] == self.n_quant and memo[1] == dtype:
                k, v = memo[2], memo[3]
            else:
                k, v = self._dequant(0, self.n_quant, dtype)
                if reuse:
                    self._qdense = (self.n_quant, dtype, k, v)
            ks.append(k)
            vs.append(v)
        if self.n_win:
            ks.append(self.k_win[:, :, : self.n_win].astype(dtype))
            vs.append(self.v_win[:, :, : self.n_win].astype(dtype))
        if self.pending is not None:
            ks.append(self.pending[0].astype(dtype))
            vs.append(self.pending[1].astype(dtype))
        if len(ks) == 1:
            return ks[0], vs[0]
        return mx.concatenate(ks, axis=2), mx.concatenate(vs, axis=2)

    def _dequant(self, t0: int, t1: int, dtype=mx.float32):
        """Dequantized K/V of quantized tokens [t0, t1): [B, H, t1 - t0, D] in dtype (one fused
        `mx.dequantize` per residual, then the patterns added)."""
        cfg = self.config
        g, bk, bv = cfg.group_size, cfg.k_bits, cfg.v_bits
        t0g, t1g = t0 // g * g, -(-t1 // g) * g
        k = mx.dequantize(
            self.k_codes[..., t0g * bk // 32 : t1g * bk // 32],
            self.k_scales[..., t0g // g : t1g // g].astype(dtype),
            self.k_mins[..., t0g // g : t1g // g].astype(dtype),
            group_size=g, bits=bk,
        ).swapaxes(-1, -2)[:, :, t0 - t0g : t1 - t0g]  # [B, H, T, D]  fmt: skip
        v = mx.dequantize(
            self.v_codes[:, :, t0:t1], self.v_scales[:, :, t0:t1].astype(dtype), self.v_mins[:, :, t0:t1].astype(dtype),
            group_size=cfg.v_group_size(self.v_win.shape[-1]), bits=bv,
        )  # [B, H, T, Dv]  fmt: skip
        if self.k_bank is not None:
            k = k + _patterns_of(self.k_bank, self.k_idx[:, :, t0:t1], dtype)
        if self.v_bank is not None:
            v = v + _patterns_of(self.v_bank, self.v_idx[:, :, t0:t1], dtype)
        return k, v

    def _commit(self):
        """Move the pending tokens into the window; flush it when it reaches `window` tokens."""
        if self.pending is None:
            return
        keys, values = self.pending
        self.pending = self._fetched = None
        cfg = self.config
        b, h, n_new, d = keys.shape
        dv = values.shape[-1]
        if self.k_win is None:
            cfg.v_group_size(dv)  # raises for an unsupported head_dim
            self.k_win = mx.zeros((b, h, cfg.window, d), cfg.mx_dtype)
            self.v_win = mx.zeros((b, h, cfg.window, dv), cfg.mx_dtype)
        w, nw = cfg.window, self.n_win
        total = nw + n_new
        n_flush = total // w * w
        if n_flush == 0:
            self.k_win[:, :, nw:total] = keys.astype(self.k_win.dtype)
            self.v_win[:, :, nw:total] = values.astype(self.v_win.dtype)
            self.n_win = total
            return
        # every token not yet quantized, in order: the window, then the new tokens
        fk = mx.concatenate([self.k_win[:, :, :nw].astype(mx.float32), keys.astype(mx.float32)], axis=2)
        fv = mx.concatenate([self.v_win[:, :, :nw].astype(mx.float32), values.astype(mx.float32)], axis=2)
        self._flush(fk, fv, n_flush)
        rest = total - n_flush
        if rest:
            self.k_win[:, :, :rest] = fk[:, :, n_flush:].astype(self.k_win.dtype)
            self.v_win[:, :, :rest] = fv[:, :, n_flush:].astype(self.v_win.dtype)
        self.n_win = rest

    def _flush(self, fk, fv, n: int):
        """Quantize the first n tokens of fk, fv [B, H, T, D] (fp32), n a multiple of the window.

        K and V apart: on a GPU back-end (kernels.backend()) each goes through one fused
        `kernels.flush` launch when it can: a flush of one window (the decode steady state), after
        the first flush or with patterns off, and a shape the kernel supports. The first flush of a
        part with patterns (k-means mining) and prefill-sized flushes of several windows take the
        MLX-ops path, which was faster for those (H200, SmolLM2 8K prefill: 1.7 s against 5.2 s with
        a kernel variant since reverted; docs/DESIGN.md).
        Both give bit-identical storage."""
        cfg = self.config
        self._qdense = None
        b, h, t, d = fk.shape
        dv = fv.shape[-1]
        rows = b * h
        first = self.n_quant == 0
        self._reserve(n, b, h, d, dv)
        mined_k = mined_v = None
        if first:
            mined_k, mined_v = patterns.mine(fk.reshape(rows, t, d), fv.reshape(rows, t, dv), cfg)
            self.first_flush = n
        be = kernels.backend()
        if be is not None and self._fusable("k", d, first, n):
            self._flush_kernel("k", fk, n)
        else:
            self._flush_portable("k", fk[:, :, :n], mined_k)
        if be is not None and self._fusable("v", dv, first, n):
            self._flush_kernel("v", fv, n)
        else:
            self._flush_portable("v", fv[:, :, :n], mined_v)
        self.n_quant += n

    def _part(self, part):
        """(patterns on, bits, valid patterns in the bank) of `part` ("k" / "v")."""
        cfg = self.config
        if part == "k":
            return cfg.k_patterns, cfg.k_bits, self.n_kpat
        return cfg.v_patterns, cfg.v_bits, self.n_vpat

    def _set_patterns(self, part, n_pat):
        """The bank of `part` holds n_pat valid patterns now."""
        if part == "k":
            self.n_kpat = n_pat
        else:
            self.n_vpat = n_pat

    def _fusable(self, part, d, first, n) -> bool:
        """Whether the flush of n tokens of `part` ("k" / "v") goes through `kernels.flush`: one
        window; patterns off (no mining, the bank stays None), or a later flush on a non-empty bank;
        and a supported shape."""
        cfg = self.config
        if n != cfg.window:
            return False
        on, bits, n_pat = self._part(part)
        if on and (first or n_pat == 0):
            return False
        h = self.k_win.shape[1]
        return kernels.supports(d, h, h, bits, bits, cfg.group_size)

    def _flush_kernel(self, part, x, n):
        """One `kernels.flush` launch for the first n tokens of x [B, H, T, D] (fp32): the bank grows
        by the first k group centres (k up to the cap), indices, codes, scales and mins are stored."""
        cfg = self.config
        b, h, _, d = x.shape
        g = cfg.group_size
        on, bits, n_pat = self._part(part)
        bank = getattr(self, part + "_bank") if on else None
        values = part == "v"
        idx, codes, scales, mins, centers = kernels.flush(
            x, bank, n_pat, n, bits=bits, group_size=g, values=values,
            v_group_size=cfg.v_group_size(d) if values else None, max_patterns=cfg.max_patterns,
            gate_z=cfg.v_gate_z if values and cfg.v_gate else None, dtype=cfg.mx_dtype,
        )  # fmt: skip
        if bank is not None:
            k = min(n // g, max(0, cfg.max_patterns - n_pat))
            if k:
                self._reserve_bank(part + "_bank", n_pat + k, b, h, d)
                getattr(self, part + "_bank")[:, :, n_pat : n_pat + k] = centers[:, :, :k]
            self._set_patterns(part, n_pat + k)
        self._store(part, n, idx if bank is not None else None, codes, scales, mins)

    def _flush_portable(self, part, x, mined):
        """The MLX-ops flush of x [B, H, n, D] (fp32, the tokens to quantize) for `part` ("k" / "v").
        `mined`: the k-means bank at the first flush (None later, or with patterns off)."""
        cfg = self.config
        b, h, n, d = x.shape
        rows = b * h
        g = cfg.group_size
        values = part == "v"
        xr = x.reshape(rows, n, d)
        idx = bank = None
        on, _, n_pat = self._part(part)
        if on:
            idx, n_pat = self._assign(part + "_bank", xr, n_pat, mined)
            self._set_patterns(part, n_pat)
            if values:
                self.v_mined = self.v_mined or n_pat
            else:
                self.k_mined = self.k_mined or n_pat
            bank = getattr(self, part + "_bank")[:, :, :n_pat].reshape(rows, -1, d)
        if values:
            r, idx = patterns.residuals(xr, bank, idx, cfg.v_gate_z if cfg.v_gate else None)
            # V: per token, groups of gv channels, stored [T, D]
            codes, scales, mins = quantize(r.reshape(b, h, n, d), cfg.v_bits, cfg.v_group_size(d), cfg.mx_dtype)
        else:
            r, idx = patterns.residuals(xr, bank, idx)
            # K: per channel, groups of g tokens, stored [D, T]
            codes, scales, mins = quantize(r.reshape(b, h, n, d).swapaxes(-1, -2), cfg.k_bits, g, cfg.mx_dtype)
        self._store(part, n, None if idx is None else idx.reshape(b, h, n), codes, scales, mins)

    def _store(self, part, n, idx, codes, scales, mins):
        """Write one flush of n tokens of `part` ("k" / "v") at quantized position n_quant: indices
        [B, H, n] (None without patterns), codes / scales / mins in the part's layout (K per channel
        [.., D, ..], V per token [.., n, ..])."""
        cfg = self.config
        g = cfg.group_size
        q0, q1 = self.n_quant, self.n_quant + n
        if idx is not None:
            getattr(self, part + "_idx")[:, :, q0:q1] = idx
        if part == "v":
            self.v_codes[:, :, q0:q1] = codes
            self.v_scales[:, :, q0:q1] = scales
            self.v_mins[:, :, q0:q1] = mins
        else:
            self.k_codes[..., q0 * cfg.k_bits // 32 : q1 * cfg.k_bits // 32] = codes
            self.k_scales[..., q0 // g : q1 // g] = scales
            self.k_mins[..., q0 // g : q1 // g] = mins

    def _assign(self, name, x, n_pat, mined):
        """Pattern indices for x [N, n, D]. At the first flush `mined` is the k-means bank [N, k', D]:
        it becomes the bank and tokens go to the L2-nearest pattern. Later, group by group, the bank
        grows by the group's Chebyshev centre (up to the cap) and tokens go to the min-max-nearest."""
        rows, n, d = x.shape
        b, h = self.k_win.shape[:2]
        if mined is not None:
            n_pat = mined.shape[1]
            self._reserve_bank(name, n_pat, b, h, d)
            getattr(self, name)[:, :, :n_pat] = mined.reshape(b, h, n_pat, d)
            return patterns.assign_l2(x, mined), n_pat
        bank = getattr(self, name)[:, :, :n_pat].reshape(rows, n_pat, d)
        new, idx = patterns.grow_and_assign(x, bank, self.config.group_size, self.config.max_patterns)
        add = new.shape[1]
        if add:
            self._reserve_bank(name, n_pat + add, b, h, d)
            getattr(self, name)[:, :, n_pat : n_pat + add] = new.reshape(b, h, add, d)
        return idx, n_pat + add

    def _reserve_bank(self, name, m, b, h, d):
        bank = getattr(self, name)
        cap = 0 if bank is None else bank.shape[2]
        if m <= cap:
            return
        new_cap = min(self.config.max_patterns, -(-m // BANK_STEP) * BANK_STEP)
        if bank is None:
            setattr(self, name, mx.zeros((b, h, new_cap, d), self.config.mx_dtype))
        else:
            setattr(self, name, _grow(bank, 2, new_cap - cap))

    def _reserve(self, n, b, h, d, dv):
        """Make room for n more quantized tokens (capacity grows in steps of TOKEN_STEP tokens)."""
        cfg = self.config
        cap = 0 if self.k_codes is None else self.k_scales.shape[-1] * cfg.group_size
        need = self.n_quant + n
        if need <= cap:
            return
        new_cap = -(-need // TOKEN_STEP) * TOKEN_STEP
        extra = new_cap - cap
        g, gv = cfg.group_size, cfg.v_group_size(dv)
        dt = cfg.mx_dtype
        if self.k_codes is None:
            z = mx.zeros
            self.k_codes = z((b, h, d, 0), mx.uint32)
            self.k_scales, self.k_mins = z((b, h, d, 0), dt), z((b, h, d, 0), dt)
            self.v_codes = z((b, h, 0, dv * cfg.v_bits // 32), mx.uint32)
            self.v_scales, self.v_mins = z((b, h, 0, dv // gv), dt), z((b, h, 0, dv // gv), dt)
            if cfg.k_patterns:
                self.k_idx = z((b, h, 0), mx.uint8)
            if cfg.v_patterns:
                self.v_idx = z((b, h, 0), mx.uint8)
        self.k_codes = _grow(self.k_codes, 3, extra * cfg.k_bits // 32)
        self.k_scales = _grow(self.k_scales, 3, extra // g)
        self.k_mins = _grow(self.k_mins, 3, extra // g)
        self.v_codes = _grow(self.v_codes, 2, extra)
        self.v_scales = _grow(self.v_scales, 2, extra)
        self.v_mins = _grow(self.v_mins, 2, extra)
        if self.k_idx is not None:
            self.k_idx = _grow(self.k_idx, 2, extra)
        if self.v_idx is not None:
            self.v_idx = _grow(self.v_idx, 2, extra)


def kv_bytes_per_token(config: PatternKVConfig, head_dim: int, n_kv_heads: int) -> float:
    """Bytes per token per layer of the quantized part (codes, scales, mins, indices), K and V.
    Fixed costs (window, banks) come on top: see `fixed_bytes`."""
    fp = 4 if config.dtype == "float32" else 2
    gv = config.v_group_size(head_dim)
    k = head_dim * config.k_bits / 8 + 2 * fp * head_dim / config.group_size + (1 if config.k_patterns else 0)
    v = head_dim * config.v_bits / 8 + 2 * fp * head_dim / gv + (1 if config.v_patterns else 0)
    return n_kv_heads * (k + v)


def fixed_bytes(config: PatternKVConfig, head_dim: int, n_kv_heads: int, n_patterns: int) -> int:
    """Bytes per layer that do not grow with every token: the two FP16 windows and the banks."""
    fp = 4 if config.dtype == "float32" else 2
    banks = (bool(config.k_patterns) + bool(config.v_patterns)) * n_patterns * head_dim * fp
    return n_kv_heads * (2 * config.window * head_dim * fp + banks)
