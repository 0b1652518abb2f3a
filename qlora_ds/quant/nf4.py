"""The 4-bit blockwise formats of QLoRA: NF4 (and FP4, the paper's ablation), optionally with
double quantization of the absmax constants. Byte-compatible with bitsandbytes (design notes §2).

``quantize`` validates and returns a ``QuantizedTensor``; ``dequantize`` turns it back into floats.
The heavy lifting runs through ``qlora_ds.ops`` (CUDA / C++ / torch reference).
"""
from __future__ import annotations

import dataclasses
from math import prod

import torch

from .. import ops
from ..errors import QLoRADSError
from ..codebooks import QUANT_TYPES

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCKSIZES = tuple(2 ** k for k in range(5, 13))  # 32 … 4096, as bitsandbytes allows


def check_blocksize(blocksize: int, what: str = "blocksize") -> None:
    if not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise QLoRADSError(f"{what}={blocksize!r} is not supported; use a power of two from 32 to 4096 "
                           f"(QLoRA uses 64 for weights and 256 for double quantization)")


def all_finite(t: torch.Tensor) -> bool:
    """NaN/Inf anywhere? One min/max pass (NaN propagates through both) — ~30x cheaper than isfinite().all(),
    which dominated quantization time."""
    lo, hi = torch.aminmax(t.detach())
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def check_weight(weight: torch.Tensor) -> None:
    """Reject what cannot be quantized: wrong dtype, empty, NaN/Inf — before any work is done."""
    if not isinstance(weight, torch.Tensor):
        raise QLoRADSError(f"expected a torch.Tensor to quantize, got {type(weight).__name__}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise QLoRADSError(f"cannot quantize a {weight.dtype} tensor; convert it to one of "
                           f"{[str(d) for d in SUPPORTED_DTYPES]} first (e.g. weight.float())")
    if weight.numel() == 0:
        raise QLoRADSError(f"cannot quantize an empty tensor (shape {tuple(weight.shape)})")
    if not all_finite(weight):
        flat = weight.reshape(-1)               # a transposed or sliced weight is not viewable flat
        bad = (~torch.isfinite(flat)).nonzero()
        first = bad[0].item()
        raise QLoRADSError(f"weight holds {bad.numel()} non-finite value(s) (NaN/Inf), first at flat index {first} "
                           f"(= {flat[first].item()}); fix the checkpoint or the training run that made it")


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """Packed 4-bit codes plus their constants. With double quantization, ``absmax`` holds uint8
    codes of ``absmax - offset`` and ``absmax2`` the fp32 absmax of each ``nested_blocksize`` block."""

    packed: torch.Tensor            # uint8 [(numel + 1) // 2], first element in the high nibble
    absmax: torch.Tensor            # fp32 [n_blocks], or uint8 codes with double quantization
    shape: torch.Size
    dtype: torch.dtype              # dtype of the original weight (what bnb calls quant_state.dtype)
    blocksize: int = 64
    quant_type: str = "nf4"
    absmax2: torch.Tensor | None = None   # fp32 [ceil(n_blocks / nested_blocksize)]
    offset: float | None = None           # mean of absmax, an fp32 value
    nested_blocksize: int = 256

    def __post_init__(self):
        if self.quant_type not in QUANT_TYPES:
            raise QLoRADSError(f"quant_type={self.quant_type!r} is unknown; use one of {QUANT_TYPES}")
        check_blocksize(self.blocksize)
        numel = prod(self.shape)
        blocks = -(-numel // self.blocksize)
        if self.packed.dtype != torch.uint8 or self.packed.numel() != (numel + 1) // 2:
            raise QLoRADSError(f"packed codes must be uint8 with {(numel + 1) // 2} bytes for shape "
                               f"{tuple(self.shape)}; got {self.packed.dtype} with {self.packed.numel()}")
        if self.absmax.numel() != blocks:
            raise QLoRADSError(f"absmax must have {blocks} entries for shape {tuple(self.shape)} and blocksize "
                               f"{self.blocksize}; got {self.absmax.numel()}")
        if self.double_quant:
            check_blocksize(self.nested_blocksize, "nested_blocksize")
            if self.absmax.dtype != torch.uint8 or self.offset is None:
                raise QLoRADSError("double-quantized absmax must be uint8 codes with an offset")
            if self.absmax2.numel() != -(-blocks // self.nested_blocksize):
                raise QLoRADSError(f"nested absmax must have {-(-blocks // self.nested_blocksize)} entries; "
                                   f"got {self.absmax2.numel()}")
        elif self.absmax.dtype != torch.float32:
            raise QLoRADSError(f"absmax must be float32 without double quantization; got {self.absmax.dtype}")

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def storage_bytes(self) -> int:
        """Bytes actually stored per weight: codes + constants (the shared codebooks are not counted)."""
        total = self.packed.numel() + self.absmax.numel() * self.absmax.element_size()
        if self.double_quant:
            total += self.absmax2.numel() * 4 + 4  # nested absmax + the fp32 offset
        return total

    def absmax_fp32(self) -> torch.Tensor:
        """The per-block absmax as fp32 (undoing double quantization if needed)."""
        if not self.double_quant:
            return self.absmax
        return ops.dequantize_8bit_blockwise(self.absmax, self.absmax2, self.nested_blocksize, self.offset)

    def dequantize(self, dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None) -> torch.Tensor:
        return dequantize(self, dtype, out)

    def to(self, device) -> "QuantizedTensor":
        """Move the packed data (never dequantizes: use ``dequantize`` for floats)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(self, packed=move(self.packed), absmax=move(self.absmax),
                                   absmax2=move(self.absmax2))

    def to_bnb_state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        from .bnb_format import to_bnb_state_dict
        return to_bnb_state_dict(self, prefix)

    @classmethod
    def from_bnb_state_dict(cls, state_dict: dict[str, torch.Tensor], prefix: str = "weight") -> "QuantizedTensor":
        from .bnb_format import from_bnb_state_dict
        return from_bnb_state_dict(state_dict, prefix)


def quantize(weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
             nested_blocksize: int = 256) -> QuantizedTensor:
    """Quantize a float tensor blockwise to NF4/FP4, bit-for-bit as ``bitsandbytes.functional.quantize_4bit``."""
    if quant_type not in QUANT_TYPES:
        raise QLoRADSError(f"quant_type={quant_type!r} is unknown; use 'nf4' (QLoRA) or 'fp4'")
    check_blocksize(blocksize)
    if double_quant:
        check_blocksize(nested_blocksize, "nested_blocksize")
    check_weight(weight)
    with torch.no_grad():
        packed, absmax = ops.quantize_4bit(weight.detach(), quant_type, blocksize)
        absmax2 = offset = None
        if double_quant:
            offset_t = absmax.mean()
            absmax, absmax2 = ops.quantize_8bit_blockwise(absmax - offset_t, nested_blocksize)
            offset = offset_t.item()
    return QuantizedTensor(packed=packed, absmax=absmax, shape=torch.Size(weight.shape), dtype=weight.dtype,
                           blocksize=blocksize, quant_type=quant_type, absmax2=absmax2, offset=offset,
                           nested_blocksize=nested_blocksize)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.bfloat16,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Back to floats of ``dtype`` (fp32 products, then one rounding), optionally into ``out``."""
    if qt.double_quant:
        return ops.dequantize_4bit_dq(qt.packed, qt.absmax, qt.absmax2, qt.offset, qt.quant_type, qt.blocksize,
                                      qt.nested_blocksize, qt.shape, dtype, out)
    return ops.dequantize_4bit(qt.packed, qt.absmax, qt.quant_type, qt.blocksize, qt.shape, dtype, out)


def bits_per_param(qt: QuantizedTensor) -> float:
    """Bits per weight from the real storage: 4.127 for NF4 + DQ (64/256), 4.5 without DQ."""
    return 8.0 * qt.storage_bytes() / qt.numel
