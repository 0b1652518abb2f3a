"""QLoRALinear: forward/backward against an independent fp32 reference (bitsandbytes dequantize as
the oracle), frozen base, no-op fresh adapter, checkpointing, merge, training, bad input."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from qlora_ds.errors import QLoRADSError
from qlora_ds.nn import QLoRAConfig, QLoRALinear
from qlora_ds.quant import quantize

from .helpers import bnb_dequantize

IN, OUT = 96, 80


def _bnb_weight(w: torch.Tensor, quant_type: str, dq: bool) -> torch.Tensor:
    import bitsandbytes.functional as bnbF
    packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type=quant_type)
    return bnb_dequantize(packed, state).float()


def _layer(seed=0, dtype=torch.float32, quant_type="nf4", dq=True, bias=True, r=8):
    torch.manual_seed(seed)
    lin = nn.Linear(IN, OUT, bias=bias)
    layer = QLoRALinear.from_linear(lin, QLoRAConfig(quant_type=quant_type, double_quant=dq, r=r, alpha=16,
                                                     dropout=0.0, compute_dtype=dtype))
    nn.init.normal_(layer.lora_B.weight, std=0.1)   # a trained-looking adapter
    return lin, layer


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("quant_type,dq", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_forward_backward_match_fp32_reference(dtype, tol, quant_type, dq, device):
    lin, layer = _layer(dtype=dtype, quant_type=quant_type, dq=dq)
    lin, layer = lin.to(device), layer.to(device)
    w_ref = _bnb_weight(lin.weight.detach(), quant_type, dq)      # independent oracle (bnb's kernel on device)
    torch.manual_seed(1)
    x = torch.randn(2, 5, IN).to(device)
    A = layer.lora_A.weight.detach().clone().requires_grad_(True)
    B = layer.lora_B.weight.detach().clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    y_ref = xr @ w_ref.T + lin.bias.detach().to(dtype).float() + layer.scaling * (xr @ A.T) @ B.T
    xo = x.clone().requires_grad_(True)
    y = layer(xo)
    assert y.dtype == x.dtype
    scale = y_ref.abs().max().item()
    assert (y - y_ref).abs().max().item() <= tol * scale
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    y.backward(g)
    for ours, ref in ((xo.grad, xr.grad), (layer.lora_A.weight.grad, A.grad), (layer.lora_B.weight.grad, B.grad)):
        assert (ours - ref).abs().max().item() <= 2 * tol * ref.abs().max().item()
    for p in (layer.weight, layer.weight_absmax, layer.weight_absmax2, layer.weight_offset, layer.bias):
        if p is not None:
            assert not p.requires_grad and p.grad is None
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A.weight", "lora_B.weight"}


def test_storage_layout_and_meta_construction():
    _, layer = _layer()
    params = dict(layer.named_parameters())
    for name in ("weight", "weight_absmax", "weight_absmax2", "weight_offset"):
        assert params[name].dtype == torch.uint8 and params[name].dim() == 1 and not params[name].requires_grad
    assert layer.bias.dtype == torch.float32 and layer.lora_A.weight.dtype == torch.float32
    qt = layer.quantized_weight()
    assert qt.absmax2.data_ptr() == layer.weight_absmax2.data_ptr()       # views, no copies
    with pytest.raises(RuntimeError):
        layer.weight.requires_grad_(True)                                 # integer params refuse grads
    meta = QLoRALinear(IN, OUT, True, QLoRAConfig(), device="meta")
    assert meta.weight.is_meta and meta.weight.dtype == torch.uint8
    q = quantize(torch.randn(OUT, IN))
    meta.set_quantized_weight(q, torch.zeros(OUT))
    assert not meta.weight.is_meta and torch.equal(meta.weight, q.packed)
    with pytest.raises(QLoRADSError, match="shape"):
        meta.set_quantized_weight(quantize(torch.randn(OUT, IN + 32)), torch.zeros(OUT))
    with pytest.raises(QLoRADSError, match="double_quant"):
        meta.set_quantized_weight(quantize(torch.randn(OUT, IN), double_quant=False), torch.zeros(OUT))


def test_meta_skeleton_filled_from_a_device_weight_keeps_every_part_there():
    """A quantized weight on a GPU fills a meta skeleton on that GPU, the double-quant offset included (it used to be
    made on the CPU). The meta device stands in for the GPU here, as in tests/test_loading_device.py."""
    q = quantize(torch.randn(OUT, IN))
    on = dataclasses.replace(q, packed=q.packed.to("meta"), absmax=q.absmax.to("meta"), absmax2=q.absmax2.to("meta"))
    layer = QLoRALinear(IN, OUT, False, QLoRAConfig(), device="meta")
    layer.set_quantized_weight(on, None)
    frozen = {n: p.device.type for n, p in layer.named_parameters() if n.startswith("weight")}
    assert frozen == dict.fromkeys(("weight", "weight_absmax", "weight_absmax2", "weight_offset"), "meta")
    assert layer.weight_offset.dtype == torch.uint8 and layer.weight_offset.numel() == 4
    assert layer.offset() == float(q.offset)               # from the fill's cache: the meta bytes are never read


def test_fresh_adapter_is_noop(device):
    torch.manual_seed(0)
    lin = nn.Linear(IN, OUT)
    layer = QLoRALinear.from_linear(lin, QLoRAConfig(r=4, compute_dtype=torch.float32)).to(device)
    layer.eval()
    x = torch.randn(3, IN).to(device)
    base = x @ layer.dequantized_weight().T + layer.bias
    assert torch.equal(layer.lora_B.weight, torch.zeros_like(layer.lora_B.weight))
    torch.testing.assert_close(layer(x), base, rtol=1e-6, atol=1e-6)


def test_nonreentrant_checkpointing_same_grads(device):
    layer = _layer(dtype=torch.bfloat16)[1].to(device)
    x = torch.randn(4, IN).to(device)
    def run(ckpt):
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        y = checkpoint(layer, xi, use_reentrant=False) if ckpt else layer(xi)
        y.float().pow(2).sum().backward()
        return xi.grad, layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()
    for a, b in zip(run(False), run(True)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_merge_and_requantize(device):
    layer = _layer(dtype=torch.float32)[1].to(device)
    x = torch.randn(6, IN).to(device)
    merged = layer.merge()
    assert isinstance(merged, nn.Linear) and merged.weight.dtype == torch.float32
    assert merged.weight.device == x.device
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)
    layer_bf = _layer(dtype=torch.bfloat16)[1]
    assert layer_bf.merge().weight.dtype == torch.bfloat16
    new, report = layer.merge_and_requantize()
    assert isinstance(new, QLoRALinear) and not new.lora_B.weight.any() and new.weight.device == x.device
    # What the arithmetic allows: an element x of block b is coded as the NF4 value c nearest to x/A_b (A_b the
    # block's absmax), at most half the widest code gap away (the gap -1.0 .. -0.696 = 0.304), and decoded with
    # the double-quantized absmax A'_b: |x - c·A'_b| <= 0.152·A_b + |A_b - A'_b|
    w = layer.merged_weight_fp32()
    amax = w.reshape(-1, 64).abs().amax(dim=1)
    per_block = (1.0 - 0.6961928009986877) / 2 * amax + (amax - new.quantized_weight().absmax_fp32()).abs()
    err = (new.dequantized_weight(torch.float32) - w).abs()
    assert report["max_abs_error"] == err.max().item() > 0
    assert report["max_abs_error"] <= per_block.max().item() * (1 + 1e-6)
    assert (err.reshape(-1, 64) <= per_block[:, None] * (1 + 1e-6)).all()        # per block, not only the max
    # (here: max 0.027 vs bound 0.035); the Frobenius error is the one of that same err, not a separate guess
    assert report["rel_fro_error"] == pytest.approx((err.norm() / w.norm()).item(), rel=1e-6)
    with torch.no_grad():
        layer.lora_B.weight[0, 0] = float("nan")
    with pytest.raises(QLoRADSError, match="NaN"):
        layer.merge()


def _tiny_mlp(linear_cls):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))


def _swap(model: nn.Module, config: QLoRAConfig) -> nn.Module:
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, QLoRALinear.from_linear(child, config))
        else:
            _swap(child, config)
    return model


def test_training_lowers_loss_and_tracks_bf16_lora(device):
    """QLoRA on an NF4 base vs plain LoRA on the same (dequantized) base: same init, same data."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64))
    data = [torch.randn(32, 64) for _ in range(20)]
    targets = [teacher(d).detach().to(device) for d in data]
    data = [d.to(device) for d in data]
    cfg = QLoRAConfig(r=8, alpha=16, dropout=0.0, compute_dtype=torch.float32)
    q_model = _swap(_tiny_mlp(None), cfg).to(device)
    # reference: dequantized base (frozen fp32 Linear) + identical LoRA init, standard autograd
    ref = {}
    for name, m in q_model.named_modules():
        if isinstance(m, QLoRALinear):
            ref[name] = (m.dequantized_weight(), m.bias.detach(), m.lora_A.weight.detach().clone().requires_grad_(True),
                         m.lora_B.weight.detach().clone().requires_grad_(True), m.scaling)
    def ref_forward(x):
        for i, name in enumerate(["0", "2"]):
            w, b, A, B, s = ref[name]
            x = x @ w.T + b + s * (x @ A.T) @ B.T
            if i == 0:
                x = torch.nn.functional.gelu(x)
        return x
    opt_q = torch.optim.AdamW([p for p in q_model.parameters() if p.requires_grad], lr=1e-2)
    opt_r = torch.optim.AdamW([t for v in ref.values() for t in v[2:4]], lr=1e-2)
    losses_q, losses_r = [], []
    for x, t in zip(data, targets):
        for model_fn, opt, losses in ((q_model, opt_q, losses_q), (ref_forward, opt_r, losses_r)):
            loss = (model_fn(x) - t).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert sum(losses_q[-5:]) < 0.7 * sum(losses_q[:5])
    for a, b in zip(losses_q, losses_r):
        assert abs(a - b) <= 1e-3 * max(abs(b), 1e-3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), "rank"), (dict(r=-2), "rank"), (dict(alpha=0), "alpha"), (dict(dropout=1.0), "dropout"),
    (dict(quant_type="int4"), "quant_type"), (dict(blocksize=48), "blocksize"),
    (dict(compute_dtype=torch.int8), "compute_dtype"), (dict(target_modules="("), "regex"),
    (dict(target_modules=[]), "target_modules"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(QLoRADSError, match=match):
        QLoRAConfig(**kwargs)


def test_config_target_modules():
    assert QLoRAConfig().matches("model.layers.0.mlp.up_proj") and not QLoRAConfig().matches("lm_head")
    c = QLoRAConfig(target_modules=["q_proj", "v_proj"])
    assert c.target_modules == ("q_proj", "v_proj") and c.matches("a.q_proj") and not c.matches("a.q_proj2")
    c = QLoRAConfig(target_modules=r".*\.layers\.0\..*_proj")
    assert c.matches("model.layers.0.mlp.up_proj") and not c.matches("model.layers.1.mlp.up_proj")


@pytest.mark.parametrize("kind", ["qlora", "qalora"])
@pytest.mark.parametrize("rows", [1, 8])
def test_few_row_no_grad_lora_branch_rounds_once(kind, rows):
    """Decoding on CPU (≤ LORA_FEW_ROWS rows, no grad) adds the LoRA branch in the adapter's fp32 and rounds the sum
    to bf16 once: within half a bf16 ulp (+ fp32 accumulation) of base + exact delta. The compute-dtype path rounds
    A·x and the scaled intermediate to bf16 first, which this bound rejects when the delta is large."""
    from qlora_ds.nn import QALoRAConfig, QALoRALinear
    from qlora_ds.nn.functional import LORA_FEW_ROWS
    assert rows <= LORA_FEW_ROWS
    torch.manual_seed(0)
    lin = nn.Linear(IN, OUT)
    if kind == "qlora":
        layer = QLoRALinear.from_linear(lin, QLoRAConfig(r=8, alpha=16, dropout=0.0, compute_dtype=torch.bfloat16))
    else:
        layer = QALoRALinear.from_linear(lin, QALoRAConfig(bits=4, group_size=32, r=8, alpha=16, dropout=0.0,
                                                           compute_dtype=torch.bfloat16))
    nn.init.normal_(layer.lora_B.weight, std=1.0)                 # the delta dominates the output
    x = torch.randn(rows, 1, IN).to(torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
        layer.disable_adapter = True
        base = layer(x)
        layer.disable_adapter = False
        lora_in = layer.pool(x) if kind == "qalora" else x
        delta = layer.scaling * (lora_in.double() @ layer.lora_A.weight.double().t()) @ layer.lora_B.weight.double().t()
    exact = base.double() + delta
    assert out.dtype == torch.bfloat16 and out.shape == exact.shape
    err = (out.double() - exact).abs()
    assert (err <= exact.abs() * 2.0 ** -8 + 1e-5 * exact.abs().max()).all(), err.max().item()


@pytest.mark.parametrize("kind", ["qlora", "qalora"])
@pytest.mark.parametrize("compute,cast", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("rows", [1, 16])
def test_bias_cast_by_module_to_dtype(kind, compute, cast, fused, rows):
    """``model.to(dtype)`` casts the float bias (not the packed base): the layer still computes in its compute
    dtype, with the cast bias, on every path (AMX-fused or not, few rows or many)."""
    from qlora_ds.nn import QALoRAConfig, QALoRALinear
    from qlora_ds.ops import fused_linear
    torch.manual_seed(0)
    lin = nn.Linear(128, 64)                                   # shapes the AMX and few-row kernels take
    nn.init.normal_(lin.bias, std=3.0)                            # a bias that shows in the output
    if kind == "qlora":
        layer = QLoRALinear.from_linear(lin, QLoRAConfig(r=8, alpha=16, dropout=0.0, compute_dtype=compute))
    else:
        layer = QALoRALinear.from_linear(lin, QALoRAConfig(bits=4, group_size=32, r=8, alpha=16, dropout=0.0,
                                                           compute_dtype=compute))
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    layer = layer.to(cast)
    assert layer.bias.dtype == cast and layer.compute_dtype == compute
    x = torch.randn(rows, 128).to(cast)
    with torch.no_grad():
        lora_in = layer.pool(x.float()) if kind == "qalora" else x.float()
        y_ref = (x.float() @ layer.dequantized_weight(torch.float32).t() + layer.bias.float()
                 + layer.scaling * (lora_in @ layer.lora_A.weight.float().t()) @ layer.lora_B.weight.float().t())
    previous = fused_linear.set_enabled(fused)
    try:
        with torch.no_grad():
            y_eval = layer(x)
        xg = x.clone().requires_grad_(True)
        y = layer(xg)
        y.float().sum().backward()
    finally:
        fused_linear.set_enabled(previous)
    for out in (y_eval, y):
        assert out.dtype == cast and out.shape == y_ref.shape
        assert (out.float() - y_ref).abs().max().item() <= 2e-2 * y_ref.abs().max().item()
    assert xg.grad.dtype == cast and torch.isfinite(xg.grad).all()
