// qlora-ds: launchers of the CUDA quant kernels (csrc/quant_cuda_impl.cu). Raw device pointers, 1-D data.
// Semantics are those of qlora_ds/ops/reference.py, bit for bit. out_dtype: 0 = fp32, 1 = bf16, 2 = fp16.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace qlora_ds {

enum OutDType : int { kOutF32 = 0, kOutBF16 = 1, kOutF16 = 2 };

// x_dtype as OutDType (the input of quantize may be fp32, bf16 or fp16).
cudaError_t launch_quantize_4bit(const void* x, int x_dtype, int64_t n, const float* bounds, const uint8_t* order,
                                 int64_t blocksize, uint8_t* packed_out, float* absmax_out, cudaStream_t stream);

// qabsmax == nullptr: plain absmax[b]; otherwise absmax[b] = fl(fl(code8[qabsmax[b]] * absmax2[b / nested]) + offset).
cudaError_t launch_dequantize_4bit(const uint8_t* packed, const float* absmax, const uint8_t* qabsmax,
                                   const float* absmax2, const float* code8, int64_t nested_blocksize, float offset,
                                   const float* code, int64_t blocksize, void* out, int out_dtype, int64_t n,
                                   cudaStream_t stream);

cudaError_t launch_quantize_8bit_blockwise(const float* x, int64_t n, const float* bounds8, int64_t blocksize,
                                           uint8_t* q_out, float* absmax_out, cudaStream_t stream);

cudaError_t launch_dequantize_8bit_blockwise(const uint8_t* q, const float* absmax, const float* code8,
                                             int64_t blocksize, float offset, float* out, int64_t n,
                                             cudaStream_t stream);

// Group-wise INT-N (bits 2/3/4, group_size % 8 == 0, n % group_size == 0): codes as one little-endian bit stream.
cudaError_t launch_quantize_intn(const void* w, int w_dtype, int64_t n, int bits, int64_t group_size,
                                 uint8_t* qweight_out, float* scales_out, float* zeros_out, cudaStream_t stream);

cudaError_t launch_dequantize_intn(const uint8_t* qweight, const float* scales, const float* zeros, int bits,
                                   int64_t group_size, void* out, int out_dtype, int64_t n, cudaStream_t stream);

// Whether this module holds code the current device can run (SASS for its arch, or PTX it can JIT): cudaSuccess, or
// the error every launch would give (cudaErrorNoKernelImageForDevice for a build whose arch list misses the GPU).
cudaError_t kernel_image_status();

}  // namespace qlora_ds
