// Copyright © 2026 mlx-patternkv authors.
// Kernel body: the q-pattern score table of one decode step.
//   tab[b, h, r, m] = q[b, h*R + r, 0, :] . k_bank[b, h, m, :]   (fp32, unscaled), m < MKC
// Inputs:  q [B, Hq, 1, D] QT, k_bank [B, H, MKC, D] T, prm int32 (decode_split.metal's: H at 0,
//          MKC at 6)
// Output:  tab [B, H, R, MKC] float
// Template: QT, T, D, R.  Grid (256 * ceil(MKC / 8), H, B), threadgroup (256, 1, 1): one SIMD group
// per bank row, lanes over channels.
constexpr int NT = 256;
constexpr int NW = NT / 32;
constexpr int DL = D / 32;

const int lane = int(thread_index_in_simdgroup);
const int warp = int(simdgroup_index_in_threadgroup);
const int m = int(threadgroup_position_in_grid.x) * NW + warp;
const int h = int(threadgroup_position_in_grid.y);
const int b = int(threadgroup_position_in_grid.z);
const int H = prm[0];
const int MKC = prm[6];
const int bh = b * H + h;

if (m < MKC) {  // uniform over the SIMD group
  float kv[DL];
  for (int i = 0; i < DL; ++i) {
    kv[i] = static_cast<float>(k_bank[(bh * MKC + m) * D + lane + 32 * i]);
  }
  for (int r = 0; r < R; ++r) {
    float s = 0.0f;
    for (int i = 0; i < DL; ++i) {
      s += static_cast<float>(q[(bh * R + r) * D + lane + 32 * i]) * kv[i];
    }
    s = pkv_simd_sum(s);
    if (lane == 0) {
      tab[(bh * R + r) * MKC + m] = s;
    }
  }
}
