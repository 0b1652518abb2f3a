"""The fused INT-N × few-rows linear (csrc/quant_cpu_gemv_intn.cpp, ``small_rows.linear_intn``) and QA-LoRA's use of it.

The kernel against dequantize + matmul (weights from the torch reference) for bits 2/3/4 and several group sizes, on
every SIMD path this CPU has; x = I reproduces the dequantizer's weights exactly; the QA-LoRA layer with the path on
and off (forward, and forward + backward through the dequantizing backward); where the path must not be taken.
"""
import pytest
import torch

from qlora_ds import ops
from qlora_ds.nn import QALoRAConfig, QALoRALinear
from qlora_ds.ops import small_rows
from qlora_ds.quant import intn

from .test_small_rows import _run, check_linear

BITS = [2, 3, 4]
# (out, in, group_size): odd out; group sizes 32/64/128; 24 and 40 (8 * odd: the SIMD loops' one-step tails, and not
# a multiple of 16: the AVX-512 path hands such calls to the AVX2 loop)
SHAPES = [(33, 256, 32), (23, 192, 64), (17, 384, 128), (9, 120, 24), (5, 80, 40)]
ROWS = [1, 2, 3, 8, 13]   # 13: more rows than one pass of any path takes (the op allows it; the layer stops at 8)


def _parts(qt):
    return qt.qweight, qt.scales, qt.zeros, qt.bits, qt.group_size, qt.shape


def _reference_weight(qt, dtype=torch.float32) -> torch.Tensor:
    with ops.use_backend("torch"):
        return qt.dequantize(dtype)


def _quantized(out_f, in_f, bits, gs):
    qt = intn.quantize(torch.randn(out_f, in_f) * 2, bits, gs)
    # non-integer zero points, as after a QA-LoRA merge: the table must use them as they are
    return intn.IntNQuantizedTensor(qt.qweight, qt.scales, qt.zeros + torch.rand_like(qt.zeros) * 0.3 - 0.15,
                                    qt.shape, bits, gs)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_dequantize_then_matmul(isa_op, bits, dtype):
    torch.manual_seed(bits)
    for out_f, in_f, gs in SHAPES:
        qt = _quantized(out_f, in_f, bits, gs)
        check_linear(small_rows.linear_intn, _parts(qt), _reference_weight(qt).double(), ROWS, dtype)


@pytest.mark.parametrize("bits", BITS)
def test_every_path_decodes_the_same_weights(isa_op, bits):
    """x = I gives deq(W)ᵀ exactly (one product per sum; the table of (q - zero) * scale rounded as the dequantizer
    rounds it): each path reads the codes in stream order, the right group's scale and zero, nothing of other rows;
    in bf16 the same, rounded once (= the dequantizer's bf16 output)."""
    torch.manual_seed(10 + bits)
    for out_f, in_f, gs in SHAPES:
        qt = _quantized(out_f, in_f, bits, gs)
        for dtype in (torch.float32, torch.bfloat16):
            eye = torch.eye(in_f, dtype=dtype)
            y = torch.cat([small_rows.linear_intn(eye[i:i + 8], *_parts(qt)) for i in range(0, in_f, 8)])
            assert torch.equal(y, _reference_weight(qt, dtype).t())
            assert torch.equal(y, qt.dequantize(dtype).t())          # the compiled dequantizer, same bits


def test_op_checks_its_arguments(cpu_op):
    qt = intn.quantize(torch.randn(8, 128), 4, 32)
    args = (qt.qweight.reshape(-1), qt.scales.reshape(-1), qt.zeros.reshape(-1))
    x = torch.randn(1, 128)
    with pytest.raises(RuntimeError, match="group_size"):
        cpu_op.small_rows_linear_intn(x[:, :100].contiguous(), *args, 4, 32, 8, 100)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        cpu_op.small_rows_linear_intn(x.half(), *args, 4, 32, 8, 128)
    with pytest.raises(RuntimeError, match="bits"):
        cpu_op.small_rows_linear_intn(x, *args, 5, 32, 8, 128)
    with pytest.raises(RuntimeError, match="qweight"):
        cpu_op.small_rows_linear_intn(x, *args, 3, 32, 8, 128)
    with pytest.raises(RuntimeError, match="scales"):
        cpu_op.small_rows_linear_intn(x, *args, 4, 64, 8, 128)
    assert cpu_op.small_rows_linear_intn(x[:0], *args, 4, 32, 8, 128).shape == (0, 8)


def _layer(dtype, bits=4, gs=32, bias=True, shape=(96, 192)):
    torch.manual_seed(0)
    base = torch.nn.Linear(shape[1], shape[0], bias=bias)
    cfg = QALoRAConfig(bits=bits, group_size=gs, r=8, alpha=16, dropout=0.0, compute_dtype=dtype)
    layer = QALoRALinear.from_linear(base, cfg)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits, gs, rows, ckpt", [(4, 32, 1, False), (3, 64, 2, True), (2, 32, 2, False)])
def test_layer_same_output_and_gradients_with_the_path_on_and_off(cpu_op, dtype, bits, gs, rows, ckpt):
    """The small-rows forward followed by the dequantizing backward gives the dequantize + matmul path's output and
    gradients, under non-reentrant checkpointing too."""
    layer = _layer(dtype, bits, gs)
    x = torch.randn(rows, 1, 192).to(dtype)
    takes = small_rows.supported_intn(x, (96, 192), gs)
    assert takes or (rows > 1 and cpu_op.cpu_isa() == "scalar")
    got, n_on = _run(layer, x, True, ckpt, kernel="linear_intn")
    ref, n_off = _run(layer, x, False, ckpt, kernel="linear_intn")
    assert n_on == (2 if ckpt else 1) * takes and n_off == 0    # checkpointing: the forward runs again in backward
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype and ((a.float() - b.float()).abs().max() / b.float().abs().max()) < tol


def test_layer_decoding_under_no_grad_and_the_torch_fallback(cpu_op):
    layer = _layer(torch.float32, 3, 64, bias=False, shape=(64, 128))
    x = torch.randn(1, 128)
    with torch.no_grad():
        (y_on,), n_on = _run(layer, x, True, grad=False, kernel="linear_intn")
        (y_off,), _ = _run(layer, x, False, grad=False, kernel="linear_intn")
        with ops.use_backend("torch"):         # the op cannot build: the reference path, never this one
            assert not small_rows.supported_intn(x, (64, 128), 64)
            (y_ref,), n_ref = _run(layer, x, True, grad=False, kernel="linear_intn")
    assert n_on == 1 and n_ref == 0
    torch.testing.assert_close(y_on, y_off, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y_on, y_ref, rtol=1e-5, atol=1e-6)


def test_path_is_taken_only_where_it_applies(cpu_op):
    supported = small_rows.supported_intn
    before = cpu_op.cpu_isa()
    cpu_op.set_cpu_isa("auto")
    try:
        simd = cpu_op.cpu_isa() != "scalar"
        x = torch.zeros(1, 128)
        assert supported(x, (64, 128), 32) and supported(x.bfloat16(), (64, 128), 32)
        assert supported(torch.zeros(2, 4, 128, dtype=torch.bfloat16), (48, 128), 64) is simd  # 8 rows, no AMX cap
        assert not supported(torch.zeros(3, 3, 128), (64, 128), 32)           # 9 rows: more than MAX_ROWS
        assert not supported(x.half(), (64, 128), 32)                          # fp16: not a dtype of the kernel
        assert not supported(torch.zeros(1, 96), (64, 96), 64)                 # in_features % group_size
        assert not supported(x, (64, 128), 12)                                 # group size not a multiple of 8
        assert not supported(x, (64, 96), 32)                                  # x does not fit the weight
        cpu_op.set_cpu_isa("scalar")
        assert supported(x, (64, 128), 32) and not supported(torch.zeros(2, 128), (64, 128), 32)
        cpu_op.set_cpu_isa("auto")
        previous = small_rows.set_enabled(False)
        try:
            assert not supported(x, (64, 128), 32)
        finally:
            small_rows.set_enabled(previous)
    finally:
        cpu_op.set_cpu_isa(before)
