"""The fused 4-bit dequantize + AMX GEMM linear (csrc/quant_cpu_amx.cpp, qlora_ds/ops/fused_linear.py).

The AMX cases need a CPU with AMX-BF16 and are skipped elsewhere; their CPU sibling is the dequantize + matmul path
every other machine runs (tests/test_layers*.py), which is also the reference these tests compare against. Where the
rule says the fused path must not run (fp32/fp16 input, shapes it cannot tile, ``set_enabled(False)``, the avx2 path
forced) is tested on every CPU.
"""
import pytest
import torch
import torch.nn.functional as F

from qlora_ds import dequantize, quantize
from qlora_ds.nn import QLoRAConfig, QLoRALinear
from qlora_ds.ops import fused_linear


@pytest.fixture(scope="module")
def amx(cpu_op):
    if not cpu_op.amx_linear_supported():
        pytest.skip("needs a CPU with AMX-BF16 + AVX512-BF16 + AVX512-VBMI (the fused linear's only target)")
    return cpu_op


def _parts(qt):
    return qt.packed, qt.absmax, qt.absmax2, qt.offset, qt.quant_type, qt.blocksize, qt.nested_blocksize, qt.shape


@pytest.mark.parametrize("quant_type, dq, blocksize", [("nf4", True, 64), ("nf4", False, 64), ("fp4", True, 64),
                                                       ("fp4", False, 128), ("nf4", True, 256),
                                                       ("nf4", True, 4096), ("fp4", False, 4096)])
def test_fused_dequantization_is_bit_exact(amx, quant_type, dq, blocksize):
    """x = I gives deq(W)ᵀ and g = I gives deq(W) exactly (one product per sum): the values the kernel builds its
    tiles from are the dequantizer's, bit for bit, in both tile layouts. Block 4096: 96·192 = 4.5 blocks, the last one
    partial (one absmax per started block)."""
    torch.manual_seed(0)
    out_f, in_f = 96, 192
    qt = quantize(torch.randn(out_f, in_f, dtype=torch.bfloat16) * 3, quant_type, blocksize, dq)
    w = dequantize(qt, torch.bfloat16)
    eye_in, eye_out = torch.eye(in_f, dtype=torch.bfloat16), torch.eye(out_f, dtype=torch.bfloat16)
    assert torch.equal(fused_linear.linear_4bit(eye_in, *_parts(qt)), w.t())
    assert torch.equal(fused_linear.linear_4bit_grad_input(eye_out, *_parts(qt)), w)


@pytest.mark.parametrize("m", [1, 37, 100, 513])
def test_fused_matmuls_match_fp32_as_closely_as_torch_bf16(amx, m):
    torch.manual_seed(m)
    out_f, in_f = 160, 256
    qt = quantize(torch.randn(out_f, in_f), "nf4", 64, True)
    w = dequantize(qt, torch.bfloat16)
    x = torch.randn(m, in_f, dtype=torch.bfloat16)
    g = torch.randn(m, out_f, dtype=torch.bfloat16)
    for fused, torch_bf16, exact in (
            (fused_linear.linear_4bit(x, *_parts(qt)), F.linear(x, w), F.linear(x.float(), w.float())),
            (fused_linear.linear_4bit_grad_input(g, *_parts(qt)), g @ w, g.float() @ w.float())):
        err = (fused.float() - exact).abs().max() / exact.abs().max()
        ref_err = (torch_bf16.float() - exact).abs().max() / exact.abs().max()
        assert fused.dtype == torch.bfloat16 and err <= max(2 * ref_err, 4e-3), (err, ref_err)


def test_layer_fused_equals_dequantize_then_matmul_under_checkpointing(amx):
    """A QLoRALinear's output and every gradient through the fused path match the dequantize + matmul path, also
    under non-reentrant checkpointing (the recompute takes the same path and saves the same tensors)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(256, 192, bias=True).to(torch.bfloat16)
    layer = QLoRALinear.from_linear(base, QLoRAConfig(r=8, dropout=0.0, compute_dtype="bf16"))
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 40, 256, dtype=torch.bfloat16)
    results = {}
    for on in (True, False):
        previous = fused_linear.set_enabled(on)
        try:
            xi = x.clone().requires_grad_(True)
            layer.zero_grad()
            y = torch.utils.checkpoint.checkpoint(layer, xi, use_reentrant=False)
            y.float().square().mean().backward()
        finally:
            fused_linear.set_enabled(previous)
        results[on] = [y.detach().float(), xi.grad.float(), layer.lora_A.weight.grad, layer.lora_B.weight.grad]
    for a, b in zip(results[True], results[False]):
        assert ((a - b).abs().max() / b.abs().max()) < 2e-2


def test_fused_path_is_taken_only_where_it_applies(cpu_op):
    supported = fused_linear.supported
    x = torch.zeros(4, 128, dtype=torch.bfloat16)
    amx_cpu = cpu_op.amx_linear_supported()
    assert supported(x, (64, 128), 64) is amx_cpu
    assert not supported(x.float(), (64, 128), 64) and not supported(x.half(), (64, 128), 64)
    assert not supported(x, (64, 96), 64)              # in_features not a multiple of 64
    assert not supported(x, (48, 128), 64)             # out_features not a multiple of 32
    assert not supported(x, (64, 128), 32)             # blocks narrower than one 64-column tile step
    rows = torch.zeros(512, 4096, dtype=torch.bfloat16)  # where dequantize + oneDNN's matmul measured faster:
    assert not supported(rows, (1024, 4096), 64)       # 512 rows of a small (4M-element) weight
    assert supported(rows, (4096, 4096), 64) is amx_cpu  # a large one: fused up to 1024 rows
    assert not supported(torch.zeros(2, 1024, 4096, dtype=torch.bfloat16), (4096, 4096), 64)
    assert supported(torch.zeros(2, 128, 4096, dtype=torch.bfloat16), (64, 4096), 64) is amx_cpu
    previous = fused_linear.set_enabled(False)
    try:
        assert not supported(x, (64, 128), 64)
    finally:
        fused_linear.set_enabled(previous)
    if "avx2" in cpu_op.supported_cpu_isas():
        before = cpu_op.cpu_isa()
        cpu_op.set_cpu_isa("avx2")
        try:
            assert not cpu_op.amx_linear_supported() and not supported(x, (64, 128), 64)
        finally:
            cpu_op.set_cpu_isa(before)


def test_fused_path_refuses_zero_rows(cpu_op):
    """0 rows (an MoE expert that got no tokens) take the generic path, which returns an empty result, on every
    CPU; the fused path would otherwise be chosen for this shape on an AMX CPU."""
    assert fused_linear.supported(torch.zeros(1, 128, dtype=torch.bfloat16), (64, 128), 64) is \
        cpu_op.amx_linear_supported()
    assert not fused_linear.supported(torch.zeros(0, 128, dtype=torch.bfloat16), (64, 128), 64)
    assert not fused_linear.supported(torch.zeros(2, 0, 128, dtype=torch.bfloat16), (64, 128), 64)


@pytest.mark.parametrize("blocksize", [64, 128])
def test_layer_with_zero_tokens_runs_forward_and_backward(amx, blocksize):
    """A bf16 QLoRALinear given 0 tokens gives empty outputs and zero LoRA gradients, as nn.Linear does (it used to
    die with SIGFPE on AMX CPUs). Blocksize 128 on in=192: the small-rows path does not apply to the forward."""
    torch.manual_seed(0)
    layer = QLoRALinear.from_linear(torch.nn.Linear(192, 128), QLoRAConfig(r=4, dropout=0.0, blocksize=blocksize,
                                                                          compute_dtype="bf16"))
    x = torch.randn(0, 192, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    y.float().sum().backward()
    assert y.shape == (0, 128) and y.dtype == torch.bfloat16
    assert x.grad.shape == (0, 192)
    assert torch.equal(layer.lora_A.weight.grad, torch.zeros_like(layer.lora_A.weight))
    assert torch.equal(layer.lora_B.weight.grad, torch.zeros_like(layer.lora_B.weight))
    with torch.no_grad():
        assert layer(torch.zeros(2, 0, 192, dtype=torch.bfloat16)).shape == (2, 0, 128)


def test_fused_kernels_return_empty_for_zero_rows(amx):
    """The C++ kernels themselves accept an empty activation (defence in depth behind ``supported``)."""
    qt = quantize(torch.randn(128, 192), "nf4", 64, True)
    assert fused_linear.linear_4bit(torch.empty(0, 192, dtype=torch.bfloat16), *_parts(qt)).shape == (0, 128)
    assert fused_linear.linear_4bit_grad_input(torch.empty(0, 128, dtype=torch.bfloat16), *_parts(qt)).shape == (0, 192)
