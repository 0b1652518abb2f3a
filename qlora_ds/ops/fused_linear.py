"""The fused 4-bit linear on CPUs with AMX: dequantize straight into AMX tiles inside the GEMM.

``linear_4bit(x, …)`` = ``x · deq(W)ᵀ`` and ``linear_4bit_grad_input(g, …)`` = ``g · deq(W)`` for a blockwise
NF4/FP4 weight (with or without double quantization), without ever writing the bf16 weight
(``csrc/quant_cpu_amx.cpp``). The dequantized values are bit-identical to ``dequantize_4bit(_dq)``'s; results
differ from dequantize + ``torch.matmul`` only in the order of the fp32 accumulation.

``supported(x, shape, blocksize)`` says whether a call can take this path: a bf16 CPU tensor, the compiled CPU op on
a CPU with AMX-BF16 / AVX512-BF16 / AVX512-VBMI (and the avx512 path active: ``QLORA_DS_CPU_ISA=avx2`` turns it
off), ``in_features % 64 == 0``, ``out_features % 32 == 0``, a power-of-two blocksize ≥ 64, and a call where it is
faster: at most 256 rows (tokens), or at most 1024 rows of a weight of ≥ 8M elements. Not 0 rows: those take the
generic path, which returns an empty result. Measured fused / dequantize + matmul, fwd+bwd with LoRA, 2 threads,
Intel Xeon with AMX (bench/RESULTS.md): 0.58-0.89 at 1-128 rows for every shape; at 512 rows 0.84 (4096²) and 0.97
(11008×4096) but 1.04-1.09 for SmolLM2-135M's small weights (its tile loop is slower than oneDNN's where the whole
bf16 weight stays in cache); at 1024 rows 0.97 (4096²) vs 1.04 (2560×960); at 2048 rows 1.02-1.04 (it dequantizes
again per 512 rows). Otherwise the layers dequantize into a buffer and call torch's matmul, as on every other
machine. ``QLORA_DS_FUSED_LINEAR=0`` (or ``set_enabled(False)``) turns the path off.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import codebooks as codes
from ..switch import Switch
from . import load_backend, reference

_switch = Switch("QLORA_DS_FUSED_LINEAR", default=True)
set_enabled = _switch.set     # set_enabled(False) turns the path off for this process; returns the previous setting
MAX_ROWS = 256                  # any weight: fused at up to this many rows
MAX_ROWS_LARGE = 1024           # weights of LARGE_WEIGHT elements or more: fused up to this many rows
LARGE_WEIGHT = 1 << 23


def available() -> bool:
    """The path is on and this CPU runs it now (the compiled op, AMX, the avx512 path), whatever the call."""
    if not _switch.on:
        return False
    impl = load_backend("cpu")
    return impl is not reference and impl.amx_linear_supported()


def supported(x: torch.Tensor, shape: Sequence[int], blocksize: int) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.bfloat16:
        return False
    out_f, in_f = shape
    if in_f % 64 or out_f % 32 or blocksize < 64 or blocksize & (blocksize - 1):
        return False
    rows = x.numel() // max(1, x.shape[-1])
    if rows == 0 or rows > (MAX_ROWS_LARGE if out_f * in_f >= LARGE_WEIGHT else MAX_ROWS):
        return False
    return available()


def _weight_args(packed, absmax, absmax2, offset, quant_type):
    """The op's weight arguments; ``absmax`` holds uint8 codes with double quantization (``absmax2`` fp32)."""
    if absmax2 is None:
        return packed.view(-1), absmax.view(torch.float32).view(-1), None, None, 0.0, codes.code4(quant_type, "cpu")
    return (packed.view(-1), absmax.view(-1), absmax2.view(torch.float32).view(-1), codes.dynamic_code("cpu"),
            float(offset), codes.code4(quant_type, "cpu"))


def _run(op: str, a: torch.Tensor, packed, absmax, absmax2, offset, quant_type, blocksize, nested_blocksize, shape,
         transpose: bool) -> torch.Tensor:
    out_f, in_f = shape
    cols, out_cols = (out_f, in_f) if transpose else (in_f, out_f)
    a2 = a.reshape(-1, cols).contiguous()
    out = getattr(load_backend("cpu"), op)(a2, *_weight_args(packed, absmax, absmax2, offset, quant_type),
                                           blocksize, nested_blocksize, out_f, in_f)
    return out.view(*a.shape[:-1], out_cols)


def linear_4bit(x: torch.Tensor, packed, absmax, absmax2, offset, quant_type: str, blocksize: int,
                nested_blocksize: int, shape: Sequence[int]) -> torch.Tensor:
    """``x[..., in] · deq(W)ᵀ`` → ``[..., out]`` in bf16 (``supported`` must hold)."""
    return _run("nf4_linear_fwd", x, packed, absmax, absmax2, offset, quant_type, blocksize, nested_blocksize, shape,
                transpose=False)


def linear_4bit_grad_input(g: torch.Tensor, packed, absmax, absmax2, offset, quant_type: str, blocksize: int,
                           nested_blocksize: int, shape: Sequence[int]) -> torch.Tensor:
    """``g[..., out] · deq(W)`` → ``[..., in]`` in bf16 (``supported`` must hold for ``g``)."""
    return _run("nf4_linear_bwd", g, packed, absmax, absmax2, offset, quant_type, blocksize, nested_blocksize, shape,
                transpose=True)
