// Copyright © 2026 mlx-patternkv authors.
// Kernel body: merge the partial softmax states of decode_split.metal, and add the V patterns.
//   w_s = exp2(m_s - M), L = sum_s w_s l_s,
//   hist[m] = sum_s w_s hist_s[m]                       (probability mass on V pattern m)
//   out = (sum_s w_s o_s + sum_m hist[m] P_v[m]) / L    (0 where no token was attended)
// Grid (NT * R, H, B), threadgroup (NT, 1, 1), NT = 512: one threadgroup per (b, h, query head r).
// Inputs:  o_part [B, H, NS, R, D] float, ml_part [B, H, NS, R, 2] float, hist_part [B, H, NS, R, MVC]
//          float, v_bank [B, H, MVC, D] T (both read only when VPAT), prm int32 (decode_split.metal's:
//          H at 0, NSQ at 5, MVC at 7)
// Output:  out [B, Hq, 1, D] QT
// Template: QT, T, D, R (<= 8), VPAT.  NS <= 256 (the host picks the split size so), MVC <= 256.
// The kernel is bound by the latency of its loads (one threadgroup per query head), so it keeps many
// in flight: every split's (m, l) is read at once; thread t sums the histogram bin t % 256 over the
// splits t / 256, t / 256 + HP, ... and the output channel t % D over the splits (then the patterns)
// t / D, t / D + NP, ..., U (UO) loads at a time (predicated, so that a partial batch does not run
// one load after another); the parts meet in threadgroup memory.
constexpr int NT = 512;
constexpr int MAXS = 256;
constexpr int HP = NT / 256;  // parts of the histogram sum
constexpr int NP = NT / D;    // parts of the output sum
constexpr int U = 8;          // loads in flight per thread (histogram)
constexpr int UO = 16;        // loads in flight per thread (output)

PKV_SHARED float m_sh[MAXS];
PKV_SHARED float w_sh[MAXS];  // l_s, then w_s
PKV_SHARED float l_sh[1];
PKV_SHARED float hist_sh[VPAT ? HP * 256 : 1];
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

// the weights: (m_s, l_s) of every split in one round of loads, then one SIMD group reduces them
if (tid < NS) {
  const int i = ((bh * NS + tid) * R + r) * 2;
  const float ls = ml_part[i + 1];
  m_sh[tid] = ls > 0.0f ? ml_part[i] : PKV_NEG;
  w_sh[tid] = ls;
}
PKV_BARRIER();
if (warp == 0) {
  float mx = PKV_NEG;
  for (int s = lane; s < NS; s += 32) {
    mx = pkv_fmax(mx, m_sh[s]);
  }
  mx = pkv_simd_max(mx);
  float l = 0.0f;
  for (int s = lane; s < NS; s += 32) {
    const float ls = w_sh[s];
    const float w = ls > 0.0f ? pkv_exp2(m_sh[s] - mx) : 0.0f;
    w_sh[s] = w;
    l += w * ls;
  }
  l = pkv_simd_sum(l);
  if (lane == 0) {
    l_sh[0] = l;
  }
}
PKV_BARRIER();

// hist[m] = sum_s w_s hist_s[m] in HP parts; select, not multiply: an empty split has w_s = 0
if (VPAT) {
  const int bin = tid % 256;
  const int hp = tid / 256;
  float a[U];
  for (int k = 0; k < U; ++k) {
    a[k] = 0.0f;
  }
  if (bin < MVC) {
    const PKV_DEVICE float* hs = hist_part + (bh * NS * R + r) * MVC + bin;  // split s: hs + s * R * MVC
    for (int s = hp; s < NS; s += U * HP) {
      PKV_UNROLL for (int k = 0; k < U; ++k) {
        const int sk = s + k * HP;
        if (sk < NS) {
          const float w = w_sh[sk];
          const float v = hs[sk * R * MVC];
          a[k] += w > 0.0f ? w * v : 0.0f;
        }
      }
    }
  }
  float sum = 0.0f;
  for (int k = 0; k < U; ++k) {
    sum += a[k];
  }
  hist_sh[tid] = sum;
  PKV_BARRIER();
}

// o[d] = sum_s w_s o_s[d] + sum_m hist[m] P_v[m][d], in NP parts
const int d = tid % D;
const int part = tid / D;
float a[UO];
for (int k = 0; k < UO; ++k) {
  a[k] = 0.0f;
}
{
  const PKV_DEVICE float* os = o_part + (bh * NS * R + r) * D + d;  // split s: os + s * R * D
  for (int s = part; s < NS; s += UO * NP) {
    PKV_UNROLL for (int k = 0; k < UO; ++k) {
      const int sk = s + k * NP;
      if (sk < NS) {
        const float w = w_sh[sk];
        const float v = os[sk * R * D];
        a[k] += w > 0.0f ? w * v : 0.0f;
      }
    }
  }
}
if (VPAT) {
  const PKV_DEVICE T* bank = v_bank + bh * MVC * D + d;
  for (int m = part; m < MVC; m += UO * NP) {
    PKV_UNROLL for (int k = 0; k < UO; ++k) {
      const int mk = m + k * NP;
      if (mk < MVC) {
        float hm = 0.0f;
        for (int p = 0; p < HP; ++p) {
          hm += hist_sh[p * 256 + mk];
        }
        a[k] += hm * static_cast<float>(bank[mk * D]);
      }
    }
  }
}
float sum = 0.0f;
for (int k = 0; k < UO; ++k) {
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
