"""Pure-torch reference backend: the oracle the kernels are tested against, and the fallback.

Backend interface (the compiled CPU and CUDA modules expose the same seven functions):
outputs are preallocated by the caller, every tensor is 1-D, contiguous and on one device, and
every function returns None. Semantics are bitsandbytes' default-backend rules, bit for bit:

* full blocks store their unclamped absmax and scale by ``x * (1 / max(absmax, 1e-38))``;
* a trailing partial block stores ``max(absmax, 1e-38)`` and scales by a true division;
* a scaled value maps to the number of code midpoints strictly below it (ties go to the lower code);
* two 4-bit codes per byte, the first element in the high nibble; an odd tail pads with code(0.0);
* dequantization multiplies in fp32 and then casts; double-quant absmax is
  ``fl(fl(code8[q] * absmax2) + offset)`` (two roundings, no FMA).

Group-wise INT-N (QA-LoRA, ``quant/intn.py``): per (row, group) of fp32 values the grid spans
``[min(min, 0), max(max, 0)]``, ``span = max - min``, ``scale = span / maxq``,
``zero = clamp(round(-min / scale), 0, maxq)``, ``q = clamp(round(w / scale + zero), 0, maxq)``
(true divisions, round half to even, clamp keeps -0.0); codes form a dense little-endian bit stream
(code k at bits N*k .. N*k+N-1). Dequantization is ``cast(fl(fl(q - zero) * scale))``.
A group whose scale would be 0 takes the grid ``[-1, 1]`` instead (so its zero point is the code of 0 and its
values dequantize to exactly 0): an all-zero group, and a group of fp32 subnormals whose span / maxq underflows
(spans below ~1e-44; on a GPU that flushes subnormals, any span of them), which would otherwise give
zero = 0/0 = NaN. The test is on the computed scale, not on the span, so every backend decides alike.
"""
from __future__ import annotations

import math

import torch

_TINY = 1e-38


def _scale_blockwise(x: torch.Tensor, blocksize: int, absmax_out: torch.Tensor) -> torch.Tensor:
    """Scale x (fp32, 1-D) blockwise into [-1, 1]; writes absmax_out; returns the scaled values."""
    n = x.numel()
    rem = n % blocksize
    full = n - rem
    parts = []
    if full:
        xb = x[:full].view(-1, blocksize)
        amax = xb.abs().amax(dim=1)
        absmax_out[: full // blocksize].copy_(amax)
        parts.append((xb * (1.0 / amax.clamp(min=_TINY)).unsqueeze(1)).clamp_(-1, 1).view(-1))
    if rem:
        am = x[full:].abs().amax().clamp(min=_TINY)
        absmax_out[-1] = am
        parts.append((x[full:] / am).clamp_(-1, 1))
    if not parts:           # an empty tensor: nothing to scale (the compiled ops accept it too)
        return x[:0]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def quantize_4bit(x, bounds, order, blocksize, packed_out, absmax_out) -> None:
    scaled = _scale_blockwise(x.float(), blocksize, absmax_out)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = order.long()[torch.bucketize(scaled, bounds)].to(torch.uint8)
    packed_out.copy_((q[0::2] << 4) | q[1::2])


def _unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    q = torch.stack((packed >> 4, packed & 0xF), dim=1).view(-1)
    return q[:n].long()


def _apply_absmax(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = values.numel()
    idx = torch.arange(n, device=values.device) // blocksize
    return values * absmax[idx]


def dequantize_4bit(packed, absmax, code, blocksize, out) -> None:
    n = out.numel()
    out.copy_(_apply_absmax(code[_unpack(packed, n)], absmax, blocksize))


def dequantize_8bit_blockwise(q, absmax, code8, blocksize, offset, out) -> None:
    vals = _apply_absmax(code8[q.long()], absmax, blocksize)
    out.copy_(vals + torch.tensor(offset, dtype=torch.float32, device=vals.device))


def dequantize_4bit_dq(packed, qabsmax, absmax2, code8, nested_blocksize, offset, code, blocksize, out) -> None:
    absmax = torch.empty(qabsmax.numel(), dtype=torch.float32, device=qabsmax.device)
    dequantize_8bit_blockwise(qabsmax, absmax2, code8, nested_blocksize, offset, absmax)
    dequantize_4bit(packed, absmax, code, blocksize, out)


def quantize_8bit_blockwise(x, code8, bounds8, blocksize, q_out, absmax_out) -> None:
    scaled = _scale_blockwise(x.float(), blocksize, absmax_out)
    q_out.copy_(torch.bucketize(scaled, bounds8).to(torch.uint8))


# ---------------------------------------------------------------------------------------- INT-N (QA-LoRA)
def pack_intn(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [rows, n] (n % 8 == 0) -> dense little-endian bit stream uint8 [rows, n*bits/8]."""
    rows, n = codes.shape
    c = codes.to(torch.int64).view(rows, n // 8, 8)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    word = (c << shifts).sum(dim=-1, keepdim=True)               # 8 codes -> one 8*bits-bit word
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    return ((word >> byte_shifts) & 0xFF).to(torch.uint8).view(rows, n * bits // 8)


def unpack_intn(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_intn``: uint8 [rows, n*bits/8] -> uint8 codes [rows, n]."""
    rows = packed.shape[0]
    b = packed.to(torch.int64).view(rows, n // 8, bits)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (b << byte_shifts).sum(dim=-1, keepdim=True)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    return ((word >> shifts) & (2 ** bits - 1)).to(torch.uint8).view(rows, n)


def quantize_intn(w, bits, group_size, in_features, qweight_out, scales_out, zeros_out) -> None:
    out_f = w.numel() // in_features
    maxq = 2 ** bits - 1
    x = w.float().view(out_f, in_features // group_size, group_size)
    # the grid spans [min(min, 0), max(max, 0)] (GPTQ's rule): the zero point is then always a code in [0, maxq], so
    # a group that does not straddle 0 keeps its values; a group whose scale is 0 (all zero, or a span of
    # subnormals that underflows) gets [-1, 1] (0 is its zero point)
    wmin, wmax = x.amin(dim=-1).clamp(max=0), x.amax(dim=-1).clamp(min=0)
    # divide by a tensor: a Python-scalar divisor is computed on CUDA as span * fl(1/maxq) (torch's CPU-scalar
    # shortcut), which differs by an ulp from the kernels' true division on a third to two thirds of the scales
    maxq_t = torch.full_like(wmin, maxq)
    flat = (wmax - wmin) / maxq_t == 0
    wmin = torch.where(flat, torch.full_like(wmin, -1.0), wmin)
    wmax = torch.where(flat, torch.ones_like(wmax), wmax)
    scales = (wmax - wmin) / maxq_t
    zeros = torch.round(-wmin / scales).clamp(0, maxq)
    q = torch.round(x / scales.unsqueeze(-1) + zeros.unsqueeze(-1)).clamp(0, maxq)
    qweight_out.copy_(pack_intn(q.to(torch.uint8).view(out_f, in_features), bits).view(-1))
    scales_out.copy_(scales.view(-1))
    zeros_out.copy_(zeros.view(-1))


def dequantize_intn(qweight, scales, zeros, bits, group_size, in_features, out) -> None:
    out_f = out.numel() // in_features
    q = unpack_intn(qweight.view(out_f, -1), bits, in_features).view(out_f, -1, group_size).float()
    w = (q - zeros.view(out_f, -1, 1)) * scales.view(out_f, -1, 1)
    out.copy_(w.view(-1))


# ---- LoRA-input dropout with a counter-based mask (not one of the seven: csrc/lora_dropout_cpu.cpp) ----------
_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """Chris Wellons' lowbias32 on int64 tensors holding uint32 values (products wrap mod 2⁶⁴: low words exact)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def dropout_keep(n: int, p: float, seed: int) -> torch.Tensor:
    """keep[i] = mix(mix(lo(i) ^ k0(hi(i))) + k1) >= round(p·2³²), i < n: the mask ``hash_dropout`` applies."""
    s = seed & 0xFFFFFFFFFFFFFFFF
    k0 = _mix32(torch.tensor((s & _M32) ^ 0x9E3779B9))
    k1 = _mix32(torch.tensor((s >> 32) ^ 0x85EBCA6B))
    i = torch.arange(n, dtype=torch.int64)
    hi = i >> 32
    k0 = torch.where(hi == 0, k0, _mix32(k0 ^ _mix32(hi & _M32)))
    h = _mix32((_mix32((i & _M32) ^ k0) + k1) & _M32)
    return h >= min(math.floor(p * 2.0 ** 32 + 0.5), _M32)          # llround, at most 2³² − 1


def hash_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """``x · (keep ? 1 / (1 − p) : 0)`` in fp32, cast back to x's dtype (round to nearest even); p = 1 drops all."""
    scale = torch.tensor(1.0 / (1.0 - p) if p < 1.0 else 0.0, dtype=torch.float32)
    keep = dropout_keep(x.numel(), p, seed).view(x.shape)
    return (x.float() * torch.where(keep, scale, torch.zeros((), dtype=torch.float32))).to(x.dtype)
