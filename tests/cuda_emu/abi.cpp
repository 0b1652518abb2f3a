// qlora-ds tests: extern "C" entry points over the emulated CUDA kernels (tests/cuda_emu/__init__.py loads them with
// ctypes). Built with simt.h force-included, as the kernels are.
#include "paged_optim_cuda.h"
#include "quant_cuda.h"


extern "C" {

// Cap the grid of every launch at `blocks` along x (0: no cap): a GPU runs the grid-stride loops this way when a
// launcher caps its grid; here small inputs can take that path.
void emu_set_max_grid(unsigned blocks) { qlora_emu::max_grid = blocks; }

int emu_quantize_4bit(const void* x, int x_dtype, int64_t n, const float* bounds, const uint8_t* order, int64_t bs,
                      uint8_t* packed, float* absmax) {
    return qlora_ds::launch_quantize_4bit(x, x_dtype, n, bounds, order, bs, packed, absmax, nullptr);
}

int emu_dequantize_4bit(const uint8_t* packed, const float* absmax, const uint8_t* qabsmax, const float* absmax2,
                        const float* code8, int64_t nested, float offset, const float* code, int64_t bs, void* out,
                        int out_dtype, int64_t n) {
    return qlora_ds::launch_dequantize_4bit(packed, absmax, qabsmax, absmax2, code8, nested, offset, code, bs, out,
                                            out_dtype, n, nullptr);
}

int emu_quantize_8bit(const float* x, int64_t n, const float* bounds8, int64_t bs, uint8_t* q, float* absmax) {
    return qlora_ds::launch_quantize_8bit_blockwise(x, n, bounds8, bs, q, absmax, nullptr);
}

int emu_dequantize_8bit(const uint8_t* q, const float* absmax, const float* code8, int64_t bs, float offset, float* out,
                        int64_t n) {
    return qlora_ds::launch_dequantize_8bit_blockwise(q, absmax, code8, bs, offset, out, n, nullptr);
}

int emu_quantize_intn(const void* w, int w_dtype, int64_t n, int bits, int64_t gs, uint8_t* qw, float* scales,
                      float* zeros) {
    return qlora_ds::launch_quantize_intn(w, w_dtype, n, bits, gs, qw, scales, zeros, nullptr);
}

int emu_dequantize_intn(const uint8_t* qw, const float* scales, const float* zeros, int bits, int64_t gs, void* out,
                        int out_dtype, int64_t n) {
    return qlora_ds::launch_dequantize_intn(qw, scales, zeros, bits, gs, out, out_dtype, n, nullptr);
}

int emu_adamw_fp32(float* p, const float* g, float* m, float* v, int64_t n, double lr, double beta1, double beta2,
                   double eps, double wd, int64_t step) {
    return qlora_ds::launch_adamw_fp32(p, g, m, v, n, lr, beta1, beta2, eps, wd, step, nullptr);
}

int emu_adamw_8bit(float* p, const float* g, uint8_t* qm, float* am, uint8_t* qv, float* av, const float* code_m,
                   const float* bounds_m, const float* code_v, const float* bounds_v, int64_t n, int64_t bs,
                   double lr, double beta1, double beta2, double eps, double wd, int64_t step) {
    const qlora_ds::Tables8 tables{code_m, bounds_m, code_v, bounds_v};
    return qlora_ds::launch_adamw_8bit(p, g, qm, am, qv, av, tables, n, bs, lr, beta1, beta2, eps, wd, step, nullptr);
}

// The unified-memory wrappers: each call's arguments as the runtime would have received them, into `out` (4 longs:
// kind, cudaMemLocation type, id, bytes), and the wrapper's return code.
static int recorded(int rc, long long* out) {
    out[0] = qlora_emu::managed_call.kind;
    out[1] = qlora_emu::managed_call.location_type;
    out[2] = qlora_emu::managed_call.location_id;
    out[3] = qlora_emu::managed_call.bytes;
    return rc;
}

int emu_managed_prefetch(const void* ptr, long long bytes, int device, long long* out) {
    qlora_emu::managed_call = {};
    return recorded(qlora_ds::managed_prefetch(ptr, static_cast<size_t>(bytes), device, nullptr), out);
}

int emu_managed_advise_preferred_host(const void* ptr, long long bytes, long long* out) {
    qlora_emu::managed_call = {};
    return recorded(qlora_ds::managed_advise_preferred_host(ptr, static_cast<size_t>(bytes)), out);
}

int emu_managed_advise_accessed_by(const void* ptr, long long bytes, int device, long long* out) {
    qlora_emu::managed_call = {};
    return recorded(qlora_ds::managed_advise_accessed_by(ptr, static_cast<size_t>(bytes), device), out);
}

}  // extern "C"
