"""Policies and in-place replacement on tiny random models of every supported architecture."""
import dataclasses
import logging

import pytest
import torch
import torch.nn as nn

from qlora_ds.errors import QLoRADSError
from qlora_ds.inject import GENERIC, inject, lora_parameters, policy_for
from qlora_ds.inject.replace import float_weight, is_linear_like
from qlora_ds.nn import QLoRAConfig, QLoRALinear
from qlora_ds.quant import quantize

from .tiny_models import EXPECTED, tiny_model

CFG = QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32)


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_policy_wraps_exactly_the_intended_linears(arch):
    model = tiny_model(arch)
    linears = {n for n, m in model.named_modules() if is_linear_like(m)}
    wrapped = set(inject(model, CFG))
    assert {w.rsplit(".", 1)[-1] for w in wrapped} == EXPECTED[arch]
    assert len(wrapped) >= len(EXPECTED[arch]) * model.config.num_hidden_layers
    assert linears - wrapped == {"lm_head"}
    assert isinstance(model.get_submodule("lm_head"), nn.Linear)
    assert policy_for(model.config.model_type) is not GENERIC
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_parameters(model)) and len(trainable) == 2 * len(wrapped)


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_fresh_adapter_logits_equal_dequantized_original(arch, device):
    model, ref = tiny_model(arch).to(device), tiny_model(arch).to(device)     # quantized on the device
    with torch.no_grad():   # the reference: the original model with its targets replaced by deq(quant(W))
        for path, mod in ref.named_modules():
            if path in {p for p, m in model.named_modules() if is_linear_like(m) and p != "lm_head"}:
                deq = quantize(float_weight(mod)).dequantize(torch.float32)
                mod.weight.copy_(deq if isinstance(mod, nn.Linear) else deq.t())
    inject(model, CFG)
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0)).to(device)
    assert all(p.device == x.device for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["mamba", "falcon_mamba", "jamba"])
def test_mamba_mixers_keep_dt_proj_16bit_and_train(arch):
    """Mamba-1 mixers (Mamba, Falcon-Mamba, Jamba) multiply by ``dt_proj.weight`` itself: it stays an nn.Linear,
    every other projection is wrapped; logits equal the original with deq(quant(W)) in the wrapped layers, and
    a backward reaches every LoRA factor."""
    model, ref = tiny_model(arch), tiny_model(arch)
    wrapped = set(inject(model, dataclasses.replace(CFG, quantize_experts=False)))   # Jamba's experts: 16 bit here
    leaves = {p.rsplit(".", 1)[-1] for p in wrapped}
    assert {"in_proj", "x_proj", "out_proj"} <= leaves and "dt_proj" not in leaves
    if arch == "jamba":
        assert {"q_proj", "o_proj", "gate_proj", "down_proj"} <= leaves
    assert all(isinstance(m, nn.Linear) and m.weight.dtype == torch.float32
               for p, m in model.named_modules() if p.endswith("dt_proj"))
    assert policy_for(model.config.model_type) is not GENERIC
    with torch.no_grad():
        for path in wrapped:
            mod = ref.get_submodule(path)
            mod.weight.copy_(quantize(float_weight(mod)).dequantize(torch.float32))
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=1e-5, atol=1e-5)
    model.train()
    model(x, labels=x).loss.backward()
    assert all(p.grad is not None for p in lora_parameters(model).values())


def test_gpt2_conv1d_is_transposed(device):
    model = tiny_model("gpt2").to(device)
    conv = model.transformer.h[0].mlp.c_fc
    w = conv.weight.detach().clone()                     # (in, out)
    inject(model, CFG)
    layer = model.transformer.h[0].mlp.c_fc
    assert isinstance(layer, QLoRALinear) and tuple(layer.weight_shape) == (w.shape[1], w.shape[0])
    assert torch.equal(layer.weight, quantize(w.t().contiguous()).packed)


def test_unknown_architecture_uses_generic_policy_and_logs_once(caplog):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    model.add_module("lm_head", nn.Linear(32, 16))
    with caplog.at_level(logging.INFO, logger="qlora_ds.inject.replace"):
        wrapped = inject(model, CFG)
    assert wrapped == ["0", "2"] and isinstance(model.lm_head, nn.Linear)
    lines = [r.getMessage() for r in caplog.records if "generic policy" in r.getMessage()]
    assert len(lines) == 1 and "0, 2" in lines[0]


def test_user_target_modules_override_the_policy():
    model = tiny_model("llama")
    wrapped = inject(model, QLoRAConfig(r=4, target_modules=r".*\.self_attn\.(q|v)_proj"))
    assert sorted({w.rsplit(".", 1)[-1] for w in wrapped}) == ["q_proj", "v_proj"] and len(wrapped) == 4
    with pytest.raises(QLoRADSError, match="no linear layer"):
        inject(tiny_model("llama"), QLoRAConfig(r=4, target_modules=("nonexistent",)))


def test_meta_skeleton_stays_meta():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 64))
    inject(model, CFG)
    assert model[0].weight.is_meta and model[0].lora_A.weight.is_meta


def _tiny_moe(arch):
    import transformers as tf
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              num_experts_per_tok=2, vocab_size=128)
    if arch == "mixtral":
        config = tf.MixtralConfig(num_local_experts=4, **kw)
    else:
        config = tf.Qwen2MoeConfig(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=64, **kw)
    return tf.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_moe_fused_experts_stay_16bit_with_one_warning(arch, caplog):
    """With quantize_experts=False (tests/test_quantized_experts.py: the default, 4 bit)."""
    model = _tiny_moe(arch)
    total = sum(p.numel() for p in model.parameters())
    left = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n or n.endswith(".mlp.gate.weight"))
    with caplog.at_level(logging.INFO, logger="qlora_ds.inject.replace"):
        wrapped = inject(model, dataclasses.replace(CFG, quantize_experts=False))
    want = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
    if arch == "qwen2_moe":    # the shared expert's projections are wrapped, its one-output gate is not
        want |= {"mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj"}
        gate = model.model.layers[0].mlp.shared_expert_gate
        assert type(gate) is nn.Linear and gate.weight.dtype == torch.float32 and not gate.weight.requires_grad
    assert {w.split(".", 3)[-1] for w in wrapped} == want and len(wrapped) == 2 * len(want)
    experts = model.model.layers[1].mlp.experts
    assert experts.gate_up_proj.dim() == 3 and experts.gate_up_proj.dtype == torch.float32
    assert not experts.gate_up_proj.requires_grad
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and 0.3 < left / total < 0.9
    assert f"{100 * left / total:.0f}% of this model's parameters" in warnings[0]
    assert "model.layers.*.mlp.experts (gate_up_proj, down_proj)" in warnings[0] and "stay in 16 bit" in warnings[0]
    assert "quantize_experts=False keeps the fused MoE experts in 16 bit" in warnings[0]


def test_dense_models_and_one_output_gates_raise_no_warning(caplog):
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 1))
    with caplog.at_level(logging.WARNING, logger="qlora_ds.inject.replace"):
        assert inject(model, CFG) == ["0"] and inject(tiny_model("llama"), CFG)
    assert type(model[1]) is nn.Linear and not caplog.records
    assert inject(nn.Sequential(nn.Linear(64, 1)), QLoRAConfig(r=4, target_modules=("0",))) == ["0"]  # if asked


def _tiny_gemma3():
    """What AutoModelForCausalLM builds for Gemma-3 4B+: a text model plus a SigLIP vision tower and projector."""
    import transformers as tf
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=300)
    vision = dict(hidden_size=32, intermediate_size=72, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)      # with the pooling head: its 3-D ``probe`` is no MoE expert
    config = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=299,
                             boi_token_index=297, eoi_token_index=298)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config)


def test_multimodal_towers_and_projectors_stay_16bit(caplog):
    """Text-only finetuning: the generic policy leaves the vision tower and the projector alone (SigLIP's fc2 has
    in_features 4304 in the real model, which QA-LoRA's group sizes 32/64/128 do not divide)."""
    from qlora_ds.nn import QALoRAConfig

    model = _tiny_gemma3()
    text = {n for n, m in model.named_modules() if is_linear_like(m) and ".language_model." in n}
    other = {n: m for n, m in model.named_modules() if is_linear_like(m) and not n.startswith("model.language_model.")}
    assert len(other) > 8 and "model.vision_tower.encoder.layers.0.mlp.fc2" in other
    with caplog.at_level(logging.WARNING, logger="qlora_ds.inject.replace"):
        assert set(inject(model, CFG)) == text
    assert all(model.get_submodule(n) is m for n, m in other.items())        # not replaced
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "model.multi_modal_projector (mm_input_projection_weight)" in warnings[0]
    assert "model.vision_tower.head (probe)" in warnings[0]
    assert "MoE" not in warnings[0] and "Only linear layers are quantized" in warnings[0]
    assert set(inject(_tiny_gemma3(), QALoRAConfig(r=4, group_size=32, compute_dtype=torch.float32))) == text
    # a user's target_modules still reaches the tower
    assert inject(_tiny_gemma3(), QLoRAConfig(r=4, target_modules=r".*vision_tower.encoder.*fc2")) == \
        ["model.vision_tower.encoder.layers.0.mlp.fc2"]


@pytest.mark.parametrize("bits", [4, 8])
def test_model_loaded_by_bitsandbytes_is_refused_with_the_loader_advice(bits, tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_model("llama", dtype=torch.bfloat16).save_pretrained(tmp_path)
    bnb = BitsAndBytesConfig(load_in_4bit=True) if bits == 4 else BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bnb, dtype=torch.bfloat16)
    kind = "Linear4bit" if bits == 4 else "Linear8bitLt"
    with pytest.raises(QLoRADSError, match=rf"model.layers.0.self_attn.q_proj is already quantized \({kind}.*"
                                           rf"qlora_ds.from_pretrained\(dir, QLoRAConfig\(...\)\)"):
        inject(model, CFG)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == kind        # nothing was replaced
