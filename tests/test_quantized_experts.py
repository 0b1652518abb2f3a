"""MoE experts fused as 3-D parameters, stored in 4 bit (qlora_ds.nn.quantized_experts): the bytes bitsandbytes writes
for that tensor, the loss and input gradients of the same model holding the dequantized weights (every experts
layout of transformers 5.23 we know: concatenated, interleaved + transposed + biased, Llama-4's bmm), nothing of the
experts kept for backward, and the way back to 16 bit."""
import copy
import dataclasses
import logging

import bitsandbytes.functional as bnbF
import pytest
import torch

from qlora_ds.errors import QLoRADSError
from qlora_ds.inject import inject
from qlora_ds.nn import QALoRAConfig, QLoRAConfig
from qlora_ds.nn.quantized_experts import (dequantize_experts_module, expert_weight_names, is_quantized_experts,
                                           quantize_experts_module)
from qlora_ds.quant import dequantize, quantize

CFG = QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32)
ARCHS = ["qwen3_moe", "mixtral", "gpt_oss", "llama4_text"]


def tiny_moe(model_type: str, dtype=torch.float32, layers: int = 2):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model(model_type, vocab_size=128, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               num_experts=4, num_local_experts=4, moe_intermediate_size=64, num_experts_per_tok=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).to(dtype)


def experts_modules(model):
    return {p: m for p, m in model.named_modules() if expert_weight_names(m) or is_quantized_experts(m)}


def with_dequantized_experts(model, config):
    """The unquantized model holding what 4-bit experts compute with: the reference."""
    ref = copy.deepcopy(model)
    for module in experts_modules(ref).values():
        for name in expert_weight_names(module):
            p = module._parameters[name]
            qt = quantize(p.detach(), config.quant_type, config.blocksize, config.double_quant,
                          config.nested_blocksize)
            p.data = dequantize(qt, p.dtype)
    return ref


def loss_and_grad(model, ids):
    model.requires_grad_(False)
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(True)
    emb.grad = None
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), emb.grad


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bytes_are_bitsandbytes_quantize_4bit_of_the_3d_tensor(quant_type, double_quant):
    model = tiny_moe("qwen3_moe", torch.bfloat16, layers=1)
    module = model.model.layers[0].mlp.experts
    weights = {n: module._parameters[n].detach().clone() for n in expert_weight_names(module)}
    config = dataclasses.replace(CFG, quant_type=quant_type, double_quant=double_quant)
    assert quantize_experts_module(module, config) == ["gate_up_proj", "down_proj"]
    for name, w in weights.items():
        packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
        assert torch.equal(module._parameters[f"{name}_packed"], packed.view(-1))
        qt = module.quantized(name)
        if double_quant:
            assert qt.offset == state.offset.item() and torch.equal(qt.absmax2, state.state2.absmax)
            assert (qt.absmax.int() - state.absmax.int()).abs().max() <= 1   # bnb's CPU 8-bit LUT: off by one
        else:
            assert torch.equal(qt.absmax, state.absmax)
        assert module.dequantized(name).dtype == torch.bfloat16 and module.dequantized(name).shape == w.shape
        assert torch.equal(module.dequantized(name), dequantize(quantize(w, quant_type, 64, double_quant),
                                                                torch.bfloat16))
        assert all(not p.requires_grad and p.dtype == torch.uint8 for p in module.parameters())


@pytest.mark.parametrize("model_type", ARCHS)
def test_loss_and_input_gradients_equal_the_dequantized_model(model_type, device, monkeypatch):
    model = tiny_moe(model_type)
    ref = copy.deepcopy(model).to(device)
    model.to(device)
    for path, module in experts_modules(model).items():
        quantize_experts_module(module, CFG)       # on the device: its kernels; the reference holds what they give
        for name in module._qds_weights:
            experts_modules(ref)[path]._parameters[name].data = module.dequantized(name)
    ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(1)).to(device)
    loss, grad = loss_and_grad(model, ids)
    ref_loss, ref_grad = loss_and_grad(ref, ids)
    assert loss == ref_loss and torch.equal(grad, ref_grad) and grad.abs().sum() > 0
    with torch.no_grad():       # the eval path (no checkpoint) computes the same
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
        # one token reaches 2 of the 4 experts: only they are dequantized (not Llama-4's, which routes inside)
        from qlora_ds.nn.quantized_experts import QuantizedExperts
        read = []
        few = QuantizedExperts._dequantized_experts
        monkeypatch.setattr(QuantizedExperts, "_dequantized_experts",
                            lambda self, name, hit, dtype: read.append(hit.numel()) or few(self, name, hit, dtype))
        assert torch.equal(model(input_ids=ids[:1, :1]).logits, ref(input_ids=ids[:1, :1]).logits)
        assert read == ([] if model_type == "llama4_text" else [2, 2] * 2)
    if device.type == "cuda":   # the CUDA kernels give the CPU's values
        cpu = {p: m.dequantized(n).cpu() for p, m in experts_modules(model).items() for n in m._qds_weights}
        assert all(torch.equal(w, dequantize(quantize(w0, "nf4"), w0.dtype)) for w, w0 in
                   zip(cpu.values(), (experts_modules(tiny_moe(model_type))[p]._parameters[n].detach()
                                      for p, m in experts_modules(model).items() for n in m._qds_weights)))


@pytest.mark.parametrize("grouped", [False, True])
def test_nothing_of_the_experts_is_kept_for_backward(grouped, monkeypatch):
    """The checkpointed call keeps its inputs only: no dequantized weight, no expert activation (the unquantized
    layer keeps the expert outputs, index tensors and gathered routing weights: moe.py's per-token terms). Run one
    expert at a time (``grouped``), each group's checkpoint keeps the shared hidden states, not its slots' rows."""
    from qlora_ds.nn import quantized_experts as qe
    if grouped:
        monkeypatch.setattr(qe, "DEQUANT_LIMIT", 1)
    model = tiny_moe("qwen3_moe", layers=1)
    layer = model.model.layers[0]
    ref = with_dequantized_experts(layer.mlp, CFG)
    quantize_experts_module(layer.mlp.experts, CFG)
    x = torch.randn(1, 12, 64, requires_grad=True)

    def saved(mlp):
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            out = mlp(x)
        return kept, out

    kept, out = saved(layer.mlp)
    ref_kept, ref_out = saved(ref)
    shapes = {tuple(t.shape) for t in kept}
    assert not shapes & {(4, 128, 64), (4, 64, 64), (128, 64), (64, 64)}            # no expert weight, no slice
    router = layer.mlp.gate.weight            # (4, 64): F.linear may keep it or a copy of it
    assert not [t.shape for t in kept if t.is_floating_point() and t.shape[-1] == 64 and t.numel() != 12 * 64
                and not (t.shape == router.shape and torch.equal(t, router))]      # no copy of the slots' rows
    assert sum(t.numel() for t in kept) < sum(t.numel() for t in ref_kept) / 2
    out.sum().backward()
    grad = x.grad.clone()
    x.grad = None
    ref_out.sum().backward()
    if grouped:     # the groups gather their rows into new tensors, and MKL's fp32 GEMM on AVX2 rounds by alignment
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grad, x.grad, rtol=1e-5, atol=1e-7)
    else:
        assert torch.equal(grad, x.grad) and torch.equal(out, ref_out)
    assert not any(p.grad is not None for p in layer.mlp.experts.parameters())


def test_back_to_16_bit_and_meta_skeletons():
    model = tiny_moe("mixtral", torch.bfloat16, layers=1)
    module = model.model.layers[0].mlp.experts
    cls = type(module)
    quantize_experts_module(module, CFG)
    want = {n: module.dequantized(n) for n in ("gate_up_proj", "down_proj")}
    assert type(module).__name__ == "QuantizedMixtralExperts" and torch.equal(module.gate_up_proj,
                                                                             want["gate_up_proj"])
    assert quantize_experts_module(module, CFG) == []          # already quantized: left as it is
    dequantize_experts_module(module)
    assert type(module) is cls and not is_quantized_experts(module)
    assert sorted(n for n, _ in module.named_parameters()) == ["down_proj", "gate_up_proj"]
    assert all(torch.equal(module._parameters[n], w) and module._parameters[n].dtype == torch.bfloat16
               for n, w in want.items())
    # a meta skeleton gets meta parts of the sizes quantize writes, filled by set_quantized
    with torch.device("meta"):
        skeleton = copy.deepcopy(module).to("meta")
    quantize_experts_module(skeleton, CFG)
    real = copy.deepcopy(module)
    quantize_experts_module(real, CFG)
    assert {n: (p.shape, p.dtype) for n, p in skeleton.named_parameters()} == \
        {n: (p.shape, p.dtype) for n, p in real.named_parameters()}
    assert all(p.is_meta for p in skeleton.parameters())
    for name in ("gate_up_proj", "down_proj"):
        skeleton.set_quantized(name, real.quantized(name))
    assert all(torch.equal(a, b) for a, b in zip(skeleton.parameters(), real.parameters()))
    with pytest.raises(QLoRADSError, match="quant_type, blocksize"):
        skeleton.set_quantized("down_proj", quantize(want["down_proj"], "fp4"))


def test_inject_quantizes_experts_by_default_and_qalora_leaves_them(caplog):
    model = tiny_moe("qwen3_moe")
    with caplog.at_level(logging.INFO, logger="qlora_ds.inject.replace"):
        inject(model, CFG)
    assert all(is_quantized_experts(m) for m in experts_modules(model).values())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("2 MoE experts modules stored in NF4" in r.getMessage() for r in caplog.records)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n in dict(model.named_parameters()) if ".lora_A." in n or ".lora_B." in n}
    caplog.clear()
    model = tiny_moe("qwen3_moe")
    with caplog.at_level(logging.WARNING, logger="qlora_ds.inject.replace"):
        inject(model, QALoRAConfig(r=4, group_size=32, compute_dtype=torch.float32))
    assert not any(is_quantized_experts(m) for m in experts_modules(model).values())
    assert "QA-LoRA quantizes linear layers only" in caplog.records[0].getMessage()
    with pytest.raises(QLoRADSError, match="quantize_experts"):
        QLoRAConfig(quantize_experts="yes")


def test_the_adapter_records_4bit_experts_and_the_merge_writes_them_dequantized(tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    from qlora_ds.adapters.merge import adapter_config_from_dir, export_merged, merge_model
    from qlora_ds.inject import save_adapter
    model = tiny_moe("qwen3_moe")
    inject(model, CFG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    save_adapter(model, str(tmp_path / "adapter"))
    assert adapter_config_from_dir(str(tmp_path / "adapter"), torch.float32).quantize_experts
    side = tmp_path / "adapter" / "qlora_ds.json"     # a file from before 4-bit experts: they were 16-bit
    old = json.loads(side.read_text())
    del old["quantize_experts"]
    side.write_text(json.dumps(old))
    assert not adapter_config_from_dir(str(tmp_path / "adapter"), torch.float32).quantize_experts
    merge_model(model, torch.float32)
    assert not any(is_quantized_experts(m) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, want, rtol=0, atol=1e-5)
    export_merged(model, str(tmp_path / "merged"), dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, want, rtol=0, atol=1e-5)


def test_only_experts_classes_are_quantized_and_llama4s_router_is_no_projection():
    """A Conv1d's 3-D weight (Qwen3-Next's, Jamba's conv) is no expert weight; Llama-4's router subclasses nn.Linear
    but returns (scores, indices): inject leaves it alone and the model still runs."""
    assert expert_weight_names(torch.nn.Conv1d(4, 4, 3)) == []
    model = tiny_moe("llama4_text")
    paths = inject(model, CFG)
    router = model.model.layers[0].feed_forward.router
    assert type(router).__name__ == "Llama4Router" and not any(p.endswith(".router") for p in paths)
    assert is_quantized_experts(model.model.layers[0].feed_forward.experts)
    ids = torch.randint(1, 128, (1, 8), generator=torch.Generator().manual_seed(3))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("grouped", [False, True])
def test_inside_the_models_checkpointing_the_experts_run_twice_not_three_times(grouped, monkeypatch):
    """Under the decoder layers' own non-reentrant checkpoint (finetune's gradient checkpointing) the experts' nested
    checkpoint costs no third run (torch recomputes a nested non-reentrant checkpoint with its outer one): forward +
    one recompute, with the gradients of the run without the model's checkpointing. Run in groups, each group's
    checkpoint likewise, but the layer's recompute replays the groups before the last (counted by the planner)."""
    from qlora_ds.nn import quantized_experts as qe
    from qlora_ds.nn.quantized_experts import QuantizedExperts
    model = tiny_moe("qwen3_moe")
    inject(model, CFG)
    runs = []
    name = "_forward_slots" if grouped else "_forward_dequantized"
    base = getattr(QuantizedExperts, name)
    monkeypatch.setattr(QuantizedExperts, name, lambda self, *a, **k: runs.append(1) or base(self, *a, **k))
    if grouped:
        monkeypatch.setattr(qe, "DEQUANT_LIMIT", 1)
    ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(4))
    grads = {}
    for name, m, ckpt in (("plain", model, False), ("ckpt", model, True)):
        m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False}) if ckpt else None
        m.train()
        runs.clear()
        grads[name] = loss_and_grad(m, ids)[1]
        # 2 layers: forward + one recompute each (3 with both checkpoints). In 4 groups of one expert (all reached),
        # the layer's recompute also replays the 3 groups before the last one's checkpoint: torch's nested checkpoint
        # stops at the last input it saved (what plan/scaling.py counts)
        assert len(runs) == 2 * (4 + 4 + (3 if ckpt else 0) if grouped else 2)
    assert torch.equal(grads["plain"], grads["ckpt"]) and grads["plain"].abs().sum() > 0


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "gpt_oss"])
@pytest.mark.parametrize("group", [1, 3])
def test_a_layer_above_the_dequant_limit_runs_its_experts_in_groups(model_type, group, monkeypatch, device):
    """With DEQUANT_LIMIT at ``group`` experts' weights, no call dequantizes more experts than that — in forward and
    in backward's recomputation — and the loss and input gradients equal the whole-layer model's (the reference
    holding the dequantized weights); routing weights get their gradient through the grouped slots too."""
    from qlora_ds.nn import quantized_experts as qe
    model = tiny_moe(model_type)
    ref = with_dequantized_experts(model, CFG).to(device)
    model.to(device)
    for module in experts_modules(model).values():
        quantize_experts_module(module, CFG)
    experts = next(iter(experts_modules(model).values()))
    per_expert = sum(4 * s[1] * s[2] for s, _ in experts._qds_weights.values())     # fp32 compute
    monkeypatch.setattr(qe, "DEQUANT_LIMIT", group * per_expert + per_expert // 2)
    assert experts._group_size(torch.float32) == group
    read, whole = [], qe.QuantizedExperts.dequantized
    few = qe.QuantizedExperts._dequantized_experts
    monkeypatch.setattr(qe.QuantizedExperts, "_dequantized_experts",
                        lambda self, name, hit, dtype: read.append(qe._count(hit)) or few(self, name, hit, dtype))
    monkeypatch.setattr(qe.QuantizedExperts, "dequantized",
                        lambda self, name, dtype=None: read.append(4) or whole(self, name, dtype))
    ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(1)).to(device)
    loss, grad = loss_and_grad(model, ids)
    ref_loss, ref_grad = loss_and_grad(ref, ids)
    assert read and max(read) == group and len(read) >= 2 * 2 * 2 * (4 // group)  # 2 layers x 2 weights, fwd + bwd
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
    assert grad.abs().sum() > 0
    # the router's gradient (its weights scale each slot's output) flows through the grouped slots too
    gate = [m for n, m in model.named_modules() if n.endswith("mlp.gate") or n.endswith("mlp.router")][0]
    ref_gate = [m for n, m in ref.named_modules() if n.endswith("mlp.gate") or n.endswith("mlp.router")][0]
    for m in (gate, ref_gate):
        m.weight.requires_grad_(True)
    model(input_ids=ids, labels=ids).loss.backward()
    ref(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(gate.weight.grad, ref_gate.weight.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("limit", [1 << 40, 1])
def test_a_call_with_no_tokens_returns_no_rows(limit, monkeypatch):
    """An empty batch (a rank's empty shard, an empty routing) gives the unquantized module's empty output, on the
    whole-layer and the grouped path (the routing probe once indexed the last of no experts)."""
    from qlora_ds.nn import quantized_experts as qe
    monkeypatch.setattr(qe, "DEQUANT_LIMIT", limit)
    experts = experts_modules(tiny_moe("qwen3_moe", layers=1))["model.layers.0.mlp.experts"]
    args = (torch.zeros(0, 64), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    ref = experts(*args)
    quantize_experts_module(experts, CFG)
    out = experts(*args)
    assert out.shape == ref.shape == (0, 64)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_groups_of_experts_with_gaps_between_them(model_type, monkeypatch):
    """Tokens reaching experts {0, 2, 3} in groups of two: the group (0, 2) is no run of experts (its parts are
    gathered), the group (3,) is one (its parts are views); outputs and gradients equal the whole layer's."""
    from qlora_ds.nn import quantized_experts as qe
    experts = experts_modules(tiny_moe(model_type, layers=1))["model.layers.0.mlp.experts"]
    quantize_experts_module(experts, CFG)
    per_expert = sum(4 * s[1] * s[2] for s, _ in experts._qds_weights.values())
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(6, 64, generator=gen, requires_grad=True)
    index = torch.tensor([[0, 2], [3, 0], [2, 3], [0, 3], [2, 0], [3, 2]])
    weights = torch.rand(6, 2, generator=gen).requires_grad_(True)
    runs = []
    for limit in (1 << 40, 2 * per_expert):
        monkeypatch.setattr(qe, "DEQUANT_LIMIT", limit)
        out = experts(hidden, index, weights)
        runs.append((out.detach(), *torch.autograd.grad(out.square().sum(), (hidden, weights))))
    assert experts._group_size(torch.float32) == 2
    for whole, grouped in zip(*runs):
        torch.testing.assert_close(grouped, whole, rtol=1e-5, atol=1e-6)
