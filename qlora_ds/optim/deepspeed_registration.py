"""Use our optimizers from a ds_config: ``"optimizer": {"type": "PagedAdamW", "params": {...}}``.

DeepSpeed builds only its own (and torch.optim's) optimizer names, so the launch script calls
:func:`deepspeed_initialize` (or :func:`register_with_deepspeed` + :func:`split_ds_config` +
:func:`optimizer_from_ds_config` itself): the optimizer section is popped from a *copy* of the config, our
optimizer is built from it and handed to ``deepspeed.initialize`` as the client optimizer. DeepSpeed then does
gradient clipping, bf16/fp16 and loss scaling, ZeRO partitioning and checkpointing around it. The caller's config
is never modified.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Iterable

import torch

from .adamw import AdamW8bit, PagedAdamW, PagedAdamW8bit

__all__ = ["OPTIMIZERS", "register_with_deepspeed", "split_ds_config", "optimizer_from_ds_config",
           "deepspeed_initialize", "undo_fp16_warmup_step"]

OPTIMIZERS = {"pagedadamw": PagedAdamW, "pagedadamw32bit": PagedAdamW, "pagedadamw8bit": PagedAdamW8bit,
              "adamw8bit": AdamW8bit}
OPTIMIZER_CLASSES = (PagedAdamW, PagedAdamW8bit, AdamW8bit)
_PARAMS = {"lr", "betas", "eps", "weight_decay", "blocksize", "min_8bit_size"}


def register_with_deepspeed() -> None:
    """Declare our optimizers ZeRO-compatible to DeepSpeed (idempotent).

    DeepSpeed's ZeRO sanity check asserts on any optimizer outside ``deepspeed.runtime.zero.utils.
    ZERO_SUPPORTED_OPTIMIZERS`` unless the config sets ``zero_allow_untested_optimizer``; DeepSpeed itself extends
    that list for apex and Muon, and so do we (tested under ZeRO 0-3, see tests/test_optim_deepspeed.py). Call it
    before ``deepspeed.initialize`` when not going through :func:`deepspeed_initialize`. Nothing else is patched.
    """
    from deepspeed.runtime.zero import utils as zero_utils

    for cls in (PagedAdamW, PagedAdamW8bit, AdamW8bit):
        if cls not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
            zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(cls)


def _load(ds_config: dict | str | os.PathLike) -> dict:
    if isinstance(ds_config, (str, os.PathLike)):
        with open(ds_config) as f:
            return json.load(f)
    if not isinstance(ds_config, dict):
        raise ValueError(f"ds_config must be a dict or a path to a JSON file, got {type(ds_config).__name__}")
    return copy.deepcopy(ds_config)


def _check_zero(cfg: dict, type_name: str) -> None:
    """Validate the ZeRO settings for our client optimizer (clear errors for combinations DeepSpeed rejects)."""
    zero = cfg.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage must be 0-3, got {stage}")
    if zero.get("elastic_checkpoint"):
        # DeepSpeed's elastic load asserts a group-level "step" (ours is per parameter) and would re-pad the 8-bit
        # absmax and re-create codes as fp32: every checkpoint of such a run could never be resumed
        raise ValueError(f"zero_optimization.elastic_checkpoint cannot be used with {type_name!r} (its checkpoints "
                         f"would not load); remove it — resuming needs the same number of ranks anyway")
    offload = zero.get("offload_optimizer") or {}
    device = offload.get("device", "none") if isinstance(offload, dict) else "none"
    if device not in (None, "none"):
        if device == "nvme":
            raise ValueError(f"optimizer {type_name!r} cannot run with offload_optimizer.device='nvme' (DeepSpeed "
                             f"swaps only its own optimizers' state); use device 'cpu' or remove offload_optimizer")
        if stage == 0:
            raise ValueError("offload_optimizer needs ZeRO stage 1, 2 or 3")
        if cfg.get("zero_force_ds_cpu_optimizer", True):
            raise ValueError(f"offload_optimizer.device='cpu' with the client optimizer {type_name!r}: DeepSpeed "
                             f"rejects non-DeepSpeed CPU optimizers unless the config sets "
                             f"\"zero_force_ds_cpu_optimizer\": false — add it (the optimizer then steps on the CPU "
                             f"partitions; its paging is a no-op there)")


def split_ds_config(ds_config: dict | str | os.PathLike) -> tuple[dict, dict | None]:
    """(a copy of the config without our optimizer section, that section) — (copy, None) if it names another."""
    cfg = _load(ds_config)
    section = cfg.get("optimizer")
    if not isinstance(section, dict) or str(section.get("type", "")).lower() not in OPTIMIZERS:
        return cfg, None
    _check_zero(cfg, section["type"])
    unknown = set(section) - {"type", "params"}
    if unknown:
        raise ValueError(f"optimizer section has unknown keys {sorted(unknown)}; expected 'type' and 'params'")
    params = section.get("params") or {}
    bad = set(params) - _PARAMS
    if bad:
        raise ValueError(f"optimizer {section['type']!r} does not take {sorted(bad)}; accepted params: "
                         f"{sorted(_PARAMS)}")
    del cfg["optimizer"]
    return cfg, section


def optimizer_from_ds_config(ds_config: dict | str | os.PathLike,
                             params: Iterable[torch.nn.Parameter] | Iterable[dict]) -> torch.optim.Optimizer | None:
    """Build our optimizer named by ``ds_config['optimizer']``; None when the config names a DeepSpeed one."""
    _, section = split_ds_config(ds_config)
    return None if section is None else _build(section, params)


def _build(section: dict, params) -> torch.optim.Optimizer:
    cls = OPTIMIZERS[section["type"].lower()]
    kwargs = dict(section.get("params") or {})
    if "blocksize" in kwargs or "min_8bit_size" in kwargs:
        if cls is PagedAdamW:
            raise ValueError(f"{section['type']!r} keeps 32-bit state: blocksize/min_8bit_size apply only to "
                             f"PagedAdamW8bit / AdamW8bit")
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    params = list(params)
    if not params:
        raise ValueError("no parameters to optimize (are all parameters frozen?)")
    return cls(params, **kwargs)


def deepspeed_initialize(model: torch.nn.Module, config: dict | str | os.PathLike, model_parameters=None, **kwargs):
    """``deepspeed.initialize`` that also accepts our optimizer names in ``config['optimizer']``.

    ``model_parameters`` defaults to the trainable parameters of ``model``. Returns what deepspeed.initialize
    returns (engine, optimizer, dataloader, lr_scheduler).
    """
    import deepspeed

    register_with_deepspeed()
    cfg, section = split_ds_config(config)
    if model_parameters is None:
        model_parameters = [p for p in model.parameters() if p.requires_grad]
    if section is not None:
        if kwargs.get("optimizer") is not None:
            raise ValueError(f"config names optimizer {section['type']!r} and a client optimizer was passed too; "
                             f"use one of them")
        model_parameters = list(model_parameters)
        kwargs["optimizer"] = _build(section, model_parameters)
    out = deepspeed.initialize(model=model, config=cfg, model_parameters=model_parameters, **kwargs)
    undo_fp16_warmup_step(out[0])
    return out


def undo_fp16_warmup_step(engine) -> None:
    """fp16 without ZeRO wraps any optimizer but DeepSpeed's FusedAdam in ``FP16_UnfusedOptimizer``, whose setup
    steps it once on zero gradients to create its state: Adam's step count would start one ahead (the first real
    update at step 2's bias correction, ~0.74·lr) and weight decay would shrink the fp32 masters before training.
    For our optimizers: their state is dropped (made fresh at the first real step) and the masters copied again
    from the (untouched) fp16 parameters."""
    try:
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    except ImportError:
        return
    wrapper = getattr(engine, "optimizer", None)
    if not isinstance(wrapper, FP16_UnfusedOptimizer) or not isinstance(wrapper.optimizer, OPTIMIZER_CLASSES):
        return
    wrapper.optimizer.free()
    with torch.no_grad():
        for half, full in zip(wrapper.fp16_groups, wrapper.fp32_groups):
            for p16, p32 in zip(half, full):
                p32.copy_(p16)
