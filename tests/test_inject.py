"""Policies and in-place replacement on tiny random models of every supported architecture."""
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
