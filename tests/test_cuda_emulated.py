"""Our CUDA kernels executed on the CPU (tests/cuda_emu: g++ and a SIMT emulator, threads as fibers, real barriers and
warp shuffles), bit for bit against the reference: what a GPU would compute, checked on machines without one.

The GPU itself checks the same (tests/test_kernels.py::test_cuda_kernels_match_reference, the CUDA optimizer tests);
these run everywhere the CUDA headers and g++ are (CI builds the CUDA sources with nvcc anyway)."""
import ctypes
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from qlora_ds.ops import reference as ref
from qlora_ds.optim._op import torch_adamw
from qlora_ds.optim.adamw import _maps

from . import cuda_emu
from .test_kernels import check_backend, codebook, same_bits
from .test_kernels_intn import check_intn_backend, check_intn_subnormals, make_weight, run_quant

pytestmark = pytest.mark.skipif(cuda_emu.cuda_include() is None or not cuda_emu.shutil.which("g++"),
                                reason="needs g++ and the CUDA headers (cuda_runtime.h)")


@pytest.fixture(scope="module")
def dll():
    cache = Path(os.environ.get("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/qlora_ds"))) / "cuda_emu"
    return cuda_emu.build(cache)


@pytest.fixture(params=[0, 2], ids=["full-grid", "grid-of-2"])
def grid(dll, request):
    """Each launch as its launcher sizes it, or capped at 2 blocks so that every grid-stride loop iterates (what a GPU
    does past a launcher's grid cap)."""
    dll.emu_set_max_grid(request.param)
    yield request.param
    dll.emu_set_max_grid(0)


@pytest.fixture
def quant(dll, grid):
    return cuda_emu.EmulatedQuant(dll)


@pytest.fixture
def optim(dll, grid):
    return cuda_emu.EmulatedPagedOptim(dll)


def test_emulated_cuda_quant_kernels_match_reference(quant):
    """4-bit quantize (NF4, FP4; fp32/bf16/fp16 input), dequantize to every dtype, 8-bit double quant, the fused DQ
    dequantize: all block sizes and tails of tests/test_kernels.py."""
    check_backend(quant, "cpu")


def test_emulated_cuda_intn_kernels_match_reference(quant):
    check_intn_backend(quant, "cpu")


def test_emulated_cuda_intn_subnormal_groups(quant):
    """A group whose scale underflows takes the all-zero group's grid in the CUDA kernel too (not zero = 0/0)."""
    check_intn_subnormals(quant, "cpu")


@pytest.mark.parametrize("offset", [1, 2, 3])
def test_emulated_cuda_dequantize_unaligned_scalar_path(quant, offset):
    """Views that start off the 4/16-byte alignment take the kernels' scalar path (vec_ok false): same bits."""
    n, bs = 1000, 64
    x = torch.randn(n)
    code, bounds, order = codebook("nf4")
    packed_buf = torch.empty((n + 1) // 2 + offset, dtype=torch.uint8)
    packed = packed_buf[offset:]
    absmax = torch.empty(-(-n // bs))
    quant.quantize_4bit(x, bounds, order, bs, packed, absmax)
    packed_r, absmax_r = torch.empty_like(packed), torch.empty_like(absmax)
    ref.quantize_4bit(x, bounds, order, bs, packed_r, absmax_r)
    assert same_bits(packed, packed_r) and same_bits(absmax, absmax_r)
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.empty(n + offset, dtype=dtype)[offset:]
        want = torch.empty(n, dtype=dtype)
        quant.dequantize_4bit(packed, absmax, code, bs, out)
        ref.dequantize_4bit(packed_r, absmax_r, code, bs, want)
        assert same_bits(out, want), (offset, dtype)
    w = make_weight(4, 128, 32, torch.float32)
    qw, scales, zeros = run_quant(ref, w, 3, 32)
    out = torch.empty(w.numel() + offset)[offset:]
    want = torch.empty(w.numel())
    quant.dequantize_intn(qw, scales, zeros, 3, 32, 128, out)
    ref.dequantize_intn(qw, scales, zeros, 3, 32, 128, want)
    assert same_bits(out, want)


# ---- the optimizer kernels ---------------------------------------------------------------------------------------

def fma32(a, b, c):
    """fp32 fused multiply-add, correctly rounded (numpy has none): the product is exact in fp64; the fp64 sum's
    rounding error (TwoSum) decides the one case where rounding that sum to fp32 again could go the wrong way, an
    fp64 sum exactly halfway between two fp32 values."""
    a, b, c = (np.asarray(v, np.float32).astype(np.float64) for v in (a, b, c))
    prod = a * b
    s = prod + c
    bv = s - prod
    err = (prod - (s - bv)) + (c - bv)
    r = s.astype(np.float32)
    r64 = r.astype(np.float64)
    away = np.nextafter(r, np.where(s > r64, np.float32(np.inf), np.float32(-np.inf)).astype(np.float32))
    tie = (s != r64) & (s - r64 == (away.astype(np.float64) - r64) / 2) & (err != 0)
    return np.where(tie & (np.sign(err) == np.sign(s - r64)), away, r).astype(np.float32)


def test_fma32_is_a_real_fma():
    # 1 + 2^-23 squared = 1 + 2^-22 + 2^-46: an fp32 multiply drops the 2^-46, the fma keeps it against -(1 + 2^-22)
    x = np.float32(1 + 2.0**-23)
    assert fma32(x, x, -np.float32(1 + 2.0**-22)) == np.float32(2.0**-46)
    # the fp64 sum on a tie: 8(1 + 2^-23) * 8(1 - 2^-23) = 2^6 - 2^-40; plus 2^30 + 2^7 the fp64 sum is
    # 2^30 + 2^7 + 2^6, halfway between two fp32 values; the exact value lies below it: round down, not to even
    a, b, c = np.float32(8 * (1 + 2.0**-23)), np.float32(8 * (1 - 2.0**-23)), np.float32(2.0**30 + 2.0**7)
    assert np.float32(np.float64(a) * np.float64(b) + np.float64(c)) == np.float32(2.0**30 + 2.0**8)  # naive
    assert fma32(a, b, c) == c
    assert fma32(-a, b, -c) == -c


def cuda_adamw(p, g, m, v, lr, beta1, beta2, eps, wd, step):
    """paged_optim_impl.cu's arithmetic (its header comment: torch.optim.AdamW's CUDA roundings) in numpy, in place."""
    f = np.float32
    p_, g_, m_, v_ = (t.numpy() for t in (p, g, m, v))
    w = f(1.0 - beta1)
    w_small = abs(w) < f(0.5)
    coeff = w if w_small else f(w - f(1.0))
    inv_bc2_sqrt = f(1.0) / f(np.sqrt(1.0 - beta2**step))
    neg_step = f(-(lr / (1.0 - beta1**step)))
    pi = p_ * f(1.0 - lr * wd) if wd != 0 else p_.copy()
    mn = fma32(coeff, g_ - m_, m_ if w_small else g_)
    vi = fma32(f(1.0 - beta2), g_ * g_, v_ * f(beta2))
    den = np.sqrt(vi) * inv_bc2_sqrt + f(eps)
    p_[:], m_[:], v_[:] = fma32(neg_step, mn / den, pi), mn, vi


def adamw_case(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=gen)
    grads = [torch.randn(n, generator=gen) * s for s in (1.0, 1e-3, 30.0)]
    return p, grads


def zero_state_8bit(n, blocksize):
    """(exp_avg, its absmax, exp_avg_sq, its absmax) of a fresh 8-bit state: zeros as the reference quantizes them."""
    (code_m, bounds_m), (code_v, bounds_v) = _maps(torch.device("cpu")).values()
    nb = -(-n // blocksize)
    qm, qv = torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
    am, av = torch.zeros(nb), torch.zeros(nb)
    ref.quantize_8bit_blockwise(torch.zeros(n), code_m, bounds_m, blocksize, qm, am)
    ref.quantize_8bit_blockwise(torch.zeros(n), code_v, bounds_v, blocksize, qv, av)
    return qm, am, qv, av


def cuda_adamw_8bit(p, g, qm, am, qv, av, blocksize, lr, beta1, beta2, eps, wd, step):
    """The 8-bit kernel's oracle, in place: reference dequantize -> cuda_adamw -> reference quantize."""
    (code_m, bounds_m), (code_v, bounds_v) = _maps(torch.device("cpu")).values()
    m, v = torch.empty(p.numel()), torch.empty(p.numel())
    ref.dequantize_8bit_blockwise(qm, am, code_m, blocksize, 0.0, m)
    ref.dequantize_8bit_blockwise(qv, av, code_v, blocksize, 0.0, v)
    cuda_adamw(p, g, m, v, lr, beta1, beta2, eps, wd, step)
    ref.quantize_8bit_blockwise(m, code_m, bounds_m, blocksize, qm, am)
    ref.quantize_8bit_blockwise(v, code_v, bounds_v, blocksize, qv, av)


@pytest.mark.parametrize("beta1,wd", [(0.9, 0.0), (0.9, 0.01), (0.3, 0.1)])  # both lerp forms, decay off and on
def test_emulated_cuda_adamw_fp32_kernel_is_its_formula(optim, beta1, wd):
    n = 1000  # 3 full blocks of 256 threads and a partial one
    p0, grads = adamw_case(n)
    hp = dict(lr=1e-2, beta1=beta1, beta2=0.999, eps=1e-8)
    p, m, v = p0.clone(), torch.zeros(n), torch.zeros(n)
    pr, mr, vr = p0.clone(), torch.zeros(n), torch.zeros(n)
    pt, mt, vt = p0.clone(), torch.zeros(n), torch.zeros(n)
    for step, g in enumerate(grads, 1):
        optim.adamw_step(p, g, m, v, hp["lr"], hp["beta1"], 0.999, hp["eps"], wd, step)
        cuda_adamw(pr, g, mr, vr, hp["lr"], hp["beta1"], 0.999, hp["eps"], wd, step)
        torch_adamw(pt, g, mt, vt, hp["lr"], hp["beta1"], 0.999, hp["eps"], wd, step)
        for a, b in ((p, pr), (m, mr), (v, vr)):
            assert same_bits(a, b), step
    # and it is AdamW: torch's CPU forms round differently, by a few ulp at most
    torch.testing.assert_close(p, pt, rtol=4e-7, atol=1e-7)
    torch.testing.assert_close(v, vt, rtol=4e-7, atol=0)


@pytest.mark.parametrize("n,blocksize", [(1000, 256), (1000, 300), (5000, 2048), (4096, 4096), (37, 64)])
def test_emulated_cuda_adamw_8bit_kernel_is_dequantize_update_requantize(optim, n, blocksize):
    """One thread block per quantization block (more or fewer elements than its 256 threads, a partial last block):
    the bytes of the reference dequantize -> the fp32 kernel's update -> reference quantize."""
    (code_m, bounds_m), (code_v, bounds_v) = _maps(torch.device("cpu")).values()
    p0, grads = adamw_case(n, seed=1)
    p, (qm, am, qv, av) = p0.clone(), zero_state_8bit(n, blocksize)
    pr, qmr, qvr, amr, avr = p.clone(), qm.clone(), qv.clone(), am.clone(), av.clone()
    for step, g in enumerate(grads, 1):
        optim.adamw8bit_step(p, g, qm, am, qv, av, code_m, bounds_m, code_v, bounds_v, blocksize, 1e-2, 0.9,
                             0.999, 1e-8, 0.01, step)
        cuda_adamw_8bit(pr, g, qmr, amr, qvr, avr, blocksize, 1e-2, 0.9, 0.999, 1e-8, 0.01, step)
        for name, a, b in (("param", p, pr), ("exp_avg", qm, qmr), ("exp_avg_absmax", am, amr),
                           ("exp_avg_sq", qv, qvr), ("exp_avg_sq_absmax", av, avr)):
            assert same_bits(a, b), (step, name)
    assert int(qm.ne(qm[0]).sum()) > n // 2  # the state really moved


# cudaMemLocationType (driver_types.h): Device = 1, Host = 2
LOC_DEVICE, LOC_HOST = 1, 2


def test_emulated_cuda_managed_memory_calls_name_the_right_location(dll):
    """managed_prefetch / advise pass the runtime a cudaMemLocation: the host for device < 0, else that GPU."""
    out = (ctypes.c_longlong * 4)()
    buf = ctypes.c_void_p(0x1000)
    assert dll.emu_managed_prefetch(buf, ctypes.c_longlong(4096), -1, out) == 0
    assert list(out) == [0, LOC_HOST, 0, 4096]
    assert dll.emu_managed_prefetch(buf, ctypes.c_longlong(512), 3, out) == 0
    assert list(out) == [0, LOC_DEVICE, 3, 512]
    assert dll.emu_managed_advise_preferred_host(buf, ctypes.c_longlong(64), out) == 0
    assert list(out) == [1, LOC_HOST, 0, 64]
    assert dll.emu_managed_advise_accessed_by(buf, ctypes.c_longlong(64), 2, out) == 0
    assert list(out) == [2, LOC_DEVICE, 2, 64]
    # nothing to move: no runtime call
    assert dll.emu_managed_prefetch(buf, ctypes.c_longlong(0), 0, out) == 0 and out[0] == -1


@pytest.mark.parametrize("method", ["qlora", "qalora"])
def test_a_model_quantized_and_run_by_the_emulated_cuda_kernels_equals_the_reference(dll, tmp_path, monkeypatch,
                                                                                      method):
    """The whole GPU data path minus the matmuls: a checkpoint stream-loaded into NF4 + double quant (QA-LoRA: INT-3
    groups) by the CUDA kernels, then forward and backward through their dequantize — the same packed bytes, logits
    and LoRA gradients as the reference backend gives."""
    from qlora_ds import ops
    from qlora_ds.inject import from_pretrained
    from qlora_ds.nn import QALoRAConfig, QLoRAConfig

    from .tiny_models import tiny_model

    tiny_model("llama", hidden=64).save_pretrained(tmp_path)
    cfg = (QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32) if method == "qlora" else
           QALoRAConfig(bits=3, group_size=32, r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))

    def run():
        torch.manual_seed(0)
        model = from_pretrained(str(tmp_path), cfg, torch_dtype=torch.float32)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)    # a non-zero adapter, the same in both runs
        out = model(ids, labels=ids)
        out.loss.backward()
        state = {k: v.clone() for k, v in model.state_dict().items() if v.dtype in (torch.uint8, torch.int32)}
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return state, out.logits.detach(), grads

    with ops.use_backend("torch"):
        want = run()
    monkeypatch.setitem(ops._loaded, "cpu", cuda_emu.EmulatedQuant(dll))
    got = run()
    assert got[0].keys() == want[0].keys() and len(got[0]) > 0
    for k in want[0]:
        assert torch.equal(got[0][k], want[0][k]), k
    assert torch.equal(got[1], want[1])
    assert got[2].keys() == want[2].keys() and len(got[2]) == 28
    for k in want[2]:
        assert torch.equal(got[2][k], want[2][k]), k


def test_paged_adamw8bit_steps_through_the_emulated_cuda_op(dll, monkeypatch):
    """PagedAdamW8bit as it runs on a GPU (the Python optimizer over the CUDA op's two kernels): a big parameter with
    8-bit state and a small one with fp32 state, 3 steps, bit for bit the kernels' formula over the reference
    (de)quantizers — so the optimizer hands the op its arguments in the binding's order."""
    from qlora_ds.optim import PagedAdamW8bit, _op

    monkeypatch.delenv("QLORA_DS_BACKEND", raising=False)
    monkeypatch.setitem(_op._ops, "cpu", cuda_emu.EmulatedPagedOptim(dll))
    gen = torch.Generator().manual_seed(3)
    big, small = torch.randn(5000, generator=gen), torch.randn(100, generator=gen)
    params = [torch.nn.Parameter(big.clone()), torch.nn.Parameter(small.clone())]
    opt = PagedAdamW8bit(params, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, blocksize=256, min_8bit_size=4096)
    qm, am, qv, av = zero_state_8bit(big.numel(), 256)
    sm, sv = torch.zeros(100), torch.zeros(100)
    for step in (1, 2, 3):
        gb, gs = torch.randn(5000, generator=gen), torch.randn(100, generator=gen)
        params[0].grad, params[1].grad = gb.clone(), gs.clone()
        opt.step()
        cuda_adamw_8bit(big, gb, qm, am, qv, av, 256, 1e-2, 0.9, 0.99, 1e-8, 0.1, step)
        cuda_adamw(small, gs, sm, sv, 1e-2, 0.9, 0.99, 1e-8, 0.1, step)
        state = opt.state[params[0]]
        assert same_bits(params[0].detach(), big) and same_bits(state["exp_avg"], qm), step
        assert same_bits(state["exp_avg_sq_absmax"], av) and same_bits(params[1].detach(), small), step
        assert same_bits(opt.state[params[1]]["exp_avg_sq"], sv), step
