"""Give the C heap's free pages back to the OS between decoder layers (CPU training).

torch's CPU allocator is glibc ``malloc``. Tensors under glibc's mmap threshold (which rises by itself to
32 MiB after the first large ``free``) come from the heap, and a freed block in the middle of the heap stays
resident until it is reused. Under gradient checkpointing every decoder layer leaves its output (the saved
layer input of the next one) between the freed intermediates of its forward, so the heap grows by about a
layer's worth of intermediates per layer and the process's RSS runs far above its live tensors. Measured on
SmolLM2-135M's shape (bf16, chunked loss, one step): seq 2048, 30 layers 541 → 347 MiB above the loaded
model; seq 16384, 8 layers 1762 → 1015 MiB (bench/RESULTS.md, "heap release").

``malloc_trim(0)`` returns every free page of the heap (not only its top) with ``madvise(MADV_DONTNEED)``;
calling it after a decoder layer's forward (a forward hook: transformers' checkpointed recomputation in backward
calls the layer's ``forward`` directly and does not run it) keeps RSS near the live tensors. A fixed low mmap threshold
(``MALLOC_MMAP_THRESHOLD_``) saves more but costs 50 % step time in page faults, so it is not used.

A release is only worth its page faults when it lowers a peak: free pages given back and touched again by the next
layer's intermediates cost time and gain nothing. So a layer releases when the heap's free bytes (``mallinfo2``) have
grown by ``QLORA_DS_HEAP_RELEASE_GROWTH_MB`` (8) over the lowest seen since the last release (a long sequence's
fragmenting heap: most layers), and the last decoder layer always does, so that backward — where the step peaks, and
where the recomputation does not run these hooks — starts from a clean heap; both only with at least
``QLORA_DS_HEAP_RELEASE_MIN_MB`` (128) free. Releasing after every layer whenever that much was free cost 11 % of a
short-sequence step, whose free part stays flat (SmolLM2-135M, batch 4 × 128, fp32: 3.7 → 4.1 s; gated 3.8 s), and
the gate keeps the long-sequence peak (llama-0.4b's shape, seq 4096: 946 MiB over the loaded model releasing after
every layer, 922 gated).
``QLORA_DS_HEAP_RELEASE=0`` turns the hooks off. Nothing is done on a libc without ``malloc_trim`` (musl,
macOS) or for layers whose output is not on the CPU.
"""
from __future__ import annotations

import os

import torch
from torch import nn

HOOK_ATTR = "_qlora_ds_heap_release"
LAST_ATTR = "_qlora_ds_heap_release_last"
MIN_FREE_BYTES = int(float(os.environ.get("QLORA_DS_HEAP_RELEASE_MIN_MB", "128")) * (1 << 20))
GROWTH_BYTES = int(float(os.environ.get("QLORA_DS_HEAP_RELEASE_GROWTH_MB", "8")) * (1 << 20))
_floor: list = [None]   # the fewest free heap bytes seen since the last release (None: none seen yet)
_calls = None     # (malloc_trim, mallinfo2) from glibc, each None where missing; False: no libc at all


def _glibc():
    global _calls
    if _calls is None:
        try:
            import ctypes
            libc = ctypes.CDLL("libc.so.6")
        except OSError:
            _calls = False
            return _calls
        trim = getattr(libc, "malloc_trim", None)
        if trim is not None:
            trim.argtypes = [ctypes.c_size_t]
        info = getattr(libc, "mallinfo2", None)
        if info is not None:
            class _MallInfo2(ctypes.Structure):
                _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
            info.restype = _MallInfo2
        _calls = (trim, info)
    return _calls


def free_heap_bytes() -> int | None:
    """Bytes of free blocks inside glibc's heap (``mallinfo2().fordblks``); None without mallinfo2."""
    info = _glibc() and _glibc()[1]
    return int(info().fordblks) if info else None


def release_free_heap() -> bool:
    """``malloc_trim(0)``: give the heap's free pages back to the OS. False where libc has no such call."""
    trim = _glibc() and _glibc()[0]
    if trim:
        trim(0)
        return True
    return False


def enabled() -> bool:
    return os.environ.get("QLORA_DS_HEAP_RELEASE", "1").strip().lower() not in ("0", "false", "no", "off")


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


def _after_layer(module, args, output):
    t = _first_tensor(output)
    if t is None or t.device.type != "cpu":
        return
    free = free_heap_bytes()
    if free is None:                       # no mallinfo2: nothing to gate on
        release_free_heap()
        return
    if _floor[0] is None or free < _floor[0]:
        _floor[0] = free
    last = getattr(module, LAST_ATTR, False)    # the last layer's release: backward (the step's peak) gets a clean heap
    if free >= MIN_FREE_BYTES and (last or free - _floor[0] >= GROWTH_BYTES):
        release_free_heap()
        _floor[0] = free_heap_bytes()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: transformers' ``GradientCheckpointingLayer`` subclasses, else the classes
    named in ``_no_split_modules`` (what device maps and FSDP wrap)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
        found = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        if found:
            return found
    except ImportError:
        pass
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def install_heap_release(model: nn.Module) -> int:
    """Hook ``release_free_heap`` after every decoder layer's forward (once per layer; idempotent). Returns the
    number of layers hooked (0 when turned off by ``QLORA_DS_HEAP_RELEASE=0``)."""
    if not enabled():
        return 0
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        if getattr(layer, HOOK_ATTR, None) is None:
            setattr(layer, HOOK_ATTR, layer.register_forward_hook(_after_layer))
        setattr(layer, LAST_ATTR, i == len(layers) - 1)
    return len(layers)
