// qlora-ds: LoRA-input dropout on the CPU with a counter-based mask.
//
// torch's CPU dropout draws its mask from a sequential Mersenne Twister, ~5 ns per element: on SmolLM2-135M with
// dropout on every LoRA input that was 8% (AVX2, fp32) to 13% (AMX, bf16) of a training step. Here keep[i] is a
// pure function of (seed, i) — two rounds of a 32-bit integer hash (Chris Wellons' "lowbias32") — so the loop
// vectorizes, threads split it anywhere, and backward regenerates the mask from the seed instead of saving it.
#include "lora_dropout_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "quant_cpu_isa.h"

namespace qlora_ds_cpu {
namespace {

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint32_t bits_from_f32(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

struct Keys {
  uint32_t k0, k1;      // from the seed; the element index's high word is folded into k0 per 2^32 elements
  uint32_t threshold;   // keep iff hash >= threshold
  float scale;          // 1 / (1 - p); 0 when p = 1 (everything dropped)
};

// elements [begin, end) of one dtype; `Kind`: 0 fp32, 1 bf16, 2 fp16. Written for the vectorizer: a 32-bit
// counter, the mask as a multiplier (x * 0 keeps NaN, as torch's dropout does), bf16 rounded by hand.
template <int Kind, typename T>
inline __attribute__((always_inline)) void run_range(const T* x, T* y, int64_t begin, int64_t end, const Keys& k) {
  int64_t i = begin;
  while (i < end) {
    const uint64_t hi = uint64_t(i) >> 32;
    const int64_t stop = std::min<int64_t>(end, int64_t((hi + 1) << 32));
    const uint32_t k0 = hi ? mix32(k.k0 ^ mix32(uint32_t(hi))) : k.k0, k1 = k.k1, thr = k.threshold;
    const uint32_t lo0 = uint32_t(i);
    const float scale = k.scale;
    const int64_t count = stop - i;
    if constexpr (Kind == 1) {
      const uint16_t* xs = reinterpret_cast<const uint16_t*>(x) + i;
      uint16_t* ys = reinterpret_cast<uint16_t*>(y) + i;
      for (int64_t t = 0; t < count; ++t) {
        const float m = mix32(mix32((lo0 + uint32_t(t)) ^ k0) + k1) >= thr ? scale : 0.0f;
        const float v = f32_from_bits(uint32_t(xs[t]) << 16) * m;
        const uint32_t u = bits_from_f32(v);
        const uint32_t r = (u + 0x7fffU + ((u >> 16) & 1U)) >> 16;
        ys[t] = v != v ? uint16_t(0x7fc0) : uint16_t(r);
      }
    } else {
      const T* xs = x + i;
      T* ys = y + i;
      for (int64_t t = 0; t < count; ++t) {
        const float m = mix32(mix32((lo0 + uint32_t(t)) ^ k0) + k1) >= thr ? scale : 0.0f;
        ys[t] = T(float(xs[t]) * m);
      }
    }
    i = stop;
  }
}

#define QLORA_DS_DROPOUT_VARIANT(ATTR, NAME)                                                             \
  template <int Kind, typename T>                                                                     \
  ATTR void NAME(const T* x, T* y, int64_t begin, int64_t end, const Keys& k) {                       \
    run_range<Kind, T>(x, y, begin, end, k);                                                          \
  }
QLORA_DS_DROPOUT_VARIANT(, run_scalar)
#if QLORA_DS_X86
QLORA_DS_DROPOUT_VARIANT(QLORA_DS_AVX2, run_avx2)
QLORA_DS_DROPOUT_VARIANT(QLORA_DS_AVX512, run_avx512)
#endif

template <int Kind, typename T>
void run(const T* x, T* y, int64_t n, const Keys& k) {
  const Isa isa = active_isa();
  at::parallel_for(0, n, 1 << 16, [&](int64_t begin, int64_t end) {
#if QLORA_DS_X86
    if (isa == Isa::kAvx512) return run_avx512<Kind, T>(x, y, begin, end, k);
    if (isa == Isa::kAvx2) return run_avx2<Kind, T>(x, y, begin, end, k);
#endif
    run_scalar<Kind, T>(x, y, begin, end, k);
  });
}

}  // namespace

torch::Tensor hash_dropout(torch::Tensor x, double p, int64_t seed) {
  TORCH_CHECK(x.device().is_cpu(), "hash_dropout: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.is_contiguous(), "hash_dropout: x must be contiguous");
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "hash_dropout: p must be in [0, 1], got ", p);
  auto y = torch::empty_like(x);
  const uint64_t s = uint64_t(seed);
  Keys k{mix32(uint32_t(s) ^ 0x9e3779b9U), mix32(uint32_t(s >> 32) ^ 0x85ebca6bU),
         uint32_t(std::min<long long>(std::llround(p * 4294967296.0), 0xffffffffLL)),
         p < 1.0 ? float(1.0 / (1.0 - p)) : 0.0f};
  const int64_t n = x.numel();
  switch (x.scalar_type()) {
    case at::kFloat: run<0>(x.data_ptr<float>(), y.data_ptr<float>(), n, k); break;
    case at::kBFloat16: run<1>(x.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(), n, k); break;
    case at::kHalf: run<2>(x.data_ptr<at::Half>(), y.data_ptr<at::Half>(), n, k); break;
    default: TORCH_CHECK(false, "hash_dropout: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return y;
}

}  // namespace qlora_ds_cpu
