// Copyright © 2026 mlx-patternkv authors.
// Kernel body: flush NG groups of G tokens of K (IS_V false) or V (IS_V true) for every (b, h):
//   1. the Chebyshev centre (min + max) / 2 of each group, rounded to T;
//   2. each token goes to the nearest candidate pattern by min-max distance
//      d(x, c) = max_j (x_j - c_j) - min_j (x_j - c_j) (first index on ties): candidates of group j are
//      the NP valid bank rows, then the centres of groups 0..j that join the bank (group i's
//      centre joins while NP + i < MAXP);
//   3. V only: the gate of PATTERNKV.md keeps the pattern iff rho = d / range(x) passes
//      1 - rho^2 >= thr * sqrt(1 + rho^4) (thr = 2 z / sqrt(5 D); thr < 0 keeps every pattern); a
//      token whose gate is off stores 255 and its raw vector;
//   4. residual x - c quantized like quantize.py (scale = (max - min) / (2^BITS - 1) and min rounded
//      to T, codes against the rounded values) and packed LSB first in uint32 words:
//      K per channel over the group's G tokens, V per token over groups of GV channels.
// Grid (NTF * NG, H, B), threadgroup (NTF, 1, 1): threadgroup j handles group j (groups are
// independent once the centres are known; each threadgroup recomputes the centres it needs).
// Inputs:  x [B, H, TX, D] XT (rows x0 .. x0 + NG * G - 1 are flushed), bank [B, H, MC, D] T,
//          prm int32 [H, TX, x0, NG, MC, MAXP, NP, bits of the float thr]
// Outputs: idx [B, H, NG * G] uint8; K: codes [B, H, D, NG * G * BITS / 32] uint32, scales/mins
//          [B, H, D, NG] T; V: codes [B, H, NG * G, D * BITS / 32] uint32, scales/mins
//          [B, H, NG * G, D / GV] T; centers [B, H, NG, D] T.
// Template: XT, T, D, BITS, G, GV, IS_V, HAS_BANK, NGC (centres that fit threadgroup memory), NTF
// (threads per threadgroup, a multiple of 32 and >= D).
constexpr int NT = NTF;
constexpr int NW = NT / 32;
constexpr int DL = D / 32;
constexpr uint QMAX = (1u << BITS) - 1u;

PKV_SHARED float cen_sh[HAS_BANK ? NGC * D : 1];  // candidate centres, [i][d]
PKV_SHARED int idx_sh[G];                         // chosen candidate, -1 = none
PKV_SHARED int keep_sh[G];                        // V gate

const int tid = int(thread_position_in_threadgroup.x);
const int lane = int(thread_index_in_simdgroup);
const int warp = int(simdgroup_index_in_threadgroup);
const int j = int(threadgroup_position_in_grid.x);
const int h = int(threadgroup_position_in_grid.y);
const int b = int(threadgroup_position_in_grid.z);
const int H = prm[0];
const int TX = prm[1];
const int X0 = prm[2];
const int NG = prm[3];
const int MC = prm[4];
const int MAXP = prm[5];
const float thr = pkv_as_float(uint(prm[7]));
const int bh = b * H + h;
const int np = HAS_BANK ? prm[6] : 0;
const int n_ext = HAS_BANK ? pkv_imin(j + 1, pkv_imax(0, pkv_imin(MAXP - np, NG))) : 0;
const int ncand = np + n_ext;
const int N = NG * G;  // tokens flushed per (b, h)
const int xrow0 = bh * TX + X0;

// ---- 1. centres of groups 0 .. max(j, n_ext - 1): the candidates, and this group's for the output
for (int d = tid; d < D; d += NT) {
  const int last = pkv_imax(j, n_ext - 1);
  for (int i = 0; i <= last; ++i) {
    if (i != j && i >= n_ext) {
      continue;
    }
    float mn = PKV_BIG;
    float mx = -PKV_BIG;
    for (int t = 0; t < G; ++t) {
      const float v = static_cast<float>(x[(xrow0 + i * G + t) * D + d]);
      mn = pkv_fmin(mn, v);
      mx = pkv_fmax(mx, v);
    }
    const T c = static_cast<T>((mn + mx) * 0.5f);
    if (i < n_ext) {
      cen_sh[i * D + d] = static_cast<float>(c);
    }
    if (i == j) {
      centers[(bh * NG + j) * D + d] = c;
    }
  }
}
PKV_BARRIER();

// ---- 2, 3. assignment (and the V gate): one SIMD group per token, lanes over channels
for (int t = warp; t < G; t += NW) {
  float xr[DL];
  for (int i = 0; i < DL; ++i) {
    xr[i] = static_cast<float>(x[(xrow0 + j * G + t) * D + lane + 32 * i]);
  }
  int best_i = -1;
  float best = PKV_BIG;
  for (int c = 0; c < ncand; ++c) {  // ties keep the first
    float mx = -PKV_BIG;
    float mn = PKV_BIG;
    for (int i = 0; i < DL; ++i) {
      const int d = lane + 32 * i;
      const float cv = c < np ? static_cast<float>(bank[(bh * MC + c) * D + d]) : cen_sh[(c - np) * D + d];
      const float r = xr[i] - cv;
      mx = pkv_fmax(mx, r);
      mn = pkv_fmin(mn, r);
    }
    const float dist = pkv_simd_max(mx) - pkv_simd_min(mn);
    if (dist < best) {
      best = dist;
      best_i = c;
    }
  }
  int keep = best_i >= 0 ? 1 : 0;
  if (IS_V && best_i >= 0 && thr >= 0.0f) {
    float vmx = -PKV_BIG;
    float vmn = PKV_BIG;
    for (int i = 0; i < DL; ++i) {
      vmx = pkv_fmax(vmx, xr[i]);
      vmn = pkv_fmin(vmn, xr[i]);
    }
    const float rv = pkv_simd_max(vmx) - pkv_simd_min(vmn);
    const float rho = pkv_div(best, rv > 0.0f ? rv : 1.0f);
    const float rho2 = rho * rho;
    keep = (rv > 0.0f && 1.0f - rho2 >= thr * pkv_sqrt(1.0f + rho2 * rho2)) ? 1 : 0;
  }
  if (lane == 0) {
    idx_sh[t] = best_i;
    keep_sh[t] = keep;
    int out_i = best_i < 0 ? 0 : best_i;
    if (IS_V && keep == 0) {
      out_i = PKV_NO_PATTERN;
    }
    idx[bh * N + j * G + t] = static_cast<uint8_t>(out_i);
  }
}
PKV_BARRIER();

// ---- 4. residuals, quantization, packing
if (!IS_V) {
  // K: one thread per channel, over the group's G tokens
  constexpr int WPG = G * BITS / 32;  // words per channel and group
  for (int d = tid; d < D; d += NT) {
    float mn = PKV_BIG;
    float mx = -PKV_BIG;
    for (int t = 0; t < G; ++t) {
      const int c = idx_sh[t];
      float r = static_cast<float>(x[(xrow0 + j * G + t) * D + d]);
      if (c >= 0) {
        r -= c < np ? static_cast<float>(bank[(bh * MC + c) * D + d]) : cen_sh[(c - np) * D + d];
      }
      mn = pkv_fmin(mn, r);
      mx = pkv_fmax(mx, r);
    }
    const T sT = static_cast<T>(pkv_div(mx - mn, float(QMAX)));
    const T mT = static_cast<T>(mn);
    const float s = static_cast<float>(sT);
    const float m0 = static_cast<float>(mT);
    const int srow = (bh * D + d) * NG + j;
    scales[srow] = sT;
    mins[srow] = mT;
    const int wrow = (bh * D + d) * (NG * WPG) + j * WPG;
    pkv_u64 bits = 0;
    int nb = 0;
    int wo = 0;
    for (int t = 0; t < G; ++t) {
      const int c = idx_sh[t];
      float r = static_cast<float>(x[(xrow0 + j * G + t) * D + d]);
      if (c >= 0) {
        r -= c < np ? static_cast<float>(bank[(bh * MC + c) * D + d]) : cen_sh[(c - np) * D + d];
      }
      bits |= pkv_u64(pkv_code(r, m0, s, QMAX)) << nb;
      nb += BITS;
      if (nb >= 32) {
        codes[wrow + wo] = uint32_t(bits & 0xffffffffu);
        wo += 1;
        bits >>= 32;
        nb -= 32;
      }
    }
  }
} else {
  // V: one thread per (token, channel group of GV)
  constexpr int NGV = D / GV;
  constexpr int WPG = GV * BITS / 32;  // words per token and channel group
  for (int u = tid; u < G * NGV; u += NT) {
    const int t = u / NGV;
    const int g = u % NGV;
    const int c = keep_sh[t] != 0 ? idx_sh[t] : -1;
    const int xo = (xrow0 + j * G + t) * D + g * GV;
    float mn = PKV_BIG;
    float mx = -PKV_BIG;
    for (int e = 0; e < GV; ++e) {
      float r = static_cast<float>(x[xo + e]);
      if (c >= 0) {
        const int d = g * GV + e;
        r -= c < np ? static_cast<float>(bank[(bh * MC + c) * D + d]) : cen_sh[(c - np) * D + d];
      }
      mn = pkv_fmin(mn, r);
      mx = pkv_fmax(mx, r);
    }
    const T sT = static_cast<T>(pkv_div(mx - mn, float(QMAX)));
    const T mT = static_cast<T>(mn);
    const float s = static_cast<float>(sT);
    const float m0 = static_cast<float>(mT);
    const int row = bh * N + j * G + t;
    scales[row * NGV + g] = sT;
    mins[row * NGV + g] = mT;
    const int wrow = row * (D * BITS / 32) + g * WPG;
    pkv_u64 bits = 0;
    int nb = 0;
    int wo = 0;
    for (int e = 0; e < GV; ++e) {
      float r = static_cast<float>(x[xo + e]);
      if (c >= 0) {
        const int d = g * GV + e;
        r -= c < np ? static_cast<float>(bank[(bh * MC + c) * D + d]) : cen_sh[(c - np) * D + d];
      }
      bits |= pkv_u64(pkv_code(r, m0, s, QMAX)) << nb;
      nb += BITS;
      if (nb >= 32) {
        codes[wrow + wo] = uint32_t(bits & 0xffffffffu);
        wo += 1;
        bits >>= 32;
        nb -= 32;
      }
    }
  }
}
