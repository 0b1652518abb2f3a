// Fused AdamW update for fp32 CPU tensors (OpenMP), the CPU half of the paged-optimizer op.
//
// The arithmetic follows torch.optim.AdamW's single-tensor path (foreach=False) operation by operation, in fp32
// with the same roundings, so results match torch to fp32 rounding:
//   p   = p * (1 - lr*wd)                                   (decoupled weight decay, skipped when wd == 0)
//   m   = lerp(m, g, 1-beta1)                               (torch's vectorized lerp: one fused multiply-add)
//   v   = fma((1-beta2)*g, g, v*beta2)                    (torch's vectorized addcmul)
//   den = sqrt(v) / sqrt(1-beta2^t) + eps
//   p   = p + ((-lr/(1-beta1^t)) * m) / den
// Scalars are formed in double (as Python does) and rounded to fp32 once. Build with -ffp-contract=off.
#include <torch/extension.h>

#include <cmath>
#include <cstdint>

namespace {

void check_fp32(const torch::Tensor& t, const char* name, int64_t n) {
    TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
    TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, " must be float32, got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
    TORCH_CHECK(t.numel() == n, name, " has ", t.numel(), " elements, expected ", n);
}

}  // namespace

void adamw_step(torch::Tensor param, torch::Tensor grad, torch::Tensor exp_avg, torch::Tensor exp_avg_sq,
                double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step) {
    const int64_t n = param.numel();
    check_fp32(param, "param", n);
    check_fp32(grad, "grad", n);
    check_fp32(exp_avg, "exp_avg", n);
    check_fp32(exp_avg_sq, "exp_avg_sq", n);
    TORCH_CHECK(step >= 1, "step must be >= 1, got ", step);

    const bool decay = weight_decay != 0.0;
    const float decay_f = static_cast<float>(1.0 - lr * weight_decay);
    const float w = static_cast<float>(1.0 - beta1);
    const bool w_small = std::fabs(w) < 0.5f;
    const float coeff = w_small ? w : w - 1.0f;
    const float beta2_f = static_cast<float>(beta2);
    const float omb2_f = static_cast<float>(1.0 - beta2);
    const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
    const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
    const float neg_step_size = static_cast<float>(-(lr / bc1));
    const float bc2_sqrt = static_cast<float>(std::sqrt(bc2));
    const float eps_f = static_cast<float>(eps);

    float* __restrict__ p = param.data_ptr<float>();
    const float* __restrict__ g = grad.data_ptr<float>();
    float* __restrict__ m = exp_avg.data_ptr<float>();
    float* __restrict__ v = exp_avg_sq.data_ptr<float>();

#pragma omp parallel for schedule(static) if (n > 32768)
    for (int64_t i = 0; i < n; ++i) {
        float pi = p[i];
        if (decay) pi = pi * decay_f;
        const float gi = g[i];
        const float mi = m[i];
        const float mn = std::fmaf(coeff, gi - mi, w_small ? mi : gi);
        const float vi = std::fmaf(omb2_f * gi, gi, v[i] * beta2_f);
        const float den = std::sqrt(vi) / bc2_sqrt + eps_f;
        pi = pi + (neg_step_size * mn) / den;
        p[i] = pi;
        m[i] = mn;
        v[i] = vi;
    }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "qlora-ds paged optimizer op (CPU): fused AdamW over fp32 param/grad/state";
    m.def("adamw_step", &adamw_step, "fused AdamW step, in place (fp32, contiguous, CPU)",
          py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("lr"),
          py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("step"));
}
