"""Numerical guards: find the first module whose forward produced a NaN/Inf.

Off by default and then free: the layers read one module-level bool per forward and do nothing else.
On in debug mode — ``QLORA_DS_DEBUG=1`` in the environment (read at import), or ``enable(True)`` /
``with enabled():`` — every QLoRALinear / QALoRALinear checks, in this order,

1. its dequantized base weight (inside the autograd Function, before the matmul),
2. its LoRA output ``s·B(A(drop(x)))``,
3. its layer output,

and raises :class:`qlora_ds.errors.NonFiniteError` at the first non-finite tensor, naming the
module's full path (set by ``name_modules(model)``; the class name otherwise), which of the three
it was, the NaN/Inf counts, and whether the layer's input was already non-finite. Each check is one
``isfinite().all()`` reduction and one host sync; counts are only computed on failure.

``install(model)`` also names the modules and adds a forward hook to *every* module (embeddings,
norms, attention …) that checks its floating-point outputs while guards are enabled, so a NaN born
outside the quantized layers is reported where it first appears (hooks of children run before their
parent's). Remove the hooks with the returned handle's ``remove()``.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import torch.nn as nn

from ..errors import NonFiniteError

ENV_VAR = "QLORA_DS_DEBUG"
NAME_ATTR = "_qlora_ds_name"

_enabled: bool = os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


def enable(flag: bool = True) -> bool:
    """Turn the guards on or off for the whole process; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(flag)
    return previous


def is_enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def enabled(flag: bool = True) -> Iterator[None]:
    previous = enable(flag)
    try:
        yield
    finally:
        enable(previous)


def module_name(module: nn.Module) -> str:
    return getattr(module, NAME_ATTR, None) or type(module).__name__


def name_modules(model: nn.Module) -> nn.Module:
    """Record every module's full path in the model (``model.layers.0.mlp.up_proj``) on the module."""
    for path, module in model.named_modules():
        setattr(module, NAME_ATTR, path or f"<root {type(module).__name__}>")
    return model


def layer_guard(module: nn.Module) -> str | None:
    """The name to report for ``module`` when guards are on; None (skip every check) when off."""
    return module_name(module) if _enabled else None


def _all_finite(inputs) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in _float_tensors(inputs))


def check(t: torch.Tensor, name: str, what: str, inputs=None) -> None:
    """Raise NonFiniteError if ``t`` holds a NaN/Inf (``inputs``: the module's input, for the report)."""
    if bool(torch.isfinite(t).all()):
        return
    with torch.no_grad():
        nan = int(torch.isnan(t).sum())
        inf = int(torch.isinf(t).sum())
    input_finite = None if inputs is None else _all_finite(inputs)
    if input_finite is False:
        cause = ("its input was already non-finite, so the value was made upstream by code that is not a "
                 "module (functional ops in a parent's forward) or by the caller; check the model input and "
                 "call guards.install(model) to check every module")
    elif what == "dequantized weight":
        cause = ("the quantized base itself is corrupt (NaN/Inf absmax/scales); re-quantize from a finite "
                 "checkpoint")
    elif what == "LoRA output":
        cause = ("the adapter has diverged (NaN/Inf in lora_A/lora_B or an overflow in the compute dtype); lower "
                 "the learning rate or max_grad_norm, resume from the last good checkpoint, or use bf16/fp32")
    else:
        cause = ("its input was finite, so this module made it (an overflow in the compute dtype? use bf16 instead "
                 "of fp16, or lower the learning rate)")
    raise NonFiniteError(f"non-finite {what} in module {name!r}: {nan} NaN and {inf} Inf of {t.numel()} values "
                         f"(shape {tuple(t.shape)}, {t.dtype}); {cause}",
                         module=name, what=what, nan=nan, inf=inf, numel=t.numel(), input_finite=input_finite)


def _float_tensors(obj) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            yield obj
    elif isinstance(obj, dict):             # also transformers' ModelOutput
        for v in obj.values():
            yield from _float_tensors(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _float_tensors(v)


def _hook(module: nn.Module, inputs, output) -> None:
    if not _enabled:
        return
    for t in _float_tensors(output):
        if t.numel():
            check(t, module_name(module), "output", inputs)


class Handle:
    """Returned by ``install``: ``remove()`` takes the hooks off again."""

    def __init__(self, handles):
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __len__(self) -> int:
        return len(self._handles)


def install(model: nn.Module) -> Handle:
    """Name every module and hook it so that (while guards are enabled) the first module whose output
    holds a NaN/Inf raises NonFiniteError. Hooks cost nothing but a bool test while guards are off."""
    name_modules(model)
    return Handle([m.register_forward_hook(_hook) for m in model.modules()])
