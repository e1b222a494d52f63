// Copyright © 2026 mlx-patternkv authors.
// CUDA prelude: maps the helper names of prelude_metal.h, and Metal's thread attributes, onto CUDA, so
// that mx.fast.cuda_kernel builds the same kernel bodies. MLX puts its device utils (cuda_fp16,
// cuda_bf16, cooperative_groups) before this; the body lands inside namespace mlx::core::cu.
// Threadgroups are one-dimensional (blockDim.y == blockDim.z == 1) and a SIMD group is a warp of 32.
#define PKV_CUDA 1
#define PKV_FUNC __device__ __forceinline__
#define PKV_DEVICE
#define PKV_TG
#define PKV_SHARED __shared__
#define PKV_UNROLL _Pragma("unroll")
#define PKV_BARRIER() __syncthreads()
#define PKV_SIMD_BARRIER() __syncwarp()

#define thread_position_in_threadgroup threadIdx
#define threadgroup_position_in_grid blockIdx
#define thread_index_in_simdgroup (threadIdx.x & 31u)
#define simdgroup_index_in_threadgroup (threadIdx.x >> 5)

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned long long pkv_u64;

PKV_FUNC float pkv_shfl_xor(float x, ushort m) { return __shfl_xor_sync(0xffffffffu, x, m); }
PKV_FUNC float pkv_simd_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
PKV_FUNC float pkv_simd_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
PKV_FUNC float pkv_simd_min(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fminf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

PKV_FUNC float pkv_as_float(uint x) { return __uint_as_float(x); }
PKV_FUNC uint pkv_as_uint(float x) { return __float_as_uint(x); }
PKV_FUNC float pkv_exp2(float x) { return exp2f(x); }
PKV_FUNC float pkv_div(float a, float b) { return __fdiv_rn(a, b); }
PKV_FUNC float pkv_sqrt(float x) { return __fsqrt_rn(x); }
PKV_FUNC float pkv_rint(float x) { return rintf(x); }
PKV_FUNC float pkv_fmax(float a, float b) { return fmaxf(a, b); }
PKV_FUNC float pkv_fmin(float a, float b) { return fminf(a, b); }
PKV_FUNC int pkv_imin(int a, int b) { return a < b ? a : b; }
PKV_FUNC int pkv_imax(int a, int b) { return a > b ? a : b; }

PKV_FUNC void pkv_atomic_add_tg(uint* p, uint v) { atomicAdd(p, v); }
