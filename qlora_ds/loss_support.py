"""Which models the chunked LM-head loss (``qlora_ds.loss``) runs on and which logit transform each applies after its
head: one torch-free table, read by ``qlora_ds.loss`` and by the memory planner (``qlora_ds.plan.loss``).

A transform is taken into the chunked loss only where the model type's CausalLM forward in transformers 5.23 was read
and applies it as ``APPLIED`` says (tests/test_chunked_loss_transforms.py checks each against the model's own loss);
a transform attribute under any other model type keeps the plain loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

# config attributes (of the model's config or its text config) that change the logits after the head in some model
# (name: the values that leave the logits alone; a soft cap of any value, even 1.0, caps them)
_CAP, _SCALE = (None,), (None, 1, 1.0)
LOGIT_TRANSFORMS = {"final_logit_softcapping": _CAP, "logits_soft_cap": _CAP, "output_logit_soft_cap": _CAP,
                    "logit_scale": _SCALE, "logits_scaling": _SCALE, "lm_head_multiplier": _SCALE,
                    "logits_mup_width_multiplier": _SCALE, "output_multiplier": _SCALE,
                    "output_multiplier_scale": _SCALE}
# a config attribute that adds the router's auxiliary loss to the model's loss: the plain loss computes it
ROUTER_LOSS = "output_router_logits"
ROUTER_WHY = f"config.{ROUTER_LOSS} adds the router's auxiliary loss to the model's loss"
# model types whose CausalLM forward computes ``logits = lm_head(hidden)``, then at most the APPLIED transform, and
# the loss from them alone: tests/test_chunked_loss_models.py checks each against the model's own loss. Others (new
# or remote-code architectures, which may scale or cap the logits under any name) use the plain loss.
VERIFIED_MODEL_TYPES = frozenset((
    "apertus", "arcee", "biogpt", "bitnet", "bloom", "codegen", "cohere", "cohere2", "deepseek_v2", "deepseek_v3",
    "diffllama", "ernie4_5", "ernie4_5_moe", "exaone4", "exaone_moe", "falcon", "falcon_h1", "falcon_mamba", "gemma",
    "gemma2", "gemma3", "gemma3_text", "glm", "glm4", "glm4_moe", "glm4_moe_lite", "gpt2", "gpt_bigcode", "gpt_neox",
    "gpt_oss", "gptj", "granite", "granitemoe", "helium", "hunyuan_v1_dense", "hunyuan_v1_moe", "hy_v3", "internlm3",
    "jamba", "kimi_linear", "lfm2", "llama", "llama4_text", "mamba", "mimo_v2_flash", "minimax", "minimax_m2",
    "ministral", "mistral", "mixtral", "mpt", "nemotron", "olmo", "olmo2", "olmo3", "olmoe", "opt", "persimmon", "phi",
    "phi3", "phimoe", "qwen2", "qwen2_moe", "qwen3", "qwen3_5_moe_text", "qwen3_5_text", "qwen3_moe", "qwen3_next",
    "seed_oss", "smollm3", "solar_open", "stablelm", "starcoder2", "xglm", "youtu"))
# model type -> {attribute of the model's own config: (what its forward does with it, the config class's default)}
# as transformers 5.23 writes it: "softcap" logits = v·tanh(logits/v), "mul" logits * v, "div" logits / v
APPLIED = {
    "gemma2": {"final_logit_softcapping": ("softcap", 30.0)},
    "gemma3_text": {"final_logit_softcapping": ("softcap", None)},       # Gemma3ForCausalLM
    "cohere": {"logit_scale": ("mul", 0.0625)},
    "cohere2": {"logit_scale": ("mul", 0.0625)},
    "granite": {"logits_scaling": ("div", 1.0)},
    "granitemoe": {"logits_scaling": ("div", 1.0)},
    "falcon_h1": {"lm_head_multiplier": ("mul", 1.0)},
}
# attributes a model type's forward reads nowhere: Gemma3ForConditionalGeneration never caps its logits, though its
# text config may hold a final_logit_softcapping (only Gemma3ForCausalLM applies it)
IGNORED = {"gemma3": frozenset({"final_logit_softcapping"})}


@dataclass(frozen=True)
class LogitTransform:
    """logits → ``softcap``·tanh(``scale``·logits/``softcap``) (no tanh when ``softcap`` is None)."""

    scale: float = 1.0
    softcap: float | None = None


def logit_transform(model_type: str | None, configs: Sequence[Mapping]) -> tuple[LogitTransform | None, str | None]:
    """(the transform, None) when the chunked loss can compute ``model_type``'s own loss, else (None, why not).
    ``configs``: the model's config and then (composite models) its text config, as mappings of the
    ``LOGIT_TRANSFORMS`` attributes they hold; an attribute the model's config lacks takes its class default."""
    applied, ignored = APPLIED.get(model_type, {}), IGNORED.get(model_type, frozenset())
    scale, cap = 1.0, None
    for i, config in enumerate(configs):
        for name, neutral in LOGIT_TRANSFORMS.items():
            how, default = applied.get(name, (None, None)) if i == 0 else (None, None)
            value = config.get(name, default)
            if name in ignored or _is(value, neutral):
                continue
            if how is None:
                return None, (f"config.{name}={value!r} transforms the logits after the head (the chunked loss "
                              f"implements no such transform for model_type {model_type!r})")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
                    value == 0 and how != "mul"):
                return None, f"config.{name}={value!r} is not a finite{' non-zero' if how != 'mul' else ''} number"
            if how == "softcap":
                cap = float(value)
            else:
                scale = scale * float(value) if how == "mul" else scale / float(value)
    if model_type not in VERIFIED_MODEL_TYPES:
        return None, (f"model_type {model_type!r} is not one the chunked loss is verified on (qlora_ds.loss_support."
                      "VERIFIED_MODEL_TYPES: its forward may transform the logits)")
    return LogitTransform(scale, cap), None


def _is(value, neutral: tuple) -> bool:
    return any(value is n or (n is not None and type(value) in (int, float) and value == n) for n in neutral)
