"""from_pretrained(..., device=): each module goes to the device as soon as it is filled (below ZeRO-3), so the host
never holds the whole 4-bit model. Device-aware: the GPU check runs it with ``--device cuda``; on the CPU it checks
the same values in place."""
from __future__ import annotations

import pytest
import torch

from qlora_ds.errors import QLoRADSError
from qlora_ds.inject import from_pretrained
from qlora_ds.inject import loading
from qlora_ds.nn import QLoRAConfig

from .tiny_models import tiny_model

CFG = QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32)


def test_load_onto_the_device_module_by_module(device, tmp_path, monkeypatch):
    tiny_model("llama", hidden=128, dtype=torch.bfloat16).save_pretrained(tmp_path, max_shard_size="100KB")
    torch.manual_seed(0)
    ref = from_pretrained(str(tmp_path), CFG, torch_dtype=torch.float32)
    filled, host_bytes = [], []
    real_fill = loading._fill_layer

    def fill(layer, *args):
        # every layer filled before this one is already on the device: the host holds the one being filled
        host_bytes.append(sum(p.nbytes for m in filled for p in m.parameters() if p.device.type == "cpu"))
        real_fill(layer, *args)
        filled.append(layer)

    monkeypatch.setattr(loading, "_fill_layer", fill)
    torch.manual_seed(0)         # LoRA A's init draws from the CPU generator, on every device
    got = from_pretrained(str(tmp_path), CFG, torch_dtype=torch.float32, device=device)
    assert len(filled) == len(ref.qlora_ds_targets) == 14
    on = {t.device for t in (*got.parameters(), *got.buffers())}
    assert on == {torch.device(device.type, device.index or 0) if device.type == "cuda" else device}, on
    if device.type != "cpu":
        assert max(host_bytes) == 0
    want, have = ref.state_dict(), got.state_dict()
    assert want.keys() == have.keys()
    for k, t in want.items():        # the codes are the CPU's, the LoRA init the CPU's: the same bytes
        assert torch.equal(have[k].cpu(), t), k
    ids = torch.randint(0, ref.config.vocab_size, (2, 9))
    with torch.no_grad():
        expect = ref.to(device)(ids.to(device)).logits
        assert torch.equal(got(ids.to(device)).logits, expect)


def test_each_module_leaves_the_host_as_soon_as_it_is_filled(tmp_path, monkeypatch):
    """The CPU's stand-in for a GPU: the meta device (no data, but a placement): when each layer is filled, every
    layer filled before it, and every other parameter read so far, is already off the host."""
    tiny_model("llama", hidden=128, dtype=torch.bfloat16).save_pretrained(tmp_path)
    host, real_fill = [], loading._fill_layer

    def fill(layer, *args):
        model_params = [p for p in fill.model.parameters() if p.device.type == "cpu"]
        host.append(sum(p.nbytes for p in model_params))
        real_fill(layer, *args)

    real_inject = loading.inject

    def inject(model, *args):                      # the skeleton, to look at while it fills
        fill.model = model
        return real_inject(model, *args)

    monkeypatch.setattr(loading, "_fill_layer", fill)
    monkeypatch.setattr(loading, "inject", inject)
    got = from_pretrained(str(tmp_path), CFG, torch_dtype=torch.float32, device="meta")
    assert len(host) == 14 and host == [0] * 14
    assert {t.device.type for t in (*got.parameters(), *got.buffers())} == {"meta"}


def test_device_with_zero3_is_refused(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    ds = {"train_batch_size": 1, "zero_optimization": {"stage": 3}}
    with pytest.raises(QLoRADSError, match="device='cpu' with ZeRO-3.*leave device unset"):
        from_pretrained(str(tmp_path), CFG, ds_config=ds, device="cpu")
