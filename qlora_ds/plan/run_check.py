"""The planner's prediction for a finetune run, set beside the peak the run measured.

``launch/finetune.py`` calls ``memory_check`` at the end of training and writes the result into its
summary, so every run checks the planner: on CPU against the process's peak RSS (with the memory the
process held before loading the model as the planner's runtime term), on CUDA against
``torch.cuda.max_memory_allocated`` (which leaves out the CUDA context, so the runtime term is 0).
"""
from __future__ import annotations

from . import apply_ds_config
from .memory import ALL_LINEAR, MiB, PlanConfig, estimate_memory
from .presets import shape_from_hf_config


def config_for_run(hf_config: dict, ds_config: dict, *, world: int, device: str, seq_len: int, lora_r: int,
                   lora_dropout: float, targets, grad_ckpt: bool, method: str = "qlora", bits: int = 4,
                   group_size: int = 32, double_quant: bool = True, runtime_bytes: int | None = None,
                   pad_multiple: int = 16, chunked_loss: bool = False, compute_dtype="bf16",
                   fused_cpu_linear: bool = False, packing: bool = False,
                   width_sum: int | None = None, quantize_experts: bool = True,
                   lora_experts: bool = False) -> PlanConfig:
    """A PlanConfig for one rank of a run; ``QLoRADSError`` when the planner cannot model the model
    (a model type plan/layouts.py lacks, or target modules that match none of its linears). ``compute_dtype``: the dtype
    the run computes and keeps its embeddings in: "bf16", "fp16", "fp32" or the torch dtype;
    ``fused_cpu_linear``: this CPU runs the fused AMX linear (``qlora_ds.ops.fused_linear.available()``);
    ``packing``: packed rows with attention per example (``finetune --packing``); ``width_sum``: the sum of the
    distinct batch widths the run met (None: every multiple of ``pad_multiple`` up to ``seq_len``);
    ``quantize_experts``: finetune --quantize-experts (a MoE's experts in 4 bit; QA-LoRA leaves them 16-bit);
    ``lora_experts``: finetune --lora-experts (LoRA on those 4-bit experts too)."""
    compute_dtype = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}.get(
        str(compute_dtype), compute_dtype)
    targets = tuple(targets) if targets else ALL_LINEAR
    cfg = PlanConfig(shape=shape_from_hf_config(hf_config), gpus_per_node=world, device=device, seq_len=seq_len,
                     lora_r=lora_r, lora_dropout=lora_dropout, lora_targets=targets, grad_ckpt=grad_ckpt,
                     base_bits=bits if method == "qalora" else 4, quant="int" if method == "qalora" else "nf4",
                     group_size=group_size, double_quant=double_quant, runtime_bytes=runtime_bytes,
                     pad_multiple=pad_multiple, chunked_loss=chunked_loss, compute_dtype=compute_dtype,
                     fused_cpu_linear=fused_cpu_linear, packing=packing, width_sum=width_sum,
                     quantize_experts=quantize_experts, lora_experts=lora_experts)
    return apply_ds_config(cfg, ds_config)


def memory_check(cfg: PlanConfig, measured_bytes: float) -> dict:
    """Planned vs measured peak (MiB) and planned / measured. On CPU, paged optimizer state is host
    memory anyway, so the whole peak is compared. On a GPU the paged state lives in CUDA managed memory,
    which torch's allocator (``max_memory_allocated``) does not count: the planner's ``required``."""
    mem = estimate_memory(cfg)
    planned = mem.peak if cfg.device == "cpu" else mem.required
    _, runtime, _ = cfg.runtime
    # The runtime term is measured by the run itself on CPU: the comparison that tests the planner is the part above it
    above = measured_bytes - runtime
    return {"device": cfg.device, "seq_len": cfg.seq_len, "micro_batch": cfg.micro_batch,
            "planned_peak_mib": round(planned / MiB, 1), "measured_peak_mib": round(measured_bytes / MiB, 1),
            "runtime_mib": round(runtime / MiB, 1),
            "planned_over_measured": round(planned / measured_bytes, 3) if measured_bytes else None,
            "planned_over_measured_above_runtime": round((planned - runtime) / above, 3) if above > 0 else None,
            "items_mib": {it.name: round(it.bytes / MiB, 1) for it in mem.items}}
