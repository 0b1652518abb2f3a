// Launchers of the paged-optimizer CUDA op. The implementation (paged_optim_impl.cu) includes only CUDA headers;
// the torch binding (paged_optim_cuda.cpp) calls these. Every function returns a cudaError_t (cudaSuccess = 0).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace qlora_ds {

// Fused AdamW over fp32 arrays (torch.optim.AdamW's CUDA roundings, see paged_optim_impl.cu), async on `stream`.
cudaError_t launch_adamw_fp32(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, int64_t n,
                              double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step,
                              cudaStream_t stream);

// Fused AdamW over blockwise 8-bit state (dequantize -> update -> requantize per block, bnb's dynamic maps; rules in
// csrc/paged_optim_cpu.cpp). The tables (fp32, on the device): codes of 256 and sorted midpoints of 255 entries of
// the exp_avg (signed) and exp_avg_sq (unsigned) maps. blocksize 1 .. kMaxBlocksize8 (else cudaErrorInvalidValue).
// sm_count: the device's multiprocessors; > 0 caps the grid at a few blocks per SM (each block loads the 4 KB of
// tables once, then loops over quantization blocks), 0 launches one CUDA block per quantization block.
constexpr int64_t kMaxBlocksize8 = 4096;
struct Tables8 {
    const float* code_m;
    const float* bounds_m;
    const float* code_v;
    const float* bounds_v;
};
cudaError_t launch_adamw_8bit(float* param, const float* grad, uint8_t* exp_avg, float* exp_avg_absmax,
                              uint8_t* exp_avg_sq, float* exp_avg_sq_absmax, Tables8 tables, int64_t n,
                              int64_t blocksize, double lr, double beta1, double beta2, double eps,
                              double weight_decay, int64_t step, cudaStream_t stream, int sm_count = 0);

// cudaDevAttrConcurrentManagedAccess of `device` into *supported (0 on WSL2, Windows, some vGPUs: there
// cudaMemPrefetchAsync / cudaMemAdvise fail with cudaErrorInvalidDevice).
cudaError_t concurrent_managed_access(int device, int* supported);

// Whether this module holds code the current device can run (as quant_cuda.h's kernel_image_status).
cudaError_t optim_kernel_image_status();

// Unified (managed) memory: allocate, free, prefetch to a device or to the host, advise.
cudaError_t managed_alloc(void** ptr, size_t bytes);
cudaError_t managed_free(void* ptr);
cudaError_t managed_prefetch(const void* ptr, size_t bytes, int device, cudaStream_t stream);  // device < 0: host
cudaError_t managed_advise_preferred_host(const void* ptr, size_t bytes);
cudaError_t managed_advise_accessed_by(const void* ptr, size_t bytes, int device);

}  // namespace qlora_ds
