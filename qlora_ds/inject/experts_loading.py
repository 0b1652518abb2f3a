"""Streaming load of transformers-5 MoE experts (modules owning fused 3-D weights such as ``gate_up_proj``).

A checkpoint holds such a weight in one of three ways, checked from the headers before any data is read:

* fused, under the parameter's own key (GPT-OSS bf16, Llama-4, anything saved fused): read as it is;
* per expert (the hub's and transformers' own ``save_pretrained`` format: ``mlp.experts.3.gate_proj.weight``…):
  fused as transformers' ``WeightConverter`` for the model type does (``get_model_conversion_mapping``), with the
  two operations it uses for experts, verified against transformers 5: ``MergeModulelist(d)`` = ``torch.stack``
  of one source pattern's tensors (experts in ``dot_natural_key`` order) along ``d``, then ``Concatenate(d)`` =
  ``torch.cat`` of the stacked patterns, in the converter's pattern order, along ``d``. Each expert's tensor is
  copied into its slot of one preallocated tensor (so host memory holds one fused weight and one expert's tensor,
  not a stack plus a concatenation); the copy casts it to the target dtype, as transformers casts each tensor
  before its ops;
* in ``save_quantized``'s format, for ``QuantizedExperts`` (``qlora_ds.nn.quantized_experts``): the uint8 parts
  ``{name}_packed``, ``{name}_absmax`` (and ``{name}_absmax2``, ``{name}_offset``), taken byte for byte.

The same path reads a non-expert weight that transformers concatenates from one tensor per source pattern
(a ``Concatenate`` converter alone: the q/k/v short convolutions of Kimi-Linear and OLMo-hybrid).

Quantized experts (``QLoRAConfig.quantize_experts``) are filled here; 16-bit ones built from per-expert tensors are
read through ``Converted.read`` by the loader's plain parameter path.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from ..errors import QLoRADSError
from ..nn import experts_lora
from ..nn.quantized_experts import PARTS, is_quantized_experts
from ..quant.nf4 import QuantizedTensor, quantize

_FLOATS = {"F64", "F32", "F16", "BF16"}


@dataclasses.dataclass(frozen=True)
class Converted:
    """A fused expert weight built from per-expert checkpoint tensors: ``keys[i]`` are the tensors of the
    converter's i-th source pattern in expert order, stacked along ``stack_dim``; the stacks are concatenated along
    ``cat_dim`` (None: one pattern, no concatenation). ``stack_dim`` None: no stacking, one tensor per pattern,
    concatenated (a converter of ``Concatenate`` alone, e.g. Kimi-Linear's q/k/v short convolutions)."""
    target: str
    keys: tuple[tuple[str, ...], ...]
    stack_dim: int | None
    cat_dim: int | None
    widths: tuple[int, ...]          # each stack's size along cat_dim
    shape: tuple[int, ...]

    def read(self, ckpt, dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=dtype)
        offset = 0
        for keys, width in zip(self.keys, self.widths):
            slot = out if self.cat_dim is None else out.narrow(self.cat_dim, offset, width)
            offset += width
            for e, key in enumerate(keys):
                (slot if self.stack_dim is None else slot.select(self.stack_dim, e)).copy_(ckpt.get(key))
        return out


def _model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__)


FIX = ("load the model with transformers' AutoModelForCausalLM.from_pretrained (which builds the fused experts) and "
       "call qlora_ds.inject.inject(model, config)")


class ExpertSources:
    """Where each fused expert weight of ``model`` comes from in ``ckpt`` (whose keys are already renamed to the
    model's names): ``source(name, shape)`` gives the fused key or a ``Converted``, or raises."""

    def __init__(self, model: nn.Module, ckpt):
        self.model, self.ckpt = model, ckpt
        self._groups: dict[str, tuple[object, dict[str, list[str]]]] | None = None

    def groups(self) -> dict:
        """target name -> (converter, {source pattern: [checkpoint keys]}), as transformers collects them: every key
        (after the renamings) goes to the first converter one of whose source patterns it matches."""
        if self._groups is None:
            self._groups = {}
            try:
                from transformers.conversion_mapping import get_model_conversion_mapping
                from transformers.core_model_loading import WeightConverter
                converters = [t for t in get_model_conversion_mapping(self.model) if isinstance(t, WeightConverter)]
            except Exception:                       # a transformers without conversion mappings: no per-expert keys
                converters = []
            for key in self.ckpt.keys():
                for conv in converters:
                    target, pattern = conv.rename_source_key(key)
                    if pattern is not None:
                        self._groups.setdefault(target, (conv, {}))[1].setdefault(pattern, []).append(key)
                        break
        return self._groups

    def source(self, name: str, shape: tuple[int, ...]) -> str | Converted:
        ckpt = self.ckpt
        if name in ckpt:
            if ckpt.shape[name] != tuple(shape):
                raise QLoRADSError(f"{name}: checkpoint shape {ckpt.shape[name]} but the model built from config.json "
                                   f"expects {tuple(shape)}; the config and the weights do not belong together")
            if ckpt.dtype_name(name) not in _FLOATS:
                raise QLoRADSError(f"{name} is stored as {ckpt.dtype_name(name)}, not as 16/32-bit weights (another "
                                   f"format's quantized experts, e.g. MXFP4), which qlora-ds does not read; pass the "
                                   f"16/32-bit checkpoint")
            return name
        hit = self.groups().get(name)
        if hit is None:
            raise QLoRADSError(f"checkpoint {ckpt.path!r} has no tensor for the fused MoE expert parameter {name!r}: "
                               f"neither under that name nor as per-expert tensors that transformers' conversion "
                               f"mapping for model_type={_model_type(self.model)!r} fuses into it; the checkpoint is "
                               f"incomplete or from another model — re-save it with save_pretrained, or {FIX}")
        return self._converted(name, tuple(shape), *hit)

    def _converted(self, name: str, shape: tuple, conv, found: dict[str, list[str]]) -> Converted:
        from transformers.core_model_loading import Concatenate, MergeModulelist, dot_natural_key
        ops = list(conv.operations)
        kinds = [type(op) for op in ops]
        patterns = list(conv.source_patterns)
        plain = kinds == [Concatenate] and len(patterns) > 1 and all(len(found.get(p, ())) == 1 for p in patterns)
        if not (kinds == [MergeModulelist] and len(patterns) == 1
                or kinds == [MergeModulelist, Concatenate] and len(patterns) > 1 or plain):
            raise QLoRADSError(f"{name}: transformers builds this model_type={_model_type(self.model)!r} weight "
                               f"from several checkpoint tensors with {ops}, which qlora-ds' streaming loader does not "
                               f"reproduce (it reads MergeModulelist, then Concatenate, or Concatenate alone); {FIX}")
        absent = [p for p in patterns if p not in found]
        if absent:
            raise QLoRADSError(f"{name}: checkpoint {self.ckpt.path!r} has per-expert tensors for {sorted(found)} but "
                               f"none for {absent}; it is incomplete — re-save it with save_pretrained")
        keys = tuple(tuple(sorted(found[p], key=dot_natural_key)) for p in patterns)
        ndim = len(self.ckpt.shape[keys[0][0]]) + (0 if plain else 1)   # of a stack; negative dims wrap around it
        stack_dim = None if plain else ops[0].dim % ndim
        cat_dim = ops[-1].dim % ndim if len(ops) > 1 or plain else None
        stacked = []
        for p, ks in zip(patterns, keys):
            shapes = {self.ckpt.shape[k] for k in ks}
            stored = {self.ckpt.dtype_name(k) for k in ks}
            if not stored <= _FLOATS:
                raise QLoRADSError(f"{name}: the per-expert tensors {p!r} are stored as {sorted(stored)}, quantized "
                                   f"per expert (e.g. by bitsandbytes under transformers 4), which qlora-ds does not "
                                   f"read; pass the original 16/32-bit checkpoint")
            if len(shapes) != 1:
                raise QLoRADSError(f"{name}: the per-expert tensors {p!r} have shapes {sorted(shapes)}, not one; the "
                                   f"checkpoint is corrupt — re-save it with save_pretrained")
            one = shapes.pop()
            stacked.append(one if plain else one[:stack_dim] + (len(ks),) + one[stack_dim:])
        if cat_dim is None:
            built = stacked[0]
        else:
            rest = {s[:cat_dim] + s[cat_dim + 1:] for s in stacked}
            built = (stacked[0][:cat_dim] + (sum(s[cat_dim] for s in stacked),) + stacked[0][cat_dim + 1:]
                     if len(rest) == 1 and all(len(s) == ndim for s in stacked) else None)
        if built != shape:
            raise QLoRADSError(f"{name}: the checkpoint's per-expert tensors ({len(keys[0])} experts, first "
                               f"{keys[0][0]!r} of shape {self.ckpt.shape[keys[0][0]]}) fuse to "
                               f"{built or [tuple(s) for s in stacked]} but the model built from config.json expects "
                               f"{shape}; the config and the weights do not belong together")
        widths = tuple(s[cat_dim] for s in stacked) if cat_dim is not None else (shape[0],)
        return Converted(name, keys, stack_dim, cat_dim, widths, shape)


# ---------------------------------------------------------------------------- quantized experts
def quantized_experts(model: nn.Module) -> dict[str, nn.Module]:
    return {p: m for p, m in model.named_modules() if p and is_quantized_experts(m)}


def parts(module: nn.Module, name: str | None = None) -> list[str]:
    """The uint8 parameters (their names in ``module``) holding weight ``name`` (None: every weight's)."""
    names = module._qds_weights if name is None else [name]
    return [f"{n}_{part}" for n in names for part in PARTS if f"{n}_{part}" in module._parameters]


def filled_leaves(module: nn.Module) -> list[str]:
    """Every parameter ``fill_quantized_experts`` fills: the uint8 parts and the experts' LoRA tensors (the
    checkpoint has none of them under these names)."""
    return parts(module) + experts_lora.lora_names(module)


def plan_quantized_experts(model: nn.Module, sources: ExpertSources, own: dict | None) -> dict[str, dict]:
    """{experts path: {weight name: fused key | Converted | "own"}} for every ``QuantizedExperts`` module; checked
    from the headers (a ``save_quantized`` directory must hold the parts with the skeleton's sizes)."""
    modules = quantized_experts(model)
    ckpt = sources.ckpt
    if own is not None:
        saved = sorted(own.get("experts", []))
        if saved != sorted(modules):
            if not saved or not modules:
                was, now = ("in 16 bit", "True") if not saved else ("quantized", "False")
                raise QLoRADSError(f"quantized checkpoint {ckpt.path!r} holds the MoE experts {was} (saved with "
                                   f"QLoRAConfig(quantize_experts={'False' if not saved else 'True'})) but this config "
                                   f"has quantize_experts={now}; pass QLoRAConfig(quantize_experts="
                                   f"{'False' if not saved else 'True'}), or quantize the original 16-bit checkpoint")
            raise QLoRADSError(f"quantized checkpoint {ckpt.path!r} was saved with quantized MoE experts "
                               f"{saved[:3]}… but this model's are {sorted(modules)[:3]}…; the config and the weights "
                               f"do not match")
    plan = {}
    for path, module in modules.items():
        plan[path] = {}
        for name, (shape, _) in module._qds_weights.items():
            if own is None:
                plan[path][name] = sources.source(f"{path}.{name}", shape)
                continue
            for leaf in parts(module, name):
                full = f"{path}.{leaf}"
                if full not in ckpt:
                    raise QLoRADSError(f"quantized checkpoint lacks {full!r}; it was saved by another qlora-ds version "
                                       f"or from another model — re-save it with qlora_ds.save_quantized")
                want = tuple(model.get_parameter(full).shape)
                if ckpt.shape[full] != want or ckpt.dtype_name(full) != "U8":
                    raise QLoRADSError(f"{full}: checkpoint has {ckpt.dtype_name(full)} {ckpt.shape[full]}, the "
                                       f"quantized experts expect U8 {want}; the config (quant_type, blocksize, "
                                       f"double_quant) and the weights do not belong together")
            plan[path][name] = "own"
    return plan


def fill_quantized_experts(module: nn.Module, path: str, plan: dict, ckpt, dtype: torch.dtype, read: bool,
                           device: torch.device) -> list[nn.Parameter]:
    """Fill ``module``'s uint8 parts (``dtype``: what the float weights are rounded to before quantization, the
    loader's quantize_from); returns them, on ``device``. Without ``read`` (ZeRO-3, rank > 0) they are allocated
    empty: the bytes come by broadcast."""
    quant_type, blocksize, dq, nested = module._qds_quant
    for name, src in plan.items():
        shape, _ = module._qds_weights[name]
        if not read:
            for leaf in parts(module, name):
                p = module._parameters[leaf]
                module._parameters[leaf] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=False)
            module._qds_weights[name] = (shape, dtype)
            continue
        if src == "own":
            get = lambda part: ckpt.get(f"{path}.{name}_{part}")           # noqa: E731
            absmax = get("absmax")
            qt = QuantizedTensor(packed=get("packed"), absmax=absmax if dq else absmax.view(torch.float32),
                                 shape=torch.Size(shape), dtype=dtype, blocksize=blocksize, quant_type=quant_type,
                                 absmax2=get("absmax2").view(torch.float32) if dq else None,
                                 offset=get("offset").view(torch.float32).item() if dq else None,
                                 nested_blocksize=nested)
        else:
            w = ckpt.get(src).to(dtype) if isinstance(src, str) else src.read(ckpt, dtype)
            try:
                qt = quantize(w, quant_type, blocksize, dq, nested)
            except QLoRADSError as err:   # e.g. a NaN: say which tensor (and for per-expert ones, where they start)
                first = src if isinstance(src, str) else src.keys[0][0]
                raise QLoRADSError(f"{ckpt.stored[first]} in {ckpt.file_of[first]} ({ckpt.path}), fused into "
                                   f"{path}.{name}: {err}") from None
            del w
        module.set_quantized(name, qt)
    filled = []
    for leaf in parts(module):
        p = module._parameters[leaf]
        if p.device != device:
            p = module._parameters[leaf] = nn.Parameter(p.data.to(device), requires_grad=False)
        filled.append(p)
    if experts_lora.has_lora(module):      # initialised on the CPU: the same LoRA weights wherever the model goes
        names = experts_lora.lora_names(module)
        for leaf in names:
            module._parameters[leaf] = nn.Parameter(torch.empty(module._parameters[leaf].shape))
        experts_lora.reset_lora(module)
        for leaf in names:
            p = module._parameters[leaf] = nn.Parameter(module._parameters[leaf].data.to(device))
            filled.append(p)
    return filled
