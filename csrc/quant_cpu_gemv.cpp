// qlora-ds: y = x · deq(W)ᵀ for a few rows of x, straight from the packed NF4/FP4 weight (bitsandbytes calls its
// CUDA equivalent gemv_4bit).
//
// Why: decoding a token (HF generate, launch/generate.py) multiplies 1 row by every frozen weight. Dequantizing
// the whole weight to fp32/bf16 and then calling torch's matmul writes and re-reads 4-8x the bytes of the packed
// weight per linear per token; at 1-8 rows the product itself is a stream over the weight. Here each thread streams
// its range of W rows once, decodes 32 codes at a time in registers and multiplies them into every row of x.
//
// Arithmetic: per block b the 16-entry code table is scaled once, t[q] = fl(code4[q] * absmax[b]) — the very values
// dequantize_4bit(_dq) writes (double quantization: absmax[b] = fl(fl(code8[qa[b]] * absmax2[b / nbs]) + offset),
// two roundings, no contraction: built with -ffp-contract=off) — and the dot products accumulate in fp32 (FMA in the
// SIMD paths). So results differ from dequantize + matmul in fp32 only by the order of the accumulation; a bf16 output
// is rounded once at the end (bias added before that rounding).
//
// Layout (qlora_ds.quant.nf4 / bitsandbytes): W [N, K] flattened row-major, packed[i] holds elements 2i (high nibble)
// and 2i+1 (low nibble), blocks of `bs` consecutive elements. K % bs == 0 is required, so a block never straddles two
// rows. The SIMD paths read 16 bytes = 32 elements per step and need bs % 32 == 0 (every blocksize the package
// allows); x is copied once to fp32 with each 32-element chunk reordered to [16 even elements | 16 odd elements],
// so that the high nibbles of a step meet the first half of the chunk and the low nibbles the second: no nibble
// interleaving in the loop. Code lookup: AVX-512 one vpermps over the 16-entry table per 16 codes (it reads the low
// 4 bits of each lane, so no masking); AVX2 two 8-entry vpermps blended on bit 3 of the code. The scalar path (any
// even bs) keeps x in its plain order. The path follows the run-time ISA choice (quant_cpu_isa.h, QLORA_DS_CPU_ISA).
//
// Threads: torch's pool (at::parallel_for) over ranges of W rows, about `grain_elems` weight elements per task, so
// small weights run on the calling thread. Inside a range W rows go in tiles of kTileN rows; each tile serves the rows
// of x in groups of up to kMaxRows (8 AVX-512 / scalar, 4 AVX2: the accumulators must stay in registers), and each
// group walks K in chunks whose x columns fit in L1 (the whole row at 1 row of x), keeping partial sums per W row
// between chunks: without that, 8 rows of a 4096-wide x were re-read from L2 for every W row.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "quant_cpu_gemv.h"
#include "quant_cpu_isa.h"

namespace qlora_ds_cpu {

void check_vec(const torch::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.numel() == numel, name, " must have ", numel, " elements, got ", t.numel());
}

}  // namespace qlora_ds_cpu

namespace {

using qlora_ds_cpu::check_vec;
using qlora_ds_cpu::Isa;

constexpr int64_t kChunk = 32;                     // elements per SIMD step (16 packed bytes)
constexpr int64_t kTileN = 16;                     // W rows per tile (the x row groups reuse it from L1/L2)
constexpr int kMaxRows = 8;                        // rows of x per pass (AVX-512, scalar)
constexpr int kMaxRowsAvx2 = 4;                    // AVX2 has 16 registers: 2 accumulators per row
constexpr int64_t kL1Floats = 8192;                // x columns kept in L1 by a pass, times rows
constexpr int64_t kSmallRowsGrain = int64_t{1} << 16;  // weight elements per task (see small_rows_linear)

struct Weight {
  const uint8_t* packed;
  const float* code4;
  const float* absmax;     // fp32 absmax, or nullptr under double quantization:
  const uint8_t* qabsmax;  //   uint8 codes of absmax - offset,
  const float* absmax2;    //   fp32 absmax of each nested block of nbs codes,
  const float* code8;      //   the 256-entry dynamic map
  float offset;
  int64_t bs, nbs, N, K;
};

// The absmax of consecutive blocks from b0 on: a plain read, or the double-quant decode (its nested index kept
// incrementally: one division per W row).
struct Scales {
  const Weight& w;
  int64_t b, g, r;
  Scales(const Weight& weight, int64_t b0) : w(weight), b(b0), g(0), r(0) {
    if (w.qabsmax) g = b0 / w.nbs, r = b0 - g * w.nbs;
  }
  float next() {
    if (!w.qabsmax) return w.absmax[b++];
    const float a = w.code8[w.qabsmax[b++]] * w.absmax2[g];  // two separate fp32 roundings, as the dequantizer
    if (++r == w.nbs) r = 0, ++g;
    return a + w.offset;
  }
};

// The absmax of blocks [b0, b1) into sc (a pass has at most kL1Floats / 32 blocks on the SIMD paths): read from
// memory by the kernels' broadcasts, which then cost a load, not a shuffle.
constexpr int64_t kMaxPassBlocks = kL1Floats / kChunk;
inline void block_scales(const Weight& w, int64_t b0, int64_t b1, float* sc) {
  Scales s(w, b0);
  for (int64_t b = b0; b < b1; ++b) sc[b - b0] = s.next();
}

// One pass of a kernel: W rows [n0, n1) (at most kTileN) times blocks [b0, b1) of each row, for MR rows of x (fp32,
// row stride ldx, the whole row: the pass reads its columns b0*bs ..). Partial sums live in `acc` between the passes
// over one row's K range (first: start from zero; last: reduce them into y[m * ldy + n]).
struct Pass {
  const float* x;
  int64_t ldx, n0, n1, b0, b1;
  bool first, last;
  float* acc;  // [n1 - n0][MR][kAccFloats]
  float* y;
  int64_t ldy;
};
constexpr int kAccFloats = 32;  // partial sums per (W row, x row): two vectors of 16 (AVX-512), of 8 (AVX2) or one

using RowsFn = void (*)(const Weight&, const Pass&);

// ---- scalar: any even blocksize, x in plain order --------------------------------------------------------------
// Four partial sums per row of x (elements k % 4): independent chains instead of one long one. Measured against
// dequantize + an SSE4.2 matmul: 0.37-0.74 at 1 row, 1.1-1.6 at 4 (small_rows.py takes it at 1 row only).

template <int MR>
void rows_scalar(const Weight& w, const Pass& ps) {
  const int64_t bpr = w.K / w.bs;
  for (int64_t n = ps.n0; n < ps.n1; ++n) {
    float* part = ps.acc + (n - ps.n0) * MR * kAccFloats;
    float acc[MR][4];
    for (int m = 0; m < MR; ++m)
      for (int l = 0; l < 4; ++l) acc[m][l] = ps.first ? 0.f : part[m * kAccFloats + l];
    const uint8_t* p = w.packed + (n * w.K + ps.b0 * w.bs) / 2;
    Scales s(w, n * bpr + ps.b0);
    for (int64_t b = ps.b0; b < ps.b1; ++b) {
      const float a = s.next();
      float t[16];
      for (int k = 0; k < 16; ++k) t[k] = w.code4[k] * a;
      const int64_t k1 = (b + 1) * w.bs;
      int64_t k = b * w.bs;
      for (; k + 4 <= k1; k += 4, p += 2) {
        const float w0 = t[p[0] >> 4], w1 = t[p[0] & 15], w2 = t[p[1] >> 4], w3 = t[p[1] & 15];
        for (int m = 0; m < MR; ++m) {
          const float* xm = ps.x + m * ps.ldx + k;
          acc[m][0] += xm[0] * w0;
          acc[m][1] += xm[1] * w1;
          acc[m][2] += xm[2] * w2;
          acc[m][3] += xm[3] * w3;
        }
      }
      if (k < k1) {  // bs % 4 == 2: one pair left
        const float w0 = t[p[0] >> 4], w1 = t[p[0] & 15];
        for (int m = 0; m < MR; ++m) {
          acc[m][0] += ps.x[m * ps.ldx + k] * w0;
          acc[m][1] += ps.x[m * ps.ldx + k + 1] * w1;
        }
        ++p;
      }
    }
    for (int m = 0; m < MR; ++m) {
      if (ps.last) {
        ps.y[m * ps.ldy + n] = (acc[m][0] + acc[m][1]) + (acc[m][2] + acc[m][3]);
      } else {
        for (int l = 0; l < 4; ++l) part[m * kAccFloats + l] = acc[m][l];
      }
    }
  }
}

#if QLORA_DS_X86
// ---- AVX2 + FMA: 8 lanes, the 16-entry table in two registers --------------------------------------------------

// 8 codes (any byte per int32 lane; bits 0-3 are the code) -> 8 table values
QLORA_DS_AVX2 inline __m256 lookup16_avx2(__m256 t0, __m256 t1, __m256i idx) {
  const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));  // code bit 3 -> the sign bit
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, idx), _mm256_permutevar8x32_ps(t1, idx), bit3);
}

QLORA_DS_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int MR>
QLORA_DS_AVX2 void rows_avx2(const Weight& w, const Pass& ps) {
  const __m256 c0 = _mm256_loadu_ps(w.code4), c1 = _mm256_loadu_ps(w.code4 + 8);
  const int64_t bpr = w.K / w.bs, steps = w.bs / kChunk;
  for (int64_t n = ps.n0; n < ps.n1; ++n) {
    float* part = ps.acc + (n - ps.n0) * MR * kAccFloats;
    __m256 acc0[MR], acc1[MR];
    for (int m = 0; m < MR; ++m) {
      acc0[m] = ps.first ? _mm256_setzero_ps() : _mm256_loadu_ps(part + m * kAccFloats);
      acc1[m] = ps.first ? _mm256_setzero_ps() : _mm256_loadu_ps(part + m * kAccFloats + 8);
    }
    const uint8_t* p = w.packed + (n * w.K + ps.b0 * w.bs) / 2;
    const float* xc = ps.x + ps.b0 * w.bs;
    alignas(64) float sc[kMaxPassBlocks];
    block_scales(w, n * bpr + ps.b0, n * bpr + ps.b1, sc);
    for (int64_t b = ps.b0; b < ps.b1; ++b) {
      const __m256 a = _mm256_set1_ps(sc[b - ps.b0]);
      const __m256 t0 = _mm256_mul_ps(c0, a), t1 = _mm256_mul_ps(c1, a);
      for (int64_t c = 0; c < steps; ++c, p += kChunk / 2, xc += kChunk) {
        // one byte per int32 lane straight from memory (a vpmovzxbd each: shuffles are the scarce port here)
        const __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
        const __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)));
        const __m256 e0 = lookup16_avx2(t0, t1, _mm256_srli_epi32(v0, 4));  // high nibbles: even elements
        const __m256 e1 = lookup16_avx2(t0, t1, _mm256_srli_epi32(v1, 4));
        const __m256 o0 = lookup16_avx2(t0, t1, v0);  // low nibbles: bits 0-3 of each lane (lookup16 reads no more)
        const __m256 o1 = lookup16_avx2(t0, t1, v1);
        for (int m = 0; m < MR; ++m) {
          const float* xm = xc + m * ps.ldx;
          acc0[m] = _mm256_fmadd_ps(_mm256_loadu_ps(xm), e0, acc0[m]);
          acc1[m] = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 8), e1, acc1[m]);
          acc0[m] = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 16), o0, acc0[m]);
          acc1[m] = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 24), o1, acc1[m]);
        }
      }
    }
    for (int m = 0; m < MR; ++m) {
      if (ps.last) {
        ps.y[m * ps.ldy + n] = hsum8(_mm256_add_ps(acc0[m], acc1[m]));
      } else {
        _mm256_storeu_ps(part + m * kAccFloats, acc0[m]);
        _mm256_storeu_ps(part + m * kAccFloats + 8, acc1[m]);
      }
    }
  }
}

// ---- AVX-512: 16 lanes, the whole table in one register ---------------------------------------------------------

// 32 codes (16 bytes) -> the table values of the 16 high nibbles (even elements) and of the 16 low ones (odd)
QLORA_DS_AVX512 inline void decode32_avx512(const uint8_t* p, __m512 t, __m512* we, __m512* wo) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  *we = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), t);
  *wo = _mm512_permutexvar_ps(v, t);  // vpermps reads bits 0-3 of each lane: the low nibble
}

// U: steps unrolled with accumulators of their own (at 1-2 rows the FMA latency, not the decode, bounds one chain).
template <int MR>
QLORA_DS_AVX512 void rows_avx512(const Weight& w, const Pass& ps) {
  constexpr int U = MR <= 2 ? 2 : 1;
  const __m512 code = _mm512_loadu_ps(w.code4);
  const int64_t bpr = w.K / w.bs, steps = w.bs / kChunk;
  for (int64_t n = ps.n0; n < ps.n1; ++n) {
    float* part = ps.acc + (n - ps.n0) * MR * kAccFloats;
    __m512 acc[U][2][MR];
    for (int m = 0; m < MR; ++m) {
      acc[0][0][m] = ps.first ? _mm512_setzero_ps() : _mm512_loadu_ps(part + m * kAccFloats);
      acc[0][1][m] = ps.first ? _mm512_setzero_ps() : _mm512_loadu_ps(part + m * kAccFloats + 16);
      for (int u = 1; u < U; ++u) acc[u][0][m] = acc[u][1][m] = _mm512_setzero_ps();
    }
    const uint8_t* p = w.packed + (n * w.K + ps.b0 * w.bs) / 2;
    const float* xc = ps.x + ps.b0 * w.bs;
    alignas(64) float sc[kMaxPassBlocks];
    block_scales(w, n * bpr + ps.b0, n * bpr + ps.b1, sc);
    for (int64_t b = ps.b0; b < ps.b1; ++b) {
      const __m512 t = _mm512_mul_ps(code, _mm512_set1_ps(sc[b - ps.b0]));
      int64_t c = 0;
      for (; c + U <= steps; c += U, p += U * kChunk / 2, xc += U * kChunk) {
        __m512 we[U], wo[U];
        for (int u = 0; u < U; ++u) decode32_avx512(p + u * kChunk / 2, t, &we[u], &wo[u]);
        for (int u = 0; u < U; ++u)
          for (int m = 0; m < MR; ++m) {
            const float* xm = xc + u * kChunk + m * ps.ldx;
            acc[u][0][m] = _mm512_fmadd_ps(_mm512_loadu_ps(xm), we[u], acc[u][0][m]);
            acc[u][1][m] = _mm512_fmadd_ps(_mm512_loadu_ps(xm + 16), wo[u], acc[u][1][m]);
          }
      }
      for (; c < steps; ++c, p += kChunk / 2, xc += kChunk) {  // U = 2 and bs = 32: one step per block
        __m512 we, wo;
        decode32_avx512(p, t, &we, &wo);
        for (int m = 0; m < MR; ++m) {
          acc[0][0][m] = _mm512_fmadd_ps(_mm512_loadu_ps(xc + m * ps.ldx), we, acc[0][0][m]);
          acc[0][1][m] = _mm512_fmadd_ps(_mm512_loadu_ps(xc + m * ps.ldx + 16), wo, acc[0][1][m]);
        }
      }
    }
    for (int m = 0; m < MR; ++m) {
      for (int u = 1; u < U; ++u) {
        acc[0][0][m] = _mm512_add_ps(acc[0][0][m], acc[u][0][m]);
        acc[0][1][m] = _mm512_add_ps(acc[0][1][m], acc[u][1][m]);
      }
      if (ps.last) {
        ps.y[m * ps.ldy + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][0][m], acc[0][1][m]));
      } else {
        _mm512_storeu_ps(part + m * kAccFloats, acc[0][0][m]);
        _mm512_storeu_ps(part + m * kAccFloats + 16, acc[0][1][m]);
      }
    }
  }
}
#endif  // QLORA_DS_X86

template <template <int> class K>
RowsFn pick(int rows) {
  switch (rows) {
    case 1: return K<1>::fn;
    case 2: return K<2>::fn;
    case 3: return K<3>::fn;
    case 4: return K<4>::fn;
    case 5: return K<5>::fn;
    case 6: return K<6>::fn;
    case 7: return K<7>::fn;
    default: return K<8>::fn;
  }
}

template <int MR> struct Scalar { static constexpr RowsFn fn = rows_scalar<MR>; };
#if QLORA_DS_X86
template <int MR> struct Avx2 { static constexpr RowsFn fn = rows_avx2<(MR < kMaxRowsAvx2 ? MR : kMaxRowsAvx2)>; };
template <int MR> struct Avx512 { static constexpr RowsFn fn = rows_avx512<MR>; };
#endif

// The kernel for a pass over `rows` rows of x on SIMD path `isa` (rows <= max_rows_for(isa)).
RowsFn kernel_for(Isa isa, int rows) {
#if QLORA_DS_X86
  if (isa == Isa::kAvx512) return pick<Avx512>(rows);
  if (isa == Isa::kAvx2) return pick<Avx2>(rows);
#endif
  return pick<Scalar>(rows);
}

int max_rows_for(Isa isa) { return isa == Isa::kAvx2 ? kMaxRowsAvx2 : kMaxRows; }

// Blocks of a row per pass: the pass's columns of `rows` rows of x (fp32) stay within ~32 KiB, i.e. in L1 while the
// pass runs over a tile of W rows (one pass covers the row for K <= 8192 at 1 row, K <= 1024 at 8 rows).
int64_t k_chunk_blocks(int rows, int64_t bs, int64_t blocks_per_row) {
  return std::min(blocks_per_row, std::max<int64_t>(1, kL1Floats / rows / bs));
}

// x [M, K] -> fp32, n = M * K elements; with `reorder` (K % 32 == 0) each chunk of 32 becomes [16 even elements |
// 16 odd elements].
template <typename T>
void to_f32_rows(const T* x, int64_t n, bool reorder, float* out) {
  if (!reorder) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(x[i]);
    return;
  }
  for (int64_t i = 0; i < n; i += kChunk)
    for (int64_t j = 0; j < kChunk / 2; ++j) {
      out[i + j] = static_cast<float>(x[i + 2 * j]);
      out[i + kChunk / 2 + j] = static_cast<float>(x[i + 2 * j + 1]);
    }
}

Weight make_weight(const torch::Tensor& packed, const torch::Tensor& absmax,
                   const c10::optional<torch::Tensor>& absmax2, const c10::optional<torch::Tensor>& code8,
                   double offset, const torch::Tensor& code4, int64_t bs, int64_t nbs, int64_t N, int64_t K) {
  TORCH_CHECK(N >= 0 && K > 0, "N must be >= 0 and K > 0, got N=", N, ", K=", K);
  TORCH_CHECK(bs > 0 && bs % 2 == 0, "blocksize must be a positive even number, got ", bs);
  TORCH_CHECK(K % bs == 0, "small_rows_linear needs K (", K, ") to be a multiple of blocksize (", bs, ")");
  const int64_t nblocks = N * K / bs;
  check_vec(packed, "packed", at::kByte, N * K / 2);
  check_vec(code4, "code4", at::kFloat, 16);
  Weight w{};
  w.packed = packed.data_ptr<uint8_t>();
  w.code4 = code4.data_ptr<float>();
  w.bs = bs, w.nbs = nbs, w.N = N, w.K = K;
  w.offset = static_cast<float>(offset);
  if (absmax2.has_value()) {
    TORCH_CHECK(nbs > 0, "nested_blocksize must be positive, got ", nbs);
    TORCH_CHECK(code8.has_value(), "double quantization needs code8");
    check_vec(absmax, "absmax (double-quant codes)", at::kByte, nblocks);
    check_vec(*absmax2, "absmax2", at::kFloat, (nblocks + nbs - 1) / nbs);
    check_vec(*code8, "code8", at::kFloat, 256);
    w.qabsmax = absmax.data_ptr<uint8_t>();
    w.absmax2 = absmax2->data_ptr<float>();
    w.code8 = code8->data_ptr<float>();
  } else {
    check_vec(absmax, "absmax", at::kFloat, nblocks);
    w.absmax = absmax.data_ptr<float>();
  }
  return w;
}

// y (fp32 [M, N]) + bias -> out (x's dtype) over columns [n0, n1).
template <typename OutT, typename BiasT>
void finish(const float* y, const BiasT* bias, int64_t M, int64_t N, int64_t n0, int64_t n1, OutT* out) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = n0; n < n1; ++n) {
      const float v = y[m * N + n] + (bias ? static_cast<float>(bias[n]) : 0.f);
      out[m * N + n] = static_cast<OutT>(v);
    }
}

}  // namespace

namespace qlora_ds_cpu {

torch::Tensor small_rows_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor absmax,
                                c10::optional<torch::Tensor> absmax2, c10::optional<torch::Tensor> code8, double offset,
                                torch::Tensor code4, int64_t blocksize, int64_t nested_blocksize, int64_t N, int64_t K,
                                c10::optional<torch::Tensor> bias, int64_t grain_elems) {
  const auto xt = x.scalar_type();
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous() && x.size(1) == K, "x must be a contiguous "
              "2-D CPU tensor with K = ", K, " columns, got ", x.sizes());
  TORCH_CHECK(xt == at::kFloat || xt == at::kBFloat16, "x must be float32 or bfloat16, got ", xt);
  const Weight w = make_weight(packed, absmax, absmax2, code8, offset, code4, blocksize, nested_blocksize, N, K);
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat || bias->scalar_type() == xt, "bias must be float32 or x's dtype");
    check_vec(*bias, "bias", bias->scalar_type(), N);
  }
  const int64_t M = x.size(0);
  auto out = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;

  Isa isa = active_isa();
  if (blocksize % kChunk) isa = Isa::kScalar;  // the SIMD steps never straddle a block
  const bool reorder = isa != Isa::kScalar;
  auto xf = torch::empty({M, K}, x.options().dtype(at::kFloat));
  if (xt == at::kFloat) to_f32_rows(x.data_ptr<float>(), M * K, reorder, xf.data_ptr<float>());
  else to_f32_rows(x.data_ptr<c10::BFloat16>(), M * K, reorder, xf.data_ptr<float>());
  const bool direct = xt == at::kFloat;  // fp32 output: accumulate straight into it
  auto yf = direct ? out : torch::empty({M, N}, xf.options());
  const float* xd = xf.data_ptr<float>();
  float* y = yf.data_ptr<float>();
  const int max_rows = max_rows_for(isa);

  // Default grain: 64K weight elements (32 KiB packed) per task. On the 2-vCPU Xeon a second thread paid off from
  // ~100K elements on, at 1 row: 192x576 (AVX2) 13.3 -> 9.7 us, 576x576 (AVX-512) 20.1 -> 13.5 us.
  const int64_t grain = std::max<int64_t>(1, (grain_elems > 0 ? grain_elems : kSmallRowsGrain) / K);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    alignas(64) float acc[kTileN * kMaxRows * kAccFloats];
    for (int64_t t0 = n0; t0 < n1; t0 += kTileN) {
      const int64_t t1 = std::min(n1, t0 + kTileN);
      for (int64_t m0 = 0; m0 < M; m0 += max_rows) {
        const int rows = static_cast<int>(std::min<int64_t>(max_rows, M - m0));
        const RowsFn fn = kernel_for(isa, rows);
        const int64_t kc = k_chunk_blocks(rows, blocksize, K / blocksize);
        for (int64_t b0 = 0; b0 < K / blocksize; b0 += kc) {
          const int64_t b1 = std::min(K / blocksize, b0 + kc);
          fn(w, Pass{xd + m0 * K, K, t0, t1, b0, b1, b0 == 0, b1 == K / blocksize, acc, y + m0 * N, N});
        }
      }
    }
    if (direct && !bias.has_value()) return;
    auto run = [&](auto* o) {
      using OutT = std::remove_pointer_t<decltype(o)>;
      if (!bias.has_value()) return finish<OutT, float>(y, nullptr, M, N, n0, n1, o);
      if (bias->scalar_type() == at::kFloat) return finish(y, bias->data_ptr<float>(), M, N, n0, n1, o);
      return finish(y, bias->data_ptr<c10::BFloat16>(), M, N, n0, n1, o);
    };
    if (direct) run(out.data_ptr<float>());
    else run(out.data_ptr<c10::BFloat16>());
  });
  return out;
}

}  // namespace qlora_ds_cpu
