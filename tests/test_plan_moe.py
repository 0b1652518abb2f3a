"""The planner's MoE terms (qlora_ds/plan/moe.py) against tiny Mixtral, Qwen2-MoE (shared expert and its gate) and
Qwen3-MoE models, with and without renormalized top-k weights, on the CPU in bf16 and fp32, KV cache off as qlora-ds
trains, with the fused 3-D experts in 16 bit and in 4 bit (``quantize_experts``, QLoRAConfig's default):

* kept for backward: autograd's saved tensors of one decoder layer, at batch 1 and per token beyond it; with LoRA on
  the linears inject wraps but o_proj (attention and the shared expert), where the 4-bit experts' checkpoint shares
  its input with LoRA's at dropout 0;
* the backward transient of 4-bit experts: what one layer's experts save when their forward runs unchecked (what
  their checkpoint recomputes): the dequantized weights and the activations per token;
* weights: the planned bytes of the experts and routers are the injected model's parameter bytes (NF4 with and
  without double quantization; 16-bit), and ZeRO-3 partitions and gathers exactly those tensors."""
from dataclasses import replace

import pytest
import torch

from qlora_ds.plan import PlanConfig, apply_recipe, estimate_memory, format_report, plan
from qlora_ds.plan.memory import activation_bytes_per_token_layer, model_dropout_bytes_per_token
from qlora_ds.plan.moe import experts_bytes_per_token, experts_recompute_bytes, moe_routing_bytes_per_token, top_k
from qlora_ds.plan.presets import shape_from_hf_config

from .test_plan_attention import _fresh, _layer, _model, _shape
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
BITS = {"16bit": False, "4bit": True}


def _quantized(model, dtype):
    from qlora_ds.inject.replace import quantize_experts
    from qlora_ds.nn import QLoRAConfig
    assert quantize_experts(model, QLoRAConfig(r=4, compute_dtype=dtype))
    return model


def _per_token(mt, kw, dtype, seq, quantized, device="cpu") -> tuple[float, float]:
    """(at batch 1, per token beyond it) of layer 1's saved bytes (as tests/test_plan_attention.py measures)."""
    model = _model(mt, kw, dtype, device)
    if quantized:
        _quantized(model, dtype)
    one, two, three = (_saved_bytes_per_layer(model, _layer(model), b, seq) for b in (1, 2, 3))
    return (one - (3 * two - 2 * three)) / seq, (three - two) / seq


def _measure(ids) -> dict:
    return {f"{i}/{d}/{q}": _per_token(*CASES[i], getattr(torch, d), SEQ, BITS[q]) for i in ids
            for d in ("bfloat16", "float32") for q in BITS}


@pytest.fixture(scope="module")
def measured():
    return _fresh(f"from tests.test_plan_moe import _measure; print(json.dumps(_measure({list(CASES)})))")


def _planned(shape, e, seq, batch, quantized, device="cpu"):
    return (activation_bytes_per_token_layer(shape, 0, elem=e, keys=seq, batch=batch, quantized_experts=quantized)
            + model_dropout_bytes_per_token(shape, e, device, seq, batch)[0])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("bits", list(BITS))
def test_moe_layers_plan_what_autograd_keeps(measured, case, dtype, bits):
    shape, e, q = _shape(*CASES[case]), 2 if dtype == "bfloat16" else 4, BITS[bits]
    assert moe_routing_bytes_per_token(shape, e, quantized=q) > 0
    assert tuple(measured[f"{case}/{dtype}/{bits}"]) == (_planned(shape, e, SEQ, 1, q), _planned(shape, e, SEQ, 2, q))


def test_4bit_experts_keep_their_inputs_only(measured):
    """What 4 bit saves per token (Qwen3-MoE, bf16): the experts' gate/up/act, index tensors, gathered routing weights
    and outputs, less the hidden states and routing weights their checkpoint keeps."""
    shape = _shape(*CASES["qwen3_moe"])
    h, k, i = shape.hidden, top_k(shape), shape.expert_intermediate
    saved = measured["qwen3_moe/bfloat16/16bit"][1] - measured["qwen3_moe/bfloat16/4bit"][1]
    assert saved == experts_bytes_per_token(shape, 2) - 2 * h - 2 * k == 3 * 2 * k * i + 24 * k + 2 * k * h - 2 * h


def test_the_routing_term_reads_the_config():
    """Top-k from the MoE widths, renormalization and jitter from the config (Mixtral always renormalizes)."""
    mixtral, qwen3 = _shape(*CASES["mixtral-top3"]), _shape(*CASES["qwen3_moe"])
    assert (top_k(mixtral), top_k(_shape(*CASES["qwen2_moe"])), mixtral.layout.norm_topk) == (3, 2, True)
    assert not qwen3.layout.norm_topk and _shape(*CASES["qwen3_moe-norm"]).layout.norm_topk
    assert _shape(*CASES["mixtral-jitter"]).layout.router_jitter and not mixtral.layout.router_jitter
    for q in (True, False):
        assert moe_routing_bytes_per_token(_shape("llama", LLAMA_KW), 2, quantized=q) == 0


RECOMPUTED = ("mixtral", "mixtral-top3", "qwen2_moe")


def _recomputed(ids) -> dict:
    """Bytes layer 1's 4-bit experts save at batch 1, 2, 3 when their forward runs without the checkpoint: what
    backward recomputes and holds for that layer (the dequantized weights included)."""
    out = {}
    for case in ids:
        for dtype in ("bfloat16", "float32"):
            model = _quantized(_model(*CASES[case], getattr(torch, dtype)), getattr(torch, dtype))
            experts = _layer(model).mlp.experts
            experts.forward = experts._forward_dequantized
            out[f"{case}/{dtype}"] = [_saved_bytes_per_layer(model, experts, b, SEQ) for b in (1, 2, 3)]
    return out


@pytest.fixture(scope="module")
def recomputed():
    return _fresh(f"from tests.test_plan_moe import _recomputed; print(json.dumps(_recomputed({RECOMPUTED})))")


@pytest.mark.parametrize("case", RECOMPUTED)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_4bit_experts_recompute_transient(recomputed, case, dtype):
    got = recomputed[f"{case}/{dtype}"]
    shape, e = _shape(*CASES[case]), 2 if dtype == "bfloat16" else 4
    assert got == [experts_recompute_bytes(shape, e, b * SEQ) for b in (1, 2, 3)]
    assert experts_recompute_bytes(shape, e, 0) == e * shape.experts * 3 * shape.hidden * shape.expert_intermediate \
        + 4 * shape.experts
    cfg = PlanConfig(shape=shape, device="cpu", compute_dtype={2: "bf16", 4: "fp32"}[e], seq_len=SEQ, micro_batch=3)
    assert estimate_memory(cfg).get("moe_experts_recompute") == got[2]
    assert estimate_memory(replace(cfg, quantize_experts=False)).get("moe_experts_recompute") == 0


# o_proj left out: its input is SDPA's output, which SDPA keeps already (a LoRA term memory.py counts twice; not MoE)
LORA_TARGETS = {"mixtral": ("q_proj", "k_proj", "v_proj"),
                "qwen2_moe": ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")}   # + shared expert


def _lora_slope(case: str, dtype: str, quantized: bool, dropout: float = 0.0, r: int = 4) -> tuple[float, float]:
    """(planned, measured) per token of layer 1 with LoRA on LORA_TARGETS (inject, experts 4-bit or not), batch 1
    to 3."""
    from qlora_ds.inject import inject
    from qlora_ds.nn import QLoRAConfig, functional
    functional.KEEP_LIMIT = 0          # no kept dequantized weights (per weight, not per token): see test_plan_layouts
    functional.set_keep_limit(0)
    mt, kw = CASES[case]
    dt = getattr(torch, dtype)
    model = _build(mt, kw, attn_implementation="sdpa", dtype=dt)
    inject(model, QLoRAConfig(r=r, dropout=dropout, compute_dtype=dt, target_modules=LORA_TARGETS[case],
                              quantize_experts=quantized))
    assert any(".experts.gate_up_proj_packed" in n for n, _ in model.named_parameters()) == quantized
    layer = next(m for n, m in model.named_modules() if n.endswith("layers.1"))
    torch.manual_seed(0)
    one, three = (_saved_bytes_per_layer(model, layer, b, SEQ) for b in (1, 3))
    s = shape_from_hf_config(model.config.to_dict())
    planned = activation_bytes_per_token_layer(s, r, LORA_TARGETS[case], dropout=dropout,
                                               elem=2 if dt == torch.bfloat16 else 4, mask_bytes=0,
                                               quantized_experts=quantized)
    return planned, (three - one) / (2 * SEQ)


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("bits", list(BITS))
def test_moe_layers_with_lora_plan_what_autograd_keeps(case, dtype, bits):
    planned, got = _fresh(f"from tests.test_plan_moe import _lora_slope; print(json.dumps(_lora_slope({case!r}, "
                          f"{dtype!r}, {BITS[bits]})))")
    assert got == planned


def test_lora_dropout_keeps_its_own_copy_beside_the_4bit_experts_input():
    """With LoRA dropout the shared expert's LoRA keeps the dropped copy, so the experts' checkpoint input is new
    bytes (e·h more than at dropout 0)."""
    planned, got = _fresh("from tests.test_plan_moe import _lora_slope; "
                          "print(json.dumps(_lora_slope('qwen2_moe', 'bfloat16', True, 0.1)))")
    assert got == planned
    s = _shape(*CASES["qwen2_moe"])
    assert (moe_routing_bytes_per_token(s, 2, quantized=True) - moe_routing_bytes_per_token(
        s, 2, quantized=True, input_saved=True)) == 2 * s.hidden


# ---- weights -------------------------------------------------------------------------------------------------

def _injected(mt: str, dtype, quantized: bool, double_quant: bool):
    from qlora_ds.inject import inject
    from qlora_ds.nn import QLoRAConfig
    model = _build(mt, dict(LLAMA_KW, **MOE[mt]), dtype=dtype)
    inject(model, QLoRAConfig(r=4, compute_dtype=dtype, quantize_experts=quantized, double_quant=double_quant))
    return model


def _is_moe(name: str) -> bool:
    return any(part in name for part in (".mlp.experts.", ".mlp.gate.", ".mlp.shared_expert_gate."))


@pytest.mark.parametrize("mt", list(MOE))
@pytest.mark.parametrize("quantized,double_quant", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_planned_expert_bytes_are_the_injected_parameters(mt, quantized, double_quant, dtype):
    """The experts and routers inject leaves (4-bit parts, or 16-bit / fp32 3-D weights) hold the planner's
    ``moe_experts`` bytes, exactly; ZeRO-3 partitions them by N and gathers one layer's tensors as they are."""
    from qlora_ds.plan.scaling import _expert_tensor_sizes, zero3_gathers
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    model = _injected(mt, dt, quantized, double_quant)
    moe = {n: p for n, p in model.named_parameters() if _is_moe(n)}
    assert all(not p.requires_grad for p in moe.values())
    assert any("_packed" in n for n in moe) == quantized
    s = shape_from_hf_config(model.config.to_dict())
    cfg = PlanConfig(shape=s, compute_dtype=dtype, zero_stage=0, double_quant=double_quant, quantize_experts=quantized)
    assert cfg.experts_4bit == quantized
    assert estimate_memory(cfg).get("moe_experts") == sum(p.nbytes for p in moe.values())
    layer0 = sorted(p.nbytes for n, p in moe.items() if ".layers.0." in n)
    assert sorted(n * b for n, b in _expert_tensor_sizes(cfg)) == layer0
    z3 = replace(cfg, zero_stage=3, gpus_per_node=4, persistence_threshold=0, max_live_parameters=0)
    assert estimate_memory(z3).get("moe_experts") == sum(p.nbytes for p in moe.values()) / 4
    padded = sum(-(-p.numel() // 4) * 4 * p.element_size() for n, p in moe.items() if ".layers.0." in n)
    assert zero3_gathers(z3)["moe_experts"] == 2 * s.layers * padded        # forward + backward, every layer


def test_quantized_experts_switch_through_the_planner(tmp_path):
    """config_for_run's quantize_experts, the recipe key, the CLI flag and the report: 4 bit by default, 16 bit
    with --no-quantize-experts, and 16 bit under QA-LoRA (inject quantizes only QLoRA's experts)."""
    import json

    from qlora_ds.plan.__main__ import config_from_args, parse_args
    from qlora_ds.plan.run_check import config_for_run
    hf = dict(LLAMA_KW, model_type="qwen2_moe", **MOE["qwen2_moe"])
    run = dict(world=1, device="cpu", seq_len=SEQ, lora_r=4, lora_dropout=0.0, targets=None, grad_ckpt=True)
    on, off = config_for_run(hf, {}, **run), config_for_run(hf, {}, **run, quantize_experts=False)
    qa = config_for_run(hf, {}, **run, method="qalora", bits=4, group_size=16)
    assert (on.experts_4bit, off.experts_4bit, qa.experts_4bit) == (True, False, False)
    a, b = estimate_memory(on), estimate_memory(off)
    s = on.shape
    assert b.get("moe_experts") - a.get("moe_experts") == s.layers * sum(
        2 * n - (n // 2 + n // 64 + 4 * -(-n // 64 // 256) + 4) for n in s.expert_tensors())
    assert a.get("embeddings_norms") == b.get("embeddings_norms") == (s.embedding_params - s.expert_params) * 2
    assert "experts in 4 bit" in format_report(plan(on)) and "MoE experts 4-bit" in format_report(plan(on))
    assert "unquantized in bf16 (--no-quantize-experts)" in format_report(plan(off))
    assert "QA-LoRA" in format_report(plan(qa)) and "MoE experts 16-bit" in format_report(plan(qa))
    assert not apply_recipe(on, {"quantize_experts": False}).quantize_experts
    assert apply_recipe(off, {"quantize_experts": True}).quantize_experts
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(hf))
    assert config_from_args(parse_args(["--model", str(cfg)])).quantize_experts
    assert not config_from_args(parse_args(["--model", str(cfg), "--no-quantize-experts"])).quantize_experts
    advice = [a.flag for a in plan(replace(off, gpu_mem_bytes=int(b.required) - 1)).advice]
    assert "drop --no-quantize-experts" in advice


def test_published_moe_presets():
    """Mixtral-8x7B (46.7 B) and Qwen3-30B-A3B (30.5 B) as presets; their 4-bit experts are 3.9x smaller."""
    from qlora_ds.plan import load_shape
    from qlora_ds.plan.memory import GiB
    mixtral, qwen = load_shape("mixtral-8x7b"), load_shape("qwen3-30b-a3b")
    assert (mixtral.total_params, qwen.total_params) == (46_702_792_704, 30_532_122_624)
    for s in (mixtral, qwen):
        on = estimate_memory(PlanConfig(shape=s, seq_len=2048, gpu_mem_bytes=80 * GiB))
        off = estimate_memory(PlanConfig(shape=s, seq_len=2048, gpu_mem_bytes=80 * GiB, quantize_experts=False))
        assert 3.8 < off.get("moe_experts") / on.get("moe_experts") < 3.9
        assert on.get("moe_experts_recompute") > 0 and off.get("activations") > on.get("activations")


def test_step_time_counts_the_experts_a_token_reaches():
    """Mixtral-8x7B: a token reaches 2 of 8 experts (3·h·I each, per layer), frozen-linear FLOPs (2 forward, 2 input
    gradient), + 2 recompute when the experts are 4-bit (their own checkpoint) even with checkpointing off."""
    from qlora_ds.plan import load_shape
    from qlora_ds.plan.scaling import flops_per_token
    s = load_shape("mixtral-8x7b")
    reached = s.layers * 2 * 3 * s.hidden * s.expert_intermediate
    on, off = (PlanConfig(shape=s, seq_len=512, grad_ckpt=False, quantize_experts=q) for q in (True, False))
    dense = flops_per_token(off) - 4 * reached          # attention, linears, LoRA, head
    assert flops_per_token(on) - dense == 6 * reached and reached == 11_274_289_152
    assert dense < reached        # the experts are most of the compute


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("bits", list(BITS))
def test_moe_routing_on_cuda_is_what_autograd_keeps(case, bits):
    """On CUDA (bf16), where the experts run torch's grouped_mm kernel: the same terms."""
    mt, kw = CASES[case]
    shape, q = _shape(mt, kw), BITS[bits]
    assert _per_token(mt, kw, torch.bfloat16, SEQ, q, "cuda") == (_planned(shape, 2, SEQ, 1, q, "cuda"),
                                                                   _planned(shape, 2, SEQ, 2, q, "cuda"))
