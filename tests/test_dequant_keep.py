"""The dequantized weight kept from forward to backward: same gradients, a bounded pool reused step after step."""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from qlora_ds.nn import QLoRAConfig, QLoRALinear
from qlora_ds.nn import functional as fn


@pytest.fixture
def pool():
    saved = fn.KEEP_LIMIT
    fn._kept.clear()
    yield fn
    fn.set_keep_limit(saved)
    fn._kept.clear()


def _layers(n=2, seed=0):
    torch.manual_seed(seed)
    cfg = QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32)
    layers = [QLoRALinear.from_linear(torch.nn.Linear(32, 32, bias=True), cfg) for _ in range(n)]
    for layer in layers:
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    return layers


def _grads(layers, x, ckpt=False):
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    xi = x.detach().requires_grad_(True)
    h = xi
    for layer in layers:
        h = checkpoint(layer, h, use_reentrant=False) if ckpt else layer(h)
    h.pow(2).sum().backward()
    return [xi.grad] + [p.grad for layer in layers for p in (layer.lora_A.weight, layer.lora_B.weight)]


@pytest.mark.parametrize("ckpt", [False, True])
def test_same_gradients_and_bounded_reused_pool(pool, ckpt):
    layers, x = _layers(3), torch.randn(6, 32)
    pool.set_keep_limit(0)
    ref = _grads(layers, x, ckpt)
    assert pool._kept == []
    pool.set_keep_limit(1 << 20)
    for _ in range(3):                      # steps: buffers are reused, not added
        got = _grads(layers, x, ckpt)
        assert all(torch.equal(g, r) for g, r in zip(got, ref))
    # without checkpointing all three layers are alive before backward; with it one at a time
    assert len(pool._kept) == (1 if ckpt else 3)


def test_limit_and_no_grad(pool):
    layers, x = _layers(2), torch.randn(6, 32)
    pool.set_keep_limit(32 * 32 * 4)        # room for one weight: the second layer dequantizes again
    ref = [g.clone() for g in _grads(layers, x)]
    assert len(pool._kept) == 1
    pool.set_keep_limit(0)
    assert pool._kept == []
    assert all(torch.equal(g, r) for g, r in zip(_grads(layers, x), ref))
    pool.set_keep_limit(1 << 20)
    with torch.no_grad():
        layers[0](x.requires_grad_(True))
    assert pool._kept == []                 # nothing will be differentiated: nothing kept


def test_planner_counts_the_pool():
    from dataclasses import replace

    from qlora_ds.plan import memory
    from qlora_ds.plan.presets import shape_from_hf_config
    from tests.tiny_models import tiny_config

    assert memory.PlanConfig.keep_dequant_bytes == fn.KEEP_LIMIT or "QLORA_DS_KEEP_DEQUANT_MB" in __import__("os").environ
    shape = shape_from_hf_config(tiny_config("llama", hidden=256, layers=4).to_dict())
    cfg = memory.PlanConfig(shape=shape, device="cpu", compute_dtype="fp32")
    items = {it.name: it.bytes for it in memory.estimate_memory(cfg).items}
    assert items["dequant_keep"] == shape.linear_params_per_layer * 4            # one layer under checkpointing
    no_ckpt = {it.name: it.bytes for it in memory.estimate_memory(replace(cfg, grad_ckpt=False)).items}
    assert no_ckpt["dequant_keep"] == min(fn.KEEP_LIMIT, 4 * shape.linear_params_per_layer * 4)
    off = {it.name for it in memory.estimate_memory(replace(cfg, keep_dequant_bytes=0)).items}
    assert "dequant_keep" not in off


def test_checkpointed_block_with_a_full_pool_in_the_recompute(pool):
    """One checkpoint around several layers: the first pass keeps every weight (each buffer is freed at once),
    the recompute has room for one only. The saved tensors must keep their shapes (torch.utils.checkpoint
    refuses a recompute whose metadata differs) and the gradients stay exact."""
    layers, x = _layers(3), torch.randn(6, 32)
    pool.set_keep_limit(0)
    ref = [g.clone() for g in _grads(layers, x)]

    def block(h):
        for layer in layers:
            h = layer(h)
        return h

    pool.set_keep_limit(32 * 32 * 4)
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    xi = x.detach().requires_grad_(True)
    checkpoint(block, xi, use_reentrant=False).pow(2).sum().backward()
    got = [xi.grad] + [p.grad for layer in layers for p in (layer.lora_A.weight, layer.lora_B.weight)]
    assert all(torch.equal(g, r) for g, r in zip(got, ref))
    assert len(pool._kept) == 1
