"""Fused MoE experts in 4 bit: transformers 5 stores a MoE layer's experts as 3-D parameters of one module
(``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I); transposed in GPT-OSS and Llama-4), which are no
``nn.Linear`` and so no QLoRALinear. In a MoE model they are most of the weights (Qwen3-30B-A3B: 96%, Mixtral: 96%),
and transformers + bitsandbytes leaves them in 16 bit. ``quantize_experts`` stores each such parameter NF4/FP4
(double quantization as the config says), as bitsandbytes' ``quantize_4bit`` would store that tensor, in place:

* the module keeps its class's forward (every experts implementation of transformers: eager, grouped_mm,
  batched_mm; any layout) and its other parameters (biases); its class becomes a subclass that, per call,
  dequantizes the 3-D weights in the input's dtype and runs that forward with them;
* while the call is recorded for backward it runs under a (non-reentrant) activation checkpoint, so autograd
  keeps neither the dequantized weights nor the experts' activations; backward recomputes them (one layer's
  experts at a time, in the compute dtype, is the transient the planner counts). Gradients flow to the inputs
  (hidden states, routing weights), never to the frozen weights;
* a call whose tokens reach at most half the experts (decoding, short prompts) dequantizes only those: the
  model's forward then sees a layer of just them (its routing indices remapped, ``num_experts`` that count);
* parameter ``name`` becomes frozen uint8 parameters (ZeRO-3 partitions them as it does QLoRALinear's):
  ``{name}_packed`` (codes), ``{name}_absmax`` (DQ codes, or the fp32 absmax's bytes), and with double
  quantization ``{name}_absmax2`` (fp32 bytes) and ``{name}_offset`` (4 bytes); ``module.{name}`` reads a
  dequantized copy.

The 4-bit weights are frozen; ``QLoRAConfig.lora_experts`` gives them LoRA adapters in PEFT's ``target_parameters``
layout (``qlora_ds.nn.experts_lora``), added to the dequantized weights per call.
"""
from __future__ import annotations

import contextlib
import os
import re

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..errors import QLoRADSError
from ..quant.nf4 import QuantizedTensor, quantize
from . import experts_lora
from .functional import dequantize_nf4_parts
from .qlora_linear import _frozen, part_sizes, stored_parts

PARTS = ("packed", "absmax", "absmax2", "offset")
_CLASSES: dict[type, type] = {}
# The most bytes of one layer's expert weights dequantized at once (in the compute dtype). A layer above it
# (DeepSeek-V3: ~22 GB in bf16) runs its experts in groups that fit (``_forward_grouped``); the planner's
# ``moe_experts_recompute`` counts the same bound. Llama-4's experts, called with every expert's tokens at once
# (no routing indices), are not grouped.
DEQUANT_LIMIT = int(float(os.environ.get("QLORA_DS_EXPERTS_DEQUANT_MB", "2048")) * (1 << 20))


def expert_weight_names(module: nn.Module) -> list[str]:
    """The fused expert weights of a MoE experts module: the own 3-D floating parameters of a module whose class is
    an experts class (every one in transformers 5.23 is named ``*Experts``; a Conv1d's 3-D weight is no expert)."""
    if re.search("expert", type(module).__name__, re.I) is None:
        return []
    return [n for n, p in module._parameters.items() if p is not None and p.dim() == 3 and p.is_floating_point()]


def is_quantized_experts(module: nn.Module) -> bool:
    return isinstance(module, QuantizedExperts)


class QuantizedExperts(nn.Module):
    """Mixin put in front of an experts module's class by ``quantize_experts`` (see the module doc)."""

    # per instance (set by quantize_experts): {name: (shape, dtype)}, the quantization settings, live weights
    _qds_weights: dict
    _qds_quant: tuple          # (quant_type, blocksize, double_quant, nested_blocksize)

    def __getattr__(self, name: str):
        live = self.__dict__.get("_qds_live")
        if live is not None and name in live:   # in a forward: the dequantized weights (and a few-experts call's
            return live[name]                   # biases)
        weights = self.__dict__.get("_qds_weights")
        if weights is not None and name in weights:
            return self.dequantized(name)        # outside a forward: a fresh copy (merge, export, inspection)
        return super().__getattr__(name)

    # ------------------------------------------------------------------ storage
    def set_quantized(self, name: str, qt: QuantizedTensor) -> None:
        """Fill ``name``'s parameters from ``qt`` (on a meta skeleton they are replaced, else copied into)."""
        shape, _ = self._qds_weights[name]
        quant_type, blocksize, dq, nested = self._qds_quant
        if tuple(qt.shape) != tuple(shape):
            raise QLoRADSError(f"quantized {name} has shape {tuple(qt.shape)}, the experts expect {tuple(shape)}")
        got = (qt.quant_type, qt.blocksize, qt.double_quant, qt.nested_blocksize if qt.double_quant else nested)
        if got != (quant_type, blocksize, dq, nested):
            raise QLoRADSError(f"quantized {name} has (quant_type, blocksize, double_quant, nested_blocksize)={got} "
                               f"but the experts' config says {(quant_type, blocksize, dq, nested)}")
        with torch.no_grad():
            for part, value in stored_parts(qt).items():
                key = f"{name}_{part}"
                param = self._parameters.get(key)
                if param is None or param.is_meta or param.numel() != value.numel():
                    if param is not None and not param.is_meta:
                        raise QLoRADSError(f"{key}: {value.numel()} elements do not fit the experts' {param.numel()}")
                    self._parameters[key] = _frozen(value.clone())
                else:
                    param.copy_(value.to(param.device))
        self._qds_weights[name] = (shape, qt.dtype)

    def _offset(self, name: str) -> float | None:
        """The double-quant offset as a python float, read once per parameter object and version (a forward
        must not sync the device per layer); None without double quantization."""
        param = self._parameters.get(f"{name}_offset")
        if param is None or param.is_meta or param.numel() != 4:
            return None
        cache = self.__dict__.setdefault("_qds_offsets", {})
        hit = cache.get(name)
        if hit is None or hit[0] is not param or hit[1] != param._version:
            hit = cache[name] = (param, param._version, param.detach().view(torch.float32).item())
        return hit[2]

    def dequantized(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Parameter ``name`` as a float tensor of its original shape (``dtype``: default its original dtype)."""
        shape, orig = self._qds_weights[name]
        quant_type, blocksize, dq, nested = self._qds_quant
        p = self._parameters
        return dequantize_nf4_parts(p[f"{name}_packed"], p[f"{name}_absmax"], p.get(f"{name}_absmax2"),
                                    self._offset(name) if dq else None,
                                    (tuple(shape), quant_type, blocksize, nested), dtype or orig)

    def quantized(self, name: str) -> QuantizedTensor:
        shape, orig = self._qds_weights[name]
        quant_type, blocksize, dq, nested = self._qds_quant
        p = self._parameters
        return QuantizedTensor(packed=p[f"{name}_packed"],
                               absmax=p[f"{name}_absmax"] if dq else p[f"{name}_absmax"].view(torch.float32),
                               shape=torch.Size(shape), dtype=orig, blocksize=blocksize, quant_type=quant_type,
                               absmax2=p[f"{name}_absmax2"].view(torch.float32) if dq else None,
                               offset=self._offset(name) if dq else None, nested_blocksize=nested)

    # ------------------------------------------------------------------ compute
    def forward(self, *args, **kwargs):
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        tensors += experts_lora.lora_parameters(self)
        recorded = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        floats = [t for t in tensors if t.is_floating_point()]
        group = self._group_size(floats[0].dtype if floats else None)
        routed = self._routed(args, kwargs, group)
        if routed is not None and routed[0].numel() > group:
            return self._forward_grouped(*args, *routed, group=group, recorded=recorded)
        few = routed if routed is not None and routed[0].numel() * 2 <= self.__dict__["num_experts"] else None
        if recorded:
            return checkpoint(self._forward_dequantized, few, *args, use_reentrant=False, **kwargs)
        return self._forward_dequantized(few, *args, **kwargs)

    def _forward_dequantized(self, few, *args, **kwargs):
        """The class's forward with the weights dequantized: only experts ``few[0]`` when given (``few[1]``: the
        routing indices renumbered over them), else all."""
        floats = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        dtype = floats[0].dtype if floats else None
        if few is not None:
            return self._forward_experts(args[0], few[1], args[2], few[0], dtype)
        live = {name: experts_lora.with_lora(self, name, self.dequantized(name, dtype)) for name in self._qds_weights}
        with _attribute(self, "_qds_live", live):
            return self._qds_base.forward(self, *args, **kwargs)

    def _forward_experts(self, hidden, index, weights, hit, dtype):
        """The class's forward over a layer of just experts ``hit`` (``index`` numbers them 0..len(hit)-1)."""
        live = {name: experts_lora.with_lora(self, name, self._dequantized_experts(name, hit, dtype), hit)
                for name in self._qds_weights}
        experts = self.__dict__["num_experts"]
        live.update({n: experts_lora.take(p, hit) for n, p in self._parameters.items()      # per-expert biases
                     if p is not None and p.is_floating_point() and p.dim() >= 2 and p.shape[0] == experts})
        with _attribute(self, "_qds_live", live), _attribute(self, "num_experts", _count(hit)):
            return self._qds_base.forward(self, hidden, index, weights)

    def _forward_grouped(self, hidden, top_k_index, top_k_weights, hit, index, *, group: int, recorded: bool):
        """A layer whose reached experts exceed DEQUANT_LIMIT dequantized: the experts run ``group`` at a time on
        the routing slots that reach them (each slot a token with top-k 1), each group under its own checkpoint
        when recorded, so forward and backward hold one group's weights; the slots' outputs are summed per token
        in group order (ascending experts, as the eager forward adds them)."""
        dtype = hidden.dtype if hidden.is_floating_point() else None
        ids = hit.tolist()
        out = None
        for start in range(0, len(ids), group):
            end = min(len(ids), start + group)
            token, slot = ((index >= start) & (index < end)).nonzero(as_tuple=True)
            run = ids[end - 1] - ids[start] == end - 1 - start     # a run of experts: their parts are views
            part = (hidden, token, (index[token, slot] - start).unsqueeze(1), top_k_weights[token, slot].unsqueeze(1),
                    slice(ids[start], ids[end - 1] + 1) if run else hit[start:end], dtype)
            y = checkpoint(self._forward_slots, *part, use_reentrant=False) if recorded else self._forward_slots(*part)
            out = y if out is None else out + y
        return out

    def _forward_slots(self, hidden, token, index, weights, hit, dtype):
        # the rows are gathered and their outputs added per token in here, so a group's checkpoint keeps the (shared)
        # hidden states and the slots' token numbers, not k rows per token (index_add's backward keeps its source)
        y = self._forward_experts(hidden.index_select(0, token), index, weights, hit, dtype)
        return y.new_zeros(hidden.shape[0], *y.shape[1:]).index_add_(0, token, y)

    def _group_size(self, dtype: torch.dtype | None) -> int:
        """How many experts fit DEQUANT_LIMIT dequantized in ``dtype`` (all of them if the layer does)."""
        experts = self.__dict__.get("num_experts")
        if not isinstance(experts, int) or experts <= 0:
            return 1 << 62
        per_expert = sum((dtype or orig).itemsize * shape[1] * shape[2] for shape, orig in self._qds_weights.values())
        return experts if per_expert * experts <= DEQUANT_LIMIT else max(1, DEQUANT_LIMIT // per_expert)

    def _routed(self, args, kwargs, group: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(the experts the tokens reach, the routing indices renumbered over them) for a call of transformers'
        experts signature (hidden_states (T, h), top_k_index (T, k), top_k_weights (T, k)) that reaches at most half
        of the experts or more than ``group``, when each expert's blocks are whole; else None (the whole layer)."""
        experts = self.__dict__.get("num_experts")
        if kwargs or len(args) != 3 or not isinstance(experts, int) or not isinstance(args[1], torch.Tensor) \
                or args[1].is_floating_point() or (args[1].numel() * 2 > experts and group >= experts):
            return None
        if not self._whole_blocks():
            return None
        if group < experts and not (args[0].dim() == args[1].dim() == 2 and isinstance(args[2], torch.Tensor)
                                    and args[2].shape == args[1].shape and args[0].shape[0] == args[1].shape[0]):
            return None     # another signature: grouped slots would not be (token, k) pairs
        hit, index = torch.unique(args[1], return_inverse=True)
        if not hit.numel() or int(hit[-1]) >= experts:     # no tokens; a sentinel index (expert parallelism)
            return None
        return hit, index

    def _whole_blocks(self) -> bool:
        """Whether each expert's weights are whole quantization blocks (so a subset of experts dequantizes alone)."""
        experts, blocksize = self.__dict__.get("num_experts"), self._qds_quant[1]
        return all(shape[0] == experts and (shape[1] * shape[2]) % blocksize == 0
                   for shape, _ in self._qds_weights.values())

    def merged(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Weight ``name`` dequantized with its LoRA update summed in fp32 (what the model computes with), in ``dtype``
        (default its original dtype); built DEQUANT_LIMIT's worth of experts (in fp32) at a time."""
        (experts, rows, cols), orig = self._qds_weights[name]
        lora = experts_lora.has_lora(self)
        group = self._group_size(torch.float32)
        if group >= experts or not self._whole_blocks():
            if not lora:
                return self.dequantized(name, dtype)
            return experts_lora.with_lora(self, name, self.dequantized(name, torch.float32)).to(dtype or orig)
        device = self._parameters[f"{name}_packed"].device
        out = torch.empty((experts, rows, cols), dtype=dtype or orig, device=device)
        for start in range(0, experts, group):
            hit = slice(start, min(experts, start + group))
            part = self._dequantized_experts(name, hit, torch.float32)
            out[hit] = experts_lora.with_lora(self, name, part, hit) if lora else part
        return out

    def _dequantized_experts(self, name: str, hit: torch.Tensor | slice, dtype: torch.dtype | None) -> torch.Tensor:
        """Experts ``hit`` of weight ``name``, dequantized: each expert's blocks are whole (checked by the caller)."""
        (experts, rows, cols), orig = self._qds_weights[name]
        quant_type, blocksize, dq, nested = self._qds_quant
        p = self._parameters
        absmax = p[f"{name}_absmax"]
        absmax = (ops.dequantize_8bit_blockwise(absmax, p[f"{name}_absmax2"].view(torch.float32), nested,
                                                self._offset(name)) if dq else absmax.view(torch.float32))
        packed = experts_lora.take(p[f"{name}_packed"].view(experts, -1), hit)
        absmax = experts_lora.take(absmax.view(experts, -1), hit)
        return ops.dequantize_4bit(packed, absmax, quant_type, blocksize, (packed.shape[0], rows, cols), dtype or orig)


def _count(hit: torch.Tensor | slice) -> int:
    return hit.stop - hit.start if isinstance(hit, slice) else hit.numel()


@contextlib.contextmanager
def _attribute(module: nn.Module, name: str, value):
    """``module.<name>`` set to ``value`` for the block (an instance attribute, restored after)."""
    before = module.__dict__.get(name)
    module.__dict__[name] = value
    try:
        yield
    finally:
        module.__dict__[name] = before


def _quantized_class(base: type) -> type:
    if base not in _CLASSES:
        _CLASSES[base] = type(f"Quantized{base.__name__}", (QuantizedExperts, base), {"_qds_base": base})
    return _CLASSES[base]


def quantize_experts_module(module: nn.Module, config) -> list[str]:
    """Store ``module``'s fused expert weights in 4 bit as ``config`` (a QLoRAConfig) says, in place, with LoRA on
    them if ``config.lora_experts``; returns the names quantized. On a meta skeleton the parameters stay meta
    (``set_quantized`` and ``experts_lora.reset_lora`` fill them)."""
    names = expert_weight_names(module)
    if not names or is_quantized_experts(module):
        return []
    weights = {n: (tuple(module._parameters[n].shape), module._parameters[n].dtype) for n in names}
    quant = (config.quant_type, config.blocksize, config.double_quant, config.nested_blocksize)
    olds = {n: module._parameters.pop(n) for n in names}
    module.__class__ = _quantized_class(type(module))
    module.__dict__["_qds_weights"] = weights
    module.__dict__["_qds_quant"] = quant
    for name, old in olds.items():
        if old.is_meta:
            _meta_parts(module, name, old.numel(), config)
        else:
            module.set_quantized(name, quantize(old.detach(), *quant))
    if getattr(config, "lora_experts", False):
        experts_lora.add_lora(module, config.r, config.alpha)
    return names


def _meta_parts(module: nn.Module, name: str, numel: int, config) -> None:
    for part, n in part_sizes(numel, config).items():
        module._parameters[f"{name}_{part}"] = _frozen(torch.empty(n, dtype=torch.uint8, device="meta"))


@torch.no_grad()
def dequantize_experts_module(module: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Undo ``quantize_experts_module`` in place: the original class with float 3-D parameters holding the
    dequantized weights with their LoRA update merged (``QuantizedExperts.merged``; ``dtype``: default each weight's
    original dtype)."""
    if not is_quantized_experts(module):
        return
    floats = {name: module.merged(name, dtype) for name in module._qds_weights}
    for name, weight in floats.items():
        for part in (*PARTS, "lora_A", "lora_B"):
            module._parameters.pop(f"{name}_{part}", None)
        module._parameters[name] = _frozen(weight)
    for key in ("_qds_weights", "_qds_quant", "_qds_live", "_qds_offsets", "_qds_lora"):
        module.__dict__.pop(key, None)
    module.__class__ = module._qds_base
