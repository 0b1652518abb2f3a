// qlora-ds: AVX2 (+FMA, F16C) paths of the CPU quant kernels, selected at run time (quant_cpu_isa.h).
// Each function reproduces its scalar twin in quant_cpu_scalar.h bit for bit: the same fp32 operations in
// the same order, min/max operands ordered so that MINPS/MAXPS pick what the scalar ternaries pick (NaN
// included), and the same scalar code for partial blocks and tails. The AVX-512 path reuses these for every
// loop it has no kernel of its own for.
#pragma once

#include "quant_cpu_isa.h"
#include "quant_cpu_scalar.h"

#if QLORA_DS_X86
namespace {

// ---- loads and reductions -----------------------------------------------------------------------

QLORA_DS_AVX2 inline __m256 load8_f32(const float* x) { return _mm256_loadu_ps(x); }
QLORA_DS_AVX2 inline __m256 load8_f32(const c10::BFloat16* x) {  // bf16 -> fp32 is a 16-bit shift: exact
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
QLORA_DS_AVX2 inline __m256 load8_f32(const c10::Half* x) {  // vcvtph2ps: exact, subnormals included
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
}

QLORA_DS_AVX2 inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

QLORA_DS_AVX2 inline uint32_t hor8(__m256i v) {  // bitwise OR of the 8 lanes
  __m128i o = _mm_or_si128(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  o = _mm_or_si128(o, _mm_unpackhi_epi64(o, o));
  o = _mm_or_si128(o, _mm_srli_epi64(o, 32));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(o));
}

// max |x| of a block, len % 8 == 0. max_ps(a, acc) = a > acc ? a : acc, as block_absmax's ternary (NaN skipped).
template <typename T>
QLORA_DS_AVX2 inline float absmax_avx2(const T* x, int64_t len) {
  const __m256 nosign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < len; i += 8) acc = _mm256_max_ps(_mm256_and_ps(load8_f32(x + i), nosign), acc);
  return hmax8(acc);
}

// clamp(v * inv, -1, 1) as std::min(std::max(v * inv, -1), 1)
template <typename T>
QLORA_DS_AVX2 inline __m256 scaled8(const T* x, __m256 inv) {
  const __m256 v = _mm256_mul_ps(load8_f32(x), inv);
  return _mm256_min_ps(_mm256_set1_ps(1.f), _mm256_max_ps(_mm256_set1_ps(-1.f), v));
}

// ---- 4-bit quantize: #bounds below s by a 4-step branchless binary search ---------------------------

// The 15 sorted bounds laid out for the search: step 1 tests b7, step 2 b3 or b11, step 3 one of
// b1/b5/b9/b13 (a permute of t4), step 4 one of the even bounds (a permute of t8).
struct Bounds15Avx2 {
  __m256 b7, b3, b11, t4, t8;
};

QLORA_DS_AVX2 inline Bounds15Avx2 bounds15_avx2(const float* b) {
  return {_mm256_set1_ps(b[7]), _mm256_set1_ps(b[3]), _mm256_set1_ps(b[11]),
          _mm256_setr_ps(b[1], b[5], b[9], b[13], 0.f, 0.f, 0.f, 0.f),
          _mm256_setr_ps(b[0], b[2], b[4], b[6], b[8], b[10], b[12], b[14])};
}

QLORA_DS_AVX2 inline __m256i count_below15_avx2(const Bounds15Avx2& c, __m256 s) {
  const __m256 m1 = _mm256_cmp_ps(c.b7, s, _CMP_LT_OQ);
  __m256i idx = _mm256_and_si256(_mm256_castps_si256(m1), _mm256_set1_epi32(8));
  const __m256 t2 = _mm256_blendv_ps(c.b3, c.b11, m1);
  idx = _mm256_add_epi32(idx, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(t2, s, _CMP_LT_OQ)),
                                               _mm256_set1_epi32(4)));
  const __m256 t3 = _mm256_permutevar8x32_ps(c.t4, _mm256_srli_epi32(idx, 2));
  idx = _mm256_add_epi32(idx, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(t3, s, _CMP_LT_OQ)),
                                               _mm256_set1_epi32(2)));
  const __m256 t4 = _mm256_permutevar8x32_ps(c.t8, _mm256_srli_epi32(idx, 1));
  return _mm256_add_epi32(idx, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(t4, s, _CMP_LT_OQ)),
                                                _mm256_set1_epi32(1)));
}

// 16 sorted positions (two vectors of int32) -> codes via `order` -> 8 packed bytes, first element high.
QLORA_DS_AVX2 inline void store_codes16_avx2(__m256i c0, __m256i c1, __m128i order, uint8_t* dst) {
  // packs interleaves the 128-bit lanes: [c0 0-3, c1 0-3 | c0 4-7, c1 4-7] -> reorder the 64-bit quarters
  const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(c0, c1), 0xD8);
  __m128i b = _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
  b = _mm_shuffle_epi8(order, b);
  const __m128i pair = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0xFF)), 4),
                                    _mm_srli_epi16(b, 8));  // (even << 4) | odd in each 16-bit word
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_packus_epi16(pair, pair));
}

template <typename T>
QLORA_DS_AVX2 void quant4_blocks_avx2(const Quant4Job<T>& j, int64_t b0, int64_t b1) {
  const Bounds15Avx2 bounds = bounds15_avx2(j.bounds);
  const __m128i order = _mm_loadu_si128(reinterpret_cast<const __m128i*>(j.order));
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * j.bs, len = j.len(b);
    if (len < j.bs || len % 16) {  // the partial last block (true division) and odd block sizes
      quant4_block_scalar(j, b);
      continue;
    }
    float inv = 0.f, div = 1.f;
    j.absmax[b] = block_params(absmax_avx2(j.x + start, len), false, &inv, &div);
    const __m256 vinv = _mm256_set1_ps(inv);
    const T* x = j.x + start;
    for (int64_t i = 0; i < len; i += 16)
      store_codes16_avx2(count_below15_avx2(bounds, scaled8(x + i, vinv)),
                         count_below15_avx2(bounds, scaled8(x + i + 8, vinv)), order, j.packed + (start + i) / 2);
  }
}

// ---- 8-bit quantize: #bounds below s among 255, a search over every 16th bound, then gathers ------

QLORA_DS_AVX2 void quant8_blocks_avx2(const Quant8Job& j, int64_t b0, int64_t b1) {
  float coarse[15];  // bounds8[16k + 15]: the search over them gives the segment of 16 the count falls in
  for (int k = 0; k < 15; ++k) coarse[k] = j.bounds8[16 * k + 15];
  const Bounds15Avx2 seg = bounds15_avx2(coarse);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * j.bs, len = j.len(b);
    if (len < j.bs || len % 8) {
      quant8_block_scalar(j, b);
      continue;
    }
    float inv = 0.f, div = 1.f;
    j.absmax[b] = block_params(absmax_avx2(j.x + start, len), false, &inv, &div);
    const __m256 vinv = _mm256_set1_ps(inv);
    for (int64_t i = start; i < start + len; i += 8) {
      const __m256 s = scaled8(j.x + i, vinv);
      __m256i pos = _mm256_slli_epi32(count_below15_avx2(seg, s), 4);
      for (int step = 8; step >= 1; step >>= 1) {  // bounds8[pos + step - 1] < s ? pos += step
        const __m256 bnd = _mm256_i32gather_ps(j.bounds8 + step - 1, pos, 4);
        pos = _mm256_add_epi32(pos, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(bnd, s, _CMP_LT_OQ)),
                                                     _mm256_set1_epi32(step)));
      }
      const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(pos), _mm256_extracti128_si256(pos, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(j.q + i), _mm_packus_epi16(w, w));
    }
  }
}

QLORA_DS_AVX2 void dequant8_span_avx2(const uint8_t* q, const float* code8, float a, float off, int64_t len,
                                      float* o) {
  const __m256 va = _mm256_set1_ps(a), voff = _mm256_set1_ps(off);
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i)));
    const __m256 v = _mm256_mul_ps(_mm256_i32gather_ps(code8, idx, 4), va);
    _mm256_storeu_ps(o + i, _mm256_add_ps(v, voff));
  }
  dequant8_span_scalar(q + i, code8, a, off, len - i, o + i);
}

// ---- dequantize through a 16-entry table --------------------------------------------------------

QLORA_DS_AVX2 inline __m256i bf16_bits8(__m256 p) {  // bf16_bits on 8 lanes, in the low half of each int32
  const __m256i u = _mm256_castps_si256(p);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)),
                                         _mm256_set1_epi32(0x7F800000));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
}

// 8 fp32 -> 8 x 16-bit bits of OutT in the low half of each int32 lane
QLORA_DS_AVX2 inline __m256i cast8_avx2(__m256 v, c10::BFloat16*) { return bf16_bits8(v); }
QLORA_DS_AVX2 inline __m256i cast8_avx2(__m256 v, c10::Half*) {
  // vcvtps2ph with round-to-nearest-even: same bits as c10::Half for every non-NaN input
  return _mm256_cvtepu16_epi32(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

template <typename OutT>
QLORA_DS_AVX2 inline void cast_lut16_avx2(const float* vals, uint16_t* lut) {
  const __m256i r0 = cast8_avx2(_mm256_loadu_ps(vals), static_cast<OutT*>(nullptr));
  const __m256i r1 = cast8_avx2(_mm256_loadu_ps(vals + 8), static_cast<OutT*>(nullptr));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lut), _mm256_permute4x64_epi64(_mm256_packus_epi32(r0, r1), 0xD8));
}

// expand_scalar for a table of 16-bit values: pshufb on the table split into its low and its high bytes.
template <bool kHighFirst>
QLORA_DS_AVX2 inline void expand16_avx2(const uint8_t* p, int64_t nbytes, const uint16_t* lut, uint16_t* out) {
  const __m128i w0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(lut));
  const __m128i w1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(lut + 8));
  const __m128i even = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m128i odd = _mm_setr_epi8(1, 3, 5, 7, 9, 11, 13, 15, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m128i tlo = _mm_unpacklo_epi64(_mm_shuffle_epi8(w0, even), _mm_shuffle_epi8(w1, even));
  const __m128i thi = _mm_unpacklo_epi64(_mm_shuffle_epi8(w0, odd), _mm_shuffle_epi8(w1, odd));
  int64_t j = 0;
  {  // 32 bytes -> 64 values; unpack works within 128-bit lanes, so the four results are re-paired at the end
    const __m256i tlo2 = _mm256_broadcastsi128_si256(tlo), thi2 = _mm256_broadcastsi128_si256(thi);
    const __m256i m0f = _mm256_set1_epi8(0x0F);
    for (; j + 32 <= nbytes; j += 32) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + j));
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m0f), lo = _mm256_and_si256(v, m0f);
      const __m256i first = kHighFirst ? hi : lo, second = kHighFirst ? lo : hi;
      const __m256i i0 = _mm256_unpacklo_epi8(first, second);  // values 0..15 | 32..47
      const __m256i i1 = _mm256_unpackhi_epi8(first, second);  // values 16..31 | 48..63
      const __m256i l0 = _mm256_shuffle_epi8(tlo2, i0), h0 = _mm256_shuffle_epi8(thi2, i0);
      const __m256i l1 = _mm256_shuffle_epi8(tlo2, i1), h1 = _mm256_shuffle_epi8(thi2, i1);
      const __m256i a = _mm256_unpacklo_epi8(l0, h0), b = _mm256_unpackhi_epi8(l0, h0);  // 0-7|32-39, 8-15|40-47
      const __m256i c = _mm256_unpacklo_epi8(l1, h1), d = _mm256_unpackhi_epi8(l1, h1);  // 16-23|48-55, 24-31|56-63
      __m256i* o = reinterpret_cast<__m256i*>(out + 2 * j);
      _mm256_storeu_si256(o + 0, _mm256_permute2x128_si256(a, b, 0x20));
      _mm256_storeu_si256(o + 1, _mm256_permute2x128_si256(c, d, 0x20));
      _mm256_storeu_si256(o + 2, _mm256_permute2x128_si256(a, b, 0x31));
      _mm256_storeu_si256(o + 3, _mm256_permute2x128_si256(c, d, 0x31));
    }
  }
  const __m128i m0f = _mm_set1_epi8(0x0F);
  for (; j + 16 <= nbytes; j += 16) {  // 16 bytes -> 32 values (a block of 32, an INT4 group of 32)
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), m0f), lo = _mm_and_si128(v, m0f);
    const __m128i first = kHighFirst ? hi : lo, second = kHighFirst ? lo : hi;
    const __m128i i0 = _mm_unpacklo_epi8(first, second), i1 = _mm_unpackhi_epi8(first, second);
    const __m128i l0 = _mm_shuffle_epi8(tlo, i0), h0 = _mm_shuffle_epi8(thi, i0);
    const __m128i l1 = _mm_shuffle_epi8(tlo, i1), h1 = _mm_shuffle_epi8(thi, i1);
    __m128i* o = reinterpret_cast<__m128i*>(out + 2 * j);
    _mm_storeu_si128(o + 0, _mm_unpacklo_epi8(l0, h0));
    _mm_storeu_si128(o + 1, _mm_unpackhi_epi8(l0, h0));
    _mm_storeu_si128(o + 2, _mm_unpacklo_epi8(l1, h1));
    _mm_storeu_si128(o + 3, _mm_unpackhi_epi8(l1, h1));
  }
  expand_scalar<kHighFirst>(p + j, nbytes - j, lut, out + 2 * j);
}

// 8 table indices (int32 lanes, 0..15) -> fp32 from a 16-entry table held in two registers
QLORA_DS_AVX2 inline __m256 lookup16_f32(__m256 t0, __m256 t1, __m256i idx) {
  const __m256 hi_half = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));  // sign bit = index bit 3
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, idx), _mm256_permutevar8x32_ps(t1, idx), hi_half);
}

// expand_scalar for an fp32 table: each byte is duplicated into two int32 lanes, shifted to its nibble.
template <bool kHighFirst>
QLORA_DS_AVX2 inline void expand_f32_avx2(const uint8_t* p, int64_t nbytes, const float* lut, float* out) {
  const __m256 t0 = _mm256_loadu_ps(lut), t1 = _mm256_loadu_ps(lut + 8);
  const __m256i shifts = kHighFirst ? _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0) : _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);
  const __m256i m0f = _mm256_set1_epi32(0xF);
  int64_t j = 0;
  for (; j + 8 <= nbytes; j += 8) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + j));
    const __m128i d = _mm_unpacklo_epi8(b, b);  // b0 b0 b1 b1 ... b7 b7
    const __m256i i0 = _mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(d), shifts), m0f);
    const __m256i i1 = _mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(d, 8)), shifts), m0f);
    _mm256_storeu_ps(out + 2 * j, lookup16_f32(t0, t1, i0));
    _mm256_storeu_ps(out + 2 * j + 8, lookup16_f32(t0, t1, i1));
  }
  expand_scalar<kHighFirst>(p + j, nbytes - j, lut, out + 2 * j);
}

template <typename OutT>
QLORA_DS_AVX2 inline void dequant4_block_avx2(const uint8_t* packed, const float* code, float a, int64_t start,
                                              int64_t len, OutT* out) {
  const uint8_t* p = packed + start / 2;
  const int64_t pairs = len / 2;
  alignas(32) float vals[16];
  const __m256 va = _mm256_set1_ps(a);
  _mm256_store_ps(vals, _mm256_mul_ps(_mm256_loadu_ps(code), va));
  _mm256_store_ps(vals + 8, _mm256_mul_ps(_mm256_loadu_ps(code + 8), va));
  if constexpr (std::is_same_v<OutT, float>) {
    float* o = out + start;
    expand_f32_avx2<true>(p, pairs, vals, o);
    if (len & 1) o[len - 1] = vals[p[pairs] >> 4];
  } else {
    alignas(32) uint16_t lut[16];
    cast_lut16_avx2<OutT>(vals, lut);
    uint16_t* o = reinterpret_cast<uint16_t*>(out) + start;
    expand16_avx2<true>(p, pairs, lut, o);
    if (len & 1) o[len - 1] = lut[p[pairs] >> 4];
  }
}

template <typename OutT>
QLORA_DS_AVX2 void dequant4_blocks_avx2(const uint8_t* packed, const float* code, int64_t bs, int64_t n,
                                        const float* absmax, int64_t b0, int64_t b1, OutT* out) {
  for (int64_t b = b0; b < b1; ++b)
    dequant4_block_avx2(packed, code, absmax[b - b0], b * bs, std::min(bs, n - b * bs), out);
}

// ---- group-wise INT-N ---------------------------------------------------------------------------

template <int N>
QLORA_DS_AVX2 inline __m256i code_shifts_avx2() {  // lane k holds code k of a group of 8 at bit N*k
  return _mm256_setr_epi32(0, N, 2 * N, 3 * N, 4 * N, 5 * N, 6 * N, 7 * N);
}

template <int N, typename T>
QLORA_DS_AVX2 void quant_intn_groups_avx2(const IntnQuantJob<T>& j, int64_t g0, int64_t g1) {
  constexpr uint32_t kMask = (1u << N) - 1;
  constexpr float maxq = static_cast<float>(kMask);
  const __m256i shifts = code_shifts_avx2<N>(), mask = _mm256_set1_epi32(kMask);
  for (int64_t g = g0; g < g1; ++g) {
    const T* xg = j.x + g * j.gs;
    __m256 lo = _mm256_set1_ps(to_f32(xg[0])), hi = lo;
    for (int64_t i = 0; i < j.gs; i += 8) {  // min_ps(v, lo) = v < lo ? v : lo, as group_minmax
      const __m256 v = load8_f32(xg + i);
      lo = _mm256_min_ps(v, lo);
      hi = _mm256_max_ps(v, hi);
    }
    alignas(32) float lo8[8], hi8[8];
    _mm256_store_ps(lo8, lo);
    _mm256_store_ps(hi8, hi);
    float mn, mx, scale, zero;
    reduce_minmax8(lo8, hi8, &mn, &mx);
    intn_params(mn, mx, maxq, &scale, &zero);
    j.scales[g] = scale;
    j.zeros[g] = zero;
    uint8_t* dst = j.qweight + g * (j.gs / 8) * N;
    const __m256 vs = _mm256_set1_ps(scale), vz = _mm256_set1_ps(zero), vmax = _mm256_set1_ps(maxq);
    for (int64_t c = 0; c < j.gs; c += 8, dst += N) {
      // clamp_q(rint(x / scale + zero)): max_ps(0, q) = 0 > q ? 0 : q, min_ps(maxq, q) likewise
      __m256 q = _mm256_round_ps(_mm256_add_ps(_mm256_div_ps(load8_f32(xg + c), vs), vz), _MM_FROUND_NEARBYINT);
      q = _mm256_min_ps(vmax, _mm256_max_ps(_mm256_setzero_ps(), q));
      store_codes8<N>(hor8(_mm256_sllv_epi32(_mm256_and_si256(_mm256_cvttps_epi32(q), mask), shifts)), dst);
    }
  }
}

template <int N, typename OutT>
QLORA_DS_AVX2 void dequant_intn_groups_avx2(const IntnDequantJob<OutT>& j, int64_t g0, int64_t g1) {
  constexpr uint32_t kMask = (1u << N) - 1;
  const __m256i shifts = code_shifts_avx2<N>(), mask = _mm256_set1_epi32(kMask);
  const __m256 k0 = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), k1 = _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t g = g0; g < g1; ++g) {
    const __m256 vz = _mm256_set1_ps(j.zeros[g]), vs = _mm256_set1_ps(j.scales[g]);
    alignas(32) float vals[16];  // intn_values: (k - zero) * scale, two roundings
    _mm256_store_ps(vals, _mm256_mul_ps(_mm256_sub_ps(k0, vz), vs));
    _mm256_store_ps(vals + 8, _mm256_mul_ps(_mm256_sub_ps(k1, vz), vs));
    const uint8_t* p = j.qweight + g * (j.gs / 8) * N;
    if constexpr (N == 4) {  // the bytes are nibble pairs, low nibble first
      if constexpr (std::is_same_v<OutT, float>) {
        expand_f32_avx2<false>(p, j.gs / 2, vals, j.out + g * j.gs);
      } else {
        alignas(32) uint16_t lut[16];
        cast_lut16_avx2<OutT>(vals, lut);
        expand16_avx2<false>(p, j.gs / 2, lut, reinterpret_cast<uint16_t*>(j.out) + g * j.gs);
      }
    } else {  // <= 8 values: one permute; 8 codes = N bytes, spread to lanes by a variable shift
      const __m256 t = _mm256_load_ps(vals);
      if constexpr (std::is_same_v<OutT, float>) {
        float* o = j.out + g * j.gs;
        for (int64_t c = 0; c < j.gs; c += 8, p += N) {
          const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(load_codes8<N>(p)), shifts), mask);
          _mm256_storeu_ps(o + c, _mm256_permutevar8x32_ps(t, idx));
        }
      } else {
        const __m256i t16 = cast8_avx2(t, static_cast<OutT*>(nullptr));
        uint16_t* o = reinterpret_cast<uint16_t*>(j.out) + g * j.gs;
        for (int64_t c = 0; c < j.gs; c += 8, p += N) {
          const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(load_codes8<N>(p)), shifts), mask);
          const __m256i v = _mm256_permutevar8x32_epi32(t16, idx);
          const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(o + c), w);
        }
      }
    }
  }
}

}  // namespace
#endif  // QLORA_DS_X86
