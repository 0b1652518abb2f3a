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
//
// Built for the architecture's baseline (no -march=native: a prebuilt or cached op runs on any CPU of that
// architecture); the loops are compiled once more for AVX2+FMA and AVX-512 and the running CPU picks one at run time
// (quant_cpu_isa.h, QLORA_DS_CPU_ISA). Every path is bit-identical: the fma is explicit, nothing is contracted, and
// vector sqrt/div round like their scalar forms.
#include <torch/extension.h>

#include "quant_cpu_isa.h"

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

// The step's fp32 scalars, formed once per call.
struct AdamConsts {
    bool decay, w_small;
    float decay_f, coeff, beta2_f, omb2_f, neg_step_size, bc2_sqrt, eps_f;

    AdamConsts(double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step) {
        decay = weight_decay != 0.0;
        decay_f = static_cast<float>(1.0 - lr * weight_decay);
        const float w = static_cast<float>(1.0 - beta1);
        w_small = std::fabs(w) < 0.5f;
        coeff = w_small ? w : w - 1.0f;
        beta2_f = static_cast<float>(beta2);
        omb2_f = static_cast<float>(1.0 - beta2);
        const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
        const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
        neg_step_size = static_cast<float>(-(lr / bc1));
        bc2_sqrt = static_cast<float>(std::sqrt(bc2));
        eps_f = static_cast<float>(eps);
    }
};

// One element: updates p in place, returns the new (m, v) through mn / vn.
__attribute__((always_inline)) inline void adam_elem(const AdamConsts& c, float& p, float g, float m, float v,
                                                     float& mn, float& vn) {
    float pi = p;
    if (c.decay) pi = pi * c.decay_f;
    mn = std::fmaf(c.coeff, g - m, c.w_small ? m : g);
    vn = std::fmaf(c.omb2_f * g, g, v * c.beta2_f);
    const float den = std::sqrt(vn) / c.bc2_sqrt + c.eps_f;
    p = pi + (c.neg_step_size * mn) / den;
}

__attribute__((always_inline)) inline void adam_range(const AdamConsts& c, float* __restrict__ p,
                                                      const float* __restrict__ g, float* __restrict__ m,
                                                      float* __restrict__ v, int64_t begin, int64_t end) {
    const AdamConsts k = c;  // a local copy: stores through p/m/v cannot change it, so the loop vectorizes
    for (int64_t i = begin; i < end; ++i) {
        float mn, vn;
        adam_elem(k, p[i], g[i], m[i], v[i], mn, vn);
        m[i] = mn;
        v[i] = vn;
    }
}

using RangeFn = void (*)(const AdamConsts&, float*, const float*, float*, float*, int64_t, int64_t);

void adam_range_scalar(const AdamConsts& c, float* p, const float* g, float* m, float* v, int64_t b, int64_t e) {
    adam_range(c, p, g, m, v, b, e);
}
#if QLORA_DS_X86
QLORA_DS_AVX2 void adam_range_avx2(const AdamConsts& c, float* p, const float* g, float* m, float* v, int64_t b,
                                   int64_t e) {
    adam_range(c, p, g, m, v, b, e);
}
QLORA_DS_AVX512 void adam_range_avx512(const AdamConsts& c, float* p, const float* g, float* m, float* v, int64_t b,
                                       int64_t e) {
    adam_range(c, p, g, m, v, b, e);
}
#endif

RangeFn pick_range() {
#if QLORA_DS_X86
    switch (qlora_ds_cpu::active_isa()) {
        case qlora_ds_cpu::Isa::kAvx512: return adam_range_avx512;
        case qlora_ds_cpu::Isa::kAvx2: return adam_range_avx2;
        default: break;
    }
#endif
    return adam_range_scalar;
}

constexpr int64_t kChunk = 16384;  // elements per OpenMP work item (64 KiB of each tensor)

}  // namespace

void adamw_step(torch::Tensor param, torch::Tensor grad, torch::Tensor exp_avg, torch::Tensor exp_avg_sq,
                double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step) {
    const int64_t n = param.numel();
    check_fp32(param, "param", n);
    check_fp32(grad, "grad", n);
    check_fp32(exp_avg, "exp_avg", n);
    check_fp32(exp_avg_sq, "exp_avg_sq", n);
    TORCH_CHECK(step >= 1, "step must be >= 1, got ", step);

    const AdamConsts c(lr, beta1, beta2, eps, weight_decay, step);
    float* p = param.data_ptr<float>();
    const float* g = grad.data_ptr<float>();
    float* m = exp_avg.data_ptr<float>();
    float* v = exp_avg_sq.data_ptr<float>();
    const RangeFn range = pick_range();
    const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (n > 32768)
    for (int64_t k = 0; k < chunks; ++k) range(c, p, g, m, v, k * kChunk, std::min(n, (k + 1) * kChunk));
}

// ---- 8-bit state: dequantize -> update -> requantize, one quantization block at a time ---------------------------
// State codes follow qlora_ds/ops/reference.py bit for bit: value = fl(code[q] * absmax) + 0; a full block stores its
// unclamped absmax and scales by x * fl(1 / max(absmax, 1e-38)), a trailing partial block stores max(absmax, 1e-38)
// and divides; a scaled value (clamped to [-1, 1]) maps to the number of code midpoints strictly below it. So the
// result equals dequantizing the whole state, running adamw_step and requantizing, without the 8 B/param fp32
// temporaries: the scratch is two blocks per thread.

namespace {

constexpr float kTiny = 1e-38f;

__attribute__((always_inline)) inline uint8_t nearest_code(float s, const float* bounds) {  // bounds: 255 sorted midpoints
    int pos = 0;
    for (int step = 128; step > 0; step >>= 1) pos += (bounds[pos + step - 1] < s) ? step : 0;
    return static_cast<uint8_t>(pos);
}

// Requantize x[0..len) into q, returning the absmax to store.
__attribute__((always_inline)) inline float requantize_block(const float* x, int64_t len, bool partial, const float* bounds, uint8_t* q) {
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

// The 8-bit state's tensors and code tables.
struct State8 {
    float* p;
    const float* g;
    uint8_t *qm, *qv;
    float *am, *av;
    const float *cm, *cv, *bm, *bv;
};

// Block b: dequantize, update, requantize (ms / vs: scratch of one block each).
__attribute__((always_inline)) inline void adam8_block(const AdamConsts& c, const State8& s, int64_t b,
                                                       int64_t blocksize, int64_t n, float* ms, float* vs) {
    const int64_t start = b * blocksize;
    const int64_t len = std::min(blocksize, n - start);
    const float a_m = s.am[b], a_v = s.av[b];
    const AdamConsts k = c;
    for (int64_t i = 0; i < len; ++i) {
        const int64_t e = start + i;
        adam_elem(k, s.p[e], s.g[e], s.cm[s.qm[e]] * a_m + 0.0f, s.cv[s.qv[e]] * a_v + 0.0f, ms[i], vs[i]);
    }
    const bool partial = len < blocksize;
    s.am[b] = requantize_block(ms, len, partial, s.bm, s.qm + start);
    s.av[b] = requantize_block(vs, len, partial, s.bv, s.qv + start);
}

using BlockFn = void (*)(const AdamConsts&, const State8&, int64_t, int64_t, int64_t, float*, float*);

void adam8_block_scalar(const AdamConsts& c, const State8& s, int64_t b, int64_t bs, int64_t n, float* ms,
                        float* vs) {
    adam8_block(c, s, b, bs, n, ms, vs);
}
#if QLORA_DS_X86
QLORA_DS_AVX2 void adam8_block_avx2(const AdamConsts& c, const State8& s, int64_t b, int64_t bs, int64_t n,
                                    float* ms, float* vs) {
    adam8_block(c, s, b, bs, n, ms, vs);
}
QLORA_DS_AVX512 void adam8_block_avx512(const AdamConsts& c, const State8& s, int64_t b, int64_t bs, int64_t n,
                                        float* ms, float* vs) {
    adam8_block(c, s, b, bs, n, ms, vs);
}
#endif

BlockFn pick_block() {
#if QLORA_DS_X86
    switch (qlora_ds_cpu::active_isa()) {
        case qlora_ds_cpu::Isa::kAvx512: return adam8_block_avx512;
        case qlora_ds_cpu::Isa::kAvx2: return adam8_block_avx2;
        default: break;
    }
#endif
    return adam8_block_scalar;
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

    const AdamConsts c(lr, beta1, beta2, eps, weight_decay, step);
    const State8 s{param.data_ptr<float>(), grad.data_ptr<float>(), qm.data_ptr<uint8_t>(), qv.data_ptr<uint8_t>(),
                   absmax_m.data_ptr<float>(), absmax_v.data_ptr<float>(), code_m.data_ptr<float>(),
                   code_v.data_ptr<float>(), bounds_m.data_ptr<float>(), bounds_v.data_ptr<float>()};
    const BlockFn block = pick_block();
#pragma omp parallel if (n > 32768)
    {
        std::vector<float> ms(static_cast<size_t>(blocksize)), vs(static_cast<size_t>(blocksize));
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nblocks; ++b) block(c, s, b, blocksize, n, ms.data(), vs.data());
    }
}

// ---- which SIMD path runs (quant_cpu_isa.h) ----------------------------------------------------------
std::string cpu_isa() { return qlora_ds_cpu::isa_name(qlora_ds_cpu::active_isa()); }

void set_cpu_isa(const std::string& name) {
    TORCH_CHECK(qlora_ds_cpu::set_isa_by_name(name), "CPU kernel path '", name, "' is unknown or unsupported here");
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
    m.def("cpu_isa", &cpu_isa, "the SIMD path the loops take now: 'avx512', 'avx2' or 'scalar'");
    m.def("set_cpu_isa", &set_cpu_isa, "set_cpu_isa(name): 'auto', 'avx512', 'avx2' or 'scalar'");
    m.def("supported_cpu_isas", &qlora_ds_cpu::supported_isa_names, "the paths this CPU can run, widest first");
}
