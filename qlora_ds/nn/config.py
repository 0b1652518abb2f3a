"""Layer configs: one frozen dataclass per layer kind, validated on construction.

``target_modules``: ``None`` means every ``nn.Linear`` except the LM head; a tuple/list of exact
leaf or full module names; or a string, taken as a regex matched with ``re.fullmatch`` against the
full module path (never substring matching). ``matches(path)`` answers for one module path.

``compute_dtype``: a torch dtype, its name ("bf16", "fp16", "fp32"), or "auto" (the default) — kept as "auto" in
the config and chosen for the device when a layer is built (``config.resolved(device)``, ``qlora_ds.hardware``):
bf16 on GPUs of compute capability >= 8.0 and CPUs with AVX512-BF16/AMX, fp16 on older GPUs, fp32 on other CPUs
(torch emulates bf16 matmuls there, 15-30x slower). ``from_pretrained`` resolves it once for the whole model.
"""
from __future__ import annotations

import dataclasses
import re

import torch

from ..errors import QLoRADSError
from ..hardware import DTYPE_CHOICES, DTYPE_NAMES, resolve_device, resolve_dtype
from ..codebooks import QUANT_TYPES
from ..quant.intn import check_bits, check_group_size
from ..quant.nf4 import check_blocksize

COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
AUTO = "auto"      # compute_dtype chosen for the device at layer construction (``resolved``)
LM_HEAD_NAMES = ("lm_head", "embed_out", "output")
POOLS = ("mean", "sum")


def _check_lora(cfg) -> None:
    if not isinstance(cfg.r, int) or isinstance(cfg.r, bool) or cfg.r <= 0:
        raise QLoRADSError(f"r={cfg.r!r}: the LoRA rank must be a positive integer (QLoRA uses r=64)")
    if not isinstance(cfg.alpha, (int, float)) or isinstance(cfg.alpha, bool) or cfg.alpha <= 0:
        raise QLoRADSError(f"alpha={cfg.alpha!r}: lora alpha must be a positive number (QLoRA uses 16)")
    if not isinstance(cfg.dropout, (int, float)) or not 0.0 <= cfg.dropout < 1.0:
        raise QLoRADSError(f"dropout={cfg.dropout!r}: must be in [0, 1) (QLoRA uses 0.1 up to 13B, 0.05 above)")
    cd = cfg.compute_dtype
    if isinstance(cd, str) and cd.lower() in DTYPE_CHOICES:
        cd = cd.lower()
        object.__setattr__(cfg, "compute_dtype", AUTO if cd == AUTO else DTYPE_NAMES[cd])
    elif cd not in COMPUTE_DTYPES:
        raise QLoRADSError(f"compute_dtype={cd!r} is not supported; use \"auto\" (chosen for the device), "
                           f"torch.bfloat16, torch.float16 or torch.float32 (or \"bf16\"/\"fp16\"/\"fp32\")")
    tm = cfg.target_modules
    if isinstance(tm, list):
        object.__setattr__(cfg, "target_modules", tuple(tm))   # keep the frozen config hashable
        tm = cfg.target_modules
    if tm is None:
        return
    if isinstance(tm, str):
        try:
            re.compile(tm)
        except re.error as err:
            raise QLoRADSError(f"target_modules={tm!r} is not a valid regex ({err}); pass a list of exact "
                               f"module names or a valid regex") from None
    elif not (isinstance(tm, tuple) and tm and all(isinstance(n, str) and n for n in tm)):
        raise QLoRADSError(f"target_modules={tm!r}: use None (all linear layers but the LM head), a list of "
                           f"exact module names, or a regex string")


class _LoRAFields:
    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def resolved(self, device=None):
        """This config with ``compute_dtype="auto"`` replaced by the dtype ``device`` computes best (see
        ``qlora_ds.hardware``); the config itself if it names a dtype. ``device`` None or "meta" (a skeleton
        built before it is placed) means the device training will use: this rank's GPU, else the CPU."""
        if self.compute_dtype != AUTO:
            return self
        device = None if device is None else torch.device(device)
        if device is None or device.type == "meta":
            device = resolve_device("auto")
        return dataclasses.replace(self, compute_dtype=resolve_dtype(AUTO, device))

    def matches(self, path: str) -> bool:
        """Whether the linear module at ``path`` (e.g. 'model.layers.0.mlp.up_proj') is targeted: PEFT's rule, a
        regex matching the whole path, or a name that is the path or a dotted suffix of it ('up_proj',
        'mlp.up_proj')."""
        leaf = path.rsplit(".", 1)[-1]
        tm = self.target_modules
        if tm is None:
            return leaf not in LM_HEAD_NAMES
        if isinstance(tm, str):
            return re.fullmatch(tm, path) is not None
        return any(path == t or path.endswith("." + t) for t in tm)


@dataclasses.dataclass(frozen=True)
class QLoRAConfig(_LoRAFields):
    """QLoRA: NF4/FP4 blockwise base (double quant on by default) + LoRA (Guanaco defaults, §4)."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    nested_blocksize: int = 256
    r: int = 64
    alpha: float = 16
    dropout: float = 0.1
    target_modules: tuple[str, ...] | str | None = None
    compute_dtype: torch.dtype | str = AUTO
    # MoE experts fused as 3-D parameters (transformers 5) stored in the same 4-bit format, frozen, without LoRA
    # (qlora_ds.nn.quantized_experts); False leaves them in 16 bit, as transformers + bitsandbytes does
    quantize_experts: bool = True
    # LoRA on those 4-bit experts too, as PEFT's ``target_parameters`` adapts them: per weight a lora_A (r·E, in) and
    # lora_B (out, r·E), the update folded into the dequantized weights (so no dropout: PEFT refuses it there too)
    lora_experts: bool = False

    def __post_init__(self):
        for flag in ("quantize_experts", "lora_experts"):
            if not isinstance(getattr(self, flag), bool):
                raise QLoRADSError(f"{flag}={getattr(self, flag)!r} must be True or False")
        if self.lora_experts and not self.quantize_experts:
            raise QLoRADSError("lora_experts=True adapts the 4-bit MoE experts, but quantize_experts=False keeps them "
                               "in 16 bit; set quantize_experts=True, or lora_experts=False")
        if self.lora_experts and self.dropout:
            raise QLoRADSError(f"lora_experts=True with dropout={self.dropout}: the experts' LoRA update is folded "
                               f"into their weights, where dropout on the input cannot act (PEFT's target_parameters "
                               f"refuses it too); set dropout=0, or lora_experts=False")
        if self.quant_type not in QUANT_TYPES:
            raise QLoRADSError(f"quant_type={self.quant_type!r} is unknown; use 'nf4' (QLoRA) or 'fp4'")
        check_blocksize(self.blocksize)
        if not isinstance(self.double_quant, bool):
            raise QLoRADSError(f"double_quant={self.double_quant!r} must be True or False")
        if self.double_quant:
            check_blocksize(self.nested_blocksize, "nested_blocksize")
        _check_lora(self)


@dataclasses.dataclass(frozen=True)
class QALoRAConfig(_LoRAFields):
    """QA-LoRA: group-wise INT-N base + LoRA whose A reads the input pooled over each group (§3).

    ``pool``: "sum" (default) — A sees the group sum, i.e. the mean times ``group_size`` (the paper's
    Algorithm 1); "mean" — A sees the group mean (the official repository's AvgPool1d). With Adam the two
    differ at equal lr by roughly the group size in effective adapter learning rate: at the recipe's lr
    (2e-4) the mean barely moves the adapter. Default "sum" from bench/RESULTS.md "quality — CPU, issue 18".
    Adapter files are the same function either way (PEFT layout) and load into either pool; files
    without a recorded pool load as "mean" (what they were trained with).
    """

    bits: int = 4
    group_size: int = 32
    pool: str = "sum"
    r: int = 64
    alpha: float = 16
    dropout: float = 0.1
    target_modules: tuple[str, ...] | str | None = None
    compute_dtype: torch.dtype | str = AUTO

    def __post_init__(self):
        check_bits(self.bits)
        check_group_size(self.group_size)
        if self.pool not in POOLS:
            raise QLoRADSError(f"pool={self.pool!r} is unknown; use 'mean' (the official repository's AvgPool1d) "
                               f"or 'sum' (the paper's Algorithm 1: the mean times the group size)")
        _check_lora(self)
