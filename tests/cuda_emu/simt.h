// qlora-ds tests: run our CUDA kernels on the CPU, so that a machine without a GPU executes them (their indexing,
// block and warp reductions, tails, vector paths and roundings) and compares them bit for bit with the reference.
//
// g++ compiles a .cu file with this header force-included (-include) after tests/cuda_emu/__init__.py has rewritten
// each launch `k<<<grid, block, smem, stream>>>(args);` into `::qlora_emu::launch(grid, block, smem, [&] { k(args);
// });` and each `extern __shared__ T name[];` into `T* name = ::qlora_emu::dynamic_smem<T>();`.
//
// Execution model: the blocks of a launch run one after another; the threads of a block run as fibers
// (ucontext) on the calling thread. A fiber runs until it reaches __syncthreads (all live threads of its block) or
// a warp shuffle (all live lanes of its warp), then the next one runs; a barrier opens when every live thread it
// waits for has reached it. Which fiber runs first is fixed (thread 0, 1, ...), so a thread that reads what another
// writes without a barrier in between reads stale data here, as it may on a GPU. __shared__ variables are
// `static` (one block at a time). Arithmetic: the _rn intrinsics are IEEE fp32 operations on the host (build with
// -ffp-contract=off, no -ffast-math); bf16/fp16 conversions are cuda_bf16.h / cuda_fp16.h's host versions.
#pragma once

// Define the CUDA keywords before the CUDA headers, which then leave them alone on a host compiler.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __constant__ static

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

namespace qlora_emu {

enum class Wait { none, block, warp };

struct Fiber {
    ucontext_t ctx;
    std::unique_ptr<char[]> stack;
    uint3 tid;
    bool done = false;
    Wait wait = Wait::none;
    unsigned shuffles = 0;  // warp shuffles done, picks the exchange buffer (two alternate)
};

constexpr size_t kStack = 256 * 1024;

struct State {
    std::vector<Fiber> fibers;  // kept across launches (their stacks)
    Fiber* current = nullptr;
    ucontext_t scheduler;
    dim3 block_idx, block_dim, grid_dim;
    std::vector<uint64_t> lanes[2];  // shuffle exchange: one 64-bit slot per thread of the block, two buffers
    std::vector<char> smem;          // dynamic shared memory of the launch
    const void* body = nullptr;      // the launch's kernel call (a lambda)
    void (*call)(const void*) = nullptr;
};

inline State state;
inline unsigned max_grid = 0;  // > 0: run at most this many blocks along x, so the kernels' grid-stride loops iterate

inline void fail(const char* what) {
    std::fprintf(stderr, "qlora_emu: %s\n", what);
    std::abort();
}

inline void yield(Wait why) {
    Fiber* f = state.current;
    f->wait = why;
    if (swapcontext(&f->ctx, &state.scheduler) != 0) fail("swapcontext failed");
}

inline void fiber_main() {
    state.call(state.body);
    state.current->done = true;  // uc_link returns to the scheduler
}

inline unsigned linear(const uint3& t) {
    return t.x + state.block_dim.x * (t.y + state.block_dim.y * t.z);
}

// Open the barriers the live threads of the block wait at: the block's when all wait there, else each warp whose
// live lanes all wait in a shuffle. False: none opened.
inline bool release(unsigned nthreads) {
    std::vector<Fiber>& fs = state.fibers;
    bool any_live = false, all_block = true;
    for (unsigned i = 0; i < nthreads; ++i) {
        if (fs[i].done) continue;
        any_live = true;
        all_block = all_block && fs[i].wait == Wait::block;
    }
    if (any_live && all_block) {
        for (unsigned i = 0; i < nthreads; ++i) fs[i].wait = Wait::none;
        return true;
    }
    bool opened = false;
    for (unsigned w0 = 0; w0 < nthreads; w0 += 32) {
        const unsigned w1 = std::min(nthreads, w0 + 32);
        bool any = false, all_warp = true;
        for (unsigned i = w0; i < w1; ++i) {
            if (fs[i].done) continue;
            any = true;
            all_warp = all_warp && fs[i].wait == Wait::warp;
        }
        if (any && all_warp) {
            for (unsigned i = w0; i < w1; ++i) fs[i].wait = Wait::none;
            opened = true;
        }
    }
    return opened;
}

inline void run_block(unsigned nthreads) {
    std::vector<Fiber>& fs = state.fibers;
    for (unsigned i = 0; i < nthreads; ++i) {
        Fiber& f = fs[i];
        f.done = false;
        f.wait = Wait::none;
        f.shuffles = 0;
        f.tid = make_uint3(i % state.block_dim.x, (i / state.block_dim.x) % state.block_dim.y,
                           i / (state.block_dim.x * state.block_dim.y));
        if (getcontext(&f.ctx) != 0) fail("getcontext failed");
        f.ctx.uc_stack.ss_sp = f.stack.get();
        f.ctx.uc_stack.ss_size = kStack;
        f.ctx.uc_link = &state.scheduler;
        makecontext(&f.ctx, fiber_main, 0);
    }
    for (;;) {
        for (unsigned i = 0; i < nthreads; ++i) {  // each runnable thread until it waits or ends
            Fiber& f = fs[i];
            if (f.done || f.wait != Wait::none) continue;
            state.current = &f;
            if (swapcontext(&state.scheduler, &f.ctx) != 0) fail("swapcontext failed");
        }
        bool live = false;
        for (unsigned i = 0; i < nthreads; ++i) live = live || !fs[i].done;
        if (!live) break;
        if (!release(nthreads)) fail("deadlock: threads wait at __syncthreads while lanes of their warp wait in a shuffle");
    }
    state.current = nullptr;
}

template <typename F>
void call_body(const void* f) {
    (*static_cast<const F*>(f))();
}

// One launch: every block in order, its threads as fibers. Streams are ignored (everything is synchronous).
template <typename F>
void launch(dim3 grid, dim3 block, size_t smem, const F& body) {
    const unsigned nthreads = block.x * block.y * block.z;
    if (nthreads == 0 || nthreads > 1024) fail("a block has 1..1024 threads");
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) fail("an empty grid");
    if (max_grid > 0 && grid.x > max_grid) grid.x = max_grid;
    if (smem > 227 * 1024) fail("more dynamic shared memory than a GPU has (227 KiB)");
    while (state.fibers.size() < nthreads) {
        state.fibers.emplace_back();
        state.fibers.back().stack.reset(new char[kStack]);
    }
    for (auto& buf : state.lanes) buf.assign(nthreads, 0);
    state.smem.assign(smem + 16, 0);
    state.block_dim = block;
    state.grid_dim = grid;
    state.body = &body;
    state.call = &call_body<F>;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                state.block_idx = dim3(x, y, z);
                run_block(nthreads);
            }
}
template <typename F>
void launch(dim3 grid, dim3 block, const F& body) {
    launch(grid, block, 0, body);
}
template <typename F>
void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, const F& body) {
    launch(grid, block, smem, body);
}

template <typename T>
T* dynamic_smem() {
    void* p = state.smem.data();
    size_t space = state.smem.size();
    return static_cast<T*>(std::align(alignof(T) < 16 ? 16 : alignof(T), sizeof(T), p, space));
}

inline cudaError_t last_error = cudaSuccess;
inline cudaError_t get_last_error() {
    const cudaError_t e = last_error;
    last_error = cudaSuccess;
    return e;
}

// The unified-memory runtime calls of paged_optim_impl.cu, recorded (no memory is managed here): what the last call
// asked for, read back by abi.cpp's emu_managed_* entry points.
struct ManagedCall {
    int kind = -1;  // 0 prefetch, 1 advise preferred location, 2 advise accessed by, 3 another advice
    int location_type = -1;
    int location_id = -1;
    long long bytes = -1;
};
inline ManagedCall managed_call;

inline cudaError_t mem_prefetch(const void*, size_t bytes, cudaMemLocation loc, unsigned flags, cudaStream_t) {
    managed_call = {0, static_cast<int>(loc.type), loc.id, static_cast<long long>(bytes)};
    return flags == 0 ? cudaSuccess : (last_error = cudaErrorInvalidValue);
}
inline cudaError_t mem_advise(const void*, size_t bytes, cudaMemoryAdvise advice, cudaMemLocation loc) {
    const int kind = advice == cudaMemAdviseSetPreferredLocation ? 1 : advice == cudaMemAdviseSetAccessedBy ? 2 : 3;
    managed_call = {kind, static_cast<int>(loc.type), loc.id, static_cast<long long>(bytes)};
    return cudaSuccess;
}
inline cudaError_t malloc_managed(void**, size_t, unsigned) { return last_error = cudaErrorNotSupported; }
inline cudaError_t free_memory(void*) { return cudaSuccess; }
inline cudaError_t device_get_attribute(int* value, cudaDeviceAttr, int) {
    *value = 1;
    return cudaSuccess;
}

// Every kernel "has an image" for the emulated device.
template <typename F>
inline cudaError_t func_get_attributes(cudaFuncAttributes* attr, F) {
    *attr = cudaFuncAttributes{};
    return cudaSuccess;
}

}  // namespace qlora_emu

#define cudaFuncGetAttributes ::qlora_emu::func_get_attributes
#define cudaMemPrefetchAsync ::qlora_emu::mem_prefetch
#define cudaMemAdvise ::qlora_emu::mem_advise
#define cudaMallocManaged ::qlora_emu::malloc_managed
#define cudaFree ::qlora_emu::free_memory
#define cudaDeviceGetAttribute ::qlora_emu::device_get_attribute
#define threadIdx (::qlora_emu::state.current->tid)
#define blockIdx (::qlora_emu::state.block_idx)
#define blockDim (::qlora_emu::state.block_dim)
#define gridDim (::qlora_emu::state.grid_dim)
#define cudaGetLastError ::qlora_emu::get_last_error

inline void __syncthreads() { ::qlora_emu::yield(::qlora_emu::Wait::block); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    static_assert(sizeof(T) <= 8, "a shuffle moves at most 8 bytes");
    using namespace qlora_emu;
    if (mask != 0xffffffffu || width != 32) fail("only full-warp shuffles are emulated");
    Fiber* f = state.current;
    const unsigned me = linear(f->tid);
    std::vector<uint64_t>& buf = state.lanes[f->shuffles++ & 1];
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    buf[me] = bits;
    yield(Wait::warp);  // every live lane of the warp has written
    const unsigned src = (me & ~31u) | ((me & 31u) ^ static_cast<unsigned>(lane_mask & 31));
    if (src >= buf.size()) fail("a shuffle from a lane outside the block");
    T out;
    std::memcpy(&out, &buf[src], sizeof(T));
    return out;  // the other buffer takes the next shuffle, so no lane overwrites a slot before all have read it
}

// The device intrinsics our kernels use, as the host computes them (IEEE fp32, round to nearest even).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
template <typename T>
inline T __ldg(const T* p) {
    return *p;
}
using std::max;
using std::min;
