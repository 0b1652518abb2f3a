"""Dropout on the LoRA input: ``nn.Dropout`` with a faster CPU path.

torch's CPU dropout draws its mask from a sequential Mersenne Twister (~5 ns per element): with dropout on every
LoRA input of SmolLM2-135M that was 8% (AVX2, fp32) to 13% (AMX, bf16) of a training step (on AMX as much as the
attention backward).
On the CPU, in training, ``LoRADropout`` draws one 62-bit seed from torch's generator instead and keeps element
``i`` iff a hash of (seed, i) clears ``p`` (``csrc/lora_dropout_cpu.cpp``, its pure-torch twin
``qlora_ds.ops.reference.hash_dropout``): 6–15× faster (AVX2 bf16 to AVX-512 fp32), reproducible under
``torch.manual_seed``, replayed exactly by activation checkpointing (which restores the generator before
recomputing), and backward regenerates the mask from the seed rather than keeping a bool mask per LoRA input.
Elsewhere (CUDA, evaluation, no compiled op) it is ``nn.Dropout``; the state dict and PEFT's ``lora_dropout`` are
unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops import load_backend, reference

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _HashDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float, seed: int, op):
        ctx.p, ctx.seed, ctx.op = p, seed, op
        return op.hash_dropout(x.contiguous(), p, seed)

    @staticmethod
    def backward(ctx, grad):
        return ctx.op.hash_dropout(grad.contiguous(), ctx.p, ctx.seed), None, None, None


def hash_dropout_op(x: torch.Tensor):
    """The compiled CPU op that runs ``hash_dropout`` on ``x``, or None (not CPU, dtype, no op built)."""
    if x.device.type != "cpu" or x.dtype not in _DTYPES:
        return None
    op = load_backend("cpu")
    return None if op is reference else op


class LoRADropout(nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = hash_dropout_op(x) if self.training and self.p > 0 and not self.inplace else None
        if op is None:
            return super().forward(x)
        seed = int(torch.randint(0, 1 << 62, ()))
        return _HashDropout.apply(x, float(self.p), seed, op)
