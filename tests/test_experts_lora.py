"""LoRA on 4-bit fused MoE experts (QLoRAConfig.lora_experts, qlora_ds.nn.experts_lora): PEFT's target_parameters
layout both ways (our file loads in PEFT with the same logits, a PEFT-trained file loads into ours), the update on the
few-experts path, gradients only to the adapters, merge, the loader and the config's refusals."""
import copy
import json

import pytest
import torch

from qlora_ds.adapters import load_adapter, save_adapter
from qlora_ds.adapters.merge import merge_model
from qlora_ds.errors import QLoRADSError
from qlora_ds.inject import inject
from qlora_ds.inject.replace import lora_parameters
from qlora_ds.nn import QLoRAConfig, QLoRALinear
from qlora_ds.nn.quantized_experts import is_quantized_experts

from .test_quantized_experts import tiny_moe, with_dequantized_experts

CFG = QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32, lora_experts=True)
IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 17, 100, 3, 44, 8, 120]])


def quantized(model_type: str, config=CFG):
    model = tiny_moe(model_type).eval()
    inject(model, config)
    return model


def peft_base(model_type: str, ours, config=CFG):
    """What PEFT sees: the same model in fp32 holding our dequantized linear and expert weights."""
    base = with_dequantized_experts(tiny_moe(model_type).eval(), config)
    with torch.no_grad():
        for path, m in ours.named_modules():
            if isinstance(m, QLoRALinear):
                base.get_submodule(path).weight.copy_(m.dequantized_weight(torch.float32))
    return base


def randomize(model, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in lora_parameters(model).items():
            if "lora_B" in name:
                p.normal_(std=0.05)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss", "llama4_text"])
def test_our_experts_adapter_loads_in_peft(tmp_path, model_type, device):
    """On ``--device cuda`` (the GPU check) the experts dequantize with the CUDA kernels and fold B·A there."""
    from peft import PeftModel
    ours = quantized(model_type).to(device)
    ids = IDS.to(device)
    experts = [m for m in ours.modules() if is_quantized_experts(m)]
    names = list(experts[0]._qds_lora)
    assert len(names) == 2 and all(experts[0]._parameters[f"{n}_lora_A"].requires_grad for n in names)
    randomize(ours)
    save_adapter(ours, str(tmp_path / "ad"))
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == sorted(f"model.layers.{i}.mlp.experts.{n}" if model_type != "llama4_text"
                                              else f"model.layers.{i}.feed_forward.experts.{n}"
                                              for i in range(2) for n in names)
    assert cfg["lora_dropout"] == 0.0
    theirs = PeftModel.from_pretrained(peft_base(model_type, ours).to(device), str(tmp_path / "ad")).eval()
    with torch.no_grad():
        want = theirs(ids).logits
        torch.testing.assert_close(ours(ids).logits, want, rtol=1e-4, atol=1e-4)
        with theirs.disable_adapter():
            plain = theirs(ids).logits
    assert (want - plain).abs().max() > 1e-3        # the experts' adapters matter


def test_peft_trained_experts_adapter_loads_into_ours(tmp_path):
    from peft import LoraConfig, get_peft_model
    ours = quantized("qwen3_moe")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    theirs = get_peft_model(peft_base("qwen3_moe", ours), LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    opt = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        loss = theirs(IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    theirs.eval().save_pretrained(str(tmp_path / "peft"))
    loaded = load_adapter(ours, str(tmp_path / "peft"))
    assert "model.layers.0.mlp.experts" in loaded and "model.layers.0.mlp.experts.base_layer" in loaded
    assert "model.layers.0.mlp.gate.lora_A" not in json.dumps(loaded)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, rtol=1e-4, atol=1e-4)


def test_few_experts_path_carries_the_update_and_grads_reach_only_adapters():
    """One token reaches 2 of 4 experts: the few-experts path (only those dequantized) must add their LoRA update
    too — the same output as the all-experts path; backward fills only LoRA gradients."""
    ours = quantized("qwen3_moe")
    randomize(ours)
    experts = ours.model.layers[0].mlp.experts
    hidden = torch.randn(1, 64)
    index = torch.tensor([[3, 1]])
    weights = torch.tensor([[0.6, 0.4]])
    few = experts(hidden, index, weights)
    assert experts._routed((hidden, index, weights), {}, 4) is not None
    everyone = experts(hidden.expand(3, 64), torch.tensor([[3, 1], [0, 2], [1, 0]]), weights.expand(3, 2))
    torch.testing.assert_close(few[0], everyone[0], rtol=1e-5, atol=1e-5)
    loss = ours(IDS, labels=IDS).loss
    loss.backward()
    grads = {n for n, p in ours.named_parameters() if p.grad is not None}
    assert grads == set(lora_parameters(ours)) and "model.layers.1.mlp.experts.down_proj_lora_B" in grads
    assert all(not p.requires_grad for n, p in ours.named_parameters() if n not in grads)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_grouped_experts_carry_the_update_and_its_gradients(model_type, monkeypatch):
    """A layer above the dequantization limit runs its experts one at a time: each group adds its own experts'
    LoRA update, and the adapters' gradients equal the whole-layer run's."""
    from qlora_ds.nn import quantized_experts as qe
    ours = quantized(model_type)
    randomize(ours)

    def run():
        for p in lora_parameters(ours).values():
            p.grad = None
        loss = ours(IDS, labels=IDS).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in lora_parameters(ours).items()}

    loss, grads = run()
    monkeypatch.setattr(qe, "DEQUANT_LIMIT", 1)
    assert ours.model.layers[0].mlp.experts._group_size(torch.float32) == 1
    grouped_loss, grouped = run()
    torch.testing.assert_close(grouped_loss, loss, rtol=1e-6, atol=0)
    assert grads.keys() == grouped.keys() and any("experts.gate_up_proj_lora_A" in n for n in grads)
    for n in grads:
        torch.testing.assert_close(grouped[n], grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_merge_writes_the_experts_update(tmp_path):
    ours = quantized("gpt_oss")
    randomize(ours)
    with torch.no_grad():
        want = ours(IDS).logits
    merged = merge_model(ours, dtype=torch.float32)
    experts = merged.model.layers[0].mlp.experts
    assert not is_quantized_experts(experts) and experts.gate_up_proj.dtype == torch.float32
    assert not any("lora" in n for n, _ in experts.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lora", [True, False])
def test_merge_builds_the_experts_a_group_at_a_time(lora, monkeypatch):
    """Above the dequantization limit the merge builds each weight a group of experts at a time (the fp32 transient
    bounded as in training): the same bytes as the whole-layer merge, with and without the experts' LoRA."""
    import copy as _copy

    from qlora_ds.nn import quantized_experts as qe
    from qlora_ds.nn.quantized_experts import dequantize_experts_module
    ours = quantized("gpt_oss", CFG if lora else QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32))
    randomize(ours)
    whole, grouped = (_copy.deepcopy(ours.model.layers[0].mlp.experts) for _ in range(2))
    built = []
    part = qe.QuantizedExperts._dequantized_experts
    monkeypatch.setattr(qe.QuantizedExperts, "_dequantized_experts",
                        lambda self, name, hit, dtype: built.append(qe._count(hit)) or part(self, name, hit, dtype))
    dequantize_experts_module(whole, torch.bfloat16)
    assert not built
    monkeypatch.setattr(qe, "DEQUANT_LIMIT", 1)
    dequantize_experts_module(grouped, torch.bfloat16)
    assert built == [1] * 8            # 4 experts, 2 weights
    for name in ("gate_up_proj", "down_proj"):
        got, want = grouped._parameters[name], whole._parameters[name]
        assert got.dtype == torch.bfloat16 and torch.equal(got, want), name


def test_config_refusals_and_mismatched_files(tmp_path):
    with pytest.raises(QLoRADSError, match="dropout=0"):
        QLoRAConfig(dropout=0.1, lora_experts=True)
    with pytest.raises(QLoRADSError, match="quantize_experts=True"):
        QLoRAConfig(dropout=0.0, lora_experts=True, quantize_experts=False)
    ours = quantized("qwen3_moe")
    randomize(ours)
    save_adapter(ours, str(tmp_path / "ad"))
    plain = quantized("qwen3_moe", QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32))
    before = copy.deepcopy(plain.state_dict())
    with pytest.raises(QLoRADSError, match="lora_experts=True"):
        load_adapter(plain, str(tmp_path / "ad"))
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())


def test_loader_builds_experts_lora(tmp_path):
    """from_pretrained on a MoE checkpoint with lora_experts: the adapters exist, trainable, A random and B zero
    (so the model computes the base), and the quantized checkpoint it saves holds no LoRA tensor."""
    from safetensors import safe_open

    from qlora_ds.inject import from_pretrained, save_quantized
    model = tiny_moe("qwen3_moe")
    model.save_pretrained(tmp_path / "ckpt")
    ours = from_pretrained(str(tmp_path / "ckpt"), CFG, torch_dtype=torch.float32)
    lora = lora_parameters(ours)
    experts_lora = {n: p for n, p in lora.items() if "experts" in n}
    assert len(experts_lora) == 8 and all(p.requires_grad and p.dtype == torch.float32 for p in lora.values())
    assert all((p.abs().sum() > 0) == n.endswith("_lora_A") for n, p in experts_lora.items())
    ref = with_dequantized_experts(model, CFG)
    inject(ref, QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32, quantize_experts=False))
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, ref(IDS).logits, rtol=1e-4, atol=1e-4)
    save_quantized(ours, str(tmp_path / "q"))
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k]
