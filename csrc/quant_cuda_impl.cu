// qlora-ds: CUDA kernels for blockwise 4-bit (NF4/FP4) and 8-bit quantization and group-wise INT-N (QA-LoRA).
// Only CUDA headers here, so `nvcc -c -arch=sm_80` builds this file without torch. Bit-exact with
// qlora_ds/ops/reference.py: every rounding step uses an explicit _rn intrinsic (never contracted into an FMA),
// and the build uses --fmad=false -ftz=false -prec-div=true (no --use_fast_math).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "quant_cuda.h"

namespace qlora_ds {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr float kTiny = 1e-38f;

__device__ __forceinline__ float load_f32(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load_f32(const __nv_bfloat16* p, int64_t i) {
  return __uint_as_float(static_cast<unsigned>(__bfloat16_as_ushort(p[i])) << 16);  // exact
}
__device__ __forceinline__ float load_f32(const __half* p, int64_t i) { return __half2float(p[i]); }

__device__ __forceinline__ float clamp1(float s) { return fminf(fmaxf(s, -1.0f), 1.0f); }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// One warp per quantization block: absmax by warp reduction, then the scale of the block.
// Returns the value to store as absmax; *inv (full block) or *div (partial block) scale the elements.
template <typename T>
__device__ __forceinline__ float warp_block_scale(const T* x, int64_t start, int64_t len, bool partial, int lane,
                                                  float* inv, float* div) {
  float m = 0.0f;
  for (int64_t i = lane; i < len; i += 32) m = fmaxf(m, fabsf(load_f32(x, start + i)));
  m = warp_max(m);
  if (partial) {
    *div = fmaxf(m, kTiny);
    return *div;
  }
  *inv = __fdiv_rn(1.0f, fmaxf(m, kTiny));
  return m;
}

template <typename T>
__device__ __forceinline__ float scaled(const T* x, int64_t i, bool partial, float inv, float div) {
  const float v = load_f32(x, i);
  return clamp1(partial ? __fdiv_rn(v, div) : __fmul_rn(v, inv));
}

template <typename T>
__global__ void quantize_4bit_kernel(const T* __restrict__ x, int64_t n, const float* __restrict__ bounds,
                                     const uint8_t* __restrict__ order, int64_t bs, uint8_t* __restrict__ packed,
                                     float* __restrict__ absmax) {
  __shared__ float sb[15];
  __shared__ uint8_t so[16];
  if (threadIdx.x < 15) sb[threadIdx.x] = bounds[threadIdx.x];
  if (threadIdx.x < 16) so[threadIdx.x] = order[threadIdx.x];
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t nblocks = (n + bs - 1) / bs;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); b < nblocks;
       b += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t start = b * bs;
    const int64_t len = min(bs, n - start);
    const bool partial = len < bs;
    float inv = 0.0f, div = 1.0f;
    const float stored = warp_block_scale(x, start, len, partial, lane, &inv, &div);
    if (lane == 0) absmax[b] = stored;
    const int64_t nbytes = (len + 1) / 2;
    for (int64_t j = lane; j < nbytes; j += 32) {
      const int64_t e = start + 2 * j;
      const float s0 = scaled(x, e, partial, inv, div);
      const float s1 = (2 * j + 1 < len) ? scaled(x, e + 1, partial, inv, div) : 0.0f;  // odd tail pads code(0)
      int i0 = 0, i1 = 0;
#pragma unroll
      for (int k = 0; k < 15; ++k) {
        i0 += sb[k] < s0;
        i1 += sb[k] < s1;
      }
      packed[e / 2] = static_cast<uint8_t>((so[i0] << 4) | so[i1]);
    }
  }
}

__global__ void quantize_8bit_kernel(const float* __restrict__ x, int64_t n, const float* __restrict__ bounds8,
                                     int64_t bs, uint8_t* __restrict__ q, float* __restrict__ absmax) {
  __shared__ float sb[256];
  for (int k = threadIdx.x; k < 255; k += blockDim.x) sb[k] = bounds8[k];
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t nblocks = (n + bs - 1) / bs;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); b < nblocks;
       b += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t start = b * bs;
    const int64_t len = min(bs, n - start);
    const bool partial = len < bs;
    float inv = 0.0f, div = 1.0f;
    const float stored = warp_block_scale(x, start, len, partial, lane, &inv, &div);
    if (lane == 0) absmax[b] = stored;
    for (int64_t i = lane; i < len; i += 32) {
      const float s = scaled(x, start + i, partial, inv, div);
      int pos = 0;  // number of the 255 sorted bounds strictly below s
#pragma unroll
      for (int step = 128; step > 0; step >>= 1) pos += (sb[pos + step - 1] < s) ? step : 0;
      q[start + i] = static_cast<uint8_t>(pos);
    }
  }
}

// ---- dequantize ---------------------------------------------------------------------------------

struct PlainAbsmax {
  const float* absmax;
  __device__ __forceinline__ float operator()(int64_t b) const { return absmax[b]; }
};
struct NestedAbsmax {  // double quant: two separate fp32 roundings, no FMA
  const uint8_t* q;
  const float* absmax2;
  const float* code8;
  int64_t nested;
  float offset;
  __device__ __forceinline__ float operator()(int64_t b) const {
    return __fadd_rn(__fmul_rn(code8[q[b]], absmax2[b / nested]), offset);
  }
};

template <typename OutT>
struct Store;
template <>
struct Store<float> {
  static __device__ __forceinline__ void vec8(float* o, const float* v) {
    reinterpret_cast<float4*>(o)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(o)[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
  static __device__ __forceinline__ void one(float* o, float v) { *o = v; }
};
__device__ __forceinline__ unsigned bits16(float v, __nv_bfloat16*) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
__device__ __forceinline__ unsigned bits16(float v, __half*) { return __half_as_ushort(__float2half_rn(v)); }
template <typename H>
struct Store16 {
  static __device__ __forceinline__ void vec8(H* o, const float* v) {
    uint4 w;
    w.x = bits16(v[0], (H*)nullptr) | (bits16(v[1], (H*)nullptr) << 16);
    w.y = bits16(v[2], (H*)nullptr) | (bits16(v[3], (H*)nullptr) << 16);
    w.z = bits16(v[4], (H*)nullptr) | (bits16(v[5], (H*)nullptr) << 16);
    w.w = bits16(v[6], (H*)nullptr) | (bits16(v[7], (H*)nullptr) << 16);
    *reinterpret_cast<uint4*>(o) = w;  // one 16-byte store
  }
  static __device__ __forceinline__ void one(H* o, float v) {
    *reinterpret_cast<unsigned short*>(o) = static_cast<unsigned short>(bits16(v, (H*)nullptr));
  }
};
template <>
struct Store<__nv_bfloat16> : Store16<__nv_bfloat16> {};
template <>
struct Store<__half> : Store16<__half> {};

// Each thread expands 4 packed bytes into 8 outputs: one 32-bit load, one 16-byte (bf16/fp16) or two
// 16-byte (fp32) stores on the vector path; the block's absmax is read once per thread (blocksize is even, so a
// byte never straddles blocks, and a thread crosses at most a few block boundaries for tiny blocksizes).
template <typename OutT, typename AbsmaxFn>
__global__ void dequantize_4bit_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ code,
                                       AbsmaxFn absmax_of, int64_t bs, OutT* __restrict__ out, int64_t n,
                                       bool vec_ok) {
  __shared__ float sc[16];
  if (threadIdx.x < 16) sc[threadIdx.x] = code[threadIdx.x];
  __syncthreads();
  const int64_t nbytes = (n + 1) / 2;
  const int64_t nthreads = (nbytes + 3) / 4;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < nthreads;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t byte0 = 4 * t;
    const int64_t e0 = 2 * byte0;
    const bool full = e0 + 8 <= n;
    uint32_t word;
    if (vec_ok && full) {
      word = __ldg(reinterpret_cast<const uint32_t*>(packed) + t);
    } else {
      word = 0;
      for (int j = 0; j < 4 && byte0 + j < nbytes; ++j) word |= static_cast<uint32_t>(packed[byte0 + j]) << (8 * j);
    }
    int64_t blk = e0 / bs;
    int64_t next = (blk + 1) * bs;
    float a = absmax_of(blk);
    float v[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t e = e0 + 2 * j;
      if (e >= next && e < n) {
        blk = e / bs;
        next = (blk + 1) * bs;
        a = absmax_of(blk);
      }
      const unsigned byte = (word >> (8 * j)) & 0xFFu;
      v[2 * j] = __fmul_rn(sc[byte >> 4], a);
      v[2 * j + 1] = __fmul_rn(sc[byte & 0xFu], a);
    }
    if (vec_ok && full) {
      Store<OutT>::vec8(out + e0, v);
    } else {
      for (int j = 0; j < 8 && e0 + j < n; ++j) Store<OutT>::one(out + e0 + j, v[j]);
    }
  }
}

// One warp per quantization block (as the quantizers): the block's absmax is read once, no per-element division.
__global__ void dequantize_8bit_kernel(const uint8_t* __restrict__ q, const float* __restrict__ absmax,
                                       const float* __restrict__ code8, int64_t bs, float offset,
                                       float* __restrict__ out, int64_t n) {
  __shared__ float sc[256];
  for (int k = threadIdx.x; k < 256; k += blockDim.x) sc[k] = code8[k];
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t nblocks = (n + bs - 1) / bs;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); b < nblocks;
       b += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t start = b * bs;
    const int64_t len = min(bs, n - start);
    const float a = absmax[b];
    for (int64_t i = lane; i < len; i += 32) out[start + i] = __fadd_rn(__fmul_rn(sc[q[start + i]], a), offset);
  }
}

unsigned grid_for(int64_t work, int64_t per_block) {
  int64_t g = (work + per_block - 1) / per_block;
  if (g < 1) g = 1;
  if (g > 65535LL * 32) g = 65535LL * 32;  // grid-stride loops cover the rest
  return static_cast<unsigned>(g);
}

template <typename OutT, typename Fn>
void launch_deq(const uint8_t* packed, const float* code, Fn fn, int64_t bs, void* out, int64_t n,
                cudaStream_t stream) {
  const bool vec_ok = (reinterpret_cast<uintptr_t>(packed) % 4 == 0) && (reinterpret_cast<uintptr_t>(out) % 16 == 0);
  const int64_t nthreads = ((n + 1) / 2 + 3) / 4;
  dequantize_4bit_kernel<OutT, Fn><<<grid_for(nthreads, kThreads), kThreads, 0, stream>>>(
      packed, code, fn, bs, static_cast<OutT*>(out), n, vec_ok);
}

template <typename Fn>
void launch_deq_any(const uint8_t* packed, const float* code, Fn fn, int64_t bs, void* out, int out_dtype,
                    int64_t n, cudaStream_t stream) {
  switch (out_dtype) {
    case kOutF32: launch_deq<float>(packed, code, fn, bs, out, n, stream); break;
    case kOutBF16: launch_deq<__nv_bfloat16>(packed, code, fn, bs, out, n, stream); break;
    default: launch_deq<__half>(packed, code, fn, bs, out, n, stream); break;
  }
}

// ---- group-wise INT-N (QA-LoRA) ------------------------------------------------------------------
// The codes of the whole tensor form one little-endian bit stream and every group is gs*N/8 whole bytes, so both
// kernels work on flat groups; a chunk of 8 codes is N bytes.

// torch's clamp(v, 0, maxq): max then min, NaN propagates and -0.0 stays -0.0 (fminf/fmaxf would not).
__device__ __forceinline__ float clamp_q(float v, float maxq) {
  v = 0.0f > v ? 0.0f : v;
  return maxq < v ? maxq : v;
}

// One warp per group: min/max by warp reduction, then each lane quantizes and packs chunks of 8 codes.
template <int N, typename T>
__global__ void quantize_intn_kernel(const T* __restrict__ w, int64_t n, int64_t gs, uint8_t* __restrict__ qweight,
                                     float* __restrict__ scales, float* __restrict__ zeros) {
  constexpr unsigned kMask = (1u << N) - 1;
  constexpr float maxq = static_cast<float>(kMask);
  const int lane = threadIdx.x & 31;
  const int64_t ngroups = n / gs;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); g < ngroups;
       g += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t start = g * gs;
    float mn = load_f32(w, start), mx = mn;
    for (int64_t i = lane; i < gs; i += 32) {
      const float v = load_f32(w, start + i);
      mn = v < mn ? v : mn;
      mx = mx < v ? v : mx;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float a = __shfl_xor_sync(0xffffffffu, mn, o), b = __shfl_xor_sync(0xffffffffu, mx, o);
      mn = a < mn ? a : mn;
      mx = mx < b ? b : mx;
    }
    // the grid spans [min(mn, 0), max(mx, 0)] (GPTQ's rule): the zero is a code. A scale of 0 (an all-zero group,
    // or subnormals whose span underflows or is flushed: zero would be 0/0) takes [-1, 1], as the reference.
    mn = 0.0f < mn ? 0.0f : mn;
    mx = mx < 0.0f ? 0.0f : mx;
    if (__fdiv_rn(__fsub_rn(mx, mn), maxq) == 0.0f) {
      mn = -1.0f;
      mx = 1.0f;
    }
    const float scale = __fdiv_rn(__fsub_rn(mx, mn), maxq);
    const float zero = clamp_q(rintf(__fdiv_rn(-mn, scale)), maxq);  // rintf: round half to even
    if (lane == 0) {
      scales[g] = scale;
      zeros[g] = zero;
    }
    for (int64_t c = lane; c < gs / 8; c += 32) {
      unsigned word = 0;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const float q = clamp_q(rintf(__fadd_rn(__fdiv_rn(load_f32(w, start + 8 * c + k), scale), zero)), maxq);
        word |= (static_cast<unsigned>(static_cast<int>(q)) & kMask) << (N * k);
      }
      uint8_t* dst = qweight + (start / 8 + c) * N;
#pragma unroll
      for (int b = 0; b < N; ++b) dst[b] = static_cast<uint8_t>(word >> (8 * b));
    }
  }
}

// One thread per chunk of 8 codes (N bytes in, 8 values out; a chunk never straddles a group).
template <int N, typename OutT>
__global__ void dequantize_intn_kernel(const uint8_t* __restrict__ qweight, const float* __restrict__ scales,
                                       const float* __restrict__ zeros, int64_t gs, OutT* __restrict__ out,
                                       int64_t n, bool vec_ok) {
  constexpr unsigned kMask = (1u << N) - 1;
  const int64_t nchunks = n / 8;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < nchunks;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint8_t* p = qweight + t * N;
    unsigned word = p[0];
#pragma unroll
    for (int b = 1; b < N; ++b) word |= static_cast<unsigned>(p[b]) << (8 * b);
    const int64_t g = 8 * t / gs;
    const float zero = zeros[g], scale = scales[g];
    float v[8];
#pragma unroll
    for (int k = 0; k < 8; ++k)
      v[k] = __fmul_rn(__fsub_rn(static_cast<float>((word >> (N * k)) & kMask), zero), scale);
    if (vec_ok) {
      Store<OutT>::vec8(out + 8 * t, v);
    } else {
      for (int k = 0; k < 8; ++k) Store<OutT>::one(out + 8 * t + k, v[k]);
    }
  }
}

template <int N>
void launch_quant_intn(const void* w, int w_dtype, int64_t n, int64_t gs, uint8_t* qw, float* sc, float* zr,
                       cudaStream_t stream) {
  const unsigned grid = grid_for(n / gs, kWarps);
  switch (w_dtype) {
    case kOutF32:
      quantize_intn_kernel<N><<<grid, kThreads, 0, stream>>>(static_cast<const float*>(w), n, gs, qw, sc, zr);
      break;
    case kOutBF16:
      quantize_intn_kernel<N><<<grid, kThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(w), n, gs, qw, sc, zr);
      break;
    default:
      quantize_intn_kernel<N><<<grid, kThreads, 0, stream>>>(static_cast<const __half*>(w), n, gs, qw, sc, zr);
      break;
  }
}

template <int N, typename OutT>
void launch_deq_intn(const uint8_t* qw, const float* sc, const float* zr, int64_t gs, void* out, int64_t n,
                     cudaStream_t stream) {
  const bool vec_ok = reinterpret_cast<uintptr_t>(out) % 16 == 0;  // 8 outputs of 2 or 4 bytes per thread
  dequantize_intn_kernel<N, OutT><<<grid_for(n / 8, kThreads), kThreads, 0, stream>>>(
      qw, sc, zr, gs, static_cast<OutT*>(out), n, vec_ok);
}

template <int N>
void launch_deq_intn_any(const uint8_t* qw, const float* sc, const float* zr, int64_t gs, void* out, int out_dtype,
                         int64_t n, cudaStream_t stream) {
  switch (out_dtype) {
    case kOutF32: launch_deq_intn<N, float>(qw, sc, zr, gs, out, n, stream); break;
    case kOutBF16: launch_deq_intn<N, __nv_bfloat16>(qw, sc, zr, gs, out, n, stream); break;
    default: launch_deq_intn<N, __half>(qw, sc, zr, gs, out, n, stream); break;
  }
}

}  // namespace

cudaError_t launch_quantize_4bit(const void* x, int x_dtype, int64_t n, const float* bounds, const uint8_t* order,
                                 int64_t blocksize, uint8_t* packed_out, float* absmax_out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const unsigned grid = grid_for((n + blocksize - 1) / blocksize, kWarps);
  switch (x_dtype) {
    case kOutF32:
      quantize_4bit_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const float*>(x), n, bounds, order, blocksize,
                                                          packed_out, absmax_out);
      break;
    case kOutBF16:
      quantize_4bit_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(x), n, bounds, order,
                                                          blocksize, packed_out, absmax_out);
      break;
    default:
      quantize_4bit_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const __half*>(x), n, bounds, order, blocksize,
                                                          packed_out, absmax_out);
      break;
  }
  return cudaGetLastError();
}

cudaError_t launch_dequantize_4bit(const uint8_t* packed, const float* absmax, const uint8_t* qabsmax,
                                   const float* absmax2, const float* code8, int64_t nested_blocksize, float offset,
                                   const float* code, int64_t blocksize, void* out, int out_dtype, int64_t n,
                                   cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (qabsmax == nullptr) {
    launch_deq_any(packed, code, PlainAbsmax{absmax}, blocksize, out, out_dtype, n, stream);
  } else {
    launch_deq_any(packed, code, NestedAbsmax{qabsmax, absmax2, code8, nested_blocksize, offset}, blocksize, out,
                   out_dtype, n, stream);
  }
  return cudaGetLastError();
}

cudaError_t launch_quantize_8bit_blockwise(const float* x, int64_t n, const float* bounds8, int64_t blocksize,
                                           uint8_t* q_out, float* absmax_out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  quantize_8bit_kernel<<<grid_for((n + blocksize - 1) / blocksize, kWarps), kThreads, 0, stream>>>(
      x, n, bounds8, blocksize, q_out, absmax_out);
  return cudaGetLastError();
}

cudaError_t launch_dequantize_8bit_blockwise(const uint8_t* q, const float* absmax, const float* code8,
                                             int64_t blocksize, float offset, float* out, int64_t n,
                                             cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  dequantize_8bit_kernel<<<grid_for((n + blocksize - 1) / blocksize, kWarps), kThreads, 0, stream>>>(
      q, absmax, code8, blocksize, offset, out, n);
  return cudaGetLastError();
}

cudaError_t launch_quantize_intn(const void* w, int w_dtype, int64_t n, int bits, int64_t group_size,
                                 uint8_t* qweight_out, float* scales_out, float* zeros_out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (bits) {
    case 2: launch_quant_intn<2>(w, w_dtype, n, group_size, qweight_out, scales_out, zeros_out, stream); break;
    case 3: launch_quant_intn<3>(w, w_dtype, n, group_size, qweight_out, scales_out, zeros_out, stream); break;
    case 4: launch_quant_intn<4>(w, w_dtype, n, group_size, qweight_out, scales_out, zeros_out, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_dequantize_intn(const uint8_t* qweight, const float* scales, const float* zeros, int bits,
                                   int64_t group_size, void* out, int out_dtype, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (bits) {
    case 2: launch_deq_intn_any<2>(qweight, scales, zeros, group_size, out, out_dtype, n, stream); break;
    case 3: launch_deq_intn_any<3>(qweight, scales, zeros, group_size, out, out_dtype, n, stream); break;
    case 4: launch_deq_intn_any<4>(qweight, scales, zeros, group_size, out, out_dtype, n, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t kernel_image_status() {
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, quantize_8bit_kernel);  // one fatbinary: one kernel tells
  if (err != cudaSuccess) (void)cudaGetLastError();                           // not sticky: clear it for torch
  return err;
}

}  // namespace qlora_ds
