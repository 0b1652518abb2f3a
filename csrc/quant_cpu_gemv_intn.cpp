// qlora-ds: y = x · deq(W)ᵀ for a few rows of x, straight from the packed group-wise INT-N weight (bits 2, 3, 4:
// QA-LoRA's base format, qlora_ds/quant/intn.py). The NF4/FP4 twin, and why decoding wants it: quant_cpu_gemv.cpp.
//
// Arithmetic: per (W row, group) the 2^bits values t[q] = fl(fl(q - zero) * scale) are built once — intn_values of
// quant_cpu_scalar.h, the very values the INT-N dequantizer writes (its AVX2 loop computes them the same way, two
// roundings, no contraction: built with -ffp-contract=off) — and the dot products accumulate in fp32 (FMA in the SIMD
// paths). So results differ from dequantize(fp32) + matmul only by the order of the accumulation; a bf16 output is
// rounded once at the end, after the bias.
//
// Layout: each W row's codes are a little-endian bit stream (code k at bits bits*k ..), so 8 codes are `bits` whole
// bytes (load_codes8) and x needs no reordering: a step broadcasts those bytes to 8 (AVX2) or 2 x 8 (AVX-512) int32
// lanes, shifts each lane to its code (vpsrlvd), masks, and looks the codes up in the table (one vpermps; AVX2 at
// 4 bits: two, blended on bit 3). x is read in its own dtype (bf16 -> fp32 is a shift). Group sizes are multiples of 8
// (check_group_size); the AVX-512 loop needs a multiple of 16, else that call runs the AVX2 loop.
//
// Threads: torch's pool over ranges of W rows, about `grain_elems` weight elements per task (small weights run on
// the calling thread); each range serves the rows of x in groups of up to 8 (AVX-512, scalar) or 4 (AVX2).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "quant_cpu_avx2.h"
#include "quant_cpu_avx512.h"
#include "quant_cpu_gemv.h"

namespace {

using qlora_ds_cpu::Isa;

constexpr int kMaxRows = 8;                        // rows of x per pass (AVX-512, scalar)
constexpr int kMaxRowsAvx2 = 4;                    // AVX2: 2 accumulators per row in 16 registers
constexpr int64_t kGrain = int64_t{1} << 16;       // weight elements per task, as the 4-bit kernel

struct IntnWeight {
  const uint8_t* q;
  const float* scales;
  const float* zeros;
  int64_t gs, N, K;
};

// One kernel: W rows [n0, n1) times MR rows of x (row stride K) into y (fp32, row stride N).
template <typename T>
using IntnFn = void (*)(const IntnWeight&, const T*, int64_t, int64_t, float*);

// ---- scalar: four partial sums per row of x (elements k % 4) ------------------------------------------------------
template <int B, int MR, typename T>
void intn_rows_scalar(const IntnWeight& w, const T* x, int64_t n0, int64_t n1, float* y) {
  constexpr uint32_t kMask = (1u << B) - 1;
  const int64_t groups = w.K / w.gs;
  for (int64_t n = n0; n < n1; ++n) {
    float acc[MR][4] = {};
    const uint8_t* p = w.q + n * (w.K / 8) * B;
    for (int64_t g = 0; g < groups; ++g) {
      float t[16];
      intn_values<B>(w.zeros[n * groups + g], w.scales[n * groups + g], t);
      for (int64_t c = g * w.gs; c < (g + 1) * w.gs; c += 8, p += B) {
        const uint32_t codes = load_codes8<B>(p);
        float v[8];
        for (int k = 0; k < 8; ++k) v[k] = t[(codes >> (B * k)) & kMask];
        for (int m = 0; m < MR; ++m)
          for (int k = 0; k < 8; ++k) acc[m][k & 3] += to_f32(x[m * w.K + c + k]) * v[k];
      }
    }
    for (int m = 0; m < MR; ++m) y[m * w.N + n] = (acc[m][0] + acc[m][1]) + (acc[m][2] + acc[m][3]);
  }
}

#if QLORA_DS_X86
// ---- AVX2 + FMA: 8 codes per step, two steps (two accumulators per row) at a time ---------------------------------
template <int B>
QLORA_DS_AVX2 inline __m256 intn_decode8_avx2(const uint8_t* p, __m256i shifts, __m256 t0, __m256 t1) {
  const __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(load_codes8<B>(p))), shifts);
  const __m256i idx = _mm256_and_si256(v, _mm256_set1_epi32((1 << B) - 1));
  if constexpr (B == 4) return lookup16_f32(t0, t1, idx);
  return _mm256_permutevar8x32_ps(t0, idx);
}

template <int B, int MR, typename T>
QLORA_DS_AVX2 void intn_rows_avx2(const IntnWeight& w, const T* x, int64_t n0, int64_t n1, float* y) {
  const __m256i shifts = code_shifts_avx2<B>();
  const __m256 k0 = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), k1 = _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15);
  const int64_t groups = w.K / w.gs;
  for (int64_t n = n0; n < n1; ++n) {
    __m256 a0[MR], a1[MR];
    for (int m = 0; m < MR; ++m) a0[m] = a1[m] = _mm256_setzero_ps();
    const uint8_t* p = w.q + n * (w.K / 8) * B;
    for (int64_t g = 0; g < groups; ++g) {
      const __m256 vz = _mm256_set1_ps(w.zeros[n * groups + g]), vs = _mm256_set1_ps(w.scales[n * groups + g]);
      const __m256 t0 = _mm256_mul_ps(_mm256_sub_ps(k0, vz), vs), t1 = _mm256_mul_ps(_mm256_sub_ps(k1, vz), vs);
      const T* xg = x + g * w.gs;
      int64_t c = 0;
      for (; c + 16 <= w.gs; c += 16, p += 2 * B) {
        const __m256 d0 = intn_decode8_avx2<B>(p, shifts, t0, t1), d1 = intn_decode8_avx2<B>(p + B, shifts, t0, t1);
        for (int m = 0; m < MR; ++m) {
          a0[m] = _mm256_fmadd_ps(load8_f32(xg + m * w.K + c), d0, a0[m]);
          a1[m] = _mm256_fmadd_ps(load8_f32(xg + m * w.K + c + 8), d1, a1[m]);
        }
      }
      if (c < w.gs) {  // a group of 8 * odd codes: one step left
        const __m256 d0 = intn_decode8_avx2<B>(p, shifts, t0, t1);
        for (int m = 0; m < MR; ++m) a0[m] = _mm256_fmadd_ps(load8_f32(xg + m * w.K + c), d0, a0[m]);
        p += B;
      }
    }
    for (int m = 0; m < MR; ++m) {
      alignas(32) float s[8];
      _mm256_store_ps(s, _mm256_add_ps(a0[m], a1[m]));
      y[m * w.N + n] = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    }
  }
}

// ---- AVX-512: 16 codes per step (two groups of 8 in the two halves), two steps at a time -------------------------
template <int B>
QLORA_DS_AVX512 inline __m512 intn_decode16_avx512(const uint8_t* p, __m512i shifts, __m512 t) {
  const __m512i v = _mm512_inserti64x4(_mm512_set1_epi32(static_cast<int>(load_codes8<B>(p))),
                                       _mm256_set1_epi32(static_cast<int>(load_codes8<B>(p + B))), 1);
  const __m512i idx = _mm512_and_si512(_mm512_srlv_epi32(v, shifts), _mm512_set1_epi32((1 << B) - 1));
  return _mm512_permutexvar_ps(idx, t);
}

template <int B, int MR, typename T>
QLORA_DS_AVX512 void intn_rows_avx512(const IntnWeight& w, const T* x, int64_t n0, int64_t n1, float* y) {
  const __m512i shifts = _mm512_setr_epi32(0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B,
                                           0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B);
  const __m512 k16 = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int64_t groups = w.K / w.gs;
  for (int64_t n = n0; n < n1; ++n) {
    __m512 a0[MR], a1[MR];
    for (int m = 0; m < MR; ++m) a0[m] = a1[m] = _mm512_setzero_ps();
    const uint8_t* p = w.q + n * (w.K / 8) * B;
    for (int64_t g = 0; g < groups; ++g) {
      const __m512 t = _mm512_mul_ps(_mm512_sub_ps(k16, _mm512_set1_ps(w.zeros[n * groups + g])),
                                     _mm512_set1_ps(w.scales[n * groups + g]));
      const T* xg = x + g * w.gs;
      int64_t c = 0;
      for (; c + 32 <= w.gs; c += 32, p += 4 * B) {
        const __m512 d0 = intn_decode16_avx512<B>(p, shifts, t), d1 = intn_decode16_avx512<B>(p + 2 * B, shifts, t);
        for (int m = 0; m < MR; ++m) {
          a0[m] = _mm512_fmadd_ps(load16_f32(xg + m * w.K + c), d0, a0[m]);
          a1[m] = _mm512_fmadd_ps(load16_f32(xg + m * w.K + c + 16), d1, a1[m]);
        }
      }
      if (c < w.gs) {  // a group of 16 * odd codes: one step left
        const __m512 d0 = intn_decode16_avx512<B>(p, shifts, t);
        for (int m = 0; m < MR; ++m) a0[m] = _mm512_fmadd_ps(load16_f32(xg + m * w.K + c), d0, a0[m]);
        p += 2 * B;
      }
    }
    for (int m = 0; m < MR; ++m) y[m * w.N + n] = _mm512_reduce_add_ps(_mm512_add_ps(a0[m], a1[m]));
  }
}
#endif  // QLORA_DS_X86

template <int B, int MR, typename T>
IntnFn<T> intn_fn(Isa isa) {
#if QLORA_DS_X86
  if (isa == Isa::kAvx512) return intn_rows_avx512<B, MR, T>;
  if (isa == Isa::kAvx2) return intn_rows_avx2<B, (MR < kMaxRowsAvx2 ? MR : kMaxRowsAvx2), T>;
#endif
  return intn_rows_scalar<B, MR, T>;
}

template <int B, typename T>
IntnFn<T> intn_pick(Isa isa, int rows) {
  switch (rows) {
    case 1: return intn_fn<B, 1, T>(isa);
    case 2: return intn_fn<B, 2, T>(isa);
    case 3: return intn_fn<B, 3, T>(isa);
    case 4: return intn_fn<B, 4, T>(isa);
    case 5: return intn_fn<B, 5, T>(isa);
    case 6: return intn_fn<B, 6, T>(isa);
    case 7: return intn_fn<B, 7, T>(isa);
    default: return intn_fn<B, 8, T>(isa);
  }
}

template <typename T>
void intn_run(const IntnWeight& w, int64_t bits, Isa isa, const T* x, int64_t M, float* y, int64_t grain) {
  const int max_rows = isa == Isa::kAvx2 ? kMaxRowsAvx2 : kMaxRows;
  at::parallel_for(0, w.N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += max_rows) {
      const int rows = static_cast<int>(std::min<int64_t>(max_rows, M - m0));
      const IntnFn<T> fn = bits == 2 ? intn_pick<2, T>(isa, rows)
                           : bits == 3 ? intn_pick<3, T>(isa, rows) : intn_pick<4, T>(isa, rows);
      fn(w, x + m0 * w.K, n0, n1, y + m0 * w.N);
    }
  });
}

}  // namespace

namespace qlora_ds_cpu {

torch::Tensor small_rows_linear_intn(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros,
                                     int64_t bits, int64_t group_size, int64_t N, int64_t K,
                                     c10::optional<torch::Tensor> bias, int64_t grain_elems) {
  const auto xt = x.scalar_type();
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous() && x.size(1) == K, "x must be a contiguous "
              "2-D CPU tensor with K = ", K, " columns, got ", x.sizes());
  TORCH_CHECK(xt == at::kFloat || xt == at::kBFloat16, "x must be float32 or bfloat16, got ", xt);
  TORCH_CHECK(bits >= 2 && bits <= 4, "bits must be 2, 3 or 4, got ", bits);
  TORCH_CHECK(N >= 0 && K > 0, "N must be >= 0 and K > 0, got N=", N, ", K=", K);
  TORCH_CHECK(group_size > 0 && group_size % 8 == 0 && K % group_size == 0, "group_size must be a positive multiple "
              "of 8 dividing K (", K, "), got ", group_size);
  check_vec(qweight, "qweight", at::kByte, N * K / 8 * bits);
  check_vec(scales, "scales", at::kFloat, N * K / group_size);
  check_vec(zeros, "zeros", at::kFloat, N * K / group_size);
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat || bias->scalar_type() == xt, "bias must be float32 or x's dtype");
    check_vec(*bias, "bias", bias->scalar_type(), N);
  }
  const int64_t M = x.size(0);
  auto y = torch::empty({M, N}, x.options().dtype(at::kFloat));
  if (M > 0 && N > 0) {
    Isa isa = active_isa();
    if (isa == Isa::kAvx512 && group_size % 16) isa = Isa::kAvx2;  // AVX-512 steps are 16 codes
    const IntnWeight w{qweight.data_ptr<uint8_t>(), scales.data_ptr<float>(), zeros.data_ptr<float>(), group_size,
                       N, K};
    const int64_t grain = std::max<int64_t>(1, (grain_elems > 0 ? grain_elems : kGrain) / K);
    if (xt == at::kFloat) intn_run(w, bits, isa, x.data_ptr<float>(), M, y.data_ptr<float>(), grain);
    else intn_run(w, bits, isa, x.data_ptr<c10::BFloat16>(), M, y.data_ptr<float>(), grain);
  }
  if (bias.has_value()) y.add_(bias->to(at::kFloat));  // in fp32, then (bf16) one rounding
  return xt == at::kFloat ? y : y.to(xt);
}

}  // namespace qlora_ds_cpu
