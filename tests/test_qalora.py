"""QA-LoRA: INT-N format, exact merge into the zero points, GPTQ export layout, bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from qlora_ds.errors import QLoRADSError
from qlora_ds.nn import QALoRAConfig, QALoRALinear
from qlora_ds.quant import intn


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_roundtrip_and_quant_error(bits):
    torch.manual_seed(0)
    codes = torch.randint(0, 2 ** bits, (5, 64), dtype=torch.uint8)
    packed = intn.pack(codes, bits)
    assert packed.shape == (5, 64 * bits // 8)
    assert torch.equal(intn.unpack(packed, bits, 64), codes)
    w = torch.randn(16, 64)
    qt = intn.quantize(w, bits, 32)
    step = qt.scales.repeat_interleave(32, dim=1)
    assert ((qt.dequantize() - w).abs() <= 0.5 * step + 1e-6).all()     # round to nearest
    assert torch.equal(qt.zeros, qt.zeros.round())                      # integer zeros before any merge
    const = intn.quantize(torch.full((2, 32), 0.25), bits, 32)           # constant group: exact, no /0
    assert torch.equal(const.dequantize(), torch.full((2, 32), 0.25))


def _trained(bits, group_size, dtype=torch.float32, in_f=128, out_f=64, pool="mean"):
    torch.manual_seed(bits * 100 + group_size)
    cfg = QALoRAConfig(bits=bits, group_size=group_size, pool=pool, r=8, alpha=16, dropout=0.0, compute_dtype=dtype)
    layer = QALoRALinear.from_linear(nn.Linear(in_f, out_f), cfg)
    nn.init.normal_(layer.lora_B.weight, std=0.2)
    return layer


@pytest.mark.parametrize("pool", ["mean", "sum"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64])
def test_merge_is_exact_and_keeps_codes(bits, group_size, pool):
    """fp32 compute: merged and un-merged differ only by fp32 rounding of the zero point and of the two
    matmul orders; with |y| ~ 10 and 128-term sums that is ~1e-5 relative, we allow 1e-5·max|y|+1e-5."""
    layer = _trained(bits, group_size, pool=pool)
    if pool == "sum":                        # same adapter function scale as the mean case
        layer.lora_A.weight.data /= group_size
    x = torch.randn(4, 7, 128)
    y = layer(x)
    assert (y - layer(x).detach()).abs().max() == 0
    merged = layer.merge()
    assert not merged.has_adapter and not any(p.requires_grad for p in merged.parameters())
    assert torch.equal(merged.quantized_weight().codes(), layer.quantized_weight().codes())
    assert torch.equal(merged.scales, layer.scales)
    assert not torch.equal(merged.zeros, layer.zeros)
    ym = merged(x)
    assert (ym - y).abs().max().item() <= 1e-5 * y.abs().max().item() + 1e-5
    # the adapter really mattered (else the test proves nothing)
    layer.disable_adapter = True
    assert (layer(x) - y).abs().max().item() > 1e3 * (ym - y).abs().max().item()


def test_merge_bf16_compute():
    """bf16 compute: both paths round the weight and the output to bf16 (eps 2^-8), so they agree to a
    few bf16 ulps of the output scale."""
    layer = _trained(4, 32, dtype=torch.bfloat16)
    x = torch.randn(8, 128)
    y, ym = layer(x), layer.merge()(x)
    assert (ym - y).abs().max().item() <= 4 * 2 ** -8 * y.abs().max().item()


@pytest.mark.parametrize("pool", ["mean", "sum"])
def test_backward_grads_only_for_adapter(pool):
    layer = _trained(3, 32, pool=pool)
    x = torch.randn(5, 128, requires_grad=True)
    w = layer.dequantized_weight()
    A = layer.lora_A.weight.detach().clone().requires_grad_(True)
    B = layer.lora_B.weight.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    pooled = xr.view(5, 4, 32).mean(-1) if pool == "mean" else xr.view(5, 4, 32).sum(-1)
    y_ref = xr @ w.T + layer.bias + layer.scaling * (pooled @ A.T) @ B.T
    y = layer(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.weight.grad, A.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.weight.grad, B.grad, rtol=1e-5, atol=1e-5)
    assert all(p.grad is None for p in (layer.qweight, layer.scales, layer.zeros, layer.bias))


def _gptq_dequantize(sd, bits, group_size):
    """Independent decoder written from AutoGPTQ's layout: bit stream along the input dim in int32 words,
    qzeros along the output dim storing zero - 1."""
    def codes_from_words(words, n):          # words int32 [rows, k] -> codes [rows, n]
        b = words.to(torch.int64) & 0xFFFFFFFF
        bitpos = torch.arange(n) * bits
        word, off = bitpos // 32, bitpos % 32
        lo = b[:, word] >> off
        hi = torch.where(off + bits > 32, b[:, (word + 1).clamp(max=b.shape[1] - 1)] << (32 - off), torch.zeros_like(lo))
        return (lo | hi) & (2 ** bits - 1)
    qweight, qzeros, scales, g_idx = sd["qweight"], sd["qzeros"], sd["scales"].float(), sd["g_idx"].long()
    in_f, out_f = qweight.shape[0] * 32 // bits, qweight.shape[1]
    q = codes_from_words(qweight.t(), in_f).t()                        # [in, out]
    z = codes_from_words(qzeros, out_f) + 1                            # [groups, out]
    return ((q - z[g_idx]) * scales[g_idx]).t()                        # [out, in]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_export_layout_and_error_report(bits):
    layer = _trained(bits, 32)
    plain = QALoRALinear.from_quantized(layer.quantized_weight(), layer.bias.detach(), layer.config, adapter=False)
    sd, report = plain.to_gptq_state_dict(scales_dtype=torch.float32)
    assert sd["qweight"].dtype == torch.int32 and sd["qweight"].shape == (128 * bits // 32, 64)
    assert sd["qzeros"].shape == (4, 64 * bits // 32) and sd["g_idx"].shape == (128,)
    w_gptq = _gptq_dequantize(sd, bits, 32)
    exact_rows = (plain.quantized_weight().zeros >= 1).all(dim=1)     # zero 0 is not representable (z - 1 = -1)
    torch.testing.assert_close(w_gptq[exact_rows], plain.dequantized_weight()[exact_rows], rtol=0, atol=1e-6)
    assert report["zeros_rounded"] == 0
    merged_sd, merged_report = layer.merge().to_gptq_state_dict()
    assert merged_report["zeros_rounded"] > 0 and merged_report["max_abs_error"] > 0
    with pytest.raises(QLoRADSError, match="merge"):
        layer.to_gptq_state_dict()


@pytest.mark.parametrize("pool", ["mean", "sum"])
def test_peft_file_is_peft_function_and_reloads_into_either_pool(tmp_path, pool):
    """The saved lora_A, run through PEFT's own QA-LoRA forward (mean · in/L), gives our layer's adapter
    output; the side file records the pool; the file loads into a layer of either pool with the same output."""
    import json
    from types import SimpleNamespace

    from peft.tuners.lora.variants import QALoraLinearVariant
    from safetensors.torch import load_file

    from qlora_ds.adapters.merge import adapter_config_from_dir
    from qlora_ds.adapters.peft_format import load_adapter, save_adapter

    layer = _trained(4, 32, pool=pool)
    model = nn.Sequential()
    model.add_module("proj", layer)
    save_adapter(model, str(tmp_path / "ad"))
    x = torch.randn(6, 128)
    ours = layer(x) - QALoRALinear.from_quantized(layer.quantized_weight(), layer.bias.detach(), layer.config,
                                                  adapter=False)(x)
    sd = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    peft_mod = SimpleNamespace(lora_A={"default": SimpleNamespace(weight=sd["base_model.model.proj.lora_A.weight"])},
                               lora_B={"default": SimpleNamespace(weight=sd["base_model.model.proj.lora_B.weight"])},
                               lora_dropout={"default": nn.Identity()}, scaling={"default": cfg["lora_alpha"] / cfg["r"]},
                               qalora_group_size={"default": cfg["qalora_group_size"]}, training=False, in_features=128)
    theirs = QALoraLinearVariant.forward(peft_mod, "default", x, torch.zeros(6, 64))
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "ad" / "qlora_ds.json").read_text())["layers"]["proj"]["pool"] == pool
    assert adapter_config_from_dir(str(tmp_path / "ad"), torch.float32).pool == pool
    y = layer(x)
    for target in ("mean", "sum"):
        fresh = nn.Sequential()
        fresh.add_module("proj", QALoRALinear.from_quantized(layer.quantized_weight(), layer.bias.detach(),
                                                             QALoRAConfig(bits=4, group_size=32, pool=target, r=8,
                                                                          alpha=16, dropout=0.0,
                                                                          compute_dtype=torch.float32)))
        load_adapter(fresh, str(tmp_path / "ad"))
        torch.testing.assert_close(fresh(x), y, rtol=1e-6, atol=1e-6)
        if target == pool:
            torch.testing.assert_close(fresh.proj.lora_A.weight, layer.lora_A.weight, rtol=2 ** -23, atol=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=5), "bits"), (dict(bits=8), "bits"), (dict(group_size=12), "group_size"), (dict(r=0), "rank"),
    (dict(pool="max"), "pool"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(QLoRADSError, match=match):
        QALoRAConfig(**kwargs)


def test_in_features_not_divisible_by_group_size():
    with pytest.raises(QLoRADSError, match="divisible"):
        QALoRALinear(100, 64, False, QALoRAConfig(group_size=32))
    with pytest.raises(QLoRADSError, match="divisible"):
        QALoRALinear.from_linear(nn.Linear(96, 8), QALoRAConfig(group_size=64))


def test_group_size_error_names_the_layer_and_the_sizes_that_divide_it():
    from qlora_ds.inject import inject

    model = nn.Sequential(nn.Linear(64, 40), nn.Linear(40, 8))
    with pytest.raises(QLoRADSError, match=r"layer 1: in_features=40 is not divisible by group_size=32; pick a group "
                                           r"size that divides it: 8, 40; or leave the layer out of target_modules"):
        inject(model, QALoRAConfig(group_size=32))
    assert all(type(m) is nn.Linear for m in model)              # checked before any layer was replaced
    with pytest.raises(QLoRADSError, match="in_features=4304 .* divides it: 8, 16$"):    # Gemma-3's SigLIP fc2
        QALoRALinear(4304, 8, False, QALoRAConfig(group_size=32), device="meta")
    with pytest.raises(QLoRADSError, match="in_features=100 .* no supported group size"):
        QALoRALinear(100, 8, False, QALoRAConfig(group_size=32), device="meta")
