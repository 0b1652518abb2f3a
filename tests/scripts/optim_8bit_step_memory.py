"""Peak extra resident memory of one 8-bit AdamW step on a large flat fp32 parameter (as ZeRO-1/2's partition is).

usage: python tests/scripts/optim_8bit_step_memory.py NUMEL [MODE ...]   -> prints {MODE: extra_bytes} as JSON

MODE (default: all three, one after the other in this process): fused (the compiled per-block step), chunked (QLORA_DS_BACKEND=torch: the pure-torch path in chunks of whole
blocks) or unfused (the pre-fusion step: the whole state dequantized to fp32 first; the control that shows the bound
can fail). Run with MALLOC_MMAP_THRESHOLD_=131072 so that large allocations are fresh mappings (glibc would otherwise
recycle freed heap pages and hide them from the peak). The peak is VmHWM after resetting it (/proc/self/clear_refs).
"""
import json
import re
import sys

import torch


def rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))


def unfused_step(opt, p):
    """The step as it was before the fusion (dequantize all -> fp32 AdamW -> requantize all)."""
    from qlora_ds.ops import load_backend
    from qlora_ds.optim._op import adamw_fp32
    from qlora_ds.optim.adamw import _maps

    st, group = opt.state[p], opt.param_groups[0]
    st["step"] += 1
    (cm, bm), (cv, bv) = _maps(p.device)["signed"], _maps(p.device)["unsigned"]
    kernels, bs = load_backend("cpu"), opt.blocksize
    m, v = torch.empty(p.numel()), torch.empty(p.numel())
    kernels.dequantize_8bit_blockwise(st["exp_avg"], st["exp_avg_absmax"], cm, bs, 0.0, m)
    kernels.dequantize_8bit_blockwise(st["exp_avg_sq"], st["exp_avg_sq_absmax"], cv, bs, 0.0, v)
    adamw_fp32(p.data.view(-1), p.grad.view(-1), m, v, group["lr"], *group["betas"], group["eps"],
               group["weight_decay"], st["step"])
    kernels.quantize_8bit_blockwise(m, cm, bm, bs, st["exp_avg"], st["exp_avg_absmax"])
    kernels.quantize_8bit_blockwise(v, cv, bv, bs, st["exp_avg_sq"], st["exp_avg_sq_absmax"])


def measure(step) -> int:
    step()                                       # warm: every allocation this path makes once
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                             # reset the peak to the current resident size
    before = rss_kib("VmRSS")
    step()
    return (rss_kib("VmHWM") - before) * 1024


def main(numel: int, modes: list[str]) -> None:
    from qlora_ds.optim import AdamW8bit, _op

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(numel))
    p.grad = torch.randn(numel)
    opt = AdamW8bit([p], lr=1e-3)
    opt.step()                                   # allocates the state, loads the ops
    compiled = _op.paged_op
    out = {}
    for mode in modes:
        if mode == "chunked":
            _op.paged_op = lambda device_type: None   # the pure-torch path (chunks of whole blocks)
        out[mode] = measure(lambda: unfused_step(opt, p) if mode == "unfused" else opt.step())
        _op.paged_op = compiled
    print(json.dumps(out))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:] or ["fused", "chunked", "unfused"])
