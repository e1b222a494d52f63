// Copyright © 2026 mlx-patternkv authors.
// Kernel body: flash-decoding pass over the compressed cache, one query token per sequence.
//
// Grid (NT * (NSQ + 1), H, B), threadgroup (NT, 1, 1), NT = 32 * NWARP. Threadgroup (s, h, b) takes
// the R query heads of KV head h of sequence b together (GQA) and one split of the tokens: splits
// s < NSQ cover the quantized tokens [s * ST, min((s + 1) * ST, n_quant[b])), split NSQ the dense
// tokens (the FP16 window rows < n_win[b], then the LN new tokens). Inside a split, each SIMD group
// walks its own tiles of TILE tokens with its own online softmax and no threadgroup barrier; the
// SIMD groups' states are combined once at the end, and the split's partial state (running max m,
// sum l, unnormalised output o) is written for decode_merge.metal.
//
// Inputs (whole cache buffers; lengths are data, never template values):
//   q [B, Hq, 1, D] QT                        Hq = H * R, query head h * R + r uses KV head h
//   k_bank [B, H, MKC, D] T                   K patterns (KPAT)
//   k_idx [B, H, TCAP] uint8                  K pattern per quantized token
//   k_codes [B, H, D, TCAP * KB / 32] uint32  K residual, per channel, packed along tokens
//   k_scales, k_mins [B, H, D, TCAP / G] T
//   v_bank [B, H, MVC, D] T                   V patterns (VPAT)
//   v_idx [B, H, TCAP] uint8                  V pattern, 255 = gate off
//   v_codes [B, H, TCAP, D * VB / 32] uint32  V residual, per token, packed along channels
//   v_scales, v_mins [B, H, TCAP, D / GV] T
//   k_win, v_win [B, H, W, D] T               FP16 window
//   k_new, v_new [B, H, LN, D] QT             the step's new tokens (attended exactly)
//   prm int32 [9 + 2 B]                       H, TCAP, W, LN, ST, NSQ, MKC, MVC, bits of the float
//                                             softmax scale * log2(e), then n_quant, n_win per sequence
// Outputs:
//   o_part [B, H, NSQ + 1, R, D] float, ml_part [B, H, NSQ + 1, R, 2] float (m in log2 units, l)
// Template: QT, T, D (64/128/256), R (<= 8), KB, VB (2/3/4/8), G (tokens per K group: 32/64/128),
// GV (V channel group), KPAT, VPAT (pattern banks present).
//
// Prologue: q into threadgroup memory, and the q-pattern score table tab[r][m] = q_r . P_k[m].
// Per tile of a SIMD group:
//  scores  lane l takes TPL consecutive tokens (dense split: tokens l, l + 32, ...) and loops over
//          the channels: one load brings the lane's TPL K codes of a channel (the per-channel
//          layout makes a SIMD group's loads contiguous); a code c becomes the float 1 + c / 2^KB
//          with two integer operations (shift, mask-or into the mantissa of 1.0), so
//            q . (scale * c + min) = (q * scale * 2^KB) . (1 + c / 2^KB) - q * scale * 2^KB + q * min,
//          the last two summed once per lane; plus the pattern score tab[r][k_idx];
//  softmax online in fp32 per query head (the SIMD group's max), probabilities into threadgroup
//          memory (this SIMD group's slice only; a SIMD-group barrier orders it);
//  values  lane l takes CPL = 8 channels of token l / LPT of each step (LPT = D / 8 lanes a token,
//          TPS = 32 / LPT tokens a step); the V codes decode the same way, the min and the
//          1 + c / 2^VB offset go into one per-lane sum, and a gated token adds its pattern row.
constexpr int NWARP = (D * R >= 2048) ? 2 : 4;  // SIMD groups (kernels.py launches 32 * NWARP threads)
constexpr int NT = 32 * NWARP;
constexpr int TPL = (KB == 8 || R > 4) ? 4 : 8;  // tokens per lane in the score phase
constexpr int TILE = 32 * TPL;                     // tokens per tile
constexpr int CPL = 8;                             // V channels per lane
constexpr int LPT = D / CPL;                       // lanes per token in the value phase
constexpr int TPS = 32 / LPT;                      // tokens per value step
constexpr int NGV = D / GV;                        // V channel groups per token
constexpr int MB = 256;                            // table columns per head (indices are uint8)
constexpr uint KMASK = (1u << KB) - 1u;
constexpr uint VMASK = (1u << VB) - 1u;
constexpr float KSCALE = float(1u << KB);
constexpr float VSCALE = float(1u << VB);

PKV_SHARED float q_sh[D * R];                     // [d][r]
PKV_SHARED float tab_sh[KPAT ? R * MB : 1];       // [r][m]
PKV_SHARED float p_sh[NWARP * TILE * R];          // [warp][token of the tile][r]; o at the end
PKV_SHARED float st_sh[NWARP * 2 * R];            // [warp][m, l][r]

const int tid = int(thread_position_in_threadgroup.x);
const int lane = int(thread_index_in_simdgroup);
const int warp = int(simdgroup_index_in_threadgroup);
const int split = int(threadgroup_position_in_grid.x);
const int h = int(threadgroup_position_in_grid.y);
const int b = int(threadgroup_position_in_grid.z);

const int H = prm[0];
const int TCAP = prm[1];
const int W = prm[2];
const int LN = prm[3];
const int ST = prm[4];
const int NSQ = prm[5];
const int MKC = prm[6];
const int MVC = prm[7];
const float sl2 = pkv_as_float(uint(prm[8]));
const int nq = prm[9 + 2 * b];
const int nw = prm[10 + 2 * b];
const int NS = NSQ + 1;
const int bh = b * H + h;
const bool dense = split == NSQ;

int t_begin = 0;
int t_end = nw + LN;
if (!dense) {
  t_begin = split * ST;
  t_end = pkv_imin(t_begin + ST, nq);
}
const int WK = TCAP * KB / 32;  // words per K channel row
const int WV = D * VB / 32;     // words per V token row
const int NGK = TCAP / G;       // K groups per channel row
const int c0 = (lane % LPT) * CPL;  // first channel of this lane in the value phase
const int tsub = lane / LPT;        // token of this lane in a value step

// ---- prologue: q, and the pattern score table
for (int i = tid; i < D * R; i += NT) {
  const int r = i / D;
  const int d = i % D;
  q_sh[d * R + r] = static_cast<float>(q[(bh * R + r) * D + d]);
}
PKV_BARRIER();
if (KPAT && !dense) {
  for (int m = tid; m < MKC; m += NT) {
    float a[R];
    for (int r = 0; r < R; ++r) {
      a[r] = 0.0f;
    }
    for (int d = 0; d < D; ++d) {
      const float x = static_cast<float>(k_bank[(bh * MKC + m) * D + d]);
      for (int r = 0; r < R; ++r) {
        a[r] += q_sh[d * R + r] * x;
      }
    }
    for (int r = 0; r < R; ++r) {
      tab_sh[r * MB + m] = a[r];
    }
  }
  PKV_BARRIER();
}

// ---- this SIMD group's tiles
float m_run[R];    // running max (log2 units), uniform over the SIMD group
float l_run[R];    // running sum, this lane's tokens
float am[R];       // per-lane sum added to each of the lane's channels (V min and 1.0 offsets)
float acc[CPL][R]; // unnormalised output, channels c0 .. c0 + CPL - 1
for (int r = 0; r < R; ++r) {
  m_run[r] = PKV_NEG;
  l_run[r] = 0.0f;
  am[r] = 0.0f;
  for (int c = 0; c < CPL; ++c) {
    acc[c][r] = 0.0f;
  }
}
PKV_TG float* pw = p_sh + warp * TILE * R;

for (int tile = t_begin + warp * TILE; tile < t_end; tile += NWARP * TILE) {
  // ---- scores of this lane's TPL tokens
  float s[TPL][R];
  for (int j = 0; j < TPL; ++j) {
    for (int r = 0; r < R; ++r) {
      s[j][r] = 0.0f;
    }
  }
  int nv = 0;  // valid tokens of this lane (quantized: the first nv of its TPL)
  if (!dense) {
    const int tl0 = tile + lane * TPL;
    nv = pkv_imax(0, pkv_imin(TPL, t_end - tl0));
    if (nv > 0) {
      const int grp = tl0 / G;
      float cq[R];  // sum_d q * scale * 2^KB
      float cm[R];  // sum_d q * min
      for (int r = 0; r < R; ++r) {
        cq[r] = 0.0f;
        cm[r] = 0.0f;
      }
      const PKV_DEVICE uint* kc = k_codes + bh * D * WK;
      const int kg = bh * D * NGK + grp;
      const uint kbit = uint(tl0) * uint(KB);
      for (int d0 = 0; d0 < D; d0 += 4) {
        uint w[4];
        float sc[4];
        float mn[4];
        PKV_UNROLL for (int u = 0; u < 4; ++u) {
          w[u] = pkv_bits(kc + (d0 + u) * WK, kbit, uint(TPL * KB));
          sc[u] = static_cast<float>(k_scales[kg + (d0 + u) * NGK]) * KSCALE;
          mn[u] = static_cast<float>(k_mins[kg + (d0 + u) * NGK]);
        }
        PKV_UNROLL for (int u = 0; u < 4; ++u) {
          float qs[R];
          for (int r = 0; r < R; ++r) {
            const float qd = q_sh[(d0 + u) * R + r];
            qs[r] = qd * sc[u];
            cq[r] += qs[r];
            cm[r] += qd * mn[u];
          }
          PKV_UNROLL for (int j = 0; j < TPL; ++j) {
            const float f = pkv_unit(w[u], j * KB, KB);
            for (int r = 0; r < R; ++r) {
              s[j][r] += qs[r] * f;
            }
          }
        }
      }
      for (int j = 0; j < TPL; ++j) {
        const int kid = KPAT ? int(k_idx[bh * TCAP + tl0 + j]) : 0;
        for (int r = 0; r < R; ++r) {
          s[j][r] += cm[r] - cq[r];
          if (KPAT) {
            s[j][r] += tab_sh[r * MB + kid];
          }
        }
      }
    }
  } else {
    for (int j = 0; j < TPL; ++j) {
      const int t = tile + j * 32 + lane;
      if (t < t_end) {
        const bool win = t < nw;
        for (int d = 0; d < D; ++d) {
          const float x = win ? static_cast<float>(k_win[(bh * W + t) * D + d])
                              : static_cast<float>(k_new[(bh * LN + t - nw) * D + d]);
          for (int r = 0; r < R; ++r) {
            s[j][r] += q_sh[d * R + r] * x;
          }
        }
      }
    }
  }

  // ---- online softmax: max over the SIMD group, probabilities of this lane's tokens
  for (int r = 0; r < R; ++r) {
    float mt = PKV_NEG;
    for (int j = 0; j < TPL; ++j) {
      const bool valid = dense ? tile + j * 32 + lane < t_end : j < nv;
      s[j][r] = valid ? s[j][r] * sl2 : PKV_NEG;
      mt = pkv_fmax(mt, s[j][r]);
    }
    mt = pkv_simd_max(mt);
    const float m_new = pkv_fmax(m_run[r], mt);
    const float corr = pkv_exp2(m_run[r] - m_new);
    m_run[r] = m_new;
    float sum = 0.0f;
    for (int j = 0; j < TPL; ++j) {
      const float p = s[j][r] > 0.5f * PKV_NEG ? pkv_exp2(s[j][r] - m_new) : 0.0f;
      pw[(dense ? j * 32 + lane : lane * TPL + j) * R + r] = p;
      sum += p;
    }
    l_run[r] = l_run[r] * corr + sum;
    am[r] *= corr;
    for (int c = 0; c < CPL; ++c) {
      acc[c][r] *= corr;
    }
  }
  PKV_SIMD_BARRIER();

  // ---- values
  const int t_stop = pkv_imin(TILE, t_end - tile);  // tokens of this tile (> 0)
  if (!dense) {
    const int vg = c0 / GV;
    for (int tt0 = 0; tt0 < t_stop; tt0 += 2 * TPS) {
      PKV_UNROLL for (int u = 0; u < 2; ++u) {
        const int tt = tt0 + u * TPS + tsub;
        if (tt < t_stop) {
          const int t = tile + tt;
          const PKV_DEVICE uint* vc = v_codes + (bh * TCAP + t) * WV;
          const uint lo = pkv_bits(vc, uint(c0 * VB), uint(CPL * VB > 32 ? 32 : CPL * VB));
          const uint hi = CPL * VB > 32 ? pkv_bits(vc, uint(c0 * VB + 32), uint(CPL * VB - 32)) : 0u;
          const float vs = static_cast<float>(v_scales[(bh * TCAP + t) * NGV + vg]) * VSCALE;
          const float vm = static_cast<float>(v_mins[(bh * TCAP + t) * NGV + vg]);
          const int vid = VPAT ? int(v_idx[bh * TCAP + t]) : PKV_NO_PATTERN;
          float pr[R];
          float pv[R];
          for (int r = 0; r < R; ++r) {
            pr[r] = pw[tt * R + r];
            pv[r] = pr[r] * vs;
            am[r] += pr[r] * vm - pv[r];
          }
          PKV_UNROLL for (int c = 0; c < CPL; ++c) {
            const float f = pkv_unit(c * VB < 32 ? lo : hi, (c * VB) % 32, VB);
            for (int r = 0; r < R; ++r) {
              acc[c][r] += pv[r] * f;
            }
          }
          if (VPAT && vid != PKV_NO_PATTERN) {
            const PKV_DEVICE T* row = v_bank + (bh * MVC + vid) * D + c0;
            PKV_UNROLL for (int c = 0; c < CPL; ++c) {
              const float x = static_cast<float>(row[c]);
              for (int r = 0; r < R; ++r) {
                acc[c][r] += pr[r] * x;
              }
            }
          }
        }
      }
    }
  } else {
    for (int tt = tsub; tt < t_stop; tt += TPS) {
      const int t = tile + tt;
      const bool win = t < nw;
      for (int c = 0; c < CPL; ++c) {
        const float x = win ? static_cast<float>(v_win[(bh * W + t) * D + c0 + c])
                            : static_cast<float>(v_new[(bh * LN + t - nw) * D + c0 + c]);
        for (int r = 0; r < R; ++r) {
          acc[c][r] += pw[tt * R + r] * x;
        }
      }
    }
  }
  PKV_SIMD_BARRIER();
}

// ---- combine: the lanes of a channel slice, then the SIMD groups
for (int r = 0; r < R; ++r) {
  for (int off = LPT; off < 32; off <<= 1) {
    am[r] += pkv_shfl_xor(am[r], ushort(off));
    for (int c = 0; c < CPL; ++c) {
      acc[c][r] += pkv_shfl_xor(acc[c][r], ushort(off));
    }
  }
  l_run[r] = pkv_simd_sum(l_run[r]);
}
if (lane == 0) {
  for (int r = 0; r < R; ++r) {
    st_sh[warp * 2 * R + r] = m_run[r];
    st_sh[warp * 2 * R + R + r] = l_run[r];
  }
}
PKV_BARRIER();
float m_all[R];
float l_all[R];
for (int r = 0; r < R; ++r) {
  m_all[r] = PKV_NEG;
  for (int w2 = 0; w2 < NWARP; ++w2) {
    m_all[r] = pkv_fmax(m_all[r], st_sh[w2 * 2 * R + r]);
  }
  l_all[r] = 0.0f;
  for (int w2 = 0; w2 < NWARP; ++w2) {
    l_all[r] += st_sh[w2 * 2 * R + R + r] * pkv_exp2(st_sh[w2 * 2 * R + r] - m_all[r]);
  }
}
for (int w2 = 0; w2 < NWARP; ++w2) {  // o into p_sh as [r][d], one SIMD group after another
  if (warp == w2 && lane < LPT) {
    for (int r = 0; r < R; ++r) {
      const float f = pkv_exp2(m_run[r] - m_all[r]);
      for (int c = 0; c < CPL; ++c) {
        const float v = (acc[c][r] + am[r]) * f;
        p_sh[r * D + c0 + c] = w2 == 0 ? v : p_sh[r * D + c0 + c] + v;
      }
    }
  }
  PKV_BARRIER();
}
const int ps = bh * NS + split;
for (int i = tid; i < R * D; i += NT) {
  o_part[ps * R * D + i] = p_sh[i];
}
if (tid < R) {
  ml_part[(ps * R + tid) * 2] = m_all[tid];
  ml_part[(ps * R + tid) * 2 + 1] = l_all[tid];
}
