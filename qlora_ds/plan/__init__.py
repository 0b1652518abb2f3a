"""Memory and scaling planner: will this QLoRA run fit, and how fast will it talk?

Works on model configs alone (no weights, no torch). ``plan(cfg)`` returns a ``PlanReport``;
``python -m qlora_ds.plan`` is the command line.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace

from ..errors import QLoRADSError
from .memory import (ALL_LINEAR, GiB, NF4_DQ_BITS, Advice, MemoryEstimate, PlanConfig, advise,
                     estimate_memory, lora_params, rank_for_fraction)
from .loss import loss_path
from .presets import PRESETS, ModelShape, load_shape
from .scaling import Scaling, estimate_scaling

__all__ = ["ALL_LINEAR", "NF4_DQ_BITS", "PRESETS", "Advice", "MemoryEstimate", "ModelShape", "PlanConfig",
           "PlanReport", "Scaling", "advise", "apply_ds_config", "apply_recipe", "estimate_memory",
           "estimate_scaling", "format_report", "load_shape", "lora_params", "parse_mem", "plan",
           "rank_for_fraction"]

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": GiB, "gb": GiB, "gib": GiB, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_mem(text: str) -> int:
    """'48GB' → bytes. GPU memory is sold in binary units, so GB is read as GiB (as nvidia-smi shows)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise QLoRADSError(f"memory size {text!r} not understood; write e.g. 48GB, 80GiB or 24576MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass(frozen=True)
class PlanReport:
    config: PlanConfig
    memory: MemoryEstimate
    scaling: Scaling
    advice: tuple

    @property
    def fits(self) -> bool:
        return self.memory.fits

    def as_dict(self) -> dict:
        c = self.config
        return {"model": c.shape.name, "world_size": c.world_size, "zero_stage": c.zero_stage,
                "compute_dtype": c.compute_dtype, "fits": self.fits, "memory": self.memory.as_dict(),
                "scaling": self.scaling.as_dict(),
                "advice": [{"knob": a.knob, "flag": a.flag, "required_bytes": int(a.peak_after),
                            "fits": a.fits_after} for a in self.advice]}


def plan(cfg: PlanConfig) -> PlanReport:
    mem = estimate_memory(cfg)
    return PlanReport(cfg, mem, estimate_scaling(cfg), tuple(advise(cfg)) if not mem.fits else ())


def _offload_device(zero: dict, key: str) -> str:
    section = zero.get(key) or {}
    device = str((section.get("device") if isinstance(section, dict) else None) or "none").lower()
    return "none" if device == "auto" else device


def apply_ds_config(cfg: PlanConfig, ds_config: dict | str) -> PlanConfig:
    """Take ZeRO stage, micro batch, accumulation, bucket size, offload and optimizer kind from a ds_config. A value
    that is absent or HF's "auto" keeps ``cfg``'s (the command line's, or a recipe's)."""
    if isinstance(ds_config, str):
        with open(ds_config) as f:
            ds_config = json.load(f)
    zero = ds_config.get("zero_optimization", {})
    bf16 = _bf16_section(ds_config)

    def num(section: dict, key: str, default) -> int:
        """An integer setting; HF's "auto" (filled by the trainer or the command line) reads as the default."""
        value = section.get(key, default)
        return int(float(default if value == "auto" else value))

    optimizer = {}
    if isinstance(ds_config.get("optimizer"), dict) and ds_config["optimizer"].get("type"):
        optimizer = _optimizer_settings(ds_config["optimizer"]["type"])
    accum_dtype = str((ds_config.get("data_types") or {}).get("grad_accum_dtype") or "").lower()
    if _offload_device(zero, "offload_param") != "none" and num(zero, "stage", 0) < 3:     # finetune refuses it too
        raise QLoRADSError(f"ds_config zero_optimization.offload_param needs ZeRO stage 3 (DeepSpeed ignores it at "
                           f"stage {num(zero, 'stage', 0)}): plan offload_optimizer, stage 3, or no offload_param")
    return replace(
        cfg,
        zero_stage=num(zero, "stage", 0),
        micro_batch=num(ds_config, "train_micro_batch_size_per_gpu", cfg.micro_batch),
        grad_accum=num(ds_config, "gradient_accumulation_steps", cfg.grad_accum),
        reduce_bucket_elems=num(zero, "reduce_bucket_size", 5e8),
        contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
        overlap_comm=bool(zero.get("overlap_comm", num(zero, "stage", 0) == 3)),
        offload_optimizer=_offload_device(zero, "offload_optimizer"),
        offload_param=_offload_device(zero, "offload_param"),
        grad_accum_fp32=accum_dtype in ("fp32", "float32", "float"),
        bf16_master=bool(bf16.get("bf16_master_weights_and_grads", False)),
        persistence_threshold=num(zero, "stage3_param_persistence_threshold", 1e5),
        max_live_parameters=num(zero, "stage3_max_live_parameters", 1e9),
        max_reuse_distance=num(zero, "stage3_max_reuse_distance", 1e9),
        **optimizer,
    )


def _bf16_section(ds_config: dict) -> dict:
    """DeepSpeed's bf16 section: "bf16", else its old name "bfloat16" (as qlora_ds.hardware.fold_bfloat16 reads it;
    plan/ imports no package module); both, disagreeing, is an error there and here."""
    if "bf16" in ds_config and "bfloat16" in ds_config and ds_config["bf16"] != ds_config["bfloat16"]:
        raise QLoRADSError(f"ds_config has both \"bf16\" ({ds_config['bf16']!r}) and its old name \"bfloat16\" "
                           f"({ds_config['bfloat16']!r}), and they disagree; keep only \"bf16\"")
    section = ds_config.get("bf16", ds_config.get("bfloat16")) or {}
    return section if isinstance(section, dict) else {}


def _optimizer_settings(name: str) -> dict:
    """paged / optim_bits of an optimizer name (ours: PagedAdamW, PagedAdamW8bit, AdamW8bit; or DeepSpeed's)."""
    name = str(name).lower()
    return {"paged": name.startswith("paged"), "optim_bits": 8 if "8bit" in name else 32}


def _find(path: str, near: str | None) -> str:
    """A recipe names its ds_config relative to the repository root; look there and next to the recipe."""
    if os.path.isabs(path) or os.path.exists(path) or near is None:
        return path
    here = os.path.dirname(os.path.abspath(near))
    for base in (here, os.path.dirname(here), os.path.dirname(os.path.dirname(here))):
        if os.path.exists(os.path.join(base, path)):
            return os.path.join(base, path)
    return path


# Every key ``launch/finetune.py --recipe`` accepts (its argparse destinations; it refuses any other, and so do we;
# tests/test_plan_zero.py checks the two agree). The planner reads those that change memory.
FINETUNE_KEYS = frozenset({
    "adam_beta2", "bits", "chunked_loss", "dataset", "dedup", "deepspeed", "double_quant", "ds_config", "dtype",
    "epochs", "eval_every", "eval_size", "grad_accum", "grad_ckpt", "group_by_length", "group_size", "heldout_groups",
    "help", "init_adapter", "keep_checkpoints", "local_rank", "log_every", "lora_alpha", "lora_dropout",
    "lora_experts", "lora_r", "loss_weighting", "lr", "lr_scheduler", "max_grad_norm", "max_len", "max_steps",
    "method", "micro_batch", "model", "nan_policy", "optimizer", "output_dir", "overwrite", "packing",
    "pad_to_multiple_of", "plain_bos", "pool", "quant_type", "quantize_experts", "recipe", "resume", "sample_prompt",
    "save_every", "seed", "target_modules", "text_windows", "train_on_prompt", "warmup_ratio", "weight0_untrained",
    "weight_decay"})
FINETUNE_OPTIMIZER = "PagedAdamW"     # finetune's optimizer when neither the recipe nor the ds_config names one


def _check_recipe_vs_ds(recipe: dict, ds: dict, where: str) -> None:
    """finetune's rule (qlora_ds.ds_config): a setting given in both the recipe and the ds_config must agree."""
    bad = [f"{key} {recipe[key]} vs ds_config {ds_key} {ds[ds_key]}"
           for key, ds_key in (("micro_batch", "train_micro_batch_size_per_gpu"),
                               ("grad_accum", "gradient_accumulation_steps"))
           if recipe.get(key) is not None and ds.get(ds_key, "auto") != "auto" and int(ds[ds_key]) != recipe[key]]
    section = ds.get("optimizer") if isinstance(ds.get("optimizer"), dict) else {}
    if recipe.get("optimizer") and section.get("type") and str(section["type"]).lower() != recipe["optimizer"].lower():
        bad.append(f"optimizer {recipe['optimizer']} vs ds_config {section['type']}")
    if bad:
        raise QLoRADSError(f"recipe {where} and its ds_config disagree ({'; '.join(bad)}); finetune refuses this: set "
                           "each in one place only")


def apply_recipe(cfg: PlanConfig, recipe: dict | str) -> PlanConfig:
    """What a ``launch/finetune.py --recipe`` file (flat keys) runs: LoRA rank/dropout/targets, method (QLoRA NF4 or
    QA-LoRA INT-N with its bits and group size), MoE experts in 4 bit or not (with LoRA or not), max length, micro
    batch, accumulation, optimizer, dtype, chunked loss, checkpointing, packing and the ds_config. A key finetune
    does not know is an error, as it is there; keys it lacks take finetune's defaults for the loss (chunked) and the
    optimizer (PagedAdamW), else ``cfg``'s. A dtype of "auto" (or none) keeps ``cfg.compute_dtype``: the caller
    resolves auto for the planned device, as ``python -m qlora_ds.plan`` does."""
    path = recipe if isinstance(recipe, str) else None
    if path is not None:
        with open(path) as f:
            recipe = json.load(f)
    where = path or "(dict)"
    recipe = {k.replace("-", "_"): v for k, v in recipe.items() if not k.startswith("_")}
    unknown = sorted(set(recipe) - FINETUNE_KEYS)
    if unknown:
        raise QLoRADSError(f"recipe {where} has unknown keys {unknown}; launch/finetune.py would refuse it too "
                           "(see `launch/finetune.py --help`)")
    method = recipe.get("method", "qlora")
    if method not in ("qlora", "qalora"):
        raise QLoRADSError(f"recipe {where}: method {method!r}; use qlora or qalora")
    dtype = recipe.get("dtype", "auto")
    if dtype not in ("auto", "bf16", "fp16", "fp32"):
        raise QLoRADSError(f"recipe {where}: dtype {dtype!r}; use auto, bf16, fp16 or fp32")
    targets = recipe.get("target_modules")
    ds = recipe.get("ds_config")
    if isinstance(ds, str):
        ds = _find(ds, path)
    if isinstance(ds, str):
        with open(ds) as f:
            ds = json.load(f)
    ds = ds or {}
    _check_recipe_vs_ds(recipe, ds, where)
    qalora = method == "qalora"
    cfg = replace(
        cfg,
        lora_r=int(recipe.get("lora_r", cfg.lora_r)),
        lora_dropout=float(recipe.get("lora_dropout", cfg.lora_dropout)),
        lora_targets=tuple(targets) if targets else ALL_LINEAR,
        seq_len=int(recipe.get("max_len", cfg.seq_len)),
        micro_batch=int(recipe.get("micro_batch") or cfg.micro_batch),
        grad_accum=int(recipe.get("grad_accum") or cfg.grad_accum),
        grad_ckpt=bool(recipe.get("grad_ckpt", cfg.grad_ckpt)),
        double_quant=bool(recipe.get("double_quant", cfg.double_quant)),
        quantize_experts=bool(recipe.get("quantize_experts", cfg.quantize_experts)),
        lora_experts=bool(recipe.get("lora_experts", cfg.lora_experts)),
        packing=bool(recipe.get("packing", cfg.packing)),
        pad_multiple=int(recipe.get("pad_to_multiple_of", cfg.pad_multiple)),
        chunked_loss=bool(recipe.get("chunked_loss", True)),
        compute_dtype=cfg.compute_dtype if dtype == "auto" else dtype,
        quant="int" if qalora else "nf4",
        base_bits=int(recipe.get("bits", 4)) if qalora else 4,
        group_size=int(recipe.get("group_size", cfg.group_size)),
        **_optimizer_settings(recipe.get("optimizer") or FINETUNE_OPTIMIZER),
    )
    return apply_ds_config(cfg, ds) if ds else cfg


def _gib(x: float) -> str:
    return f"{x / GiB:7.2f} GiB"


def _loss_words(c: PlanConfig) -> str:
    """How the run computes its loss (plan/loss.py decides as qlora_ds.loss does)."""
    _, why = loss_path(c)
    if why is None:
        return "chunked"
    return "over the full logits" + ("" if not c.chunked_loss else f" (the chunked loss does not run: {why})")


def format_report(r: PlanReport) -> str:
    c, m, s = r.config, r.memory, r.scaling
    lines = [f"{c.shape.name}: {c.world_size} GPU(s) ({c.nodes} node(s) x {c.gpus_per_node}), ZeRO-{c.zero_stage}, "
             f"{c.compute_dtype} compute, base {c.base_bits_per_param:.3f} bit, LoRA r={c.lora_r}, seq {c.seq_len} x "
             f"micro batch {c.micro_batch}, grad ckpt {'on' if c.grad_ckpt else 'off'}, "
             f"{'paged ' if c.paged else ''}Adam {c.optim_bits}-bit, loss {_loss_words(c)}"
             + (f", MoE experts {4 if c.experts_4bit else 8 * c.elem}-bit" if c.shape.experts else "")
             + (" with LoRA" if c.shape.experts and c.lora_experts else "")
             + (f", optimizer offload {c.offload_optimizer}" if c.offload_optimizer != "none" else "")
             + (f", param offload {c.offload_param}" if c.offload_param != "none" else ""),
             "per-GPU memory:"]
    for it in m.items:
        tag = it.phase + (", spillable" if it.spillable else "")
        lines.append(f"  {it.name:22s} {_gib(it.bytes)}  [{tag}] {it.note}")
    lines.append(f"  {'peak (all resident)':22s} {_gib(m.peak)}")
    lines.append(f"  {'must stay resident':22s} {_gib(m.required)}  of {_gib(m.capacity)}")
    if m.host:
        lines.append(f"  {'on the host (offload)':22s} {_gib(m.host)}  (not on the GPU)")
    if m.fits and m.paged_out:
        verdict = f"fits: yes, fits (paging ~{m.paged_out / GiB:.2f} GiB of optimizer state to host at peak)"
    elif m.fits:
        verdict = f"fits: yes, fits with {(m.capacity - m.peak) / GiB:.2f} GiB to spare"
    else:
        verdict = f"fits: NO, does not fit: {(m.required - m.capacity) / GiB:.2f} GiB over"
    lines.append(verdict)
    if c.world_size > 1:
        lines.append("communication per rank per optimizer step:")
        for k, v in s.volume.items():
            lines.append(f"  {k:28s} {_gib(v)}")
    lines.append(f"step estimate: compute {s.compute_s:.2f} s, communication {s.comm_s:.2f} s "
                 f"({c.interconnect_gbps:g} Gbit/s between nodes), step {s.step_s_lower:.2f}-{s.step_s_upper:.2f} s "
                 f"at {c.tflops:g} TFLOP/s per GPU, {s.tokens_per_step} tokens/step")
    for a in r.advice:
        lines.append(f"advice: {a.knob} ({a.flag}): needs {a.peak_after / GiB:.2f} GiB"
                     f"{' -> fits' if a.fits_after else ''}")
    return "\n".join(lines)
