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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

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

// ---- 8-bit state: dequantize -> update -> requantize, one quantization block at a time ---------------------------
// State codes follow qlora_ds/ops/reference.py bit for bit: value = fl(code[q] * absmax) + 0; a full block stores its
// unclamped absmax and scales by x * fl(1 / max(absmax, 1e-38)), a trailing partial block stores max(absmax, 1e-38)
// and divides; a scaled value (clamped to [-1, 1]) maps to the number of code midpoints strictly below it. So the
// result equals dequantizing the whole state, running adamw_step and requantizing, without the 8 B/param fp32
// temporaries: the scratch is two blocks per thread.

namespace {

constexpr float kTiny = 1e-38f;

inline uint8_t nearest_code(float s, const float* bounds) {  // bounds: 255 sorted midpoints
    int pos = 0;
    for (int step = 128; step > 0; step >>= 1) pos += (bounds[pos + step - 1] < s) ? step : 0;
    return static_cast<uint8_t>(pos);
}

// Requantize x[0..len) into q, returning the absmax to store.
inline float requantize_block(const float* x, int64_t len, bool partial, const float* bounds, uint8_t* q) {
    float amax = 0.0f;
    for (int64_t i = 0; i < len; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float div = std::max(amax, kTiny);
    const float inv = 1.0f / div;
    for (int64_t i = 0; i < len; ++i) {
        const float s = partial ? x[i] / div : x[i] * inv;
        q[i] = nearest_code(std::min(std::max(s, -1.0f), 1.0f), bounds);
    }
    return partial ? div : amax;
}

void check_table(const torch::Tensor& t, const char* name, int64_t n) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.numel() == n,
                name, " must be a contiguous CPU float32 tensor of ", n, " entries");
}

void check_codes(const torch::Tensor& t, const char* name, int64_t n) {
    TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
    TORCH_CHECK(t.scalar_type() == torch::kUInt8, name, " must be uint8, got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous() && t.numel() == n, name, " must be contiguous with ", n, " elements");
}

}  // namespace

void adamw8bit_step(torch::Tensor param, torch::Tensor grad, torch::Tensor qm, torch::Tensor absmax_m,
                    torch::Tensor qv, torch::Tensor absmax_v, torch::Tensor code_m, torch::Tensor bounds_m,
                    torch::Tensor code_v, torch::Tensor bounds_v, int64_t blocksize, double lr, double beta1,
                    double beta2, double eps, double weight_decay, int64_t step) {
    const int64_t n = param.numel();
    TORCH_CHECK(blocksize >= 1, "blocksize must be positive, got ", blocksize);
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    check_fp32(param, "param", n);
    check_fp32(grad, "grad", n);
    check_codes(qm, "exp_avg", n);
    check_codes(qv, "exp_avg_sq", n);
    check_fp32(absmax_m, "exp_avg_absmax", nblocks);
    check_fp32(absmax_v, "exp_avg_sq_absmax", nblocks);
    check_table(code_m, "code_m", 256);
    check_table(code_v, "code_v", 256);
    check_table(bounds_m, "bounds_m", 255);
    check_table(bounds_v, "bounds_v", 255);
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
    uint8_t* __restrict__ qmp = qm.data_ptr<uint8_t>();
    uint8_t* __restrict__ qvp = qv.data_ptr<uint8_t>();
    float* __restrict__ am = absmax_m.data_ptr<float>();
    float* __restrict__ av = absmax_v.data_ptr<float>();
    const float* cm = code_m.data_ptr<float>();
    const float* cv = code_v.data_ptr<float>();
    const float* bm = bounds_m.data_ptr<float>();
    const float* bv = bounds_v.data_ptr<float>();

#pragma omp parallel if (n > 32768)
    {
        std::vector<float> ms(static_cast<size_t>(blocksize)), vs(static_cast<size_t>(blocksize));
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nblocks; ++b) {
            const int64_t start = b * blocksize;
            const int64_t len = std::min(blocksize, n - start);
            const float a_m = am[b], a_v = av[b];
            for (int64_t i = 0; i < len; ++i) {
                const int64_t e = start + i;
                float pi = p[e];
                if (decay) pi = pi * decay_f;
                const float gi = g[e];
                const float mi = cm[qmp[e]] * a_m + 0.0f;
                const float vo = cv[qvp[e]] * a_v + 0.0f;
                const float mn = std::fmaf(coeff, gi - mi, w_small ? mi : gi);
                const float vi = std::fmaf(omb2_f * gi, gi, vo * beta2_f);
                const float den = std::sqrt(vi) / bc2_sqrt + eps_f;
                p[e] = pi + (neg_step_size * mn) / den;
                ms[i] = mn;
                vs[i] = vi;
            }
            const bool partial = len < blocksize;
            am[b] = requantize_block(ms.data(), len, partial, bm, qmp + start);
            av[b] = requantize_block(vs.data(), len, partial, bv, qvp + start);
        }
    }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "qlora-ds paged optimizer op (CPU): fused AdamW over fp32 or blockwise 8-bit state";
    m.def("adamw_step", &adamw_step, "fused AdamW step, in place (fp32, contiguous, CPU)",
          py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("lr"),
          py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("step"));
    m.def("adamw8bit_step", &adamw8bit_step,
          "fused AdamW step over blockwise 8-bit state (dequantize, update, requantize per block), in place",
          py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_absmax"), py::arg("exp_avg_sq"),
          py::arg("exp_avg_sq_absmax"), py::arg("code_m"), py::arg("bounds_m"), py::arg("code_v"),
          py::arg("bounds_v"), py::arg("blocksize"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"),
          py::arg("eps"), py::arg("weight_decay"), py::arg("step"));
}
