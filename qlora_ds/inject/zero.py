"""ZeRO helpers: adapter save and load that gather only the LoRA tensors, and per-rank byte accounting."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from ..errors import QLoRADSError
from ..nn.quantized_experts import is_quantized_experts
from .replace import is_quantized_layer, lora_parameters


def unwrap(engine_or_model) -> nn.Module:
    """The nn.Module inside a DeepSpeed engine (or the module itself)."""
    module = getattr(engine_or_model, "module", engine_or_model)
    if not isinstance(module, nn.Module):
        raise QLoRADSError(f"expected a DeepSpeed engine or an nn.Module, got {type(engine_or_model).__name__}")
    return module


def _rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gathered(params, modifier_rank: int | None = None):
    """``deepspeed.zero.GatheredParameters`` over the ZeRO-3 partitioned ones of ``params`` (a no-op context when
    none is): read-only with ``modifier_rank=None``, else that rank's changes are scattered back."""
    ds = [p for p in params if hasattr(p, "ds_id")]
    if not ds:
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(ds, modifier_rank=modifier_rank)


def save_adapter(engine_or_model, directory: str, base_model_name_or_path: str | None = None,
                 barrier: bool = True) -> None:
    """Write the LoRA adapter in PEFT format from rank 0.

    Under ZeRO-3 only the LoRA A/B parameters are gathered (``GatheredParameters``, read-only) —
    never the quantized base — so the file is complete without a ``zero_to_fp32`` step. Every rank
    must call this (the gather is a collective); only rank 0 writes, and the ranks then wait for it
    (``barrier=False``: the caller synchronises, e.g. with its own all-ok flag, so a failed write raises on
    rank 0 without leaving the others in a barrier).
    """
    from ..adapters import save_adapter as write_adapter
    model = unwrap(engine_or_model)
    lora = lora_parameters(model)
    if not lora:
        raise QLoRADSError("the model has no LoRA parameters; load it with qlora_ds.from_pretrained or inject() "
                           "before saving an adapter")
    with gathered(lora.values()):   # write inside the gather: the writer checks the (then full) parameter shapes
        if _rank() == 0:
            state = {n: p.detach().to("cpu", torch.float32).clone() for n, p in lora.items()}
            write_adapter(model, directory, base_model_name_or_path=base_model_name_or_path,
                          model_state=state.items())
    import torch.distributed as dist
    if barrier and dist.is_available() and dist.is_initialized():
        dist.barrier()


def load_adapter(engine_or_model, directory: str) -> list[str]:
    """Load a PEFT-format adapter (``qlora_ds.adapters.load_adapter``: checked, all or nothing) into a model whose
    LoRA parameters may be ZeRO-3 partitions; returns the module paths loaded.

    Every rank reads and checks the file (an error is raised on all ranks alike, so none waits in a collective) and
    sets the layers' scaling; under ZeRO-3 the LoRA tensors are gathered with ``modifier_rank=0`` and rank 0's
    copy is scattered back into the partitions. Every rank must call this (the gather is a collective). Call it
    before ``deepspeed.initialize`` (the optimizer's fp32 masters are taken from the parameters there)."""
    from ..adapters import load_adapter as read_into
    model = unwrap(engine_or_model)
    with gathered(lora_parameters(model).values(), modifier_rank=0):
        return read_into(model, directory)


def quantized_bytes_on_this_rank(model: nn.Module) -> tuple[int, int]:
    """(bytes of the quantized layers' and 4-bit MoE experts' frozen uint8 parameters held by this rank, their full
    size).

    Under ZeRO-3 a partitioned parameter holds its shard in ``ds_tensor`` (1/N, padded) and an empty
    ``data``; otherwise the whole tensor is local.
    """
    local = full = 0
    for module in unwrap(model).modules():
        if not (is_quantized_layer(module) or is_quantized_experts(module)):
            continue
        for p in module.parameters(recurse=False):
            if p.dtype != torch.uint8:
                continue
            if hasattr(p, "ds_tensor"):
                local += p.ds_tensor.numel() * p.ds_tensor.element_size()
                full += p.ds_numel * p.element_size()
            else:
                local += p.numel() * p.element_size()
                full += p.numel() * p.element_size()
    return local, full
