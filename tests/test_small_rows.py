"""The fused 4-bit × few-rows linear (csrc/quant_cpu_gemv.cpp, qlora_ds/ops/small_rows.py) and the layers' use of it;
its INT-N twin (csrc/quant_cpu_gemv_intn.cpp) for QA-LoRA: tests/test_small_rows_intn.py.

The kernel against dequantize + matmul (weights from the torch reference), on every SIMD path this CPU has; the
layer with the path on and off (forward, and forward + backward through the dequantizing backward); where the path
must not be taken.
"""
import importlib

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from qlora_ds import ops, quantize
from qlora_ds.nn import QLoRAConfig, QLoRALinear
from qlora_ds.ops import fused_linear, small_rows

# (out, in, blocksize, nested): odd out; in not a multiple of 64*8; 32-blocks whose nested blocks straddle weight
# rows; in = 33 blocks of 64, which the kernel walks in several L1-sized passes at 3 and 8 rows
SHAPES = [(33, 192, 64, 256), (23, 96, 32, 32), (40, 2112, 64, 256), (5, 256, 128, 32)]
ROWS = [1, 2, 3, 5, 8, 13]   # 13: more rows than one pass of any path takes (the op allows it; the layers stop at 8)


def _parts(qt):
    return qt.packed, qt.absmax, qt.absmax2, qt.offset, qt.quant_type, qt.blocksize, qt.nested_blocksize, qt.shape


def _reference_weight(qt) -> torch.Tensor:
    with ops.use_backend("torch"):
        return qt.dequantize(torch.float32)


def check_linear(linear, parts, w: torch.Tensor, rows_list, dtype: torch.dtype) -> None:
    """``linear(x, *parts[, bias=])`` == x · wᵀ (+ bias) at each row count; leading dimensions kept; an fp32 bias on
    bf16 input."""
    out_f, in_f = w.shape
    bias = torch.randn(out_f).to(dtype)
    for rows in rows_list:
        x = torch.randn(rows, in_f).to(dtype)
        exact = x.double() @ w.t()
        _check_close(linear(x, *parts), exact, dtype)
        _check_close(linear(x, *parts, bias=bias), exact + bias.double(), dtype)
    x = torch.randn(2, 1, in_f).to(dtype)
    y = linear(x, *parts, bias=bias.float())
    assert y.shape == (2, 1, out_f)
    _check_close(y.view(2, out_f), x.view(2, in_f).double() @ w.t() + bias.double(), dtype)


def _check_close(y: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> None:
    """fp32: the accumulation order only (1e-5 of the largest output); bf16: one rounding of that (half an ulp)."""
    assert y.dtype == dtype and y.shape == exact.shape
    scale = exact.abs().max().item()
    err = (y.double() - exact).abs()
    bound = 1e-5 * scale + (exact.abs() * 2.0 ** -8 if dtype == torch.bfloat16 else 0.0)
    assert (err <= bound).all(), (err.max().item(), scale)


@pytest.mark.parametrize("quant_type, dq", [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_dequantize_then_matmul(isa_op, quant_type, dq, dtype):
    torch.manual_seed(0)
    for out_f, in_f, bs, nested in SHAPES:
        qt = quantize(torch.randn(out_f, in_f) * 2, quant_type, bs, dq, nested)
        check_linear(small_rows.linear_4bit, _parts(qt), _reference_weight(qt).double(), ROWS, dtype)


def test_every_path_decodes_the_same_weights(isa_op):
    """x = I gives deq(W)ᵀ exactly (one product per sum, the block's table scaled once): each path reads the high
    nibble as the first element, the right block's absmax (double quant included), and nothing from other rows."""
    torch.manual_seed(1)
    for quant_type, dq, (out_f, in_f, bs, nested) in [("nf4", True, SHAPES[1]), ("fp4", False, SHAPES[3]),
                                                      ("nf4", True, SHAPES[0])]:
        qt = quantize(torch.randn(out_f, in_f), quant_type, bs, dq, nested)
        w = _reference_weight(qt)
        eye = torch.eye(in_f)
        y = torch.cat([small_rows.linear_4bit(eye[i:i + 8], *_parts(qt)) for i in range(0, in_f, 8)])
        assert torch.equal(y, w.t())


@pytest.mark.parametrize("in_f, bs", [(96, 48), (90, 18)])
def test_blocksize_not_a_multiple_of_32_takes_the_scalar_loop(isa_op, in_f, bs):
    """The raw op accepts any even blocksize (the formats allow powers of two >= 32): one the 32-element SIMD steps
    would straddle runs the scalar loop on every path (18: its 4-element steps leave a pair per block)."""
    torch.manual_seed(2)
    out_f = 5
    packed, absmax = ops.quantize_4bit(torch.randn(out_f, in_f), "nf4", bs)
    with ops.use_backend("torch"):
        w = ops.dequantize_4bit(packed, absmax, "nf4", bs, (out_f, in_f), torch.float32).double()
    x = torch.randn(3, in_f)
    y = small_rows.linear_4bit(x, packed, absmax, None, None, "nf4", bs, 256, (out_f, in_f))
    _check_close(y, x.double() @ w.t(), torch.float32)


def test_op_checks_its_arguments(cpu_op):
    qt = quantize(torch.randn(8, 128), "nf4", 64, False)
    args = fused_linear._weight_args(qt.packed, qt.absmax, None, None, "nf4")
    x = torch.randn(1, 128)
    with pytest.raises(RuntimeError, match="multiple of blocksize"):
        cpu_op.small_rows_linear(x[:, :96].contiguous(), *args, 64, 256, 12, 96)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        cpu_op.small_rows_linear(x.half(), *args, 64, 256, 8, 128)
    with pytest.raises(RuntimeError, match="packed"):
        cpu_op.small_rows_linear(x, *args, 64, 256, 16, 128)
    assert cpu_op.small_rows_linear(x[:0], *args, 64, 256, 8, 128).shape == (0, 8)


def _layer(dtype, bias=True, dq=True, quant_type="nf4", shape=(96, 192)):
    torch.manual_seed(0)
    base = torch.nn.Linear(shape[1], shape[0], bias=bias)
    cfg = QLoRAConfig(r=8, alpha=16, dropout=0.0, compute_dtype=dtype, double_quant=dq, quant_type=quant_type)
    layer = QLoRALinear.from_linear(base, cfg)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    return layer


def _run(layer, x, on: bool, ckpt=False, grad=True, kernel="linear_4bit"):
    """Output and gradients (x, lora_A, lora_B) with the path on or off; counts the calls that took it (those of
    ``small_rows.<kernel>``)."""
    calls = []
    real = getattr(small_rows, kernel)

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    previous = small_rows.set_enabled(on)
    setattr(small_rows, kernel, spy)
    try:
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(grad)
        y = checkpoint(layer, xi, use_reentrant=False) if ckpt else layer(xi)
        if grad:
            y.float().square().sum().backward()
    finally:
        setattr(small_rows, kernel, real)
        small_rows.set_enabled(previous)
    grads = [xi.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad] if grad else []
    return [y.detach()] + grads, len(calls)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, ckpt", [(1, False), (2, True), (2, False)])
def test_layer_same_output_and_gradients_with_the_path_on_and_off(cpu_op, dtype, rows, ckpt):
    """The small-rows forward followed by the dequantizing (or AMX) backward gives the gradients of the dequantize +
    matmul path: nothing of the forward is kept for backward, under non-reentrant checkpointing too."""
    layer = _layer(dtype)
    x = torch.randn(rows, 1, 192).to(dtype)
    takes = small_rows.supported(x, (96, 192), 64)        # 2 rows: not where the kernels run their scalar loop
    assert takes or (rows > 1 and cpu_op.cpu_isa() == "scalar")
    got, n_on = _run(layer, x, True, ckpt)
    ref, n_off = _run(layer, x, False, ckpt)
    assert n_on == (2 if ckpt else 1) * takes and n_off == 0    # checkpointing: the forward runs again in backward
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype and ((a.float() - b.float()).abs().max() / b.float().abs().max()) < tol


@pytest.mark.parametrize("quant_type, dq", [("nf4", False), ("fp4", True)])
def test_layer_decoding_under_no_grad_and_the_torch_fallback(cpu_op, quant_type, dq):
    layer = _layer(torch.float32, bias=False, dq=dq, quant_type=quant_type, shape=(64, 128))
    x = torch.randn(1, 128)
    with torch.no_grad():
        (y_on,), n_on = _run(layer, x, True, grad=False)
        (y_off,), _ = _run(layer, x, False, grad=False)
        with ops.use_backend("torch"):         # the op cannot build: the reference path, never this one
            assert not small_rows.supported(x, (64, 128), 64)
            (y_ref,), n_ref = _run(layer, x, True, grad=False)
    assert n_on == 1 and n_ref == 0
    torch.testing.assert_close(y_on, y_off, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y_on, y_ref, rtol=1e-5, atol=1e-6)


@pytest.fixture
def widest_isa(cpu_op):
    before = cpu_op.cpu_isa()
    cpu_op.set_cpu_isa("auto")
    yield cpu_op
    cpu_op.set_cpu_isa(before)


def test_path_is_taken_only_where_it_applies(widest_isa, monkeypatch):
    supported = small_rows.supported
    simd = widest_isa.cpu_isa() != "scalar"                               # scalar loop only: 1 row
    x = torch.zeros(1, 128)
    assert supported(x, (64, 128), 64) and supported(x.bfloat16(), (64, 128), 64)
    assert supported(torch.zeros(2, 4, 128), (48, 128), 128) is simd      # 8 rows, any out_features
    assert not supported(torch.zeros(3, 3, 128), (64, 128), 64)           # 9 rows: more than MAX_ROWS
    assert not supported(x.half(), (64, 128), 64)                          # fp16: not a dtype of the kernel
    assert not supported(torch.zeros(1, 96), (64, 96), 64)                 # in_features % blocksize
    assert not supported(x, (64, 96), 32)                                  # x does not fit the weight
    # bf16 calls that the AMX fused linear takes: this path only up to MAX_ROWS_BESIDE_AMX rows
    x5 = torch.zeros(5, 128, dtype=torch.bfloat16)
    assert supported(x5, (64, 128), 64) is (simd and not fused_linear.supported(x5, (64, 128), 64))
    assert supported(x5.float(), (64, 128), 64) is simd and supported(x5[:4], (64, 128), 64) is simd
    widest_isa.set_cpu_isa("scalar")
    assert supported(x, (64, 128), 64) and not supported(x5[:2].float(), (64, 128), 64)
    widest_isa.set_cpu_isa("auto")
    previous = small_rows.set_enabled(False)
    try:
        assert not supported(x, (64, 128), 64)
    finally:
        small_rows.set_enabled(previous)
    monkeypatch.setenv(small_rows.ENV, "0")
    try:
        importlib.reload(small_rows)                                       # the switch is read at import
        assert not small_rows.supported(x, (64, 128), 64)
    finally:
        monkeypatch.delenv(small_rows.ENV)
        importlib.reload(small_rows)
    assert small_rows.supported(x, (64, 128), 64)
