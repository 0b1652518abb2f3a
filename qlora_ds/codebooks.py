"""Code tables (codebooks) the kernels dispatch on: the 4-bit NF4/FP4 codes and the 8-bit dynamic maps.

Values and orderings follow bitsandbytes 0.50 exactly (design notes §2), so packed bytes are interchangeable: NF4 in
sorted order, FP4 in bnb's bit-pattern order, bnb's signed dynamic map (double quantization, 8-bit ``exp_avg``) and
its unsigned one (8-bit ``exp_avg_sq``). This module sits at the bottom of the package: ``ops/``, ``quant/`` and
``optim/`` all read it, it imports nothing of theirs.

Each table is built once on the CPU and copied once per device: :func:`table` caches per (table, device), so a
forward, backward or recompute never copies a table host -> device again (no host sync per layer, and CUDA-graph
capture sees no copy after one warm-up call). The returned tensors are shared: never modify them in place.
"""
from __future__ import annotations

import threading
from typing import Callable

import torch

__all__ = ["NF4_VALUES", "FP4_RAW", "QUANT_TYPES", "code4", "code4_bounds", "dynamic_code", "dynamic_bounds",
           "udynamic_code", "udynamic_bounds", "table"]

NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# FP4 E2M1 with bias 2, in bit-pattern order (bit 3 = sign); normalised by its max (12) below.
FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
           -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

QUANT_TYPES = ("nf4", "fp4")


def _code4(quant_type: str) -> torch.Tensor:
    code = torch.tensor(NF4_VALUES if quant_type == "nf4" else FP4_RAW, dtype=torch.float32)
    return code / code.abs().max()


def _order4(quant_type: str) -> torch.Tensor:
    # stable: FP4 has +0 and -0; bnb's argsort keeps +0 (index 0) first.
    return torch.argsort(_code4(quant_type), stable=True).to(torch.uint8)


def _bounds4(quant_type: str) -> torch.Tensor:
    code = _code4(quant_type)
    order = _order4(quant_type).long()
    return (code[order[:-1]] + code[order[1:]]) / 2


def _dynamic(signed: bool) -> torch.Tensor:
    """bnb's dynamic-exponent 8-bit map, ``create_dynamic_map(signed)``: 256 sorted values."""
    max_exponent_bits, non_sign_bits = 7, 7 if signed else 8
    data: list[float] = []
    for i in range(max_exponent_bits):
        n_items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        edges = torch.linspace(0.1, 1, n_items, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def _midpoints(code: torch.Tensor) -> torch.Tensor:
    return (code[:-1] + code[1:]) / 2


_BUILDERS: dict[str, Callable[[], torch.Tensor]] = {
    **{f"{qt}": (lambda qt=qt: _code4(qt)) for qt in QUANT_TYPES},
    **{f"{qt}.bounds": (lambda qt=qt: _bounds4(qt)) for qt in QUANT_TYPES},
    **{f"{qt}.order": (lambda qt=qt: _order4(qt)) for qt in QUANT_TYPES},
    "dynamic": lambda: _dynamic(True),
    "dynamic.bounds": lambda: _midpoints(_dynamic(True)),
    "udynamic": lambda: _dynamic(False),
    "udynamic.bounds": lambda: _midpoints(_dynamic(False)),
}
_cache: dict[tuple[str, torch.device], torch.Tensor] = {}
_lock = threading.RLock()  # table() of a device takes the CPU table under it


def _device(device) -> torch.device:
    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _transfer(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The one host -> device copy of a table (tests count calls of this)."""
    return t.to(device)


def table(name: str, device=None) -> torch.Tensor:
    """The code table ``name`` on ``device`` (default CPU), built and copied at most once per device."""
    dev = _device(device)
    key = (name, dev)
    t = _cache.get(key)
    if t is None:
        with _lock:
            t = _cache.get(key)
            if t is None:
                if name not in _BUILDERS:
                    raise ValueError(f"unknown code table {name!r}; known: {sorted(_BUILDERS)}")
                t = _BUILDERS[name]() if dev.type == "cpu" else _transfer(table(name, "cpu"), dev)
                _cache[key] = t
    return t


def _check4(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown 4-bit quant_type {quant_type!r}; use one of {QUANT_TYPES}")


def code4(quant_type: str, device=None) -> torch.Tensor:
    """The 16 fp32 values of a 4-bit code, index = the 4-bit code."""
    _check4(quant_type)
    return table(quant_type, device)


def code4_bounds(quant_type: str, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(15 sorted midpoints, uint8 order mapping sorted position -> code index)."""
    _check4(quant_type)
    return table(f"{quant_type}.bounds", device), table(f"{quant_type}.order", device)


def dynamic_code(device=None) -> torch.Tensor:
    """bnb's signed dynamic map (create_dynamic_map(signed=True)), 256 sorted values in [-1, 1]."""
    return table("dynamic", device)


def dynamic_bounds(device=None) -> torch.Tensor:
    return table("dynamic.bounds", device)


def udynamic_code(device=None) -> torch.Tensor:
    """bnb's unsigned dynamic map (create_dynamic_map(signed=False)), 256 sorted values in [0, 1]."""
    return table("udynamic", device)


def udynamic_bounds(device=None) -> torch.Tensor:
    return table("udynamic.bounds", device)
