// Torch binding of the paged-optimizer CUDA op (buildable only against a CUDA build of torch).
//
// managed_empty(numel, dtype, device) returns a tensor over cudaMallocManaged memory whose deleter calls cudaFree;
// prefetch(t, device) moves its pages (device < 0: to the host) on the current stream; adamw_step is the fused
// update (torch.optim.AdamW's CUDA roundings; see paged_optim_impl.cu).
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "paged_optim_cuda.h"

namespace {

void check_cuda(cudaError_t err, const char* what) {
    TORCH_CHECK(err == cudaSuccess, "qlora_ds paged_optim: ", what, " failed: ", cudaGetErrorString(err));
}

void check_fp32(const torch::Tensor& t, const char* name, int64_t n) {
    TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
    TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, " must be float32, got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
    TORCH_CHECK(t.numel() == n, name, " has ", t.numel(), " elements, expected ", n);
}

}  // namespace

torch::Tensor managed_empty(int64_t numel, torch::ScalarType dtype, int64_t device) {
    TORCH_CHECK(numel >= 0, "numel must be >= 0");
    const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    void* ptr = nullptr;
    check_cuda(qlora_ds::managed_alloc(&ptr, bytes > 0 ? bytes : 1), "cudaMallocManaged");
    auto options = torch::TensorOptions().dtype(dtype).device(torch::kCUDA, static_cast<c10::DeviceIndex>(device));
    return torch::from_blob(ptr, {numel}, [](void* p) { qlora_ds::managed_free(p); }, options);
}

void prefetch(torch::Tensor t, int64_t device) {
    TORCH_CHECK(t.is_cuda(), "prefetch needs a CUDA (managed) tensor");
    const size_t bytes = static_cast<size_t>(t.numel()) * t.element_size();
    auto stream = c10::cuda::getCurrentCUDAStream(t.device().index());
    check_cuda(qlora_ds::managed_prefetch(t.data_ptr(), bytes, static_cast<int>(device), stream.stream()),
               "cudaMemPrefetchAsync");
}

void advise_preferred_host(torch::Tensor t) {
    const size_t bytes = static_cast<size_t>(t.numel()) * t.element_size();
    check_cuda(qlora_ds::managed_advise_preferred_host(t.data_ptr(), bytes), "cudaMemAdvise");
}

void advise_accessed_by(torch::Tensor t, int64_t device) {
    const size_t bytes = static_cast<size_t>(t.numel()) * t.element_size();
    check_cuda(qlora_ds::managed_advise_accessed_by(t.data_ptr(), bytes, static_cast<int>(device)), "cudaMemAdvise");
}

void adamw_step(torch::Tensor param, torch::Tensor grad, torch::Tensor exp_avg, torch::Tensor exp_avg_sq,
                double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step) {
    const int64_t n = param.numel();
    check_fp32(param, "param", n);
    check_fp32(grad, "grad", n);
    check_fp32(exp_avg, "exp_avg", n);
    check_fp32(exp_avg_sq, "exp_avg_sq", n);
    TORCH_CHECK(step >= 1, "step must be >= 1, got ", step);
    c10::cuda::CUDAGuard guard(param.device());
    auto stream = c10::cuda::getCurrentCUDAStream(param.device().index());
    check_cuda(qlora_ds::launch_adamw_fp32(param.data_ptr<float>(), grad.data_ptr<float>(), exp_avg.data_ptr<float>(),
                                           exp_avg_sq.data_ptr<float>(), n, lr, beta1, beta2, eps, weight_decay, step,
                                           stream.stream()),
               "adamw kernel launch");
}

void synchronize() { check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize"); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "qlora-ds paged optimizer op (CUDA): managed memory + fused AdamW";
    m.def("managed_empty", &managed_empty, "tensor over cudaMallocManaged memory", py::arg("numel"), py::arg("dtype"),
          py::arg("device"));
    m.def("prefetch", &prefetch, "cudaMemPrefetchAsync (device < 0: to host)", py::arg("t"), py::arg("device"));
    m.def("advise_preferred_host", &advise_preferred_host, "cudaMemAdvise preferred location = host");
    m.def("advise_accessed_by", &advise_accessed_by, "cudaMemAdvise accessed-by device");
    m.def("adamw_step", &adamw_step, "fused AdamW step, in place (fp32, contiguous, CUDA)", py::arg("param"),
          py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("lr"), py::arg("beta1"),
          py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("step"));
    m.def("synchronize", &synchronize, "cudaDeviceSynchronize");
}
