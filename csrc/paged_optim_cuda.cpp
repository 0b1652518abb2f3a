// Torch binding of the paged-optimizer CUDA op (buildable only against a CUDA build of torch).
//
// managed_empty(numel, dtype, device) returns a tensor over cudaMallocManaged memory whose deleter calls cudaFree;
// prefetch(t, device) moves its pages (device < 0: to the host) on the current stream; adamw_step is the fused
// update (torch.optim.AdamW's CUDA roundings; see paged_optim_impl.cu).
#include <torch/extension.h>

#include <string>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>

#include "paged_optim_cuda.h"

namespace {

void check_cuda(cudaError_t err, const char* what) {
    TORCH_CHECK(err == cudaSuccess, "qlora_ds paged_optim: ", what, " failed: ", cudaGetErrorString(err));
}

void check_fp32(const torch::Tensor& t, const char* name, int64_t n, const torch::Tensor& first) {
    TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
    TORCH_CHECK(t.device() == first.device(), "all tensors must be on one device: ", name, " is on ", t.device(),
                " but param is on ", first.device(), "; move them to one GPU");
    TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, " must be float32, got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
    TORCH_CHECK(t.numel() == n, name, " has ", t.numel(), " elements, expected ", n);
}

int device_index(int64_t device) {
    TORCH_CHECK(device >= 0 && device < c10::cuda::device_count(), "device ", device, " is not a CUDA device (",
                static_cast<int>(c10::cuda::device_count()), " visible)");
    return static_cast<int>(device);
}

void check_managed(const torch::Tensor& t, const char* what) {
    TORCH_CHECK(t.is_cuda(), what, " needs a CUDA (managed) tensor, got one on ", t.device());
}

}  // namespace

bool concurrent_managed_access(int64_t device) {
    int supported = 0;
    check_cuda(qlora_ds::concurrent_managed_access(device_index(device), &supported),
               "cudaDeviceGetAttribute(cudaDevAttrConcurrentManagedAccess)");
    return supported != 0;
}

torch::Tensor managed_empty(int64_t numel, torch::ScalarType dtype, int64_t device) {
    TORCH_CHECK(numel >= 0, "numel must be >= 0");
    const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index(device)));
    void* ptr = nullptr;
    check_cuda(qlora_ds::managed_alloc(&ptr, bytes > 0 ? bytes : 1), "cudaMallocManaged");
    auto options = torch::TensorOptions().dtype(dtype).device(torch::kCUDA, static_cast<c10::DeviceIndex>(device));
    return torch::from_blob(ptr, {numel}, [](void* p) { qlora_ds::managed_free(p); }, options);
}

void prefetch(torch::Tensor t, int64_t device) {
    check_managed(t, "prefetch");
    TORCH_CHECK(device < 0 || device == t.device().index(), "prefetch of a tensor on ", t.device(), " to device ",
                device, ": prefetch to its own GPU or to the host (device < 0)");
    const c10::cuda::CUDAGuard guard(t.device());  // the stream and the call belong to the tensor's GPU
    const size_t bytes = static_cast<size_t>(t.numel()) * t.element_size();
    auto stream = c10::cuda::getCurrentCUDAStream(t.device().index());
    check_cuda(qlora_ds::managed_prefetch(t.data_ptr(), bytes, static_cast<int>(device), stream.stream()),
               "cudaMemPrefetchAsync");
}

void advise_preferred_host(torch::Tensor t) {
    check_managed(t, "advise_preferred_host");
    const c10::cuda::CUDAGuard guard(t.device());
    const size_t bytes = static_cast<size_t>(t.numel()) * t.element_size();
    check_cuda(qlora_ds::managed_advise_preferred_host(t.data_ptr(), bytes), "cudaMemAdvise");
}

void advise_accessed_by(torch::Tensor t, int64_t device) {
    check_managed(t, "advise_accessed_by");
    device_index(device);
    const c10::cuda::CUDAGuard guard(t.device());
    const size_t bytes = static_cast<size_t>(t.numel()) * t.element_size();
    check_cuda(qlora_ds::managed_advise_accessed_by(t.data_ptr(), bytes, static_cast<int>(device)), "cudaMemAdvise");
}

void adamw_step(torch::Tensor param, torch::Tensor grad, torch::Tensor exp_avg, torch::Tensor exp_avg_sq,
                double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step) {
    const int64_t n = param.numel();
    check_fp32(param, "param", n, param);
    check_fp32(grad, "grad", n, param);
    check_fp32(exp_avg, "exp_avg", n, param);
    check_fp32(exp_avg_sq, "exp_avg_sq", n, param);
    TORCH_CHECK(step >= 1, "step must be >= 1, got ", step);
    c10::cuda::CUDAGuard guard(param.device());
    auto stream = c10::cuda::getCurrentCUDAStream(param.device().index());
    check_cuda(qlora_ds::launch_adamw_fp32(param.data_ptr<float>(), grad.data_ptr<float>(), exp_avg.data_ptr<float>(),
                                           exp_avg_sq.data_ptr<float>(), n, lr, beta1, beta2, eps, weight_decay, step,
                                           stream.stream()),
               "adamw kernel launch");
}

void adamw8bit_step(torch::Tensor param, torch::Tensor grad, torch::Tensor qm, torch::Tensor absmax_m,
                    torch::Tensor qv, torch::Tensor absmax_v, torch::Tensor code_m, torch::Tensor bounds_m,
                    torch::Tensor code_v, torch::Tensor bounds_v, int64_t blocksize, double lr, double beta1,
                    double beta2, double eps, double weight_decay, int64_t step) {
    const int64_t n = param.numel();
    TORCH_CHECK(blocksize >= 1 && blocksize <= qlora_ds::kMaxBlocksize8, "blocksize must be in 1..",
                qlora_ds::kMaxBlocksize8, ", got ", blocksize);
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    check_fp32(param, "param", n, param);
    check_fp32(grad, "grad", n, param);
    check_fp32(absmax_m, "exp_avg_absmax", nblocks, param);
    check_fp32(absmax_v, "exp_avg_sq_absmax", nblocks, param);
    check_fp32(code_m, "code_m", 256, param);
    check_fp32(code_v, "code_v", 256, param);
    check_fp32(bounds_m, "bounds_m", 255, param);
    check_fp32(bounds_v, "bounds_v", 255, param);
    for (const auto* t : {&qm, &qv}) {
        TORCH_CHECK(t->is_cuda() && t->device() == param.device(), "8-bit state must be on ", param.device(),
                    ", got ", t->device());
        TORCH_CHECK(t->scalar_type() == torch::kUInt8 && t->is_contiguous() && t->numel() == n,
                    "8-bit state must be contiguous uint8 with ", n, " elements");
    }
    TORCH_CHECK(step >= 1, "step must be >= 1, got ", step);
    c10::cuda::CUDAGuard guard(param.device());
    auto stream = c10::cuda::getCurrentCUDAStream(param.device().index());
    // at::cuda::getCurrentDeviceProperties() gives the same number but its header needs cuBLAS / cuSPARSE headers
    int sm_count = 0;
    check_cuda(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, param.device().index()),
               "cudaDeviceGetAttribute(multiProcessorCount)");
    const qlora_ds::Tables8 tables{code_m.data_ptr<float>(), bounds_m.data_ptr<float>(), code_v.data_ptr<float>(),
                                   bounds_v.data_ptr<float>()};
    check_cuda(qlora_ds::launch_adamw_8bit(param.data_ptr<float>(), grad.data_ptr<float>(), qm.data_ptr<uint8_t>(),
                                           absmax_m.data_ptr<float>(), qv.data_ptr<uint8_t>(),
                                           absmax_v.data_ptr<float>(), tables, n, blocksize, lr, beta1, beta2, eps,
                                           weight_decay, step, stream.stream(), sm_count),
               "adamw 8-bit kernel launch");
}

std::string kernel_image_error() {
    const cudaError_t err = qlora_ds::optim_kernel_image_status();
    return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

void synchronize() { check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize"); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "qlora-ds paged optimizer op (CUDA): managed memory + fused AdamW";
    m.def("concurrent_managed_access", &concurrent_managed_access,
          "cudaDevAttrConcurrentManagedAccess of a device (false: prefetch/advise unsupported)", py::arg("device"));
    m.def("managed_empty", &managed_empty, "tensor over cudaMallocManaged memory", py::arg("numel"), py::arg("dtype"),
          py::arg("device"));
    m.def("prefetch", &prefetch, "cudaMemPrefetchAsync (device < 0: to host)", py::arg("t"), py::arg("device"));
    m.def("advise_preferred_host", &advise_preferred_host, "cudaMemAdvise preferred location = host");
    m.def("advise_accessed_by", &advise_accessed_by, "cudaMemAdvise accessed-by device");
    m.def("adamw_step", &adamw_step, "fused AdamW step, in place (fp32, contiguous, CUDA)", py::arg("param"),
          py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("lr"), py::arg("beta1"),
          py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("step"));
    m.def("adamw8bit_step", &adamw8bit_step,
          "fused AdamW step over blockwise 8-bit state (dequantize, update, requantize per block), in place",
          py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_absmax"), py::arg("exp_avg_sq"),
          py::arg("exp_avg_sq_absmax"), py::arg("code_m"), py::arg("bounds_m"), py::arg("code_v"),
          py::arg("bounds_v"), py::arg("blocksize"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"),
          py::arg("eps"), py::arg("weight_decay"), py::arg("step"));
    m.def("kernel_image_error", &kernel_image_error, "'' if the current device runs these kernels, else the CUDA error");
    m.def("synchronize", &synchronize, "cudaDeviceSynchronize");
}
