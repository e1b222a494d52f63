// Copyright © 2026 mlx-patternkv authors.
// Kernel body: flash-decoding pass over the compressed cache, one query token per sequence.
//
// Grid (256 * (NSQ + 1), H, B), threadgroup (256, 1, 1). Threadgroup (s, h, b) takes the R query heads
// of KV head h of sequence b together (GQA) and one split of the tokens: splits s < NSQ cover the
// quantized tokens [s * ST, min((s + 1) * ST, n_quant[b])), split NSQ the dense tokens (the FP16
// window rows < n_win[b], then the LN new tokens). It writes its partial softmax state (running max m,
// sum l, unnormalised output o); decode_merge.metal combines the splits.
//
// The V pattern term sum_t p_t P_v[v_idx_t] (gated tokens) is computed one of two ways:
//   VHIST: the pattern-bin histogram S[m] = sum of p_t over tokens with v_idx_t = m, kept in
//          threadgroup memory and written per split; the merge adds sum_m S[m] P_v[m];
//   else:  the pattern row P_v[v_idx_t] is added to each gated token's value (banks are small and
//          stay in cache), so no histogram travels between the passes.
//
// Inputs (whole cache buffers; lengths are data, never template values):
//   q [B, Hq, 1, D] QT                        Hq = H * R, query head h * R + r uses KV head h
//   k_idx [B, H, TCAP] uint8                  K pattern per quantized token
//   k_codes [B, H, D, TCAP * KB / 32] uint32  K residual, per channel, packed along tokens
//   k_scales, k_mins [B, H, D, TCAP / G] T
//   v_idx [B, H, TCAP] uint8                  V pattern, 255 = gate off
//   v_codes [B, H, TCAP, D * VB / 32] uint32  V residual, per token, packed along channels
//   v_scales, v_mins [B, H, TCAP, D / GV] T
//   v_bank [B, H, MVC, D] T                   (read only without VHIST)
//   k_win, v_win [B, H, W, D] T               FP16 window
//   k_new, v_new [B, H, LN, D] QT             the step's new tokens (attended exactly)
//   tab [B, H, R, MKC] float                  q . k_bank (qk_table.metal)
//   prm int32 [9 + 2 B]                       H, TCAP, W, LN, ST, NSQ, MKC, MVC, bits of the float
//                                             softmax scale * log2(e), then n_quant, n_win per sequence
// Outputs:
//   o_part [B, H, NSQ + 1, R, D] float, ml_part [B, H, NSQ + 1, R, 2] float (m in log2 units, l),
//   h_part [B, H, NSQ, R, MVC] float (VHIST only; written for non-empty splits)
// Template: QT, T, D, R (<= 8), KB, VB (2/3/4/8), G (tokens per K group: 32/64/128), GV (V channel
// group), KPAT, VPAT (pattern banks present), VHIST.
//
// A block is one K group of G tokens (one scale/min per channel). The next block's codes, scales and
// indices are loaded into registers while the current block is computed (K data after B, V codes
// after F). Per block:
//  A. per-channel q * scale into threadgroup memory, and q . min partial sums;
//  B. scores: each thread takes 4 consecutive tokens and D / DS channels, reduce over the DS lanes
//     of its token slot (shuffles), add the pattern score tab[idx] and q . min;
//  C. online softmax in fp32 (one SIMD group per query head);
//  D. rescale the running output (and histogram) when the max moved;
//  E. VHIST: p of gated tokens added into bin v_idx (threadgroup atomics);
//  F. values: each thread takes 4 consecutive channels of G / TL tokens.
constexpr int NT = 256;
constexpr int NW = NT / 32;
constexpr int TPT = 4;                // tokens per thread in B
constexpr int SLOTS = G / TPT;        // token slots of a block
constexpr int DS = NT / SLOTS;        // lanes per slot (8, 16, 32 for G = 128, 64, 32)
constexpr int DPS = D / DS;           // channels per lane in B
constexpr int CPT = 4;                // channels per thread in F
constexpr int RT = D / CPT;           // threads per token row in F
constexpr int TL = NT / RT;           // token lanes in F
constexpr int TPF = G / TL;           // tokens per thread in F
constexpr int NGV = D / GV;           // V channel groups per token
constexpr int MB = 256;               // bins reserved per head (indices are uint8)
constexpr bool HIST = VPAT && VHIST;
constexpr uint KMASK = (1u << KB) - 1u;
constexpr uint VMASK = (1u << VB) - 1u;

PKV_SHARED float qs_sh[D * R];          // [d][r]: q * scale of the block (dense: q); reused by the epilogue
PKV_SHARED float cw_sh[NW * R];         // per SIMD group partial q . min
PKV_SHARED float p_sh[G * R];           // [t][r]: scores, then probabilities
PKV_SHARED float tab_sh[KPAT ? R * MB : 1];
PKV_SHARED float hist_sh[HIST ? R * MB : 1];
PKV_SHARED float vs_sh[G * NGV];        // V scale, min of the block's tokens
PKV_SHARED float vm_sh[G * NGV];
PKV_SHARED int kid_sh[G];               // K, V pattern index of the block's tokens
PKV_SHARED int vid_sh[G];
PKV_SHARED float st_sh[3 * R];          // m, l, correction of each head

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

const int slot = tid / DS;
const int ds = tid % DS;
const int tb = slot * TPT;     // first token of this thread's slot, block-relative
const int cq = tid % RT;
const int c0 = cq * CPT;       // first channel of this thread in F
const int tlane = tid / RT;

// q of channel `tid` for the R heads
float qv[R];
for (int r = 0; r < R; ++r) {
  qv[r] = tid < D ? static_cast<float>(q[(bh * R + r) * D + tid]) : 0.0f;
}
if (tid < R) {
  st_sh[tid] = PKV_NEG;
  st_sh[R + tid] = 0.0f;
  st_sh[2 * R + tid] = 1.0f;
}
if (KPAT && !dense) {
  for (int i = tid; i < R * MKC; i += NT) {
    tab_sh[(i / MKC) * MB + i % MKC] = tab[bh * R * MKC + i];
  }
}
if (HIST && !dense) {
  for (int i = tid; i < R * MB; i += NT) {
    hist_sh[i] = 0.0f;
  }
}
float acc[CPT][R];
for (int j = 0; j < CPT; ++j) {
  for (int r = 0; r < R; ++r) {
    acc[j][r] = 0.0f;
  }
}

// ---- registers holding the next block of a quantized split
float pf_sc = 0.0f;        // A: K scale, min of channel tid
float pf_mn = 0.0f;
uint pf_k[DPS];            // B: K code words (TPT tokens of channel ds + i * DS)
uint pf_v[TPF];            // F: V code words (CPT channels of token tlane + i * TL)
float pf_vs[NGV];          // V scale, min of token tid
float pf_vm[NGV];
int pf_kid = 0;            // K, V pattern index of token tid
int pf_vid = PKV_NO_PATTERN;
for (int i = 0; i < DPS; ++i) {
  pf_k[i] = 0u;
}
for (int i = 0; i < TPF; ++i) {
  pf_v[i] = 0u;
}
for (int i = 0; i < NGV; ++i) {
  pf_vs[i] = 0.0f;
  pf_vm[i] = 0.0f;
}
// next block's K codes, K scale/min, pattern indices and V scale/min (issued after B)
#define PKV_PREFETCH_K(T0)                                                                      \
  if (!dense && (T0) < t_end) {                                                                 \
    const int pt0 = (T0);                                                                       \
    if (tid < D) {                                                                              \
      const int gi = (bh * D + tid) * NGK + pt0 / G;                                            \
      pf_sc = static_cast<float>(k_scales[gi]);                                                 \
      pf_mn = static_cast<float>(k_mins[gi]);                                                   \
    }                                                                                           \
    const uint kbit = uint(pt0 + tb) * uint(KB);                                                \
    PKV_UNROLL for (int i = 0; i < DPS; ++i) {                                                  \
      pf_k[i] = pkv_bits(k_codes + (bh * D + ds + i * DS) * WK, kbit, uint(TPT * KB));          \
    }                                                                                           \
    if (tid < G) {                                                                              \
      const int t = pt0 + tid;                                                                  \
      for (int i = 0; i < NGV; ++i) {                                                           \
        pf_vs[i] = static_cast<float>(v_scales[(bh * TCAP + t) * NGV + i]);                     \
        pf_vm[i] = static_cast<float>(v_mins[(bh * TCAP + t) * NGV + i]);                       \
      }                                                                                         \
      if (KPAT) {                                                                               \
        pf_kid = int(k_idx[bh * TCAP + t]);                                                     \
      }                                                                                         \
      if (VPAT) {                                                                               \
        pf_vid = int(v_idx[bh * TCAP + t]);                                                     \
      }                                                                                         \
    }                                                                                           \
  }
// next block's V codes (issued after F)
#define PKV_PREFETCH_V(T0)                                                                      \
  if (!dense && (T0) < t_end) {                                                                 \
    PKV_UNROLL for (int i = 0; i < TPF; ++i) {                                                  \
      pf_v[i] = pkv_bits(v_codes + (bh * TCAP + (T0) + tlane + i * TL) * WV, uint(c0 * VB),     \
                         uint(CPT * VB));                                                       \
    }                                                                                           \
  }

PKV_PREFETCH_K(t_begin)
PKV_PREFETCH_V(t_begin)
PKV_BARRIER();

for (int t0 = t_begin; t0 < t_end; t0 += G) {
  // ---- A: this block's prefetched scales and indices into threadgroup memory
  const float sc = pf_sc;
  const float mn = pf_mn;
  if (!dense && tid < G) {
    const bool valid = t0 + tid < t_end;
    kid_sh[tid] = pf_kid;
    vid_sh[tid] = valid ? pf_vid : PKV_NO_PATTERN;
    for (int i = 0; i < NGV; ++i) {
      vs_sh[tid * NGV + i] = pf_vs[i];
      vm_sh[tid * NGV + i] = pf_vm[i];
    }
  }
  {
    float part[R];
    if (tid < D) {
      for (int r = 0; r < R; ++r) {
        qs_sh[tid * R + r] = dense ? qv[r] : qv[r] * sc;
      }
    }
    for (int r = 0; r < R; ++r) {
      part[r] = dense ? 0.0f : qv[r] * mn;
    }
    for (int r = 0; r < R; ++r) {
      float s = pkv_simd_sum(part[r]);
      if (lane == 0) {
        cw_sh[warp * R + r] = s;
      }
    }
  }
  PKV_BARRIER();

  // ---- B: scores of the block's tokens
  {
    float a[TPT][R];
    for (int j = 0; j < TPT; ++j) {
      for (int r = 0; r < R; ++r) {
        a[j][r] = 0.0f;
      }
    }
    if (!dense) {
      PKV_UNROLL for (int i = 0; i < DPS; ++i) {
        const int d = ds + i * DS;
        for (int j = 0; j < TPT; ++j) {
          const float code = pkv_code_float((pf_k[i] >> uint(j * KB)) & KMASK);
          for (int r = 0; r < R; ++r) {
            a[j][r] += qs_sh[d * R + r] * code;
          }
        }
      }
    } else {
      for (int j = 0; j < TPT; ++j) {
        const int t = t0 + tb + j;
        if (t < nw) {
          for (int i = 0; i < DPS; ++i) {
            const int d = ds + i * DS;
            const float x = static_cast<float>(k_win[(bh * W + t) * D + d]);
            for (int r = 0; r < R; ++r) {
              a[j][r] += qs_sh[d * R + r] * x;
            }
          }
        } else if (t < t_end) {
          for (int i = 0; i < DPS; ++i) {
            const int d = ds + i * DS;
            const float x = static_cast<float>(k_new[(bh * LN + t - nw) * D + d]);
            for (int r = 0; r < R; ++r) {
              a[j][r] += qs_sh[d * R + r] * x;
            }
          }
        }
      }
    }
    PKV_PREFETCH_K(t0 + G)
    // reduce over the DS lanes of the slot; after the first two steps lane ds holds token
    // jt = 2 * (ds & 1) + ((ds >> 1) & 1), then the remaining steps sum the rest of the lanes
    const bool hi0 = (ds & 1) != 0;
    const bool hi1 = (ds & 2) != 0;
    float bsum[2][R];
    for (int k = 0; k < 2; ++k) {
      for (int r = 0; r < R; ++r) {
        const float mine = hi0 ? a[k + 2][r] : a[k][r];
        const float send = hi0 ? a[k][r] : a[k + 2][r];
        bsum[k][r] = mine + pkv_shfl_xor(send, 1);
      }
    }
    float sc2[R];
    for (int r = 0; r < R; ++r) {
      const float mine = hi1 ? bsum[1][r] : bsum[0][r];
      const float send = hi1 ? bsum[0][r] : bsum[1][r];
      sc2[r] = mine + pkv_shfl_xor(send, 2);
    }
    for (int off = 4; off < DS; off <<= 1) {
      for (int r = 0; r < R; ++r) {
        sc2[r] += pkv_shfl_xor(sc2[r], ushort(off));
      }
    }
    if (ds < TPT) {
      const int jt = 2 * (ds & 1) + ((ds >> 1) & 1);
      const int t = t0 + tb + jt;
      const bool valid = t < t_end;
      const int kid = (KPAT && !dense) ? kid_sh[tb + jt] : 0;
      for (int r = 0; r < R; ++r) {
        float s = sc2[r];
        if (!dense) {
          for (int w2 = 0; w2 < (D + 31) / 32; ++w2) {
            s += cw_sh[w2 * R + r];
          }
          if (KPAT) {
            s += tab_sh[r * MB + kid];
          }
        }
        p_sh[(tb + jt) * R + r] = valid ? s * sl2 : PKV_NEG;
      }
    }
  }
  PKV_BARRIER();

  // ---- C: online softmax, one SIMD group per head
  if (warp < R) {
    const int r = warp;
    float mx = PKV_NEG;
    for (int i = lane; i < G; i += 32) {
      mx = pkv_fmax(mx, p_sh[i * R + r]);
    }
    mx = pkv_simd_max(mx);
    const float m_old = st_sh[r];
    const float m_new = pkv_fmax(m_old, mx);
    const float corr = pkv_exp2(m_old - m_new);
    float sum = 0.0f;
    for (int i = lane; i < G; i += 32) {
      const float s = p_sh[i * R + r];
      const float p = s > 0.5f * PKV_NEG ? pkv_exp2(s - m_new) : 0.0f;
      p_sh[i * R + r] = p;
      sum += p;
    }
    sum = pkv_simd_sum(sum);
    if (lane == 0) {
      st_sh[r] = m_new;
      st_sh[R + r] = st_sh[R + r] * corr + sum;
      st_sh[2 * R + r] = corr;
    }
  }
  PKV_BARRIER();

  // ---- D: rescale what was accumulated under the old max
  bool moved = false;
  for (int r = 0; r < R; ++r) {
    const float corr = st_sh[2 * R + r];
    moved = moved || corr != 1.0f;
    for (int j = 0; j < CPT; ++j) {
      acc[j][r] *= corr;
    }
  }
  if (HIST && !dense && moved) {  // uniform: every thread reads the same corrections
    for (int i = tid; i < R * MVC; i += NT) {
      const int r = i / MVC;
      hist_sh[r * MB + i % MVC] *= st_sh[2 * R + r];
    }
    PKV_BARRIER();
  }

  // ---- E: V pattern-bin histogram
  if (HIST && !dense && tid < G) {
    const int vi = vid_sh[tid];
    if (vi != PKV_NO_PATTERN) {
      for (int r = 0; r < R; ++r) {
        pkv_atomic_add_tg(&hist_sh[r * MB + vi], p_sh[tid * R + r]);
      }
    }
  }

  // ---- F: values (tokens past the end have p = 0 and in-bounds codes)
  PKV_UNROLL for (int i = 0; i < TPF; ++i) {
    const int tt = tlane + i * TL;
    const int t = t0 + tt;
    float v[CPT];
    if (!dense) {
      const float vs = vs_sh[tt * NGV + c0 / GV];
      const float vm = vm_sh[tt * NGV + c0 / GV];
      for (int j = 0; j < CPT; ++j) {
        v[j] = pkv_code_float((pf_v[i] >> uint(j * VB)) & VMASK) * vs + vm;
      }
      if (VPAT && !VHIST) {
        const int vi = vid_sh[tt];
        if (vi != PKV_NO_PATTERN) {
          for (int j = 0; j < CPT; ++j) {
            v[j] += static_cast<float>(v_bank[(bh * MVC + vi) * D + c0 + j]);
          }
        }
      }
    } else if (t < nw) {
      for (int j = 0; j < CPT; ++j) {
        v[j] = static_cast<float>(v_win[(bh * W + t) * D + c0 + j]);
      }
    } else if (t < t_end) {
      for (int j = 0; j < CPT; ++j) {
        v[j] = static_cast<float>(v_new[(bh * LN + t - nw) * D + c0 + j]);
      }
    } else {
      for (int j = 0; j < CPT; ++j) {
        v[j] = 0.0f;
      }
    }
    for (int r = 0; r < R; ++r) {
      const float pr = p_sh[tt * R + r];
      for (int j = 0; j < CPT; ++j) {
        acc[j][r] += pr * v[j];
      }
    }
  }
  PKV_PREFETCH_V(t0 + G)
  PKV_BARRIER();
}
#undef PKV_PREFETCH_K
#undef PKV_PREFETCH_V

// ---- epilogue: sum the token lanes of F, write this split's partial state
for (int L = 0; L < TL; ++L) {
  if (tlane == L) {
    for (int r = 0; r < R; ++r) {
      for (int j = 0; j < CPT; ++j) {
        const int i = r * D + c0 + j;
        qs_sh[i] = L == 0 ? acc[j][r] : qs_sh[i] + acc[j][r];
      }
    }
  }
  PKV_BARRIER();
}
const int ps = bh * NS + split;
const bool empty = t_begin >= t_end;
if (!empty) {
  for (int i = tid; i < R * D; i += NT) {
    o_part[ps * R * D + i] = qs_sh[i];
  }
}
if (tid < R) {
  ml_part[(ps * R + tid) * 2] = st_sh[tid];
  ml_part[(ps * R + tid) * 2 + 1] = st_sh[R + tid];
}
if (HIST && !dense && !empty) {
  for (int i = tid; i < R * MVC; i += NT) {
    h_part[(bh * NSQ + split) * R * MVC + i] = hist_sh[(i / MVC) * MB + i % MVC];
  }
}
