// qlora-ds: C++/OpenMP kernels for the blockwise 4-bit (NF4/FP4) and 8-bit quant ops and the group-wise
// INT-N (QA-LoRA) format.
//
// Backend interface (identical to qlora_ds/ops/reference.py and the CUDA module): every tensor is 1-D,
// contiguous and on the CPU, outputs are preallocated by the caller, and every function returns None.
// Results are bit-exact with the reference (= bitsandbytes' default backend): build without fast-math
// and with -ffp-contract=off.
#include <torch/extension.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <string>

#include "lora_dropout_cpu.h"
#include "quant_cpu_amx.h"
#include "quant_cpu_gemv.h"
#include "quant_cpu_impl.h"

namespace {

// ---- argument checks ----------------------------------------------------------------------------

void check_1d(const torch::Tensor& t, const char* name, c10::optional<at::ScalarType> dtype = c10::nullopt) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), name, " must be 1-D and contiguous, got shape ", t.sizes());
  if (dtype) TORCH_CHECK(t.scalar_type() == *dtype, name, " must be ", *dtype, ", got ", t.scalar_type());
}

int64_t nblocks_of(int64_t n, int64_t bs) { return (n + bs - 1) / bs; }

void check_blocksize_4bit(int64_t bs) {
  TORCH_CHECK(bs > 0 && bs % 2 == 0, "blocksize must be a positive even number, got ", bs);
}

}  // namespace

// ---- the seven backend functions -----------------------------------------------------------------

void quantize_4bit(torch::Tensor x, torch::Tensor bounds, torch::Tensor order, int64_t blocksize,
                   torch::Tensor packed_out, torch::Tensor absmax_out) {
  check_1d(x, "x");
  check_1d(bounds, "bounds", at::kFloat);
  check_1d(order, "order", at::kByte);
  check_1d(packed_out, "packed_out", at::kByte);
  check_1d(absmax_out, "absmax_out", at::kFloat);
  check_blocksize_4bit(blocksize);
  const int64_t n = x.numel();
  TORCH_CHECK(bounds.numel() == 15 && order.numel() == 16, "bounds must have 15 and order 16 entries");
  TORCH_CHECK(packed_out.numel() == (n + 1) / 2, "packed_out must have (n+1)//2 = ", (n + 1) / 2, " bytes");
  TORCH_CHECK(absmax_out.numel() == nblocks_of(n, blocksize), "absmax_out must have ceil(n/blocksize) entries");
  const float* bnd = bounds.data_ptr<float>();
  const uint8_t* ord = order.data_ptr<uint8_t>();
  uint8_t* pk = packed_out.data_ptr<uint8_t>();
  float* am = absmax_out.data_ptr<float>();
  switch (x.scalar_type()) {
    case at::kFloat: quantize_4bit_impl(x.data_ptr<float>(), n, bnd, ord, blocksize, pk, am); break;
    case at::kBFloat16:
      quantize_4bit_impl(x.data_ptr<c10::BFloat16>(), n, bnd, ord, blocksize, pk, am);
      break;
    case at::kHalf: quantize_4bit_impl(x.data_ptr<c10::Half>(), n, bnd, ord, blocksize, pk, am); break;
    default: TORCH_CHECK(false, "x must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
}

template <typename AbsmaxFn>
static void dequantize_4bit_dispatch(const torch::Tensor& packed, const torch::Tensor& code, int64_t bs,
                                     torch::Tensor& out, AbsmaxFn fn) {
  const int64_t n = out.numel();
  const uint8_t* pk = packed.data_ptr<uint8_t>();
  const float* cd = code.data_ptr<float>();
  switch (out.scalar_type()) {
    case at::kFloat: dequantize_4bit_impl(pk, cd, bs, n, out.data_ptr<float>(), fn); break;
    case at::kBFloat16: dequantize_4bit_impl(pk, cd, bs, n, out.data_ptr<c10::BFloat16>(), fn); break;
    case at::kHalf: dequantize_4bit_impl(pk, cd, bs, n, out.data_ptr<c10::Half>(), fn); break;
    default: TORCH_CHECK(false, "out must be float32, bfloat16 or float16, got ", out.scalar_type());
  }
}

static void check_dequant_4bit(const torch::Tensor& packed, const torch::Tensor& code, int64_t bs,
                               const torch::Tensor& out, int64_t nblocks_have) {
  check_1d(packed, "packed", at::kByte);
  check_1d(code, "code", at::kFloat);
  check_1d(out, "out");
  check_blocksize_4bit(bs);
  TORCH_CHECK(code.numel() == 16, "code must have 16 entries");
  const int64_t n = out.numel();
  TORCH_CHECK(packed.numel() == (n + 1) / 2, "packed must have (out.numel()+1)//2 = ", (n + 1) / 2, " bytes");
  TORCH_CHECK(nblocks_have == nblocks_of(n, bs), "absmax must have ceil(n/blocksize) = ", nblocks_of(n, bs),
              " entries, got ", nblocks_have);
}

void dequantize_4bit(torch::Tensor packed, torch::Tensor absmax, torch::Tensor code, int64_t blocksize,
                      torch::Tensor out) {
  check_1d(absmax, "absmax", at::kFloat);
  check_dequant_4bit(packed, code, blocksize, out, absmax.numel());
  const float* am = absmax.data_ptr<float>();
  dequantize_4bit_dispatch(packed, code, blocksize, out, [am](int64_t b0, int64_t b1, float* dst) {
    std::copy(am + b0, am + b1, dst);
  });
}

void dequantize_4bit_dq(torch::Tensor packed, torch::Tensor qabsmax, torch::Tensor absmax2, torch::Tensor code8,
                        int64_t nested_blocksize, double offset, torch::Tensor code, int64_t blocksize,
                        torch::Tensor out) {
  check_1d(qabsmax, "qabsmax", at::kByte);
  check_1d(absmax2, "absmax2", at::kFloat);
  check_1d(code8, "code8", at::kFloat);
  TORCH_CHECK(code8.numel() == 256, "code8 must have 256 entries");
  TORCH_CHECK(nested_blocksize > 0, "nested_blocksize must be positive");
  TORCH_CHECK(absmax2.numel() == nblocks_of(qabsmax.numel(), nested_blocksize),
              "absmax2 must have ceil(qabsmax.numel()/nested_blocksize) entries");
  check_dequant_4bit(packed, code, blocksize, out, qabsmax.numel());
  const uint8_t* qa = qabsmax.data_ptr<uint8_t>();
  const float* a2 = absmax2.data_ptr<float>();
  const float* c8 = code8.data_ptr<float>();
  const float off = static_cast<float>(offset);
  dequantize_4bit_dispatch(packed, code, blocksize, out, [=](int64_t b0, int64_t b1, float* dst) {
    int64_t g = b0 / nested_blocksize, r = b0 - g * nested_blocksize;  // nested block of b, and b's place in it
    for (int64_t b = b0; b < b1; ++b) {
      const float a = c8[qa[b]] * a2[g];  // two separate fp32 roundings
      dst[b - b0] = a + off;
      if (++r == nested_blocksize) r = 0, ++g;
    }
  });
}

void quantize_8bit_blockwise(torch::Tensor x, torch::Tensor code8, torch::Tensor bounds8, int64_t blocksize,
                             torch::Tensor q_out, torch::Tensor absmax_out) {
  check_1d(x, "x", at::kFloat);
  check_1d(code8, "code8", at::kFloat);
  check_1d(bounds8, "bounds8", at::kFloat);
  check_1d(q_out, "q_out", at::kByte);
  check_1d(absmax_out, "absmax_out", at::kFloat);
  TORCH_CHECK(blocksize > 0, "blocksize must be positive, got ", blocksize);
  TORCH_CHECK(code8.numel() == 256 && bounds8.numel() == 255, "code8 must have 256 and bounds8 255 entries");
  const int64_t n = x.numel();
  TORCH_CHECK(q_out.numel() == n, "q_out must have n entries");
  TORCH_CHECK(absmax_out.numel() == nblocks_of(n, blocksize), "absmax_out must have ceil(n/blocksize) entries");
  quantize_8bit_impl(x.data_ptr<float>(), n, bounds8.data_ptr<float>(), blocksize, q_out.data_ptr<uint8_t>(),
                     absmax_out.data_ptr<float>());
}

void dequantize_8bit_blockwise(torch::Tensor q, torch::Tensor absmax, torch::Tensor code8, int64_t blocksize,
                               double offset, torch::Tensor out) {
  check_1d(q, "q", at::kByte);
  check_1d(absmax, "absmax", at::kFloat);
  check_1d(code8, "code8", at::kFloat);
  check_1d(out, "out", at::kFloat);
  TORCH_CHECK(blocksize > 0, "blocksize must be positive, got ", blocksize);
  TORCH_CHECK(code8.numel() == 256, "code8 must have 256 entries");
  const int64_t n = out.numel();
  TORCH_CHECK(q.numel() == n, "q and out must have the same number of elements");
  TORCH_CHECK(absmax.numel() == nblocks_of(n, blocksize), "absmax must have ceil(n/blocksize) entries");
  dequantize_8bit_impl(q.data_ptr<uint8_t>(), absmax.data_ptr<float>(), code8.data_ptr<float>(), blocksize,
                       static_cast<float>(offset), n, out.data_ptr<float>());
}

static void check_intn(int64_t bits, int64_t gs, int64_t in_features, int64_t n) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4, "bits must be 2, 3 or 4, got ", bits);
  TORCH_CHECK(gs > 0 && gs % 8 == 0, "group_size must be a positive multiple of 8, got ", gs);
  TORCH_CHECK(in_features > 0 && in_features % gs == 0, "in_features (", in_features,
              ") must be a positive multiple of group_size (", gs, ")");
  TORCH_CHECK(n % in_features == 0, "the weight's ", n, " elements are not rows of in_features = ", in_features);
}

template <typename F>
static void with_bits(int64_t bits, const F& f) {
  switch (bits) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

void quantize_intn(torch::Tensor w, int64_t bits, int64_t group_size, int64_t in_features, torch::Tensor qweight_out,
                   torch::Tensor scales_out, torch::Tensor zeros_out) {
  check_1d(w, "w");
  check_1d(qweight_out, "qweight_out", at::kByte);
  check_1d(scales_out, "scales_out", at::kFloat);
  check_1d(zeros_out, "zeros_out", at::kFloat);
  const int64_t n = w.numel();
  check_intn(bits, group_size, in_features, n);
  TORCH_CHECK(qweight_out.numel() == n / 8 * bits, "qweight_out must have n*bits/8 = ", n / 8 * bits, " bytes");
  TORCH_CHECK(scales_out.numel() == n / group_size && zeros_out.numel() == n / group_size,
              "scales_out and zeros_out must have n/group_size = ", n / group_size, " entries");
  uint8_t* qw = qweight_out.data_ptr<uint8_t>();
  float* sc = scales_out.data_ptr<float>();
  float* zr = zeros_out.data_ptr<float>();
  with_bits(bits, [&](auto nb) {
    constexpr int N = decltype(nb)::value;
    switch (w.scalar_type()) {
      case at::kFloat: quantize_intn_impl<N>(w.data_ptr<float>(), n, group_size, qw, sc, zr); break;
      case at::kBFloat16: quantize_intn_impl<N>(w.data_ptr<c10::BFloat16>(), n, group_size, qw, sc, zr); break;
      case at::kHalf: quantize_intn_impl<N>(w.data_ptr<c10::Half>(), n, group_size, qw, sc, zr); break;
      default: TORCH_CHECK(false, "w must be float32, bfloat16 or float16, got ", w.scalar_type());
    }
  });
}

void dequantize_intn(torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros, int64_t bits,
                     int64_t group_size, int64_t in_features, torch::Tensor out) {
  check_1d(qweight, "qweight", at::kByte);
  check_1d(scales, "scales", at::kFloat);
  check_1d(zeros, "zeros", at::kFloat);
  check_1d(out, "out");
  const int64_t n = out.numel();
  check_intn(bits, group_size, in_features, n);
  TORCH_CHECK(qweight.numel() == n / 8 * bits, "qweight must have out.numel()*bits/8 = ", n / 8 * bits, " bytes");
  TORCH_CHECK(scales.numel() == n / group_size && zeros.numel() == n / group_size,
              "scales and zeros must have out.numel()/group_size = ", n / group_size, " entries");
  const uint8_t* qw = qweight.data_ptr<uint8_t>();
  const float* sc = scales.data_ptr<float>();
  const float* zr = zeros.data_ptr<float>();
  with_bits(bits, [&](auto nb) {
    constexpr int N = decltype(nb)::value;
    switch (out.scalar_type()) {
      case at::kFloat: dequantize_intn_impl<N>(qw, sc, zr, group_size, n, out.data_ptr<float>()); break;
      case at::kBFloat16: dequantize_intn_impl<N>(qw, sc, zr, group_size, n, out.data_ptr<c10::BFloat16>()); break;
      case at::kHalf: dequantize_intn_impl<N>(qw, sc, zr, group_size, n, out.data_ptr<c10::Half>()); break;
      default: TORCH_CHECK(false, "out must be float32, bfloat16 or float16, got ", out.scalar_type());
    }
  });
}

// ---- which SIMD path runs (quant_cpu_isa.h) ----------------------------------------------------------

std::string cpu_isa() { return qlora_ds_cpu::isa_name(qlora_ds_cpu::active_isa()); }

void set_cpu_isa(const std::string& name) {
  const auto have = qlora_ds_cpu::supported_isa_names();
  std::string list;
  for (const auto& s : have) list += (list.empty() ? "" : ", ") + s;
  TORCH_CHECK(qlora_ds_cpu::set_isa_by_name(name), "CPU kernel path '", name,
              "' is unknown or not supported by this CPU; this CPU supports: auto, ", list);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "qlora-ds CPU kernels for blockwise 4-bit / 8-bit and group-wise INT-N quantization (bit-exact with "
            "the reference)";
  m.def("quantize_4bit", &quantize_4bit, "quantize_4bit(x, bounds, order, blocksize, packed_out, absmax_out)");
  m.def("dequantize_4bit", &dequantize_4bit, "dequantize_4bit(packed, absmax, code, blocksize, out)");
  m.def("dequantize_4bit_dq", &dequantize_4bit_dq,
        "dequantize_4bit_dq(packed, qabsmax, absmax2, code8, nested_blocksize, offset, code, blocksize, out)");
  m.def("quantize_8bit_blockwise", &quantize_8bit_blockwise,
        "quantize_8bit_blockwise(x, code8, bounds8, blocksize, q_out, absmax_out)");
  m.def("dequantize_8bit_blockwise", &dequantize_8bit_blockwise,
        "dequantize_8bit_blockwise(q, absmax, code8, blocksize, offset, out)");
  m.def("quantize_intn", &quantize_intn,
        "quantize_intn(w, bits, group_size, in_features, qweight_out, scales_out, zeros_out)");
  m.def("dequantize_intn", &dequantize_intn,
        "dequantize_intn(qweight, scales, zeros, bits, group_size, in_features, out)");
  m.def("cpu_isa", &cpu_isa, "the SIMD path the kernels take now: 'avx512', 'avx2' or 'scalar'");
  m.def("set_cpu_isa", &set_cpu_isa, "set_cpu_isa(name): 'auto' (the widest this CPU has), 'avx512', 'avx2' or "
        "'scalar'; raises for a path this CPU cannot run");
  m.def("supported_cpu_isas", &qlora_ds_cpu::supported_isa_names, "the paths this CPU can run, widest first");
  // the fused dequantize + AMX GEMM linear (quant_cpu_amx.cpp): not part of the seven-function backend interface
  m.def("amx_linear_supported", &qlora_ds_cpu::amx_linear_supported, "whether nf4_linear_fwd/bwd run on this CPU now");
  m.def("nf4_linear_fwd", &qlora_ds_cpu::nf4_linear_fwd, "y = x · deq(W)ᵀ (fused 4-bit dequantize + AMX GEMM)",
        py::arg("x"), py::arg("packed"), py::arg("absmax"), py::arg("absmax2"), py::arg("code8"), py::arg("offset"),
        py::arg("code4"), py::arg("blocksize"), py::arg("nested_blocksize"), py::arg("N"), py::arg("K"),
        py::arg("NB") = 0, py::arg("KC") = 0, py::arg("MB") = 0);
  m.def("nf4_linear_bwd", &qlora_ds_cpu::nf4_linear_bwd, "grad_x = g · deq(W) (fused 4-bit dequantize + AMX GEMM)",
        py::arg("g"), py::arg("packed"), py::arg("absmax"), py::arg("absmax2"), py::arg("code8"), py::arg("offset"),
        py::arg("code4"), py::arg("blocksize"), py::arg("nested_blocksize"), py::arg("N"), py::arg("K"),
        py::arg("KB") = 0, py::arg("NC") = 0, py::arg("MB") = 0);
  // the fused 4-bit x few-rows linear for decoding (quant_cpu_gemv.cpp): every SIMD path, no AMX needed
  m.def("small_rows_linear", &qlora_ds_cpu::small_rows_linear, "y = x · deq(W)ᵀ (+ bias) for a few rows of fp32/bf16 "
        "x, straight from the packed 4-bit weight (K % blocksize == 0)", py::arg("x"), py::arg("packed"),
        py::arg("absmax"), py::arg("absmax2"), py::arg("code8"), py::arg("offset"), py::arg("code4"),
        py::arg("blocksize"), py::arg("nested_blocksize"), py::arg("N"), py::arg("K"), py::arg("bias") = py::none(),
        py::arg("grain_elems") = 0);
  m.def("small_rows_linear_intn", &qlora_ds_cpu::small_rows_linear_intn, "y = x · deq(W)ᵀ (+ bias) for a few rows "
        "of fp32/bf16 x, straight from the packed group-wise INT-N weight (bits 2/3/4)", py::arg("x"),
        py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("bits"), py::arg("group_size"), py::arg("N"),
        py::arg("K"), py::arg("bias") = py::none(), py::arg("grain_elems") = 0);
  // LoRA-input dropout with a counter-based mask (lora_dropout_cpu.cpp)
  m.def("hash_dropout", &qlora_ds_cpu::hash_dropout, "y = x * keep(seed, i) / (1 - p): dropout whose mask is a hash "
        "of (seed, element index); the same call on the gradient is its backward", py::arg("x"), py::arg("p"),
        py::arg("seed"));
}
