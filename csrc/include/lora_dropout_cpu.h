// qlora-ds: dropout with a counter-based mask (csrc/lora_dropout_cpu.cpp), bound in quant_cpu.cpp.
#pragma once

#include <torch/extension.h>

namespace qlora_ds_cpu {

// y = x * keep / (1 - p), keep[i] = hash(seed, i) >= p · 2³² (the 32-bit hash of qlora_ds/ops/reference.py's
// dropout_keep). x: contiguous fp32/bf16/fp16 on the CPU, any shape; the same (p, seed) on a gradient of x's shape
// gives dropout's backward. The mask depends only on (seed, i): the same on any thread count or SIMD path.
torch::Tensor hash_dropout(torch::Tensor x, double p, int64_t seed);

}  // namespace qlora_ds_cpu
