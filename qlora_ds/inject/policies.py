"""Which modules of which architecture get quantized and LoRA-wrapped: small data, one entry each.

A ``Policy`` names the HF ``model_type`` values it covers, the leaf names of its target linear
layers (exact names, or one regex matched with ``re.fullmatch`` against the full module path), the
leaf names it never touches (LM head, embeddings), and whether its linears are GPT-2 ``Conv1D``
(weight stored as (in, out), transposed on the way in). ``POLICIES`` is a plain list;
``policy_for(model_type)`` returns the matching entry or ``GENERIC`` (every ``nn.Linear`` but the
LM head and one-output gates), which ``replace`` reports with one log line listing what it wrapped. No policy
wraps a linear under a multimodal model's vision/audio tower or projector (``NON_TEXT``): finetuning is text-only,
so those stay in 16 bit, unquantized and without LoRA (``target_modules`` can still name them).
"""
from __future__ import annotations

import dataclasses
import re

LM_HEADS = ("lm_head", "embed_out", "output")
# a MoE router that subclasses nn.Linear (Llama-4's returns the top-k scores and indices, not a projection): never
# wrapped by a policy (the others are no nn.Linear in transformers 5)
ROUTERS = ("router",)
# module names of the non-text parts of multimodal models (Gemma-3, LLaVA, Qwen2-VL, Gemma-3n, mllama…)
NON_TEXT = frozenset({"vision_tower", "vision_model", "visual", "multi_modal_projector", "mm_projector",
                      "audio_tower", "audio_model", "embed_vision", "embed_audio"})


@dataclasses.dataclass(frozen=True)
class Policy:
    name: str
    model_types: tuple[str, ...]
    targets: tuple[str, ...] = ()        # exact leaf names of the linears to wrap
    pattern: str | None = None           # or a regex on the full module path (re.fullmatch)
    skip: tuple[str, ...] = LM_HEADS + ROUTERS     # leaf names never wrapped
    conv1d: bool = False                 # GPT-2 style Conv1D: weight is (in, out)

    @property
    def generic(self) -> bool:
        return not self.targets and self.pattern is None

    def wants(self, path: str, out_features: int | None = None) -> bool:
        """Whether the linear-like module at ``path`` (with ``out_features`` outputs) is a target of this policy."""
        names = path.split(".")
        leaf = names[-1]
        if leaf in self.skip or not NON_TEXT.isdisjoint(names):
            return False
        if self.pattern is not None:
            return re.fullmatch(self.pattern, path) is not None
        if self.generic:   # a one-output linear is a gate (Qwen2-MoE's shared_expert_gate), not a projection
            return out_features != 1
        return leaf in self.targets


_NEOX_STYLE = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")

POLICIES: list[Policy] = [
    Policy("llama", ("llama", "mistral", "qwen2", "qwen3", "smollm3"),
           ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    Policy("gpt_neox", ("gpt_neox",), _NEOX_STYLE),
    # OPT's project_in / project_out (only when word_embed_proj_dim != hidden_size) stay in 16 bit.
    Policy("opt", ("opt",), ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")),
    Policy("bloom", ("bloom",), _NEOX_STYLE),
    Policy("gpt2", ("gpt2",), ("c_attn", "c_proj", "c_fc"), conv1d=True),
    Policy("falcon", ("falcon",), _NEOX_STYLE),
    # Mamba-1 mixers multiply by dt_proj's weight itself (`dt_proj.weight @ time_step`), so it is never wrapped;
    # in_proj / x_proj / out_proj are called as modules (every linear of the attention and MoE layers too: Jamba).
    # transformers' fused training kernel (mamba-ssm installed, CUDA) takes x_proj/out_proj weights raw: untested.
    Policy("mamba", ("mamba", "falcon_mamba", "jamba"), skip=LM_HEADS + ROUTERS + ("dt_proj",)),
]

GENERIC = Policy("generic", ())


def policy_for(model_type: str | None) -> Policy:
    for policy in POLICIES:
        if model_type in policy.model_types:
            return policy
    return GENERIC
