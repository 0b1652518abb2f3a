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
                "fits": self.fits, "memory": self.memory.as_dict(), "scaling": self.scaling.as_dict(),
                "advice": [{"knob": a.knob, "flag": a.flag, "required_bytes": int(a.peak_after),
                            "fits": a.fits_after} for a in self.advice]}


def plan(cfg: PlanConfig) -> PlanReport:
    mem = estimate_memory(cfg)
    return PlanReport(cfg, mem, estimate_scaling(cfg), tuple(advise(cfg)) if not mem.fits else ())


def apply_ds_config(cfg: PlanConfig, ds_config: dict | str) -> PlanConfig:
    """Take ZeRO stage, micro batch, accumulation, bucket size and optimizer kind from a ds_config."""
    if isinstance(ds_config, str):
        with open(ds_config) as f:
            ds_config = json.load(f)
    zero = ds_config.get("zero_optimization", {})
    opt_type = str(ds_config.get("optimizer", {}).get("type", "")).lower()
    bf16 = ds_config.get("bf16", {})

    def num(section: dict, key: str, default) -> int:
        """An integer setting; HF's "auto" (filled by the trainer or the command line) reads as the default."""
        value = section.get(key, default)
        return int(float(default if value == "auto" else value))

    return replace(
        cfg,
        zero_stage=num(zero, "stage", 0),
        micro_batch=num(ds_config, "train_micro_batch_size_per_gpu", cfg.micro_batch),
        grad_accum=num(ds_config, "gradient_accumulation_steps", cfg.grad_accum),
        reduce_bucket_elems=num(zero, "reduce_bucket_size", 5e8),
        overlap_comm=bool(zero.get("overlap_comm", num(zero, "stage", 0) == 3)),
        paged=opt_type.startswith("paged"),
        optim_bits=8 if "8bit" in opt_type else 32,
        bf16_master=bool(bf16.get("bf16_master_weights_and_grads", False)),
        persistence_threshold=num(zero, "stage3_param_persistence_threshold", 1e5),
        max_live_parameters=num(zero, "stage3_max_live_parameters", 1e9),
        max_reuse_distance=num(zero, "stage3_max_reuse_distance", 1e9),
    )


def _find(path: str, near: str | None) -> str:
    """A recipe names its ds_config relative to the repository root; look there and next to the recipe."""
    if os.path.isabs(path) or os.path.exists(path) or near is None:
        return path
    here = os.path.dirname(os.path.abspath(near))
    for base in (here, os.path.dirname(here), os.path.dirname(os.path.dirname(here))):
        if os.path.exists(os.path.join(base, path)):
            return os.path.join(base, path)
    return path


def apply_recipe(cfg: PlanConfig, recipe: dict | str) -> PlanConfig:
    """Take LoRA rank/dropout/targets, max length, checkpointing, packing and the ds_config from a recipe file
    (the flat ``launch/finetune.py --recipe`` format)."""
    path = recipe if isinstance(recipe, str) else None
    if path is not None:
        with open(path) as f:
            recipe = json.load(f)
    targets = recipe.get("target_modules")
    cfg = replace(
        cfg,
        lora_r=int(recipe.get("lora_r", cfg.lora_r)),
        lora_dropout=float(recipe.get("lora_dropout", cfg.lora_dropout)),
        lora_targets=tuple(targets) if targets else ALL_LINEAR,
        seq_len=int(recipe.get("max_len", cfg.seq_len)),
        grad_ckpt=bool(recipe.get("grad_ckpt", cfg.grad_ckpt)),
        double_quant=bool(recipe.get("double_quant", cfg.double_quant)),
        packing=bool(recipe.get("packing", cfg.packing)),
    )
    ds = recipe.get("ds_config")
    if isinstance(ds, str):
        ds = _find(ds, path)
    return apply_ds_config(cfg, ds) if ds else cfg


def _gib(x: float) -> str:
    return f"{x / GiB:7.2f} GiB"


def format_report(r: PlanReport) -> str:
    c, m, s = r.config, r.memory, r.scaling
    lines = [f"{c.shape.name}: {c.world_size} GPU(s) ({c.nodes} node(s) x {c.gpus_per_node}), ZeRO-{c.zero_stage}, "
             f"base {c.base_bits_per_param:.3f} bit, LoRA r={c.lora_r}, seq {c.seq_len} x micro batch "
             f"{c.micro_batch}, grad ckpt {'on' if c.grad_ckpt else 'off'}, "
             f"{'paged ' if c.paged else ''}Adam {c.optim_bits}-bit",
             "per-GPU memory:"]
    for it in m.items:
        tag = it.phase + (", spillable" if it.spillable else "")
        lines.append(f"  {it.name:22s} {_gib(it.bytes)}  [{tag}] {it.note}")
    lines.append(f"  {'peak (all resident)':22s} {_gib(m.peak)}")
    lines.append(f"  {'must stay resident':22s} {_gib(m.required)}  of {_gib(m.capacity)}")
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
