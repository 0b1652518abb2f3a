// qlora-ds: the fused 4-bit x few-rows linear (csrc/quant_cpu_gemv.cpp), bound in quant_cpu.cpp.
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

}  // namespace qlora_ds_cpu
