"""The compute dtype decision: device × capability → dtype, with detection mocked at its single entry point."""
from __future__ import annotations

import pytest
import torch

from qlora_ds import hardware
from qlora_ds.errors import QLoRADSError
from qlora_ds.hardware import DeviceFacts

CUDA = {(7, 0): torch.float16, (7, 5): torch.float16, (8, 0): torch.bfloat16, (9, 0): torch.bfloat16}
CPU = {"avx2": torch.float32, "avx512": torch.float32, "avx512_bf16": torch.bfloat16, "amx": torch.bfloat16,
       "other": torch.float32}


@pytest.fixture
def facts(monkeypatch):
    """Set what ``device_facts`` reports; every caller (resolve_dtype, QLoRAConfig.resolved) sees it."""
    current = {}

    def fake(device):
        return current["facts"]
    monkeypatch.setattr(hardware, "device_facts", fake)

    def set_facts(f: DeviceFacts):
        current["facts"] = f
    return set_facts


@pytest.mark.parametrize("cap", sorted(CUDA), ids=lambda c: f"sm_{c[0]}{c[1]}")
def test_auto_dtype_on_cuda(facts, cap):
    facts(DeviceFacts("cuda", "GPU", cuda_capability=cap))
    assert hardware.resolve_dtype("auto", "cuda:0") is CUDA[cap]


@pytest.mark.parametrize("isa", sorted(CPU))
def test_auto_dtype_on_cpu(facts, isa):
    facts(DeviceFacts("cpu", "CPU", cpu_isa=isa))
    assert hardware.resolve_dtype("auto", "cpu") is CPU[isa]
    assert hardware.resolve_dtype(None, "cpu") is CPU[isa]


def test_explicit_dtypes_are_kept_and_bad_ones_refused(facts):
    facts(DeviceFacts("cpu", "CPU", cpu_isa="avx2"))
    for name, dtype in hardware.DTYPE_NAMES.items():
        assert hardware.resolve_dtype(name, "cpu") is dtype and hardware.resolve_dtype(dtype, "cpu") is dtype
    with pytest.raises(QLoRADSError, match="unknown"):
        hardware.resolve_dtype("fp8", "cpu")
    with pytest.raises(QLoRADSError, match="not supported"):
        hardware.resolve_dtype(torch.float64, "cpu")


def test_choice_logged_once_with_reason(facts, caplog):
    facts(DeviceFacts("cpu", "Test CPU 9000", cpu_isa="avx2"))
    hardware._logged.clear()
    with caplog.at_level("INFO", logger="qlora_ds.hardware"):
        hardware.resolve_dtype("auto", "cpu")
        hardware.resolve_dtype("auto", "cpu")
    lines = [r.getMessage() for r in caplog.records if r.name == "qlora_ds.hardware"]
    assert len(lines) == 1 and "fp32" in lines[0] and "Test CPU 9000" in lines[0] and "AVX2" in lines[0]


@pytest.mark.parametrize("kind", ["qlora", "qalora"])
def test_config_auto_resolved_at_layer_construction(facts, kind):
    """compute_dtype="auto" stays "auto" in the (frozen, shared) config; each layer gets the device's dtype."""
    from qlora_ds.nn import QALoRALinear, QALoRAConfig, QLoRAConfig, QLoRALinear

    cls, cfg = ((QLoRALinear, QLoRAConfig(r=2, compute_dtype="auto")) if kind == "qlora"
                else (QALoRALinear, QALoRAConfig(r=2, group_size=32, compute_dtype="auto")))
    for facts_, dtype in ((DeviceFacts("cpu", "CPU", cpu_isa="avx2"), torch.float32),
                          (DeviceFacts("cpu", "CPU", cpu_isa="amx"), torch.bfloat16)):
        facts(facts_)
        layer = cls(64, 32, True, cfg)
        assert layer.compute_dtype is dtype and layer.config.compute_dtype is dtype
        assert layer.bias.dtype is dtype
        assert cfg.compute_dtype == "auto"                       # the caller's config is not changed
    assert cls(64, 32, False, cfg.resolved("meta"), device="meta").compute_dtype is torch.bfloat16
    assert QLoRAConfig(compute_dtype="FP16").compute_dtype is torch.float16     # names accepted
    with pytest.raises(QLoRADSError, match="compute_dtype='int8'"):
        QLoRAConfig(compute_dtype="int8")


def test_defaults_are_auto_and_from_pretrained_picks_one_dtype_for_the_model(facts, tmp_path):
    """The configs default to "auto", and so does from_pretrained's torch_dtype: the layers and the unquantized
    tensors (embeddings, norms, LM head) get the one dtype the device computes best; an explicit torch_dtype is
    followed by an "auto" config, and an explicit config dtype is kept."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_ds.inject import from_pretrained
    from qlora_ds.nn import QALoRAConfig, QLoRAConfig, QLoRALinear

    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
                     ).save_pretrained(tmp_path, safe_serialization=True)
    assert QLoRAConfig().compute_dtype == "auto" and QALoRAConfig().compute_dtype == "auto"

    def dtypes(model):
        layers = [m for m in model.modules() if isinstance(m, QLoRALinear)]
        assert len(layers) == 7
        return ({m.compute_dtype for m in layers}, model.model.embed_tokens.weight.dtype,
                model.model.norm.weight.dtype, model.lm_head.weight.dtype)

    for isa, want in (("avx2", torch.float32), ("amx", torch.bfloat16)):
        facts(DeviceFacts("cpu", "CPU", cpu_isa=isa))
        assert dtypes(from_pretrained(str(tmp_path), QLoRAConfig(r=2))) == ({want}, want, want, want)
    assert dtypes(from_pretrained(str(tmp_path), QLoRAConfig(r=2), torch_dtype="fp16")) == (
        {torch.float16}, torch.float16, torch.float16, torch.float16)
    assert dtypes(from_pretrained(str(tmp_path), QLoRAConfig(r=2, compute_dtype="fp32"), torch_dtype=torch.bfloat16)
                  ) == ({torch.float32}, torch.bfloat16, torch.bfloat16, torch.bfloat16)


AVX512_AMX = {"avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16", "amx_tile"}


@pytest.mark.parametrize("flags, cap, isa", [
    (AVX512_AMX, "AVX512", "amx"),
    (AVX512_AMX, "AVX2", "avx2"),             # ATEN_CPU_CAPABILITY=avx2: torch runs as an AVX2 CPU (bf16 emulated)
    (AVX512_AMX, "DEFAULT", "other"),
    ({"avx2", "fma", "avx512f", "avx512bw"}, "AVX512", "avx512"),
    ({"avx2", "fma"}, "AVX2", "avx2"),
    (set(), "AVX2", "avx2"),                  # no /proc/cpuinfo: torch's probe
])
def test_cpu_isa_from_flags_capped_by_torch(monkeypatch, flags, cap, isa):
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: cap)
    hardware.cpu_isa.cache_clear()
    try:
        assert hardware.cpu_isa() == isa
    finally:
        hardware.cpu_isa.cache_clear()


def test_restricted_torch_computes_fp32_on_any_cpu():
    """A process told to run as an AVX2 CPU (how an AVX2 box is emulated on an AVX-512 one) picks fp32, whatever the
    CPU under it: the real probe, not a mock."""
    import subprocess
    import sys

    code = "from qlora_ds.hardware import cpu_isa, resolve_dtype; print(cpu_isa(), resolve_dtype('auto', 'cpu'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "ATEN_CPU_CAPABILITY": "avx2"}).stdout.split()
    assert out[-2:] in (["avx2", "torch.float32"], ["other", "torch.float32"])


def test_precision_sections_read_string_booleans_as_deepspeed_does():
    """"enabled": "false" is false for DeepSpeed; it used to read as true here (bool("false")) and conflict."""
    import pytest

    from qlora_ds.errors import QLoRADSError
    from qlora_ds.hardware import fold_ds_precision
    cfg = fold_ds_precision({"fp16": {"enabled": "false"}, "bf16": {"enabled": "True"}}, torch.bfloat16)
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    with pytest.raises(QLoRADSError, match=r"fp16.enabled='yes' must be true, false or \"auto\""):
        fold_ds_precision({"fp16": {"enabled": "yes"}}, torch.bfloat16)
    with pytest.raises(QLoRADSError, match="fp16.enabled=true conflicts"):
        fold_ds_precision({"fp16": {"enabled": "true"}}, torch.bfloat16)


def test_old_bfloat16_section_is_read_as_bf16():
    """DeepSpeed takes "bfloat16" when "bf16" is absent: it is checked against the dtype, and its options kept."""
    from qlora_ds.hardware import ds_compute_dtype, fold_ds_precision

    cfg = fold_ds_precision({"bfloat16": {"enabled": True, "immediate_grad_update": True}}, torch.bfloat16)
    assert cfg == {"bf16": {"enabled": True, "immediate_grad_update": True}, "fp16": {"enabled": False}}
    assert ds_compute_dtype({"bfloat16": {"enabled": True}}) is torch.bfloat16
    with pytest.raises(QLoRADSError, match="bf16.enabled=true conflicts with the compute dtype fp32"):
        fold_ds_precision({"bfloat16": {"enabled": True}}, torch.float32, "fp32")
    same = {"enabled": "auto", "check_grad_overflow": True}
    assert fold_ds_precision({"bf16": dict(same), "bfloat16": dict(same)}, torch.float32)["bf16"] == {
        "enabled": False, "check_grad_overflow": True}
    with pytest.raises(QLoRADSError, match="both \"bf16\" .* and its old name \"bfloat16\" .* disagree"):
        fold_ds_precision({"bf16": {"enabled": "auto"}, "bfloat16": {"enabled": True}}, torch.bfloat16)


def test_bf16_conflict_under_auto_does_not_advise_emulated_bf16():
    """auto chose fp32 because bf16 would be emulated: the conflict error must not suggest asking for bf16."""
    from qlora_ds.hardware import fold_ds_precision

    with pytest.raises(QLoRADSError) as err:
        fold_ds_precision({"bf16": {"enabled": True}}, torch.float32, "auto")
    assert "ask for the dtype" not in str(err.value) and "no native bf16" in str(err.value)
    with pytest.raises(QLoRADSError, match="ask for the dtype it was written for"):
        fold_ds_precision({"bf16": {"enabled": True}}, torch.float32, "fp32")


@pytest.mark.parametrize("device_facts, device, auto", [
    (DeviceFacts("cpu", "AMD EPYC 7B13", cpu_isa="avx2"), "cpu", "fp32"),
    (DeviceFacts("cpu", "Xeon", cpu_isa="avx512"), "cpu", "fp32"),
    (DeviceFacts("cuda", "Tesla T4", cuda_capability=(7, 5)), "cuda:0", "fp16"),
])
def test_explicit_bf16_without_native_bf16_warns_once(facts, caplog, device_facts, device, auto):
    facts(device_facts)
    hardware._logged.clear()
    with caplog.at_level("INFO", logger="qlora_ds.hardware"):
        assert hardware.resolve_dtype("bf16", device) is torch.bfloat16
        assert hardware.resolve_dtype("bf16", device) is torch.bfloat16
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert device_facts.name in warnings[0] and "emulat" in warnings[0]
    assert f"--dtype auto ({auto} here)" in warnings[0]
    if device == "cpu":
        assert "15-30x slower than fp32" in warnings[0]


@pytest.mark.parametrize("device_facts, device", [(DeviceFacts("cpu", "Xeon", cpu_isa="amx"), "cpu"),
                                                  (DeviceFacts("cuda", "A100", cuda_capability=(8, 0)), "cuda:0")])
def test_explicit_bf16_on_native_bf16_does_not_warn(facts, caplog, device_facts, device):
    facts(device_facts)
    hardware._logged.clear()
    with caplog.at_level("INFO", logger="qlora_ds.hardware"):
        assert hardware.resolve_dtype("bf16", device) is torch.bfloat16
        assert hardware.resolve_dtype("fp32", device) is torch.float32
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
