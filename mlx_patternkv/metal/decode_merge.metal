// Copyright © 2026 mlx-patternkv authors.
// Kernel body: merge the partial softmax states of decode_split.metal (and, with VHIST, add the V
// pattern term from the merged histogram).
//   w_s = exp2(m_s - M), L = sum_s w_s l_s, S[m] = sum_s w_s hist_s[m],
//   out = (sum_s w_s o_s + sum_m S[m] v_bank[m]) / L       (0 where no token was attended)
// Grid (256 * R, H, B), threadgroup (256, 1, 1): one threadgroup per (b, h, query head r).
// Inputs:  o_part [B, H, NS, R, D] float, ml_part [B, H, NS, R, 2] float, h_part [B, H, NSQ, R, MVC]
//          float, v_bank [B, H, MVC, D] T, prm int32 (decode_split.metal's: H, .., NSQ at 5, MVC at 7)
// Output:  out [B, Hq, 1, D] QT
// Template: QT, T, D, R (<= 8), HIST.  NS <= 256 (the host picks the split size so).
// Sums over the splits and bins run four at a time so that several loads are in flight.
constexpr int NT = 256;
constexpr int MAXS = 256;
constexpr int MG = NT / D;  // bin groups of the pattern product

PKV_SHARED float w_sh[MAXS];
PKV_SHARED float s_sh[HIST ? 256 : 1];
PKV_SHARED float red_sh[HIST ? NT : 1];
PKV_SHARED float l_sh[1];

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

// o[d] = sum_s w_s o_s[d] (thread d); partials of empty splits were never written: select, not multiply
float o = 0.0f;
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
  o = (a[0] + a[1]) + (a[2] + a[3]);
}
if (HIST) {
  for (int m = tid; m < MVC; m += NT) {
    float a[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int s = 0;
    for (; s + 4 <= NSQ; s += 4) {
      for (int k = 0; k < 4; ++k) {
        const float w = w_sh[s + k];
        const float v = h_part[((bh * NSQ + s + k) * R + r) * MVC + m];
        a[k] += w > 0.0f ? w * v : 0.0f;
      }
    }
    for (; s < NSQ; ++s) {
      const float w = w_sh[s];
      const float v = h_part[((bh * NSQ + s) * R + r) * MVC + m];
      a[0] += w > 0.0f ? w * v : 0.0f;
    }
    s_sh[m] = (a[0] + a[1]) + (a[2] + a[3]);
  }
  PKV_BARRIER();
  // sum_m S[m] v_bank[m][d]: thread (d, bin group tid / D)
  {
    const int d = tid % D;
    const int mg = tid / D;
    float a[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int m = mg;
    for (; m + 3 * MG < MVC; m += 4 * MG) {
      for (int k = 0; k < 4; ++k) {
        a[k] += s_sh[m + k * MG] * static_cast<float>(v_bank[(bh * MVC + m + k * MG) * D + d]);
      }
    }
    for (; m < MVC; m += MG) {
      a[0] += s_sh[m] * static_cast<float>(v_bank[(bh * MVC + m) * D + d]);
    }
    red_sh[tid] = (a[0] + a[1]) + (a[2] + a[3]);
  }
  PKV_BARRIER();
  if (tid < D) {
    for (int g = 0; g < MG; ++g) {
      o += red_sh[g * D + tid];
    }
  }
}
if (tid < D) {
  const float l = l_sh[0];
  out[(bh * R + r) * D + tid] = static_cast<QT>(l > 0.0f ? o / l : 0.0f);
}
