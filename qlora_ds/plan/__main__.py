"""python -m qlora_ds.plan --model llama-65b --gpus 1 --gpu-mem 48GB  → does it fit, and what to turn."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace

from ..errors import QLoRADSError
from . import PlanConfig, apply_ds_config, apply_recipe, format_report, load_shape, parse_mem, plan

log = logging.getLogger("qlora_ds.plan")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m qlora_ds.plan", description=__doc__)
    p.add_argument("--model", required=True, help="preset (llama-7b … llama-3-70b, smollm2-135m, mixtral-8x7b, "
                                                 "qwen3-30b-a3b), config.json or dir")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per node")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpu-mem", default="48GB", help="memory per GPU, e.g. 48GB (read as GiB), 80GiB")
    p.add_argument("--seq-len", type=int, default=None, help="default 512 (or the recipe's)")
    p.add_argument("--batch", type=int, default=None, help="micro batch per GPU (default 1)")
    p.add_argument("--grad-accum", type=int, default=None, help="micro steps per optimizer step (default 16)")
    p.add_argument("--zero", type=int, default=None, choices=(0, 1, 2, 3), help="ZeRO stage (default 2)")
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank on all linear layers (default 64)")
    p.add_argument("--no-grad-ckpt", action="store_true", help="gradient checkpointing off")
    p.add_argument("--bf16-lora", action="store_true", help="bf16 master weights and grads (no fp32 copy)")
    p.add_argument("--bits", type=int, default=None, choices=(2, 3, 4, 16),
                   help="base weights: 4 (NF4+DQ) or 16; 2/3/4 with --quant int (QA-LoRA)")
    p.add_argument("--quant", default=None, choices=("nf4", "int"),
                   help="nf4 (QLoRA; default) or int (QA-LoRA INT-N; a recipe's method qalora)")
    p.add_argument("--group-size", type=int, default=None, help="QA-LoRA quantization group (default 32)")
    p.add_argument("--optim-bits", type=int, default=None, choices=(8, 32))
    p.add_argument("--paged", action="store_true", help="paged optimizer (its state may spill to host)")
    p.add_argument("--chunked-loss", action=argparse.BooleanOptionalAction, default=None,
                   help="LM head + cross-entropy over token chunks, as launch/finetune.py does by default (default on, "
                        "or the recipe's); --no-chunked-loss plans the full fp32 logits")
    p.add_argument("--no-quantize-experts", action="store_true",
                   help="MoE models: plan the fused experts in 16 bit (finetune --no-quantize-experts); by default "
                        "they are stored in the linears' 4-bit format, frozen")
    p.add_argument("--lora-experts", action="store_true",
                   help="MoE models: LoRA on the 4-bit experts too (finetune --lora-experts); plans LoRA dropout 0, "
                        "which it needs (a recipe's other dropout is an error, as there)")
    p.add_argument("--experts-dequant-mb", type=float, default=None,
                   help="MoE models: the most MiB of one layer's experts dequantized at once (finetune's "
                        "QLORA_DS_EXPERTS_DEQUANT_MB, default 2048); a larger layer runs its experts in groups")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--dtype", default=None, choices=("auto", "bf16", "fp16", "fp32"),
                   help="compute dtype, as finetune --dtype (default: the recipe's, else auto). auto: bf16 on cuda "
                        "(fp16, for a GPU older than sm_80, plans the same bytes except ZeRO-3's LoRA copy); on cpu "
                        "what finetune picks on this host (bf16 with AVX512-BF16/AMX, else fp32), bf16 with --cpu-amx")
    p.add_argument("--cpu-amx", action="store_true",
                   help="with --device cpu: the CPU has AMX and computes in bf16, so NF4 linears of up to 256 rows "
                        "(1024 for large weights) run fused and write no dequantized weight (ops/fused_linear.py)")
    p.add_argument("--packing", action="store_true",
                   help="packed rows (finetune --packing); on CPU in bf16 adds eager attention's saved probabilities")
    p.add_argument("--pad-multiple", type=int, default=16,
                   help="batch widths rounded up to this (finetune.py --pad-to-multiple-of); CPU shape cache")
    p.add_argument("--runtime-mem", default=None,
                   help="memory the process holds before the model (default: 640MiB CUDA context on a GPU, "
                        "420MiB interpreter + libraries on CPU)")
    p.add_argument("--interconnect-gbps", type=float, default=100.0, help="per-node NIC, Gbit/s")
    p.add_argument("--intra-gbps", type=float, default=2400.0, help="within a node, Gbit/s")
    p.add_argument("--tflops", type=float, default=100.0, help="achieved bf16 TFLOP/s per GPU")
    p.add_argument("--ds-config", help="take ZeRO stage, batch sizes, buckets, offload and optimizer from this "
                                       "ds_config")
    p.add_argument("--recipe", help="take what this launch/finetune.py recipe runs (LoRA, method, batch, optimizer, "
                                    "loss, ds_config …); flags given here override it")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p.parse_args(argv)


def auto_dtype(a: argparse.Namespace) -> str:
    """finetune --dtype auto's choice on the planned device: bf16 on a GPU or an AMX CPU (--cpu-amx); else the
    choice qlora_ds.hardware makes for this host's CPU."""
    if a.device == "cuda" or a.cpu_amx:
        return "bf16"
    from ..hardware import auto_dtype as host_auto, device_facts, dtype_name    # lazy: it imports torch
    return dtype_name(host_auto(device_facts("cpu"))[0])


def config_from_args(a: argparse.Namespace) -> PlanConfig:
    dtype = auto_dtype(a) if a.dtype in (None, "auto") else a.dtype
    cfg = PlanConfig(shape=load_shape(a.model), gpus_per_node=a.gpus, nodes=a.nodes,
                     gpu_mem_bytes=parse_mem(a.gpu_mem), device=a.device, pad_multiple=a.pad_multiple,
                     compute_dtype=dtype,      # a recipe's explicit dtype replaces it; its "auto" keeps it
                     chunked_loss=True,    # launch/finetune.py's default
                     runtime_bytes=parse_mem(a.runtime_mem) if a.runtime_mem is not None else None,
                     interconnect_gbps=a.interconnect_gbps, intra_node_gbps=a.intra_gbps, tflops=a.tflops,
                     **({"lora_dropout": 0.0} if a.lora_experts else {}))     # finetune --lora-experts needs it
    if a.recipe:
        cfg = apply_recipe(cfg, a.recipe)
    if a.ds_config:
        cfg = apply_ds_config(cfg, a.ds_config)
    overrides = {"seq_len": a.seq_len, "micro_batch": a.batch, "grad_accum": a.grad_accum,
                 "zero_stage": a.zero, "lora_r": a.lora_r, "base_bits": a.bits, "optim_bits": a.optim_bits,
                 "quant": a.quant, "group_size": a.group_size, "chunked_loss": a.chunked_loss,
                 "compute_dtype": dtype if a.dtype else None,
                 "experts_dequant_bytes": None if a.experts_dequant_mb is None else int(a.experts_dequant_mb * 2**20)}
    flags = {"grad_ckpt": False if a.no_grad_ckpt else None, "bf16_master": True if a.bf16_lora else None,
             "paged": True if a.paged else None, "fused_cpu_linear": True if a.cpu_amx else None,
             "packing": True if a.packing else None, "quantize_experts": False if a.no_quantize_experts else None,
             "lora_experts": True if a.lora_experts else None}
    changes = {k: v for k, v in {**overrides, **flags}.items() if v is not None}
    return replace(cfg, **changes)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    args = parse_args(argv)
    try:
        report = plan(config_from_args(args))
    except (QLoRADSError, OSError, ValueError) as e:
        log.error("error: %s", e)
        return 2
    log.info(json.dumps(report.as_dict(), indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
