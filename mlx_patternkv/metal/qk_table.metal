// Copyright © 2026 mlx-patternkv authors.
// Kernel body: the tables of one decode step that depend only on q, for decode_split.metal.
//   tab[b, h, r, m] = q_r . k_bank[b, h, m, :]                                   (KPAT; m < MKC)
//   kc[b, h, r, g]  = sum_d q_r[d] * (k_min[d, g] - k_scale[d, g] * 2^KB)        (g < ceil(n_quant[b] / G))
// with q_r = q[b, h*R + r, 0, :] (fp32, unscaled). kc is the part of a quantized token's K score
// that is the same for every token of its K group: since c = 2^KB * (1 + c / 2^KB) - 2^KB,
// q . (scale * c + min) = (q * scale * 2^KB) . (1 + c / 2^KB) + kc.
// Inputs:  q [B, Hq, 1, D] QT, k_bank [B, H, MKC, D] T (KPAT), k_scales, k_mins [B, H, D, TCAP / G] T,
//          prm int32 (decode_split.metal's: H at 0, TCAP at 1, MKC at 6, n_quant[b] at 9 + 2 b)
// Outputs: tab [B, H, R, MKC] float (KPAT), kc [B, H, R, TCAP / G] float
// Template: QT, T, D, R, KB, G, KPAT.  Grid (256 * (NTB + NTG), H, B), threadgroup (256, 1, 1):
// threadgroups x < NTB = ceil(MKC / 8) take 8 bank rows, one SIMD group a row, lanes over channels;
// the others take 32 K groups, a lane a group (coalesced loads along the groups), the SIMD groups
// D / 8 channels each, summed in threadgroup memory.
constexpr int NT = 256;
constexpr int NW = NT / 32;
constexpr int DL = D / 32;  // channels per lane of a bank row
constexpr int DW = D / NW;  // channels per SIMD group of a K group
constexpr float KSCALE = float(1u << KB);

PKV_SHARED float red_sh[NW * 32 * R];  // [warp][lane][r]

const int lane = int(thread_index_in_simdgroup);
const int warp = int(simdgroup_index_in_threadgroup);
const int x = int(threadgroup_position_in_grid.x);
const int h = int(threadgroup_position_in_grid.y);
const int b = int(threadgroup_position_in_grid.z);
const int H = prm[0];
const int TCAP = prm[1];
const int MKC = KPAT ? prm[6] : 0;
const int NTB = (MKC + NW - 1) / NW;
const int bh = b * H + h;

if (x < NTB) {
  const int m = x * NW + warp;
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
} else {  // uniform over the threadgroup
  const int NGK = TCAP / G;
  const int grp = (x - NTB) * 32 + lane;
  const bool ok = grp * G < prm[9 + 2 * b];  // the group holds quantized tokens of sequence b
  float acc[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = 0.0f;
  }
  if (ok) {
    const int base = (bh * D + warp * DW) * NGK + grp;  // channel warp * DW + i: base + i * NGK
    PKV_UNROLL for (int i = 0; i < DW; ++i) {
      const float e = static_cast<float>(k_mins[base + i * NGK]) - static_cast<float>(k_scales[base + i * NGK]) * KSCALE;
      for (int r = 0; r < R; ++r) {
        acc[r] += static_cast<float>(q[(bh * R + r) * D + warp * DW + i]) * e;
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    red_sh[(warp * 32 + lane) * R + r] = acc[r];
  }
  PKV_BARRIER();
  if (warp == 0 && ok) {
    for (int r = 0; r < R; ++r) {
      float s = 0.0f;
      for (int w = 0; w < NW; ++w) {
        s += red_sh[(w * 32 + lane) * R + r];
      }
      kc[(bh * R + r) * NGK + grp] = s;
    }
  }
}
