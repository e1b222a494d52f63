// Copyright © 2026 mlx-patternkv authors.
// Kernel body: flash-decoding pass over the compressed cache, one query token per sequence.
//
// Grid (NT * (NSQ + 1), H, B), threadgroup (NT, 1, 1), NT = 32 * NW. Threadgroup (s, h, b) takes
// the R query heads of KV head h of sequence b together (GQA) and one split of the tokens: splits
// s < NSQ cover the quantized tokens [s * ST, min((s + 1) * ST, n_quant[b])), split NSQ the dense
// tokens (the FP16 window rows < n_win[b], then the LN new tokens). Inside a split, each SIMD group
// walks its own tiles of TILE tokens with its own online softmax and no threadgroup barrier; the
// SIMD groups' states are combined once at the end, and the split's partial state (running max m,
// sum l, unnormalised output o without the V patterns, histogram of the probabilities over the V
// patterns) is written for decode_merge.metal.
//
// Inputs (whole cache buffers; lengths are data, never template values):
//   q [B, Hq, 1, D] QT                        Hq = H * R, query head h * R + r uses KV head h
//   tab [B, H, R, MKC] float                  q . K patterns (qk_table.metal; KPAT)
//   kc [B, H, R, TCAP / G] float              per K group: q . (min - scale * 2^KB) (qk_table.metal)
//   k_idx [B, H, TCAP] uint8                  K pattern per quantized token
//   k_codes [B, H, D, TCAP * KB / 32] uint32  K residual, per channel, packed along tokens
//   k_scales [B, H, D, TCAP / G] T           (the mins are in kc)
//   v_bank [B, H, MVC, D] T                   V patterns (VPAT)
//   v_idx [B, H, TCAP] uint8                  V pattern, 255 = gate off
//   v_codes [B, H, TCAP, D * VB / 32] uint32  V residual, per token, packed along channels
//   v_scales, v_mins [B, H, TCAP, D / GV] T
//   k_win, v_win [B, H, W, D] T               FP16 window
//   k_new, v_new [B, H, LN, D] QT             the step's new tokens (attended exactly)
//   prm int32 [9 + 2 B]                       H, TCAP, W, LN, ST, NSQ, MKC, MVC, bits of the float
//                                             softmax scale * log2(e), then n_quant, n_win per sequence
// Outputs:
//   o_part [B, H, NSQ + 1, R, D] float, ml_part [B, H, NSQ + 1, R, 2] float (m in log2 units, l),
//   hist_part [B, H, NSQ + 1, R, MVC] float (VPAT; relative to the split's m, like o_part)
// Template: QT, T, D (64/128/256), R (<= 8), KB, VB (2/3/4/8), G (tokens per K group: 32/64/128),
// GV (V channel group), KPAT, VPAT (pattern banks present), NW (SIMD groups per threadgroup), TPL
// (tokens per lane in the score phase: 4, or 8 when KB < 8 and R <= 4).
//
// Prologue: q, and the q-pattern score table tab[r][m] = q_r . P_k[m] (qk_table.metal, once per step),
// into threadgroup memory.  The values of a tile are added after all its scores: the tile's
// probabilities sit in threadgroup memory, 0 past the split's end.
// Per tile of a SIMD group:
//  scores  lane l takes TPL consecutive tokens (dense split: tokens l, l + 32, ...) and loops over
//          the channels: one load brings the lane's TPL K codes of a channel (the per-channel
//          layout makes a SIMD group's loads contiguous; the next channels' loads are issued before
//          this channel's arithmetic); a code c becomes the float 1 + c / 2^KB with two integer
//          operations (shift, mask-or into the mantissa of 1.0), so
//            q . (scale * c + min) = (q * scale * 2^KB) . (1 + c / 2^KB) + q . (min - scale * 2^KB),
//          the last term the same for a whole K group (kc, from qk_table.metal); plus the pattern
//          score tab[r][k_idx];
//  softmax online in fp32 per query head (the SIMD group's max); the lane that scored a token also
//          adds its V terms that do not depend on the channel, p * (min - scale * 2^VB) per V group,
//          and its probability into the SIMD group's histogram over the V patterns (threadgroup
//          memory, fixed point: integer adds are native in threadgroup memory, float adds are not
//          on every GPU; rescaled with the running max); probabilities into threadgroup memory (a
//          SIMD-group barrier orders them). The loads of these per-token terms, and of the value
//          loop's first codes, are issued before the softmax, whose latency hides theirs;
//  values  lane l takes CPL = 8 channels of token l / LPT of each step (LPT = D / 8 lanes a token,
//          TPS = 32 / LPT tokens a step) and adds p * scale * 2^VB * (1 + c / 2^VB).
// End: the SIMD groups' states are combined; the split writes its partial output, (m, l) and its V
// pattern histogram; decode_merge.metal multiplies the merged histogram by the V bank once per head.
// NW (SIMD groups) comes from kernels.py, which sizes it to 32 KB of threadgroup memory.
constexpr int NT = 32 * NW;
constexpr int TILE = 32 * TPL;                     // tokens per tile
constexpr int KU = 8;                              // K channels per step of the score loop
constexpr int VU = 8;                              // tokens per lane per step of the value loop
constexpr int CPL = 8;                             // V channels per lane
constexpr int LPT = D / CPL;                       // lanes per token in the value phase
constexpr int TPS = 32 / LPT;                      // tokens per value step
constexpr int NGV = D / GV;                        // V channel groups per token
constexpr int MB = 256;                            // table columns / histogram bins per head (uint8 indices)
constexpr int PB = NW * TILE * R;                  // probabilities [warp][token of the tile][r]
constexpr int HB = VPAT ? NW * R * MB : 0;         // histograms [warp][r][bin]
constexpr int WB = PB + HB > R * D ? PB + HB : R * D;  // at the end: o [r][d]
constexpr float KSCALE = float(1u << KB);
constexpr float VSCALE = float(1u << VB);
constexpr bool PRE = NGV <= 2;                     // per-token V scales / mins preloaded in registers

PKV_SHARED float q_sh[D * R];                     // [d][r]
PKV_SHARED float tab_sh[KPAT ? R * MB : 1];       // [r][m]
PKV_SHARED float work_sh[WB];
PKV_SHARED float st_sh[NW * 2 * R];               // [warp][m, l][r]

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
const int vw0 = (c0 * VB) >> 5;     // VB != 3: the lane's codes start a word (VB 2: half a word)
const uint vsh = uint(c0 * VB) & 31u;
PKV_TG float* pw = work_sh + warp * TILE * R;
PKV_TG uint* hall = (PKV_TG uint*)(work_sh + PB);  // the SIMD groups' histograms
PKV_TG uint* hw = hall + (VPAT ? warp * R * MB : 0);
// Fixed-point scale of the histograms, 2^k: a SIMD group adds at most ST probabilities (each <= 1,
// rounded) into a bin, so ST * 2^k <= 2^31 keeps a bin below 2^32; k <= 22 for the conversion by
// adding 2^23 (rounds to nearest, one float add).
int hk = 31;
for (int v = ST - 1; v > 0; v >>= 1) {
  --hk;
}
const float hsc = float(1 << pkv_imin(hk, 22));

// ---- prologue: q, the pattern score table, empty histograms
for (int i = tid; i < D * R; i += NT) {
  const int r = i / D;
  const int d = i % D;
  q_sh[d * R + r] = static_cast<float>(q[(bh * R + r) * D + d]);
}
for (int i = tid; i < HB; i += NT) {
  work_sh[PB + i] = 0.0f;
}
PKV_BARRIER();
if (KPAT && !dense) {
  for (int i = tid; i < R * MKC; i += NT) {
    tab_sh[(i / MKC) * MB + i % MKC] = tab[bh * R * MKC + i];
  }
  PKV_BARRIER();
}

// ---- this SIMD group's tiles
float m_run[R];      // running max (log2 units), uniform over the SIMD group
float l_run[R];      // running sum, this lane's tokens
float am[NGV][R];    // sum over this lane's scored tokens of p * (min - scale * 2^VB), per V group
float acc[CPL][R];   // unnormalised output, channels c0 .. c0 + CPL - 1
for (int r = 0; r < R; ++r) {
  m_run[r] = PKV_NEG;
  l_run[r] = 0.0f;
  for (int g = 0; g < NGV; ++g) {
    am[g][r] = 0.0f;
  }
  for (int c = 0; c < CPL; ++c) {
    acc[c][r] = 0.0f;
  }
}

const int TS = dense ? 32 : TILE;  // tokens per tile (the dense split: one token a lane)
for (int tile = t_begin + warp * TS; tile < t_end; tile += NW * TS) {
  // ---- scores of this lane's TPL tokens
  float s[TPL][R];
  for (int j = 0; j < TPL; ++j) {
    for (int r = 0; r < R; ++r) {
      s[j][r] = 0.0f;
    }
  }
  const int tl0 = tile + lane * TPL;  // quantized split: this lane's first token
  int nv = 0;                         // valid tokens of this lane (quantized: the first nv of its TPL)
  const int t_stop = pkv_imin(TS, t_end - tile);  // tokens of this tile (> 0)
  // Value loop (quantized split): rows past the tile's last token are read as that token's row again
  // (so every load stays inside the cache and needs one min), and add nothing: their
  // probabilities in pw are 0.
  const int lim = pkv_imax(t_stop - 1 - tsub, 0);  // last row offset of this lane
  const uint lrow = uint(bh * TCAP + tile + tsub);  // row of the lane's first token
  float vsr[PRE ? TPL * NGV : 1];     // quantized split, loaded before the softmax: V scale * 2^VB,
  float vmr[PRE ? TPL * NGV : 1];     // V min, V pattern of this lane's tokens,
  int vir[VPAT ? TPL : 1];
  uint lo_n[VU];                      // and the value loop's first codes (its next step's codes)
  uint hi_n[VU];
  if (!dense) {
    nv = pkv_imax(0, pkv_imin(TPL, t_end - tl0));
    if (nv > 0) {
      const int grp = tl0 / G;
      const PKV_DEVICE uint* kw = k_codes + bh * D * WK;
      const int kg = bh * D * NGK + grp;
      const uint kbit = uint(tl0) * uint(KB);
      const int kw0 = int(kbit >> 5);  // KB != 3: the lane's codes lie in one word of a channel row
      const uint ksh = kbit & 31u;
      uint w[KU];
      float sc[KU];
      PKV_UNROLL for (int u = 0; u < KU; ++u) {
        w[u] = KB == 3 ? pkv_bits(kw + u * WK, kbit, uint(TPL * KB)) : kw[u * WK + kw0] >> ksh;
        sc[u] = static_cast<float>(k_scales[kg + u * NGK]) * KSCALE;
      }
      for (int d0 = 0; d0 < D; d0 += KU) {
        uint wn[KU];  // the next KU channels, loaded before this block's arithmetic
        float scn[KU];
        const int dn = d0 + KU < D ? d0 + KU : d0;
        PKV_UNROLL for (int u = 0; u < KU; ++u) {
          wn[u] = KB == 3 ? pkv_bits(kw + (dn + u) * WK, kbit, uint(TPL * KB)) : kw[(dn + u) * WK + kw0] >> ksh;
          scn[u] = static_cast<float>(k_scales[kg + (dn + u) * NGK]) * KSCALE;
        }
        PKV_UNROLL for (int u = 0; u < KU; ++u) {
          float qs[R];
          for (int r = 0; r < R; ++r) {
            qs[r] = q_sh[(d0 + u) * R + r] * sc[u];
          }
          PKV_UNROLL for (int j = 0; j < TPL; ++j) {
            const float f = pkv_unit(w[u], j * KB, KB);
            for (int r = 0; r < R; ++r) {
              s[j][r] += qs[r] * f;
            }
          }
        }
        PKV_UNROLL for (int u = 0; u < KU; ++u) {
          w[u] = wn[u];
          sc[u] = scn[u];
        }
      }
      float kgc[R];  // this group's constant (qk_table.metal)
      for (int r = 0; r < R; ++r) {
        kgc[r] = kc[(bh * R + r) * NGK + grp];
      }
      for (int j = 0; j < TPL; ++j) {
        const int kid = KPAT ? int(k_idx[bh * TCAP + tl0 + j]) : 0;
        for (int r = 0; r < R; ++r) {
          s[j][r] += kgc[r];
          if (KPAT) {
            s[j][r] += tab_sh[r * MB + kid];
          }
        }
      }
    }
    // (a token past the split's end reads the split's last token, and is not used)
    PKV_UNROLL for (int j = 0; j < TPL; ++j) {
      const int t = pkv_imin(tl0 + j, t_end - 1);
      if (PRE) {
        PKV_UNROLL for (int g = 0; g < NGV; ++g) {
          vsr[PRE ? j * NGV + g : 0] = static_cast<float>(v_scales[(bh * TCAP + t) * NGV + g]) * VSCALE;
          vmr[PRE ? j * NGV + g : 0] = static_cast<float>(v_mins[(bh * TCAP + t) * NGV + g]);
        }
      }
      if (VPAT) {
        vir[VPAT ? j : 0] = int(v_idx[bh * TCAP + t]);
      }
    }
    PKV_UNROLL for (int u = 0; u < VU; ++u) {
      const PKV_DEVICE uint* vc = v_codes + (lrow + uint(pkv_imin(u * TPS, lim))) * uint(WV);
      lo_n[u] = VB == 3 ? pkv_bits(vc, uint(c0 * VB), uint(CPL * VB)) : vc[vw0] >> vsh;
      hi_n[u] = VB == 8 ? vc[vw0 + 1] : 0u;
    }
  } else {
    const int t = tile + lane;
    if (t < nw) {
      PKV_UNROLL for (int d = 0; d < D; ++d) {
        const float x = static_cast<float>(k_win[(bh * W + t) * D + d]);
        for (int r = 0; r < R; ++r) {
          s[0][r] += q_sh[d * R + r] * x;
        }
      }
    } else if (t < t_end) {
      PKV_UNROLL for (int d = 0; d < D; ++d) {
        const float x = static_cast<float>(k_new[(bh * LN + t - nw) * D + d]);
        for (int r = 0; r < R; ++r) {
          s[0][r] += q_sh[d * R + r] * x;
        }
      }
    }
  }

  // ---- online softmax: max over the SIMD group, probabilities of this lane's tokens (into s)
  float corr[R];
  bool grew = false;  // uniform over the SIMD group
  for (int r = 0; r < R; ++r) {
    float mt = PKV_NEG;
    for (int j = 0; j < TPL; ++j) {
      const bool valid = dense ? j == 0 && tile + lane < t_end : j < nv;
      s[j][r] = valid ? s[j][r] * sl2 : PKV_NEG;
      mt = pkv_fmax(mt, s[j][r]);
    }
    mt = pkv_simd_max(mt);
    const float m_new = pkv_fmax(m_run[r], mt);
    corr[r] = pkv_exp2(m_run[r] - m_new);
    grew = grew || m_new > m_run[r];
    m_run[r] = m_new;
    float sum = 0.0f;
    for (int j = 0; j < TPL; ++j) {
      const float p = s[j][r] > 0.5f * PKV_NEG ? pkv_exp2(s[j][r] - m_new) : 0.0f;
      if (dense || NGV > 1) {  // one V group: the lane stores p * scale * 2^VB below
        pw[(dense ? j * 32 + lane : lane * TPL + j) * R + r] = p;
      }
      s[j][r] = p;
      sum += p;
    }
    l_run[r] = l_run[r] * corr[r] + sum;
    for (int g = 0; g < NGV; ++g) {
      am[g][r] *= corr[r];
    }
    for (int c = 0; c < CPL; ++c) {
      acc[c][r] *= corr[r];
    }
  }
  if (!dense) {
    if (VPAT && grew) {
      for (int r = 0; r < R; ++r) {
        for (int i = lane; i < MB; i += 32) {
          hw[r * MB + i] = uint(float(hw[r * MB + i]) * corr[r] + 0.5f);
        }
      }
      PKV_SIMD_BARRIER();
    }
    PKV_UNROLL for (int j = 0; j < TPL; ++j) {
      if (j < nv) {
        const int t = tl0 + j;
        PKV_UNROLL for (int g = 0; g < NGV; ++g) {
          const float vs = PRE ? vsr[PRE ? j * NGV + g : 0]
                               : static_cast<float>(v_scales[(bh * TCAP + t) * NGV + g]) * VSCALE;
          const float vm = PRE ? vmr[PRE ? j * NGV + g : 0] : static_cast<float>(v_mins[(bh * TCAP + t) * NGV + g]);
          for (int r = 0; r < R; ++r) {
            am[g][r] += s[j][r] * (vm - vs);
            if (NGV == 1) {
              pw[(lane * TPL + j) * R + r] = s[j][r] * vs;
            }
          }
        }
        const int vid = VPAT ? vir[VPAT ? j : 0] : PKV_NO_PATTERN;
        if (vid != PKV_NO_PATTERN) {
          for (int r = 0; r < R; ++r) {  // round(p * hsc): the float's mantissa after adding 2^23
            pkv_atomic_add_tg(hw + r * MB + vid, pkv_as_uint(s[j][r] * hsc + 8388608.0f) - 0x4B000000u);
          }
        }
      } else if (NGV == 1) {  // tokens past the split's end: p * scale 0 for the value loop
        for (int r = 0; r < R; ++r) {
          pw[(lane * TPL + j) * R + r] = 0.0f;
        }
      }
    }
  }
  PKV_SIMD_BARRIER();

  // ---- values
  if (!dense) {
    const int vg = c0 / GV;
    for (int tt0 = 0; tt0 < t_stop; tt0 += VU * TPS) {
      uint lo_c[VU];
      uint hi_c[VU];
      PKV_UNROLL for (int u = 0; u < VU; ++u) {
        lo_c[u] = lo_n[u];
        hi_c[u] = hi_n[u];
        const PKV_DEVICE uint* vc = v_codes + (lrow + uint(pkv_imin(tt0 + VU * TPS + u * TPS, lim))) * uint(WV);
        lo_n[u] = VB == 3 ? pkv_bits(vc, uint(c0 * VB), uint(CPL * VB)) : vc[vw0] >> vsh;
        hi_n[u] = VB == 8 ? vc[vw0 + 1] : 0u;
      }
      PKV_UNROLL for (int u = 0; u < VU; ++u) {
        const int tt = tt0 + u * TPS + tsub;  // < TS: pw holds 0 for tokens past t_stop
        const uint lo = lo_c[u];
        const uint hi = hi_c[u];
        float pv[R];  // p * scale * 2^VB
        if (NGV == 1) {
          for (int r = 0; r < R; ++r) {
            pv[r] = pw[tt * R + r];
          }
        } else {
          const uint row = lrow + uint(pkv_imin(tt0 + u * TPS, lim));
          const float vs = static_cast<float>(v_scales[row * uint(NGV) + uint(vg)]) * VSCALE;
          for (int r = 0; r < R; ++r) {
            pv[r] = pw[tt * R + r] * vs;
          }
        }
        PKV_UNROLL for (int c = 0; c < CPL; ++c) {
          const float f = pkv_unit(c * VB < 32 ? lo : hi, (c * VB) % 32, VB);
          for (int r = 0; r < R; ++r) {
            acc[c][r] += pv[r] * f;
          }
        }
      }
    }
  } else {
    PKV_UNROLL for (int k = 0; k < 32 / TPS; ++k) {
      const int tt = k * TPS + tsub;
      const int t = tile + tt;
      if (tt < t_stop) {
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
  }
  PKV_SIMD_BARRIER();
}

// ---- combine: the lanes of a channel slice (am: the whole SIMD group), then the SIMD groups
for (int r = 0; r < R; ++r) {
  for (int off = LPT; off < 32; off <<= 1) {
    for (int c = 0; c < CPL; ++c) {
      acc[c][r] += pkv_shfl_xor(acc[c][r], ushort(off));
    }
  }
  for (int g = 0; g < NGV; ++g) {
    am[g][r] = pkv_simd_sum(am[g][r]);
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
  for (int w2 = 0; w2 < NW; ++w2) {
    m_all[r] = pkv_fmax(m_all[r], st_sh[w2 * 2 * R + r]);
  }
  l_all[r] = 0.0f;
  for (int w2 = 0; w2 < NW; ++w2) {
    l_all[r] += st_sh[w2 * 2 * R + R + r] * pkv_exp2(st_sh[w2 * 2 * R + r] - m_all[r]);
  }
}
const int ps = bh * NS + split;
if (VPAT) {  // the SIMD groups' histograms, rescaled to the split's max
  for (int i = tid; i < R * MVC; i += NT) {
    const int r = i / MVC;
    const int bin = i % MVC;
    float mr = PKV_NEG;
    for (int w2 = 0; w2 < NW; ++w2) {
      mr = pkv_fmax(mr, st_sh[w2 * 2 * R + r]);
    }
    float v = 0.0f;
    for (int w2 = 0; w2 < NW; ++w2) {
      v += float(hall[(w2 * R + r) * MB + bin]) * pkv_exp2(st_sh[w2 * 2 * R + r] - mr);
    }
    hist_part[ps * R * MVC + i] = v / hsc;
  }
  PKV_BARRIER();
}
const int vg = c0 / GV;
for (int w2 = 0; w2 < NW; ++w2) {  // o into work_sh as [r][d], one SIMD group after another
  if (warp == w2 && lane < LPT) {
    for (int r = 0; r < R; ++r) {
      float a = 0.0f;  // am of this lane's V group (a select: no register array indexed at run time)
      for (int g = 0; g < NGV; ++g) {
        a = g == vg ? am[g][r] : a;
      }
      const float f = pkv_exp2(m_run[r] - m_all[r]);
      for (int c = 0; c < CPL; ++c) {
        const float v = (acc[c][r] + a) * f;
        work_sh[r * D + c0 + c] = w2 == 0 ? v : work_sh[r * D + c0 + c] + v;
      }
    }
  }
  PKV_BARRIER();
}
for (int i = tid; i < R * D; i += NT) {
  o_part[ps * R * D + i] = work_sh[i];
}
if (tid < R) {
  ml_part[(ps * R + tid) * 2] = m_all[tid];
  ml_part[(ps * R + tid) * 2 + 1] = l_all[tid];
}
