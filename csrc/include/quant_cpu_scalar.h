// qlora-ds: the scalar CPU kernels — the last fallback of every hot loop, the tails (partial blocks, odd
// lengths) of the SIMD paths, and the definition of the arithmetic those paths reproduce bit for bit.
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

namespace {

constexpr float kTiny = 1e-38f;
constexpr int64_t kChunk = 64;  // elements scaled and bucketed at a time (a multiple of 2)

inline float to_f32(float v) { return v; }
inline float to_f32(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_f32(c10::Half v) { return static_cast<float>(v); }

// Parallel over ranges of blocks on torch's own thread pool (at::parallel_for, OpenMP inside torch): a second
// OpenMP runtime in the process would fight torch's spinning threads on small machines. Each task gets
// about `grain_elems` elements (32K), so small tensors run inline on the calling thread with no fork/join cost.
template <typename F>
void for_ranges(int64_t nblocks, int64_t bs, const F& f, int64_t grain_elems = int64_t{1} << 15) {
  const int64_t grain = std::max<int64_t>(1, grain_elems / std::max<int64_t>(bs, 1));
  at::parallel_for(0, nblocks, grain, f);
}

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
inline float block_params(float amax, bool partial, float* inv, float* div) {
  if (partial) {
    *div = std::max(amax, kTiny);
    return *div;
  }
  *inv = 1.0f / std::max(amax, kTiny);
  return amax;
}

// ---- blockwise 4-bit (NF4/FP4) quantize ---------------------------------------------------------

template <typename T>
struct Quant4Job {
  const T* x;
  int64_t n, bs;
  const float* bounds;   // 15 sorted midpoints between the sorted code values
  const uint8_t* order;  // sorted position -> 4-bit code
  uint8_t* packed;
  float* absmax;
  uint8_t pad_code;      // code of s = 0.0, for an odd tail
  int64_t len(int64_t b) const { return std::min(bs, n - b * bs); }
};

// One block, any length: code = order[#bounds < s] with s = x * (1/absmax) (x / absmax in a partial block).
template <typename T>
void quant4_block_scalar(const Quant4Job<T>& j, int64_t b) {
  const int64_t start = b * j.bs, len = j.len(b);
  const bool partial = len < j.bs;
  float inv = 0.f, div = 1.f;
  j.absmax[b] = block_params(block_absmax(j.x + start, len), partial, &inv, &div);
  float s[kChunk];
  uint8_t idx[kChunk];
  for (int64_t c = 0; c < len; c += kChunk) {
    const int64_t m = std::min(kChunk, len - c);
    scale_chunk(j.x + start + c, m, inv, div, partial, s);
    for (int64_t i = 0; i < m; ++i) idx[i] = 0;
    for (int k = 0; k < 15; ++k) {
      const float bk = j.bounds[k];
      for (int64_t i = 0; i < m; ++i) idx[i] += static_cast<uint8_t>(bk < s[i]);
    }
    uint8_t* dst = j.packed + (start + c) / 2;  // bs is even, so start + c is even
    const int64_t pairs = m / 2;
    for (int64_t q = 0; q < pairs; ++q)
      dst[q] = static_cast<uint8_t>((j.order[idx[2 * q]] << 4) | j.order[idx[2 * q + 1]]);
    if (m & 1) dst[pairs] = static_cast<uint8_t>((j.order[idx[m - 1]] << 4) | j.pad_code);
  }
}

// ---- blockwise 8-bit (double quant of the absmax) ------------------------------------------------

struct Quant8Job {
  const float* x;
  int64_t n, bs;
  const float* bounds8;  // 255 sorted midpoints of the 256-entry dynamic map
  uint8_t* q;
  float* absmax;
  int64_t len(int64_t b) const { return std::min(bs, n - b * bs); }
};

void quant8_block_scalar(const Quant8Job& j, int64_t b) {
  const int64_t start = b * j.bs, len = j.len(b);
  const bool partial = len < j.bs;
  float inv = 0.f, div = 1.f;
  j.absmax[b] = block_params(block_absmax(j.x + start, len), partial, &inv, &div);
  float s[kChunk];
  for (int64_t c = 0; c < len; c += kChunk) {
    const int64_t m = std::min(kChunk, len - c);
    scale_chunk(j.x + start + c, m, inv, div, partial, s);
    for (int64_t i = 0; i < m; ++i) {
      // branchless binary search: number of the 255 sorted bounds strictly below s
      int pos = 0;
      for (int step = 128; step > 0; step >>= 1) pos += (j.bounds8[pos + step - 1] < s[i]) ? step : 0;
      j.q[start + c + i] = static_cast<uint8_t>(pos);
    }
  }
}

// o[i] = code8[q[i]] * a + offset: two fp32 roundings (no FMA)
inline void dequant8_span_scalar(const uint8_t* q, const float* code8, float a, float off, int64_t len, float* o) {
  for (int64_t i = 0; i < len; ++i) {
    const float v = code8[q[i]] * a;
    o[i] = v + off;
  }
}

// ---- dequantize through a 16-entry table --------------------------------------------------------

// fp32 -> bf16 bits, round-to-nearest-even, NaN -> 0x7FC0 (what c10::BFloat16 does); vectorizes.
inline uint16_t bf16_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : r);
}

// lut[k] = cast(vals[k]) for 16 fp32 values, round-to-nearest-even.
inline void cast_lut16(const float* vals, uint16_t* lut, c10::BFloat16*) {
  for (int k = 0; k < 16; ++k) lut[k] = bf16_bits(vals[k]);
}
inline void cast_lut16(const float* vals, uint16_t* lut, c10::Half*) {
  for (int k = 0; k < 16; ++k) lut[k] = c10::Half(vals[k]).x;
}

// Expand `nbytes` packed bytes through a 16-entry table: out[2j] = lut[hi], out[2j+1] = lut[lo] (NF4/FP4,
// kHighFirst) or out[2j] = lut[lo], out[2j+1] = lut[hi] (INT4's little-endian bit stream).
template <bool kHighFirst = true, typename V>
inline void expand_scalar(const uint8_t* p, int64_t nbytes, const V* lut, V* out) {
  for (int64_t j = 0; j < nbytes; ++j) {
    const uint8_t a = p[j] >> 4, b = p[j] & 0xF;
    out[2 * j] = lut[kHighFirst ? a : b];
    out[2 * j + 1] = lut[kHighFirst ? b : a];
  }
}

// out[k] = code[k] * a, in fp32
inline void scale_lut16(const float* code, float a, float* lut) {
  for (int k = 0; k < 16; ++k) lut[k] = code[k] * a;
}

// Dequantize one block [start, start+len) given its absmax a. start is even (blocksize is even).
template <typename OutT>
inline void dequant4_block_scalar(const uint8_t* packed, const float* code, float a, int64_t start, int64_t len,
                                  OutT* out) {
  const uint8_t* p = packed + start / 2;
  const int64_t pairs = len / 2;
  float vals[16];
  scale_lut16(code, a, vals);
  if constexpr (std::is_same_v<OutT, float>) {
    float* o = out + start;
    expand_scalar(p, pairs, vals, o);
    if (len & 1) o[len - 1] = vals[p[pairs] >> 4];
  } else {
    uint16_t lut[16];
    cast_lut16(vals, lut, static_cast<OutT*>(nullptr));
    uint16_t* o = reinterpret_cast<uint16_t*>(out) + start;
    expand_scalar(p, pairs, lut, o);
    if (len & 1) o[len - 1] = lut[p[pairs] >> 4];
  }
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

// min/max of 8 lane-wise partial results, lane 0 first (the order the SIMD paths reduce in too)
inline void reduce_minmax8(const float* lo, const float* hi, float* mn, float* mx) {
  float a = lo[0], b = hi[0];
  for (int j = 1; j < 8; ++j) {
    a = lo[j] < a ? lo[j] : a;
    b = b < hi[j] ? hi[j] : b;
  }
  *mn = a;
  *mx = b;
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
  reduce_minmax8(lo, hi, mn, mx);
}

// The grid spans [min(mn, 0), max(mx, 0)] (GPTQ's rule), so the zero point is a code: scale = (max - min) / maxq,
// zero = clamp(rint(-min / scale)). torch's clamp(max=0)/clamp(min=0): NaN propagates. A scale of 0 (an all-zero
// group, or a span of subnormals that underflows: zero would be 0/0) takes the grid [-1, 1], as the reference.
inline void intn_params(float mn, float mx, float maxq, float* scale, float* zero) {
  mn = 0.f < mn ? 0.f : mn;
  mx = mx < 0.f ? 0.f : mx;
  if ((mx - mn) / maxq == 0.f) {
    mn = -1.f;
    mx = 1.f;
  }
  *scale = (mx - mn) / maxq;
  *zero = clamp_q(std::rint(-mn / *scale), maxq);
}

template <int N>
inline uint32_t load_codes8(const uint8_t* p) {  // N bytes, little-endian
  uint32_t w = p[0];
  for (int b = 1; b < N; ++b) w |= static_cast<uint32_t>(p[b]) << (8 * b);
  return w;
}

template <int N>
inline void store_codes8(uint32_t word, uint8_t* dst) {
  for (int b = 0; b < N; ++b) dst[b] = static_cast<uint8_t>(word >> (8 * b));
}

template <typename T>
struct IntnQuantJob {
  const T* x;
  int64_t gs;
  uint8_t* qweight;
  float* scales;
  float* zeros;
};

template <int N, typename T>
void quant_intn_group_scalar(const IntnQuantJob<T>& j, int64_t g) {
  constexpr uint32_t kMask = (1u << N) - 1;
  constexpr float maxq = static_cast<float>(kMask);
  const T* xg = j.x + g * j.gs;
  float mn, mx, scale, zero;
  group_minmax(xg, j.gs, &mn, &mx);
  intn_params(mn, mx, maxq, &scale, &zero);
  j.scales[g] = scale;
  j.zeros[g] = zero;
  uint8_t* dst = j.qweight + g * (j.gs / 8) * N;
  for (int64_t c = 0; c < j.gs; c += 8, dst += N) {
    uint32_t word = 0;
    float q[8];
    for (int k = 0; k < 8; ++k) {
      const float v = to_f32(xg[c + k]) / scale;  // true division, then the add: two roundings
      q[k] = clamp_q(std::rint(v + zero), maxq);
    }
    for (int k = 0; k < 8; ++k) word |= (static_cast<uint32_t>(static_cast<int32_t>(q[k])) & kMask) << (N * k);
    store_codes8<N>(word, dst);
  }
}

template <typename OutT>
struct IntnDequantJob {
  const uint8_t* qweight;
  const float* scales;
  const float* zeros;
  int64_t gs;
  OutT* out;
};

// vals[k] = (k - zero) * scale for the 2^N codes: two fp32 roundings, no FMA
template <int N>
inline void intn_values(float zero, float scale, float* vals) {
  for (uint32_t k = 0; k < (1u << N); ++k) {
    const float d = static_cast<float>(k) - zero;
    vals[k] = d * scale;
  }
}

template <int N, typename OutT>
void dequant_intn_group_scalar(const IntnDequantJob<OutT>& j, int64_t g) {
  constexpr uint32_t kMask = (1u << N) - 1;
  float vals[16] = {0.f};
  intn_values<N>(j.zeros[g], j.scales[g], vals);
  const uint8_t* p = j.qweight + g * (j.gs / 8) * N;
  if constexpr (std::is_same_v<OutT, float>) {
    float* o = j.out + g * j.gs;
    for (int64_t c = 0; c < j.gs; c += 8, p += N) {
      const uint32_t w = load_codes8<N>(p);
      for (int k = 0; k < 8; ++k) o[c + k] = vals[(w >> (N * k)) & kMask];
    }
  } else {
    uint16_t lut[16];
    cast_lut16(vals, lut, static_cast<OutT*>(nullptr));
    uint16_t* o = reinterpret_cast<uint16_t*>(j.out) + g * j.gs;
    for (int64_t c = 0; c < j.gs; c += 8, p += N) {
      const uint32_t w = load_codes8<N>(p);
      for (int k = 0; k < 8; ++k) o[c + k] = lut[(w >> (N * k)) & kMask];
    }
  }
}

}  // namespace
