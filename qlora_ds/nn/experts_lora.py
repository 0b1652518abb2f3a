"""LoRA on 4-bit fused MoE experts (``QLoRAConfig.lora_experts``), in PEFT's ``target_parameters`` layout, so that
the adapter file loads in PEFT (``LoraConfig(target_parameters=[...])``) and computes the same logits.

Per expert weight ``name`` of shape (E, d1, d2) the experts module holds two trainable fp32 parameters of its own
(ZeRO-3 gathers a module's own parameters when it runs, so they arrive with the 4-bit parts):

* ``{name}_lora_A`` (r·E, in): expert e's A is rows e·r … e·r + r − 1;
* ``{name}_lora_B`` (out, r·E): expert e's B is columns e, E + e, 2E + e, … (PEFT's expert-minor order).

(in, out) is PEFT's reading of the shape: (d2, d1), i.e. the weight is (E, out, in), unless the module says
``is_transposed`` (GPT-OSS: (E, in, out)). Each forward adds ``scaling · B_e A_e`` to the dequantized weight of
every expert it computes (one ``baddbmm``), as PEFT's ParamWrapper parametrization does, so any experts
implementation runs unchanged and the LoRA gradient comes from the weight's. Dropout cannot act on a folded
update: the config refuses it (PEFT too).

In an adapter file PEFT nests one wrapper per targeted parameter, the first registered innermost: with
``gate_up_proj`` then ``down_proj`` its keys are ``experts.base_layer.lora_A.weight`` (gate_up_proj) and
``experts.lora_A.weight`` (down_proj). ``ExpertsLoRAView`` presents each weight's adapter under that path with the
attributes the adapter code reads from a LoRA layer.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn as nn

SUFFIXES = ("_lora_A", "_lora_B")


def lora_dims(module: nn.Module, shape: tuple[int, int, int]) -> tuple[int, int]:
    """(in_features, out_features) of one expert's matrix, as PEFT reads a 3-D parameter."""
    _, d1, d2 = shape
    return (d1, d2) if getattr(module, "is_transposed", False) else (d2, d1)


def add_lora(module: nn.Module, r: int, alpha: float) -> None:
    """Give every 4-bit weight of ``module`` (a QuantizedExperts) a LoRA of rank ``r``: A Kaiming-uniform, B zero
    (PEFT's init); on a meta skeleton the parameters stay meta (``reset_lora`` fills them)."""
    lora = module.__dict__.setdefault("_qds_lora", {})
    for name, (shape, _) in module._qds_weights.items():
        experts = shape[0]
        in_f, out_f = lora_dims(module, shape)
        meta = module._parameters[f"{name}_packed"].is_meta
        device = "meta" if meta else module._parameters[f"{name}_packed"].device
        module._parameters[f"{name}_lora_A"] = nn.Parameter(torch.empty(r * experts, in_f, device=device))
        module._parameters[f"{name}_lora_B"] = nn.Parameter(torch.empty(out_f, r * experts, device=device))
        lora[name] = {"r": r, "alpha": alpha, "scaling": alpha / r}
    if not any(p.is_meta for p in lora_parameters(module)):
        reset_lora(module)


@torch.no_grad()
def reset_lora(module: nn.Module) -> None:
    for name in module.__dict__.get("_qds_lora", {}):
        nn.init.kaiming_uniform_(module._parameters[f"{name}_lora_A"], a=math.sqrt(5))
        nn.init.zeros_(module._parameters[f"{name}_lora_B"])


def has_lora(module: nn.Module) -> bool:
    return bool(module.__dict__.get("_qds_lora"))


def lora_names(module: nn.Module) -> list[str]:
    """The experts module's own parameter names of its LoRA tensors (``{weight}_lora_A``, ``{weight}_lora_B``)."""
    return [f"{n}{s}" for n in module.__dict__.get("_qds_lora", {}) for s in SUFFIXES]


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [module._parameters[leaf] for leaf in lora_names(module)]


def take(t: torch.Tensor, hit: torch.Tensor | slice) -> torch.Tensor:
    """Experts ``hit`` of a per-expert tensor: a slice (a run of experts) is a view, an index tensor a copy."""
    return t[hit] if isinstance(hit, slice) else t.index_select(0, hit)


def factors(module: nn.Module, name: str, dtype: torch.dtype, hit: torch.Tensor | slice | None = None):
    """(B (E, out, r), A (E, r, in)) of weight ``name`` in ``dtype`` (only experts ``hit`` when given)."""
    a, b = module._parameters[f"{name}_lora_A"], module._parameters[f"{name}_lora_B"]
    experts = module._qds_weights[name][0][0]
    a = a.view(experts, -1, a.shape[-1])                               # (E, r, in)
    b = b.view(b.shape[0], -1, experts).permute(2, 0, 1)               # (E, out, r)
    if hit is not None:
        a, b = take(a, hit), take(b, hit)
    return b.to(dtype), a.to(dtype)


def with_lora(module: nn.Module, name: str, weight: torch.Tensor,
              hit: torch.Tensor | slice | None = None) -> torch.Tensor:
    """``weight`` (the dequantized experts ``hit``, or all) plus ``scaling · B_e A_e`` in its own layout."""
    lora = module.__dict__.get("_qds_lora", {}).get(name)
    if lora is None:
        return weight
    b, a = factors(module, name, weight.dtype, hit)
    if getattr(module, "is_transposed", False):                        # (E, in, out) += Aᵀ Bᵀ
        return torch.baddbmm(weight, a.transpose(1, 2), b.transpose(1, 2), alpha=lora["scaling"])
    return torch.baddbmm(weight, b, a, alpha=lora["scaling"])


def adapter_paths(path: str, module: nn.Module) -> dict[str, str]:
    """{weight name: the module path PEFT's nested wrappers give its adapter} for the experts module at ``path``."""
    names = list(module.__dict__.get("_qds_lora", {}))
    return {name: path + ".base_layer" * (len(names) - 1 - i) for i, name in enumerate(names)}


class ExpertsLoRAView:
    """One expert weight's adapter with the attributes of a LoRA layer that ``qlora_ds.adapters`` reads and
    writes (``lora_A.weight``, ``lora_B.weight``, r, lora_alpha, scaling, the quantization); it holds no tensors of
    its own. ``state_key(part)`` is the parameter's name in ``model.named_parameters()``."""

    kind = "qlora_experts"

    def __init__(self, module: nn.Module, name: str, module_path: str):
        self.module, self.name, self.module_path = module, name, module_path
        shape, self.weight_dtype = module._qds_weights[name]
        self.num_experts = shape[0]
        self.in_features, self.out_features = lora_dims(module, shape)
        self.quant_type, self.blocksize, self.double_quant, _ = module._qds_quant
        self.lora_dropout = SimpleNamespace(p=0.0)

    @property
    def lora_A(self):
        return SimpleNamespace(weight=self.module._parameters[f"{self.name}_lora_A"])

    @property
    def lora_B(self):
        return SimpleNamespace(weight=self.module._parameters[f"{self.name}_lora_B"])

    def state_key(self, part: str) -> str:
        return f"{self.module_path}.{self.name}_{part}"

    def _get(self, key):
        return self.module._qds_lora[self.name][key]

    def _set(self, key, value) -> None:
        self.module._qds_lora[self.name][key] = value

    r = property(lambda self: self._get("r"))
    lora_alpha = property(lambda self: self._get("alpha"), lambda self, v: self._set("alpha", v))
    scaling = property(lambda self: self._get("scaling"), lambda self, v: self._set("scaling", v))
