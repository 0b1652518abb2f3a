"""Compiled quant kernels (C++/OpenMP and CUDA) against the torch reference and bitsandbytes, bit for bit."""
import importlib
import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

import bitsandbytes.functional as bnbF
import pytest
import torch

from qlora_ds.ops import reference as ref
from qlora_ds.ops.builder import CSRC, load_op, min_cuda_arch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BLOCKSIZES = [32, 64, 4096]
SIZES = [1, 7, 64, 255, 4097, 5000]  # odd, partial blocks, one exact block


def codebook(quant_type, device="cpu"):
    code = bnbF.get_4bit_type(quant_type, device="cpu").float()
    order = torch.argsort(code, stable=True)
    bounds = (code[order[:-1]] + code[order[1:]]) / 2
    return code.to(device), bounds.contiguous().to(device), order.to(torch.uint8).to(device)


def codebook8(device="cpu"):
    code8 = torch.sort(bnbF.create_dynamic_map(signed=True).float())[0]
    return code8.to(device), ((code8[:-1] + code8[1:]) / 2).contiguous().to(device)


def make_input(n, blocksize, dtype, device="cpu"):
    x = torch.randn(n)
    x[:blocksize] = 0.0  # an all-zero block (the whole tensor when n <= blocksize)
    if n > 3 * blocksize:
        x[blocksize : 2 * blocksize] *= 1e30  # huge magnitudes
        x[2 * blocksize : 3 * blocksize] *= 1e-30  # tiny ones
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    return x.to(dtype).to(device)


def same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.is_floating_point():
        view = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
        a, b = a.view(view), b.view(view)
    return torch.equal(a.cpu(), b.cpu())


def run_4bit(mod, x, quant_type, blocksize):
    code, bounds, order = codebook(quant_type, x.device)
    n = x.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty((n + blocksize - 1) // blocksize, device=x.device)
    mod.quantize_4bit(x, bounds, order, blocksize, packed, absmax)
    return code, packed, absmax


def check_backend(mod, device):
    """Every one of the five functions of `mod` equals the reference bit for bit."""
    code8, bounds8 = codebook8(device)
    for quant_type in ("nf4", "fp4"):
        for dtype in DTYPES:
            for blocksize in BLOCKSIZES:
                for n in SIZES:
                    case = (quant_type, dtype, blocksize, n)
                    x = make_input(n, blocksize, dtype, device)
                    code, packed, absmax = run_4bit(mod, x, quant_type, blocksize)
                    _, packed_r, absmax_r = run_4bit(ref, x, quant_type, blocksize)
                    assert same_bits(packed, packed_r) and same_bits(absmax, absmax_r), case
                    for out_dtype in DTYPES:
                        out = torch.empty(n, dtype=out_dtype, device=device)
                        out_r = torch.empty_like(out)
                        mod.dequantize_4bit(packed, absmax, code, blocksize, out)
                        ref.dequantize_4bit(packed, absmax, code, blocksize, out_r)
                        assert same_bits(out, out_r), case + (out_dtype,)
                    # double quant of the absmax (nested block 256 as bnb; 4 to get several nested blocks)
                    for nested in (4, 256):
                        offset = float(absmax.mean())
                        centred = absmax - offset
                        nb2 = (centred.numel() + nested - 1) // nested
                        q = torch.empty(centred.numel(), dtype=torch.uint8, device=device)
                        a2 = torch.empty(nb2, device=device)
                        q_r, a2_r = torch.empty_like(q), torch.empty_like(a2)
                        mod.quantize_8bit_blockwise(centred, code8, bounds8, nested, q, a2)
                        ref.quantize_8bit_blockwise(centred, code8, bounds8, nested, q_r, a2_r)
                        assert same_bits(q, q_r) and same_bits(a2, a2_r), case + (nested,)
                        deq = torch.empty_like(absmax)
                        deq_r = torch.empty_like(absmax)
                        mod.dequantize_8bit_blockwise(q, a2, code8, nested, offset, deq)
                        ref.dequantize_8bit_blockwise(q, a2, code8, nested, offset, deq_r)
                        assert same_bits(deq, deq_r), case + (nested,)
                        out = torch.empty(n, dtype=torch.bfloat16, device=device)
                        two_step = torch.empty_like(out)
                        mod.dequantize_4bit_dq(packed, q, a2, code8, nested, offset, code, blocksize, out)
                        ref.dequantize_4bit(packed, deq_r, code, blocksize, two_step)
                        assert same_bits(out, two_step), case + (nested,)


def test_cpu_kernels_match_reference(isa_op):
    check_backend(isa_op, "cpu")


@pytest.mark.parametrize("blocksize", [64, 256])
def test_cpu_kernels_exact_at_the_bounds(isa_op, blocksize):
    """Inputs exactly on the midpoints (a tie goes to the lower code) in full SIMD-sized blocks, for the 4-bit
    and the 8-bit (double-quant) quantizers, with a partial last block."""
    code8, bounds8 = codebook8()
    for quant_type in ("nf4", "fp4"):
        _, bounds, _ = codebook(quant_type)
        x = torch.cat([bounds, bounds8, torch.nextafter(bounds8, torch.tensor(2.0)), torch.rand(300) * 2 - 1])
        x = torch.cat([x, x.flip(0), torch.randn(blocksize + 24)])
        x[::blocksize] = 1.0  # absmax 1 in every block: s == x exactly
        for mod in (isa_op, ref):
            out = run_4bit(mod, x, quant_type, blocksize)
            if mod is isa_op:
                got = out
        assert same_bits(got[1], out[1]) and same_bits(got[2], out[2]), quant_type
    q, a2 = torch.empty(x.numel(), dtype=torch.uint8), torch.empty(-(-x.numel() // blocksize))
    q_r, a2_r = torch.empty_like(q), torch.empty_like(a2)
    isa_op.quantize_8bit_blockwise(x, code8, bounds8, blocksize, q, a2)
    ref.quantize_8bit_blockwise(x, code8, bounds8, blocksize, q_r, a2_r)
    assert same_bits(q, q_r) and same_bits(a2, a2_r)
    deq, deq_r = torch.empty(x.numel()), torch.empty(x.numel())
    isa_op.dequantize_8bit_blockwise(q, a2, code8, blocksize, 0.25, deq)
    ref.dequantize_8bit_blockwise(q, a2, code8, blocksize, 0.25, deq_r)
    assert same_bits(deq, deq_r)


def test_cpu_isa_selection(cpu_op, monkeypatch):
    """The widest path is the default; a path the CPU lacks (or a typo) is a clear error, also through the env."""
    from qlora_ds.errors import QLoRADSError
    from qlora_ds.ops.builder import _apply_cpu_isa

    have = cpu_op.supported_cpu_isas()
    forced = cpu_op.cpu_isa()          # this session's QLORA_DS_CPU_ISA (e.g. an AVX2 emulation) is restored after
    monkeypatch.delenv("QLORA_DS_CPU_ISA", raising=False)
    cpu_op.set_cpu_isa("auto")
    try:
        assert have[-1] == "scalar" and cpu_op.cpu_isa() == have[0]
        with pytest.raises(RuntimeError, match="not supported by this CPU"):
            cpu_op.set_cpu_isa("avx1024")
        assert cpu_op.cpu_isa() == have[0]
        monkeypatch.setenv("QLORA_DS_CPU_ISA", "scalar")
        _apply_cpu_isa(cpu_op)
        assert cpu_op.cpu_isa() == "scalar"
        cpu_op.set_cpu_isa("auto")
        monkeypatch.setenv("QLORA_DS_CPU_ISA", "neon512")
        with pytest.raises(QLoRADSError, match="QLORA_DS_CPU_ISA='neon512'"):
            _apply_cpu_isa(cpu_op)
        assert cpu_op.cpu_isa() == have[0]
    finally:
        cpu_op.set_cpu_isa(forced)


def test_cpu_op_is_built_portably():
    """No -march=native / host SIMD macros: a prebuilt op must run on any CPU of its architecture."""
    from qlora_ds.ops.builder import PagedOptimCPUBuilder, QuantCPUBuilder

    for builder in (QuantCPUBuilder, PagedOptimCPUBuilder):
        args = builder().cxx_args()
        assert not [a for a in args if a.startswith(("-march", "-mcpu", "-mtune", "-D__AVX"))], (builder, args)
        assert "-ffp-contract=off" in args and "-ffast-math" not in args, (builder, args)


def test_a_build_lock_left_by_a_killed_build_does_not_hang_the_next_load(cpu_op, tmp_path):
    """torch's JIT takes <build dir>/lock for every load and waits for it forever; a build killed midway leaves it
    behind. load_op clears it under its own flock (which dies with its holder), with a warning, and loads."""
    import sys

    from torch.utils.cpp_extension import _get_build_directory

    from qlora_ds.ops.builder import PagedOptimCPUBuilder

    lock = os.path.join(_get_build_directory(PagedOptimCPUBuilder().name, verbose=False), "lock")
    open(lock, "w").close()                                 # what a killed build leaves
    code = ("import warnings; warnings.simplefilter('always'); from qlora_ds.ops.builder import load_op; "
            "load_op('paged_optim', 'cpu'); print('loaded')")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                              env={**os.environ, "PYTHONPATH": str(CSRC.parent)})
    except subprocess.TimeoutExpired:
        pytest.fail("load_op waited on a stale build lock")
    finally:
        leftover = os.path.exists(lock)
        if leftover:
            os.remove(lock)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("loaded"), proc.stderr[-2000:]
    assert f"left by a build of {PagedOptimCPUBuilder().name} that was interrupted" in proc.stderr and not leftover


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 64), (33, 17), (130, 96)])
def test_cpu_quantize_matches_bitsandbytes(isa_op, quant_type, dtype, shape):
    torch.manual_seed(0)
    w = torch.randn(shape)
    w.view(-1)[:64] = 0.0
    w = w.to(dtype)
    packed_bnb, state = bnbF.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=False)
    _, packed, absmax = run_4bit(isa_op, w.reshape(-1), quant_type, 64)
    assert same_bits(packed, packed_bnb.view(torch.uint8).reshape(-1))
    assert same_bits(absmax, state.absmax.float())


def test_cpu_kernels_reject_bad_arguments(cpu_op):
    code, bounds, order = codebook("nf4")
    x = torch.randn(10)
    with pytest.raises(RuntimeError, match="packed_out"):
        cpu_op.quantize_4bit(x, bounds, order, 64, torch.empty(4, dtype=torch.uint8), torch.empty(1))
    with pytest.raises(RuntimeError, match="blocksize"):
        cpu_op.quantize_4bit(x, bounds, order, 63, torch.empty(5, dtype=torch.uint8), torch.empty(1))
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        cpu_op.dequantize_4bit(torch.empty(5, dtype=torch.uint8), torch.empty(1), code, 64,
                               torch.empty(10, dtype=torch.float64))


def test_load_op_unknown_op():
    with pytest.raises(ValueError, match="unknown op"):
        load_op("nope", "cpu")


@pytest.mark.parametrize("cuda_major, default", [(11, (70, 75, 80, 86, 90)), (12, (70, 75, 80, 86, 90)),
                                                 (13, (75, 80, 86, 90))])
def test_cuda_builder_capabilities_without_a_gpu(monkeypatch, cuda_major, default):
    """What the CUDA builder passes nvcc when prebuilding with no GPU visible (issue 13 §1.6): our default list
    instead of DeepSpeed's 6.0;6.1;7.0 fallback, which nvcc 13 rejects, from Volta (7.0) where the toolkit still
    builds it (min_cuda_arch) to Hopper + PTX; a list nvcc cannot build is filtered, and one with nothing left is
    a clear error."""
    from qlora_ds.errors import OpBuildError
    from qlora_ds.ops.builder import QuantCUDABuilder

    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)  # restored afterwards: the builder sets it
    monkeypatch.setattr(QuantCUDABuilder, "cuda_major", lambda self: cuda_major)
    b = QuantCUDABuilder()
    b.jit_mode = False  # the setup.py (prebuild) path
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in default] + [
        "-gencode=arch=compute_90,code=compute_90"]
    assert b.compute_capability_args() == gencode
    assert default[0] == 10 * min_cuda_arch(cuda_major)[0] + min_cuda_arch(cuda_major)[1]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "6.0;6.1;7.0;8.0")
    kept = ["70", "80"] if cuda_major < 13 else ["80"]
    assert b.compute_capability_args() == [f"-gencode=arch=compute_{a},code=sm_{a}" for a in kept]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "6.0;6.1")
    with pytest.raises(OpBuildError, match="TORCH_CUDA_ARCH_LIST"):
        b.compute_capability_args()


def _sm(*archs: str) -> list[str]:
    return [f"-gencode=arch=compute_{a.rstrip('+')},code={'compute' if a.endswith('+') else 'sm'}_{a.rstrip('+')}"
            for a in archs]


@pytest.mark.parametrize("value, prebuild, jit", [
    ("9.0a", _sm("90"), "9.0+PTX"),                        # Hopper boxes building FlashAttention-3 set this
    ("8.0;10.0a", _sm("80", "100"), "8.0;10.0+PTX"),
    ("Hopper", _sm("90", "90+"), "9.0+PTX"),               # torch's named archs
    ("8.6+PTX 9.0a", _sm("86", "86+", "90"), "8.6+PTX;9.0"),
    (" ", _sm("75", "80", "86", "90", "90+"), None),        # blank: unset (the prebuild default; JIT probes the GPUs)
])
def test_cuda_builder_reads_every_arch_list_torch_accepts(monkeypatch, value, prebuild, jit):
    """TORCH_CUDA_ARCH_LIST entries torch accepts but DeepSpeed's parser does not ("9.0a": int("0a")) are rewritten
    before it sees them: the prebuild gets its -gencode flags, a JIT build the list torch compiles from (the arch
    suffix dropped: our kernels need none). Before, the JIT build failed and every CUDA tensor silently used the
    reference backend."""
    from qlora_ds.ops.builder import QuantCUDABuilder

    monkeypatch.setattr(QuantCUDABuilder, "cuda_major", lambda self: 13)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", value)
    b = QuantCUDABuilder()
    b.jit_mode = False
    assert b.compute_capability_args() == prebuild
    if jit is None:
        return
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", value)
    b.jit_mode, b._jit_arch_list = True, value.strip()      # as DeepSpeed's jit_load sets them
    assert b.compute_capability_args() == [] and os.environ["TORCH_CUDA_ARCH_LIST"] == jit


@pytest.mark.parametrize("value", ["sm_90", "9", "8.0;Hoper"])
@pytest.mark.parametrize("jit_mode", [True, False])
def test_cuda_builder_names_an_unreadable_arch_list(monkeypatch, value, jit_mode):
    from qlora_ds.errors import OpBuildError
    from qlora_ds.ops.builder import QuantCUDABuilder

    monkeypatch.setattr(QuantCUDABuilder, "cuda_major", lambda self: 13)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", value)
    b = QuantCUDABuilder()
    b.jit_mode = jit_mode
    with pytest.raises(OpBuildError, match=rf"TORCH_CUDA_ARCH_LIST='{value}': cannot read '{value.split(';')[-1]}'"):
        b.compute_capability_args()


class _FakeCUDAModule:
    def __init__(self, error: str):
        self.error = error

    def kernel_image_error(self) -> str:
        return self.error


@pytest.mark.parametrize("jit_runs", [True, False])
def test_prebuilt_cuda_op_without_this_gpus_code_is_rebuilt_for_it(monkeypatch, jit_runs):
    """A prebuilt CUDA op whose arch list misses the GPU (each kernel launch would fail with "no kernel image") is
    rebuilt for the GPU found, ignoring the TORCH_CUDA_ARCH_LIST that made it, with a warning; a rebuild that still
    cannot run is an OpBuildError (the callers fall back to the torch reference)."""
    from qlora_ds.errors import OpBuildError
    from qlora_ds.ops import builder as builder_mod

    no_image = "no kernel image is available for execution on the device"
    prebuilt = _FakeCUDAModule(no_image)
    jit = _FakeCUDAModule("" if jit_runs else no_image)
    seen_arch_list = []

    def fake_load(self, verbose=False):
        seen_arch_list.append(os.environ.get("TORCH_CUDA_ARCH_LIST"))
        return jit

    cls = builder_mod.BUILDERS[("quant", "cuda")]
    monkeypatch.setattr(builder_mod, "_cache", {})
    real_import = importlib.import_module
    monkeypatch.setattr(builder_mod.importlib, "import_module",
                        lambda name: prebuilt if name == cls().absolute_name() else real_import(name))
    monkeypatch.setattr(cls, "is_compatible", lambda self, verbose=False: True)
    monkeypatch.setattr(cls, "load", fake_load)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    with pytest.warns(RuntimeWarning, match="cannot run on this GPU.*no kernel image"):
        if jit_runs:
            assert load_op("quant", "cuda") is jit
        else:
            with pytest.raises(OpBuildError, match="this GPU cannot run it"):
                load_op("quant", "cuda")
    assert seen_arch_list == [None] and os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0"


def test_prebuilt_cuda_op_with_this_gpus_code_is_used(monkeypatch):
    from qlora_ds.ops import builder as builder_mod

    prebuilt = _FakeCUDAModule("")
    cls = builder_mod.BUILDERS[("paged_optim", "cuda")]
    monkeypatch.setattr(builder_mod, "_cache", {})
    monkeypatch.setattr(builder_mod.importlib, "import_module", lambda name: prebuilt)
    monkeypatch.setattr(cls, "load", lambda self, verbose=False: pytest.fail("rebuilt a module that runs"))
    assert load_op("paged_optim", "cuda") is prebuilt


NVCC = shutil.which("nvcc") or next(iter(sorted(glob.glob("/usr/local/cuda*/bin/nvcc"))), None)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("arch", ["sm_70", "sm_75", "sm_80", "sm_90"])  # the oldest and newest of the defaults
@pytest.mark.parametrize("source", sorted(p.name for p in Path(CSRC).glob("*.cu")))
def test_cuda_sources_compile(tmp_path, source, arch):
    if arch == "sm_70":                                       # in the default list below CUDA 13 only
        version = subprocess.run([NVCC, "--version"], capture_output=True, text=True).stdout
        release = re.search(r"release (\d+)", version)
        if release is None or min_cuda_arch(int(release.group(1))) > (7, 0):
            pytest.skip("this nvcc cannot build sm_70 (CUDA 13 dropped Volta)")
    cmd = [NVCC, "-c", f"-arch={arch}", "-O3", "--fmad=false", "-I", str(CSRC / "include"), str(CSRC / source),
           "-o", str(tmp_path / "k.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.cuda
def test_cuda_kernels_match_reference():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    check_backend(load_op("quant", "cuda"), "cuda")
