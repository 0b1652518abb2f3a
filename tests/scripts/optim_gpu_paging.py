"""Paged-optimizer checks on a lent GPU (not part of the CPU test suite).

usage: python tests/scripts/optim_gpu_paging.py [OUT_JSON]   (default: $OUT/optim_gpu_paging.json)

1. The CUDA fused AdamW kernel vs torch.optim.AdamW (foreach=False) on the GPU, 50 steps: bit-identical expected.
2. Paging by the page manager's own eviction, never oversubscribing the card: optimizer state (~STATE_GIB) lives in
   managed memory; on a memory-pressure signal ``evict_to_host()`` moves it to CPU RAM, a spike allocation (at most
   half of the free memory) succeeds, then ``step()`` prefetches the pages back; bytes and seconds each way, and the
   paged run's parameters must equal an unpaged run's exactly.
3. Steady-state step time, paged vs unpaged (32- and 8-bit state).
The lent machine has no deepspeed: the CUDA op is then built directly with torch.utils.cpp_extension (the 8-bit step
runs in its fused per-block kernel; the quant ops use the torch reference backend).
"""
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

from qlora_ds.ops import use_backend
from qlora_ds.optim import PagedAdamW, PagedAdamW8bit, _op

CSRC = Path(__file__).resolve().parents[2] / "csrc"
STATE_GIB = 2.0
GIB = 1 << 30


def cuda_op():
    op = _op.paged_op("cuda")
    if op is None:
        from torch.utils.cpp_extension import load

        op = load("qlora_ds_paged_optim_cuda", [str(CSRC / "paged_optim_impl.cu"), str(CSRC / "paged_optim_cuda.cpp")],
                  extra_include_paths=[str(CSRC / "include")], extra_cflags=["-O3", "-ffp-contract=off"],
                  extra_cuda_cflags=["--fmad=false", "-O3"], verbose=False)
        _op._ops["cuda"] = op
    return op


def params_like(shapes, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, device="cuda", generator=g)) for s in shapes]


def set_grads(params, step):
    g = torch.Generator(device="cuda").manual_seed(10_000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, device="cuda", generator=g)


def check_kernel():
    shapes = [(1024, 1024), (4097,)]
    ours, ref = params_like(shapes), params_like(shapes)
    a, b = PagedAdamW(ours, lr=1e-3, weight_decay=0.01), torch.optim.AdamW(ref, lr=1e-3, weight_decay=0.01,
                                                                           foreach=False)
    for step in range(50):
        set_grads(ours, step)
        set_grads(ref, step)
        a.step()
        b.step()
    rel = max(((x - y).abs() / y.abs().clamp(min=1e-30)).max().item() for x, y in zip(ours, ref))
    exact = all(torch.equal(x, y) and torch.equal(a.state[x][k].view_as(x), b.state[y][k])
                for x, y in zip(ours, ref) for k in ("exp_avg", "exp_avg_sq"))
    # device independence: GPU state -> CPU optimizer -> GPU optimizer, bit for bit
    sd = a.state_dict()
    cpu = PagedAdamW([torch.nn.Parameter(p.detach().cpu()) for p in ours])
    cpu.load_state_dict(sd)
    back = PagedAdamW([torch.nn.Parameter(p.detach().clone()) for p in ours])
    back.load_state_dict(cpu.state_dict())
    same = all(torch.equal(x[k].cpu(), y[k].cpu()) for x, y in zip(a.state.values(), back.state.values())
               for k in ("exp_avg", "exp_avg_sq"))
    return {"max_rel_diff_vs_torch": rel, "bit_identical_to_torch": exact, "managed_state_bytes": a.page_manager.nbytes,
            "state_dict_gpu_cpu_gpu_exact": same}


def paging_demo():
    numel = int(STATE_GIB * GIB / 8)  # two fp32 moments
    shapes = [(numel // 4096, 4096)]
    paged, plain = params_like(shapes, 1), params_like(shapes, 1)
    opt, ref = PagedAdamW(paged, lr=1e-3), PagedAdamW(plain, lr=1e-3)
    ref.page_manager.paged = False
    for step in range(2):
        for ps, o in ((paged, opt), (plain, ref)):
            set_grads(ps, step)
            o.step()
    torch.cuda.synchronize()
    free0, total = torch.cuda.mem_get_info()
    spike_bytes = min(int(free0 * 0.5), 8 * GIB)
    evicted = opt.page_manager.evict_to_host()           # the memory-pressure hook
    free1, _ = torch.cuda.mem_get_info()
    spike = torch.empty(spike_bytes // 4, device="cuda")  # the spike (e.g. a long sequence's activations)
    spike.fill_(1.0)
    # every element of the spike was written and read back on the GPU (fp64 sum of ones: exact below 2^53)
    spike_ok = int(spike.sum(dtype=torch.float64).item()) == spike.numel() == spike_bytes // 4
    del spike
    torch.cuda.empty_cache()
    for ps, o in ((paged, opt), (plain, ref)):
        set_grads(ps, 2)
        o.step()                                          # step() prefetches the pages back first
    torch.cuda.synchronize()
    s = opt.page_manager.stats
    return {"state_bytes": opt.page_manager.nbytes, "free_before": free0, "free_after_evict": free1,
            "total": total, "spike_bytes": spike_bytes, "spike_ok": spike_ok,
            # eviction gave the GPU the state's pages back (managed pages on the device count as used)
            "evict_freed_gpu_bytes": free1 - free0, "evict_freed_state": free1 - free0 >= 0.9 * opt.page_manager.nbytes,
            "bytes_to_host": s.bytes_to_host, "seconds_to_host": s.seconds_to_host, "evicted": evicted,
            "bytes_to_device": s.bytes_to_device, "seconds_to_device": s.seconds_to_device,
            "paged_equals_unpaged": all(torch.equal(a, b) for a, b in zip(paged, plain))}


def step_times(cls, paged: bool, steps=20):
    shapes = [(4096, 4096)] * 8  # 134M params
    ps = params_like(shapes, 2)
    opt = cls(ps, lr=1e-4)
    opt.page_manager.paged = paged
    set_grads(ps, 0)
    for _ in range(3):
        opt.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        opt.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def main(out):
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    op = cuda_op()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "concurrent_managed_access": bool(op.concurrent_managed_access(torch.cuda.current_device())),
           "kernel": check_kernel(),
           "paging": paging_demo()}
    res["step_s"] = {"PagedAdamW/paged": step_times(PagedAdamW, True),
                     "PagedAdamW/unpaged": step_times(PagedAdamW, False)}
    no_ds = importlib.util.find_spec("deepspeed") is None
    with use_backend("torch" if no_ds else None):
        res["step_s"].update({"PagedAdamW8bit/paged": step_times(PagedAdamW8bit, True),
                              "PagedAdamW8bit/unpaged": step_times(PagedAdamW8bit, False),
                              "8bit_step": "fused CUDA kernel" if hasattr(op, "adamw8bit_step") else
                              f"chunked, {'torch' if no_ds else 'compiled'} quant ops"})
    print(json.dumps(res, indent=1))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.environ.get("OUT", "."), "optim_gpu_paging.json"))
