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

}  // namespace

cudaError_t launch_adamw_fp32(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, int64_t n,
                              double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step,
                              cudaStream_t stream) {
    if (n <= 0) return cudaSuccess;
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
    const int threads = 256;
    int64_t blocks = (n + threads - 1) / threads;
    if (blocks > 65535LL * 8) blocks = 65535LL * 8;
    adamw_fp32_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(param, grad, exp_avg, exp_avg_sq, n, s);
    return cudaGetLastError();
}

cudaError_t concurrent_managed_access(int device, int* supported) {
    *supported = 0;
    return cudaDeviceGetAttribute(supported, cudaDevAttrConcurrentManagedAccess, device);
}

cudaError_t managed_alloc(void** ptr, size_t bytes) { return cudaMallocManaged(ptr, bytes, cudaMemAttachGlobal); }

cudaError_t managed_free(void* ptr) { return cudaFree(ptr); }

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

cudaError_t managed_prefetch(const void* ptr, size_t bytes, int device, cudaStream_t stream) {
    if (bytes == 0) return cudaSuccess;
#if CUDART_VERSION >= 12020
    return cudaMemPrefetchAsync(ptr, bytes, location_of(device), 0, stream);
#else
    return cudaMemPrefetchAsync(ptr, bytes, device < 0 ? cudaCpuDeviceId : device, stream);
#endif
}

cudaError_t managed_advise_preferred_host(const void* ptr, size_t bytes) {
#if CUDART_VERSION >= 12020
    return cudaMemAdvise(ptr, bytes, cudaMemAdviseSetPreferredLocation, location_of(-1));
#else
    return cudaMemAdvise(ptr, bytes, cudaMemAdviseSetPreferredLocation, cudaCpuDeviceId);
#endif
}

cudaError_t managed_advise_accessed_by(const void* ptr, size_t bytes, int device) {
#if CUDART_VERSION >= 12020
    return cudaMemAdvise(ptr, bytes, cudaMemAdviseSetAccessedBy, location_of(device));
#else
    return cudaMemAdvise(ptr, bytes, cudaMemAdviseSetAccessedBy, device);
#endif
}

}  // namespace qlora_ds
