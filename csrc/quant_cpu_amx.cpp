// qlora-ds: fused dequantize + AMX bf16 GEMM for NF4/FP4 (+ double quantization) linear layers on CPU.
//
//   nf4_linear_fwd:  y[M,N]      = x[M,K] · deq(W)ᵀ     (W: [N,K], stored 4-bit, bitsandbytes layout)
//   nf4_linear_bwd:  grad_x[M,K] = g[M,N] · deq(W)
//
// Why: on CPUs with AMX the bf16 matmuls are so fast that dequantizing the whole weight into a bf16 buffer (32 MiB
// written to DRAM for 4096x4096) before torch's GEMM cost ~6-13% of a QLoRA layer. Here the bf16 W is never
// materialised: each thread dequantizes a small panel of W straight into AMX tile layout (L1/L2 resident),
// multiplies every row of the (pre-packed) activation against it, and moves on; fp32 accumulation (TDPBF16PS),
// one rounding to bf16 at the end. The dequantized values are bit-identical to dequantize_4bit(_dq)'s, so results
// differ from dequantize + torch.matmul only by the order of the fp32 accumulation. Measured: bench/RESULTS.md.
//
// Weight format (qlora_ds.quant.nf4 / bitsandbytes): W flattened row-major, blocks of `bs` consecutive
// elements; packed[i] holds elements 2i (high nibble) and 2i+1 (low nibble); value = bf16(code4[q] * absmax[b])
// (one fp32 product, round-to-nearest-even). With double quantization absmax[b] = fl(fl(code8[qa[b]] *
// absmax2[b / nbs]) + offset) (two fp32 roundings, no FMA: built with -ffp-contract=off).
//
// Requirements (checked; qlora_ds/ops falls back to dequantize + matmul otherwise): K % 64 == 0, N % 32 == 0,
// bs a power of two >= 64, M arbitrary (padded to 32). Runs only where amx_linear_supported() (x86 CPU with
// AMX-BF16 + AVX512-BF16 + AVX512-VBMI, the OS's permission for tile data, the avx512 path active).
//
// Tiles (2x2 blocking: tmm0..3 = C, tmm4,5 = A, tmm6,7 = B): TDPBF16PS C[16x16 fp32] += A[16x32 bf16] · B, B in
// VNNI layout (row r = the 16 pairs (B[2r][j], B[2r+1][j])). Forward computes yᵀ: A = plain dequantized W rows,
// B = x packed once per call, C transposed into y. Backward: A = g re-blocked once, B = two dequantized W rows
// interleaved at 16-bit granularity, which the table lookup does for free (one vpermw over both rows' codes).
// Blocking (tuned at M=512, K=N=4096, 2-vCPU Sapphire Rapids, 2 MiB L2/core): forward panels of NB=256 W rows
// (a guided work queue) in K chunks of KC=256, backward panels of KB=512 W columns in N chunks of NC=256; C
// accumulates in an L2 fp32 scratch. The next W chunk is dequantized slice by slice between the micro-kernel
// calls on the current one, so AVX-512 work overlaps the AMX unit (forward ~7% faster than in phases; backward
// slices of 4 whole VNNI tiles ~9% faster than by row pairs; software prefetch gave nothing). M is processed in
// blocks of MB=512 rows (W dequantized again per block) so that the scratch stays in L2.
#include <torch/extension.h>

#include "quant_cpu_amx.h"
#include "quant_cpu_isa.h"

#if QLORA_DS_AMX_BUILD
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "quant_cpu_amx_tiles.h"

namespace {

// ---- AMX enabling ---------------------------------------------------------------------------------------

bool amx_permitted() {
  static const bool ok = [] {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

bool cpu_has_amx() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
         __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi");
}

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// All 8 tiles are 16 rows x 64 bytes. Tile config is per thread: call in every worker.
AMX_FN void tile_config() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  _tile_loadconfig(&cfg);
}

// ---- the micro-kernel ---------------------------------------------------------------------------------------

// C(2x2 tiles, contiguous 4 KiB at c) (+)= Σ_s A_i(s) · B_j(s), s < steps; A_i(s) at a_i + s*kTileElems, etc.
// load_c: start from c (else from zero); the result is left in tmm0..3 (store with store_c).
AMX_FN inline void mk_2x2(const bf16_t* a0, const bf16_t* a1, const bf16_t* b0, const bf16_t* b1, int64_t steps,
                          const float* c, bool load_c) {
  if (load_c) {
    _tile_loadd(0, c, 64);
    _tile_loadd(1, c + kCTile, 64);
    _tile_loadd(2, c + 2 * kCTile, 64);
    _tile_loadd(3, c + 3 * kCTile, 64);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t o = s * kTileElems;
    _tile_loadd(4, a0 + o, 64);
    _tile_loadd(6, b0 + o, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, b1 + o, 64);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, a1 + o, 64);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
}

AMX_FN inline void store_c(float* c) {
  _tile_stored(0, c, 64);
  _tile_stored(1, c + kCTile, 64);
  _tile_stored(2, c + 2 * kCTile, 64);
  _tile_stored(3, c + 3 * kCTile, 64);
}

// One fp32 C tile [16 n][16 m] -> y[m][n0..n0+15] bf16 (transposed), rows m < M only.
AVX512_FN inline void store_tile_transposed(const float* c, bf16_t* y, int64_t ldy, int64_t m0, int64_t M) {
  __m512i r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(c + i * 16);
  transpose16x16_epi32(r);
  for (int m = 0; m < 16 && m0 + m < M; ++m)
    _mm256_storeu_si256((__m256i*)(y + (m0 + m) * ldy),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_castsi512_ps(r[g_tr_order[m]])));
}

// One fp32 C tile [16 m][16 k] -> out[m][k0..k0+15] bf16, rows m < M only.
AVX512_FN inline void store_tile_rows(const float* c, bf16_t* out, int64_t ldo, int64_t m0, int64_t M) {
  for (int m = 0; m < 16 && m0 + m < M; ++m)
    _mm256_storeu_si256((__m256i*)(out + (m0 + m) * ldo), (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(c + m * 16)));
}

// Packing the activation, shared by all workers without a barrier: workers grab 16-row groups one at a time and
// then wait only until every group is packed — a worker that the OS has descheduled does not hold the others up
// (an OpenMP barrier would wait for it to arrive).
struct SharedPack {
  std::atomic<int64_t> next{0}, done{0};
  int64_t units;
  explicit SharedPack(int64_t units_) : units(units_) {}
  template <typename F>
  void run(F&& pack_range) {
    for (int64_t j; (j = next.fetch_add(1)) < units;) {
      pack_range(j, j + 1);
      done.fetch_add(1, std::memory_order_release);
    }
    while (done.load(std::memory_order_acquire) < units) _mm_pause();
  }
};

// Guided self-scheduling over `units` work units: a grab takes ceil(remaining / 2T) units, clamped to
// [1, max_units]. Under a concurrent load a slowed thread simply takes less of the work (a static split would
// make every call as slow as its slowest thread); uncontended it is as balanced as a static split.
struct WorkQueue {
  std::atomic<int64_t> next{0};
  int64_t units, max_units, T;
  WorkQueue(int64_t units_, int64_t max_units_, int64_t T_) : units(units_), max_units(max_units_), T(T_) {}
  bool grab(int64_t* u0, int64_t* u1) {
    int64_t cur = next.load(std::memory_order_relaxed);
    while (cur < units) {
      const int64_t take = std::clamp<int64_t>((units - cur + 2 * T - 1) / (2 * T), 1, max_units);
      if (next.compare_exchange_weak(cur, cur + take)) {
        *u0 = cur, *u1 = cur + take;
        return true;
      }
    }
    return false;
  }
};

// Grow-only 64-byte-aligned scratch, reused across calls (no page faults / zeroing per call): thread_local slots
// for each worker's panel and accumulators (OpenMP workers persist). The packed activation is per call.
struct Scratch {
  void* p = nullptr;
  size_t bytes = 0;
  template <typename T>
  T* get(size_t n) {
    const size_t need = ((n * sizeof(T) + 63) / 64) * 64;
    if (need > bytes) {
      std::free(p);
      p = std::aligned_alloc(64, need);
      TORCH_CHECK(p, "out of memory");
      bytes = need;
    }
    return static_cast<T*>(p);
  }
  ~Scratch() { std::free(p); }
};
thread_local Scratch t_panel, t_cbuf;            // per worker: dequantized W panel, fp32 C accumulators

// ---- forward ----------------------------------------------------------------------------------------------

AMX_FN void fwd_impl(const bf16_t* x, int64_t M, const Nf4Weight& w, bf16_t* y, int64_t NB, int64_t KC,
                     bf16_t* xp) {
  const int64_t N = w.N, K = w.K, Mp = (M + 31) / 32 * 32, MJ = Mp / 32, KS = K / 32;
  const int T = std::max(1, std::min<int>(at::get_num_threads(), (int)(N / 32)));
  WorkQueue queue(N / 32, NB / 32, T);
  SharedPack pack(Mp / 16);
#pragma omp parallel num_threads(T)
  {
    pack.run([&](int64_t j0, int64_t j1) { pack_vnni_rows(x, M, K, j0, j1, xp); });
    tile_config();
    bf16_t* apan[2];  // double-buffered W panel chunk: products on one while the next is dequantized
    apan[0] = t_panel.get<bf16_t>(2 * NB * KC);
    apan[1] = apan[0] + NB * KC;
    float* cbuf = t_cbuf.get<float>(NB * Mp);
    alignas(64) float ctmp[4 * kCTile];
    auto deq = [&](int64_t n0, int64_t r0, int64_t r1, int64_t k0, int64_t kc, bf16_t* out) {
      dequant_rows_panel(w, n0, r0, r1, k0, kc, out);
    };
    int64_t u0, u1;  // a panel: units [u0, u1) of 32 output features
    while (queue.grab(&u0, &u1)) {
      const int64_t n0 = u0 * 32, nb = (u1 - u0) * 32;
      deq(n0, 0, nb, 0, std::min(KC, K), apan[0]);  // the first chunk is not overlapped
      for (int64_t kc0 = 0, c = 0; kc0 < K; kc0 += KC, ++c) {
        const int64_t kc = std::min(KC, K - kc0), ks_n = kc / 32;
        const bool first = kc0 == 0, last = kc0 + kc == K;
        const bf16_t* cur = apan[c & 1];
        bf16_t* nxt = apan[(c + 1) & 1];
        // The next chunk is dequantized a few rows at a time between the tile products of this one: the AVX-512
        // work then executes while TDPBF16PS runs (out of order) instead of in a phase of its own.
        const int64_t nk0 = kc0 + kc, nkc = std::min(KC, K - nk0);
        const int64_t rows_per_call = last ? 0 : (nb + (nb / 32) * MJ - 1) / ((nb / 32) * MJ);
        int64_t rr = 0;
        for (int64_t i = 0; i < nb / 32; ++i) {
          const bf16_t* a0 = cur + (2 * i) * ks_n * kTileElems;
          const bf16_t* a1 = a0 + ks_n * kTileElems;
          for (int64_t j = 0; j < MJ; ++j) {
            float* c = cbuf + (i * MJ + j) * 4 * kCTile;
            const bf16_t* b0 = xp + ((2 * j) * KS + kc0 / 32) * kTileElems;
            const bf16_t* b1 = b0 + KS * kTileElems;
            mk_2x2(a0, a1, b0, b1, ks_n, c, !first);
            if (rr < nb && rows_per_call) {
              const int64_t r1 = std::min(nb, rr + rows_per_call);
              deq(n0, rr, r1, nk0, nkc, nxt);
              rr = r1;
            }
            if (!last) {
              store_c(c);
            } else {  // C tile (ai, bj) = rows n0+32i+16ai, cols m 32j+16bj
              store_c(ctmp);
              for (int ai = 0; ai < 2; ++ai)
                for (int bj = 0; bj < 2; ++bj)
                  store_tile_transposed(ctmp + (ai * 2 + bj) * kCTile, y + n0 + 32 * i + 16 * ai, N,
                                        32 * j + 16 * bj, M);
            }
          }
        }
        if (!last && rr < nb) deq(n0, rr, nb, nk0, nkc, nxt);
      }
    }
    _tile_release();
  }
}

// ---- backward ---------------------------------------------------------------------------------------------

AMX_FN void bwd_impl(const bf16_t* g, int64_t M, const Nf4Weight& w, bf16_t* gx, int64_t KB, int64_t NC,
                     bf16_t* gp) {
  const int64_t N = w.N, K = w.K, Mp = (M + 31) / 32 * 32, MJ = Mp / 32, NS = N / 32;
  const int T = std::max(1, std::min<int>(at::get_num_threads(), (int)(K / 64)));
  WorkQueue queue(K / 64, KB / 64, T);
  SharedPack pack(Mp / 16);
#pragma omp parallel num_threads(T)
  {
    pack.run([&](int64_t j0, int64_t j1) { pack_rows(g, M, N, j0, j1, gp); });
    tile_config();
    bf16_t* bpan[2];  // double-buffered W panel chunk, as in the forward
    bpan[0] = t_panel.get<bf16_t>(2 * NC * KB);
    bpan[1] = bpan[0] + NC * KB;
    float* cbuf = t_cbuf.get<float>(Mp * KB);
    alignas(64) float ctmp[4 * kCTile];
    auto deq = [&](int64_t nc0, int64_t nc, int64_t p0, int64_t p1, int64_t k0, int64_t kb, bf16_t* out) {
      dequant_vnni_panel(w, nc0, nc, p0, p1, k0, kb, out);
    };
    int64_t u0, u1;  // a panel: units [u0, u1) of 64 input features (one NF4 block width)
    while (queue.grab(&u0, &u1)) {
      const int64_t k0 = u0 * 64, kb = (u1 - u0) * 64;
      deq(0, std::min(NC, N), 0, std::min(NC, N) / 2, k0, kb, bpan[0]);  // the first chunk is not overlapped
      for (int64_t nc0 = 0, c = 0; nc0 < N; nc0 += NC, ++c) {
        const int64_t nc = std::min(NC, N - nc0), ns_n = nc / 32;
        const bool first = nc0 == 0, last = nc0 + nc == N;
        const bf16_t* cur = bpan[c & 1];
        bf16_t* nxt = bpan[(c + 1) & 1];
        const int64_t nn0 = nc0 + nc, nnc = std::min(NC, N - nn0), npairs = last ? 0 : nnc / 2;
        // Slices of the next chunk's dequantization: 16 row pairs x one 64-column block, i.e. exactly 4 whole
        // B tiles (4 KiB of contiguous stores), walked block by block along the same 32 rows.
        const int64_t kblocks = kb / 64, slices = (npairs / 16) * kblocks, calls = (kb / 32) * MJ;
        const int64_t slices_per_call = (slices + calls - 1) / calls, nns_n = nnc / 32;
        int64_t sl = 0;
        auto deq_slices = [&](int64_t s1) {
          for (; sl < s1; ++sl) {
            const int64_t pg = sl / kblocks, kbi = sl % kblocks;
            deq(nn0, nnc, 16 * pg, 16 * pg + 16, k0 + 64 * kbi, 64, nxt + 4 * kbi * nns_n * kTileElems);
          }
        };
        for (int64_t tt = 0; tt < kb / 32; ++tt) {
          const bf16_t* b0 = cur + (2 * tt) * ns_n * kTileElems;
          const bf16_t* b1 = b0 + ns_n * kTileElems;
          for (int64_t j = 0; j < MJ; ++j) {
            float* c = cbuf + (tt * MJ + j) * 4 * kCTile;
            const bf16_t* a0 = gp + ((2 * j) * NS + nc0 / 32) * kTileElems;
            const bf16_t* a1 = a0 + NS * kTileElems;
            mk_2x2(a0, a1, b0, b1, ns_n, c, !first);
            if (sl < slices) deq_slices(std::min(slices, sl + slices_per_call));  // overlaps the products
            if (!last) {
              store_c(c);
            } else {  // C tile (ai, bj) = rows m 32j+16ai, cols k0+32tt+16bj
              store_c(ctmp);
              for (int ai = 0; ai < 2; ++ai)
                for (int bj = 0; bj < 2; ++bj)
                  store_tile_rows(ctmp + (ai * 2 + bj) * kCTile, gx + k0 + 32 * tt + 16 * bj, K, 32 * j + 16 * ai, M);
            }
          }
        }
        deq_slices(slices);
      }
    }
    _tile_release();
  }
}

// ---- torch bindings ---------------------------------------------------------------------------------------

Nf4Weight make_weight(const torch::Tensor& packed, const torch::Tensor& absmax, const c10::optional<torch::Tensor>& absmax2,
                      const c10::optional<torch::Tensor>& code8, double offset, const torch::Tensor& code4,
                      int64_t blocksize, int64_t nested_blocksize, int64_t N, int64_t K) {
  TORCH_CHECK(K % 64 == 0 && N % 32 == 0, "nf4 AMX kernel needs K % 64 == 0 and N % 32 == 0");
  TORCH_CHECK(blocksize % 64 == 0, "nf4 AMX kernel needs blocksize % 64 == 0");
  TORCH_CHECK(packed.is_contiguous() && packed.scalar_type() == at::kByte && packed.numel() == N * K / 2, "packed");
  TORCH_CHECK(code4.is_contiguous() && code4.scalar_type() == at::kFloat && code4.numel() == 16, "code4");
  // one absmax per block, the last one possibly partial (N*K need not be a multiple of the blocksize)
  const int64_t blocks = (N * K + blocksize - 1) / blocksize;
  TORCH_CHECK(absmax.is_contiguous() && absmax.numel() == blocks, "absmax: expected ", blocks, " blocks, got ",
              absmax.numel());
  Nf4Weight w{};
  w.packed = packed.data_ptr<uint8_t>();
  w.code4 = code4.data_ptr<float>();
  TORCH_CHECK((blocksize & (blocksize - 1)) == 0 && nested_blocksize > 0 &&
              (nested_blocksize & (nested_blocksize - 1)) == 0, "block sizes must be powers of two");
  w.bs = blocksize;
  w.nbs = nested_blocksize;
  w.log2_bs = __builtin_ctzll(blocksize);
  w.log2_nbs = __builtin_ctzll(nested_blocksize);
  w.N = N;
  w.K = K;
  w.offset = static_cast<float>(offset);
  if (absmax2.has_value()) {
    TORCH_CHECK(absmax.scalar_type() == at::kByte, "double-quant absmax must be uint8 codes");
    TORCH_CHECK(code8.has_value() && code8->numel() == 256 && code8->scalar_type() == at::kFloat, "code8");
    TORCH_CHECK(absmax2->scalar_type() == at::kFloat && absmax2->is_contiguous() &&
                absmax2->numel() == (blocks + nested_blocksize - 1) / nested_blocksize, "absmax2: expected ",
                (blocks + nested_blocksize - 1) / nested_blocksize, " nested blocks, got ", absmax2->numel());
    w.qabsmax = absmax.data_ptr<uint8_t>();
    w.absmax2 = absmax2->data_ptr<float>();
    w.code8 = code8->data_ptr<float>();
  } else {
    TORCH_CHECK(absmax.scalar_type() == at::kFloat, "absmax must be fp32 without double quantization");
    w.absmax = absmax.data_ptr<float>();
  }
  return w;
}

void check_ready() {
  TORCH_CHECK(qlora_ds_cpu::amx_linear_supported(), "the fused NF4 x AMX linear needs a CPU with AMX-BF16, AVX512-BF16 "
              "and AVX512-VBMI, the OS's permission for AMX tiles and the avx512 path (QLORA_DS_CPU_ISA)");
  static const bool once = (init_transpose_order(), true);
  (void)once;
}

}  // namespace

namespace qlora_ds_cpu {

bool amx_linear_supported() {
  return cpu_has_amx() && active_isa() == Isa::kAvx512 && amx_permitted();
}

namespace {

// Rows of one block of the activation, padded to the 32-row micro-kernel (at least 32: the default blocking divides
// by it, also for an empty activation).
int64_t padded_rows(const torch::Tensor& a, int64_t MB) {
  return std::max<int64_t>((std::min(a.size(0), MB) + 31) / 32 * 32, 32);
}

// The activation's checks, the output, and the loop over blocks of MB rows (W is dequantized once per block, so the
// cost of dequantization relative to the products is that of an M=MB call, while the accumulators and the packed
// activation block stay in L2): impl(a_rows, rows, out_rows, packed_scratch).
template <typename Impl>
torch::Tensor over_row_blocks(const torch::Tensor& a, const char* name, int64_t in_cols, int64_t out_cols, int64_t MB,
                              Impl impl) {
  TORCH_CHECK(a.scalar_type() == at::kBFloat16 && a.is_contiguous() && a.dim() == 2 && a.size(1) == in_cols, name,
              " must be a contiguous 2-D bf16 tensor with ", in_cols, " columns, got ", a.scalar_type(), " ",
              a.sizes());
  const int64_t M = a.size(0), Mp = padded_rows(a, MB);
  auto out = torch::empty({M, out_cols}, a.options());
  if (M == 0) return out;  // no tokens (an MoE expert that got none): an empty result, as F.linear gives
  auto packed = torch::empty({Mp * in_cols}, a.options());  // the packed activation block (64-byte aligned)
  const auto* ad = reinterpret_cast<const bf16_t*>(a.data_ptr());
  auto* od = reinterpret_cast<bf16_t*>(out.data_ptr());
  auto* pd = reinterpret_cast<bf16_t*>(packed.data_ptr());
  for (int64_t m0 = 0; m0 < M; m0 += MB) impl(ad + m0 * in_cols, std::min(MB, M - m0), od + m0 * out_cols, pd);
  return out;
}

}  // namespace

torch::Tensor nf4_linear_fwd(torch::Tensor x, torch::Tensor packed, torch::Tensor absmax,
                             c10::optional<torch::Tensor> absmax2, c10::optional<torch::Tensor> code8, double offset,
                             torch::Tensor code4, int64_t blocksize, int64_t nested_blocksize, int64_t N, int64_t K,
                             int64_t NB, int64_t KC, int64_t MB) {
  check_ready();
  // Default blocking (0 = choose), tuned on the 2-vCPU SPR VM at M=512, K=N=4096. Per-thread working set ~
  // NB*Mp*4 (C accumulators) + NB*KC*2 (W panel) + Mp*KC*2 (x chunk) = 896 KiB at M=512: well inside the
  // 2 MiB L2, which measured better than filling it (other processes time-sharing the core evict part of it).
  // NB shrinks for large M so that the accumulators stay at <= 512 KiB.
  if (MB <= 0) MB = 512;
  if (NB == 0) NB = std::clamp<int64_t>((512 * 1024 / (padded_rows(x, MB) * 4)) / 32 * 32, 32, 256);
  if (KC == 0) KC = 256;
  TORCH_CHECK(NB % 32 == 0 && KC % 64 == 0 && NB > 0 && KC > 0, "NB % 32, KC % 64");
  const Nf4Weight w = make_weight(packed, absmax, absmax2, code8, offset, code4, blocksize, nested_blocksize, N, K);
  return over_row_blocks(x, "x", K, N, MB, [&](const bf16_t* a, int64_t rows, bf16_t* out, bf16_t* scratch) {
    fwd_impl(a, rows, w, out, NB, KC, scratch);
  });
}

torch::Tensor nf4_linear_bwd(torch::Tensor g, torch::Tensor packed, torch::Tensor absmax,
                             c10::optional<torch::Tensor> absmax2, c10::optional<torch::Tensor> code8, double offset,
                             torch::Tensor code4, int64_t blocksize, int64_t nested_blocksize, int64_t N, int64_t K,
                             int64_t KB, int64_t NC, int64_t MB) {
  check_ready();
  // default blocking (0 = choose), as in the forward: Mp*KB*4 + NC*KB*2 + Mp*NC*2 = 1.5 MiB at M=512;
  // KB shrinks for large M so that the accumulators stay at <= 1 MiB.
  if (MB <= 0) MB = 512;
  if (KB == 0) KB = std::clamp<int64_t>((1024 * 1024 / (padded_rows(g, MB) * 4)) / 64 * 64, 64, 512);
  if (NC == 0) NC = 256;
  TORCH_CHECK(KB % 64 == 0 && NC % 32 == 0 && KB > 0 && NC > 0, "KB % 64, NC % 32");
  const Nf4Weight w = make_weight(packed, absmax, absmax2, code8, offset, code4, blocksize, nested_blocksize, N, K);
  return over_row_blocks(g, "g", N, K, MB, [&](const bf16_t* a, int64_t rows, bf16_t* out, bf16_t* scratch) {
    bwd_impl(a, rows, w, out, KB, NC, scratch);
  });
}

}  // namespace qlora_ds_cpu

#else  // no AMX build (not x86-64, or a compiler without the AMX intrinsics): the Python side never calls these

namespace qlora_ds_cpu {
bool amx_linear_supported() { return false; }
torch::Tensor nf4_linear_fwd(torch::Tensor, torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>,
                             c10::optional<torch::Tensor>, double, torch::Tensor, int64_t, int64_t, int64_t, int64_t,
                             int64_t, int64_t, int64_t) {
  TORCH_CHECK(false, "this build of the qlora-ds CPU op has no AMX kernels");
}
torch::Tensor nf4_linear_bwd(torch::Tensor, torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>,
                             c10::optional<torch::Tensor>, double, torch::Tensor, int64_t, int64_t, int64_t, int64_t,
                             int64_t, int64_t, int64_t) {
  TORCH_CHECK(false, "this build of the qlora-ds CPU op has no AMX kernels");
}
}  // namespace qlora_ds_cpu

#endif
