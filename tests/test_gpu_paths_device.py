"""Device placement on paths that only a GPU run would exercise, checked on the CPU: the device a GPU would supply
is stood in for by the meta device (anything that is left on the CPU then shows), or construction calls are
recorded and their ``device`` compared with the layer's."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from qlora_ds.adapters import merge as merge_mod
from qlora_ds.inject import loading
from qlora_ds.nn import QALoRAConfig, QLoRAConfig
from qlora_ds.nn.qalora_linear import QALoRALinear
from qlora_ds.nn.qlora_linear import QLoRALinear

from .tiny_models import tiny_model


@pytest.fixture
def linear_devices(monkeypatch):
    """The ``device`` every nn.Linear built (here: torch.nn's, which qlora_ds.adapters.merge uses) was given (None:
    left to default, the CPU — wrong for a model on a GPU)."""
    real, seen = nn.Linear, []

    class Recording(real):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs.get("device"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(merge_mod.nn, "Linear", Recording)
    return seen


def _qlora_model() -> nn.Module:
    torch.manual_seed(0)
    cfg = QLoRAConfig(r=4, dropout=0.0, compute_dtype=torch.float32)
    layer = QLoRALinear.from_linear(nn.Linear(64, 32), cfg)
    nn.init.normal_(layer.lora_B.weight)
    return nn.Sequential(layer)


def test_merge_model_builds_the_merged_linear_on_the_layers_device(linear_devices):
    """merge_model(model_on_cuda, dtype=bf16) with an fp32 compute dtype (launch/merge.py --format bf16 --dtype fp32 or
    fp16) used to build the merged nn.Linear without a device: a CPU layer inside a GPU model."""
    model = _qlora_model()
    device = model[0].weight.device
    linear_devices.clear()                           # only what merge_model builds
    merge_mod.merge_model(model, dtype=torch.bfloat16)
    assert isinstance(model[0], nn.Linear) and model[0].weight.dtype == torch.bfloat16
    assert linear_devices and all(d is not None and torch.device(d) == device for d in linear_devices)


def test_dequantized_linear_of_qalora_is_built_on_the_layers_device(linear_devices):
    """export_merged(fmt="bf16") of a QA-LoRA model replaces each layer by _dequantized_linear's nn.Linear."""
    layer = QALoRALinear.from_linear(nn.Linear(64, 32), QALoRAConfig(bits=4, group_size=32, r=4, dropout=0.0,
                                                                     compute_dtype=torch.float32))
    linear_devices.clear()
    lin = merge_mod._dequantized_linear(layer, torch.bfloat16)
    assert linear_devices == [layer.qweight.device]
    torch.testing.assert_close(lin.weight.float(), layer.dequantized_weight(torch.float32).bfloat16().float())


def test_zero3_load_puts_every_buffer_on_the_accelerator_device(tmp_path, monkeypatch):
    """Under ZeRO-3 DeepSpeed's engine does not move a model whose parameters zero.Init holds
    (engine._configure_distributed_model skips module.to(device)), and zero.Init(module=...) moves parameters only:
    from_pretrained must put the skeleton's buffers (rotary inv_freq, persistent or not) on the rank's device itself.
    One rank, no process group: zero.Init and the broadcast are stubbed, 'meta' stands in for cuda:LOCAL_RANK."""
    import deepspeed.comm as ds_comm

    tiny_model("llama", hidden=64).save_pretrained(tmp_path)
    monkeypatch.setattr(ds_comm, "is_initialized", lambda: True)
    monkeypatch.setattr(ds_comm, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(ds_comm, "broadcast", lambda t, src, group=None, async_op=False: None)
    monkeypatch.setattr(loading, "_zero3_partition", lambda params, ds_config: None)
    monkeypatch.setattr(loading, "_zero3_device", lambda: torch.device("meta"))
    model = loading.from_pretrained(str(tmp_path), QLoRAConfig(r=4, compute_dtype=torch.float32),
                                    ds_config={"zero_optimization": {"stage": 3}}, torch_dtype=torch.float32)
    buffers = dict(model.named_buffers())
    assert any("inv_freq" in n for n in buffers)
    assert {n: b.device.type for n, b in buffers.items() if b.device.type != "meta"} == {}


def test_buffers_to_device_keeps_a_shared_buffer_one_tensor():
    a, b = nn.Module(), nn.Module()
    shared = torch.arange(4.0)
    a.register_buffer("t", shared, persistent=False)
    b.register_buffer("t", shared, persistent=False)
    root = nn.ModuleDict({"a": a, "b": b})
    loading._buffers_to_device(root, torch.device("meta"))
    assert a.t.is_meta and a.t is b.t
