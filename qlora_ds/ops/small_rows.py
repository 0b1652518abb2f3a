"""The fused 4-bit × few-rows linear on CPU: ``x · deq(W)ᵀ`` straight from the packed weight, for decoding.

Token-by-token generation multiplies one row (a few, for tiny batches) by every frozen weight. Dequantizing the whole
weight and then calling torch's matmul (the general path) writes and re-reads 4-8× the packed bytes per linear per
token; ``linear_4bit`` instead streams the packed NF4/FP4 weight once, decodes 32 codes at a time in registers and
multiplies them into every row (``csrc/quant_cpu_gemv.cpp``; bitsandbytes' CUDA equivalent is ``gemv_4bit``). x fp32
or bf16, output in x's dtype, fp32 accumulation; the weight values are the dequantizer's to the bit, so results differ
from dequantize + matmul in fp32 only in the order of the accumulation. Scalar, AVX2+FMA and AVX-512 loops, chosen at
run time (``QLORA_DS_CPU_ISA``); torch's thread pool over the output features.

``supported(x, shape, blocksize)`` says whether a call takes this path: a CPU fp32/bf16 tensor of at most
``MAX_ROWS`` rows (tokens), ``in_features % blocksize == 0`` (a block never straddles two weight rows), the compiled
CPU op present, and the path on (``QLORA_DS_SMALL_ROWS=0`` or ``set_enabled(False)`` turns it off). Where the AMX
fused linear (``fused_linear``) would take a bf16 call, this path keeps only up to ``MAX_ROWS_BESIDE_AMX`` rows; where
the kernels run their scalar loop (no AVX2), only 1 row.

Measured (``python -m bench decode``, Intel Xeon 2.6 GHz, 2 vCPUs, AVX-512 + AMX; "AVX2" = the same machine emulating
an AVX2-only CPU), one linear, 1 thread, ours / (dequantize + matmul) for 4096², 1536×576, 576²: native bf16 0.14,
0.27, 0.33 at 1 row and 0.51, 0.59, 0.62 at 8 rows; native fp32 0.10-0.36 / 0.21-0.57; AVX2 fp32 0.27-0.60 /
0.35-0.70. Dequantize + matmul only wins from 12 rows on (bf16 through oneDNN's AMX matmul) or 16-32 rows (fp32),
hence ``MAX_ROWS`` = 8. Against the AMX fused linear (bf16): 0.40-0.62 at 1 row, 0.70-1.03 at 4, 1.11-1.48 at 8,
hence ``MAX_ROWS_BESIDE_AMX`` = 4. The scalar loop (``QLORA_DS_CPU_ISA=scalar``, torch without AVX): 0.37-0.74 at
1 row, 1.1-1.6 at 4. SmolLM2-135M ``generate`` (r=64 adapters), ms per token off → on: native bf16
118 → 105 (1 thread), 98 → 90 (2); native fp32 123 → 82; AVX2 fp32 126 → 95 (1 thread), 92 → 76 (2).

``supported_intn`` / ``linear_intn``: the same for QA-LoRA's group-wise INT-N base weight (bits 2, 3, 4;
``csrc/quant_cpu_gemv_intn.cpp``): per (row, group) the 2^bits values ``(q - zero) * scale`` are built once, the
dequantizer's to the bit. No AMX kernel exists for INT-N, so up to ``MAX_ROWS`` rows in bf16 too. Measured the same
way (INT4 and INT3, group size 32), ours / (dequantize + matmul): native bf16 0.20-0.40 at 1 row, 0.61-0.84 at 8;
AVX2 fp32 0.23-0.56 / 0.34-0.75. QA-LoRA (INT4) SmolLM2-135M ``generate``, ms per token off → on, 1 thread: native
bf16 156 → 114, AVX2 fp32 130 → 95.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..switch import Switch
from . import fused_linear, load_backend, reference
from .fused_linear import _weight_args

ENV = "QLORA_DS_SMALL_ROWS"
MAX_ROWS = 8                 # rows (tokens) per call up to which this path is taken
MAX_ROWS_BESIDE_AMX = 4      # bf16 calls the AMX fused linear would take: this path up to this many rows
MAX_ROWS_SCALAR = 1          # the kernels' scalar loop (no AVX2, e.g. a non-x86 build): 1 row only
_DTYPES = (torch.float32, torch.bfloat16)
_switch = Switch(ENV, default=True)
set_enabled = _switch.set     # set_enabled(False) turns the path off for this process; returns the previous setting


def available() -> bool:
    """The path is on and the compiled CPU op has the kernel, whatever the call."""
    if not _switch.on:
        return False
    impl = load_backend("cpu")
    return impl is not reference and hasattr(impl, "small_rows_linear")


def _rows_ok(x: torch.Tensor, in_f: int, unit: int) -> bool:
    """The path is available for x: a CPU fp32/bf16 tensor of ``in_f`` columns, a multiple of ``unit`` (the blocksize
    or group size), and at most ``MAX_ROWS`` rows (``MAX_ROWS_SCALAR`` on the scalar loop)."""
    if x.device.type != "cpu" or x.dtype not in _DTYPES or x.dim() == 0:
        return False
    if unit <= 0 or in_f % unit or x.shape[-1] != in_f:
        return False
    rows = x.numel() // max(1, in_f)
    if rows > MAX_ROWS or not available():
        return False
    return rows <= MAX_ROWS_SCALAR or load_backend("cpu").cpu_isa() != "scalar"


def _run(op: str, x: torch.Tensor, weight_args, out_f: int, in_f: int, bias) -> torch.Tensor:
    """The op on x's rows; an fp32 bias is kept as it is (added before the one rounding to x's dtype)."""
    if bias is not None and bias.dtype not in (torch.float32, x.dtype):
        bias = bias.float()
    y = getattr(load_backend("cpu"), op)(x.reshape(-1, in_f).contiguous(), *weight_args, bias)
    return y.view(*x.shape[:-1], out_f)


def supported(x: torch.Tensor, shape: Sequence[int], blocksize: int) -> bool:
    _, in_f = shape
    if not _rows_ok(x, in_f, blocksize):
        return False
    return x.numel() // max(1, in_f) <= MAX_ROWS_BESIDE_AMX or not fused_linear.supported(x, shape, blocksize)


def linear_4bit(x: torch.Tensor, packed, absmax, absmax2, offset, quant_type: str, blocksize: int,
                nested_blocksize: int, shape: Sequence[int], bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x[..., in] · deq(W)ᵀ (+ bias)`` → ``[..., out]`` in x's dtype (``supported`` must hold). ``absmax`` holds
    uint8 codes with double quantization (``absmax2`` fp32, ``offset`` a float), as ``fused_linear.linear_4bit``."""
    out_f, in_f = shape
    args = (*_weight_args(packed, absmax, absmax2, offset, quant_type), blocksize, nested_blocksize, out_f, in_f)
    return _run("small_rows_linear", x, args, out_f, in_f, bias)


def supported_intn(x: torch.Tensor, shape: Sequence[int], group_size: int) -> bool:
    """Whether ``linear_intn`` takes this call (the conditions of ``supported``, the group size for the block size,
    a multiple of 8; the compiled op must have the INT-N kernel)."""
    return (group_size % 8 == 0 and _rows_ok(x, shape[1], group_size)
            and hasattr(load_backend("cpu"), "small_rows_linear_intn"))


def linear_intn(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                group_size: int, shape: Sequence[int], bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x[..., in] · deq(W)ᵀ (+ bias)`` → ``[..., out]`` in x's dtype for an INT-N weight (``supported_intn`` must
    hold): ``qweight`` uint8 [out, in*bits/8], ``scales``/``zeros`` fp32 [out, in/group_size]."""
    out_f, in_f = shape
    args = (qweight.reshape(-1), scales.reshape(-1), zeros.reshape(-1), bits, group_size, out_f, in_f)
    return _run("small_rows_linear_intn", x, args, out_f, in_f, bias)
