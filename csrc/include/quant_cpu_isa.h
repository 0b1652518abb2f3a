// qlora-ds: which SIMD path the CPU quant kernels take, chosen at run time.
//
// The op is built for the baseline of its architecture (no -march=native), so one prebuilt binary runs on any
// CPU of that architecture. The fast paths are ordinary functions compiled for a wider ISA with
// __attribute__((target(...))) and called only when the running CPU has that ISA (and the OS saves its
// registers: __builtin_cpu_supports checks XCR0). Order: avx512 > avx2 > scalar; set_cpu_isa() narrows it
// (tests exercise every path the CPU has; QLORA_DS_CPU_ISA is applied by qlora_ds/ops/builder.py).
#pragma once

#include <atomic>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#define QLORA_DS_X86 1
#include <immintrin.h>
// AVX2 path: Haswell / Zen and later (every such CPU also has FMA and F16C). FMA is allowed for the compiler's
// instruction choice only; -ffp-contract=off still forbids contracting a*b+c, so results stay bit-exact.
#define QLORA_DS_AVX2 __attribute__((target("avx2,fma,f16c")))
#define QLORA_DS_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")))
#else
#define QLORA_DS_X86 0
#endif

namespace qlora_ds_cpu {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

inline bool isa_supported(Isa isa) {
#if QLORA_DS_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  switch (isa) {
    case Isa::kAvx512:
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    case Isa::kAvx2: return avx2;
    default: return true;
  }
#else
  return isa == Isa::kScalar;
#endif
}

inline Isa best_isa() {
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2})
    if (isa_supported(isa)) return isa;
  return Isa::kScalar;
}

inline std::atomic<int>& isa_slot() {
  static std::atomic<int> slot{static_cast<int>(best_isa())};
  return slot;
}

inline Isa active_isa() { return static_cast<Isa>(isa_slot().load(std::memory_order_relaxed)); }

// Names of the paths this CPU can run, widest first.
inline std::vector<std::string> supported_isa_names() {
  std::vector<std::string> out;
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kScalar})
    if (isa_supported(isa)) out.emplace_back(isa_name(isa));
  return out;
}

// Select a path by name ("auto" = the widest supported). Returns false for an unknown or unsupported name.
inline bool set_isa_by_name(const std::string& name) {
  Isa want;
  if (name == "auto") want = best_isa();
  else if (name == "avx512") want = Isa::kAvx512;
  else if (name == "avx2") want = Isa::kAvx2;
  else if (name == "scalar") want = Isa::kScalar;
  else return false;
  if (!isa_supported(want)) return false;
  isa_slot().store(static_cast<int>(want), std::memory_order_relaxed);
  return true;
}

}  // namespace qlora_ds_cpu
