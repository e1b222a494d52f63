// Copyright © 2026 mlx-patternkv authors.
// Kernel body: merge the partial softmax states of decode_split.metal.
//   w_s = exp2(m_s - M), L = sum_s w_s l_s, out = sum_s w_s o_s / L       (0 where no token was attended)
// Grid (256 * R, H, B), threadgroup (256, 1, 1): one threadgroup per (b, h, query head r).
// Inputs:  o_part [B, H, NS, R, D] float, ml_part [B, H, NS, R, 2] float, prm int32 (decode_split.metal's:
//          H at 0, NSQ at 5)
// Output:  out [B, Hq, 1, D] QT
// Template: QT, D, R (<= 8).  NS <= 256 (the host picks the split size so).
// The sum over the splits runs four at a time so that several loads are in flight.
constexpr int NT = 256;
constexpr int MAXS = 256;

PKV_SHARED float w_sh[MAXS];
PKV_SHARED float l_sh[1];

const int tid = int(thread_position_in_threadgroup.x);
const int lane = int(thread_index_in_simdgroup);
const int warp = int(simdgroup_index_in_threadgroup);
const int r = int(threadgroup_position_in_grid.x);
const int h = int(threadgroup_position_in_grid.y);
const int b = int(threadgroup_position_in_grid.z);
const int H = prm[0];
const int NSQ = prm[5];
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

// o[d] = sum_s w_s o_s[d] (thread d); select, not multiply: an empty split has w_s = 0
if (tid < D) {
  float a[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  int s = 0;
  for (; s + 4 <= NS; s += 4) {
    for (int k = 0; k < 4; ++k) {
      const float w = w_sh[s + k];
      const float v = o_part[((bh * NS + s + k) * R + r) * D + tid];
      a[k] += w > 0.0f ? w * v : 0.0f;
    }
  }
  for (; s < NS; ++s) {
    const float w = w_sh[s];
    const float v = o_part[((bh * NS + s) * R + r) * D + tid];
    a[0] += w > 0.0f ? w * v : 0.0f;
  }
  const float o = (a[0] + a[1]) + (a[2] + a[3]);
  const float l = l_sh[0];
  out[(bh * R + r) * D + tid] = static_cast<QT>(l > 0.0f ? o / l : 0.0f);
}
