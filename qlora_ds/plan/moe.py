"""What a MoE decoder layer's routing keeps for backward, per token, beyond the gated MLP term of memory.py (which
counts gate, up and act(gate) over the top-k experts' and the shared expert's widths: ``intermediate``). Units:
bytes per token and layer; e = bytes per element of the compute dtype, E = experts, k = experts per token, h =
hidden. Measured with autograd's saved tensors around one decoder layer of transformers 5.23's Mixtral, Qwen2-MoE
and Qwen3-MoE (tests/test_plan_moe.py), whose experts run ``grouped_mm`` (its default experts implementation, on
CUDA and, with torch > 2.10, on the CPU); the expert weights are frozen 3-D parameters (qlora-ds neither quantizes
nor wraps them), so the gathered expert inputs are not kept, with or without LoRA on the other linears.

* router (``*TopKRouter``): the fp32 softmax output 4·E and top-k's int64 indices 8·k; with ``norm_topk_prob``
  (Mixtral always) the in-place division keeps the sum 4 and the fp32 top-k values it overwrites 4·k.
* experts (``grouped_mm_experts_forward``): three int64 index tensors of k per token (the sort permutation, the
  token each row gathers, the inverse permutation) 3·8·k; the routing weights gathered per row, w·k (w = 4 for
  Mixtral, whose weights stay fp32; e for Qwen, which casts them to the compute dtype), and the expert outputs they
  scale, e·k·h (their gradient needs it). A (E,) int32 offsets tensor is per layer, not per token.
* Qwen2-MoE's shared-expert gate: sigmoid(shared_expert_gate(x)) · shared expert's output keeps both, e·(1 + h).
* Mixtral's ``router_jitter_noise`` > 0 (training only): the in-place multiply keeps its noise, e·h.
"""
from __future__ import annotations

from .presets import ModelShape


def top_k(shape: ModelShape) -> int:
    """Experts per token: ModelShape's ``intermediate`` of a MoE is top-k · expert width + the shared expert's."""
    return (shape.intermediate - shape.shared_expert_intermediate) // shape.expert_intermediate


def moe_routing_bytes_per_token(shape: ModelShape, elem: int) -> float:
    """Bytes per token one MoE decoder layer's routing keeps for backward (see the module docstring); 0 if dense."""
    if not shape.experts:
        return 0
    lay, e, h, k = shape.layout, elem, shape.hidden, top_k(shape)
    router = 4 * shape.experts + 8 * k + ((4 + 4 * k) if lay.norm_topk else 0)
    weights = 4 if lay.family == "mixtral" else e
    experts = 3 * 8 * k + weights * k + e * k * h
    shared_gate = e * (1 + h) if shape.shared_expert_intermediate else 0
    return router + experts + shared_gate + (e * h if lay.router_jitter else 0)
