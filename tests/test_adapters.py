"""PEFT-format adapters: our adapter loads in PEFT (same logits), a PEFT-trained adapter loads into our
layers (same logits), atomic writes, and mismatched adapters are refused with the model unchanged."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
import torch.nn as nn

from qlora_ds.adapters import load_adapter, save_adapter
from qlora_ds.errors import QLoRADSError
from qlora_ds.nn import QALoRAConfig, QALoRALinear, QLoRAConfig, QLoRALinear

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama(seed=0, device="cpu", **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    kwargs = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=128, max_position_embeddings=64)
    cfg = LlamaConfig(**{**kwargs, **overrides})
    return LlamaForCausalLM(cfg).eval().to(device)


def _inject(model, config, cls=QLoRALinear):
    """Small local stand-in for the injection policy: swap every targeted nn.Linear."""
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and config.matches(path):
            parent, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(parent), leaf, cls.from_linear(module, config))
    return model


def _dequantized_base(qmodel, base):
    """The bf16/fp32 base PEFT sees: the same model with each quantized weight dequantized."""
    with torch.no_grad():
        for path, m in qmodel.named_modules():
            if isinstance(m, QLoRALinear):
                base.get_submodule(path).weight.copy_(m.dequantized_weight(torch.float32))
    return base


CFG = QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32)
IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 17, 100]])



def _trained_logits(peft_model) -> torch.Tensor:
    """A PEFT model's logits on IDS once its lora_B are random (seed 1), as if trained."""
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
        return peft_model.eval()(IDS).logits

def _randomize_adapter(model, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (QLoRALinear, QALoRALinear)):
                m.lora_B.weight.normal_(std=0.05)


def test_our_adapter_loads_in_peft(tmp_path, device):
    from peft import PeftModel
    ids = IDS.to(device)
    ours = _inject(_llama(device=device), CFG)
    _randomize_adapter(ours)
    save_adapter(ours, str(tmp_path / "ad"), base_model_name_or_path="tiny-llama")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and sorted(cfg["target_modules"]) == sorted(TARGETS) and cfg["r"] == 4
    peft_model = PeftModel.from_pretrained(_dequantized_base(ours, _llama(device=device)), str(tmp_path / "ad")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(_dequantized_base(ours, _llama(device=device))(ids).logits, ours(ids).logits, atol=1e-3)


def test_peft_trained_adapter_loads_into_ours(tmp_path, device):
    from peft import LoraConfig, get_peft_model
    ids = IDS.to(device)
    ours = _inject(_llama(device=device), CFG)
    base = _dequantized_base(ours, _llama(device=device))
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        loss = peft_model(ids, labels=ids).loss
        opt.zero_grad(); loss.backward(); opt.step()
    peft_model.eval()
    peft_model.save_pretrained(str(tmp_path / "peft"))
    loaded = load_adapter(ours, str(tmp_path / "peft"))
    assert len(loaded) == 2 * len(TARGETS)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, peft_model(ids).logits, rtol=1e-4, atol=1e-4)


def test_roundtrip_qalora_and_refuse_mismatch(tmp_path, device):
    qcfg = QALoRAConfig(bits=3, group_size=16, r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32)
    ids = IDS.to(device)
    a = _inject(_llama(device=device), qcfg, QALoRALinear)
    _randomize_adapter(a)
    save_adapter(a, str(tmp_path / "qa"))
    assert json.loads((tmp_path / "qa" / "adapter_config.json").read_text())["use_qalora"] is True
    b = _inject(_llama(device=device), qcfg, QALoRALinear)
    load_adapter(b, str(tmp_path / "qa"))
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=1e-6)
    other = _inject(_llama(), QALoRAConfig(bits=4, group_size=16, r=4, alpha=8, dropout=0.0), QALoRALinear)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(QLoRADSError, match="bits=3"):
        load_adapter(other, str(tmp_path / "qa"))
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())
    with pytest.raises(QLoRADSError, match="qalora adapter"):
        load_adapter(_inject(_llama(), CFG), str(tmp_path / "qa"))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    return all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_wrong_rank_target_and_config_refused_model_unchanged(tmp_path):
    src = _inject(_llama(), CFG)
    _randomize_adapter(src)
    save_adapter(src, str(tmp_path / "ad"))
    # wrong rank
    m = _inject(_llama(), QLoRAConfig(r=8, alpha=8, dropout=0.0, compute_dtype=torch.float32))
    before = _state(m)
    with pytest.raises(QLoRADSError, match="rank"):
        load_adapter(m, str(tmp_path / "ad"))
    assert _unchanged(m, before)
    # missing target: only attention is wrapped, the adapter also targets the MLP
    m = _inject(_llama(), QLoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    before = _state(m)
    with pytest.raises(QLoRADSError, match="mlp"):
        load_adapter(m, str(tmp_path / "ad"))
    assert _unchanged(m, before)
    # wrong shape: a different MLP width; without our side file (as from PEFT) the shape check names the key
    with pytest.raises(QLoRADSError, match="different config"):
        load_adapter(_inject(_llama(intermediate_size=96), CFG), str(tmp_path / "ad"))
    import shutil
    shutil.copytree(tmp_path / "ad", tmp_path / "peftlike")
    os.remove(tmp_path / "peftlike" / "qlora_ds.json")
    m = _inject(_llama(intermediate_size=96), CFG)
    before = _state(m)
    with pytest.raises(QLoRADSError, match=r"mlp\.\w+_proj\.lora_\w\.weight' has shape"):
        load_adapter(m, str(tmp_path / "peftlike"))
    assert _unchanged(m, before)
    # base config hash mismatch (same shapes, different rope theta)
    m = _inject(_llama(rope_theta=5000.0), CFG)
    before = _state(m)
    with pytest.raises(QLoRADSError, match="different config"):
        load_adapter(m, str(tmp_path / "ad"))
    assert _unchanged(m, before)


def test_atomic_save_keeps_old_adapter_on_failure(tmp_path, monkeypatch):
    m = _inject(_llama(), CFG)
    _randomize_adapter(m)
    out = tmp_path / "ad"
    save_adapter(m, str(out))
    good = (out / "adapter_model.safetensors").read_bytes()
    import qlora_ds.adapters.peft_format as pf
    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(pf, "save_file", boom)
    _randomize_adapter(m, seed=7)
    with pytest.raises(OSError):
        save_adapter(m, str(out))
    assert (out / "adapter_model.safetensors").read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["ad"]                       # no temp dirs left behind
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "optimizer.pt").write_bytes(b"x")
    monkeypatch.undo()
    with pytest.raises(QLoRADSError, match="not part of an adapter"):
        save_adapter(m, str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "optimizer.pt").exists()


def test_model_state_hook_uses_given_tensors(tmp_path):
    m = _inject(_llama(), CFG)
    gathered = {f"{p}.{part}.weight": torch.full_like(getattr(l, part).weight, 0.01)
                for p, l in m.named_modules() if isinstance(l, QLoRALinear) for part in ("lora_A", "lora_B")}
    save_adapter(m, str(tmp_path / "ad"), model_state=gathered.items())
    m2 = _inject(_llama(), CFG)
    load_adapter(m2, str(tmp_path / "ad"))
    assert torch.all(m2.model.layers[0].self_attn.q_proj.lora_B.weight == 0.01)


def test_atomic_writes_live_below_adapters():
    """Atomic writing is used by checkpointing, metrics and launch: it sits at the package bottom and pulls in
    neither the adapters nor the layers."""
    import subprocess
    import sys
    code = ("import sys, qlora_ds.atomic, qlora_ds.checkpointing, qlora_ds.metrics\n"
            "bad = [m for m in sys.modules if m.startswith(('qlora_ds.adapters', 'qlora_ds.nn', 'qlora_ds.inject'))]\n"
            "assert not bad, bad\n"
            "import importlib.util\n"
            "assert importlib.util.find_spec('qlora_ds.adapters.atomic') is None\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_top_level_configs_are_lazy():
    """``from qlora_ds import QLoRAConfig, QALoRAConfig`` gives the layer configs; importing qlora_ds alone
    loads neither them nor transformers/deepspeed."""
    import subprocess
    import sys
    code = ("import sys, qlora_ds\n"
            "heavy = ('qlora_ds.nn', 'qlora_ds.inject', 'transformers', 'deepspeed', 'peft')\n"
            "assert not [m for m in sys.modules if m.startswith(heavy)], 'eager import'\n"
            "from qlora_ds import QALoRAConfig, QLoRAConfig\n"
            "from qlora_ds.nn import config\n"
            "assert QLoRAConfig is config.QLoRAConfig and QALoRAConfig is config.QALoRAConfig\n"
            "assert QLoRAConfig(r=8, alpha=16).scaling == 2.0 and QALoRAConfig(bits=2).bits == 2\n"
            "assert {'QLoRAConfig', 'QALoRAConfig'} <= set(qlora_ds.__all__)\n"
            "assert not [m for m in sys.modules if m.startswith(heavy[2:])]\n")
    subprocess.run([sys.executable, "-c", code], check=True)


ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def _mixed(attn_r, attn_alpha, mlp_r, mlp_alpha):
    model = _llama()
    _inject(model, QLoRAConfig(r=attn_r, alpha=attn_alpha, dropout=0.0, target_modules=ATTN,
                               compute_dtype=torch.float32))
    return _inject(model, QLoRAConfig(r=mlp_r, alpha=mlp_alpha, dropout=0.0, target_modules=MLP,
                                      compute_dtype=torch.float32))


def test_load_save_load_keeps_the_function_across_alpha_and_rank(tmp_path):
    """A loaded layer takes the file's α with its scaling; re-saving it must write that α (rank_pattern /
    alpha_pattern per layer), so load -> save -> load into fresh layers with other α gives the same logits."""
    src = _mixed(8, 32, 4, 16)                      # attention r=8 α=32 (scaling 4), MLP r=4 α=16 (scaling 4)
    with torch.no_grad():
        for m in src.modules():
            if isinstance(m, QLoRALinear):
                m.lora_B.weight.normal_(std=0.05)
        src.model.layers[0].mlp.up_proj.lora_alpha, src.model.layers[0].mlp.up_proj.scaling = 4, 1.0
        want = src(IDS).logits
    save_adapter(src, str(tmp_path / "a"))
    mid = _mixed(8, 8, 4, 2)                        # same ranks, other α everywhere
    load_adapter(mid, str(tmp_path / "a"))
    save_adapter(mid, str(tmp_path / "b"))
    cfg = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    first = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (cfg["lora_alpha"], cfg["alpha_pattern"], cfg["rank_pattern"]) == \
        (32, first["alpha_pattern"], first["rank_pattern"])
    assert cfg["alpha_pattern"]["model.layers.0.mlp.up_proj"] == 4 and cfg["rank_pattern"]["model.layers.1.mlp.up_proj"] == 4
    end = _mixed(8, 1, 4, 1)
    load_adapter(end, str(tmp_path / "b"))
    with torch.no_grad():
        torch.testing.assert_close(mid(IDS).logits, want, rtol=0, atol=0)      # same weights, same scalings
        torch.testing.assert_close(end(IDS).logits, want, rtol=0, atol=0)
    # an rsLoRA file (scaling α/√r): the loaded layer keeps α·√r, which re-saves the same scaling without rsLoRA
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "use_rslora": True}))
    rs = _mixed(8, 1, 4, 1)
    load_adapter(rs, str(tmp_path / "a"))
    assert rs.model.layers[1].self_attn.q_proj.scaling == 32 / 8 ** 0.5
    save_adapter(rs, str(tmp_path / "c"))
    again = _mixed(8, 1, 4, 1)
    load_adapter(again, str(tmp_path / "c"))
    with torch.no_grad():
        got = rs(IDS).logits
        assert not torch.allclose(got, want, atol=1e-3)
        torch.testing.assert_close(again(IDS).logits, got, rtol=0, atol=1e-6)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_rank_pattern_adapter_loads_merges_and_resaves(tmp_path, rslora):
    """A PEFT adapter with rank_pattern (plain and regex keys): the layers are built at the file's r (as
    adapter_config_from_dir does); load_adapter rebuilds the pattern layers' A/B at their own rank, with their
    α/r (α/√r for rsLoRA), so logits, the merge and a re-save in PEFT all match PEFT."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from qlora_ds.adapters.merge import adapter_config_from_dir, merge_model

    make = lambda: _inject(_llama(), QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32,
                                                 target_modules=["q_proj", "v_proj", "down_proj"]))
    peft_model = get_peft_model(_dequantized_base(make(), _llama()), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=rslora,
        rank_pattern={"q_proj": 8, r"layers\.1\.mlp\.down_proj": 2}, alpha_pattern={"q_proj": 32}))
    theirs = _trained_logits(peft_model)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    cfg = adapter_config_from_dir(str(tmp_path / "peft"), torch.float32, fallback={"method": "qlora"})
    ours = _inject(_llama(), cfg)
    before = ours.model.layers[0].self_attn.q_proj.lora_A.weight
    assert cfg.r == 4 and before.shape == (4, 64) and before.requires_grad
    load_adapter(ours, str(tmp_path / "peft"))
    layers = ours.model.layers
    q, down1 = layers[0].self_attn.q_proj, layers[1].mlp.down_proj
    assert (q.r, layers[1].self_attn.q_proj.r, layers[0].self_attn.v_proj.r, layers[0].mlp.down_proj.r,
            down1.r) == (8, 8, 4, 4, 2)
    assert (q.lora_A.weight.shape, q.lora_B.weight.shape, down1.lora_A.weight.shape) == ((8, 64), (64, 8), (2, 128))
    assert q.lora_A.weight.requires_grad and q.lora_A.weight.dtype == torch.float32
    assert q.scaling == (32 / 8 ** 0.5 if rslora else 4.0) and down1.scaling == (8 / 2 ** 0.5 if rslora else 4.0)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs, rtol=1e-5, atol=1e-5)
        assert (ours(IDS).logits - _llama()(IDS).logits).abs().max() > 1e-2      # the adapter matters
    save_adapter(ours, str(tmp_path / "ours"))
    again = PeftModel.from_pretrained(_dequantized_base(ours, _llama()), str(tmp_path / "ours")).eval()
    merge_model(ours, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(IDS).logits, theirs, rtol=1e-4, atol=1e-4)


def test_rank_pattern_refusals_leave_the_model_unchanged(tmp_path):
    """Layers built at a rank that is neither the file's r nor the pattern's are refused naming both ranks; an
    adapter refused for another reason leaves the pattern layers at their old rank (all or nothing)."""
    src = _inject(_llama(), QLoRAConfig(r=8, alpha=8, dropout=0.0, compute_dtype=torch.float32,
                                        target_modules=["q_proj"]))
    _inject(src, QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32,
                             target_modules=["v_proj", "o_proj"]))
    _randomize_adapter(src)
    save_adapter(src, str(tmp_path / "ad"))         # r=4, rank_pattern: the q_proj paths -> 8
    assert set(json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["rank_pattern"].values()) == {8}
    m = _inject(_llama(), QLoRAConfig(r=2, alpha=8, dropout=0.0, compute_dtype=torch.float32,
                                      target_modules=["q_proj"]))
    _inject(m, QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32, target_modules=["v_proj", "o_proj"]))
    before = _state(m)
    with pytest.raises(QLoRADSError, match=r"q_proj was built with rank 2 but the adapter's rank for it is 8 "
                                           r"\(rank_pattern\); build the layers with the adapter's r=4"):
        load_adapter(m, str(tmp_path / "ad"))
    assert _unchanged(m, before)
    m = _inject(_llama(), QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32,
                                      target_modules=["q_proj", "v_proj"]))     # o_proj is missing
    before = _state(m)
    with pytest.raises(QLoRADSError, match="o_proj"):
        load_adapter(m, str(tmp_path / "ad"))
    assert _unchanged(m, before) and m.model.layers[0].self_attn.q_proj.r == 4
    m = _inject(_llama(), QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32,
                                      target_modules=["q_proj", "v_proj", "o_proj"]))
    m.model.layers[1].self_attn.q_proj.lora_B.weight.ds_id = 7          # stands in for a ZeRO-3 partition
    before = _state(m)
    with pytest.raises(QLoRADSError, match=r"layers\.1\.self_attn\.q_proj rank 8 \(rank_pattern\).*ZeRO-3"):
        load_adapter(m, str(tmp_path / "ad"))
    assert _unchanged(m, before) and m.model.layers[0].self_attn.q_proj.r == 4
    m = _inject(_llama(), QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32,
                                      target_modules=["q_proj", "v_proj", "o_proj"]))
    load_adapter(m, str(tmp_path / "ad"))
    with torch.no_grad():
        torch.testing.assert_close(m(IDS).logits, src(IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["qlora", "qalora"])
def test_mixed_rank_adapter_loads_through_its_own_config(tmp_path, kind):
    """Our own mixed-rank file (rank_pattern by full path) rebuilt from adapter_config_from_dir, QA-LoRA too."""
    from qlora_ds.adapters.merge import adapter_config_from_dir

    def cfg(r, tm):
        if kind == "qlora":
            return QLoRAConfig(r=r, alpha=16, dropout=0.0, compute_dtype=torch.float32, target_modules=tm)
        return QALoRAConfig(bits=4, group_size=32, r=r, alpha=16, dropout=0.0, compute_dtype=torch.float32,
                            target_modules=tm)

    cls = QLoRALinear if kind == "qlora" else QALoRALinear
    src = _inject(_inject(_llama(), cfg(8, ATTN), cls), cfg(2, ["up_proj"]), cls)
    _randomize_adapter(src)
    save_adapter(src, str(tmp_path / "ad"))
    config = adapter_config_from_dir(str(tmp_path / "ad"), torch.float32)
    assert config.r == 8
    dst = _inject(_llama(), config, cls)
    load_adapter(dst, str(tmp_path / "ad"))
    assert dst.model.layers[1].mlp.up_proj.lora_A.weight.shape[0] == 2
    with torch.no_grad():
        torch.testing.assert_close(dst(IDS).logits, src(IDS).logits, rtol=1e-6, atol=1e-6)


def _edit(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _saved(tmp_path, config=CFG, model=None):
    """(an injected model with a random adapter, the directory it saved to)."""
    src = _inject(model if model is not None else _llama(), config)
    _randomize_adapter(src)
    save_adapter(src, str(tmp_path / "ad"))
    return src, tmp_path / "ad"


@pytest.mark.parametrize("flag,value,what", [
    ("use_dora", True, "DoRA"), ("alora_invocation_tokens", [5, 6], "aLoRA"),
    ("use_bdlora", {"nblocks": 2}, "block-diagonal"), ("arrow_config", {"top_k": 2}, "Arrow"),
    ("kasa_config", {"beta": 1.0}, "KaSA"), ("layer_replication", [[0, 2], [1, 2]], "replication"),
    ("lora_bias", True, "bias on lora_B")])      # target_parameters (MoE experts): tests/test_experts_lora.py
def test_peft_options_that_change_the_forward_are_refused(tmp_path, flag, value, what):
    _, d = _saved(tmp_path)
    _edit(d / "adapter_config.json", **{flag: value})
    m = _inject(_llama(), CFG)
    before = _state(m)
    with pytest.raises(QLoRADSError, match=rf"adapter uses .*{what}.*\({flag}\); qlora-ds loads plain LoRA only"):
        load_adapter(m, str(d))
    assert _unchanged(m, before)
    _edit(d / "adapter_config.json", **{flag: False if flag in ("use_dora", "lora_bias") else None})
    load_adapter(m, str(d))                                         # PEFT's "off" value loads


def test_real_peft_alora_adapter_is_refused(tmp_path):
    """An aLoRA file has plain lora_A/B keys: only its config says that it acts after its invocation tokens."""
    from peft import LoraConfig, get_peft_model
    ours = _inject(_llama(), CFG)
    pm = get_peft_model(_dequantized_base(ours, _llama()), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], alora_invocation_tokens=[5, 6], task_type="CAUSAL_LM"))
    pm.save_pretrained(str(tmp_path / "alora"))
    with pytest.raises(QLoRADSError, match=r"aLoRA .*alora_invocation_tokens"):
        load_adapter(ours, str(tmp_path / "alora"))


@pytest.mark.parametrize("init", ["olora", "corda", "lora_ga", "pissa_niter_4", "loftq", "eva", "orthogonal",
                                  "gaussian", "mica", False])
def test_inits_that_change_the_base_are_refused(tmp_path, init):
    _, d = _saved(tmp_path)
    _edit(d / "adapter_config.json", init_lora_weights=init)
    m = _inject(_llama(), CFG)
    if init in ("eva", "orthogonal", "gaussian", "mica", False):        # these leave the base weights as they are
        assert len(load_adapter(m, str(d))) == 2 * len(TARGETS)
        return
    fix = "the base that LoftQ saved" if init == "loftq" else "path_initial_model_for_weight_conversion"
    with pytest.raises(QLoRADSError, match=rf"init_lora_weights='{init}': that init also changed the base.*{fix}"):
        load_adapter(m, str(d))


def test_pissa_adapter_is_refused_and_its_peft_conversion_loads_exactly(tmp_path):
    """PiSSA subtracts B0·A0 from the base: the raw file is a delta against that residual, so it is refused; PEFT's
    conversion (a plain LoRA of rank 2r against the original base) loads and gives PEFT's logits."""
    from peft import LoraConfig, get_peft_model
    targets = ["q_proj", "v_proj"]
    ours = _inject(_llama(), QLoRAConfig(r=8, alpha=16, dropout=0.0, compute_dtype=torch.float32,
                                         target_modules=targets))
    pm = get_peft_model(_dequantized_base(ours, _llama()), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                      init_lora_weights="pissa"))
    pm.peft_config["default"].init_lora_weights = True              # PEFT's recipe for the initial adapter
    pm.save_pretrained(str(tmp_path / "init"))
    pm.peft_config["default"].init_lora_weights = "pissa"
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.05)
        theirs = pm.eval()(IDS).logits
    pm.save_pretrained(str(tmp_path / "raw"))
    before = _state(ours)
    with pytest.raises(QLoRADSError, match="init_lora_weights='pissa'"):
        load_adapter(ours, str(tmp_path / "raw"))
    assert _unchanged(ours, before)
    pm.save_pretrained(str(tmp_path / "lora"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    load_adapter(ours, str(tmp_path / "lora"))
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs, rtol=1e-4, atol=1e-4)


def _head_bias(model):
    torch.manual_seed(3)
    model.lm_head = nn.Linear(64, 128, bias=True)
    return model


def test_peft_lm_head_adapter_with_its_base_copy_loads(tmp_path):
    """PEFT also writes lm_head.base_layer.{weight,bias} when lm_head is targeted: checked against our base, then
    skipped; a copy of another (or resized) head is refused."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    targets = ["q_proj", "v_proj", "lm_head"]
    cfg = QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32, target_modules=targets)
    ours = _inject(_head_bias(_llama()), cfg)
    pm = get_peft_model(_dequantized_base(ours, _head_bias(_llama())), LoraConfig(r=4, lora_alpha=8,
                                                                                 target_modules=targets))
    theirs = _trained_logits(pm)
    pm.save_pretrained(str(tmp_path / "peft"))
    path = tmp_path / "peft" / "adapter_model.safetensors"
    sd = load_file(str(path))
    head = "base_model.model.lm_head.base_layer."
    assert {head + "weight", head + "bias"} <= set(sd)
    load_adapter(ours, str(tmp_path / "peft"))
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs, rtol=1e-5, atol=1e-5)
    for key, bad, match in [(head + "weight", torch.randn(128, 64) * 0.02, "relative error"),
                            (head + "weight", torch.zeros(130, 64), r"shape \(130, 64\).*resized"),
                            (head + "bias", sd[head + "bias"] + 0.01, "max abs error")]:
        save_file({**sd, key: bad}, str(path))
        m = _inject(_head_bias(_llama()), cfg)
        before = _state(m)
        with pytest.raises(QLoRADSError, match=match):
            load_adapter(m, str(tmp_path / "peft"))
        assert _unchanged(m, before)


def test_qlora_quantization_must_match_the_side_file(tmp_path):
    _, d = _saved(tmp_path)                                         # nf4, blocksize 64, double quant
    for other in (dict(quant_type="fp4"), dict(blocksize=128), dict(double_quant=False)):
        m = _inject(_llama(), QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32, **other))
        before = _state(m)
        (k, v), = other.items()
        with pytest.raises(QLoRADSError, match=rf"trained for qlora quant_type=nf4 blocksize=64 double_quant=True, "
                                               rf"but the layer is .*{k}={v}.*quantize the base the same way"):
            load_adapter(m, str(d))
        assert _unchanged(m, before)
    load_adapter(_inject(_llama(), CFG), str(d))


def _old_rule_hash(model):
    """The side file's base_config_hash as qlora-ds has always written it (older readers compare this)."""
    import hashlib
    volatile = ("transformers_version", "torch_dtype", "dtype", "quantization_config", "architectures", "use_cache",
                "name_or_path")
    d = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k not in volatile}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def test_base_config_check_ignores_token_ids_and_names_what_differs(tmp_path):
    from qlora_ds.adapters.peft_format import base_config
    src, d = _saved(tmp_path)
    side = json.loads((d / "qlora_ds.json").read_text())
    assert side["base_config_hash"] == _old_rule_hash(src)          # older qlora-ds versions still read new files
    assert "eos_token_id" not in side["base_config"] and side["base_config"]["hidden_size"] == 64
    edited = dict(eos_token_id=[2, 7], bos_token_id=3)         # (a pad id would re-init an embedding row)
    m = _inject(_llama(**edited), CFG)
    load_adapter(m, str(d))
    with torch.no_grad():
        torch.testing.assert_close(m(IDS).logits, src(IDS).logits, rtol=0, atol=0)
    m = _inject(_llama(rope_theta=5000.0, rms_norm_eps=1e-3), CFG)
    before = _state(m)
    with pytest.raises(QLoRADSError, match=r"different config \(hash \w+ vs this model's \w+; rms_norm_eps: 1e-06 "
                                           r"vs this model's 0.001; "
                                           r"rope_parameters: .*10000.* vs this model's .*5000"):
        load_adapter(m, str(d))
    assert _unchanged(m, before)
    # a side file as earlier versions wrote it (only the hash, old rule) still loads into its base, and is refused
    # with a hint when only token ids changed; a hash by the new rule accepts the edited config
    _edit(d / "qlora_ds.json", base_config=None)
    load_adapter(_inject(_llama(), CFG), str(d))
    with pytest.raises(QLoRADSError, match="different config.*delete base_config_hash"):
        load_adapter(_inject(_llama(**edited), CFG), str(d))
    import hashlib
    new_rule = hashlib.sha256(json.dumps(base_config(src), sort_keys=True).encode()).hexdigest()
    _edit(d / "qlora_ds.json", base_config_hash=new_rule)
    load_adapter(_inject(_llama(**edited), CFG), str(d))


def test_bias_option_refused_only_with_bias_tensors(tmp_path):
    """bias='all'/'lora_only' on a model without linear biases writes exactly a bias='none' file."""
    from safetensors.torch import load_file, save_file
    src, d = _saved(tmp_path)
    for bias in ("all", "lora_only"):
        _edit(d / "adapter_config.json", bias=bias)
        m = _inject(_llama(), CFG)
        load_adapter(m, str(d))
        with torch.no_grad():
            torch.testing.assert_close(m(IDS).logits, src(IDS).logits, rtol=0, atol=0)
    path = d / "adapter_model.safetensors"
    save_file({**load_file(str(path)), "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias":
               torch.ones(64)}, str(path))
    m = _inject(_llama(), CFG)
    before = _state(m)
    with pytest.raises(QLoRADSError, match=r"bias='lora_only' and holds trained biases.*train with bias='none'"):
        load_adapter(m, str(d))
    assert _unchanged(m, before)


PATTERN_PATHS = ["model.layers.0.self_attn.q_proj", "model.layers.10.mlp.down_proj", "layers.1.self_attn.q_proj",
                 "q_proj", "xq_proj", "lm_head"]


@pytest.mark.parametrize("key", ["q_proj", "self_attn.q_proj", "layers.0.self_attn.q_proj",
                                 "^layers.1.self_attn.q_proj", "^model.layers.0.self_attn.q_proj", "layersX0",
                                 "layers.1?0.mlp.down_proj",
                                 r"layers\.[0-9]+\.mlp\.down_proj", ".*q_proj", "layers.(0|10).mlp.down_proj",
                                 "(q|k)_proj", "^q_proj", "x?q_proj"])
def test_pattern_keys_match_as_peft_does(key):
    from peft.utils.other import get_pattern_key

    from qlora_ds.adapters.peft_format import _pattern_value

    got = [_pattern_value({key: 8}, path, 4) == 8 for path in PATTERN_PATHS]
    assert got == [get_pattern_key([key], path) == key for path in PATTERN_PATHS]


@pytest.mark.parametrize("key, why", [(r"([a-z_.0-9]+)+X", "repeats a group"), ("(.*)*X", "repeats a group"),
                                      ("(a|aa){30}X", "repeats a group"), (".*.*.*.*X", "4 unbounded repeats"),
                                      ("q" * 257, "1 to 256 characters"), ("(q", "not a valid regular expression")])
def test_pattern_keys_that_could_backtrack_for_hours_are_refused_at_once(key, why):
    """rank_pattern keys were compiled as given: '([a-z_.0-9]+)+X' took 82 s on a 31-character module path."""
    import time

    from qlora_ds.adapters.peft_format import _pattern_value

    start = time.perf_counter()
    with pytest.raises(QLoRADSError, match=rf"adapter pattern key .*{re.escape(why)}"):
        _pattern_value({key: 8}, "model.layers.31.self_attn.q_proj", 4)
    assert time.perf_counter() - start < 0.5
