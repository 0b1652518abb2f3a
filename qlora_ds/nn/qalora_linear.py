"""QALoRALinear: a frozen group-wise INT-N base whose LoRA-A reads the group-averaged input (QA-LoRA).

``y = x·deq(W)ᵀ + b + (α/r)·B(A(pool(dropout(x))))`` where ``pool`` reduces each group of
``group_size`` (L) input features to one value, so ``lora_A`` is ``nn.Linear(in_features // L, r)``:
``config.pool = "mean"`` (the official repository's ``AvgPool1d(L)``) or ``"sum"`` (the paper's
Algorithm 1, AvgPool times L). Write ``pool(x)[g] = (c/L)·Σ_{k∈g} x_k`` with ``c = pool_factor`` (1 for
the mean, L for the sum).

The adapter then adds ``(α/r)·(B·A)[o, g]·c/L`` to every weight of group g in row o — exactly what
lowering that group's zero point by ``(α/r)·(B·A)[o, g]·c/(L·s[o, g])`` does to ``s·(q − z)``.
``merge()`` does that: integer codes unchanged, only (float) zeros move.

Parameter layout (uint8, requires_grad=False, ZeRO-3 safe): ``qweight`` [out·in·bits/8] packed codes
(see ``quant/intn.py``), ``scales`` and ``zeros`` fp32 [out, in/L] stored as bytes [4·out·in/L];
``bias`` frozen in the compute dtype. Metadata: ``weight_shape``, ``bits``, ``group_size``.

PEFT's own QA-LoRA variant (GPTQ layers only) multiplies the pooled mean by ``in/L``; the adapter
code converts ``lora_A`` by ``c/(in/L)`` on save (and back on load) so files stay interchangeable,
and records ``pool`` in its side file.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from ..errors import QLoRADSError
from ..quant import intn
from ..quant.intn import IntNQuantizedTensor
from .config import QALoRAConfig
from . import guards
from .functional import IntNLinearFunction, with_adapter
from .qlora_linear import _bytes, _frozen, build_lora, reset_lora


class QALoRALinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, config: QALoRAConfig, device=None,
                 adapter: bool = True):
        super().__init__()
        if not isinstance(config, QALoRAConfig):
            raise QLoRADSError(f"QALoRALinear needs a QALoRAConfig, got {type(config).__name__}")
        config = config.resolved(device)      # compute_dtype "auto" -> the dtype this device computes best
        if in_features <= 0 or out_features <= 0:
            raise QLoRADSError(f"in_features={in_features}, out_features={out_features} must be positive")
        intn.check_group_size(config.group_size, in_features)
        self.in_features, self.out_features, self.config = in_features, out_features, config
        self.compute_dtype, self.bits, self.group_size = config.compute_dtype, config.bits, config.group_size
        self.pool_mode = config.pool
        self.weight_shape = torch.Size((out_features, in_features))
        self.weight_dtype = config.compute_dtype
        groups = out_features * (in_features // config.group_size)
        u8 = dict(dtype=torch.uint8, device=device)
        self.qweight = _frozen(torch.zeros(out_features * in_features * config.bits // 8, **u8))
        self.scales = _frozen(torch.zeros(4 * groups, **u8))
        self.zeros = _frozen(torch.zeros(4 * groups, **u8))
        if bias:
            self.bias = _frozen(torch.zeros(out_features, dtype=config.compute_dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self.has_adapter = adapter
        if adapter:
            build_lora(self, in_features // config.group_size, out_features, config.r, config.alpha,
                       config.dropout, device)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_quantized(cls, qt: IntNQuantizedTensor, bias: torch.Tensor | None, config: QALoRAConfig,
                       adapter: bool = True) -> "QALoRALinear":
        layer = cls(qt.shape[1], qt.shape[0], bias is not None, config, device=qt.device, adapter=adapter)
        layer.set_quantized_weight(qt, bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QALoRAConfig) -> "QALoRALinear":
        qt = intn.quantize(linear.weight.detach(), config.bits, config.group_size)
        return cls.from_quantized(qt, None if linear.bias is None else linear.bias.detach(), config)

    def set_quantized_weight(self, qt: IntNQuantizedTensor, bias: torch.Tensor | None) -> None:
        if tuple(qt.shape) != tuple(self.weight_shape):
            raise QLoRADSError(f"quantized weight has shape {tuple(qt.shape)} but the layer expects "
                               f"{tuple(self.weight_shape)}")
        if (qt.bits, qt.group_size) != (self.bits, self.group_size):
            raise QLoRADSError(f"quantized weight has bits={qt.bits}, group_size={qt.group_size} but the layer's "
                               f"config says bits={self.bits}, group_size={self.group_size}")
        if (bias is None) != (self.bias is None):
            raise QLoRADSError(f"layer was built with bias={self.bias is not None} but bias "
                               f"{'is missing' if bias is None else 'was given'}")
        new = {"qweight": qt.qweight.reshape(-1), "scales": _bytes(qt.scales), "zeros": _bytes(qt.zeros)}
        if bias is not None:
            new["bias"] = bias.detach().to(self.compute_dtype).view(-1)
        with torch.no_grad():
            for name, value in new.items():
                param = getattr(self, name)
                if param.is_meta:
                    setattr(self, name, _frozen(value.clone()))
                else:
                    param.copy_(value.to(param.device))
        self.weight_dtype = qt.dtype

    def quantized_weight(self) -> IntNQuantizedTensor:
        out_f, in_f = self.weight_shape
        g = in_f // self.group_size
        return IntNQuantizedTensor(qweight=self.qweight.view(out_f, -1),
                                   scales=self.scales.view(torch.float32).view(out_f, g),
                                   zeros=self.zeros.view(torch.float32).view(out_f, g), shape=self.weight_shape,
                                   bits=self.bits, group_size=self.group_size, dtype=self.weight_dtype)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.quantized_weight().dequantize(dtype)

    @property
    def pool_factor(self) -> int:
        """What the pooled value is times the group mean: 1 ("mean") or the group size ("sum")."""
        return self.group_size if self.pool_mode == "sum" else 1

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Mean or sum over each group of ``group_size`` input features: [..., in] -> [..., in / L]."""
        g = x.unflatten(-1, (self.in_features // self.group_size, self.group_size))
        return g.sum(-1) if self.pool_mode == "sum" else g.mean(-1)

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.compute_dtype
        mid = guards.watch_id(self)                    # fp16 compute: the overflow watch (guards.py), else None
        xc = guards.watch_input(x, mid).to(cd)
        guard = guards.layer_guard(self)
        bias = None if self.bias is None else self.bias.to(cd)     # model.to(dtype) casts the bias, not the base
        y = IntNLinearFunction.apply(xc, self.qweight, self.scales, self.zeros, bias,
                                     (tuple(self.weight_shape), self.bits, self.group_size), guard)
        lora_in = self.pool(self.lora_dropout(xc)) if self.has_adapter and not self.disable_adapter else None
        return guards.watch_output(with_adapter(self, y, lora_in, x, guard), mid)

    def reset_lora_parameters(self) -> None:
        reset_lora(self)

    @torch.no_grad()
    def merge(self) -> "QALoRALinear":
        """An adapter-free QALoRALinear whose zero points absorb (α/r)·B·A exactly (codes unchanged)."""
        if not self.has_adapter:
            raise QLoRADSError("this QALoRALinear has no adapter to merge (it was merged already)")
        qt = self.quantized_weight()
        ba = self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())     # [out, in/L]
        if self.pool_mode == "sum":
            zeros = qt.zeros - ba / qt.scales                        # c/L = 1
        else:
            zeros = qt.zeros - ba / (self.group_size * qt.scales)
        if not bool(torch.isfinite(zeros).all()):
            raise QLoRADSError("merging produced NaN/Inf zero points (a diverged adapter?); the layer is left unmerged")
        merged = dataclasses.replace(qt, qweight=qt.qweight.clone(), scales=qt.scales.clone(), zeros=zeros.contiguous())
        bias = None if self.bias is None else self.bias.detach().clone()
        new = QALoRALinear.from_quantized(merged, bias, self.config, adapter=False)
        new.conv1d = bool(getattr(self, "conv1d", False))     # a GPT-2 Conv1D: exports write (in, out) weights
        return new

    def to_gptq_state_dict(self, scales_dtype: torch.dtype = torch.float16
                           ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """(qweight/qzeros/scales/g_idx [+ bias] in AutoGPTQ's layout, error report). Exact only with
        integer zeros in [1, 2^bits] and scales representable in ``scales_dtype``; a merged layer's float
        zeros are rounded — the report's errors say by how much (use our float-zero format for exactness)."""
        if self.has_adapter and bool(self.lora_B.weight.any()):
            raise QLoRADSError("the layer still has a trained adapter; call merge() first, then export")
        sd, report = intn.to_gptq(self.quantized_weight(), scales_dtype)
        if self.bias is not None:
            sd["bias"] = self.bias.detach().to(scales_dtype)
        return sd, report

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group_size={self.group_size}, pool={self.pool_mode}, adapter={self.has_adapter}, "
                f"compute_dtype={self.compute_dtype}")
