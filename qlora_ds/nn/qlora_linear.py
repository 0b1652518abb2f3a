"""QLoRALinear: a frozen NF4/FP4 base (double quantization by default) plus a LoRA adapter.

``y = x·deq(W)ᵀ + b + (α/r)·B(A(dropout(x)))`` in the compute dtype; the output is cast back to
x's dtype (as bitsandbytes' Linear4bit does).

Parameter layout (binding for ZeRO-3 and the injection code): the frozen base is stored as **uint8**
``nn.Parameter``s with ``requires_grad=False`` so that ``deepspeed.zero.Init`` partitions them and no
dtype cast ever touches the bytes:

* ``weight``          uint8 [(out·in + 1) // 2]  packed codes (first element in the high nibble)
* ``weight_absmax``   uint8 [n_blocks] DQ codes, or the fp32 absmax bytes [4·n_blocks] without DQ
* ``weight_absmax2``  uint8 [4·n_nested]  fp32 nested absmax bytes (DQ only)
* ``weight_offset``   uint8 [4]           the fp32 DQ offset's bytes (DQ only)
* ``bias``            compute dtype [out], frozen (or None)

Metadata are plain attributes: ``weight_shape``, ``weight_dtype`` (dtype of the original weight),
``quant_type``, ``blocksize``, ``double_quant``, ``nested_blocksize``.

The DQ offset is also cached as a python float (``offset()``), so a forward never reads the 4-byte
parameter with ``.item()`` (a device sync on CUDA). The cache remembers which ``weight_offset``
Parameter object, at which version counter, it was read from: ``set_quantized_weight`` fills it
from the QuantizedTensor, ``load_state_dict`` refreshes it, a replaced parameter (a loader's
``setattr``) or an in-place write through the parameter (``copy_``) invalidates it, and an invalid
cache is re-read once — at a forward, where ZeRO-3 has gathered the parameter. ZeRO-3's
partition/gather (``param.data = …``) keeps the version, so it costs nothing. Code that writes the
bytes through ``weight_offset.data`` must call ``refresh_offset()``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import QLoRADSError
from ..quant.nf4 import QuantizedTensor, quantize
from .config import QLoRAConfig
from .dense import dense_module
from .dropout import LoRADropout
from . import guards
from .functional import NF4LinearFunction, dequantize_nf4_parts, with_adapter


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """fp32 tensor -> its bytes as a flat uint8 tensor (a view when contiguous)."""
    return t.detach().to(torch.float32).contiguous().view(-1).view(torch.uint8)


def part_sizes(numel: int, config) -> dict[str, int]:
    """Elements of the uint8 parts a blockwise 4-bit weight of ``numel`` elements is kept as (QLoRALinear,
    QuantizedExperts): packed codes, absmax (DQ codes, or the fp32 absmax's bytes), and with double quantization the
    nested fp32 absmax's bytes and the offset's."""
    blocks = -(-numel // config.blocksize)
    if config.double_quant:
        return {"packed": (numel + 1) // 2, "absmax": blocks, "absmax2": 4 * -(-blocks // config.nested_blocksize),
                "offset": 4}
    return {"packed": (numel + 1) // 2, "absmax": 4 * blocks}


def stored_parts(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """``qt`` as those uint8 parts (views where they can be)."""
    parts = {"packed": qt.packed.view(-1)}
    if qt.double_quant:
        parts["absmax"] = qt.absmax.view(-1)
        parts["absmax2"] = _bytes(qt.absmax2)
        parts["offset"] = _bytes(torch.tensor([qt.offset], dtype=torch.float32, device=qt.packed.device))
    else:
        parts["absmax"] = _bytes(qt.absmax)
    return parts


def _weight_part(part: str) -> str:
    """QLoRALinear's parameter name for a part: ``weight`` for the codes, ``weight_<part>`` for the others."""
    return "weight" if part == "packed" else f"weight_{part}"


def build_lora(module: nn.Module, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
               device) -> None:
    """Attach PEFT-named LoRA submodules (fp32) and the scaling to ``module``."""
    module.r = r
    module.lora_alpha = alpha
    module.scaling = alpha / r
    module.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=torch.float32)
    module.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=torch.float32)
    module.lora_dropout = LoRADropout(dropout) if dropout > 0 else nn.Identity()
    module.disable_adapter = False
    reset_lora(module)


def reset_lora(module: nn.Module) -> None:
    """PEFT's init: A Kaiming-uniform (a=sqrt(5)), B zeros, so a fresh adapter is a no-op."""
    if module.lora_A.weight.is_meta:
        return
    with torch.no_grad():
        nn.init.kaiming_uniform_(module.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(module.lora_B.weight)


class QLoRALinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, config: QLoRAConfig, device=None):
        super().__init__()
        if not isinstance(config, QLoRAConfig):
            raise QLoRADSError(f"QLoRALinear needs a QLoRAConfig, got {type(config).__name__}")
        config = config.resolved(device)      # compute_dtype "auto" -> the dtype this device computes best
        if in_features <= 0 or out_features <= 0:
            raise QLoRADSError(f"in_features={in_features}, out_features={out_features} must be positive")
        self.in_features, self.out_features, self.config = in_features, out_features, config
        self.compute_dtype = config.compute_dtype
        self.weight_shape = torch.Size((out_features, in_features))
        self.weight_dtype = config.compute_dtype
        self.quant_type, self.blocksize = config.quant_type, config.blocksize
        self.double_quant, self.nested_blocksize = config.double_quant, config.nested_blocksize
        for part, n in part_sizes(in_features * out_features, config).items():
            setattr(self, _weight_part(part), _frozen(torch.zeros(n, dtype=torch.uint8, device=device)))
        if not config.double_quant:
            self.register_parameter("weight_absmax2", None)
            self.register_parameter("weight_offset", None)
        if bias:
            self.bias = _frozen(torch.zeros(out_features, dtype=config.compute_dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self._offset_cache: tuple[nn.Parameter, int, float] | None = None
        self.register_load_state_dict_post_hook(_refresh_offset_after_load)
        build_lora(self, in_features, out_features, config.r, config.alpha, config.dropout, device)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, bias: torch.Tensor | None, config: QLoRAConfig) -> "QLoRALinear":
        if len(qt.shape) != 2:
            raise QLoRADSError(f"QLoRALinear needs a 2-D quantized weight, got shape {tuple(qt.shape)}")
        layer = cls(qt.shape[1], qt.shape[0], bias is not None, config, device=qt.device)
        layer.set_quantized_weight(qt, bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QLoRAConfig) -> "QLoRALinear":
        qt = quantize(linear.weight.detach(), config.quant_type, config.blocksize, config.double_quant,
                      config.nested_blocksize)
        return cls.from_quantized(qt, None if linear.bias is None else linear.bias.detach(), config)

    def set_quantized_weight(self, qt: QuantizedTensor, bias: torch.Tensor | None) -> None:
        """Fill the frozen parameters (streaming loader entry point). On a meta-device skeleton the
        parameters are replaced; otherwise they are copied into in place (e.g. inside ZeRO-3's
        ``GatheredParameters``)."""
        want = (self.quant_type, self.blocksize, self.double_quant,
                self.nested_blocksize if self.double_quant else qt.nested_blocksize)
        got = (qt.quant_type, qt.blocksize, qt.double_quant, qt.nested_blocksize)
        if tuple(qt.shape) != tuple(self.weight_shape):
            raise QLoRADSError(f"quantized weight has shape {tuple(qt.shape)} but the layer expects "
                               f"{tuple(self.weight_shape)} (out_features, in_features)")
        if want != got:
            raise QLoRADSError(f"quantized weight has (quant_type, blocksize, double_quant, nested_blocksize)={got} "
                               f"but the layer's config says {want}; quantize with the layer's QLoRAConfig")
        if (bias is None) != (self.bias is None):
            raise QLoRADSError(f"layer was built with bias={self.bias is not None} but bias "
                               f"{'is missing' if bias is None else 'was given'}")
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise QLoRADSError(f"bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")
        new = {_weight_part(part): t for part, t in stored_parts(qt).items()}
        if bias is not None:
            new["bias"] = bias.detach().to(self.compute_dtype).view(-1)
        with torch.no_grad():
            for name, value in new.items():
                param = getattr(self, name)
                if param.is_meta or param.numel() != value.numel():
                    if not param.is_meta:
                        raise QLoRADSError(f"{name}: {value.numel()} elements do not fit the layer's {param.numel()}")
                    setattr(self, name, _frozen(value.clone()))
                else:
                    param.copy_(value.to(param.device))
        self.weight_dtype = qt.dtype
        self._offset_cache = None
        if qt.double_quant:
            self._offset_cache = (self.weight_offset, self.weight_offset._version, float(qt.offset))

    def offset(self) -> float | None:
        """The double-quant offset as a python float (cached, see the module doc); None without DQ."""
        if not self.double_quant:
            return None
        param, cache = self.weight_offset, self._offset_cache
        if cache is None or cache[0] is not param or cache[1] != param._version:
            return self.refresh_offset()
        return cache[2]

    def refresh_offset(self) -> float | None:
        """Re-read the offset from the ``weight_offset`` bytes (one device sync) and cache it."""
        self._offset_cache = None
        if not self.double_quant or self.weight_offset.is_meta or self.weight_offset.numel() != 4:
            return None     # not filled yet (meta skeleton) or a ZeRO-3 partition outside a gather
        value = self.weight_offset.detach().view(torch.float32).item()
        self._offset_cache = (self.weight_offset, self.weight_offset._version, value)
        return value

    def quantized_weight(self) -> QuantizedTensor:
        """The frozen base as a QuantizedTensor (views of the parameters' bytes, no copies)."""
        dq = self.double_quant
        return QuantizedTensor(
            packed=self.weight, absmax=self.weight_absmax if dq else self.weight_absmax.view(torch.float32),
            shape=self.weight_shape, dtype=self.weight_dtype, blocksize=self.blocksize, quant_type=self.quant_type,
            absmax2=self.weight_absmax2.view(torch.float32) if dq else None,
            offset=self.offset() if dq else None,
            nested_blocksize=self.nested_blocksize)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_nf4_parts(self.weight, self.weight_absmax, self.weight_absmax2, self.offset(),
                                    self._meta(), dtype)

    def _meta(self):
        return (tuple(self.weight_shape), self.quant_type, self.blocksize, self.nested_blocksize)

    def reset_lora_parameters(self) -> None:
        reset_lora(self)

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.compute_dtype
        mid = guards.watch_id(self)                    # fp16 compute: the overflow watch (guards.py), else None
        xc = guards.watch_input(x, mid).to(cd)
        guard = guards.layer_guard(self)
        bias = None if self.bias is None else self.bias.to(cd)     # model.to(dtype) casts the bias, not the base
        y = NF4LinearFunction.apply(xc, self.weight, self.weight_absmax, self.weight_absmax2, self.offset(),
                                    bias, self._meta(), guard)
        y = with_adapter(self, y, self.lora_dropout(xc) if not self.disable_adapter else None, x, guard)
        return guards.watch_output(y, mid)

    def delta_weight(self) -> torch.Tensor:
        """scaling · B·A in fp32 [out, in]."""
        return self.scaling * (self.lora_B.weight.detach().float() @ self.lora_A.weight.detach().float())

    @torch.no_grad()
    def merged_weight_fp32(self) -> torch.Tensor:
        w = self.dequantized_weight(torch.float32) + self.delta_weight()
        if not bool(torch.isfinite(w).all()):
            raise QLoRADSError("merging produced NaN/Inf weights (a diverged adapter?); the layer is left unmerged")
        return w

    @torch.no_grad()
    def merge(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A plain frozen ``nn.Linear`` (a ``Conv1D`` if the layer replaced one, GPT-2) with weight
        deq(W) + (α/r)·B·A in ``dtype`` (default: the compute dtype), rounded once from fp32 (safe merge)."""
        return dense_module(self.merged_weight_fp32(), self.bias, dtype or self.compute_dtype,
                            bool(getattr(self, "conv1d", False)))

    @torch.no_grad()
    def merge_and_requantize(self) -> tuple["QLoRALinear", dict[str, float]]:
        """Merge, then quantize again with this layer's config: a new QLoRALinear (fresh adapter) and a
        report of the extra error of re-quantization relative to the exact merged weight."""
        w = self.merged_weight_fp32()
        new = QLoRALinear.from_linear(_as_linear(w, self.bias), self.config)
        err = (new.dequantized_weight(torch.float32) - w).abs()
        before = (self.dequantized_weight(torch.float32) - w)  # = -delta, for scale
        report = {"max_abs_error": err.max().item(), "mean_abs_error": err.mean().item(),
                  "rel_fro_error": (err.norm() / w.norm().clamp(min=1e-30)).item(),
                  "delta_fro_norm": before.norm().item()}
        return new, report

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"r={self.r}, scaling={self.scaling:g}, compute_dtype={self.compute_dtype}")


def _refresh_offset_after_load(module: "QLoRALinear", incompatible_keys) -> None:
    module.refresh_offset()


def _as_linear(w: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(w, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().float(), requires_grad=False)
    return lin
