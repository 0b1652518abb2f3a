"""The planner's MoE terms (qlora_ds/plan/moe.py) against tiny Mixtral, Qwen2-MoE (shared expert and its gate) and
Qwen3-MoE models, with and without renormalized top-k weights, on the CPU in bf16 and fp32, KV cache off as qlora-ds
trains, with the fused 3-D experts in 16 bit and in 4 bit (``quantize_experts``, QLoRAConfig's default):

* kept for backward: autograd's saved tensors of one decoder layer, at batch 1 and per token beyond it; with LoRA on
  the linears inject wraps but o_proj (attention and the shared expert), where the 4-bit experts' checkpoint shares
  its input with LoRA's at dropout 0;
* the backward transient of 4-bit experts: what one layer's experts save when their forward runs unchecked (what
  their checkpoint recomputes): the dequantized weights and the activations per token; with LoRA on them
  (``lora_experts``) also what that keeps, and the weights' full gradients alive at the backward's peak (live
  tensors tracked op by op);
* ``lora_experts``' trainable parameters counted by hand and in the injected model, their bytes, the switch;
* weights: the planned bytes of the experts and routers are the injected model's parameter bytes (NF4 with and
  without double quantization; 16-bit), and ZeRO-3 partitions and gathers exactly those tensors."""
import functools
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


def _quantized(model, dtype, lora: bool = False):
    from qlora_ds.inject.replace import quantize_experts
    from qlora_ds.nn import QLoRAConfig
    assert quantize_experts(model, QLoRAConfig(r=4, compute_dtype=dtype, dropout=0.0, lora_experts=lora))
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
LORA = {"": False, "/lora": True}


def _recomputed(ids) -> dict:
    """Bytes layer 1's 4-bit experts (with LoRA r=4 on them or not) save at batch 1, 2, 3 when their forward runs
    without the checkpoint: what backward recomputes and holds for that layer (the dequantized weights included);
    and ``_backward_peak``'s weight-sized tensors."""
    out = {}
    for case in ids:
        for dtype in ("bfloat16", "float32"):
            for tag, lora in LORA.items():
                model = _quantized(_model(*CASES[case], getattr(torch, dtype)), getattr(torch, dtype), lora)
                out[f"peak/{case}/{dtype}{tag}"] = _backward_peak(model)
                experts = _layer(model).mlp.experts
                experts.forward = functools.partial(experts._forward_dequantized, None)   # all experts
                out[f"{case}/{dtype}{tag}"] = [_saved_bytes_per_layer(model, experts, b, SEQ) for b in (1, 2, 3)]
    return out


def _backward_peak(model, tokens: int = 4) -> list[int]:
    """Layer 1's 4-bit experts run (checkpointed) on ``tokens`` tokens, then backward: every tensor the backward
    allocates is tracked op by op until freed; returns the bytes of those alive at its peak that are at least one
    weight of the experts in size (at 4 tokens every activation is far smaller)."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    experts, h = _layer(model).mlp.experts, model.config.hidden_size
    e, k = experts.num_experts, top_k(shape_from_hf_config(model.config.to_dict()))
    dtype = model.get_input_embeddings().weight.dtype
    smallest = min(shape[0] * shape[1] * shape[2] for shape, _ in experts._qds_weights.values()) * dtype.itemsize
    torch.manual_seed(0)
    x = torch.randn(tokens, h, dtype=dtype, requires_grad=True)
    index = torch.stack([torch.randperm(e)[:k] for _ in range(tokens)])
    out = experts(x, index, torch.rand(tokens, k, dtype=dtype))
    grad = torch.randn_like(out)
    before = {t.untyped_storage().data_ptr() for t in (*model.parameters(), x, index, out, grad)}

    class Live(TorchDispatchMode):
        live, peak, at_peak = {}, 0, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(result):
                ptr = t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else 0
                if ptr and ptr not in before and ptr not in self.live:
                    self.live[ptr] = (StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes())
            now = sum(n for _, n in self.live.values())
            if now > Live.peak:
                Live.peak, Live.at_peak = now, sorted(n for _, n in self.live.values() if n >= smallest)
            for ptr in [p for p, (ref, _) in self.live.items() if ref.expired()]:
                del self.live[ptr]
            return result

    with Live():
        out.backward(grad)
    return Live.at_peak


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


@pytest.mark.parametrize("case", RECOMPUTED)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_4bit_experts_with_lora_recompute_transient(recomputed, case, dtype):
    """LoRA r=4 on the experts (fp32 factors, as built): the recompute keeps the live weights (as many bytes as
    the dequantized ones), the factors cast to bf16 (none in fp32: the parameters themselves), and grouped_mm's
    inputs, e·k·(h + I) per token. At the backward's peak the live weight-sized tensors are gate_up's weight and
    both weights' gradients: the dequantized weights + ``experts_lora_grad_bytes`` = e·E·2I·h (down's weight is
    freed by then), where without LoRA they are the two dequantized weights."""
    from qlora_ds.plan.moe import experts_lora_grad_bytes
    shape, e = _shape(*CASES[case]), 2 if dtype == "bfloat16" else 4
    E, h, i, k, r = shape.experts, shape.hidden, shape.expert_intermediate, top_k(shape), 4
    got, plain = recomputed[f"{case}/{dtype}/lora"], recomputed[f"{case}/{dtype}"]
    factors = r * E * (h + 2 * i) + r * E * (i + h)          # gate_up A (rE, h), B (2I, rE); down A (rE, I), B (h, rE)
    assert [a - b for a, b in zip(got, plain)] == [(e * factors if e == 2 else 0) + b * SEQ * e * k * (h + i)
                                                   for b in (1, 2, 3)]
    assert got == [experts_recompute_bytes(shape, e, b * SEQ, r, factor_copies=e == 2) for b in (1, 2, 3)]
    gate_up, down = e * E * 2 * i * h, e * E * h * i
    assert recomputed[f"peak/{case}/{dtype}"] == sorted([gate_up, down])
    assert recomputed[f"peak/{case}/{dtype}/lora"] == sorted([gate_up, gate_up, down])
    assert experts_lora_grad_bytes(shape, e) == gate_up == sum(recomputed[f"peak/{case}/{dtype}/lora"]) - (
        experts_recompute_bytes(shape, e, 0) - 4 * E)
    cfg = PlanConfig(shape=shape, device="cpu", compute_dtype={2: "bf16", 4: "fp32"}[e], seq_len=SEQ, micro_batch=3,
                     lora_r=r, lora_dropout=0.0, zero_stage=3)      # ZeRO-3 in bf16: fp32 factors, cast per call
    on = estimate_memory(replace(cfg, lora_experts=True))
    assert on.get("moe_experts_recompute") == got[2] and on.get("moe_experts_lora_grads") == gate_up
    assert estimate_memory(cfg).get("moe_experts_lora_grads") == 0
    if e == 2:      # ZeRO-0 in bf16: DeepSpeed casts the factors to bf16 themselves, no copies
        z0 = estimate_memory(replace(cfg, lora_experts=True, zero_stage=0))
        assert on.get("moe_experts_recompute") - z0.get("moe_experts_recompute") == e * factors


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


LORA_CASES = [(c, d, b) for c in ("mixtral", "qwen2_moe") for d in ("bfloat16", "float32") for b in BITS]


@pytest.fixture(scope="module")
def lora_measured():
    """Every case's (planned, measured) in one fresh process (a process per case cost ~6 s each)."""
    cases = [(c, d, BITS[b]) for c, d, b in LORA_CASES]
    return _fresh(f"from tests.test_plan_moe import _lora_slope; print(json.dumps([_lora_slope(*c) for c in "
                  f"{cases!r}]))")


@pytest.mark.parametrize("i", range(len(LORA_CASES)), ids=["-".join(c[::-1]) for c in LORA_CASES])
def test_moe_layers_with_lora_plan_what_autograd_keeps(lora_measured, i):
    planned, got = lora_measured[i]
    assert got == planned, LORA_CASES[i]


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


def test_lora_experts_parameters_by_hand():
    """``lora_experts`` on tiny Qwen2-MoE (E=4, h=64, I=32, 2 layers), r=4: per layer gate_up's A (16, 64) + B
    (64, 16) and down's A (16, 32) + B (64, 16) = 3584 trainable parameters, the injected model's, counted with the
    linears' LoRA in every term (working copy, gradients, masters, Adam; ZeRO partitions)."""
    from qlora_ds.inject import inject
    from qlora_ds.inject.replace import lora_parameters
    from qlora_ds.nn import QLoRAConfig
    from qlora_ds.plan.memory import cfg_lora_params
    from qlora_ds.plan.moe import expert_lora_params
    model = _build("qwen2_moe", dict(LLAMA_KW, **MOE["qwen2_moe"]), dtype=torch.bfloat16)
    inject(model, QLoRAConfig(r=4, dropout=0.0, compute_dtype=torch.bfloat16, lora_experts=True))
    s = shape_from_hf_config(model.config.to_dict())
    assert (s.experts, s.hidden, s.expert_intermediate, s.layers) == (4, 64, 32, 2)
    hand = 2 * ((16 * 64 + 64 * 16) + (16 * 32 + 64 * 16))
    assert expert_lora_params(s, 4) == hand == 7168
    trained = lora_parameters(model)
    assert sum(p.numel() for n, p in trained.items() if n.endswith(("_lora_A", "_lora_B"))) == hand
    cfg = PlanConfig(shape=s, lora_r=4, lora_dropout=0.0, zero_stage=0)
    on = replace(cfg, lora_experts=True)
    assert cfg_lora_params(on) - cfg_lora_params(cfg) == hand and cfg_lora_params(on) == sum(
        p.numel() for p in trained.values() if p.requires_grad)
    for z, n, lora_bytes in ((0, 1, 2), (1, 4, 2), (2, 4, 2), (3, 4, 4)):   # ZeRO-3 in bf16: fp32 A/B as built
        a, b = (estimate_memory(replace(c, zero_stage=z, gpus_per_node=n)) for c in (on, cfg))
        part = {"lora_params": n if z >= 3 else 1, "lora_grads": n if z >= 2 else 1, "master_weights": n if z else 1,
                "optimizer_states": n if z else 1}
        for item, size in {"lora_params": lora_bytes, "lora_grads": 2, "master_weights": 4,
                           "optimizer_states": 8}.items():
            assert a.get(item) - b.get(item) == hand * size / part[item], (z, item)
    assert "(7,168 on the MoE experts)" in format_report(plan(on)) and "with LoRA" in format_report(plan(on))
    assert "frozen + LoRA r=4" in format_report(plan(on))


def test_lora_experts_switch_through_the_planner(tmp_path):
    """The CLI flag (it plans dropout 0, as finetune --lora-experts needs), the recipe key, config_for_run, the
    advice; refused as finetune refuses it: with dropout, 16-bit experts, QA-LoRA."""
    import json

    from qlora_ds.errors import QLoRADSError
    from qlora_ds.plan.__main__ import config_from_args, parse_args
    from qlora_ds.plan.moe import expert_lora_params
    from qlora_ds.plan.run_check import config_for_run
    hf = dict(LLAMA_KW, model_type="qwen3_moe", **MOE["qwen3_moe"])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf))
    plain = config_from_args(parse_args(["--model", str(path)]))
    flag = config_from_args(parse_args(["--model", str(path), "--lora-experts"]))
    assert (plain.lora_experts, flag.lora_experts, flag.lora_dropout) == (False, True, 0.0)
    s, r = flag.shape, flag.lora_r
    per_layer = r * s.experts * (s.hidden + 2 * s.expert_intermediate) + r * s.experts * (
        s.expert_intermediate + s.hidden)
    assert estimate_memory(flag).get("lora_grads") - estimate_memory(replace(flag, lora_experts=False)).get(
        "lora_grads") == 2 * s.layers * per_layer == 2 * expert_lora_params(s, r)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"lora_experts": True, "lora_dropout": 0.0}))
    assert config_from_args(parse_args(["--model", str(path), "--recipe", str(recipe)])).lora_experts
    assert apply_recipe(flag, {"lora_dropout": 0}).lora_experts          # the key absent: the config's
    assert not apply_recipe(flag, {"lora_experts": False}).lora_experts
    for bad in ({"lora_experts": True}, {"lora_experts": True, "lora_dropout": 0, "quantize_experts": False},
                {"lora_experts": True, "lora_dropout": 0, "method": "qalora", "group_size": 16}):
        with pytest.raises(QLoRADSError, match="lora_experts"):
            apply_recipe(plain, bad)
    with pytest.raises(QLoRADSError, match="quantize_experts=False"):
        config_from_args(parse_args(["--model", str(path), "--lora-experts", "--no-quantize-experts"]))
    run = dict(world=1, device="cpu", seq_len=SEQ, lora_r=4, lora_dropout=0.0, targets=None, grad_ckpt=True)
    assert config_for_run(hf, {}, **run, lora_experts=True).lora_experts
    assert not config_for_run(hf, {}, **run).lora_experts
    need = estimate_memory(flag).required
    assert "drop --lora-experts" in [a.flag for a in plan(replace(flag, gpu_mem_bytes=int(need) - 1)).advice]


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
    # LoRA r=64 on Qwen3-30B-A3B's experts (48 layers, 128 experts, h 2048, I 768): r·E·(2h + 3I) per layer
    lora = estimate_memory(PlanConfig(shape=qwen, seq_len=2048, lora_dropout=0.0, lora_experts=True))
    assert lora.get("moe_experts_lora_grads") == 2 * 128 * 2 * 768 * 2048
    assert 48 * 64 * 128 * (2 * 2048 + 3 * 768) == 2_516_582_400
    assert "(2,516,582,400 on the MoE experts)" in next(it.note for it in lora.items if it.name == "lora_params")


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
    # LoRA on the experts: folded into the weights per micro step (8·r·E·h·I·3 per layer: B·A in the forward and its
    # recompute, dA and dB), plus the weight gradient per token (2 per reached weight) — not a per-token LoRA of
    # its 8·r·E·(…) parameters
    lora = PlanConfig(shape=s, seq_len=512, grad_ckpt=False, lora_dropout=0.0, lora_experts=True)
    fold = 8 * 64 * s.layers * 8 * 3 * s.hidden * s.expert_intermediate
    assert flops_per_token(lora) == pytest.approx(flops_per_token(on) + 2 * reached + fold / 512, rel=1e-12)


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("bits", list(BITS))
def test_moe_routing_on_cuda_is_what_autograd_keeps(case, bits):
    """On CUDA (bf16), where the experts run torch's grouped_mm kernel: the same terms."""
    mt, kw = CASES[case]
    shape, q = _shape(mt, kw), BITS[bits]
    assert _per_token(mt, kw, torch.bfloat16, SEQ, q, "cuda") == (_planned(shape, 2, SEQ, 1, q, "cuda"),
                                                                   _planned(shape, 2, SEQ, 2, q, "cuda"))


def test_a_layer_above_the_dequant_limit_is_planned_in_the_groups_it_runs_in(monkeypatch):
    """The planner's expert groups are the module's (``_group_size`` at the same limit), and its recompute transient
    (and the LoRA weight gradients') hold one group's weights instead of the layer's."""
    from qlora_ds.nn import quantized_experts as qe
    from qlora_ds.plan.moe import experts_group
    default = qe.DEQUANT_LIMIT
    mt, kw = CASES["mixtral-top3"]
    shape, e = _shape(mt, kw), 4
    experts = _layer(_quantized(_model(mt, kw, torch.float32), torch.float32)).mlp.experts
    per_expert = e * sum(shape.expert_tensors()) // shape.experts
    assert shape.experts == 8 and per_expert == sum(4 * s[1] * s[2] for s, _ in experts._qds_weights.values())
    for limit, group in ((8 * per_expert, 8), (3 * per_expert + 1, 3), (per_expert - 1, 1), (0, 1)):
        monkeypatch.setattr(qe, "DEQUANT_LIMIT", limit)
        assert experts._group_size(torch.float32) == experts_group(shape, e, limit) == group
    cfg = PlanConfig(shape=shape, device="cpu", compute_dtype="fp32", seq_len=SEQ, micro_batch=1, lora_experts=True,
                     lora_dropout=0.0)
    grouped = replace(cfg, experts_dequant_bytes=3 * per_expert + 1)
    assert estimate_memory(cfg).get("moe_experts_recompute") - estimate_memory(grouped).get("moe_experts_recompute") \
        == 5 * per_expert - SEQ * 3 * 24     # fp32: the factors are used as stored; the slots' int64 indices
    assert estimate_memory(grouped).get("moe_experts_lora_grads") == \
        pytest.approx(3 / 8 * estimate_memory(cfg).get("moe_experts_lora_grads"))
    assert "3 of a layer's 8 experts" in format_report(plan(grouped))
    # under checkpointing the layer's recompute replays the 2 groups before the last one (3 groups of <= 3 experts)
    from qlora_ds.plan.scaling import flops_per_token
    reached = shape.layers * 3 * sum(shape.expert_tensors()) / 8          # top-3 of 8 experts, per token
    assert flops_per_token(grouped) - flops_per_token(cfg) == pytest.approx(2 * reached * 2 / 3)
    assert flops_per_token(replace(grouped, grad_ckpt=False)) == flops_per_token(replace(cfg, grad_ckpt=False))
    from qlora_ds.plan.__main__ import config_from_args, parse_args
    assert config_from_args(parse_args(["--model", "qwen3-235b-a22b", "--experts-dequant-mb", "64"])) \
        .experts_dequant_bytes == 64 << 20
    assert config_from_args(parse_args(["--model", "qwen3-235b-a22b"])).experts_dequant_bytes == default


def test_grouped_experts_keep_the_planned_bytes_per_slot(monkeypatch):
    """What a layer run in groups keeps beyond the whole layer's checkpoint (its storages, once each): the slots'
    int64 token numbers, slots and renumbered experts, 24·k per token, as ``experts_recompute_bytes`` counts."""
    from qlora_ds.nn import QLoRAConfig, quantized_experts as qe
    from qlora_ds.nn.quantized_experts import quantize_experts_module

    from .test_quantized_experts import tiny_moe

    def kept(limit):
        monkeypatch.setattr(qe, "DEQUANT_LIMIT", limit)
        mlp = tiny_moe("qwen3_moe", layers=1).model.layers[0].mlp
        quantize_experts_module(mlp.experts, QLoRAConfig(dropout=0.0, compute_dtype=torch.float32))
        storages = {}
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) and t,
                lambda t: t):
            mlp(torch.randn(1, 12, 64, requires_grad=True))
        return sum(storages.values())

    extra = kept(1) - kept(1 << 40)      # one expert at a time vs the whole layer; 12 tokens, top-2
    assert abs(extra - 12 * 2 * 24) <= 64, extra
