# Copyright © 2026 mlx-patternkv authors.
"""The Metal kernels, checked on Linux without a Mac (every test name contains `metal`, so
`pytest -k metal` runs exactly these; they need clang++).

1. Syntax and types: the complete Metal source MLX would compile for each kernel variant (our header,
   MLX's generated signature, our body; MLX prints it with verbose=True under mx.export_function) is
   compiled by clang++ against SHIM, a small header declaring the Metal types, address spaces,
   attributes and functions the kernels use.
2. Behaviour: the same source, compiled against SHIM's implementations (threadgroups run one at a
   time, each thread a coroutine; barriers and SIMD-group operations synchronise the coroutines and
   a barrier some thread never reaches is reported as a deadlock), runs the kernels through
   kernels.py on the CPU: decode attention and flush are compared with a numpy reference written
   here and with the portable MLX path.
"""

import ctypes
import hashlib
import math
import os
import re
import shutil
import subprocess
import tempfile
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from mlx_patternkv import kernels

CLANG = shutil.which(os.environ.get("CXX_METAL_CHECK", "clang++"))
# In CI the compiler is installed: a missing one must fail there, not skip.
pytestmark = pytest.mark.skipif(CLANG is None and not os.environ.get("CI"), reason="clang++ not installed")

SHIM = r"""
// Metal, as much as the PatternKV kernels use of it, for clang++ on the CPU.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ucontext.h>
#include <vector>

#define device
#define constant
#define threadgroup
#define thread
#define PKV_SHARED static  // threadgroup memory: one copy shared by the coroutines of a threadgroup

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned long ulong;
struct uint3 { uint x, y, z; };

static inline uint16_t shim_f2h(float f) {
  uint32_t x; std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u, e8 = (x >> 23) & 0xffu, mant = x & 0x7fffffu;
  if (e8 == 0xffu) return uint16_t(sign | 0x7c00u | (mant ? 0x200u : 0u));
  int e = int(e8) - 127 + 15;
  if (e >= 31) return uint16_t(sign | 0x7c00u);
  if (e <= 0) {
    if (e < -10) return uint16_t(sign);
    mant |= 0x800000u;
    int shift = 14 - e;
    uint32_t h = mant >> shift, rem = mant & ((1u << shift) - 1u), hlf = 1u << (shift - 1);
    if (rem > hlf || (rem == hlf && (h & 1u))) h++;
    return uint16_t(sign | h);
  }
  uint32_t h = sign | (uint32_t(e) << 10) | (mant >> 13), rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
  return uint16_t(h);
}
static inline float shim_h2f(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (e == 0) { float f = std::ldexp(float(mant), -24); return sign ? -f : f; }
  uint32_t x = e == 31 ? (sign | 0x7f800000u | (mant << 13)) : (sign | ((e - 15 + 127) << 23) | (mant << 13));
  float f; std::memcpy(&f, &x, 4); return f;
}
struct half {
  uint16_t bits;
  half() = default;
  half(float f) : bits(shim_f2h(f)) {}
  operator float() const { return shim_h2f(bits); }
};
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t x; std::memcpy(&x, &f, 4);
    bits = std::isnan(f) ? uint16_t(0x7fc0u) : uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
  }
  operator float() const { uint32_t x = uint32_t(bits) << 16; float f; std::memcpy(&f, &x, 4); return f; }
};
typedef half float16_t;

template <typename T, typename U> static inline T as_type(U u) {
  static_assert(sizeof(T) == sizeof(U), "as_type needs equal sizes");
  T t; std::memcpy(&t, &u, sizeof(T)); return t;
}

// ---- coroutines: one per thread of the running threadgroup
namespace shim {
struct Fiber { ucontext_t ctx; uint tid; long bar; long wsync; bool done; };
static std::vector<Fiber> fibers;
static std::vector<char> stacks;
static ucontext_t main_ctx;
static int cur = 0, nthreads = 0;
static long progress = 0;
static float wbuf[64][32];
static void (*body)(uint) = nullptr;
static const size_t STACK = 1 << 16;

static void yield() { swapcontext(&fibers[cur].ctx, &main_ctx); }
static void barrier() {
  Fiber& f = fibers[cur];
  f.bar++;
  for (;;) {
    bool ok = true;
    for (int i = 0; i < nthreads; ++i) if (fibers[i].bar < f.bar) { ok = false; break; }
    if (ok) break;
    yield();
  }
  progress++;
}
static void warp_sync() {
  Fiber& f = fibers[cur];
  f.wsync++;
  int w0 = int(f.tid) / 32 * 32;
  for (;;) {
    bool ok = true;
    for (int i = w0; i < w0 + 32 && i < nthreads; ++i) if (fibers[i].wsync < f.wsync) { ok = false; break; }
    if (ok) break;
    yield();
  }
  progress++;
}
static void trampoline() { body(fibers[cur].tid); fibers[cur].done = true; }
// Runs one threadgroup of n threads; returns 0, or 1 on a deadlock (a barrier not all threads reach).
static int run_group(int n) {
  nthreads = n;
  fibers.assign(n, Fiber());
  stacks.resize(size_t(n) * STACK);
  for (int i = 0; i < n; ++i) {
    Fiber& f = fibers[i];
    f.tid = uint(i); f.bar = 0; f.wsync = 0; f.done = false;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = &stacks[size_t(i) * STACK];
    f.ctx.uc_stack.ss_size = STACK;
    f.ctx.uc_link = &main_ctx;
    makecontext(&f.ctx, trampoline, 0);
  }
  for (;;) {
    long before = progress;
    int done_before = 0, done_after = 0;
    for (int i = 0; i < n; ++i) done_before += fibers[i].done;
    for (int i = 0; i < n; ++i) {
      if (!fibers[i].done) { cur = i; swapcontext(&main_ctx, &fibers[i].ctx); }
    }
    for (int i = 0; i < n; ++i) done_after += fibers[i].done;
    if (done_after == n) return 0;
    if (progress == before && done_after == done_before) return 1;
  }
}
static float exchange_read(float v, int src) {
  Fiber& f = fibers[cur];
  int w = int(f.tid) / 32, l = int(f.tid) % 32;
  wbuf[w][l] = v;
  warp_sync();
  float r = wbuf[w][src];
  warp_sync();
  return r;
}
}  // namespace shim

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2 };
static inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }
static inline void threadgroup_barrier(mem_flags) { shim::barrier(); }
static inline void simdgroup_barrier(mem_flags) { shim::warp_sync(); }

static inline float simd_shuffle_xor(float x, ushort m) {
  return shim::exchange_read(x, int(shim::fibers[shim::cur].tid % 32) ^ int(m));
}
#define SHIM_SIMD_REDUCE(NAME, OP)                                      \
  static inline float NAME(float x) {                                   \
    shim::Fiber& f = shim::fibers[shim::cur];                           \
    int w = int(f.tid) / 32, l = int(f.tid) % 32;                       \
    shim::wbuf[w][l] = x;                                               \
    shim::warp_sync();                                                  \
    float r = shim::wbuf[w][0];                                         \
    for (int i = 1; i < 32; ++i) { float y = shim::wbuf[w][i]; r = OP; } \
    shim::warp_sync();                                                  \
    return r;                                                           \
  }
SHIM_SIMD_REDUCE(simd_sum, r + y)
SHIM_SIMD_REDUCE(simd_max, (y > r ? y : r))
SHIM_SIMD_REDUCE(simd_min, (y < r ? y : r))

enum memory_order { memory_order_relaxed };
struct atomic_uint { uint v; };
static inline uint atomic_fetch_add_explicit(atomic_uint* a, uint v, memory_order) {
  uint old = a->v;
  a->v = old + v;
  return old;
}

namespace metal {
static inline float exp2(float x) { return std::exp2(x); }
static inline float rint(float x) { return std::rint(x); }
static inline float max(float a, float b) { return a > b ? a : b; }
static inline float min(float a, float b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline int min(int a, int b) { return a < b ? a : b; }
namespace precise {
static inline float divide(float a, float b) { return a / b; }
static inline float sqrt(float x) { return std::sqrt(x); }
}  // namespace precise
}  // namespace metal
using namespace metal;
"""


# ---------------------------------------------------------------------------------------- plumbing

_NP = {mx.float32: np.float32, mx.float16: np.float16, mx.uint8: np.uint8, mx.uint32: np.uint32, mx.int32: np.int32}


def to_np(a: mx.array) -> np.ndarray:
    if a.dtype == mx.bfloat16:
        return np.array(a.view(mx.uint16))
    return np.array(a)


def from_np(x: np.ndarray, dtype) -> mx.array:
    """Values -> an array of `dtype` (rounded to nearest)."""
    if dtype == mx.bfloat16:
        return mx.array(x.astype(np.float32)).astype(mx.bfloat16)
    return mx.array(x.astype(_NP[dtype]))


def from_raw(x: np.ndarray, dtype) -> mx.array:
    """Raw buffer contents (bfloat16 as uint16 bits) -> an array of `dtype`."""
    if dtype == mx.bfloat16:
        return mx.array(x.view(np.uint16)).view(mx.bfloat16)
    return mx.array(x)


def metal_source(name, inputs, template, grid, threadgroup, output_shapes, output_dtypes) -> str:
    """The complete Metal source MLX generates for this launch (header, signature, body)."""
    def f(*xs):
        return kernels._kernel("metal", name)(
            inputs=list(xs), template=template, grid=grid, threadgroup=threadgroup,
            output_shapes=output_shapes, output_dtypes=output_dtypes, verbose=True,
        )  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "out.txt")
        saved = os.dup(1)
        with open(log, "w") as fh:
            os.dup2(fh.fileno(), 1)
            try:
                mx.export_function(os.path.join(tmp, "f.mlxfn"), f, *inputs)
            finally:
                os.dup2(saved, 1)
                os.close(saved)
        text = open(log).read()
    m = re.search(r"Generated source code for `[^`]*`:\n```\n(.*?)\n```", text, re.S)
    assert m, f"MLX printed no kernel source:\n{text[:2000]}"
    return m.group(1)


def for_clang(src: str) -> str:
    """Metal source -> C++: the explicit instantiation carries Metal-only attribute lists."""
    src = re.sub(r"^template \[\[host_name\(\"[^\"]*\"\)\]\] \[\[kernel\]\] ", "template ", src, flags=re.M)
    return SHIM + "\n" + src


def clang(args, src: str, tmp: str):
    path = os.path.join(tmp, hashlib.sha1(src.encode()).hexdigest()[:16] + ".cpp")
    with open(path, "w") as fh:
        fh.write(src)
    cmd = [CLANG or "clang++", "-std=c++14", "-Werror", "-Wno-unknown-attributes", *args, path]
    return subprocess.run(cmd, capture_output=True, text=True)


_BUILT = {}


def emulate(src: str, inputs, output_shapes, output_dtypes, grid, threadgroup, init):
    """Compile the generated source with SHIM and run its threadgroups on the CPU."""
    sig = re.search(r"\[\[kernel\]\] void (\w+)\((.*?)\) \{", src, re.S)
    fname, params = sig.group(1), sig.group(2)
    targs = re.search(r"decltype\(" + fname + r"(<[^>]*>)\)", src).group(1)
    args, nbuf = [], 0
    for p in params.split("\n"):
        p = p.strip().rstrip(",")
        if not p:
            continue
        decl = p.split("[[")[0].strip()
        pname = decl.split()[-1].lstrip("*")
        if "[[buffer(" in p:
            ptype = decl[: decl.rfind(pname)].replace("device", "").replace("constant", "").strip()
            args.append(f"({ptype})bufs[{nbuf}]")
            nbuf += 1
        else:
            args.append(pname)
    driver = f"""
static void* const* g_bufs; static uint3 g_group; static uint g_tx;
static void run_thread(uint tid) {{
  void* const* bufs = g_bufs;
  uint3 thread_position_in_threadgroup = {{tid, 0, 0}};
  uint3 threadgroup_position_in_grid = g_group;
  uint3 thread_position_in_grid = {{g_group.x * g_tx + tid, g_group.y, g_group.z}};
  uint3 threads_per_threadgroup = {{g_tx, 1, 1}};
  uint thread_index_in_threadgroup = tid, thread_index_in_simdgroup = tid % 32, simdgroup_index_in_threadgroup = tid / 32;
  (void)thread_position_in_grid; (void)threads_per_threadgroup; (void)thread_index_in_threadgroup;
  (void)thread_position_in_threadgroup; (void)threadgroup_position_in_grid;
  (void)thread_index_in_simdgroup; (void)simdgroup_index_in_threadgroup;
  {fname}{targs}({", ".join(args)});
}}
extern "C" int pkv_run(void* const* bufs, int gx, int gy, int gz, int tx) {{
  g_bufs = bufs; g_tx = uint(tx); shim::body = run_thread;
  for (int z = 0; z < gz; ++z) for (int y = 0; y < gy; ++y) for (int x = 0; x < gx / tx; ++x) {{
    g_group = uint3{{uint(x), uint(y), uint(z)}};
    if (shim::run_group(tx)) {{ std::fprintf(stderr, "deadlock in threadgroup (%d, %d, %d)\\n", x, y, z); return 1; }}
  }}
  return 0;
}}
"""
    code = for_clang(src) + driver
    key = hashlib.sha1(code.encode()).hexdigest()
    if key not in _BUILT:
        tmp = tempfile.mkdtemp(prefix="pkv_metal_")
        lib = os.path.join(tmp, "k.so")
        res = clang(["-O1", "-shared", "-fPIC", "-Wno-deprecated-declarations", "-o", lib], code, tmp)
        assert res.returncode == 0, res.stderr[-6000:]
        _BUILT[key] = ctypes.CDLL(lib)
    fn = _BUILT[key].pkv_run
    arrs = [np.ascontiguousarray(to_np(a)) for a in inputs]
    outs = []
    for shape, dt in zip(output_shapes, output_dtypes):
        o = np.empty(shape, np.uint16 if dt == mx.bfloat16 else _NP[dt])
        if init is None:
            o.view(np.uint8)[...] = 0xAB  # what uninitialised memory might hold
        elif dt == mx.bfloat16:
            o[...] = to_np(mx.array(init, mx.bfloat16))
        else:
            o[...] = np.array(init).astype(o.dtype)
        outs.append(o)
    ptrs = (ctypes.c_void_p * (len(arrs) + len(outs)))(*[a.ctypes.data for a in arrs + outs])
    rc = fn(ptrs, int(grid[0]), int(grid[1]), int(grid[2]), int(threadgroup[0]))
    assert rc == 0, "a barrier was not reached by every thread of a threadgroup"
    return [from_raw(o, dt) for o, dt in zip(outs, output_dtypes)]


@pytest.fixture
def emulated(monkeypatch):
    """Route kernels._launch through the generated Metal source, run on the CPU; poison on."""
    calls = []

    def launch(be, name, inputs, template, grid, threadgroup, output_shapes, output_dtypes, poison=None):
        assert be == "metal"
        src = metal_source(name, inputs, template, grid, threadgroup, output_shapes, output_dtypes)
        calls.append(name)
        return emulate(src, inputs, output_shapes, output_dtypes, grid, threadgroup, poison)

    monkeypatch.setattr(kernels, "_launch", launch)
    monkeypatch.setattr(kernels, "_POISON", True)
    return calls


# ---------------------------------------------------------------------------------------- references


def unpack(words: np.ndarray, bits: int) -> np.ndarray:
    """uint32 words [..., W], LSB-first bit stream -> codes [..., W * 32 / bits]."""
    w = words.astype(np.uint64)
    stream = ((w[..., None] >> np.arange(32, dtype=np.uint64)) & 1).reshape(*w.shape[:-1], -1, bits)
    return (stream * (1 << np.arange(bits, dtype=np.uint64))).sum(-1).astype(np.int64)


def f32(a):
    return to_np(a).astype(np.float32) if a.dtype != mx.bfloat16 else (to_np(a).astype(np.uint32) << 16).view(np.float32)


def ref_decode(c, nq, nw, scale):
    """Dense fp64 attention over the dequantized cache `c` (a namespace of mx arrays)."""
    q = f32(c.q).astype(np.float64)
    b, hq, _, d = q.shape
    h = c.k_new.shape[1]
    r = hq // h
    out = np.zeros((b, hq, 1, d))
    for bi in range(b):
        for hi in range(h):
            ks, vs = [], []
            if nq[bi]:
                g = c.group
                kc = unpack(to_np(c.k_codes)[bi, hi], c.kb)[:, : nq[bi]]  # [D, nq]
                t = np.arange(nq[bi])
                k = kc * f32(c.k_scales)[bi, hi][:, t // g] + f32(c.k_mins)[bi, hi][:, t // g]
                k = k.T
                if c.k_bank is not None:
                    k = k + f32(c.k_bank)[bi, hi][to_np(c.k_idx)[bi, hi, : nq[bi]]]
                vc = unpack(to_np(c.v_codes)[bi, hi, : nq[bi]], c.vb)  # [nq, D]
                gv = d // c.v_scales.shape[-1]
                ch = np.arange(d) // gv
                v = vc * f32(c.v_scales)[bi, hi, : nq[bi]][:, ch] + f32(c.v_mins)[bi, hi, : nq[bi]][:, ch]
                if c.v_bank is not None:
                    vi = to_np(c.v_idx)[bi, hi, : nq[bi]].astype(np.int64)
                    bank = np.concatenate([f32(c.v_bank)[bi, hi], np.zeros((1, d), np.float32)])
                    v = v + bank[np.where(vi == 255, bank.shape[0] - 1, vi)]
                ks.append(k)
                vs.append(v)
            if nw[bi]:
                ks.append(f32(c.k_win)[bi, hi, : nw[bi]])
                vs.append(f32(c.v_win)[bi, hi, : nw[bi]])
            ks.append(f32(c.k_new)[bi, hi])
            vs.append(f32(c.v_new)[bi, hi])
            k, v = np.concatenate(ks).astype(np.float64), np.concatenate(vs).astype(np.float64)
            s = q[bi, hi * r : (hi + 1) * r, 0] @ k.T * scale
            p = np.exp(s - s.max(-1, keepdims=True))
            out[bi, hi * r : (hi + 1) * r, 0] = (p / p.sum(-1, keepdims=True)) @ v
    return out


def random_cache(rng, b, h, r, d, kb, vb, g, tcap, w, ln, mk, mv, nq, dtype=mx.float16, qdtype=mx.float16,
                 k_pat=True, v_pat=True, gv=None):  # fmt: skip
    """Random cache fields; rows past the valid lengths hold garbage the kernels must ignore."""
    gv = gv or min(g, 128 if d % 128 == 0 else 64 if d % 64 == 0 else 32)
    npk, npv = max(1, mk - 3), max(1, mv - 5)

    def fl(shape, s=1.0, dt=dtype):
        return from_np((rng.standard_normal(shape) * s).astype(np.float32), dt)

    def bank(m, n_valid):
        x = rng.standard_normal((b, h, m, d)).astype(np.float32)
        x[:, :, n_valid:] = 0
        return from_np(x, dtype)

    v_idx = rng.integers(0, npv, (b, h, tcap))
    v_idx[rng.random((b, h, tcap)) < 0.25] = 255
    c = SimpleNamespace(
        q=fl((b, h * r, 1, d), 1.0, qdtype),
        k_bank=bank(mk, npk) if k_pat else None,
        k_idx=mx.array(rng.integers(0, npk, (b, h, tcap)).astype(np.uint8)) if k_pat else None,
        k_codes=mx.array(rng.integers(0, 2**32, (b, h, d, tcap * kb // 32), dtype=np.uint64).astype(np.uint32)),
        k_scales=from_np(rng.uniform(0.01, 0.3, (b, h, d, tcap // g)).astype(np.float32), dtype),
        k_mins=fl((b, h, d, tcap // g), 0.5),
        v_bank=bank(mv, npv) if v_pat else None,
        v_idx=mx.array(v_idx.astype(np.uint8)) if v_pat else None,
        v_codes=mx.array(rng.integers(0, 2**32, (b, h, tcap, d * vb // 32), dtype=np.uint64).astype(np.uint32)),
        v_scales=from_np(rng.uniform(0.01, 0.3, (b, h, tcap, d // gv)).astype(np.float32), dtype),
        v_mins=fl((b, h, tcap, d // gv), 0.5),
        k_win=fl((b, h, w, d)),
        v_win=fl((b, h, w, d)),
        k_new=fl((b, h, ln, d), 1.0, qdtype),
        v_new=fl((b, h, ln, d), 1.0, qdtype),
        kb=kb, vb=vb, group=g,
    )  # fmt: skip
    return c


def run_decode(be, c, nq, nw, scale, split_tokens=None, lane_tokens=None):
    return kernels._decode_attention(
        be, c.q, c.k_bank, c.k_idx, c.k_codes, c.k_scales, c.k_mins, c.v_bank, c.v_idx, c.v_codes,
        c.v_scales, c.v_mins, c.k_win, c.v_win, nq, nw, c.k_new, c.v_new, scale, c.kb, c.vb, c.group,
        split_tokens, lane_tokens,
    )  # fmt: skip


def ref_flush(x, bank, n_pat, n, bits, g, values, gv, max_p, gate_z, x0=0):
    """numpy flush of tokens x0 .. x0 + n - 1 of x [B, H, T, D] (fp32 arithmetic throughout)."""
    b, h, _, d = x.shape
    xs = x[:, :, x0 : x0 + n].astype(np.float32)
    idx = np.zeros((b, h, n), np.int64)
    res = np.zeros_like(xs)
    centers = np.zeros((b, h, n // g, d), np.float32)
    for bi in range(b):
        for hi in range(h):
            cand = [row for row in bank[bi, hi, :n_pat]] if bank is not None and n_pat else []
            for j in range(n // g):
                grp = xs[bi, hi, j * g : (j + 1) * g]
                cen = ((grp.min(0) + grp.max(0)) / np.float32(2)).astype(np.float16).astype(np.float32)
                centers[bi, hi, j] = cen
                if not cand:
                    res[bi, hi, j * g : (j + 1) * g] = grp
                    idx[bi, hi, j * g : (j + 1) * g] = 255 if values else 0
                    continue
                if len(cand) < max_p:
                    cand.append(cen)
                cb = np.array(cand, np.float32)
                rr = grp[:, None, :] - cb[None]
                dist = rr.max(-1) - rr.min(-1)
                a = dist.argmin(-1)
                c = cb[a]
                keep = np.ones(g, bool)
                if values and gate_z is not None:
                    rv = grp.max(-1) - grp.min(-1)
                    rho = dist[np.arange(g), a] / np.where(rv > 0, rv, np.float32(1))
                    thr = np.float32(2 * gate_z / math.sqrt(5 * d))
                    keep = (rv > 0) & (1 - rho * rho >= thr * np.sqrt(1 + (rho * rho) * (rho * rho)))
                res[bi, hi, j * g : (j + 1) * g] = grp - np.where(keep[:, None], c, np.float32(0))
                idx[bi, hi, j * g : (j + 1) * g] = np.where(keep, a, 255)
    return idx, res, centers


def ref_quantize(xg, bits):
    """Groups along the last axis -> codes, scale, min (fp16-rounded), like quantize.quantize."""
    lo, hi = xg.min(-1), xg.max(-1)
    scale = ((hi - lo) / np.float32(2**bits - 1)).astype(np.float16).astype(np.float32)
    mn = lo.astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint((xg - mn[..., None]) / scale[..., None])
    q = np.where(scale[..., None] > 0, np.clip(q, 0, 2**bits - 1), 0)
    return q.astype(np.int64), scale, mn


# ---------------------------------------------------------------------------------------- 1. syntax

DECODE_VARIANTS = [
    # (cache dtype, q dtype, D, R, kb, vb, G, k patterns, v patterns, tokens per lane)
    (mx.float16, mx.float16, 128, 4, 2, 2, 128, True, True, 8),
    (mx.float16, mx.bfloat16, 64, 3, 3, 4, 64, True, False, 8),
    (mx.bfloat16, mx.bfloat16, 256, 8, 8, 3, 32, False, True, 4),
    (mx.float32, mx.float32, 128, 1, 4, 8, 128, False, False, 8),
    (mx.float16, mx.float16, 128, 2, 2, 4, 128, True, True, 4),
    (mx.float16, mx.float16, 128, 4, 2, 2, 128, True, True, 4),
]


def _decode_sources(cdt, qdt, d, r, kb, vb, g, kp, vp, tpl):
    """Generated Metal source of the attention kernels for one variant."""
    rng = np.random.default_rng(0)
    c = random_cache(rng, 1, 2, r, d, kb, vb, g, 128, 128, 1, 32, 32, [128], cdt, qdt, kp, vp)
    srcs = {}

    def grab(be, name, inputs, template, grid, threadgroup, output_shapes, output_dtypes, poison=None):
        srcs[name] = metal_source(name, inputs, template, grid, threadgroup, output_shapes, output_dtypes)
        return [mx.zeros(s, dt) for s, dt in zip(output_shapes, output_dtypes)]

    real = kernels._launch
    kernels._launch = grab
    try:
        run_decode("metal", c, [128], [7], 0.1, None, tpl)
    finally:
        kernels._launch = real
    return srcs


@pytest.mark.parametrize("variant", DECODE_VARIANTS, ids=lambda v: f"{v[2]}-R{v[3]}-{v[4]}{v[5]}b-G{v[6]}-p{int(v[7])}{int(v[8])}-l{v[9]}")
def test_metal_decode_sources_compile(variant, tmp_path):
    srcs = _decode_sources(*variant)
    assert set(srcs) == {"qk_table", "decode_split", "decode_merge"}  # quantized tokens: the table launch
    for name, src in srcs.items():
        res = clang(["-fsyntax-only"], for_clang(src), str(tmp_path))
        assert res.returncode == 0, f"{name}:\n{res.stderr[-6000:]}"


@pytest.mark.parametrize("values,bits,d,xdt,has_bank", [(False, 3, 128, mx.float32, True), (True, 2, 64, mx.float16, True),
                                                         (True, 8, 256, mx.bfloat16, False), (False, 4, 64, mx.float32, False)])  # fmt: skip
def test_metal_flush_sources_compile(values, bits, d, xdt, has_bank, tmp_path):
    x = mx.zeros((1, 2, 128, d), xdt)
    bank = mx.zeros((1, 2, 32, d), mx.float16) if has_bank else None
    srcs = []

    def grab(be, name, inputs, template, grid, threadgroup, output_shapes, output_dtypes, poison=None):
        srcs.append(metal_source(name, inputs, template, grid, threadgroup, output_shapes, output_dtypes))
        return [mx.zeros(s, dt) for s, dt in zip(output_shapes, output_dtypes)]

    real = kernels._launch
    kernels._launch = grab
    try:
        kernels._flush("metal", x, bank, 20, 128, bits, 128, values, 64, 255, 1.645, mx.float16, 0)
    finally:
        kernels._launch = real
    assert len(srcs) == 1
    res = clang(["-fsyntax-only"], for_clang(srcs[0]), str(tmp_path))
    assert res.returncode == 0, res.stderr[-6000:]


def test_metal_shim_rejects_a_type_error(tmp_path):
    """The check is not vacuous: a body with a type error does not compile against the shim."""
    src = _decode_sources(*DECODE_VARIANTS[0])["decode_merge"]
    bad = src.replace("const float l = l_sh[0];", "const float l = l_sh;")
    assert bad != src
    res = clang(["-fsyntax-only"], for_clang(bad), str(tmp_path))
    assert res.returncode != 0


# ---------------------------------------------------------------------------------------- 2. behaviour


@pytest.mark.parametrize(
    "d,r,kb,vb,g,nq,nw,ln,kp,vp,cdt,qdt,split,tpl",
    [
        # two splits for sequence 0, a lane with 4 of its 8 tokens valid
        (64, 2, 3, 2, 128, [1500, 128], [5, 0], 1, True, True, mx.float16, mx.float16, 1024, 8),
        (64, 2, 3, 2, 128, [1500, 130], [5, 0], 1, True, True, mx.float16, mx.float16, 1024, 4),  # 2 of 4 valid
        (128, 3, 2, 4, 64, [128, 0], [0, 64], 2, True, True, mx.float16, mx.bfloat16, None, 8),
        (64, 1, 8, 3, 32, [96, 100], [31, 1], 1, False, True, mx.bfloat16, mx.bfloat16, None, 8),  # 8 bits: 4 a lane
        (64, 4, 4, 8, 128, [0, 0], [3, 0], 1, True, False, mx.float16, mx.float16, None, None),  # nothing quantized
        (64, 8, 4, 4, 64, [2100, 700], [100, 7], 1, True, True, mx.float16, mx.float16, 1536, None),  # 3 tiles a SIMD group
        (64, 8, 4, 4, 64, [2100, 700], [0, 128], 4, True, True, mx.float16, mx.float16, 512, None),  # one tile a SIMD group
        (256, 8, 2, 2, 128, [700, 300], [128, 50], 3, True, True, mx.float16, mx.float16, None, None),  # 2 SIMD groups
        (128, 1, 2, 4, 32, [333, 1], [0, 0], 1, False, False, mx.float32, mx.float32, 256, 8),
        (64, 5, 2, 3, 128, [640, 257], [3, 127], 1, True, True, mx.float16, mx.float16, None, 8),  # GQA 5: 4 a lane
    ],
)  # fmt: skip
def test_metal_emulated_decode_matches_reference(emulated, d, r, kb, vb, g, nq, nw, ln, kp, vp, cdt, qdt, split, tpl):
    rng = np.random.default_rng(d + r + kb + sum(nq))
    b, h, w = len(nq), 2, 128
    tcap = -(-max(nq) // 128) * 128 + 128
    c = random_cache(rng, b, h, r, d, kb, vb, g, tcap, w, ln, 40, 36, nq, cdt, qdt, kp, vp)
    scale = 1 / math.sqrt(d)
    out = run_decode("metal", c, nq, nw, scale, split, tpl)
    got = f32(out).astype(np.float64)
    want = ref_decode(c, nq, nw, scale)
    assert np.isfinite(got).all()
    tol = 2e-2 if qdt == mx.bfloat16 else 3e-3
    np.testing.assert_allclose(got, want, atol=tol * np.abs(want).max(), rtol=0)
    assert emulated.count("decode_split") == 1


def test_metal_emulated_decode_histogram_at_its_capacity(emulated):
    """The fixed-point V-pattern histogram at its worst case: one SIMD group (GQA 8 leaves room for one)
    walks a 2048-token split whose tokens all have probability 1 (q = 0) and the same V pattern, so
    one bin reaches 2048 x 2^k = 2^31; a larger fixed-point scale would wrap it around."""
    rng = np.random.default_rng(5)
    nq, nw, d, r = [2048], [3], 64, 8
    c = random_cache(rng, 1, 2, r, d, 2, 2, 128, 2048, 128, 1, 32, 32, nq)
    c.q = mx.zeros(c.q.shape, c.q.dtype)
    c.v_idx = mx.full(c.v_idx.shape, 7, mx.uint8)
    assert kernels._split_geometry(d, r, 4, True, True)[0] == 1  # one SIMD group a threadgroup
    got = f32(run_decode("metal", c, nq, nw, 0.125, 2048, 4)).astype(np.float64)
    want = ref_decode(c, nq, nw, 0.125)
    np.testing.assert_allclose(got, want, atol=3e-3 * np.abs(want).max(), rtol=0)


def test_metal_emulated_decode_with_empty_banks(emulated):
    """Banks with no rows (indices present) attend like no patterns at all."""
    rng = np.random.default_rng(11)
    nq, nw = [300, 130], [5, 0]
    c = random_cache(rng, 2, 2, 4, 64, 2, 2, 128, 384, 128, 1, 32, 32, nq, k_pat=True, v_pat=True)
    c.k_bank = c.k_bank[:, :, :0]
    c.v_bank = c.v_bank[:, :, :0]
    got = f32(run_decode("metal", c, nq, nw, 0.125)).astype(np.float64)
    c.k_bank = c.v_bank = None
    want = ref_decode(c, nq, nw, 0.125)
    np.testing.assert_allclose(got, want, atol=3e-3 * np.abs(want).max(), rtol=0)
    assert emulated == ["qk_table", "decode_split", "decode_merge"]


def test_metal_emulated_decode_matches_portable_path(emulated):
    """Kernel == attention.compressed_attention on the same cache fields (one length for all)."""
    from mlx_patternkv.attention import compressed_attention
    from mlx_patternkv.config import PatternKVConfig

    rng = np.random.default_rng(7)
    b, h, r, d, g, nq, nw = 2, 2, 2, 64, 128, 256, 9
    cfg = PatternKVConfig(k_bits=3, v_bits=2, group_size=g, window=g)
    c = random_cache(rng, b, h, r, d, 3, 2, g, 384, g, 1, 32, 32, [nq] * b, mx.float16, mx.float16, gv=cfg.v_group_size(d))
    cache = SimpleNamespace(
        config=cfg, pending=(c.k_new, c.v_new), offset=nq + nw + 1, n_quant=nq, n_win=nw,
        k_bank=c.k_bank, k_idx=c.k_idx, k_codes=c.k_codes, k_scales=c.k_scales, k_mins=c.k_mins,
        v_bank=c.v_bank, v_idx=c.v_idx, v_codes=c.v_codes, v_scales=c.v_scales, v_mins=c.v_mins,
        k_win=c.k_win, v_win=c.v_win,
    )  # fmt: skip
    want = f32(compressed_attention(c.q, cache, scale=d**-0.5))
    got = f32(run_decode("metal", c, nq, nw, d**-0.5))
    np.testing.assert_allclose(got, want, atol=2e-3 * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize(
    "values,bits,d,g,gv,n,n_pat,max_p,xdt,gate",
    [
        (False, 3, 64, 128, 64, 256, 20, 255, mx.float32, None),
        (True, 2, 64, 128, 64, 128, 9, 255, mx.float32, 1.645),
        (True, 4, 128, 64, 64, 192, 30, 31, mx.float16, 1.645),  # the cap is hit inside the flush
        (False, 8, 64, 32, 32, 64, 0, 255, mx.float32, None),  # patterns off
        (True, 3, 64, 128, 32, 128, 5, 255, mx.float32, None),  # no gate
    ],
)  # fmt: skip
def test_metal_emulated_flush_matches_reference(emulated, values, bits, d, g, gv, n, n_pat, max_p, xdt, gate):
    rng = np.random.default_rng(bits * 7 + d)
    b, h, t = 2, 2, n + 32
    x = rng.standard_normal((b, h, t, d)).astype(np.float32) * rng.uniform(0.2, 3, (1, 1, 1, d)).astype(np.float32)
    x = from_np(x, xdt)
    bank = from_np(rng.standard_normal((b, h, 64, d)).astype(np.float32), mx.float16) if n_pat else None
    x0 = 16
    idx, codes, scales, mins, centers = kernels._flush(
        "metal", x, bank, n_pat, n, bits, g, values, gv, max_p, gate, mx.float16, x0
    )
    ridx, res, rcen = ref_flush(f32(x), f32(bank) if bank is not None else None, n_pat, n, bits, g, values, gv, max_p, gate, x0)
    np.testing.assert_array_equal(to_np(idx), ridx)
    np.testing.assert_array_equal(f32(centers), rcen)
    if values:
        q, s, m = ref_quantize(res.reshape(b, h, n, d // gv, gv), bits)
        np.testing.assert_array_equal(unpack(to_np(codes), bits).reshape(q.shape), q)
    else:
        rt = res.reshape(b, h, n // g, g, d).transpose(0, 1, 4, 2, 3)  # [B, H, D, groups, G]
        q, s, m = ref_quantize(rt, bits)
        np.testing.assert_array_equal(unpack(to_np(codes), bits).reshape(q.shape), q)
    np.testing.assert_array_equal(f32(scales), s.reshape(f32(scales).shape))
    np.testing.assert_array_equal(f32(mins), m.reshape(f32(mins).shape))


def test_metal_emulated_flush_matches_cache_path(emulated):
    """Kernel == the later-flush path of cache.py (patterns.grow_and_assign, residuals, quantize)."""
    from mlx_patternkv import patterns
    from mlx_patternkv.quantize import quantize

    rng = np.random.default_rng(3)
    b, h, d, g, n, n_pat, bits = 1, 2, 64, 128, 256, 12, 2
    xk = mx.array(rng.standard_normal((b, h, n, d)).astype(np.float32))
    bank = from_np(rng.standard_normal((b, h, 32, d)).astype(np.float32), mx.float16)
    rows = b * h
    valid = bank[:, :, :n_pat].reshape(rows, n_pat, d)
    new, k_idx = patterns.grow_and_assign(xk.reshape(rows, n, d), valid, g, 255)
    full = mx.concatenate([valid, new], axis=1)
    rk, _ = patterns.residuals(xk.reshape(rows, n, d), full, k_idx)
    want = quantize(rk.reshape(b, h, n, d).swapaxes(-1, -2), bits, g, mx.float16)
    idx, codes, scales, mins, centers = kernels._flush("metal", xk, bank, n_pat, n, bits, g, False, None, 255, None, mx.float16, 0)
    np.testing.assert_array_equal(to_np(idx).reshape(rows, n), to_np(k_idx))
    np.testing.assert_array_equal(to_np(centers).reshape(rows, -1, d), to_np(new))
    for got, exp in zip((codes, scales, mins), want):
        np.testing.assert_array_equal(to_np(got), to_np(exp))
