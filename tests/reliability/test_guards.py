"""Issue 9 item 6: numerical guards — off (and free) by default, on in debug mode; the first module
that produced a NaN/Inf is named with what was non-finite. Also: the DQ offset cache of QLoRALinear."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from qlora_ds.errors import NonFiniteError, QLoRADSError
from qlora_ds.nn import QALoRAConfig, QLoRAConfig, QLoRALinear, guards
from qlora_ds.ops import small_rows

from .conftest import inject, tiny_llama

IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 17, 100]])


@pytest.fixture
def debug():
    with guards.enabled(True):
        yield


def _model(config=None):
    return guards.name_modules(inject(tiny_llama(), config or QLoRAConfig(r=4, alpha=8, dropout=0.0,
                                                                          compute_dtype=torch.float32)))


def _poison_absmax(layer):
    with torch.no_grad():
        if isinstance(layer, QLoRALinear):
            name = "weight_absmax2" if layer.double_quant else "weight_absmax"
            getattr(layer, name).view(torch.float32)[0] = float("nan")
        else:
            layer.scales.view(torch.float32)[0] = float("inf")


def test_off_by_default_and_silent():
    assert not guards.is_enabled() or os.environ.get(guards.ENV_VAR)
    with guards.enabled(False):
        model = _model()
        _poison_absmax(model.get_submodule("model.layers.0.mlp.up_proj"))
        out = model(IDS).logits                     # no check, no raise: the NaN flows through
        assert not bool(torch.isfinite(out).all())


def test_env_var_turns_guards_on():
    code = "from qlora_ds.nn import guards; print(guards.is_enabled())"
    for value, want in (("1", "True"), ("", "False")):
        env = dict(os.environ, **{guards.ENV_VAR: value})
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.stdout.strip().splitlines()[-1] == want, out.stderr


@pytest.mark.parametrize("config", [QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32),
                                    QLoRAConfig(r=4, alpha=8, dropout=0.0, double_quant=False),
                                    QALoRAConfig(r=4, alpha=8, dropout=0.0, group_size=32)],
                         ids=["nf4_dq", "nf4", "qalora"])
def test_corrupt_base_names_first_module_and_dequant(debug, config):
    model = _model(config)
    _poison_absmax(model.get_submodule("model.layers.1.self_attn.v_proj"))
    _poison_absmax(model.get_submodule("model.layers.0.mlp.down_proj"))     # runs first
    with pytest.raises(NonFiniteError) as err:
        model(IDS)
    e = err.value
    assert isinstance(e, FloatingPointError) and not isinstance(e, QLoRADSError)
    assert e.module == "model.layers.0.mlp.down_proj" and e.what == "dequantized weight"
    assert e.nan + e.inf > 0 and "'model.layers.0.mlp.down_proj'" in str(e) and "re-quantize" in str(e)


def test_diverged_adapter_is_lora_output(debug):
    model = _model()
    layer = model.get_submodule("model.layers.1.mlp.gate_proj")
    with torch.no_grad():
        layer.lora_B.weight[2, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"LoRA output in module 'model\.layers\.1\.mlp\.gate_proj'.*lower the "
                                             r"learning rate") as err:
        model(IDS)
    assert err.value.what == "LoRA output" and err.value.input_finite is True


def test_layer_output_and_count(debug):
    model = _model()
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    with torch.no_grad():
        layer.bias = torch.nn.Parameter(torch.full((64,), float("nan")), requires_grad=False)
    with pytest.raises(NonFiniteError) as err:
        model(IDS)
    e = err.value
    assert (e.module, e.what, e.nan, e.inf, e.numel) == ("model.layers.0.self_attn.q_proj", "layer output",
                                                         8 * 64, 0, 8 * 64)


def test_install_finds_nan_born_outside_quantized_layers():
    model = _model()
    with torch.no_grad():
        model.model.embed_tokens.weight[5].fill_(float("nan"))
    handle = guards.install(model)
    model(IDS)                                      # guards off: hooks do nothing
    with guards.enabled():
        with pytest.raises(NonFiniteError) as err:
            model(IDS)
    assert err.value.module == "model.embed_tokens" and err.value.what == "output"
    handle.remove()
    with guards.enabled():
        with pytest.raises(NonFiniteError) as err:   # without hooks: the first quantized layer, input non-finite
            model(IDS)
    assert err.value.module == "model.layers.0.self_attn.q_proj" and err.value.input_finite is False
    assert "input was already non-finite" in str(err.value)


def test_guards_on_finite_model_match_off():
    model = _model()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QLoRALinear):
                m.lora_B.weight.normal_(std=0.05)
    # The guards check the dequantized weight, so a guarded call always dequantizes: compare that path both ways
    # (unguarded, a call of <= 8 rows like this one would multiply from the packed weight, ops/small_rows.py).
    previous = small_rows.set_enabled(False)
    try:
        off = model(IDS).logits
        with guards.enabled():
            on = model(IDS).logits
            on.sum().backward()
    finally:
        small_rows.set_enabled(previous)
    assert torch.equal(on, off)


# ----------------------------------------------------------------------------- the cached DQ offset
def test_offset_cached_no_reads_in_forward(monkeypatch):
    torch.manual_seed(0)
    layer = QLoRALinear.from_linear(torch.nn.Linear(64, 32), QLoRAConfig(r=4, compute_dtype=torch.float32))
    assert layer.offset() == pytest.approx(layer.weight_offset.view(torch.float32).item())
    reads = []
    real = QLoRALinear.refresh_offset
    monkeypatch.setattr(QLoRALinear, "refresh_offset", lambda self: reads.append(1) or real(self))
    x = torch.randn(3, 64, requires_grad=True)
    for _ in range(3):
        layer(x).sum().backward()
    assert reads == []
    # a loader that writes the bytes in place (copy_) or replaces the Parameter: re-read once, then cached
    torch.manual_seed(1)
    other = QLoRALinear.from_linear(torch.nn.Linear(64, 32), QLoRAConfig(r=4, compute_dtype=torch.float32))
    assert other.offset() != layer.offset()
    with torch.no_grad():
        for name in ("weight", "weight_absmax", "weight_absmax2", "weight_offset"):
            getattr(layer, name).copy_(getattr(other, name))
    layer(x)
    assert len(reads) == 1 and layer.offset() == other.offset()
    assert torch.equal(layer.dequantized_weight(), other.dequantized_weight())
    layer.weight_offset = torch.nn.Parameter(layer.weight_offset.detach().clone(), requires_grad=False)
    layer(x)
    assert len(reads) == 2


def test_offset_refreshed_by_load_state_dict():
    torch.manual_seed(0)
    a = QLoRALinear.from_linear(torch.nn.Linear(64, 32), QLoRAConfig(r=4, compute_dtype=torch.float32))
    torch.manual_seed(1)
    b = QLoRALinear.from_linear(torch.nn.Linear(64, 32), QLoRAConfig(r=4, compute_dtype=torch.float32))
    x = torch.randn(2, 64)
    a(x)
    a.load_state_dict(b.state_dict())
    assert a.offset() == b.offset() and torch.equal(a(x), b(x))
    a.load_state_dict(b.state_dict(), assign=True)
    assert a.offset() == b.offset() and torch.equal(a(x), b(x))
