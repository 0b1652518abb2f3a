"""LoRA-input dropout on the CPU: a counter-hash mask, bit-exact with its pure-torch twin on every SIMD path,
dropout's statistics, a backward that regenerates the mask, and exact replay under activation checkpointing."""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from qlora_ds.nn import QLoRAConfig, QLoRALinear
from qlora_ds.nn import dropout as ldrop
from qlora_ds.ops import load_backend, reference

op = load_backend("cpu")
needs_op = pytest.mark.skipif(op is reference, reason="the compiled CPU op did not build (its warning says why)")


@pytest.fixture
def isa_paths():
    yield op.supported_cpu_isas()
    op.set_cpu_isa("auto")


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_equals_reference_on_every_simd_path(isa_paths, dtype):
    x = torch.randn(5, 333, 41).to(dtype)           # odd sizes: vector bodies and scalar tails
    x.view(-1)[[7, 4000]] = float("nan")            # x · 0 keeps NaN, as torch's dropout
    for isa in isa_paths:
        op.set_cpu_isa(isa)
        for p, seed in ((0.05, 1234), (0.1, -3), (0.5, 2 ** 61 + 5), (0.0, 1), (1.0, 2)):
            got, want = op.hash_dropout(x, p, seed), reference.hash_dropout(x, p, seed)
            assert torch.equal(got.isnan(), want.isnan()), (isa, p)
            assert torch.equal(got.nan_to_num(0.5), want.nan_to_num(0.5)), (isa, p, seed)


def test_mask_statistics():
    n = 1 << 20
    for p in (0.05, 0.1, 0.5):
        keep = reference.dropout_keep(n, p, seed=11).float()
        sd = (p * (1 - p) / n) ** 0.5
        assert abs((1 - keep.mean().item()) - p) < 5 * sd
        # neighbours and the next seed's mask are independent of this one: P(both kept) = (1-p)²
        for other in (keep.roll(1), keep.roll(64), reference.dropout_keep(n, p, seed=12).float()):
            both = (keep * other).mean().item()
            assert abs(both - (1 - p) ** 2) < 5 * ((1 - p) ** 2 * (1 - (1 - p) ** 2) / n) ** 0.5


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_forward_backward(dtype, monkeypatch):
    calls = []
    real = ldrop._HashDropout.apply
    monkeypatch.setattr(ldrop._HashDropout, "apply", lambda *a: (calls.append(a[1:3]), real(*a))[1])
    drop = ldrop.LoRADropout(0.25)
    x = (torch.rand(64, 96) + 0.5).to(dtype).requires_grad_(True)     # no zero inputs: y != 0 iff kept
    w = torch.randn(64, 96).to(dtype)
    y = drop(x)
    (y * w).sum().backward()
    (p, seed), = calls
    keep = reference.dropout_keep(x.numel(), p, seed).view(x.shape)
    assert torch.equal(y != 0, keep) and abs(1 - keep.float().mean().item() - 0.25) < 0.02
    assert torch.equal(y, reference.hash_dropout(x.detach(), 0.25, seed))
    assert torch.equal(x.grad, reference.hash_dropout(w, 0.25, seed))          # backward: the same mask and scale
    drop.eval()
    assert drop(x) is x or torch.equal(drop(x), x)
    assert len(calls) == 1                                                     # evaluation never drops


def test_falls_back_to_torch_dropout_without_the_op(monkeypatch):
    monkeypatch.setattr(ldrop, "load_backend", lambda device: reference)
    torch.manual_seed(0)
    got = ldrop.LoRADropout(0.5)(torch.ones(1000))
    torch.manual_seed(0)
    assert torch.equal(got, torch.nn.functional.dropout(torch.ones(1000), 0.5, True))


@needs_op
def test_same_mask_when_checkpointing_recomputes():
    """Checkpointing restores torch's generator before recomputing: the recomputed layer draws the same seed,
    so gradients equal the run without checkpointing, bit for bit."""
    torch.manual_seed(0)
    cfg = QLoRAConfig(r=4, alpha=8, dropout=0.3, compute_dtype=torch.float32)
    layers = [QLoRALinear.from_linear(torch.nn.Linear(64, 64), cfg) for _ in range(2)]
    for layer in layers:
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
        layer.train()
    assert isinstance(layers[0].lora_dropout, ldrop.LoRADropout)
    x = torch.randn(8, 64)

    def grads(ckpt):
        for layer in layers:
            layer.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        h = x
        for layer in layers:
            h = checkpoint(layer, h, use_reentrant=False) if ckpt else layer(h)
        h.pow(2).sum().backward()
        return [p.grad.clone() for layer in layers for p in (layer.lora_A.weight, layer.lora_B.weight)]

    plain, ckpt = grads(False), grads(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, ckpt))
    torch.manual_seed(6)                          # another seed: another mask
    h = x
    for layer in layers:
        h = layer(h)
    layers[0].zero_grad(set_to_none=True)
    h.pow(2).sum().backward()
    assert not torch.equal(layers[0].lora_A.weight.grad, plain[0])
