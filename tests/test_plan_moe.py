"""The planner's MoE routing term (qlora_ds/plan/moe.py) is what autograd keeps: one decoder layer of a tiny
Mixtral, Qwen2-MoE (shared expert and its gate) and Qwen3-MoE, with and without renormalized top-k weights, on the
CPU in bf16 and fp32, KV cache off as qlora-ds trains, at batch 1 and per token beyond it; and with LoRA on every
linear inject wraps but o_proj (attention and the shared expert: the fused 3-D experts and the routers stay 16-bit,
unwrapped), where routing keeps the same."""
import pytest
import torch

from qlora_ds.plan.memory import activation_bytes_per_token_layer
from qlora_ds.plan.moe import moe_routing_bytes_per_token, top_k
from qlora_ds.plan.presets import shape_from_hf_config

from .test_plan_attention import _fresh, _per_token, _planned, _shape
from .test_plan_layouts import LLAMA_KW, MOE, _build, _saved_bytes_per_layer

SEQ = 16
CASES = {   # id: (model_type, config keywords)
    "mixtral": ("mixtral", dict(LLAMA_KW, **MOE["mixtral"])),                     # fp32 routing weights, renormalized
    "mixtral-jitter": ("mixtral", dict(LLAMA_KW, **MOE["mixtral"], router_jitter_noise=0.01)),
    "mixtral-top3": ("mixtral", dict(LLAMA_KW, num_local_experts=8, num_experts_per_tok=3)),
    "qwen2_moe": ("qwen2_moe", dict(LLAMA_KW, **MOE["qwen2_moe"])),               # shared expert + its sigmoid gate
    "qwen2_moe-norm": ("qwen2_moe", dict(LLAMA_KW, **MOE["qwen2_moe"], norm_topk_prob=True)),
    "qwen3_moe": ("qwen3_moe", dict(LLAMA_KW, **MOE["qwen3_moe"])),
    "qwen3_moe-norm": ("qwen3_moe", dict(LLAMA_KW, **MOE["qwen3_moe"], norm_topk_prob=True)),
}


def _measure(ids) -> dict:
    return {f"{i}/{d}": _per_token(*CASES[i], getattr(torch, d), SEQ) for i in ids for d in ("bfloat16", "float32")}


@pytest.fixture(scope="module")
def measured():
    return _fresh(f"from tests.test_plan_moe import _measure; print(json.dumps(_measure({list(CASES)})))")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_moe_layers_plan_what_autograd_keeps(measured, case, dtype):
    shape, e = _shape(*CASES[case]), 2 if dtype == "bfloat16" else 4
    assert moe_routing_bytes_per_token(shape, e) > 0
    assert tuple(measured[f"{case}/{dtype}"]) == (_planned(shape, e, SEQ, 1), _planned(shape, e, SEQ, 2))


def test_the_routing_term_reads_the_config():
    """Top-k from the MoE widths, renormalization and jitter from the config (Mixtral always renormalizes)."""
    mixtral, qwen3 = _shape(*CASES["mixtral-top3"]), _shape(*CASES["qwen3_moe"])
    assert (top_k(mixtral), top_k(_shape(*CASES["qwen2_moe"])), mixtral.layout.norm_topk) == (3, 2, True)
    assert not qwen3.layout.norm_topk and _shape(*CASES["qwen3_moe-norm"]).layout.norm_topk
    assert _shape(*CASES["mixtral-jitter"]).layout.router_jitter and not mixtral.layout.router_jitter
    assert moe_routing_bytes_per_token(_shape("llama", LLAMA_KW), 2) == 0


# o_proj left out: its input is SDPA's output, which SDPA keeps already (a LoRA term memory.py counts twice; not MoE)
LORA_TARGETS = {"mixtral": ("q_proj", "k_proj", "v_proj"),
                "qwen2_moe": ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")}   # + shared expert


def _lora_slope(case: str, dtype: str, r: int = 4) -> tuple[float, float]:
    """(planned, measured) per token of layer 1 with LoRA (dropout 0) on LORA_TARGETS, batch 1 to 3."""
    from qlora_ds.inject import inject
    from qlora_ds.nn import QLoRAConfig, functional
    functional.KEEP_LIMIT = 0          # no kept dequantized weights (per weight, not per token): see test_plan_layouts
    functional.set_keep_limit(0)
    mt, kw = CASES[case]
    dt = getattr(torch, dtype)
    model = _build(mt, kw, attn_implementation="sdpa", dtype=dt)
    inject(model, QLoRAConfig(r=r, dropout=0.0, compute_dtype=dt, target_modules=LORA_TARGETS[case]))
    layer = next(m for n, m in model.named_modules() if n.endswith("layers.1"))
    one, three = (_saved_bytes_per_layer(model, layer, b, SEQ) for b in (1, 3))
    s = shape_from_hf_config(model.config.to_dict())
    planned = activation_bytes_per_token_layer(s, r, LORA_TARGETS[case], dropout=0.0,
                                               elem=2 if dt == torch.bfloat16 else 4, mask_bytes=0)
    return planned, (three - one) / (2 * SEQ)


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_moe_layers_with_lora_plan_what_autograd_keeps(case, dtype):
    planned, got = _fresh(f"from tests.test_plan_moe import _lora_slope; print(json.dumps(_lora_slope({case!r}, "
                          f"{dtype!r})))")
    assert got == planned


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe"])
def test_moe_routing_on_cuda_is_what_autograd_keeps(case):
    """On CUDA (bf16), where the experts run torch's grouped_mm kernel: the same terms."""
    mt, kw = CASES[case]
    shape = _shape(mt, kw)
    assert _per_token(mt, kw, torch.bfloat16, SEQ, "cuda") == (_planned(shape, 2, SEQ, 1, "cuda"),
                                                                _planned(shape, 2, SEQ, 2, "cuda"))
