"""The compiled CPU kernels split their work over torch's thread pool (ranges of blocks, groups or weight rows, about
32K-64K elements a task; the optimizer past 32K elements): the same bits on 1 thread as on 2, and the reference's,
at sizes past the grain. The suite's workers compute on one thread each (scripts/test.sh), so this file is where the
threaded paths run."""
import contextlib

import pytest
import torch

from qlora_ds.ops import reference as ref

from .test_kernels import codebook8, make_input, run_4bit, same_bits
from .test_kernels_intn import make_weight, run_quant


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def on_threads(fn):
    """fn() on 1 thread and on 2 (each call gets fresh outputs)."""
    with threads(1):
        one = fn()
    with threads(2):
        two = fn()
    return one, two


def assert_same(one, two, what):
    for i, (a, b) in enumerate(zip(one, two, strict=True)):
        assert same_bits(a, b), (what, i)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_and_double_quant_kernels(isa_op, quant_type):
    n, blocksize, nested = (1 << 18) + 37, 64, 256          # 4097 blocks: eight tasks of 512 and a partial block
    x = make_input(n, blocksize, torch.bfloat16)
    code8, bounds8 = codebook8()

    def run():
        code, packed, absmax = run_4bit(isa_op, x, quant_type, blocksize)
        offset = float(absmax.mean())
        q = torch.empty(absmax.numel(), dtype=torch.uint8)
        a2 = torch.empty((absmax.numel() + nested - 1) // nested)
        isa_op.quantize_8bit_blockwise(absmax - offset, code8, bounds8, nested, q, a2)
        out, out_dq = torch.empty(n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.float32)
        isa_op.dequantize_4bit(packed, absmax, code, blocksize, out)
        isa_op.dequantize_4bit_dq(packed, q, a2, code8, nested, offset, code, blocksize, out_dq)
        return packed, absmax, q, a2, out, out_dq

    one, two = on_threads(run)
    assert_same(one, two, quant_type)
    _, packed_r, absmax_r = run_4bit(ref, x, quant_type, blocksize)
    assert same_bits(two[0], packed_r) and same_bits(two[1], absmax_r)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_intn_kernels(isa_op, bits):
    gs, out_f, in_f = 32, 256, 1024                         # 8192 groups
    w = make_weight(out_f, in_f, gs, torch.bfloat16)

    def run():
        qw, scales, zeros = run_quant(isa_op, w, bits, gs)
        out = torch.empty(w.numel(), dtype=torch.float32)
        isa_op.dequantize_intn(qw, scales, zeros, bits, gs, in_f, out)
        return qw, scales, zeros, out

    one, two = on_threads(run)
    assert_same(one, two, bits)
    assert all(same_bits(a, b) for a, b in zip(two[:3], run_quant(ref, w, bits, gs)))


@pytest.mark.parametrize("kind", ["nf4", "int4"])
def test_few_rows_linear(isa_op, kind):
    """Row ranges of the weight per task: each output is one thread's dot product, so the split cannot change it."""
    from qlora_ds import quantize
    from qlora_ds.ops import small_rows
    from qlora_ds.quant import intn

    out_f, in_f = 1024, 512                                  # 512K weights: eight tasks at the default grain
    w = torch.randn(out_f, in_f)
    if kind == "nf4":
        qt = quantize(w, "nf4", 64, True, 256)
        parts = (qt.packed, qt.absmax, qt.absmax2, qt.offset, qt.quant_type, qt.blocksize, qt.nested_blocksize,
                 qt.shape)
        linear = small_rows.linear_4bit
    else:
        qt = intn.quantize(w, 4, 32)
        parts = (qt.qweight, qt.scales, qt.zeros, qt.bits, qt.group_size, qt.shape)
        linear = small_rows.linear_intn
    x = torch.randn(3, in_f)
    one, two = on_threads(lambda: (linear(x, *parts), linear(x.bfloat16(), *parts)))
    assert_same(one, two, kind)


def test_optimizer_and_dropout_kernels():
    from qlora_ds.ops import load_backend
    from qlora_ds.optim import _op

    op = _op.paged_op("cpu")
    if op is None:
        pytest.fail("the compiled CPU paged_optim op did not build (its warning says why)")
    n = 100_003                                             # past the optimizer's 32768-element threshold
    g0 = torch.Generator().manual_seed(0)
    p0, g, m0 = (torch.randn(n, generator=g0) for _ in range(3))
    v0 = torch.rand(n, generator=g0)

    def adamw():
        p, m, v = p0.clone(), m0.clone(), v0.clone()
        op.adamw_step(p, g, m, v, 1e-3, 0.9, 0.999, 1e-8, 0.01, 3)
        return p, m, v

    one, two = on_threads(adamw)
    assert_same(one, two, "adamw")
    drop = load_backend("cpu")
    if drop is ref:
        pytest.fail("the compiled CPU quant op did not build (its warning says why)")
    x = torch.randn(300_007)                                # past the dropout's 64K-element grain
    one, two = on_threads(lambda: (drop.hash_dropout(x, 0.1, 1234),))
    assert_same(one, two, "dropout")
    assert torch.equal(two[0], ref.hash_dropout(x, 0.1, 1234))
