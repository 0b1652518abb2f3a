// qlora-ds: the CPU kernels (templates) behind quant_cpu.cpp — blockwise 4-bit (NF4/FP4) and 8-bit quant,
// and group-wise INT-N (QA-LoRA). Header-only, included by exactly one translation unit (quant_cpu.cpp).
// Bit-exact with qlora_ds/ops/reference.py: build without fast-math and with -ffp-contract=off.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__SSSE3__) || defined(__F16C__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr float kTiny = 1e-38f;
constexpr int64_t kChunk = 64;  // elements scaled and bucketed at a time (a multiple of 2)

inline float to_f32(float v) { return v; }
inline float to_f32(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_f32(c10::Half v) { return static_cast<float>(v); }

// max |x| over [0, len) in fp32; max is exact and associative (no NaN), so partial maxima vectorize.
template <typename T>
float block_absmax(const T* x, int64_t len) {
  float acc[16] = {0.f};
  int64_t i = 0;
  for (; i + 16 <= len; i += 16)
    for (int j = 0; j < 16; ++j) {
      const float a = std::fabs(to_f32(x[i + j]));
      acc[j] = acc[j] < a ? a : acc[j];
    }
  float m = 0.f;
  for (int j = 0; j < 16; ++j) m = m < acc[j] ? acc[j] : m;
  for (; i < len; ++i) {
    const float a = std::fabs(to_f32(x[i]));
    m = m < a ? a : m;
  }
  return m;
}

// Scale one chunk into [-1, 1]: by reciprocal multiply (full blocks) or true division (partial block).
template <typename T>
inline void scale_chunk(const T* x, int64_t len, float inv, float div, bool use_div, float* s) {
  if (use_div) {
    for (int64_t i = 0; i < len; ++i) s[i] = std::min(std::max(to_f32(x[i]) / div, -1.f), 1.f);
  } else {
    for (int64_t i = 0; i < len; ++i) s[i] = std::min(std::max(to_f32(x[i]) * inv, -1.f), 1.f);
  }
}

// Block scale parameters, shared by the 4-bit and 8-bit quantizers. Returns the value to store.
// Parallel over blocks on torch's own thread pool (at::parallel_for, OpenMP inside torch): a second
// OpenMP runtime in the process would fight torch's spinning threads on small machines. Each task gets
// about 32K elements, so small tensors run inline on the calling thread with no fork/join cost.
template <typename F>
void for_blocks(int64_t nblocks, int64_t bs, const F& f) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(bs, 1));
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) f(b);
  });
}

inline float block_params(float amax, bool partial, float* inv, float* div) {
  if (partial) {
    *div = std::max(amax, kTiny);
    return *div;
  }
  *inv = 1.0f / std::max(amax, kTiny);
  return amax;
}


#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
// AVX-512 path for a full 4-bit block (len % 16 == 0): the same arithmetic as the scalar path —
// x * inv, clamp to [-1, 1], code = order[#bounds < s] — with the count found by a 4-step branchless
// binary search over the 15 sorted bounds held in one register (lane 15 = +inf, never below s).
inline __m512 load16_f32(const float* x) { return _mm512_loadu_ps(x); }
inline __m512 load16_f32(const c10::BFloat16* x) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
inline __m512 load16_f32(const c10::Half* x) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
}

template <typename T>
float absmax_avx512(const T* x, int64_t len) {  // exact: max is order-independent (inputs have no NaN)
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < len; i += 16) acc = _mm512_max_ps(acc, _mm512_abs_ps(load16_f32(x + i)));
  return _mm512_reduce_max_ps(acc);
}

template <typename T>
void quantize_full_block_avx512(const T* x, int64_t len, float inv, const float* bounds, const uint8_t* order,
                                uint8_t* dst) {
  alignas(64) float b16[16];
  alignas(64) int32_t o16[16];
  for (int k = 0; k < 15; ++k) b16[k] = bounds[k];
  b16[15] = INFINITY;
  for (int k = 0; k < 16; ++k) o16[k] = order[k];
  const __m512 vb = _mm512_load_ps(b16), vinv = _mm512_set1_ps(inv);
  const __m512 lo = _mm512_set1_ps(-1.f), hi = _mm512_set1_ps(1.f);
  const __m512i vo = _mm512_load_si512(o16), one = _mm512_set1_epi32(1), low4 = _mm512_set1_epi64(0xF);
  for (int64_t i = 0; i < len; i += 16) {
    const __m512 v = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(load16_f32(x + i), vinv), lo), hi);
    __m512i idx = _mm512_setzero_si512();
    for (int step = 8; step >= 1; step >>= 1) {
      const __m512i cand = _mm512_add_epi32(idx, _mm512_set1_epi32(step));
      const __m512 b = _mm512_permutexvar_ps(_mm512_sub_epi32(cand, one), vb);
      idx = _mm512_mask_mov_epi32(idx, _mm512_cmp_ps_mask(b, v, _CMP_LT_OQ), cand);
    }
    const __m512i code = _mm512_permutexvar_epi32(idx, vo);             // 16 codes, one per int32 lane
    const __m512i pair = _mm512_or_si512(_mm512_slli_epi64(_mm512_and_si512(code, low4), 4),
                                         _mm512_srli_epi64(code, 32));  // (first << 4) | second per 64-bit lane
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + i / 2), _mm512_cvtepi64_epi8(pair));
  }
}
#define QLORA_DS_AVX512_QUANT 1
#endif

template <typename T>
void quantize_4bit_impl(const T* x, int64_t n, const float* bounds, const uint8_t* order, int64_t bs,
                        uint8_t* packed, float* absmax) {
  const int64_t nblocks = (n + bs - 1) / bs;
  int pad_idx = 0;  // code of s = 0.0 for an odd tail
  for (int k = 0; k < 15; ++k) pad_idx += bounds[k] < 0.f;
  const uint8_t pad_code = order[pad_idx];
for_blocks(nblocks, bs, [&](int64_t b) {
    const int64_t start = b * bs;
    const int64_t len = std::min(bs, n - start);
    const bool partial = len < bs;
    float inv = 0.f, div = 1.f;
#ifdef QLORA_DS_AVX512_QUANT
    if (!partial && len % 16 == 0) {
      absmax[b] = block_params(absmax_avx512(x + start, len), false, &inv, &div);
      quantize_full_block_avx512(x + start, len, inv, bounds, order, packed + start / 2);
      return;
    }
#endif
    absmax[b] = block_params(block_absmax(x + start, len), partial, &inv, &div);
    float s[kChunk];
    uint8_t idx[kChunk];
    for (int64_t c = 0; c < len; c += kChunk) {
      const int64_t m = std::min(kChunk, len - c);
      scale_chunk(x + start + c, m, inv, div, partial, s);
      for (int64_t i = 0; i < m; ++i) idx[i] = 0;
      for (int k = 0; k < 15; ++k) {
        const float bk = bounds[k];
        for (int64_t i = 0; i < m; ++i) idx[i] += static_cast<uint8_t>(bk < s[i]);
      }
      uint8_t* dst = packed + (start + c) / 2;  // bs is even, so start + c is even
      const int64_t pairs = m / 2;
      for (int64_t j = 0; j < pairs; ++j)
        dst[j] = static_cast<uint8_t>((order[idx[2 * j]] << 4) | order[idx[2 * j + 1]]);
      if (m & 1) dst[pairs] = static_cast<uint8_t>((order[idx[m - 1]] << 4) | pad_code);
    }
  });
}

void quantize_8bit_impl(const float* x, int64_t n, const float* bounds8, int64_t bs, uint8_t* q, float* absmax) {
  const int64_t nblocks = (n + bs - 1) / bs;
for_blocks(nblocks, bs, [&](int64_t b) {
    const int64_t start = b * bs;
    const int64_t len = std::min(bs, n - start);
    const bool partial = len < bs;
    float inv = 0.f, div = 1.f;
    absmax[b] = block_params(block_absmax(x + start, len), partial, &inv, &div);
    float s[kChunk];
    for (int64_t c = 0; c < len; c += kChunk) {
      const int64_t m = std::min(kChunk, len - c);
      scale_chunk(x + start + c, m, inv, div, partial, s);
      for (int64_t i = 0; i < m; ++i) {
        // branchless binary search: number of the 255 sorted bounds strictly below s
        int pos = 0;
        for (int step = 128; step > 0; step >>= 1) pos += (bounds8[pos + step - 1] < s[i]) ? step : 0;
        q[start + c + i] = static_cast<uint8_t>(pos);
      }
    }
  });
}

// ---- dequantize ---------------------------------------------------------------------------------

// fp32 -> bf16 bits, round-to-nearest-even, NaN -> 0x7FC0 (what c10::BFloat16 does); vectorizes.
inline uint16_t bf16_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : r);
}

#if defined(__AVX2__)
inline __m256i bf16_bits8(__m256 p) {
  const __m256i u = _mm256_castps_si256(p);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)),
                                         _mm256_set1_epi32(0x7F800000));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
}
#endif

// lut[k] = cast(vals[k]) for 16 fp32 values, round-to-nearest-even.
inline void cast_lut16(const float* vals, uint16_t* lut, c10::BFloat16*) {
#if defined(__AVX2__)
  const __m256i r0 = bf16_bits8(_mm256_loadu_ps(vals));
  const __m256i r1 = bf16_bits8(_mm256_loadu_ps(vals + 8));
  // packus interleaves 128-bit lanes: [r0 lo, r1 lo, r0 hi, r1 hi] -> reorder the 64-bit quarters
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lut),
                      _mm256_permute4x64_epi64(_mm256_packus_epi32(r0, r1), 0xD8));
#else
  for (int k = 0; k < 16; ++k) lut[k] = bf16_bits(vals[k]);
#endif
}
inline void cast_lut16(const float* vals, uint16_t* lut, c10::Half*) {
#if defined(__F16C__)
  // vcvtps2ph with round-to-nearest-even: same bits as c10::Half for every non-NaN input
  _mm_storeu_si128(reinterpret_cast<__m128i*>(lut),
                   _mm256_cvtps_ph(_mm256_loadu_ps(vals), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(lut + 8),
                   _mm256_cvtps_ph(_mm256_loadu_ps(vals + 8), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  for (int k = 0; k < 16; ++k) lut[k] = c10::Half(vals[k]).x;
#endif
}

template <typename H>
inline void make_lut16(const float* code, float a, uint16_t* lut, H* tag) {
  float prod[16];
  for (int k = 0; k < 16; ++k) prod[k] = code[k] * a;
  cast_lut16(prod, lut, tag);
}

// Expand `nbytes` packed bytes through a 16-entry table of 16-bit values: out[2j] = lut[hi], out[2j+1] = lut[lo]
// (NF4/FP4, kHighFirst) or out[2j] = lut[lo], out[2j+1] = lut[hi] (INT4's little-endian bit stream).
template <bool kHighFirst = true>
inline void expand16(const uint8_t* p, int64_t nbytes, const uint16_t* lut, uint16_t* out) {
  int64_t j = 0;
#if defined(__SSSE3__)
  // split the 16-bit table into a table of low bytes and one of high bytes
  const __m128i w0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(lut));
  const __m128i w1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(lut + 8));
  const __m128i even = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m128i odd = _mm_setr_epi8(1, 3, 5, 7, 9, 11, 13, 15, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m128i tlo = _mm_unpacklo_epi64(_mm_shuffle_epi8(w0, even), _mm_shuffle_epi8(w1, even));
  const __m128i thi = _mm_unpacklo_epi64(_mm_shuffle_epi8(w0, odd), _mm_shuffle_epi8(w1, odd));
  const __m128i m0f = _mm_set1_epi8(0x0F);
  for (; j + 16 <= nbytes; j += 16) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), m0f);
    const __m128i lo = _mm_and_si128(v, m0f);
    const __m128i first = kHighFirst ? hi : lo, second = kHighFirst ? lo : hi;
    const __m128i i0 = _mm_unpacklo_epi8(first, second);  // nibble indices of outputs 0..15
    const __m128i i1 = _mm_unpackhi_epi8(first, second);  // outputs 16..31
    const __m128i l0 = _mm_shuffle_epi8(tlo, i0), h0 = _mm_shuffle_epi8(thi, i0);
    const __m128i l1 = _mm_shuffle_epi8(tlo, i1), h1 = _mm_shuffle_epi8(thi, i1);
    __m128i* o = reinterpret_cast<__m128i*>(out + 2 * j);
    _mm_storeu_si128(o + 0, _mm_unpacklo_epi8(l0, h0));
    _mm_storeu_si128(o + 1, _mm_unpackhi_epi8(l0, h0));
    _mm_storeu_si128(o + 2, _mm_unpacklo_epi8(l1, h1));
    _mm_storeu_si128(o + 3, _mm_unpackhi_epi8(l1, h1));
  }
#endif
  for (; j < nbytes; ++j) {
    const uint8_t a = p[j] >> 4, b = p[j] & 0xF;
    out[2 * j] = lut[kHighFirst ? a : b];
    out[2 * j + 1] = lut[kHighFirst ? b : a];
  }
}

// Dequantize one block [start, start+len) given its absmax a. start is even (blocksize is even).
template <typename OutT>
inline void dequant_block(const uint8_t* packed, const float* code, float a, int64_t start, int64_t len,
                          OutT* out) {
  const uint8_t* p = packed + start / 2;
  const int64_t pairs = len / 2;
  if constexpr (std::is_same_v<OutT, float>) {
    float lut[16];
    for (int k = 0; k < 16; ++k) lut[k] = code[k] * a;
    float* o = out + start;
    for (int64_t j = 0; j < pairs; ++j) {
      o[2 * j] = lut[p[j] >> 4];
      o[2 * j + 1] = lut[p[j] & 0xF];
    }
    if (len & 1) o[len - 1] = lut[p[pairs] >> 4];
  } else {
    alignas(32) uint16_t lut[16];
    make_lut16(code, a, lut, static_cast<OutT*>(nullptr));
    uint16_t* o = reinterpret_cast<uint16_t*>(out) + start;
    expand16(p, pairs, lut, o);
    if (len & 1) o[len - 1] = lut[p[pairs] >> 4];
  }
}

template <typename OutT, typename AbsmaxFn>
void dequantize_4bit_impl(const uint8_t* packed, const float* code, int64_t bs, int64_t n, OutT* out,
                          AbsmaxFn absmax_of) {
  const int64_t nblocks = (n + bs - 1) / bs;
for_blocks(nblocks, bs, [&](int64_t b) {
    const int64_t start = b * bs;
    dequant_block(packed, code, absmax_of(b), start, std::min(bs, n - start), out);
  });
}

// ---- group-wise INT-N (QA-LoRA) ------------------------------------------------------------------
// The codes of the whole tensor form one little-endian bit stream (rows hold in*N/8 whole bytes and groups
// gs*N/8, gs % 8 == 0), so both kernels work on flat groups: 8 codes <-> N bytes.

// Rounding is std::rint: round half to even under the default rounding mode, like torch.round (= nearbyint,
// which GCC only inlines with -fno-trapping-math; rint becomes one vroundps and vectorizes).
// torch's clamp(v, 0, maxq): max then min, NaN propagates and -0.0 stays -0.0.
inline float clamp_q(float v, float maxq) {
  v = 0.f > v ? 0.f : v;
  return maxq < v ? maxq : v;
}

template <typename T>
inline void group_minmax(const T* x, int64_t len, float* mn, float* mx) {
  float lo[8], hi[8];
  for (int j = 0; j < 8; ++j) lo[j] = hi[j] = to_f32(x[0]);
  for (int64_t i = 0; i < len; i += 8)  // len % 8 == 0
    for (int j = 0; j < 8; ++j) {
      const float v = to_f32(x[i + j]);
      lo[j] = v < lo[j] ? v : lo[j];
      hi[j] = hi[j] < v ? v : hi[j];
    }
  float a = lo[0], b = hi[0];
  for (int j = 1; j < 8; ++j) {
    a = lo[j] < a ? lo[j] : a;
    b = b < hi[j] ? hi[j] : b;
  }
  *mn = a;
  *mx = b;
}

template <int N>
inline uint32_t load_codes8(const uint8_t* p) {  // N bytes, little-endian
  uint32_t w = p[0];
  for (int b = 1; b < N; ++b) w |= static_cast<uint32_t>(p[b]) << (8 * b);
  return w;
}

template <int N, typename T>
void quantize_intn_impl(const T* x, int64_t n, int64_t gs, uint8_t* qweight, float* scales, float* zeros) {
  constexpr uint32_t kMask = (1u << N) - 1;
  constexpr float maxq = static_cast<float>(kMask);
  for_blocks(n / gs, gs, [&](int64_t g) {
    const T* xg = x + g * gs;
    float mn, mx;
    group_minmax(xg, gs, &mn, &mx);
    const float span = mx - mn;
    const bool constant = span == 0.f;
    float scale = 1.f, zero = -mn;
    if (!constant) {
      scale = span / maxq;
      const float z = -mn / scale;
      zero = clamp_q(std::rint(z), maxq);
    }
    scales[g] = scale;
    zeros[g] = zero;
    uint8_t* dst = qweight + g * (gs / 8) * N;
    for (int64_t c = 0; c < gs; c += 8, dst += N) {
      uint32_t word = 0;
      if (!constant) {
        float q[8];
        for (int k = 0; k < 8; ++k) {
          const float v = to_f32(xg[c + k]) / scale;  // true division, then the add: two roundings
          q[k] = clamp_q(std::rint(v + zero), maxq);
        }
        for (int k = 0; k < 8; ++k) word |= (static_cast<uint32_t>(static_cast<int32_t>(q[k])) & kMask) << (N * k);
      }
      for (int b = 0; b < N; ++b) dst[b] = static_cast<uint8_t>(word >> (8 * b));
    }
  });
}

template <int N, typename OutT>
void dequantize_intn_impl(const uint8_t* qweight, const float* scales, const float* zeros, int64_t gs, int64_t n,
                          OutT* out) {
  constexpr uint32_t kMask = (1u << N) - 1;
  for_blocks(n / gs, gs, [&](int64_t g) {
    alignas(32) float vals[16] = {0.f};
    const float zero = zeros[g], scale = scales[g];
    for (uint32_t k = 0; k <= kMask; ++k) {
      const float d = static_cast<float>(k) - zero;  // two fp32 roundings, no FMA
      vals[k] = d * scale;
    }
    const uint8_t* p = qweight + g * (gs / 8) * N;
    if constexpr (std::is_same_v<OutT, float>) {
      float* o = out + g * gs;
      for (int64_t c = 0; c < gs; c += 8, p += N) {
        const uint32_t w = load_codes8<N>(p);
        for (int k = 0; k < 8; ++k) o[c + k] = vals[(w >> (N * k)) & kMask];
      }
    } else {
      alignas(32) uint16_t lut[16];
      cast_lut16(vals, lut, static_cast<OutT*>(nullptr));
      uint16_t* o = reinterpret_cast<uint16_t*>(out) + g * gs;
      if constexpr (N == 4) {
        expand16<false>(p, gs / 2, lut, o);
      } else {
        for (int64_t c = 0; c < gs; c += 8, p += N) {
          const uint32_t w = load_codes8<N>(p);
          for (int k = 0; k < 8; ++k) o[c + k] = lut[(w >> (N * k)) & kMask];
        }
      }
    }
  });
}

}  // namespace
