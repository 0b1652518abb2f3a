// qlora-ds: the fused few-rows linears for decoding, bound in quant_cpu.cpp: 4-bit NF4/FP4 (csrc/quant_cpu_gemv.cpp)
// and group-wise INT-N, QA-LoRA's base weight (csrc/quant_cpu_gemv_intn.cpp).
#pragma once

#include <torch/extension.h>

namespace qlora_ds_cpu {

// y[M,N] = x[M,K] · deq(W)ᵀ (+ bias) straight from the packed NF4/FP4 weight, for token-by-token decoding and tiny
// batches: x fp32 or bf16 (2-D, contiguous), y in x's dtype, fp32 accumulation. W: packed [N*K/2] uint8 + absmax (fp32
// [N*K/bs], or uint8 codes with absmax2 [fp32] and code8 under double quantization) + the 16-entry code table; K must
// be a multiple of blocksize. bias: None, or [N] fp32 / x's dtype. grain_elems: weight elements per task of torch's
// thread pool (0 = the default, kSmallRowsGrain).
torch::Tensor small_rows_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor absmax,
                                c10::optional<torch::Tensor> absmax2, c10::optional<torch::Tensor> code8, double offset,
                                torch::Tensor code4, int64_t blocksize, int64_t nested_blocksize, int64_t N, int64_t K,
                                c10::optional<torch::Tensor> bias, int64_t grain_elems);

// The same for a group-wise INT-N weight (bits 2, 3, 4; qlora_ds/quant/intn.py): qweight [N*K*bits/8] uint8 (each
// row's codes a little-endian bit stream), scales and zeros fp32 [N*K/group_size], w = (q - zero) * scale exactly as
// the INT-N dequantizer computes it. group_size a positive multiple of 8 dividing K.
torch::Tensor small_rows_linear_intn(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros,
                                     int64_t bits, int64_t group_size, int64_t N, int64_t K,
                                     c10::optional<torch::Tensor> bias, int64_t grain_elems);

// TORCH_CHECKs that t is a contiguous CPU tensor of `dtype` with `numel` elements (both kernels' argument checks).
void check_vec(const torch::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel);

}  // namespace qlora_ds_cpu
