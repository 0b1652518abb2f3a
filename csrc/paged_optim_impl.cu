// CUDA half of the paged-optimizer op: a fused AdamW kernel over (possibly managed) fp32 buffers and thin wrappers
// over the unified-memory API. Only CUDA headers here, so `nvcc -c -arch=sm_80` works without torch.
// Arithmetic is torch.optim.AdamW's single-tensor path as torch's CUDA kernels compute it (explicit __fmaf_rn
// where nvcc contracts torch's kernels; build with --fmad=false so nothing else is contracted):
//   p   = p * (1 - lr*wd)                       mul_ by a scalar
//   m   = lerp(m, g, 1-beta1)                   fma(w, g-m, m) | fma(-(1-w), g-m, g), as on CPU
//   v   = fma(1-beta2, g*g, v*beta2)            mul_, then addcmul: a + alpha * (b * c)
//   den = sqrt(v) * fl(1/sqrt(bc2)) + eps       a Python-scalar divisor is a reciprocal multiply on CUDA
//   p   = fma(-lr/bc1, m/den, p)                addcdiv: a + alpha * (b / c)
// (csrc/paged_optim_cpu.cpp has torch's CPU forms, which differ.)
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "paged_optim_cuda.h"

namespace qlora_ds {
namespace {

struct AdamWScalars {
    float decay;
    float coeff;
    float beta2;
    float omb2;
    float neg_step_size;
    float inv_bc2_sqrt;
    float eps;
    bool decay_on;
    bool w_small;
};

__global__ void adamw_fp32_kernel(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                  float* __restrict__ v, int64_t n, AdamWScalars s) {
    const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
        float pi = p[i];
        if (s.decay_on) pi = __fmul_rn(pi, s.decay);
        const float gi = g[i];
        const float mi = m[i];
        const float mn = __fmaf_rn(s.coeff, __fsub_rn(gi, mi), s.w_small ? mi : gi);
        const float vi = __fmaf_rn(s.omb2, __fmul_rn(gi, gi), __fmul_rn(v[i], s.beta2));
        const float den = __fadd_rn(__fmul_rn(__fsqrt_rn(vi), s.inv_bc2_sqrt), s.eps);
        pi = __fmaf_rn(s.neg_step_size, __fdiv_rn(mn, den), pi);
        p[i] = pi;
        m[i] = mn;
        v[i] = vi;
    }
}

// 8-bit state (csrc/paged_optim_cpu.cpp states the rules): a thread block loads the code tables once, then takes
// quantization blocks in turn (grid-stride); for each it dequantizes, updates (the arithmetic above) and keeps the new
// moments in shared memory, reduces their absmax, then requantizes:
// the bytes of the unfused dequantize -> adamw_fp32_kernel -> quantize kernels, with no full-size fp32 temporaries.
constexpr int kThreads8 = 256;
constexpr int kBlocksPerSm8 = 8;  // 2048 resident threads per SM on sm_80 / sm_90 at kThreads8 per block
constexpr float kTiny = 1e-38f;

__device__ __forceinline__ float block_max(float v, float* red) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();  // red is reused across calls
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float m = 0.0f;
    for (int w = 0; w < kThreads8 / 32; ++w) m = fmaxf(m, red[w]);
    return m;
}

__device__ __forceinline__ uint8_t nearest_code(float s, const float* bounds) {
    int pos = 0;  // number of the 255 sorted midpoints strictly below s
#pragma unroll
    for (int step = 128; step > 0; step >>= 1) pos += (bounds[pos + step - 1] < s) ? step : 0;
    return static_cast<uint8_t>(pos);
}

__device__ __forceinline__ float scale_of(float x, bool partial, float inv, float div) {
    const float s = partial ? __fdiv_rn(x, div) : __fmul_rn(x, inv);
    return fminf(fmaxf(s, -1.0f), 1.0f);
}

__global__ void adamw_8bit_kernel(float* __restrict__ p, const float* __restrict__ g, uint8_t* __restrict__ qm,
                                  float* __restrict__ am, uint8_t* __restrict__ qv, float* __restrict__ av,
                                  Tables8 t, int64_t n, int64_t bs, AdamWScalars s) {
    extern __shared__ float smem[];  // code_m[256] code_v[256] bounds_m[255] bounds_v[255] | m[bs] v[bs]
    float* code_m = smem;
    float* code_v = smem + 256;
    float* bounds_m = smem + 512;
    float* bounds_v = smem + 767;
    float* ms = smem + 1022;
    float* vs = ms + bs;
    __shared__ float red[kThreads8 / 32];
    for (int k = threadIdx.x; k < 256; k += blockDim.x) {
        code_m[k] = t.code_m[k];
        code_v[k] = t.code_v[k];
        if (k < 255) {
            bounds_m[k] = t.bounds_m[k];
            bounds_v[k] = t.bounds_v[k];
        }
    }
    __syncthreads();
    const int64_t nblocks = (n + bs - 1) / bs;
    for (int64_t b = blockIdx.x; b < nblocks; b += gridDim.x) {
        const int64_t start = b * bs;
        const int64_t len = min(bs, n - start);
        const float a_m = am[b], a_v = av[b];
        float mx_m = 0.0f, mx_v = 0.0f;
        for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
            const int64_t e = start + i;
            float pi = p[e];
            if (s.decay_on) pi = __fmul_rn(pi, s.decay);
            const float gi = g[e];
            const float mi = __fadd_rn(__fmul_rn(code_m[qm[e]], a_m), 0.0f);
            const float vo = __fadd_rn(__fmul_rn(code_v[qv[e]], a_v), 0.0f);
            const float mn = __fmaf_rn(s.coeff, __fsub_rn(gi, mi), s.w_small ? mi : gi);
            const float vi = __fmaf_rn(s.omb2, __fmul_rn(gi, gi), __fmul_rn(vo, s.beta2));
            const float den = __fadd_rn(__fmul_rn(__fsqrt_rn(vi), s.inv_bc2_sqrt), s.eps);
            p[e] = __fmaf_rn(s.neg_step_size, __fdiv_rn(mn, den), pi);
            ms[i] = mn;
            vs[i] = vi;
            mx_m = fmaxf(mx_m, fabsf(mn));
            mx_v = fmaxf(mx_v, fabsf(vi));
        }
        mx_m = block_max(mx_m, red);  // its __syncthreads also publishes ms / vs
        mx_v = block_max(mx_v, red);
        const bool partial = len < bs;
        const float div_m = fmaxf(mx_m, kTiny), div_v = fmaxf(mx_v, kTiny);
        const float inv_m = __fdiv_rn(1.0f, div_m), inv_v = __fdiv_rn(1.0f, div_v);
        if (threadIdx.x == 0) {
            am[b] = partial ? div_m : mx_m;
            av[b] = partial ? div_v : mx_v;
        }
        for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
            qm[start + i] = nearest_code(scale_of(ms[i], partial, inv_m, div_m), bounds_m);
            qv[start + i] = nearest_code(scale_of(vs[i], partial, inv_v, div_v), bounds_v);
        }
        __syncthreads();  // ms / vs are rewritten by the next block
    }
}

AdamWScalars adamw_scalars(double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step) {
    AdamWScalars s;
    s.decay_on = weight_decay != 0.0;
    s.decay = static_cast<float>(1.0 - lr * weight_decay);
    const float w = static_cast<float>(1.0 - beta1);
    s.w_small = fabsf(w) < 0.5f;
    s.coeff = s.w_small ? w : w - 1.0f;
    s.beta2 = static_cast<float>(beta2);
    s.omb2 = static_cast<float>(1.0 - beta2);
    const double bc1 = 1.0 - pow(beta1, static_cast<double>(step));
    const double bc2 = 1.0 - pow(beta2, static_cast<double>(step));
    s.neg_step_size = static_cast<float>(-(lr / bc1));
    s.inv_bc2_sqrt = 1.0f / static_cast<float>(sqrt(bc2));  // on the host in fp32, as torch forms inv_b
    s.eps = static_cast<float>(eps);
    return s;
}

}  // namespace

cudaError_t launch_adamw_8bit(float* param, const float* grad, uint8_t* exp_avg, float* exp_avg_absmax,
                              uint8_t* exp_avg_sq, float* exp_avg_sq_absmax, Tables8 tables, int64_t n,
                              int64_t blocksize, double lr, double beta1, double beta2, double eps,
                              double weight_decay, int64_t step, cudaStream_t stream, int sm_count) {
    if (n <= 0) return cudaSuccess;
    if (blocksize < 1 || blocksize > kMaxBlocksize8) return cudaErrorInvalidValue;
    const size_t shared = (1022 + 2 * static_cast<size_t>(blocksize)) * sizeof(float);  // <= 36.1 KiB
    int64_t blocks = (n + blocksize - 1) / blocksize;
    // a block's table load (4 KB) outweighs one quantization block's state (~2.5 KB at blocksize 256): launch only
    // what the SMs hold at once and let the grid-stride loop over quantization blocks do the rest
    if (sm_count > 0 && blocks > static_cast<int64_t>(sm_count) * kBlocksPerSm8)
        blocks = static_cast<int64_t>(sm_count) * kBlocksPerSm8;
    if (blocks > 65535LL * 8) blocks = 65535LL * 8;
    adamw_8bit_kernel<<<static_cast<unsigned>(blocks), kThreads8, shared, stream>>>(
        param, grad, exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax, tables, n, blocksize,
        adamw_scalars(lr, beta1, beta2, eps, weight_decay, step));
    return cudaGetLastError();
}

cudaError_t launch_adamw_fp32(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, int64_t n,
                              double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step,
                              cudaStream_t stream) {
    if (n <= 0) return cudaSuccess;
    const AdamWScalars s = adamw_scalars(lr, beta1, beta2, eps, weight_decay, step);
    const int threads = 256;
    int64_t blocks = (n + threads - 1) / threads;
    if (blocks > 65535LL * 8) blocks = 65535LL * 8;
    adamw_fp32_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(param, grad, exp_avg, exp_avg_sq, n, s);
    return cudaGetLastError();
}

// A failed runtime call also leaves its error as the thread's "last error", which the next cudaGetLastError returns:
// torch checks every kernel launch that way (C10_CUDA_KERNEL_LAUNCH_CHECK), so after e.g. a refused cudaMallocManaged
// that the caller handles (optim/page_manager.py falls back to plain memory) the next, unrelated torch op would raise
// it. Clear it here, as torch's allocator does after a failed cudaMalloc; sticky errors stay (they cannot be cleared).
static cudaError_t cleared(cudaError_t err) {
    if (err != cudaSuccess) (void)cudaGetLastError();
    return err;
}

cudaError_t optim_kernel_image_status() {
    cudaFuncAttributes attr;
    return cleared(cudaFuncGetAttributes(&attr, adamw_fp32_kernel));
}

cudaError_t concurrent_managed_access(int device, int* supported) {
    *supported = 0;
    return cleared(cudaDeviceGetAttribute(supported, cudaDevAttrConcurrentManagedAccess, device));
}

cudaError_t managed_alloc(void** ptr, size_t bytes) {
    return cleared(cudaMallocManaged(ptr, bytes, cudaMemAttachGlobal));
}

cudaError_t managed_free(void* ptr) { return cleared(cudaFree(ptr)); }

// The cudaMemLocation forms of prefetch/advise: CUDA 12.2 added them as cudaMemPrefetchAsync_v2 / cudaMemAdvise_v2
// beside the device-ordinal forms, which kept the plain names; CUDA 13 removed the ordinal forms and gave the plain
// names the location forms.
#if CUDART_VERSION >= 13000
#define QLORA_DS_MEM_PREFETCH cudaMemPrefetchAsync
#define QLORA_DS_MEM_ADVISE cudaMemAdvise
#elif CUDART_VERSION >= 12020
#define QLORA_DS_MEM_PREFETCH cudaMemPrefetchAsync_v2
#define QLORA_DS_MEM_ADVISE cudaMemAdvise_v2
#endif

#ifdef QLORA_DS_MEM_PREFETCH
static cudaMemLocation location_of(int device) {
    cudaMemLocation loc;
    if (device < 0) {
        loc.type = cudaMemLocationTypeHost;
        loc.id = 0;
    } else {
        loc.type = cudaMemLocationTypeDevice;
        loc.id = device;
    }
    return loc;
}
#endif

cudaError_t managed_prefetch(const void* ptr, size_t bytes, int device, cudaStream_t stream) {
    if (bytes == 0) return cudaSuccess;
#ifdef QLORA_DS_MEM_PREFETCH
    return cleared(QLORA_DS_MEM_PREFETCH(ptr, bytes, location_of(device), 0, stream));
#else
    return cleared(cudaMemPrefetchAsync(ptr, bytes, device < 0 ? cudaCpuDeviceId : device, stream));
#endif
}

cudaError_t managed_advise_preferred_host(const void* ptr, size_t bytes) {
#ifdef QLORA_DS_MEM_ADVISE
    return cleared(QLORA_DS_MEM_ADVISE(ptr, bytes, cudaMemAdviseSetPreferredLocation, location_of(-1)));
#else
    return cleared(cudaMemAdvise(ptr, bytes, cudaMemAdviseSetPreferredLocation, cudaCpuDeviceId));
#endif
}

cudaError_t managed_advise_accessed_by(const void* ptr, size_t bytes, int device) {
#ifdef QLORA_DS_MEM_ADVISE
    return cleared(QLORA_DS_MEM_ADVISE(ptr, bytes, cudaMemAdviseSetAccessedBy, location_of(device)));
#else
    return cleared(cudaMemAdvise(ptr, bytes, cudaMemAdviseSetAccessedBy, device));
#endif
}

}  // namespace qlora_ds
