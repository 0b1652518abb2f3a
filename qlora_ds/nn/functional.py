"""The autograd Functions of the quantized layers: one per layer kind.

Forward dequantizes the frozen base (through ``qlora_ds.ops`` for NF4/FP4, the INT-N format for
QA-LoRA), runs the matmul and lets the dequantized weight go; backward dequantizes again and returns
the input gradient only: the packed base never gets a gradient. On CPUs with AMX, bf16 NF4/FP4 calls where it is
faster take the fused path instead (``qlora_ds.ops.fused_linear``: dequantized inside the GEMM, forward and backward,
nothing kept). NF4/FP4 and INT-N forwards of a few rows on CPU (decoding; ``qlora_ds.ops.small_rows``) multiply
straight from the packed weight, and their backward dequantizes (or takes the AMX kernel, NF4/FP4). Every tensor
comes in as an argument (never a module attribute captured earlier), so DeepSpeed ZeRO-3's gathered parameters are
the ones used, and recomputation under non-reentrant checkpointing sees the same inputs.

Dequantization (NF4/FP4 and INT-N) writes into a reused per-(device, dtype) workspace: one buffer as large as the
largest layer, instead of a fresh allocation per call (it matters for CPU speed). The buffer never
escapes a Function call.

``guard``: the module name to report when the numerical guards (``guards.py``) are on, else None;
the dequantized weight is then checked right after dequantization. The NF4 Function takes the
double-quant offset as a python float (the layer caches it), so a forward never syncs with the
device to read it.
"""
from __future__ import annotations

import os
import threading
from math import prod

import torch
import torch.nn.functional as F

from .. import ops
from ..ops import fused_linear, small_rows
from . import guards
from ..quant.intn import dequantize_parts

_workspaces: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A contiguous scratch tensor of ``numel`` elements, reused across calls and layers."""
    key = (torch.device(device), dtype)
    buf = _workspaces.get(key)
    if buf is None or buf.numel() < numel:
        _workspaces.pop(key, None)
        buf = torch.empty(numel, dtype=dtype, device=device)
        _workspaces[key] = buf
    return buf[:numel]


def clear_workspaces() -> None:
    _workspaces.clear()
    _kept.clear()


# ---- dequantized weights kept from forward to backward (a bounded pool)
# A forward that will be differentiated dequantizes into a pooled buffer and saves it for backward, which then
# needs no second dequantization. Buffers are reused once no saved tensor refers to them (their storage's use
# count is back to the pool's own), so the pool stays at the few layers alive between a forward and its backward
# (one decoder layer under checkpointing: the first, discarded pass frees its buffer at once). It never grows past
# KEEP_LIMIT bytes (the planner's ``dequant_keep``); past that, backward dequantizes again as before.
KEEP_LIMIT = int(float(os.environ.get("QLORA_DS_KEEP_DEQUANT_MB", "256")) * (1 << 20))
# Up to this many rows (tokens) a no-grad CPU call computes the LoRA branch in the adapter weights' dtype (add_lora).
LORA_FEW_ROWS = 8
_kept: list[tuple[torch.Tensor, int]] = []          # (buffer, its storage use count when free)
_recording = threading.local()                      # set by NF4LinearFunction.apply around its forward
_recording.on = False


def set_keep_limit(nbytes: int) -> None:
    """Bytes the kept-weight pool may hold (0 turns keeping off); buffers above the limit are dropped."""
    global KEEP_LIMIT
    KEEP_LIMIT = max(0, int(nbytes))
    while _kept and sum(b.numel() * b.element_size() for b, _ in _kept) > KEEP_LIMIT:
        _kept.pop()


def _uses(buf: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(buf.untyped_storage()._cdata)


def kept_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """A free pooled buffer of ``numel`` elements (allocated within KEEP_LIMIT if none is free), or None."""
    device = torch.device(device)
    for buf, free in _kept:
        if buf.dtype == dtype and buf.device == device and buf.numel() >= numel and _uses(buf) == free:
            return buf[:numel]
    size = numel * torch.empty((), dtype=dtype).element_size()
    if sum(b.numel() * b.element_size() for b, _ in _kept) + size > KEEP_LIMIT:
        return None
    buf = torch.empty(numel, dtype=dtype, device=device)
    _kept.append((buf, _uses(buf)))
    return buf[:numel]


def _stand_in(shape, like: torch.Tensor) -> torch.Tensor:
    """A tensor of ``shape`` with like's dtype and device holding one element (stride 0): "not kept"."""
    return torch.empty((), dtype=like.dtype, device=like.device).expand(tuple(shape))


def _is_stand_in(w: torch.Tensor) -> bool:
    return all(st == 0 for st in w.stride())


def _offset_value(offset, absmax2):
    """The double-quant offset as a float (read from its 4-byte uint8 parameter with a device sync if need be)."""
    if absmax2 is None:
        return 0.0
    return float(offset.view(torch.float32).item() if isinstance(offset, torch.Tensor) else offset)


def dequantize_nf4_parts(packed, absmax, absmax2, offset, meta, dtype, out=None) -> torch.Tensor:
    """Dequantize from the layer's raw uint8 parameters (fp32 values stored as bytes). ``offset``: the
    double-quant offset as a float, or its 4-byte uint8 parameter (read with a device sync)."""
    shape, quant_type, blocksize, nested_blocksize = meta
    if absmax2 is not None:
        return ops.dequantize_4bit_dq(packed, absmax, absmax2.view(torch.float32), _offset_value(offset, absmax2),
                                      quant_type, blocksize, nested_blocksize, shape, dtype, out)
    return ops.dequantize_4bit(packed, absmax.view(torch.float32), quant_type, blocksize, shape, dtype, out)


def _bias_grad(grad_out: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(bias.dtype)


class NF4LinearFunction(torch.autograd.Function):
    """y = x · deq(W)ᵀ + b for a blockwise 4-bit W (with or without double quantization).
    ``offset``: the double-quant offset as a python float (None without double quantization).
    When the call is recorded for backward, the dequantized weight is kept for it if the pool has room."""

    @classmethod
    def apply(cls, *args):
        # forward runs with grad mode off and needs_input_grad ignores no_grad: note whether this call records
        _recording.on = torch.is_grad_enabled()
        try:
            return super().apply(*args)
        finally:
            _recording.on = False

    @staticmethod
    def forward(ctx, x, packed, absmax, absmax2, offset, bias, meta, guard=None):
        ctx.meta, ctx.offset = meta, offset
        # A few rows (decoding) on CPU: straight from the packed weight (ops/small_rows.py). Backward dequantizes as
        # usual (or takes the AMX kernel), so a 1-element stand-in is saved for w, as when the pool has no room.
        ctx.small = guard is None and small_rows.supported(x, meta[0], meta[2])
        ctx.fused = not ctx.small and guard is None and fused_linear.supported(x, meta[0], meta[2])
        if ctx.small:
            y = small_rows.linear_4bit(x, packed, absmax, absmax2, _offset_value(offset, absmax2), meta[1], meta[2],
                                       meta[3], meta[0], bias)
            ctx.save_for_backward(packed, absmax, absmax2, bias, _stand_in(meta[0], x))
            return y
        if ctx.fused:   # AMX CPUs: dequantized into the GEMM's tiles, no bf16 weight written (ops/fused_linear.py)
            y = fused_linear.linear_4bit(x, packed, absmax, absmax2, _offset_value(offset, absmax2), meta[1],
                                         meta[2], meta[3], meta[0])
            if bias is not None:
                y.add_(bias)
            ctx.save_for_backward(packed, absmax, absmax2, bias)
            return y
        n = prod(meta[0])
        keep = kept_buffer(n, x.dtype, x.device) if ctx.needs_input_grad[0] and _recording.on else None
        w = dequantize_nf4_parts(packed, absmax, absmax2, offset, meta, x.dtype,
                                 keep if keep is not None else workspace(n, x.dtype, x.device))
        if guard is not None:
            guards.check(w, guard, "dequantized weight")
        y = F.linear(x, w, bias)
        # Without room in the pool, a 1-element stand-in of w's shape is saved instead: under non-reentrant
        # checkpointing the recompute must save tensors of the same shapes as the first pass, and the pool can
        # be full in one pass and not the other (a whole decoder layer's weights are alive in the recompute).
        ctx.save_for_backward(packed, absmax, absmax2, bias, w if keep is not None else _stand_in(w.shape, w))
        return y

    @staticmethod
    def backward(ctx, grad_out):
        packed, absmax, absmax2, bias, *kept = ctx.saved_tensors
        w = kept[0] if kept else None
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0] and (ctx.fused or ctx.small) and \
                fused_linear.supported(grad_out, ctx.meta[0], ctx.meta[2]):
            grad_x = fused_linear.linear_4bit_grad_input(grad_out, packed, absmax, absmax2,
                                                         _offset_value(ctx.offset, absmax2), *ctx.meta[1:], ctx.meta[0])
        elif ctx.needs_input_grad[0]:
            if w is None or _is_stand_in(w) or w.dtype != grad_out.dtype:
                w = dequantize_nf4_parts(packed, absmax, absmax2, ctx.offset, ctx.meta, grad_out.dtype,
                                         workspace(prod(ctx.meta[0]), grad_out.dtype, grad_out.device))
            grad_x = grad_out.matmul(w)
        if bias is not None and ctx.needs_input_grad[5]:
            grad_bias = _bias_grad(grad_out, bias)
        return grad_x, None, None, None, None, grad_bias, None, None


class IntNLinearFunction(torch.autograd.Function):
    """y = x · deq(W)ᵀ + b for a group-wise INT-N W with fp32 scales/zeros stored as bytes."""

    @staticmethod
    def forward(ctx, x, qweight, scales, zeros, bias, meta, guard=None):
        shape, bits, group_size = meta
        ctx.meta = meta
        ctx.save_for_backward(qweight, scales, zeros, bias)
        if guard is None and small_rows.supported_intn(x, shape, group_size):   # decoding, as NF4LinearFunction
            return small_rows.linear_intn(x, qweight, scales.view(torch.float32), zeros.view(torch.float32), bits,
                                          group_size, shape, bias)
        w = dequantize_parts(qweight, scales.view(torch.float32), zeros.view(torch.float32), bits, group_size,
                             shape, x.dtype, workspace(prod(shape), x.dtype, x.device))
        if guard is not None:
            guards.check(w, guard, "dequantized weight")
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_out):
        qweight, scales, zeros, bias = ctx.saved_tensors
        shape, bits, group_size = ctx.meta
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = dequantize_parts(qweight, scales.view(torch.float32), zeros.view(torch.float32), bits, group_size,
                                 shape, grad_out.dtype, workspace(prod(shape), grad_out.dtype, grad_out.device))
            grad_x = grad_out.matmul(w)
        if bias is not None and ctx.needs_input_grad[4]:
            grad_bias = _bias_grad(grad_out, bias)
        return grad_x, None, None, None, grad_bias, None, None


def lora_delta(x: torch.Tensor, lora_A: torch.nn.Linear, lora_B: torch.nn.Linear, scaling: float,
               dtype: torch.dtype) -> torch.Tensor:
    """scaling · B(A(x)) with the (fp32) LoRA weights cast to the compute dtype; the scaling is applied to
    the rank-r intermediate, which is out/r times smaller than the output."""
    return F.linear(F.linear(x, lora_A.weight.to(dtype)) * scaling, lora_B.weight.to(dtype))


def add_lora(y: torch.Tensor, x: torch.Tensor, lora_A: torch.nn.Linear, lora_B: torch.nn.Linear, scaling: float,
             dtype: torch.dtype) -> torch.Tensor:
    """y + scaling · B(A(x)), the add fused into the B matmul (one addmm instead of a matmul and a full-size add)."""
    wa, wb = lora_A.weight, lora_B.weight
    if wa.dtype != dtype and x.device.type == "cpu" and not torch.is_grad_enabled() \
            and x.numel() <= LORA_FEW_ROWS * x.shape[-1]:
        # Decoding on CPU: the casts of A and B and oneDNN's r-wide bf16 GEMMs (a ~20 µs floor per call) cost
        # ~120 µs per 576² layer and token, twice the 4-bit product; in the adapter's own dtype ~50 (bench/RESULTS.md).
        a = torch.mm(x.reshape(-1, x.shape[-1]).to(wa.dtype), wa.t())
        out = torch.addmm(y.reshape(-1, y.shape[-1]).to(wb.dtype), a, wb.t(), alpha=scaling)
        return out.to(y.dtype).view(y.shape)
    a = F.linear(x, wa.to(dtype)) * scaling
    out = torch.addmm(y.reshape(-1, y.shape[-1]), a.reshape(-1, a.shape[-1]), wb.to(dtype).t())
    return out.view(y.shape)


def with_adapter(module, y: torch.Tensor, lora_input, x: torch.Tensor, guard) -> torch.Tensor:
    """The shared tail of both layers' forward: add the LoRA branch (``lora_input`` is None when the adapter is
    off; fused into one addmm unless the NaN guard must see it separately), check, cast back to x's dtype."""
    cd = module.compute_dtype
    if lora_input is not None:
        if guard is None:
            y = add_lora(y, lora_input, module.lora_A, module.lora_B, module.scaling, cd)
        else:
            delta = lora_delta(lora_input, module.lora_A, module.lora_B, module.scaling, cd)
            guards.check(delta, guard, "LoRA output", x)
            y = y + delta
    if guard is not None:
        guards.check(y, guard, "layer output", x)
    return y.to(x.dtype)
