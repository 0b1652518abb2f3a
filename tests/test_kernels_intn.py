"""The compiled INT-N (QA-LoRA) quant ops against the torch reference, bit for bit, and the format's entry points."""

import pytest
import torch

from qlora_ds import ops
from qlora_ds.ops import reference as ref
from qlora_ds.ops.builder import load_op
from qlora_ds.quant import intn


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HUGE = {torch.float32: 1e37, torch.bfloat16: 1e37, torch.float16: 2e4}


def same_bits(a, b, nan_ok=False):
    assert a.dtype == b.dtype and a.shape == b.shape
    if nan_ok and a.is_floating_point():  # NaN bit patterns differ between torch's own scalar and vector casts
        both = torch.isnan(a) & torch.isnan(b)
        a, b = a.masked_fill(both, 0), b.masked_fill(both, 0)
    if a.is_floating_point():
        view = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
        a, b = a.view(view), b.view(view)
    return torch.equal(a.cpu(), b.cpu())


def make_weight(out_f, in_f, group_size, dtype, seed=0):
    """Random rows of varied scale with a constant group, a non-negative group (zero point -0.0), ±huge and tiny
    groups, and a half-integer-heavy group (ties of the rounding)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * torch.rand(out_f, 1, generator=g) * 3
    flat = w.view(-1)
    gs = group_size
    flat[:gs] = 0.7                                                   # constant group
    flat[gs : 2 * gs] = torch.rand(gs, generator=g)                   # min > 0: round(-min/scale) = -0.0
    flat[2 * gs : 3 * gs] = torch.randn(gs, generator=g).clamp(-3, 3) * HUGE[dtype] / 3   # ±huge
    flat[3 * gs : 4 * gs] *= 1e-30 if dtype != torch.float16 else 1e-3                    # tiny
    flat[4 * gs : 5 * gs] = torch.randint(-16, 16, (gs,), generator=g) / 2.0             # many exact ties
    flat[5 * gs : 6 * gs] = 0.0                                       # constant zero group
    return w.to(dtype)


def run_quant(mod, w, bits, gs):
    n, in_f = w.numel(), w.shape[1]
    qw = torch.empty(n * bits // 8, dtype=torch.uint8, device=w.device)
    scales = torch.empty(n // gs, device=w.device)
    zeros = torch.empty(n // gs, device=w.device)
    mod.quantize_intn(w.reshape(-1), bits, gs, in_f, qw, scales, zeros)
    return qw, scales, zeros


def check_intn_backend(mod, device):
    for dtype in DTYPES:
        for bits in (2, 3, 4):
            for gs in (32, 64, 128):
                for out_f, in_f in ((7, 6 * gs), (3, 8 * gs)):
                    case = (dtype, bits, gs, out_f, in_f)
                    w = make_weight(out_f, in_f, gs, dtype).to(device)
                    got, want = run_quant(mod, w, bits, gs), run_quant(ref, w, bits, gs)
                    for name, a, b in zip(("qweight", "scales", "zeros"), got, want):
                        assert same_bits(a, b), case + (name,)
                    for out_dtype in DTYPES:
                        out = torch.empty(w.numel(), dtype=out_dtype, device=device)
                        out_r = torch.empty_like(out)
                        mod.dequantize_intn(*want, bits, gs, in_f, out)
                        ref.dequantize_intn(*want, bits, gs, in_f, out_r)
                        assert same_bits(out, out_r), case + (out_dtype,)


def test_cpu_intn_matches_reference(isa_op):
    check_intn_backend(isa_op, "cpu")


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_cpu_intn_span_overflow(isa_op, bits):
    """A group spanning more than fp32's range: scale inf; codes, scales, zeros still exact, values NaN."""
    w = torch.randn(2, 64)
    w[0, 0], w[0, 5], w[1, 40] = -3e38, 3e38, 1e30
    got, want = run_quant(isa_op, w, bits, 32), run_quant(ref, w, bits, 32)
    assert all(same_bits(a, b) for a, b in zip(got, want))
    for dtype in DTYPES:
        out, out_r = torch.empty(128, dtype=dtype), torch.empty(128, dtype=dtype)
        isa_op.dequantize_intn(*want, bits, 32, 64, out)
        ref.dequantize_intn(*want, bits, 32, 64, out_r)
        assert same_bits(out, out_r, nan_ok=True)


@pytest.mark.parametrize("gs", [8, 24, 40])
def test_cpu_intn_group_sizes_off_the_simd_width(isa_op, gs):
    """Group sizes that are multiples of 8 but not of 16/32 (the SIMD paths' remainder loops), all bits and dtypes."""
    for dtype in DTYPES:
        for bits in (2, 3, 4):
            w = make_weight(3, 6 * gs, gs, dtype, seed=gs)
            got, want = run_quant(isa_op, w, bits, gs), run_quant(ref, w, bits, gs)
            assert all(same_bits(a, b) for a, b in zip(got, want)), (dtype, bits)
            for out_dtype in DTYPES:
                out, out_r = torch.empty(w.numel(), dtype=out_dtype), torch.empty(w.numel(), dtype=out_dtype)
                isa_op.dequantize_intn(*want, bits, gs, 6 * gs, out)
                ref.dequantize_intn(*want, bits, gs, 6 * gs, out_r)
                assert same_bits(out, out_r), (dtype, bits, out_dtype)


TINY = 2.0 ** -149  # the smallest fp32 subnormal (~1.4e-45)


def subnormal_weight(dtype, gs=32, seed=0):
    """Row 0: groups of fp32 subnormals (random multiples of TINY: spans of 1, 2, ~14 and ~7 TINY, a constant
    -1e-44, spans ~1e-40 and ~1e-39), then a normal group and an all-zero one; row 1 is row 0 negated."""
    g = torch.Generator().manual_seed(seed)
    ulps = [(0, 2), (-1, 2), (-7, 8), (0, 8), (-7, -6), (0, 71362), (-356811, 356812)]
    groups = [torch.randint(lo, hi, (gs,), generator=g).double() * TINY for lo, hi in ulps]
    groups += [torch.randn(gs, generator=g, dtype=torch.float64), torch.zeros(gs, dtype=torch.float64)]
    row = torch.cat(groups).float()
    return torch.stack((row, -row)).to(dtype)


def check_intn_subnormals(mod, device, gs=32):
    """Groups of subnormals quantize like the reference, bit for bit, and dequantize to finite values: a group whose
    span / maxq underflows gets the all-zero group's grid and dequantizes to exactly 0, any other group stays within
    one step of its values."""
    for dtype in (torch.float32, torch.bfloat16):
        w = subnormal_weight(dtype, gs).to(device)
        n, in_f = w.numel(), w.shape[1]
        for bits in (2, 3, 4):
            maxq = 2 ** bits - 1
            got, want = run_quant(mod, w, bits, gs), run_quant(ref, w, bits, gs)
            for name, a, b in zip(("qweight", "scales", "zeros"), got, want):
                assert same_bits(a, b), (dtype, bits, name)
            _, scales, zeros = (t.cpu() for t in got)
            assert scales.isfinite().all() and zeros.isfinite().all() and (scales > 0).all(), (dtype, bits)
            # which groups underflow, in exact integer arithmetic: span / maxq < TINY / 2
            x = w.cpu().double().view(-1, gs)
            span = (x.amax(1).clamp(min=0) - x.amin(1).clamp(max=0)) / TINY
            under = (span > 0) & (2 * span < maxq)
            if dtype == torch.float32:  # both kinds present (bf16 has no subnormal span that small)
                assert under.any() and (~under & (span > 0) & (span < 2 ** 23)).any(), bits
            assert (scales[under] == scales[-1]).all() and (zeros[under] == zeros[-1]).all(), bits  # all-zero grid
            for out_dtype in DTYPES:
                out = torch.empty(n, dtype=out_dtype, device=device)
                out_r = torch.empty_like(out)
                mod.dequantize_intn(*got, bits, gs, in_f, out)
                ref.dequantize_intn(*want, bits, gs, in_f, out_r)
                assert same_bits(out, out_r) and out.isfinite().all(), (dtype, bits, out_dtype)
                if out_dtype == torch.float32:
                    deq = out.cpu().view(-1, gs)
            err = (deq.double() - x).abs()
            assert (deq[under] == 0).all() and (err[under] <= 1e-44).all(), (dtype, bits)
            assert (err.amax(1) <= scales.double()).all(), (dtype, bits, err.amax(1) / scales)  # within one step


def test_cpu_intn_subnormal_groups(isa_op):
    """Subnormal groups used to quantize to scale 0, zero 0/0 = NaN and NaN weights on every backend."""
    check_intn_subnormals(isa_op, "cpu")


def test_reference_intn_subnormal_groups():
    check_intn_subnormals(ref, "cpu")


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_intn_quantize_subnormal_weight_is_finite(backend):
    """The public entry point: a weight with tiny groups dequantizes to finite values, the underflowing ones to 0."""
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    w[1, :32] = 1e-44                                     # span / 15 underflows
    w[2, 32:] = torch.linspace(-1e-40, 1e-40, 32)          # subnormal, but a nonzero scale
    with ops.use_backend("torch" if backend == "torch" else None):
        qt = intn.quantize(w, 4, 32)
        deq = qt.dequantize(torch.float32)
    assert deq.isfinite().all()
    assert torch.equal(deq[1, :32], torch.zeros(32))
    assert 0 < qt.scales[2, 1] < 1e-40 and (deq[2, 32:] - w[2, 32:]).abs().max() <= qt.scales[2, 1] / 2


def test_cpu_intn_rejects_bad_arguments(cpu_op):
    w = torch.randn(64)
    q, s, z = torch.empty(32, dtype=torch.uint8), torch.empty(2), torch.empty(2)
    with pytest.raises(RuntimeError, match="bits"):
        cpu_op.quantize_intn(w, 5, 32, 64, q, s, z)
    with pytest.raises(RuntimeError, match="group_size"):
        cpu_op.quantize_intn(w, 4, 12, 64, q, s, z)
    with pytest.raises(RuntimeError, match="qweight_out"):
        cpu_op.quantize_intn(w, 3, 32, 64, q, s, z)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        cpu_op.dequantize_intn(q, s, z, 4, 32, 64, torch.empty(64, dtype=torch.float64))


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_intn_format_roundtrip_same_on_every_backend(backend, dtype):
    """intn.quantize / dequantize_parts give the same bits whichever backend runs them, and match pack/unpack."""
    w = make_weight(5, 256, 32, dtype if dtype != torch.float64 else torch.float32).to(dtype)
    ctx = ops.use_backend("torch" if backend == "torch" else None)
    with ctx:
        qt = intn.quantize(w, 3, 32)
        deq = intn.dequantize_parts(qt.qweight, qt.scales, qt.zeros, 3, 32, qt.shape, torch.bfloat16)
        out = torch.empty(w.numel(), dtype=torch.bfloat16)
        deq_out = intn.dequantize_parts(qt.qweight, qt.scales, qt.zeros, 3, 32, qt.shape, torch.bfloat16, out=out)
    with ops.use_backend("torch"):
        qt_r = intn.quantize(w, 3, 32)
    assert same_bits(qt.qweight, qt_r.qweight) and same_bits(qt.scales, qt_r.scales)
    assert same_bits(qt.zeros, qt_r.zeros)
    assert torch.equal(intn.pack(qt.codes(), 3), qt.qweight)
    want = ((qt.codes().float().view(5, -1, 32) - qt.zeros.unsqueeze(-1)) * qt.scales.unsqueeze(-1)).view(5, 256)
    assert same_bits(deq, want.to(torch.bfloat16)) and same_bits(deq_out, deq)
    assert deq_out.data_ptr() == out.data_ptr() and deq_out.shape == (5, 256)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_intn_groups_on_one_side_of_zero_keep_their_values(backend, bits):
    """A group that does not straddle 0 (all positive, all negative, narrow, constant) is quantized on the grid
    [min(min, 0), max(max, 0)]: every value within half a step of the truth, the zero point a code. It used to keep
    [min, max] and clamp the zero into [0, maxq], so such a group dequantized to one value (1.0..2.0 -> all 1.0)."""
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(0)) * 0.02
    w[0, :32] = torch.linspace(1.0, 2.0, 32)
    w[1, :32] = torch.linspace(-2.0, -1.0, 32)
    w[2, :32] = torch.linspace(0.5, 0.6, 32)
    w[3, :32] = 0.7
    w[4, :32] = -0.7
    w[5, :32] = 0.0
    with ops.use_backend("torch" if backend == "torch" else None):
        qt = intn.quantize(w, bits, 32)
        deq = qt.dequantize(torch.float32)
    step = qt.scales.view(6, 2, 1)
    assert ((deq - w).abs().view(6, 2, 32) <= step / 2 * (1 + 1e-5)).all()
    assert ((qt.zeros >= 0) & (qt.zeros <= 2 ** bits - 1)).all() and torch.equal(qt.zeros, qt.zeros.round())
    assert torch.equal(deq[5, :32], torch.zeros(32))                  # the all-zero group: exactly 0
    assert (deq[3, :32] - 0.7).abs().max() < 1e-6 and (deq[4, :32] + 0.7).abs().max() < 1e-6


def test_dequantize_intn_rejects_bad_out():
    qt = intn.quantize(torch.randn(4, 64), 4, 32)
    with pytest.raises(ValueError, match="out must be"):
        ops.dequantize_intn(qt.qweight, qt.scales, qt.zeros, 4, 32, qt.shape, torch.bfloat16,
                            out=torch.empty(255, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="do not fit"):
        ops.dequantize_intn(qt.qweight, qt.scales, qt.zeros, 3, 32, qt.shape, torch.bfloat16)


@pytest.mark.cuda
def test_cuda_intn_matches_reference():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    check_intn_backend(load_op("quant", "cuda"), "cuda")


@pytest.mark.cuda
def test_cuda_intn_subnormal_groups():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    check_intn_subnormals(load_op("quant", "cuda"), "cuda")
