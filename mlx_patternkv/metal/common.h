// Copyright © 2026 mlx-patternkv authors.
// Helpers shared by the kernel bodies, written only against the names of prelude_metal.h /
// prelude_cuda.h, so they compile for both backends.

// A finite stand-in for -infinity (Metal's fast math may not honour infinities).
#define PKV_NEG (-1.0e30f)
#define PKV_BIG (3.0e38f)
// V pattern index of a token whose gate is off (config.NO_PATTERN).
#define PKV_NO_PATTERN 255

// nbits (<= 32) bits starting at bit `bit` of a packed uint32 stream, LSB first: the mx.quantize
// layout, where a 3-bit code may straddle two words. P is a pointer to uint32 in any address space.
template <typename P>
PKV_FUNC uint pkv_bits(P words, uint bit, uint nbits) {
  uint w = bit >> 5;
  uint s = bit & 31u;
  uint v = words[w] >> s;
  if (s + nbits > 32u) {
    v |= words[w + 1] << (32u - s);
  }
  return nbits >= 32u ? v : (v & ((1u << nbits) - 1u));
}

// A small code (< 2^23) as a float without an int-to-float conversion instruction (those run at a
// fraction of the FMA rate on NVIDIA GPUs): 2^23 + code has the code in the mantissa.
PKV_FUNC float pkv_code_float(uint code) {
  return pkv_as_float(0x4B000000u | code) - 8388608.0f;
}

// Code `bits` bits wide at bit `pos` of w, as the float 1 + code / 2^bits: the code is shifted into
// the top of the mantissa of 1.0 (two integer operations when pos and bits are constants).
PKV_FUNC float pkv_unit(uint w, int pos, int bits) {
  const int sh = 23 - bits - pos;
  const uint x = sh >= 0 ? (w << uint(sh >= 0 ? sh : 0)) : (w >> uint(sh < 0 ? -sh : 0));
  return pkv_as_float((x & (((1u << uint(bits)) - 1u) << uint(23 - bits))) | 0x3F800000u);
}

// The quantizer of quantize.py for one value: code = clip(rint((x - mn) / scale), 0, 2^b - 1) with
// the stored (rounded) scale and min; a zero scale gives code 0.
PKV_FUNC uint pkv_code(float x, float mn, float scale, uint qmax) {
  if (!(scale > 0.0f)) {
    return 0u;
  }
  float c = pkv_rint(pkv_div(x - mn, scale));
  c = pkv_fmin(pkv_fmax(c, 0.0f), float(qmax));
  return uint(c);
}
