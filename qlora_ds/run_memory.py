"""The planner's check of a finished finetune (``launch/finetune.py``): every rank's measured peak gathered, and the
plan of the rank with the highest one (``qlora_ds.plan.run_check``) set beside it in the run's summary."""
from __future__ import annotations

import logging

import torch

from .errors import QLoRADSError
from .hardware import ds_compute_dtype
from .memstats import this_peak

log = logging.getLogger("finetune")


def planner_check(args, model_config, ds_config: dict, world: int, runtime: int, widths) -> dict | None:
    """The planner's peak for this run beside the measured one, for the rank with the highest peak, at the
    widest batch the run met (the planner's worst case is --max-len) and, for the memory the CPU keeps per batch
    shape, that rank's batch widths (``widths``: the distinct widths this rank ran; the planner's worst case is
    every multiple of --pad-to-multiple-of; packed rows meet few). CPU: peak RSS, with the RSS before the model
    as the runtime term; CUDA: max allocated."""
    import torch.distributed as dist

    from .distributed import collective_device
    from .ops import fused_linear
    from .plan.run_check import config_for_run, memory_check

    cuda = torch.cuda.is_available()
    mine = torch.tensor([float(this_peak()), float(runtime), float(max(widths, default=0)), float(sum(widths))],
                        dtype=torch.float64, device=collective_device())      # NCCL takes no CPU tensors
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    peak, runtime, _, width_sum = max(every, key=lambda t: t[0].item()).tolist()
    widest = int(max(t[2].item() for t in every))
    try:
        cfg = config_for_run(model_config.to_dict(), ds_config, world=world, device="cuda" if cuda else "cpu",
                             seq_len=widest, lora_r=args.lora_r, lora_dropout=args.lora_dropout,
                             targets=args.target_modules, grad_ckpt=args.grad_ckpt, method=args.method,
                             bits=args.bits, group_size=args.group_size, double_quant=args.double_quant,
                             runtime_bytes=0 if cuda else int(runtime), pad_multiple=args.pad_to_multiple_of,
                             chunked_loss=args.chunked_loss, compute_dtype=ds_compute_dtype(ds_config),
                             fused_cpu_linear=not cuda and fused_linear.available(), packing=args.packing,
                             width_sum=int(width_sum), quantize_experts=args.quantize_experts,
                             lora_experts=getattr(args, "lora_experts", False))
    except QLoRADSError as err:
        log.info("memory planner: not compared (%s)", err)
        return None
    return memory_check(cfg, peak)
