// qlora-ds: the CPU kernel drivers behind quant_cpu.cpp — blockwise 4-bit (NF4/FP4) and 8-bit quant, and
// group-wise INT-N (QA-LoRA). Each driver splits the tensor into ranges of blocks for torch's thread pool
// and runs every range on the SIMD path chosen at run time (quant_cpu_isa.h): an AVX-512 or AVX2 kernel
// (quant_cpu_avx512.h, quant_cpu_avx2.h) or the scalar one (quant_cpu_scalar.h), all bit-identical.
// Header-only, included by exactly one translation unit (quant_cpu.cpp).
#pragma once

#include "quant_cpu_avx2.h"
#include "quant_cpu_avx512.h"
#include "quant_cpu_isa.h"
#include "quant_cpu_scalar.h"

namespace {

using qlora_ds_cpu::Isa;

template <typename T>
void quantize_4bit_impl(const T* x, int64_t n, const float* bounds, const uint8_t* order, int64_t bs,
                        uint8_t* packed, float* absmax) {
  int pad_idx = 0;  // sorted position of s = 0.0
  for (int k = 0; k < 15; ++k) pad_idx += bounds[k] < 0.f;
  const Quant4Job<T> job{x, n, bs, bounds, order, packed, absmax, order[pad_idx]};
  const Isa isa = qlora_ds_cpu::active_isa();
  for_ranges((n + bs - 1) / bs, bs, [&](int64_t b0, int64_t b1) {
#if QLORA_DS_X86
    if (isa == Isa::kAvx512) return quant4_blocks_avx512(job, b0, b1);
    if (isa == Isa::kAvx2) return quant4_blocks_avx2(job, b0, b1);
#endif
    for (int64_t b = b0; b < b1; ++b) quant4_block_scalar(job, b);
  });
}

void quantize_8bit_impl(const float* x, int64_t n, const float* bounds8, int64_t bs, uint8_t* q, float* absmax) {
  const Quant8Job job{x, n, bs, bounds8, q, absmax};
  const Isa isa = qlora_ds_cpu::active_isa();
  // Double quant sees n/64 absmax values (262K for a 4096^2 weight: ~1 ms on one core with AVX2): not worth a
  // fork/join, which on a loaded 2-core box can wait a whole time slice for the second thread.
  const int64_t grain_elems = isa == Isa::kScalar ? int64_t{1} << 15 : int64_t{1} << 19;
  for_ranges((n + bs - 1) / bs, bs, [&](int64_t b0, int64_t b1) {
#if QLORA_DS_X86
    if (isa != Isa::kScalar) return quant8_blocks_avx2(job, b0, b1);
#endif
    for (int64_t b = b0; b < b1; ++b) quant8_block_scalar(job, b);
  }, grain_elems);
}

void dequantize_8bit_impl(const uint8_t* q, const float* absmax, const float* code8, int64_t bs, float off,
                          int64_t n, float* out) {
  const Isa isa = qlora_ds_cpu::active_isa();
  for_ranges((n + bs - 1) / bs, bs, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * bs, len = std::min(bs, n - start);
#if QLORA_DS_X86
      if (isa != Isa::kScalar) {
        dequant8_span_avx2(q + start, code8, absmax[b], off, len, out + start);
        continue;
      }
#endif
      dequant8_span_scalar(q + start, code8, absmax[b], off, len, out + start);
    }
  });
}

// absmax_of(b0, b1, dst) writes the absmax of blocks [b0, b1) to dst[0 .. b1-b0): a plain copy, or the
// double-quant decode (done per range so that no block pays a 64-bit division for its nested index).
template <typename OutT, typename AbsmaxFn>
void dequantize_4bit_impl(const uint8_t* packed, const float* code, int64_t bs, int64_t n, OutT* out,
                          AbsmaxFn absmax_of) {
  constexpr int64_t kAbs = 256;
  const Isa isa = qlora_ds_cpu::active_isa();
  for_ranges((n + bs - 1) / bs, bs, [&](int64_t r0, int64_t r1) {
    float am[kAbs];
    for (int64_t b0 = r0; b0 < r1; b0 += kAbs) {
      const int64_t b1 = std::min(r1, b0 + kAbs);
      absmax_of(b0, b1, am);
#if QLORA_DS_X86
      if (isa != Isa::kScalar) {
        dequant4_blocks_avx2(packed, code, bs, n, am, b0, b1, out);
        continue;
      }
#endif
      for (int64_t b = b0; b < b1; ++b)
        dequant4_block_scalar(packed, code, am[b - b0], b * bs, std::min(bs, n - b * bs), out);
    }
  });
}

template <int N, typename T>
void quantize_intn_impl(const T* x, int64_t n, int64_t gs, uint8_t* qweight, float* scales, float* zeros) {
  const IntnQuantJob<T> job{x, gs, qweight, scales, zeros};
  const Isa isa = qlora_ds_cpu::active_isa();
  for_ranges(n / gs, gs, [&](int64_t g0, int64_t g1) {
#if QLORA_DS_X86
    if (isa != Isa::kScalar) return quant_intn_groups_avx2<N>(job, g0, g1);
#endif
    for (int64_t g = g0; g < g1; ++g) quant_intn_group_scalar<N>(job, g);
  });
}

template <int N, typename OutT>
void dequantize_intn_impl(const uint8_t* qweight, const float* scales, const float* zeros, int64_t gs, int64_t n,
                          OutT* out) {
  const IntnDequantJob<OutT> job{qweight, scales, zeros, gs, out};
  const Isa isa = qlora_ds_cpu::active_isa();
  for_ranges(n / gs, gs, [&](int64_t g0, int64_t g1) {
#if QLORA_DS_X86
    if (isa != Isa::kScalar) return dequant_intn_groups_avx2<N>(job, g0, g1);
#endif
    for (int64_t g = g0; g < g1; ++g) dequant_intn_group_scalar<N>(job, g);
  });
}

}  // namespace
