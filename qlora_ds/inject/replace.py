"""Swap the target linears of a Hugging Face model for QLoRALinear / QALoRALinear, in place.

Works on an instantiated model (weights are quantized now) and on a meta-device skeleton (the new
layers stay on meta; the streaming loader fills them). Nothing global is patched: the model's own
module tree is edited with ``setattr`` on the parent.
"""
from __future__ import annotations

import logging
import re

import torch
import torch.nn as nn

from ..errors import QLoRADSError
from ..nn.config import QALoRAConfig, QLoRAConfig
from ..nn.experts_lora import SUFFIXES
from .policies import GENERIC, NON_TEXT, Policy, policy_for

log = logging.getLogger(__name__)


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for plain torch models
        return ()
    return (Conv1D,)


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, *_conv1d_type()))


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a GPT-2 Conv1D (whose weight is (in, out))."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.nf


def float_weight(module: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The (out, in) weight of a linear-like module (Conv1D transposed), or of ``weight`` read for it."""
    w = module.weight if weight is None else weight
    return w.detach().t().contiguous() if not isinstance(module, nn.Linear) else w.detach()


def layer_class(config):
    if isinstance(config, QLoRAConfig):
        from ..nn.qlora_linear import QLoRALinear
        return QLoRALinear
    if isinstance(config, QALoRAConfig):
        try:
            from ..nn import QALoRALinear
        except ImportError:
            from ..nn.qalora_linear import QALoRALinear
        return QALoRALinear
    raise QLoRADSError(f"config must be a QLoRAConfig or QALoRAConfig, got {type(config).__name__}")


def quantize_for(config, weight: torch.Tensor):
    """Quantize one (out, in) float weight the way ``config`` asks."""
    if isinstance(config, QLoRAConfig):
        from ..quant.nf4 import quantize
        return quantize(weight, config.quant_type, config.blocksize, config.double_quant, config.nested_blocksize)
    from ..quant.intn import quantize
    return quantize(weight, config.bits, config.group_size)


def is_quantized_layer(module: nn.Module) -> bool:
    return hasattr(module, "set_quantized_weight") and hasattr(module, "lora_A")


def select(model: nn.Module, config, policy: Policy | None = None) -> list[str]:
    """Paths of the linear-like modules that would be wrapped (user's target_modules win over the policy)."""
    if policy is None:
        policy = policy_for(getattr(getattr(model, "config", None), "model_type", None))
    chosen = []
    for path, module in model.named_modules():
        if not path or not is_linear_like(module):
            continue
        wanted = (config.matches(path) if config.target_modules is not None
                  else policy.wants(path, linear_dims(module)[1]))
        if wanted:
            chosen.append(path)
    return chosen


def inject(model: nn.Module, config, policy: Policy | None = None) -> list[str]:
    """Replace the target linears of ``model`` in place; returns the wrapped module paths.

    On meta modules the replacements are meta too; on real modules each weight is quantized now
    (one at a time). Every non-LoRA parameter of the model ends up frozen.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if policy is None:
        policy = policy_for(model_type)
    cls = layer_class(config)
    total = sum(p.numel() for p in model.parameters())
    paths = select(model, config, policy)
    if not paths:
        raise QLoRADSError(f"no linear layer of this {model_type or type(model).__name__} model matches "
                           f"target_modules={config.target_modules!r} (policy {policy.name!r}); check the names "
                           f"with [n for n, m in model.named_modules()]")
    for path in paths:                              # before any layer is replaced: the model stays as it was
        _check_replaceable(path, model.get_submodule(path), config)
    for path in paths:
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        old = getattr(parent, leaf)
        in_f, out_f = linear_dims(old)
        meta = old.weight.is_meta
        new = cls(in_f, out_f, old.bias is not None, config, device="meta" if meta else old.weight.device)
        new.conv1d = not isinstance(old, nn.Linear)   # a GPT-2 Conv1D: merge/export write it back as one
        if not meta:
            bias = None if old.bias is None else old.bias.detach()
            new.set_quantized_weight(quantize_for(config, float_weight(old)), bias)
        setattr(parent, leaf, new)
    experts = quantize_experts(model, config)
    for name, param in model.named_parameters():
        if not is_lora_name(name):
            param.requires_grad_(False)
    if experts:
        log.info("qlora-ds: %d MoE experts modules stored in %s (frozen, %s): %s", len(experts),
                 config.quant_type.upper(), "with LoRA" if config.lora_experts else "no LoRA",
                 ", ".join(experts[:4]) + (" …" if len(experts) > 4 else ""))
    if policy is GENERIC and config.target_modules is None:
        log.info("qlora-ds: no policy for model_type=%r; generic policy wrapped %d linear layers: %s",
                 model_type, len(paths), ", ".join(paths))
    _warn_unquantized(model, total, config)
    return paths


def quantize_experts(model: nn.Module, config) -> list[str]:
    """Store the model's fused MoE expert weights in 4 bit (``qlora_ds.nn.quantized_experts``) when ``config`` is a
    QLoRAConfig with ``quantize_experts``; returns the experts modules' paths. A multimodal model's towers stay as
    they are (``NON_TEXT``), as for the linears."""
    if not isinstance(config, QLoRAConfig) or not config.quantize_experts:
        return []
    from ..nn.quantized_experts import DEQUANT_LIMIT, expert_weight_names, quantize_experts_module
    done = []
    for path, module in model.named_modules():
        if path and expert_weight_names(module) and NON_TEXT.isdisjoint(path.split(".")):
            quantize_experts_module(module, config)
            done.append(path)
    if done:        # a layer above the dequantization limit runs its experts in groups: say so once
        first = model.get_submodule(done[0])
        experts, group = first.__dict__.get("num_experts"), first._group_size(config.resolved().compute_dtype)
        if isinstance(experts, int) and group < experts:
            log.info("MoE experts: %d of a layer's %d dequantized at a time (QLORA_DS_EXPERTS_DEQUANT_MB=%g), "
                     "each group under its own checkpoint", group, experts, DEQUANT_LIMIT / 2**20)
    return done


def _check_replaceable(path: str, module: nn.Module, config) -> None:
    """Refuse a layer already quantized by bitsandbytes, and a QA-LoRA group size that does not divide the layer."""
    if type(module).__module__.startswith("bitsandbytes") or not module.weight.is_floating_point():
        raise QLoRADSError(f"{path} is already quantized ({type(module).__name__}, weight {module.weight.dtype}), e.g. "
                           f"by transformers' bitsandbytes loading; load the checkpoint directory with "
                           f"qlora_ds.from_pretrained(dir, QLoRAConfig(...)) instead, which uses a bitsandbytes 4-bit "
                           f"checkpoint's bytes as they are (for an 8-bit one, use the original 16-bit checkpoint)")
    if isinstance(config, QALoRAConfig):
        from ..quant.intn import check_group_size
        try:
            check_group_size(config.group_size, linear_dims(module)[0])
        except QLoRADSError as err:
            raise QLoRADSError(f"layer {path}: {err}; or leave the layer out of target_modules") from None


UNQUANTIZED_WARN_SHARE = 0.10


def _warn_unquantized(model: nn.Module, total: int, config) -> None:
    """Warn when weights no policy can wrap stay in 16 bit: float parameters of >= 2 dims held by modules
    that are neither linear-like nor embeddings (MoE experts fused as 3-D parameters, routers), when they
    hold more than ``UNQUANTIZED_WARN_SHARE`` of the model's ``total`` parameters."""
    left: dict[str, list[str]] = {}
    numel, seen, moe = 0, set(), False
    for mpath, module in model.named_modules():
        if is_linear_like(module) or is_quantized_layer(module) or isinstance(module, nn.Embedding):
            continue
        for name, p in module.named_parameters(recurse=False):
            if p.is_floating_point() and p.dim() >= 2 and id(p) not in seen:
                seen.add(id(p))
                left.setdefault(re.sub(r"\.\d+(?=\.|$)", ".*", mpath), []).append(name)
                numel += p.numel()
                moe |= p.dim() == 3 and re.search(r"expert|moe", f"{mpath}.{type(module).__name__}", re.I) is not None
    if total and numel / total > UNQUANTIZED_WARN_SHARE:
        where = "; ".join(f"{m} ({', '.join(dict.fromkeys(n))})" for m, n in left.items())
        why = "Only linear layers are quantized"
        if moe:
            why = ("QA-LoRA quantizes linear layers only, not the fused MoE experts (QLoRAConfig stores them in 4 bit)"
                   if isinstance(config, QALoRAConfig) else "quantize_experts=False keeps the fused MoE experts in "
                   "16 bit (the default, True, stores them in 4 bit)")
        log.warning("qlora-ds: %.0f%% of this model's parameters are not in nn.Linear layers and stay in 16 bit, "
                    "not quantized and not trained: %s. %s; plan memory for them in 16 bit.",
                    100 * numel / total, where, why)


def is_lora_name(name: str) -> bool:
    """A LoRA tensor's parameter name: a layer's ``…lora_A.weight`` / ``…lora_B.weight``, or a 4-bit experts
    module's ``…<weight>_lora_A`` / ``…<weight>_lora_B`` (``qlora_ds.nn.experts_lora``)."""
    return ".lora_A." in name or ".lora_B." in name or name.endswith(SUFFIXES)


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable LoRA tensors by name (``is_lora_name``)."""
    return {n: p for n, p in model.named_parameters() if is_lora_name(n)}
