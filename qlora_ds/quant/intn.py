"""Group-wise asymmetric INT-N (N = 2, 3, 4): the base format of QA-LoRA (design notes §3).

Per (output row, group of ``group_size`` input features) an fp32 ``scale`` and an fp32 zero point
``zero``; a weight is ``w = scale * (q - zero)`` with an integer code ``q`` in [0, 2^N - 1].

Choices (the rest of the package relies on them):

* **Packing** — the codes of each output row form a dense little-endian bit stream (code ``k``
  occupies bits ``N*k … N*k+N-1``) stored as uint8, ``in_features * N / 8`` bytes per row. This is
  the same bit stream GPTQ packs into int32 words (its 3-bit layout included: 32 codes in 3 words,
  codes 10 and 21 straddling words), so GPTQ export is a byte view plus a transpose.
* **Float zero points** — quantization produces integer-valued zeros (as GPTQ), but they are kept as
  fp32 so that the QA-LoRA merge can move them by a non-integer amount and stay exact. GPTQ's
  format only has integer zeros: ``to_gptq`` rounds them and reports the extra error it introduced.
* **The grid spans [min(min, 0), max(max, 0)]** of the group (GPTQ's rule): the zero point is then always a
  code in [0, 2^N - 1], so a group that lies on one side of 0 (all positive, all negative, constant) keeps its
  values instead of collapsing to one; an all-zero group gets the grid [-1, 1] (0 exactly representable, and a
  nonzero scale, so the merge never divides by zero).

``quantize`` and ``dequantize_parts`` run through ``qlora_ds.ops`` (compiled CPU/CUDA kernels, bit-exact
with the torch reference in ``ops/reference.py``); ``pack``/``unpack`` stay pure torch for GPTQ export.
"""
from __future__ import annotations

import dataclasses

import torch

from .. import ops
from ..errors import QLoRADSError
from .nf4 import all_finite
from ..ops import reference

BITS = (2, 3, 4)


def check_bits(bits) -> None:
    if bits not in BITS:
        raise QLoRADSError(f"bits={bits!r} is not supported for INT-N group quantization; use 2, 3 or 4")


def check_group_size(group_size, in_features: int | None = None) -> None:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0 or group_size % 8:
        raise QLoRADSError(f"group_size={group_size!r} is not supported; use a positive multiple of 8 "
                           f"(QA-LoRA uses 32, also 64 or 128)")
    if in_features is not None and in_features % group_size:
        fits = [g for g in range(8, min(in_features, 256) + 1, 8) if in_features % g == 0]
        advice = (f"pick a group size that divides it: {', '.join(map(str, fits))}" if fits
                  else "no supported group size (a multiple of 8) divides it")
        raise QLoRADSError(f"in_features={in_features} is not divisible by group_size={group_size}; {advice}")


@dataclasses.dataclass(frozen=True)
class IntNQuantizedTensor:
    """Packed INT-N codes of a 2-D weight [out, in] with per-(row, group) fp32 scales and zeros."""

    qweight: torch.Tensor     # uint8 [out, in * bits // 8], bit stream per row
    scales: torch.Tensor      # fp32 [out, in // group_size]
    zeros: torch.Tensor       # fp32 [out, in // group_size]  (float, see module docstring)
    shape: torch.Size         # (out, in)
    bits: int = 4
    group_size: int = 32
    dtype: torch.dtype = torch.float32   # dtype of the original weight

    def __post_init__(self):
        check_bits(self.bits)
        if len(self.shape) != 2:
            raise QLoRADSError(f"INT-N group quantization needs a 2-D weight, got shape {tuple(self.shape)}")
        out_f, in_f = self.shape
        check_group_size(self.group_size, in_f)
        want = (out_f, in_f * self.bits // 8)
        if self.qweight.dtype != torch.uint8 or tuple(self.qweight.shape) != want:
            raise QLoRADSError(f"qweight must be uint8 of shape {want}; got {self.qweight.dtype} "
                               f"{tuple(self.qweight.shape)}")
        groups = (out_f, in_f // self.group_size)
        for name in ("scales", "zeros"):
            t = getattr(self, name)
            if t.dtype != torch.float32 or tuple(t.shape) != groups:
                raise QLoRADSError(f"{name} must be float32 of shape {groups}; got {t.dtype} {tuple(t.shape)}")

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def codes(self) -> torch.Tensor:
        """The integer codes, uint8 [out, in]."""
        return unpack(self.qweight, self.bits, self.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self, dtype)

    def storage_bytes(self) -> int:
        return self.qweight.numel() + 8 * self.scales.numel()


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [rows, n] (n % 8 == 0) -> dense little-endian bit stream uint8 [rows, n*bits/8]."""
    return reference.pack_intn(codes, bits)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack``: uint8 [rows, n*bits/8] -> uint8 codes [rows, n]."""
    return reference.unpack_intn(packed, bits, n)


def quantize(weight: torch.Tensor, bits: int = 4, group_size: int = 32) -> IntNQuantizedTensor:
    """Round-to-nearest asymmetric min/max quantization per (row, group); integer-valued zeros."""
    check_bits(bits)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise QLoRADSError("INT-N group quantization needs a 2-D weight tensor [out_features, in_features]")
    if not weight.is_floating_point() or not all_finite(weight):
        raise QLoRADSError("weight must be a finite floating-point tensor; fix NaN/Inf in the checkpoint first")
    out_f, in_f = weight.shape
    check_group_size(group_size, in_f)
    with torch.no_grad():
        packed, scales, zeros = ops.quantize_intn(weight.detach(), bits, group_size)
    return IntNQuantizedTensor(qweight=packed, scales=scales.contiguous(), zeros=zeros.contiguous(),
                               shape=torch.Size(weight.shape), bits=bits, group_size=group_size, dtype=weight.dtype)


def dequantize_parts(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                     group_size: int, shape, dtype: torch.dtype = torch.float32,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """``scale * (q - zero)`` in fp32, then one rounding to ``dtype`` (works on raw tensors: the layer
    passes its gathered parameters here). ``out``: a contiguous ``dtype`` tensor of out*in elements to
    write into (a reused workspace) instead of a fresh one."""
    if out is None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return ops.dequantize_intn(qweight, scales, zeros, bits, group_size, tuple(shape), torch.float32).to(dtype)
    return ops.dequantize_intn(qweight, scales, zeros, bits, group_size, tuple(shape), dtype, out)


def dequantize(qt: IntNQuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return dequantize_parts(qt.qweight, qt.scales, qt.zeros, qt.bits, qt.group_size, qt.shape, dtype)


# ----------------------------------------------------------------------------------------- GPTQ export
def _words(stream: torch.Tensor) -> torch.Tensor:
    """uint8 bit stream [rows, nbytes] (nbytes % 4 == 0) -> int32 little-endian words [rows, nbytes/4]."""
    b = stream.to(torch.int64).view(stream.shape[0], -1, 4)
    w = (b << torch.tensor([0, 8, 16, 24], device=b.device)).sum(-1)
    return torch.where(w >= 2 ** 31, w - 2 ** 32, w).to(torch.int32)


def to_gptq(qt: IntNQuantizedTensor, scales_dtype: torch.dtype = torch.float16
            ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """GPTQ (AutoGPTQ / Optimum, old zero-minus-one format) tensors plus an error report.

    ``qweight`` int32 [in*bits/32, out] packed along the input dim; ``qzeros`` int32
    [in/group, out*bits/32] packed along the output dim holding ``zero - 1``; ``scales``
    [in/group, out] in ``scales_dtype``; ``g_idx`` int32 [in]. GPTQ zeros are integers in
    [1, 2^bits] (what zero-minus-one can hold): float zeros (after a QA-LoRA merge) are rounded and
    clamped, scales are rounded to ``scales_dtype``; the report gives the extra weight error.
    """
    out_f, in_f = qt.shape
    if (in_f * qt.bits) % 32 or (out_f * qt.bits) % 32:
        raise QLoRADSError(f"GPTQ packs {qt.bits}-bit codes into int32 words: in_features ({in_f}) and "
                           f"out_features ({out_f}) times bits must be multiples of 32")
    qweight = _words(qt.qweight).t().contiguous()
    zi = torch.round(qt.zeros).clamp(1, qt.maxq + 1)
    zcodes = (zi - 1).to(torch.uint8).t().contiguous()                 # [groups, out]
    qzeros = _words(pack(zcodes, qt.bits))
    scales = qt.scales.t().contiguous().to(scales_dtype)
    g_idx = (torch.arange(in_f, device=qt.device) // qt.group_size).to(torch.int32)
    exact = qt.dequantize(torch.float32)
    approx = dequantize_parts(qt.qweight, scales.float().t().contiguous(), zi, qt.bits, qt.group_size, qt.shape)
    err = (approx - exact).abs()
    report = {
        "max_abs_error": err.max().item(),
        "mean_abs_error": err.mean().item(),
        "rel_fro_error": (err.norm() / exact.norm().clamp(min=1e-30)).item(),
        "zeros_rounded": int((qt.zeros != torch.round(qt.zeros)).sum().item()),
        "zeros_clamped": int(((torch.round(qt.zeros) < 1) | (torch.round(qt.zeros) > qt.maxq + 1)).sum().item()),
    }
    sd = {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}
    return sd, report
