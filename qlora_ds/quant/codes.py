"""Code tables (codebooks) shared by the 4-bit and 8-bit blockwise formats.

Values and orderings follow bitsandbytes 0.50 exactly (design notes §2), so packed bytes are
interchangeable: NF4 in sorted order, FP4 in bnb's bit-pattern order, and the signed 8-bit
"dynamic" map used for double quantization.
"""
from __future__ import annotations

import functools

import torch

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


@functools.lru_cache(maxsize=None)
def _code4_cpu(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        code = torch.tensor(NF4_VALUES, dtype=torch.float32)
    elif quant_type == "fp4":
        code = torch.tensor(FP4_RAW, dtype=torch.float32)
    else:
        raise ValueError(f"unknown 4-bit quant_type {quant_type!r}; use one of {QUANT_TYPES}")
    return code / code.abs().max()


@functools.lru_cache(maxsize=None)
def _bounds_cpu(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    code = _code4_cpu(quant_type)
    # stable: FP4 has +0 and -0; bnb's argsort keeps +0 (index 0) first.
    order = torch.argsort(code, stable=True)
    bounds = (code[order[:-1]] + code[order[1:]]) / 2
    return bounds, order.to(torch.uint8)


@functools.lru_cache(maxsize=None)
def _dynamic_cpu() -> torch.Tensor:
    """bnb's signed dynamic-exponent 8-bit map (create_dynamic_map(signed=True)), 256 sorted values."""
    max_exponent_bits, non_sign_bits = 7, 7
    data: list[float] = []
    for i in range(max_exponent_bits):
        n_items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        edges = torch.linspace(0.1, 1, n_items, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        data += (-scale * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def _on(t: torch.Tensor, device) -> torch.Tensor:
    return t if device is None or torch.device(device) == t.device else t.to(device)


def code4(quant_type: str, device=None) -> torch.Tensor:
    """The 16 fp32 values of a 4-bit code, index = the 4-bit code."""
    return _on(_code4_cpu(quant_type), device)


def code4_bounds(quant_type: str, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(15 sorted midpoints, uint8 order mapping sorted position -> code index)."""
    bounds, order = _bounds_cpu(quant_type)
    return _on(bounds, device), _on(order, device)


def dynamic_code(device=None) -> torch.Tensor:
    return _on(_dynamic_cpu(), device)


def dynamic_bounds(device=None) -> torch.Tensor:
    code = _dynamic_cpu()
    return _on((code[:-1] + code[1:]) / 2, device)
