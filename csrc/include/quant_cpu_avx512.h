// qlora-ds: the AVX-512 path of the 4-bit quantizer (full blocks), selected at run time (quant_cpu_isa.h).
// Every other loop runs its AVX2 kernel on AVX-512 machines.
#pragma once

#include "quant_cpu_isa.h"
#include "quant_cpu_scalar.h"

#if QLORA_DS_X86
namespace {

// The same arithmetic as the scalar path — x * inv, clamp to [-1, 1], code = order[#bounds < s] — with the
// count found by a 4-step branchless binary search over the 15 sorted bounds held in one register
// (lane 15 = +inf, never below s).
QLORA_DS_AVX512 inline __m512 load16_f32(const float* x) { return _mm512_loadu_ps(x); }
QLORA_DS_AVX512 inline __m512 load16_f32(const c10::BFloat16* x) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
QLORA_DS_AVX512 inline __m512 load16_f32(const c10::Half* x) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
}

template <typename T>
QLORA_DS_AVX512 inline float absmax_avx512(const T* x, int64_t len) {  // exact: max is order-independent
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < len; i += 16) acc = _mm512_max_ps(acc, _mm512_abs_ps(load16_f32(x + i)));
  return _mm512_reduce_max_ps(acc);
}

template <typename T>
QLORA_DS_AVX512 inline void quantize_full_block_avx512(const T* x, int64_t len, float inv, const float* bounds,
                                                       const uint8_t* order, uint8_t* dst) {
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

template <typename T>
QLORA_DS_AVX512 void quant4_blocks_avx512(const Quant4Job<T>& j, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * j.bs, len = j.len(b);
    if (len < j.bs || len % 16) {
      quant4_block_scalar(j, b);
      continue;
    }
    float inv = 0.f, div = 1.f;
    j.absmax[b] = block_params(absmax_avx512(j.x + start, len), false, &inv, &div);
    quantize_full_block_avx512(j.x + start, len, inv, j.bounds, j.order, j.packed + start / 2);
  }
}

}  // namespace
#endif  // QLORA_DS_X86
