"""The torch reference backend gives the kernels' bytes on every device (issue 13 §1.1).

On CUDA, torch computes ``tensor / python_scalar`` as ``tensor * fl(1/scalar)`` (its CPU-scalar shortcut); the
kernels divide. The CPU test replays that CUDA rule with a TorchFunctionMode, so a reference that divides by a
Python scalar fails here too, not only on a GPU.
"""
from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from qlora_ds.ops import reference

_DIVS = {torch.Tensor.__truediv__, torch.Tensor.div, torch.div, torch.true_divide, torch.Tensor.true_divide}


class CudaScalarDivision(TorchFunctionMode):
    """``x / number`` as CUDA's div_true kernel computes it for a CPU scalar: ``x * fl32(1 / fl32(number))``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in _DIVS and len(args) == 2 and isinstance(args[1], (int, float)) and not isinstance(args[1], bool)
                and kwargs.get("rounding_mode") is None and args[0].dtype == torch.float32):
            inv = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(float(args[1]), dtype=torch.float32)
            return args[0] * inv
        return func(*args, **kwargs)


def _spans_where_reciprocal_differs(maxq: int, n: int = 64) -> torch.Tensor:
    """fp32 spans whose span * fl(1/maxq) is not the correctly rounded span / maxq."""
    g = torch.Generator().manual_seed(maxq)
    cand = torch.rand(20000, generator=g) * 4 + 0.01
    inv = torch.tensor(1.0) / torch.tensor(float(maxq))
    bad = cand[(cand * inv) != (cand.double() / maxq).float()]
    assert bad.numel() >= n, "the construction must find spans where the reciprocal form rounds differently"
    return bad[:n]


def test_emulation_reproduces_the_cuda_shortcut():
    x = _spans_where_reciprocal_differs(7)
    with CudaScalarDivision():
        emulated = x / 7
    assert not torch.equal(emulated, (x.double() / 7).float())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_intn_scale_is_a_true_division_under_cuda_scalar_rules(bits):
    maxq, gs = 2 ** bits - 1, 8
    spans = _spans_where_reciprocal_differs(maxq)
    # each group: min 0 (so zero = 0), max = span; the other six values inside the range
    rows = spans.numel()
    w = torch.rand(rows, gs, generator=torch.Generator().manual_seed(bits)) * spans[:, None]
    w[:, 0], w[:, 1] = 0.0, spans
    w = w.contiguous().view(-1)
    qweight = torch.empty(rows * gs * bits // 8, dtype=torch.uint8)
    scales, zeros = torch.empty(rows), torch.empty(rows)
    with CudaScalarDivision():
        reference.quantize_intn(w, bits, gs, gs, qweight, scales, zeros)
    assert torch.equal(scales, (spans.double() / maxq).float())
    assert torch.equal(zeros, torch.zeros(rows))


@pytest.mark.parametrize("backend", ["torch", None])
def test_empty_tensors_quantize_on_every_backend(backend):
    """The compiled ops accept an empty tensor; the fallback used where they cannot build must too (it once raised
    from ``torch.cat([])``). ``None``: the compiled CPU op where it builds, else the reference again."""
    from qlora_ds import ops
    with ops.use_backend(backend):
        packed, absmax = ops.quantize_4bit(torch.empty(0), "nf4", 64)
        q, absmax8 = ops.quantize_8bit_blockwise(torch.empty(0), 256)
    assert packed.numel() == absmax.numel() == q.numel() == absmax8.numel() == 0
