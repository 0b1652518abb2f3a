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

**fp16 overflow watch** (on whatever the debug setting; ``QLORA_DS_FP16_WATCH=0`` turns it off). fp16 tops out at
65504, so a large activation can overflow the base matmul. A layer whose compute dtype is fp16 records, without
any host sync, the first non-finite value it sees into a one-element int64 tensor per device: its input and its
output in forward, the gradient arriving at its output and its input gradient in backward (each: one fp32
``sum`` — NaN/Inf propagate, finite fp16 values cannot overflow an fp32 sum — and three one-element ops). The
event with the lowest sequence number wins, so :func:`take_overflow` (one sync) names the first module where a
value went non-finite, and where: made by the layer (``layer output``, ``input gradient``) or arriving from a
module that is not a quantized layer (``input``, ``output gradient``). Other compute dtypes record nothing.
Cost (bench line in tests/test_fp16.py's module doc): ~0.23 ms per record of 256K fp16 values on one EPYC
core, about 1% of that fp16 layer's forward; on a GPU four small kernels per record and never a sync.

Who reads it: a training step under fp16 loss scaling (``qlora_ds.overflow.OverflowMonitor``) reads it when
DeepSpeed skips a step — normal under dynamic loss scaling — and reports the module; ``watch(model)`` adds a
root forward hook that raises NonFiniteError naming the module after a forward *without* grad (eval, generate:
there is no loss scaling to absorb it), and names the modules.
"""
from __future__ import annotations

import contextlib
import dataclasses
import weakref
from typing import Iterator

import torch
import torch.nn as nn

from ..errors import NonFiniteError
from ..switch import Switch

ENV_VAR = "QLORA_DS_DEBUG"
NAME_ATTR = "_qlora_ds_name"

_switch = Switch(ENV_VAR, default=False)


def enable(flag: bool = True) -> bool:
    """Turn the guards on or off for the whole process; returns the previous setting."""
    return _switch.set(flag)


def is_enabled() -> bool:
    return _switch.on


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
    return module_name(module) if _switch.on else None


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
    if not _switch.on:
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


# ---------------------------------------------------------------------------------------------- fp16 watch
WATCH_VAR = "QLORA_DS_FP16_WATCH"
EVENTS = ("input", "layer output", "output gradient", "input gradient")
INPUT, OUTPUT, OUTPUT_GRAD, INPUT_GRAD = range(4)
_NONE = torch.iinfo(torch.int64).max
_ID_BITS = 21                                            # key = seq << 23 | module id << 2 | event
_ID_ATTR = "_qlora_ds_watch_id"
_watch = Switch(WATCH_VAR, default=True)
_first: dict[torch.device, torch.Tensor] = {}            # per device: the lowest key seen since the last take
_modules: list = []                                      # module id -> weakref to the module
_seq = 0
_dirty = False


def enable_watch(flag: bool = True) -> bool:
    """Turn the fp16 overflow watch on or off for the process; returns the previous setting."""
    return _watch.set(flag)


def watch_id(module: nn.Module) -> int | None:
    """The module's watch id when its compute dtype is fp16 and the watch is on (else None: record nothing)."""
    if not _watch.on or getattr(module, "compute_dtype", None) is not torch.float16:
        return None
    mid = module.__dict__.get(_ID_ATTR)
    if mid is None:
        mid = len(_modules)
        if mid >= 1 << _ID_BITS:
            return None
        _modules.append(weakref.ref(module))
        module.__dict__[_ID_ATTR] = mid
    return mid


def record(t: torch.Tensor, mid: int, event: int) -> None:
    """Note (on the device, no sync) that ``t`` is non-finite at this point, if it is."""
    global _seq, _dirty
    key = (_seq << (_ID_BITS + 2)) | (mid << 2) | event
    _seq, _dirty = _seq + 1, True
    with torch.no_grad():
        s = t.detach().sum(dtype=torch.float32)
        buf = _first.get(t.device)
        if buf is None:
            # made under inference_mode (a pipeline, generate) it would be an inference tensor, which every later
            # in-place update outside inference_mode refuses
            with torch.inference_mode(False):
                buf = _first[t.device] = torch.full((), _NONE, dtype=torch.int64, device=t.device)
        torch.minimum(buf, torch.where(torch.isfinite(s), _NONE, key), out=buf)


class _WatchInput(torch.autograd.Function):
    """Identity on the layer's input whose backward records this layer's own input gradient."""

    @staticmethod
    def forward(ctx, x, mid):
        ctx.mid = mid
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        record(grad, ctx.mid, INPUT_GRAD)
        return grad, None


def watch_input(x: torch.Tensor, mid: int | None) -> torch.Tensor:
    """Layer entry: record a non-finite input; under autograd also watch the input gradient."""
    if mid is None:
        return x
    record(x, mid, INPUT)
    if torch.is_grad_enabled() and x.requires_grad:
        return _WatchInput.apply(x, mid)
    return x


def watch_output(y: torch.Tensor, mid: int | None) -> torch.Tensor:
    """Layer exit: record a non-finite output; under autograd also the gradient arriving at it."""
    if mid is None:
        return y
    record(y, mid, OUTPUT)
    if torch.is_grad_enabled() and y.requires_grad:
        y.register_hook(lambda g: record(g, mid, OUTPUT_GRAD))
    return y


_CAUSES = {
    "layer output": "its input was finite, so its base matmul or LoRA branch exceeded fp16's range (65504): "
                    "large activations; use bf16 where the device has it, or scale the inputs down",
    "input": "it was non-finite on arrival: the overflow happened before, in a module that is not a quantized "
             "layer (attention, a norm, an embedding); run with QLORA_DS_DEBUG=1 after guards.install(model) to "
             "find it",
    "input gradient": "the gradient arriving was finite, so grad·deq(W) (+ LoRA) exceeded fp16's range at this loss "
                      "scale",
    "output gradient": "the gradient was non-finite on arrival: it overflowed in a later module that is not a "
                       "quantized layer, or in the scaled loss itself",
}


@dataclasses.dataclass(frozen=True)
class Overflow:
    """The first non-finite value the fp16 watch saw: in which module (full name) and where (one of EVENTS)."""

    module: str
    what: str

    def describe(self) -> str:
        return f"first non-finite fp16 value at the {self.what} of module {self.module!r}: {_CAUSES[self.what]}"

    def error(self, context: str) -> NonFiniteError:
        return NonFiniteError(f"{context}: {self.describe()}", module=self.module, what=self.what,
                              input_finite={"layer output": True, "input": False}.get(self.what))


def reset_overflow() -> None:
    """Forget what was recorded (no sync)."""
    global _seq, _dirty
    if _dirty:
        for buf in _first.values():
            buf.fill_(_NONE)
    _seq, _dirty = 0, False


def take_overflow() -> Overflow | None:
    """The first overflow recorded since the last take or reset (None if none), then reset. One host sync per
    device that recorded anything; nothing at all when no fp16 layer ran."""
    if not _dirty:
        return None
    key = min(int(buf) for buf in _first.values())
    reset_overflow()
    if key == _NONE:
        return None
    mid, event = (key >> 2) & ((1 << _ID_BITS) - 1), key & 3
    module = _modules[mid]() if mid < len(_modules) else None
    return Overflow(module_name(module) if module is not None else f"<module {mid}, since freed>", EVENTS[event])


def _watch_pre(module, inputs) -> None:
    if not torch.is_grad_enabled():
        reset_overflow()                # a no-grad forward judges itself only


def _watch_post(module, inputs, output) -> None:
    if torch.is_grad_enabled():
        return                          # training: a skipped step reports it (loss scaling absorbs overflows)
    found = take_overflow()
    if found is not None:
        raise found.error("fp16 overflow in a forward without loss scaling (evaluation or generation)")


def watch(model: nn.Module) -> Handle:
    """Name the model's modules and make every forward it runs without grad (eval, generate) raise
    NonFiniteError at an fp16 overflow, naming the first module. Idempotent; costs one host sync per such
    forward, only when an fp16 layer ran. Training forwards are left to the step (``qlora_ds.overflow``)."""
    name_modules(model)
    handle = model.__dict__.get("_qlora_ds_watch_handle")
    if handle is None or not len(handle):
        handle = Handle([model.register_forward_pre_hook(_watch_pre), model.register_forward_hook(_watch_post)])
        model.__dict__["_qlora_ds_watch_handle"] = handle
    return handle
