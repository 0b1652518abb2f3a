"""The dispatcher (qlora_ds/ops/__init__.py) hands every backend what the CUDA binding (csrc/quant_cuda.cpp) demands:
1-D contiguous tensors of the right dtypes and sizes, on one device, whatever views the callers hold (bnb's packed
[n/2, 1], a packed slice of a flat ZeRO-3-like buffer at an odd byte offset, a 2-D or strided absmax). A fake backend
enforces the binding's TORCH_CHECKs, then runs the reference: checked on the CPU what a GPU would first show.
"""
from __future__ import annotations

import pytest
import torch

import qlora_ds.ops as ops
from qlora_ds.ops import reference as ref

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _check_1d(t, name, dtype=None):
    assert isinstance(t, torch.Tensor), name
    assert t.dim() == 1 and t.is_contiguous(), f"{name} must be 1-D and contiguous, got {tuple(t.shape)} {t.stride()}"
    if dtype is not None:
        assert t.dtype == dtype, f"{name} must be {dtype}, got {t.dtype}"


def _same_device(*ts):
    assert len({t.device for t in ts}) == 1


class StrictBackend:
    """The CUDA binding's argument checks (csrc/quant_cuda.cpp), then the reference."""

    def __init__(self):
        self.calls = []

    def quantize_4bit(self, x, bounds, order, blocksize, packed_out, absmax_out):
        _check_1d(x, "x")
        assert x.dtype in _FLOATS
        _check_1d(bounds, "bounds", torch.float32)
        _check_1d(order, "order", torch.uint8)
        _check_1d(packed_out, "packed_out", torch.uint8)
        _check_1d(absmax_out, "absmax_out", torch.float32)
        _same_device(x, bounds, order, packed_out, absmax_out)
        n = x.numel()
        assert blocksize > 0 and blocksize % 2 == 0
        assert packed_out.numel() == (n + 1) // 2 and absmax_out.numel() == -(-n // blocksize)
        self.calls.append("quantize_4bit")
        ref.quantize_4bit(x, bounds, order, blocksize, packed_out, absmax_out)

    def _check_deq4(self, packed, code, bs, out, nblocks_have):
        _check_1d(packed, "packed", torch.uint8)
        _check_1d(code, "code", torch.float32)
        _check_1d(out, "out")
        assert out.dtype in _FLOATS
        assert bs > 0 and bs % 2 == 0 and code.numel() == 16
        n = out.numel()
        assert packed.numel() == (n + 1) // 2
        assert nblocks_have == -(-n // bs)

    def dequantize_4bit(self, packed, absmax, code, blocksize, out):
        _check_1d(absmax, "absmax", torch.float32)
        self._check_deq4(packed, code, blocksize, out, absmax.numel())
        _same_device(out, packed, absmax, code)
        self.calls.append("dequantize_4bit")
        ref.dequantize_4bit(packed, absmax, code, blocksize, out)

    def dequantize_4bit_dq(self, packed, qabsmax, absmax2, code8, nested, offset, code, blocksize, out):
        _check_1d(qabsmax, "qabsmax", torch.uint8)
        _check_1d(absmax2, "absmax2", torch.float32)
        _check_1d(code8, "code8", torch.float32)
        assert code8.numel() == 256 and nested > 0 and isinstance(offset, float)
        assert absmax2.numel() == -(-qabsmax.numel() // nested)
        self._check_deq4(packed, code, blocksize, out, qabsmax.numel())
        _same_device(out, packed, qabsmax, absmax2, code8, code)
        self.calls.append("dequantize_4bit_dq")
        ref.dequantize_4bit_dq(packed, qabsmax, absmax2, code8, nested, offset, code, blocksize, out)

    def quantize_8bit_blockwise(self, x, code8, bounds8, blocksize, q_out, absmax_out):
        _check_1d(x, "x", torch.float32)
        _check_1d(code8, "code8", torch.float32)
        _check_1d(bounds8, "bounds8", torch.float32)
        _check_1d(q_out, "q_out", torch.uint8)
        _check_1d(absmax_out, "absmax_out", torch.float32)
        _same_device(x, code8, bounds8, q_out, absmax_out)
        assert blocksize > 0 and code8.numel() == 256 and bounds8.numel() == 255
        assert q_out.numel() == x.numel() and absmax_out.numel() == -(-x.numel() // blocksize)
        self.calls.append("quantize_8bit_blockwise")
        ref.quantize_8bit_blockwise(x, code8, bounds8, blocksize, q_out, absmax_out)

    def dequantize_8bit_blockwise(self, q, absmax, code8, blocksize, offset, out):
        _check_1d(q, "q", torch.uint8)
        _check_1d(absmax, "absmax", torch.float32)
        _check_1d(code8, "code8", torch.float32)
        _check_1d(out, "out", torch.float32)
        _same_device(out, q, absmax, code8)
        assert blocksize > 0 and code8.numel() == 256 and isinstance(offset, float)
        assert q.numel() == out.numel() and absmax.numel() == -(-out.numel() // blocksize)
        self.calls.append("dequantize_8bit_blockwise")
        ref.dequantize_8bit_blockwise(q, absmax, code8, blocksize, offset, out)

    def quantize_intn(self, w, bits, group_size, in_features, qweight_out, scales_out, zeros_out):
        _check_1d(w, "w")
        assert w.dtype in _FLOATS
        _check_1d(qweight_out, "qweight_out", torch.uint8)
        _check_1d(scales_out, "scales_out", torch.float32)
        _check_1d(zeros_out, "zeros_out", torch.float32)
        _same_device(w, qweight_out, scales_out, zeros_out)
        n = w.numel()
        assert bits in (2, 3, 4) and group_size % 8 == 0 and in_features % group_size == 0 and n % in_features == 0
        assert qweight_out.numel() == n // 8 * bits and scales_out.numel() == zeros_out.numel() == n // group_size
        self.calls.append("quantize_intn")
        ref.quantize_intn(w, bits, group_size, in_features, qweight_out, scales_out, zeros_out)

    def dequantize_intn(self, qweight, scales, zeros, bits, group_size, in_features, out):
        _check_1d(qweight, "qweight", torch.uint8)
        _check_1d(scales, "scales", torch.float32)
        _check_1d(zeros, "zeros", torch.float32)
        _check_1d(out, "out")
        assert out.dtype in _FLOATS
        _same_device(out, qweight, scales, zeros)
        n = out.numel()
        assert qweight.numel() == n // 8 * bits and scales.numel() == zeros.numel() == n // group_size
        self.calls.append("dequantize_intn")
        ref.dequantize_intn(qweight, scales, zeros, bits, group_size, in_features, out)


@pytest.fixture
def strict(monkeypatch):
    backend = StrictBackend()
    monkeypatch.setattr(ops, "_impl", lambda t: backend)
    return backend


def _bits_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                      b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("n,blocksize", [(1, 64), (63, 64), (129, 64), (333, 2), (1000, 256)])
def test_dispatch_4bit_awkward_views(strict, n, blocksize):
    torch.manual_seed(n)
    x = torch.randn(n, 3).t()  # non-contiguous input, 3n elements
    packed, absmax = ops.quantize_4bit(x, "nf4", blocksize)
    with ops.use_backend("torch"):
        packed_r, absmax_r = ops.quantize_4bit(x.contiguous(), "nf4", blocksize)
    assert _bits_equal(packed, packed_r) and _bits_equal(absmax, absmax_r)
    expect = ops.dequantize_4bit(packed, absmax, "nf4", blocksize, x.shape, torch.bfloat16)
    expect16 = ops.dequantize_4bit(packed, absmax, "nf4", blocksize, x.shape, torch.float16)
    # bnb's Params4bit layout [n/2, 1]; a slice of a flat byte buffer at an odd offset (a ZeRO-3-style partition);
    # a 2-D absmax [nblocks, 1] and a strided absmax
    flat = torch.zeros(packed.numel() + 5, dtype=torch.uint8)
    flat[3:3 + packed.numel()] = packed
    sliced = flat[3:3 + packed.numel()]
    wide = torch.zeros(absmax.numel(), 2)
    wide[:, 1] = absmax
    for p in (packed.view(-1, 1), sliced):
        for a in (absmax.view(-1, 1), wide[:, 1]):
            got = ops.dequantize_4bit(p, a, "nf4", blocksize, x.shape, torch.bfloat16)
            assert _bits_equal(got, expect)
            out_buf = torch.empty(x.numel() + 3, dtype=torch.float16)
            got16 = ops.dequantize_4bit(p, a, "nf4", blocksize, x.shape, torch.float16, out=out_buf[3:])
            assert _bits_equal(got16, expect16) and got16.data_ptr() == out_buf[3:].data_ptr()
    assert "dequantize_4bit" in strict.calls


@pytest.mark.parametrize("n", [64 * 5 + 2, 64 * 600 + 31])
def test_dispatch_double_quant_awkward_views(strict, n):
    torch.manual_seed(n)
    x = torch.randn(n)
    packed, absmax = ops.quantize_4bit(x, "nf4", 64)
    offset = float(absmax.mean())
    q, absmax2 = ops.quantize_8bit_blockwise(absmax - offset, 256)
    expect = ops.dequantize_4bit_dq(packed, q, absmax2, offset, "nf4", 64, 256, (n,), torch.float32)
    two_step = ops.dequantize_4bit(packed, ops.dequantize_8bit_blockwise(q, absmax2, 256, offset), "nf4", 64,
                                   (n,), torch.float32)
    assert _bits_equal(expect, two_step)
    wide = torch.zeros(absmax2.numel(), 3)
    wide[:, 2] = absmax2
    got = ops.dequantize_4bit_dq(packed.view(-1, 1), q.view(-1, 1), wide[:, 2], offset, "nf4", 64, 256, (n,),
                                 torch.float32)
    assert _bits_equal(got, expect)
    got8 = ops.dequantize_8bit_blockwise(q, wide[:, 2], 256, offset)
    assert _bits_equal(got8, ops.dequantize_8bit_blockwise(q, absmax2, 256, offset))
    assert {"dequantize_4bit_dq", "dequantize_8bit_blockwise", "quantize_8bit_blockwise"} <= set(strict.calls)


def test_dispatch_intn_awkward_views(strict):
    torch.manual_seed(0)
    w = torch.randn(64, 24).t()  # [24, 64], non-contiguous
    qweight, scales, zeros = ops.quantize_intn(w, 3, 32)
    with ops.use_backend("torch"):
        qweight_r, scales_r, zeros_r = ops.quantize_intn(w.contiguous(), 3, 32)
    assert _bits_equal(qweight, qweight_r) and _bits_equal(scales, scales_r) and _bits_equal(zeros, zeros_r)
    expect = ops.dequantize_intn(qweight, scales, zeros, 3, 32, w.shape, torch.bfloat16)
    got = ops.dequantize_intn(qweight.t().contiguous().t(), scales.t().contiguous().t(), zeros, 3, 32, w.shape,
                              torch.bfloat16)
    assert _bits_equal(got, expect)
    assert {"quantize_intn", "dequantize_intn"} <= set(strict.calls)
