// qlora-ds: torch binding of the CUDA quant kernels (csrc/quant_cuda_impl.cu). Same seven functions, names and
// arguments as the CPU module and qlora_ds/ops/reference.py; outputs preallocated, every function returns None.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <initializer_list>
#include <string>

#include "quant_cuda.h"

namespace {

void check_1d(const torch::Tensor& t, const char* name, c10::optional<at::ScalarType> dtype = c10::nullopt) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), name, " must be 1-D and contiguous, got shape ", t.sizes());
  if (dtype) TORCH_CHECK(t.scalar_type() == *dtype, name, " must be ", *dtype, ", got ", t.scalar_type());
}

int dtype_code(const torch::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return qlora_ds::kOutF32;
    case at::kBFloat16: return qlora_ds::kOutBF16;
    case at::kHalf: return qlora_ds::kOutF16;
    default: TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return -1;
}

struct Arg {
  const char* name;
  const torch::Tensor& t;
};

// Every tensor of one call on the first one's GPU (the kernel runs there; a pointer into another GPU would fault).
void check_same_device(std::initializer_list<Arg> args) {
  const Arg& first = *args.begin();
  for (const Arg& a : args)
    TORCH_CHECK(a.t.device() == first.t.device(), "all tensor arguments must be on one device: ", a.name, " is on ",
                a.t.device(), " but ", first.name, " is on ", first.t.device(), "; move them to one GPU");
}

int64_t nblocks_of(int64_t n, int64_t bs) { return (n + bs - 1) / bs; }

void check_launch(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "qlora_ds CUDA kernel: ", cudaGetErrorString(err)); }

void check_dequant_4bit(const torch::Tensor& packed, const torch::Tensor& code, int64_t bs, const torch::Tensor& out,
                        int64_t nblocks_have) {
  check_1d(packed, "packed", at::kByte);
  check_1d(code, "code", at::kFloat);
  check_1d(out, "out");
  TORCH_CHECK(bs > 0 && bs % 2 == 0, "blocksize must be a positive even number, got ", bs);
  TORCH_CHECK(code.numel() == 16, "code must have 16 entries");
  const int64_t n = out.numel();
  TORCH_CHECK(packed.numel() == (n + 1) / 2, "packed must have (out.numel()+1)//2 bytes");
  TORCH_CHECK(nblocks_have == nblocks_of(n, bs), "absmax must have ceil(n/blocksize) entries");
}

}  // namespace

void quantize_4bit(torch::Tensor x, torch::Tensor bounds, torch::Tensor order, int64_t blocksize,
                   torch::Tensor packed_out, torch::Tensor absmax_out) {
  check_1d(x, "x");
  check_1d(bounds, "bounds", at::kFloat);
  check_1d(order, "order", at::kByte);
  check_1d(packed_out, "packed_out", at::kByte);
  check_1d(absmax_out, "absmax_out", at::kFloat);
  check_same_device({{"x", x}, {"bounds", bounds}, {"order", order}, {"packed_out", packed_out},
                     {"absmax_out", absmax_out}});
  TORCH_CHECK(blocksize > 0 && blocksize % 2 == 0, "blocksize must be a positive even number, got ", blocksize);
  const int64_t n = x.numel();
  TORCH_CHECK(bounds.numel() == 15 && order.numel() == 16, "bounds must have 15 and order 16 entries");
  TORCH_CHECK(packed_out.numel() == (n + 1) / 2, "packed_out must have (n+1)//2 bytes");
  TORCH_CHECK(absmax_out.numel() == nblocks_of(n, blocksize), "absmax_out must have ceil(n/blocksize) entries");
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(qlora_ds::launch_quantize_4bit(x.data_ptr(), dtype_code(x, "x"), n, bounds.data_ptr<float>(),
                                              order.data_ptr<uint8_t>(), blocksize, packed_out.data_ptr<uint8_t>(),
                                              absmax_out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
}

void dequantize_4bit(torch::Tensor packed, torch::Tensor absmax, torch::Tensor code, int64_t blocksize,
                     torch::Tensor out) {
  check_1d(absmax, "absmax", at::kFloat);
  check_dequant_4bit(packed, code, blocksize, out, absmax.numel());
  check_same_device({{"out", out}, {"packed", packed}, {"absmax", absmax}, {"code", code}});
  const c10::cuda::CUDAGuard guard(out.device());
  check_launch(qlora_ds::launch_dequantize_4bit(packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), nullptr,
                                                nullptr, nullptr, 1, 0.0f, code.data_ptr<float>(), blocksize,
                                                out.data_ptr(), dtype_code(out, "out"), out.numel(),
                                                c10::cuda::getCurrentCUDAStream()));
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
  check_same_device({{"out", out}, {"packed", packed}, {"qabsmax", qabsmax}, {"absmax2", absmax2}, {"code8", code8},
                     {"code", code}});
  const c10::cuda::CUDAGuard guard(out.device());
  check_launch(qlora_ds::launch_dequantize_4bit(
      packed.data_ptr<uint8_t>(), nullptr, qabsmax.data_ptr<uint8_t>(), absmax2.data_ptr<float>(),
      code8.data_ptr<float>(), nested_blocksize, static_cast<float>(offset), code.data_ptr<float>(), blocksize,
      out.data_ptr(), dtype_code(out, "out"), out.numel(), c10::cuda::getCurrentCUDAStream()));
}

void quantize_8bit_blockwise(torch::Tensor x, torch::Tensor code8, torch::Tensor bounds8, int64_t blocksize,
                             torch::Tensor q_out, torch::Tensor absmax_out) {
  check_1d(x, "x", at::kFloat);
  check_1d(code8, "code8", at::kFloat);
  check_1d(bounds8, "bounds8", at::kFloat);
  check_1d(q_out, "q_out", at::kByte);
  check_1d(absmax_out, "absmax_out", at::kFloat);
  check_same_device({{"x", x}, {"code8", code8}, {"bounds8", bounds8}, {"q_out", q_out}, {"absmax_out", absmax_out}});
  TORCH_CHECK(blocksize > 0, "blocksize must be positive, got ", blocksize);
  TORCH_CHECK(code8.numel() == 256 && bounds8.numel() == 255, "code8 must have 256 and bounds8 255 entries");
  const int64_t n = x.numel();
  TORCH_CHECK(q_out.numel() == n, "q_out must have n entries");
  TORCH_CHECK(absmax_out.numel() == nblocks_of(n, blocksize), "absmax_out must have ceil(n/blocksize) entries");
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(qlora_ds::launch_quantize_8bit_blockwise(x.data_ptr<float>(), n, bounds8.data_ptr<float>(), blocksize,
                                                        q_out.data_ptr<uint8_t>(), absmax_out.data_ptr<float>(),
                                                        c10::cuda::getCurrentCUDAStream()));
}

void dequantize_8bit_blockwise(torch::Tensor q, torch::Tensor absmax, torch::Tensor code8, int64_t blocksize,
                               double offset, torch::Tensor out) {
  check_1d(q, "q", at::kByte);
  check_1d(absmax, "absmax", at::kFloat);
  check_1d(code8, "code8", at::kFloat);
  check_1d(out, "out", at::kFloat);
  check_same_device({{"out", out}, {"q", q}, {"absmax", absmax}, {"code8", code8}});
  TORCH_CHECK(blocksize > 0, "blocksize must be positive, got ", blocksize);
  TORCH_CHECK(code8.numel() == 256, "code8 must have 256 entries");
  const int64_t n = out.numel();
  TORCH_CHECK(q.numel() == n, "q and out must have the same number of elements");
  TORCH_CHECK(absmax.numel() == nblocks_of(n, blocksize), "absmax must have ceil(n/blocksize) entries");
  const c10::cuda::CUDAGuard guard(out.device());
  check_launch(qlora_ds::launch_dequantize_8bit_blockwise(q.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                                                          code8.data_ptr<float>(), blocksize,
                                                          static_cast<float>(offset), out.data_ptr<float>(), n,
                                                          c10::cuda::getCurrentCUDAStream()));
}

static void check_intn(int64_t bits, int64_t gs, int64_t in_features, int64_t n) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4, "bits must be 2, 3 or 4, got ", bits);
  TORCH_CHECK(gs > 0 && gs % 8 == 0, "group_size must be a positive multiple of 8, got ", gs);
  TORCH_CHECK(in_features > 0 && in_features % gs == 0, "in_features (", in_features,
              ") must be a positive multiple of group_size (", gs, ")");
  TORCH_CHECK(n % in_features == 0, "the weight's ", n, " elements are not rows of in_features = ", in_features);
}

void quantize_intn(torch::Tensor w, int64_t bits, int64_t group_size, int64_t in_features, torch::Tensor qweight_out,
                   torch::Tensor scales_out, torch::Tensor zeros_out) {
  check_1d(w, "w");
  check_1d(qweight_out, "qweight_out", at::kByte);
  check_1d(scales_out, "scales_out", at::kFloat);
  check_1d(zeros_out, "zeros_out", at::kFloat);
  check_same_device({{"w", w}, {"qweight_out", qweight_out}, {"scales_out", scales_out}, {"zeros_out", zeros_out}});
  const int64_t n = w.numel();
  check_intn(bits, group_size, in_features, n);
  TORCH_CHECK(qweight_out.numel() == n / 8 * bits, "qweight_out must have n*bits/8 = ", n / 8 * bits, " bytes");
  TORCH_CHECK(scales_out.numel() == n / group_size && zeros_out.numel() == n / group_size,
              "scales_out and zeros_out must have n/group_size = ", n / group_size, " entries");
  const c10::cuda::CUDAGuard guard(w.device());
  check_launch(qlora_ds::launch_quantize_intn(w.data_ptr(), dtype_code(w, "w"), n, static_cast<int>(bits), group_size,
                                              qweight_out.data_ptr<uint8_t>(), scales_out.data_ptr<float>(),
                                              zeros_out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
}

void dequantize_intn(torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros, int64_t bits,
                     int64_t group_size, int64_t in_features, torch::Tensor out) {
  check_1d(qweight, "qweight", at::kByte);
  check_1d(scales, "scales", at::kFloat);
  check_1d(zeros, "zeros", at::kFloat);
  check_1d(out, "out");
  check_same_device({{"out", out}, {"qweight", qweight}, {"scales", scales}, {"zeros", zeros}});
  const int64_t n = out.numel();
  check_intn(bits, group_size, in_features, n);
  TORCH_CHECK(qweight.numel() == n / 8 * bits, "qweight must have out.numel()*bits/8 = ", n / 8 * bits, " bytes");
  TORCH_CHECK(scales.numel() == n / group_size && zeros.numel() == n / group_size,
              "scales and zeros must have out.numel()/group_size = ", n / group_size, " entries");
  const c10::cuda::CUDAGuard guard(out.device());
  check_launch(qlora_ds::launch_dequantize_intn(qweight.data_ptr<uint8_t>(), scales.data_ptr<float>(),
                                                zeros.data_ptr<float>(), static_cast<int>(bits), group_size,
                                                out.data_ptr(), dtype_code(out, "out"), n,
                                                c10::cuda::getCurrentCUDAStream()));
}

// "" when the current device can run this module's kernels, else why not (checked once at load: a prebuilt module
// whose arch list misses the GPU is rebuilt for it instead of failing at the first launch).
std::string kernel_image_error() {
  const cudaError_t err = qlora_ds::kernel_image_status();
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "qlora-ds CUDA kernels for blockwise 4-bit / 8-bit and group-wise INT-N quantization (bit-exact with the "
            "reference)";
  m.def("kernel_image_error", &kernel_image_error, "'' if the current device runs these kernels, else the CUDA error");
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
}
