"""Paged-optimizer checks on a lent GPU (not part of the CPU test suite).

usage: python tests/scripts/optim_gpu_paging.py [OUT_JSON] [--device cuda|cpu]   (default: $OUT/optim_gpu_paging.json)

1. The CUDA fused AdamW kernel vs torch.optim.AdamW (foreach=False) on the GPU, 50 steps: bit-identical expected.
2. Paging by the page manager's own eviction, never oversubscribing the card: optimizer state (~STATE_GIB) lives in
   managed memory; on a memory-pressure signal ``evict_to_host()`` moves it to CPU RAM, a spike allocation (at most
   half of the free memory) succeeds, then ``step()`` prefetches the pages back; bytes and seconds each way, and the
   paged run's parameters must equal an unpaged run's exactly.
3. Steady-state step time, paged vs unpaged (32- and 8-bit state).
Exit 1 when a check of 1 or 2 failed (named in the JSON's ``failed`` and on the last line).
The lent machine has no deepspeed: the CUDA op is then built directly with torch.utils.cpp_extension (the 8-bit step
runs in its fused per-block kernel; the quant ops use the torch reference backend).

``--device cpu`` (the dry run of scripts/gpu_check.sh): the same checks at tiny sizes on the CPU, with the compiled CPU
op for the updates and a stand-in for the CUDA op's managed memory (``FakeManagedOp``: the optimizer's state buffers
count as managed, prefetches are recorded, nothing moves), so eviction, the spike and ``step()``'s prefetch back run
through the page manager's managed-memory code; the figures are not measurements.
"""
import argparse
import contextlib
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from qlora_ds.ops import use_backend
from qlora_ds.optim import PagedAdamW, PagedAdamW8bit, _op

CSRC = Path(__file__).resolve().parents[2] / "csrc"
STATE_GIB = 2.0
GIB = 1 << 30
# sizes per device: the GPU's are the check; the CPU's only run the same code (the dry run)
SIZES = {"cuda": dict(state_bytes=int(STATE_GIB * GIB), spike_cap=8 * GIB, kernel_shapes=[(1024, 1024), (4097,)],
                      kernel_steps=50, step_shapes=[(4096, 4096)] * 8, warm=3, timed=20),
         "cpu": dict(state_bytes=1 << 20, spike_cap=1 << 20, kernel_shapes=[(64, 64), (65,)], kernel_steps=5,
                     step_shapes=[(64, 64)] * 2, warm=1, timed=2)}
DEVICE = "cuda"
SIZE = SIZES[DEVICE]


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def mem_get_info():
    """(free, total) bytes of the device: the GPU's, or on the CPU the host's RAM."""
    if DEVICE == "cuda":
        return torch.cuda.mem_get_info()
    page = os.sysconf("SC_PAGE_SIZE")
    return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page


class FakeManagedOp:
    """The CUDA paged_optim op as the page manager sees it, on a machine without a GPU (cf. tests/test_optim.py)."""

    def __init__(self):
        self.prefetches = []

    def concurrent_managed_access(self, index):
        return True

    def managed_empty(self, numel, dtype, index):
        return torch.empty(numel, dtype=dtype)

    def prefetch(self, t, device):
        self.prefetches.append(device)


@contextlib.contextmanager
def fake_managed_memory():
    """CPU only: the page manager's managed-memory path with FakeManagedOp (restored on exit: the dry run goes on in
    this process). Paged state buffers on the CPU count as managed, so evict_to_host / prefetch_to_device count
    bytes."""
    from qlora_ds.optim import page_manager as pm

    fake = FakeManagedOp()
    saved = pm.paged_op, pm.PageManager.zeros, torch.cuda.synchronize
    zeros = pm.PageManager.zeros

    def managed_zeros(self, numel, dtype, device):
        buf = zeros(self, numel, dtype, device)
        if self.paged:
            self._managed_ids.add(id(buf))
        return buf

    pm.paged_op = lambda device_type: fake if device_type == "cuda" else None
    pm.PageManager.zeros = managed_zeros
    torch.cuda.synchronize = lambda *a, **k: None
    try:
        yield fake
    finally:
        pm.paged_op, pm.PageManager.zeros, torch.cuda.synchronize = saved


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
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, device=DEVICE, generator=g)) for s in shapes]


def set_grads(params, step):
    g = torch.Generator(device=DEVICE).manual_seed(10_000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, device=DEVICE, generator=g)


def check_kernel():
    shapes = SIZE["kernel_shapes"]
    ours, ref = params_like(shapes), params_like(shapes)
    a, b = PagedAdamW(ours, lr=1e-3, weight_decay=0.01), torch.optim.AdamW(ref, lr=1e-3, weight_decay=0.01,
                                                                           foreach=False)
    for step in range(SIZE["kernel_steps"]):
        set_grads(ours, step)
        set_grads(ref, step)
        a.step()
        b.step()
    rel = max(((x - y).abs() / y.abs().clamp(min=1e-30)).max().item() for x, y in zip(ours, ref))
    moments = all(torch.equal(a.state[x][k].view_as(x), b.state[y][k])
                  for x, y in zip(ours, ref) for k in ("exp_avg", "exp_avg_sq"))
    # fp32 parameters' distance in units in the last place (same-sign values: their bit patterns differ by that)
    ulps = max((x.detach().view(torch.int32).long() - y.detach().view(torch.int32).long()).abs().max().item()
               for x, y in zip(ours, ref))
    # device independence: GPU state -> CPU optimizer -> GPU optimizer, bit for bit
    sd = a.state_dict()
    cpu = PagedAdamW([torch.nn.Parameter(p.detach().cpu()) for p in ours])
    cpu.load_state_dict(sd)
    back = PagedAdamW([torch.nn.Parameter(p.detach().clone()) for p in ours])
    back.load_state_dict(cpu.state_dict())
    same = all(torch.equal(x[k].cpu(), y[k].cpu()) for x, y in zip(a.state.values(), back.state.values())
               for k in ("exp_avg", "exp_avg_sq"))
    return {"max_rel_diff_vs_torch": rel, "param_ulps_vs_torch": ulps, "moments_bit_identical_to_torch": moments,
            "bit_identical_to_torch": moments and ulps == 0, "managed_state_bytes": a.page_manager.nbytes,
            "state_dict_gpu_cpu_gpu_exact": same}


def paging_demo():
    numel = int(SIZE["state_bytes"] / 8)  # two fp32 moments
    shapes = [(numel // 4096, 4096)]
    paged, plain = params_like(shapes, 1), params_like(shapes, 1)
    opt, ref = PagedAdamW(paged, lr=1e-3), PagedAdamW(plain, lr=1e-3)
    ref.page_manager.paged = False
    for step in range(2):
        for ps, o in ((paged, opt), (plain, ref)):
            set_grads(ps, step)
            o.step()
    sync()
    free0, total = mem_get_info()
    spike_bytes = min(int(free0 * 0.5), SIZE["spike_cap"])
    evicted = opt.page_manager.evict_to_host()           # the memory-pressure hook
    free1, _ = mem_get_info()
    spike = torch.empty(spike_bytes // 4, device=DEVICE)  # the spike (e.g. a long sequence's activations)
    spike.fill_(1.0)
    # every element of the spike was written and read back on the GPU (fp64 sum of ones: exact below 2^53)
    spike_ok = int(spike.sum(dtype=torch.float64).item()) == spike.numel() == spike_bytes // 4
    del spike
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    for ps, o in ((paged, opt), (plain, ref)):
        set_grads(ps, 2)
        o.step()                                          # step() prefetches the pages back first
    sync()
    s = opt.page_manager.stats
    return {"state_bytes": opt.page_manager.nbytes, "free_before": free0, "free_after_evict": free1,
            "total": total, "spike_bytes": spike_bytes, "spike_ok": spike_ok,
            # eviction gave the GPU the state's pages back (managed pages on the device count as used)
            "evict_freed_gpu_bytes": free1 - free0, "evict_freed_state": free1 - free0 >= 0.9 * opt.page_manager.nbytes,
            "bytes_to_host": s.bytes_to_host, "seconds_to_host": s.seconds_to_host, "evicted": evicted,
            "bytes_to_device": s.bytes_to_device, "seconds_to_device": s.seconds_to_device,
            "paged_equals_unpaged": all(torch.equal(a, b) for a, b in zip(paged, plain))}


def step_times(cls, paged: bool, steps=None):
    steps = steps or SIZE["timed"]
    shapes = SIZE["step_shapes"]  # GPU: 8 x 4096^2 = 134M params
    ps = params_like(shapes, 2)
    opt = cls(ps, lr=1e-4)
    opt.page_manager.paged = paged
    set_grads(ps, 0)
    for _ in range(SIZE["warm"]):
        opt.step()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        opt.step()
    sync()
    return (time.perf_counter() - t) / steps


def checks(op) -> dict:
    """``op``: the CUDA paged_optim op (or, on the CPU, the FakeManagedOp standing in for it)."""
    cuda = DEVICE == "cuda"
    update_op = op if cuda else _op.paged_op("cpu")           # what runs the AdamW updates
    res = {"device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()}), "
           "fake managed memory: sizes and times are not measurements", "torch": torch.__version__,
           "concurrent_managed_access": bool(op.concurrent_managed_access(torch.cuda.current_device() if cuda else 0)),
           "kernel": check_kernel(),
           "paging": paging_demo()}
    res["step_s"] = {"PagedAdamW/paged": step_times(PagedAdamW, True),
                     "PagedAdamW/unpaged": step_times(PagedAdamW, False)}
    no_ds = importlib.util.find_spec("deepspeed") is None
    with use_backend("torch" if no_ds else None):
        res["step_s"].update({"PagedAdamW8bit/paged": step_times(PagedAdamW8bit, True),
                              "PagedAdamW8bit/unpaged": step_times(PagedAdamW8bit, False),
                              "8bit_step": f"fused {'CUDA' if cuda else 'CPU'} kernel"
                              if hasattr(update_op, "adamw8bit_step") else
                              f"chunked, {'torch' if no_ds else 'compiled'} quant ops"})
    return res


def failed_checks(res: dict) -> list[str]:
    """The pass/fail properties ``res`` holds that did not hold. Eviction freeing the device's memory is a GPU fact
    only: the CPU's fake managed memory frees nothing. On the CPU the parameters may differ from torch's by an ulp
    (torch's vectorised sqrt is not always correctly rounded, ours is: tests/test_optim.py), the moments may not."""
    kernel, paging = res["kernel"], res["paging"]
    want = {name: kernel[name] for name in ("moments_bit_identical_to_torch", "state_dict_gpu_cpu_gpu_exact")}
    if DEVICE == "cuda":
        want["bit_identical_to_torch"] = kernel["bit_identical_to_torch"]
    else:
        want["param_ulps_vs_torch<=1"] = kernel["param_ulps_vs_torch"] <= 1
    want.update({name: paging[name] for name in ("spike_ok", "paged_equals_unpaged")
                 + (("evict_freed_state",) if DEVICE == "cuda" else ())})
    return [name for name, ok in want.items() if not ok]


def main(argv=None):
    global DEVICE, SIZE
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", default=os.path.join(os.environ.get("OUT", "."), "optim_gpu_paging.json"))
    p.add_argument("--device", choices=sorted(SIZES), default="cuda",
                   help="cuda (the check) or cpu (the same code at tiny sizes with fake managed memory: the dry run)")
    args = p.parse_args(argv)
    DEVICE, SIZE = args.device, SIZES[args.device]
    if DEVICE == "cuda":
        if not torch.cuda.is_available():
            sys.exit("needs a CUDA GPU")
        res = checks(cuda_op())
    else:
        with fake_managed_memory() as fake:
            res = checks(fake)
    res["failed"] = failed_checks(res)
    print(json.dumps(res, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    # the last line is the GPU check's note for this step
    print("paging: all checks passed" if not res["failed"] else f"paging: FAILED {', '.join(res['failed'])}")
    return 1 if res["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
