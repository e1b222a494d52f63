// Copyright © 2026 mlx-patternkv authors.
// Kernel body: merge the partial softmax states of decode_split.metal, and add the V patterns.
//   w_s = exp2(m_s - M), L = sum_s w_s l_s,
//   hist[m] = sum_s w_s hist_s[m]                       (probability mass on V pattern m)
//   out = (sum_s w_s o_s + sum_m hist[m] P_v[m]) / L    (0 where no token was attended)
// Grid (256 * R, H, B), threadgroup (256, 1, 1): one threadgroup per (b, h, query head r).
// Inputs:  o_part [B, H, NS, R, D] float, ml_part [B, H, NS, R, 2] float, hist_part [B, H, NS, R, MVC]
//          float, v_bank [B, H, MVC, D] T (both read only when VPAT), prm int32 (decode_split.metal's:
//          H at 0, NSQ at 5, MVC at 7)
// Output:  out [B, Hq, 1, D] QT
// Template: QT, T, D, R (<= 8), VPAT.  NS <= 256 (the host picks the split size so), MVC <= 256.
// Thread t sums the splits (then the patterns) s = t / D, t / D + NP, ... for channel t % D
// (NP = 256 / D parts), U = 8 at a time so that several loads are in flight; the parts meet in
// threadgroup memory.
constexpr int NT = 256;
constexpr int MAXS = 256;
constexpr int NP = NT / D;
constexpr int U = 8;  // loads in flight per thread

PKV_SHARED float w_sh[MAXS];
PKV_SHARED float l_sh[1];
PKV_SHARED float hist_sh[VPAT ? 256 : 1];
PKV_SHARED float part_sh[NT];

const int tid = int(thread_position_in_threadgroup.x);
const int lane = int(thread_index_in_simdgroup);
const int warp = int(simdgroup_index_in_threadgroup);
const int r = int(threadgroup_position_in_grid.x);
const int h = int(threadgroup_position_in_grid.y);
const int b = int(threadgroup_position_in_grid.z);
const int H = prm[0];
const int NSQ = prm[5];
const int MVC = prm[7];
const int NS = NSQ + 1;
const int bh = b * H + h;

if (warp == 0) {
  float mx = PKV_NEG;
  for (int s = lane; s < NS; s += 32) {
    const int i = ((bh * NS + s) * R + r) * 2;
    if (ml_part[i + 1] > 0.0f) {
      mx = pkv_fmax(mx, ml_part[i]);
    }
  }
  mx = pkv_simd_max(mx);
  float l = 0.0f;
  for (int s = lane; s < NS; s += 32) {
    const int i = ((bh * NS + s) * R + r) * 2;
    const float ls = ml_part[i + 1];
    const float w = ls > 0.0f ? pkv_exp2(ml_part[i] - mx) : 0.0f;
    w_sh[s] = w;
    l += w * ls;
  }
  l = pkv_simd_sum(l);
  if (lane == 0) {
    l_sh[0] = l;
  }
}
PKV_BARRIER();

// hist[m] = sum_s w_s hist_s[m] (thread m); select, not multiply: an empty split has w_s = 0
if (VPAT) {
  if (tid < MVC) {
    float a[U];
    for (int k = 0; k < U; ++k) {
      a[k] = 0.0f;
    }
    int s = 0;
    for (; s + U <= NS; s += U) {
      PKV_UNROLL for (int k = 0; k < U; ++k) {
        const float w = w_sh[s + k];
        const float v = hist_part[((bh * NS + s + k) * R + r) * MVC + tid];
        a[k] += w > 0.0f ? w * v : 0.0f;
      }
    }
    for (; s < NS; ++s) {
      const float w = w_sh[s];
      const float v = hist_part[((bh * NS + s) * R + r) * MVC + tid];
      a[0] += w > 0.0f ? w * v : 0.0f;
    }
    float sum = 0.0f;
    for (int k = 0; k < U; ++k) {
      sum += a[k];
    }
    hist_sh[tid] = sum;
  }
  PKV_BARRIER();
}

// o[d] = sum_s w_s o_s[d] + sum_m hist[m] P_v[m][d], in NP parts
const int d = tid % D;
const int part = tid / D;
float a[U];
for (int k = 0; k < U; ++k) {
  a[k] = 0.0f;
}
{
  int s = part;
  for (; s + (U - 1) * NP < NS; s += U * NP) {
    PKV_UNROLL for (int k = 0; k < U; ++k) {
      const float w = w_sh[s + k * NP];
      const float v = o_part[((bh * NS + s + k * NP) * R + r) * D + d];
      a[k] += w > 0.0f ? w * v : 0.0f;
    }
  }
  for (; s < NS; s += NP) {
    const float w = w_sh[s];
    const float v = o_part[((bh * NS + s) * R + r) * D + d];
    a[0] += w > 0.0f ? w * v : 0.0f;
  }
}
if (VPAT) {
  const PKV_DEVICE T* bank = v_bank + bh * MVC * D + d;
  int m = part;
  for (; m + (U - 1) * NP < MVC; m += U * NP) {
    PKV_UNROLL for (int k = 0; k < U; ++k) {
      a[k] += hist_sh[m + k * NP] * static_cast<float>(bank[(m + k * NP) * D]);
    }
  }
  for (; m < MVC; m += NP) {
    a[0] += hist_sh[m] * static_cast<float>(bank[m * D]);
  }
}
float sum = 0.0f;
for (int k = 0; k < U; ++k) {
  sum += a[k];
}
part_sh[tid] = sum;
PKV_BARRIER();
if (tid < D) {
  float o = 0.0f;
  for (int k = 0; k < NP; ++k) {
    o += part_sh[k * D + tid];
  }
  const float l = l_sh[0];
  out[(bh * R + r) * D + tid] = static_cast<QT>(l > 0.0f ? o / l : 0.0f);
}
