"""One dispatch point for the quantization ops.

The rest of the package calls these functions and never cares which backend ran: the compiled CUDA
op for CUDA tensors, the compiled C++/OpenMP op for CPU tensors, or the pure-torch reference when a
kernel cannot be built (one warning says why and how to fix it). ``backend()`` names the active one;
``QLORA_DS_BACKEND=torch`` (or ``use_backend("torch")``) forces the reference.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from math import prod
from typing import Iterator, Sequence

import torch

from ..errors import OpBuildError
from .. import codebooks as codes
from . import reference

__all__ = [
    "backend", "use_backend", "quantize_4bit", "dequantize_4bit", "dequantize_4bit_dq",
    "quantize_8bit_blockwise", "dequantize_8bit_blockwise", "quantize_intn", "dequantize_intn", "load_backend",
]

_loaded: dict[str, object] = {}
_forced: str | None = None
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def load_backend(device_type: str):
    """The backend module for tensors on ``device_type`` ('cpu' or 'cuda'), loaded once."""
    forced = _forced or os.environ.get("QLORA_DS_BACKEND")
    if forced == "torch":
        return reference
    if device_type not in ("cpu", "cuda"):
        return reference
    if device_type not in _loaded:
        try:
            from .builder import load_op

            _loaded[device_type] = load_op("quant", device_type)
        except (OpBuildError, ImportError) as err:  # ImportError: no deepspeed to build with
            warnings.warn(
                f"qlora_ds: the compiled {device_type} quant op is unavailable, using the slower "
                f"pure-torch reference instead.\n{err}", RuntimeWarning, stacklevel=3)
            _loaded[device_type] = reference
    return _loaded[device_type]


def backend(device: torch.device | str | None = None) -> str:
    """'cuda', 'cpu' or 'torch': the backend that runs ops for tensors on ``device``."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.device(device).type
    return "torch" if load_backend(dtype) is reference else dtype


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend for the duration of a block ('torch' = reference; None = automatic)."""
    global _forced
    if name not in ("torch", None):
        raise ValueError(f"use_backend accepts 'torch' or None, not {name!r}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def _impl(t: torch.Tensor):
    return load_backend(t.device.type)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """1-D contiguous view (a copy only when needed): what every backend function takes (the compiled ones reject
    anything else; the reference would broadcast a 2-D absmax [nblocks, 1] against the values)."""
    return t.contiguous().view(-1)


def _out(out, shape, dtype, device) -> torch.Tensor:
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"dequantize to {dtype} is not supported; use one of {_OUT_DTYPES}")
    if out is None:
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    if out.dtype != dtype or out.numel() != prod(shape) or not out.is_contiguous() or out.device != device:
        raise ValueError(
            f"out must be a contiguous {dtype} tensor of {prod(shape)} elements on {device}; "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    return out


def quantize_4bit(x: torch.Tensor, quant_type: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 4-bit quantization: (packed uint8 [(n+1)//2], fp32 absmax [ceil(n/blocksize)])."""
    flat = x.contiguous().view(-1)
    n = flat.numel()
    bounds, order = codes.code4_bounds(quant_type, x.device)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=x.device)
    _impl(x).quantize_4bit(flat, bounds, order, blocksize, packed, absmax)
    return packed, absmax


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, quant_type: str, blocksize: int,
                    shape: Sequence[int], dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    out = _out(out, shape, dtype, packed.device)
    code = codes.code4(quant_type, packed.device)
    _impl(packed).dequantize_4bit(_flat(packed), _flat(absmax), code, blocksize, out.view(-1))
    return out.view(tuple(shape))


def dequantize_4bit_dq(packed: torch.Tensor, qabsmax: torch.Tensor, absmax2: torch.Tensor, offset: float,
                       quant_type: str, blocksize: int, nested_blocksize: int, shape: Sequence[int],
                       dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused double-quant dequantize: absmax codes -> absmax -> weights, in one pass."""
    out = _out(out, shape, dtype, packed.device)
    code = codes.code4(quant_type, packed.device)
    code8 = codes.dynamic_code(packed.device)
    _impl(packed).dequantize_4bit_dq(_flat(packed), _flat(qabsmax), _flat(absmax2), code8, nested_blocksize,
                                     float(offset), code, blocksize, out.view(-1))
    return out.view(tuple(shape))


def quantize_8bit_blockwise(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise signed dynamic 8-bit quantization (exact nearest code): (uint8 codes, fp32 absmax)."""
    flat = x.contiguous().view(-1).float()
    n = flat.numel()
    q = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=x.device)
    _impl(x).quantize_8bit_blockwise(flat, codes.dynamic_code(x.device), codes.dynamic_bounds(x.device),
                                     blocksize, q, absmax)
    return q.view(x.shape), absmax


def dequantize_8bit_blockwise(q: torch.Tensor, absmax: torch.Tensor, blocksize: int, offset: float = 0.0,
                              out: torch.Tensor | None = None) -> torch.Tensor:
    out = _out(out, q.shape, torch.float32, q.device)
    _impl(q).dequantize_8bit_blockwise(_flat(q), _flat(absmax), codes.dynamic_code(q.device), blocksize,
                                       float(offset), out.view(-1))
    return out.view(q.shape)


def _check_intn(bits: int, group_size: int, in_features: int) -> None:
    if bits not in (2, 3, 4):
        raise ValueError(f"bits={bits!r}: INT-N group quantization supports 2, 3 or 4")
    if group_size <= 0 or group_size % 8 or in_features % group_size:
        raise ValueError(f"group_size={group_size} must be a positive multiple of 8 dividing in_features={in_features}")


def quantize_intn(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric INT-N of a 2-D weight [out, in]: (packed uint8 [out, in*bits/8],
    fp32 scales [out, in/group_size], fp32 zeros [out, in/group_size]); see ``quant/intn.py``."""
    if w.dim() != 2:
        raise ValueError(f"quantize_intn needs a 2-D weight [out, in], got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    _check_intn(bits, group_size, in_f)
    if w.dtype not in _OUT_DTYPES:
        w = w.float()   # what the format does for any other float dtype: fp32 math
    flat = w.contiguous().view(-1)
    qweight = torch.empty(out_f, in_f * bits // 8, dtype=torch.uint8, device=w.device)
    scales = torch.empty(out_f, in_f // group_size, dtype=torch.float32, device=w.device)
    zeros = torch.empty_like(scales)
    if flat.numel():
        _impl(w).quantize_intn(flat, bits, group_size, in_f, qweight.view(-1), scales.view(-1), zeros.view(-1))
    return qweight, scales, zeros


def dequantize_intn(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                    shape: Sequence[int], dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """``cast(fl(fl(q - zero) * scale))`` of a packed INT-N weight of ``shape`` (out, in) into ``dtype``
    (into ``out`` when given: a contiguous tensor of out*in elements)."""
    out_f, in_f = shape
    _check_intn(bits, group_size, in_f)
    n_groups = out_f * (in_f // group_size)
    if qweight.numel() != out_f * in_f * bits // 8 or scales.numel() != n_groups or zeros.numel() != n_groups:
        raise ValueError(f"qweight ({qweight.numel()} bytes), scales ({scales.numel()}) and zeros ({zeros.numel()}) "
                         f"do not fit a {bits}-bit weight of shape {tuple(shape)} with group_size={group_size}")
    out = _out(out, shape, dtype, qweight.device)
    if out.numel():
        _impl(qweight).dequantize_intn(qweight.contiguous().view(-1), scales.float().contiguous().view(-1),
                                       zeros.float().contiguous().view(-1), bits, group_size, in_f, out.view(-1))
    return out.view(tuple(shape))
