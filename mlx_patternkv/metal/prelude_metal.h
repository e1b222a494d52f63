// Copyright © 2026 mlx-patternkv authors.
// Metal prelude: the helper names the kernel bodies (*.metal in this folder) are written against.
// MLX puts its own utils (metal_stdlib, `using namespace metal`, float16_t / bfloat16_t) before this.
// The bodies use Metal's thread attributes by name (thread_position_in_threadgroup,
// threadgroup_position_in_grid, thread_index_in_simdgroup, simdgroup_index_in_threadgroup): MLX adds
// them to the generated signature because the body mentions them. prelude_cuda.h maps the same names.
#define PKV_METAL 1
#define PKV_FUNC inline
#define PKV_DEVICE device
#define PKV_TG threadgroup
#ifndef PKV_SHARED
#define PKV_SHARED threadgroup
#endif
#define PKV_UNROLL _Pragma("clang loop unroll(full)")
#define PKV_BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define PKV_SIMD_BARRIER() simdgroup_barrier(mem_flags::mem_threadgroup)

typedef ulong pkv_u64;

PKV_FUNC float pkv_simd_sum(float x) { return simd_sum(x); }
PKV_FUNC float pkv_simd_max(float x) { return simd_max(x); }
PKV_FUNC float pkv_simd_min(float x) { return simd_min(x); }
PKV_FUNC float pkv_shfl_xor(float x, ushort m) { return simd_shuffle_xor(x, m); }

PKV_FUNC float pkv_as_float(uint x) { return as_type<float>(x); }
PKV_FUNC uint pkv_as_uint(float x) { return as_type<uint>(x); }
PKV_FUNC float pkv_exp2(float x) { return metal::exp2(x); }
// Quantization must match the portable path bit for bit: precise (IEEE) division, square root and
// round-half-to-even, whatever the math mode MLX compiles with.
PKV_FUNC float pkv_div(float a, float b) { return metal::precise::divide(a, b); }
PKV_FUNC float pkv_sqrt(float x) { return metal::precise::sqrt(x); }
PKV_FUNC float pkv_rint(float x) { return metal::rint(x); }
PKV_FUNC float pkv_fmax(float a, float b) { return metal::max(a, b); }
PKV_FUNC float pkv_fmin(float a, float b) { return metal::min(a, b); }
PKV_FUNC int pkv_imin(int a, int b) { return metal::min(a, b); }
PKV_FUNC int pkv_imax(int a, int b) { return metal::max(a, b); }

// Integer add into threadgroup memory (GPUs add integers there natively; a float add is a
// compare-and-swap loop on NVIDIA's, which is why the histograms are fixed point).
PKV_FUNC void pkv_atomic_add_tg(threadgroup uint* p, uint v) {
  atomic_fetch_add_explicit((threadgroup atomic_uint*)p, v, memory_order_relaxed);
}
