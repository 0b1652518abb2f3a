// qlora-ds: the fused NF4/FP4 dequantize + AMX GEMM linear (csrc/quant_cpu_amx.cpp), bound in quant_cpu.cpp.
#pragma once

#include <torch/extension.h>

// The AMX kernels are compiled where the target is x86-64 and the compiler has the AMX intrinsics (GCC >= 11,
// clang >= 12); elsewhere amx_linear_supported() is false and the layers dequantize + matmul as before.
#if (defined(__x86_64__) && ((defined(__clang__) && __clang_major__ >= 12) || \
                             (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)))
#define QLORA_DS_AMX_BUILD 1
#else
#define QLORA_DS_AMX_BUILD 0
#endif

namespace qlora_ds_cpu {

// This CPU runs the fused kernels now: AMX-BF16 + AVX512-BF16 + AVX512-VBMI, tile data permitted by the OS
// (arch_prctl), and the avx512 path active (QLORA_DS_CPU_ISA=avx2 turns them off too).
bool amx_linear_supported();

// y[M,N] = x[M,K] · deq(W)ᵀ, x bf16 contiguous; W as packed [N*K/2] uint8 + absmax (fp32 [N*K/bs], or uint8 codes
// with absmax2 [fp32] and code8 under double quantization) + the 16-entry code table. NB/KC/MB: blocking, 0 = auto.
torch::Tensor nf4_linear_fwd(torch::Tensor x, torch::Tensor packed, torch::Tensor absmax,
                             c10::optional<torch::Tensor> absmax2, c10::optional<torch::Tensor> code8, double offset,
                             torch::Tensor code4, int64_t blocksize, int64_t nested_blocksize, int64_t N, int64_t K,
                             int64_t NB, int64_t KC, int64_t MB);

// grad_x[M,K] = g[M,N] · deq(W), the same weight arguments; KB/NC/MB: blocking, 0 = auto.
torch::Tensor nf4_linear_bwd(torch::Tensor g, torch::Tensor packed, torch::Tensor absmax,
                             c10::optional<torch::Tensor> absmax2, c10::optional<torch::Tensor> code8, double offset,
                             torch::Tensor code4, int64_t blocksize, int64_t nested_blocksize, int64_t N, int64_t K,
                             int64_t KB, int64_t NC, int64_t MB);

}  // namespace qlora_ds_cpu
