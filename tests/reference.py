"""A plain-numpy reference of PatternKV (PATTERNKV.md plus this project's documented choices), written
independently of the package: its own quantizer, bit unpacking, k-means, gate and flush schedule.
Only the k-means initial indices are taken from the package (numpy cannot reproduce MLX's RNG)."""

import numpy as np

NO_PATTERN = 255


def f16(x):
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def quantize(x, bits, group):
    """x [..., N] -> (codes int [..., N], scale [..., N/group], min [..., N/group]) (fp16-rounded)."""
    *lead, n = x.shape
    g = x.reshape(*lead, n // group, group).astype(np.float32)
    mn = f16(g.min(-1))
    scale = f16((g.max(-1) - g.min(-1)) / np.float32(2**bits - 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint((g - mn[..., None]) / scale[..., None])
    q = np.where(scale[..., None] > 0, np.clip(q, 0, 2**bits - 1), 0)
    return q.reshape(*lead, n).astype(np.int64), scale, mn


def dequantize(codes, scale, mn, group):
    *lead, n = codes.shape
    q = codes.reshape(*lead, n // group, group).astype(np.float32)
    return (q * scale[..., None] + mn[..., None]).reshape(*lead, n)


def unpack(words, bits):
    """uint32 words [..., W] (LSB-first bit stream) -> codes [..., W * 32 / bits]."""
    w = np.asarray(words, np.uint64)
    bitstream = (w[..., None] >> np.arange(32, dtype=np.uint64)) & 1  # [..., W, 32]
    bitstream = bitstream.reshape(*w.shape[:-1], -1, bits)  # [..., N, bits]
    return (bitstream * (1 << np.arange(bits, dtype=np.uint64))).sum(-1).astype(np.int64)


def kmeans(x, init, iters, tol):
    """x [T, D], init [k] token indices. Lloyd with farthest-token refill of empty clusters."""
    c = x[init].astype(np.float32)
    k = len(init)
    for _ in range(iters):
        d = ((x[:, None, :] - c[None]) ** 2).sum(-1)  # [T, k]
        a = d.argmin(-1)
        far = np.argsort(-d.min(-1), kind="stable")
        new = np.empty_like(c)
        r = 0
        for j in range(k):
            members = x[a == j]
            if len(members):
                new[j] = members.mean(0)
            else:
                new[j] = x[far[r]]
                r += 1
        shift = np.sqrt(((new - c) ** 2).sum(-1)).max()
        c = new
        if shift <= tol:
            break
    return c


def gate(v, c, z):
    r = v - c
    rv = v.max(-1) - v.min(-1)
    rho = (r.max(-1) - r.min(-1)) / np.where(rv > 0, rv, 1)
    return (rv > 0) & (1 - rho**2 >= 2 * z / np.sqrt(5 * v.shape[-1]) * np.sqrt(1 + rho**4))


class RefHead:
    """The cache of one (sequence, KV head)."""

    def __init__(self, cfg, init_fn):
        self.cfg = cfg
        self.init_fn = init_fn  # (T, k) -> this row's k-means initial token indices
        self.window_k, self.window_v = [], []  # fp16-rounded vectors
        self.kbank, self.vbank = [], []
        self.kidx, self.vidx = [], []
        self.kq, self.vq = [], []  # per flushed group: (codes, scale, min)
        self.mined = False

    def commit(self, k, v):
        """k, v [L, D]: tokens after the attention of their chunk."""
        cfg = self.cfg
        fk = [*self.window_k, *k]
        fv = [*self.window_v, *v]
        n = len(fk) // cfg.window * cfg.window
        if n:
            self.flush(np.array(fk), np.array(fv), n)
        self.window_k = [f16(x) for x in fk[n:]]
        self.window_v = [f16(x) for x in fv[n:]]

    def flush(self, fk, fv, n):
        cfg = self.cfg
        gk, gv = cfg.group_size, cfg.v_group_size(fv.shape[-1])
        kidx = vidx = None
        if not self.mined:
            if cfg.k_patterns:
                self.kbank = list(f16(kmeans(fk, self.init_fn(len(fk), cfg.k_patterns), cfg.kmeans_iters, cfg.kmeans_tol)))
                kidx = ((fk[:n, None] - np.array(self.kbank)[None]) ** 2).sum(-1).argmin(-1)
            if cfg.v_patterns:
                self.vbank = list(f16(kmeans(fv, self.init_fn(len(fv), cfg.v_patterns), cfg.kmeans_iters, cfg.kmeans_tol)))
                vidx = ((fv[:n, None] - np.array(self.vbank)[None]) ** 2).sum(-1).argmin(-1)
            self.mined = True
        else:
            kidx, vidx = [], []
            for s in range(0, n, gk):
                for bank, out, x, on in ((self.kbank, kidx, fk, cfg.k_patterns), (self.vbank, vidx, fv, cfg.v_patterns)):
                    if not on:
                        continue
                    g = x[s : s + gk]
                    if len(bank) < cfg.max_patterns:
                        bank.append(f16((g.min(0) + g.max(0)) / 2))
                    r = g[:, None, :] - np.array(bank)[None]  # [G, M, D]
                    out.extend((r.max(-1) - r.min(-1)).argmin(-1))
            kidx = np.array(kidx) if cfg.k_patterns else None
            vidx = np.array(vidx) if cfg.v_patterns else None
        rk, rv = fk[:n].astype(np.float32), fv[:n].astype(np.float32)
        if kidx is not None:
            rk = rk - np.array(self.kbank)[kidx]
            self.kidx.extend(kidx)
        if vidx is not None:
            c = np.array(self.vbank)[vidx]
            on = gate(rv, c, cfg.v_gate_z) if cfg.v_gate else np.ones(n, bool)
            rv = rv - np.where(on[:, None], c, 0)
            self.vidx.extend(np.where(on, vidx, NO_PATTERN))
        for s in range(0, n, gk):
            self.kq.append(quantize(rk[s : s + gk].T, cfg.k_bits, gk))  # [D, G] per channel
        self.vq.append(quantize(rv, cfg.v_bits, gv))  # [n, D] per token
        self.gv = gv

    def dense(self):
        """Dequantized K, V of every committed token: [T, D]."""
        cfg = self.cfg
        ks = [dequantize(c, s, m, cfg.group_size).T for c, s, m in self.kq]
        vs = [dequantize(c, s, m, self.gv) for c, s, m in self.vq]
        k = np.concatenate(ks) if ks else np.zeros((0, 0), np.float32)
        v = np.concatenate(vs) if vs else np.zeros((0, 0), np.float32)
        if len(ks):
            if self.kidx:
                k = k + np.array(self.kbank)[np.array(self.kidx)]
            if self.vidx:
                vb = np.concatenate([np.array(self.vbank), np.zeros((1, v.shape[1]), np.float32)])
                v = v + vb[np.minimum(np.array(self.vidx), len(self.vbank))]
        if self.window_k:
            k = np.concatenate([k, np.array(self.window_k)]) if len(ks) else np.array(self.window_k)
            v = np.concatenate([v, np.array(self.window_v)]) if len(vs) else np.array(self.window_v)
        return k, v


def attention(q, k, v, scale):
    """Dense attention of q [Hq, L, D] over k, v [H, T, D], causal for the last L keys (fp64)."""
    hq, l, _ = q.shape
    h, t, _ = k.shape
    r = hq // h
    k = np.repeat(k, r, axis=0).astype(np.float64)
    v = np.repeat(v, r, axis=0).astype(np.float64)
    s = (q.astype(np.float64) * scale) @ k.transpose(0, 2, 1)  # [Hq, L, T]
    allowed = np.arange(t)[None, :] <= (t - l + np.arange(l))[:, None]
    s = np.where(allowed, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return p @ v
