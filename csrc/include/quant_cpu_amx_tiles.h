// qlora-ds: the tile layouts of the fused 4-bit AMX linear (csrc/quant_cpu_amx.cpp, its only includer): the
// weight's block constants, dequantization straight into AMX A tiles (forward) and VNNI B tiles (backward), and the
// packing of the activation. Everything here runs AVX-512 (BW, VBMI, BF16) code only.
#pragma once

#include <torch/extension.h>
#include <immintrin.h>

#include <cstdint>

#define AMX_FN __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx512vbmi")))
#define AVX512_FN __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx512vbmi")))

namespace {

using bf16_t = uint16_t;
constexpr int kTileElems = 16 * 32;  // bf16 elements in one A/B tile (1 KiB)
constexpr int kCTile = 16 * 16;      // fp32 elements in one C tile (1 KiB)

// ---- the weight: where each block's absmax comes from ----------------------------------------------------

struct Nf4Weight {
  const uint8_t* packed;   // [N*K/2]
  const float* absmax;     // fp32 [N*K/bs], or nullptr with double quantization
  const uint8_t* qabsmax;  // uint8 codes [N*K/bs] (double quantization)
  const float* absmax2;    // fp32 [ceil(N*K/bs / nbs)]
  const float* code8;      // 256 fp32
  const float* code4;      // 16 fp32
  float offset;
  int64_t bs, nbs, N, K;
  int log2_bs, log2_nbs;  // both sizes are powers of two (checked): shifts, not 64-bit divisions

  // absmax of the block holding flat element index e
  inline float absmax_at(int64_t e) const {
    const int64_t b = e >> log2_bs;
    if (!qabsmax) return absmax[b];
    const float a = code8[qabsmax[b]] * absmax2[b >> log2_nbs];  // two separate fp32 roundings, as the repo
    return a + offset;
  }
};

// ---- dequantization into tile layouts -------------------------------------------------------------------

// Nibble expansion: vpermb spreads the packed bytes to one byte per output word, vpsrlvw moves each word's
// nibble down (element 2i is byte i's high nibble), and (w & 0xF) | add clears the rest and, for the
// backward's two-row tables, adds 16 on the odd row's words. Two port-5 ops per 32 outputs with the lookup.
struct ExpandCtl {
  __m512i perm, shift, add;
};
struct alignas(64) ExpandTables {
  uint8_t fwd_perm[2][64];        // fwd: output words w of half h <- byte 16h + w/2; shift 4 (w even) / 0
  uint16_t fwd_shift[32];
  uint8_t bwd_perm[4][64];        // bwd: source = e bytes 0..31 | o bytes 32..63; k-tile t (16 columns):
  uint16_t bwd_shift[32];         //   word w = 4j + type, type 0: hi e, 1: hi o, 2: lo e, 3: lo o (byte 8t + j)
  uint16_t bwd_add[32];
  ExpandTables() {
    for (int h = 0; h < 2; ++h)
      for (int w = 0; w < 32; ++w) fwd_perm[h][2 * w] = fwd_perm[h][2 * w + 1] = uint8_t(16 * h + w / 2);
    for (int w = 0; w < 32; ++w) fwd_shift[w] = (w % 2 == 0) ? 4 : 0;
    for (int t = 0; t < 4; ++t)
      for (int w = 0; w < 32; ++w) {
        const int j = w / 4, type = w % 4;
        bwd_perm[t][2 * w] = bwd_perm[t][2 * w + 1] = uint8_t((type & 1 ? 32 : 0) + 8 * t + j);
      }
    for (int w = 0; w < 32; ++w) bwd_shift[w] = (w % 4 < 2) ? 4 : 0, bwd_add[w] = (w % 2) ? 16 : 0;
  }
};
const ExpandTables g_expand;

AVX512_FN inline __m512i expand_nibbles(__m512i src, __m512i perm, __m512i shift, __m512i add) {
  const __m512i w = _mm512_srlv_epi16(_mm512_permutexvar_epi8(perm, src), shift);
  return _mm512_ternarylogic_epi64(w, _mm512_set1_epi16(0xF), add, 0xEA);  // (w & 0xF) | add
}

// Forward A panel: rows n0 + [r0, r1) x cols [k0, k0+kc) of deq(W) into the panel's tiles [rows/16][kc/32][16][32]
// (tile (i, s) holds rows n0+16i.. x cols k0+32s..; row-major inside: exactly W's row segment).
AVX512_FN void dequant_rows_panel(const Nf4Weight& w, int64_t n0, int64_t r0, int64_t r1, int64_t k0, int64_t kc,
                                  bf16_t* out) {
  const __m512 c4 = _mm512_loadu_ps(w.code4);
  const int64_t ks_n = kc / 32;
  const __m512i perm0 = _mm512_load_si512(g_expand.fwd_perm[0]), perm1 = _mm512_load_si512(g_expand.fwd_perm[1]);
  const __m512i shift = _mm512_load_si512(g_expand.fwd_shift), zero = _mm512_setzero_si512();
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = n0 + r;
    bf16_t* orow = out + ((r / 16) * ks_n) * kTileElems + (r % 16) * 32;
    const uint8_t* prow = w.packed + (n * w.K) / 2;
    for (int64_t k = k0; k < k0 + kc; k += 64) {
      const float a = w.absmax_at(n * w.K + k);
      const __m512i lut = _mm512_castsi256_si512(
          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(c4, _mm512_set1_ps(a))));
      const __m512i src = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(prow + k / 2)));
      const __m512i v0 = _mm512_permutexvar_epi16(expand_nibbles(src, perm0, shift, zero), lut);
      const __m512i v1 = _mm512_permutexvar_epi16(expand_nibbles(src, perm1, shift, zero), lut);
      const int64_t s = (k - k0) / 32;
      _mm512_store_si512(orow + s * kTileElems, v0);
      _mm512_store_si512(orow + (s + 1) * kTileElems, v1);
    }
  }
}

// Backward B panel of rows [n0, n0+nrows) x cols [k0, k0+kb) of deq(W), VNNI tiles [kb/16][nrows/32][16][32]:
// tile (t, s) row r holds (W[n0+32s+2r][k], W[n0+32s+2r+1][k]) for k = k0+16t .. +15. Writes the row pairs
// [p0, p1) (rows n0+2p0 .. n0+2p1).
AVX512_FN void dequant_vnni_panel(const Nf4Weight& w, int64_t n0, int64_t nrows, int64_t p0, int64_t p1, int64_t k0,
                                  int64_t kb, bf16_t* out) {
  const __m512 c4 = _mm512_loadu_ps(w.code4);
  const int64_t ns_n = nrows / 32;
  __m512i perm[4];
  for (int t = 0; t < 4; ++t) perm[t] = _mm512_load_si512(g_expand.bwd_perm[t]);
  const __m512i shift = _mm512_load_si512(g_expand.bwd_shift), add = _mm512_load_si512(g_expand.bwd_add);
  for (int64_t rp = p0; rp < p1; ++rp) {
    const int64_t ne = n0 + 2 * rp;
    bf16_t* orow = out + (rp / 16) * kTileElems + (rp % 16) * 32;
    const uint8_t* pe_row = w.packed + (ne * w.K) / 2;
    const uint8_t* po_row = pe_row + w.K / 2;
    for (int64_t k = k0; k < k0 + kb; k += 64) {
      const float ae = w.absmax_at(ne * w.K + k);
      const float ao = w.absmax_at((ne + 1) * w.K + k);
      // table: words 0..15 = bf16(code * ae), words 16..31 = bf16(code * ao)
      const __m512i lut = (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(c4, _mm512_set1_ps(ao)),
                                                       _mm512_mul_ps(c4, _mm512_set1_ps(ae)));
      const __m512i src = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(pe_row + k / 2))),
                                             _mm256_loadu_si256((const __m256i*)(po_row + k / 2)), 1);
      bf16_t* o = orow + ((k - k0) / 16) * ns_n * kTileElems;  // 4 k-tiles of 16 columns from this 64-block
      const int64_t ts = ns_n * kTileElems;
      for (int t = 0; t < 4; ++t)
        _mm512_store_si512(o + t * ts, _mm512_permutexvar_epi16(expand_nibbles(src, perm[t], shift, add), lut));
    }
  }
}

// ---- activation packing -------------------------------------------------------------------------------------

// 16x16 transpose of 32-bit elements held in 16 zmm registers (in place).
AVX512_FN inline void transpose16x16_epi32(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xDD);
  }
}
// After the lane shuffles the output row order is permuted; this maps output row j -> register index.
// (Computed once by transposing a known matrix; see transpose_order().)
int g_tr_order[16];

AVX512_FN void init_transpose_order() {
  alignas(64) int32_t m[16][16];
  __m512i r[16];
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) m[i][j] = i * 16 + j;
    r[i] = _mm512_load_si512(m[i]);
  }
  transpose16x16_epi32(r);
  for (int i = 0; i < 16; ++i) {
    _mm512_store_si512(m[i], r[i]);
    g_tr_order[m[i][0]] = i;  // register i holds column m[i][0] of the input (m[i][0] = 0*16 + col)
  }
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) TORCH_CHECK(m[i][j] == j * 16 + m[i][0], "transpose16x16_epi32 is wrong");
}

// x [M, K] bf16 -> VNNI B tiles [Mp/16][K/32][16 rows][16 pairs]: tile (j, s) row r, pair c =
// (x[16j+c][32s+2r], x[16j+c][32s+2r+1]); rows m >= M are zero.
AVX512_FN void pack_vnni_rows(const bf16_t* x, int64_t M, int64_t K, int64_t mt0, int64_t mt1, bf16_t* out) {
  const int64_t ks_n = K / 32;
  for (int64_t j = mt0; j < mt1; ++j) {
    for (int64_t s = 0; s < ks_n; ++s) {
      __m512i r[16];
      for (int c = 0; c < 16; ++c) {
        const int64_t m = 16 * j + c;
        r[c] = m < M ? _mm512_loadu_si512(x + m * K + 32 * s) : _mm512_setzero_si512();
      }
      transpose16x16_epi32(r);
      bf16_t* t = out + (j * ks_n + s) * kTileElems;
      for (int rr = 0; rr < 16; ++rr) _mm512_store_si512(t + rr * 32, r[g_tr_order[rr]]);
    }
  }
}

// g [M, N] bf16 -> A tiles [Mp/16][N/32][16][32] (a plain re-blocking so that every tile is 1 KiB contiguous).
AVX512_FN void pack_rows(const bf16_t* g, int64_t M, int64_t N, int64_t mt0, int64_t mt1, bf16_t* out) {
  const int64_t ns_n = N / 32;
  for (int64_t j = mt0; j < mt1; ++j)
    for (int c = 0; c < 16; ++c) {
      const int64_t m = 16 * j + c;
      for (int64_t s = 0; s < ns_n; ++s)
        _mm512_store_si512(out + (j * ns_n + s) * kTileElems + c * 32,
                           m < M ? _mm512_loadu_si512(g + m * N + 32 * s) : _mm512_setzero_si512());
    }
}

}  // namespace
