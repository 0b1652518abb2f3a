"""Our CUDA kernels (csrc/*.cu) executed on the CPU by tests/cuda_emu/simt.h, for machines without a GPU.

``build(dir)`` rewrites the kernel launches of ``quant_cuda_impl.cu`` and ``paged_optim_impl.cu`` for the emulator,
compiles them with g++ and ``abi.cpp`` (extern "C" entry points) into one shared library and returns it (ctypes).
``EmulatedQuant`` and ``EmulatedPagedOptim`` call it with the names, arguments and checks of the torch bindings
(csrc/quant_cuda.cpp, csrc/paged_optim_cuda.cpp), on CPU tensors, so the tests that check the compiled ops against
the reference run unchanged on the kernels a GPU would run.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import torch

from qlora_ds.ops.builder import CSRC

HERE = Path(__file__).resolve().parent
SOURCES = ("quant_cuda_impl.cu", "paged_optim_impl.cu")
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def cuda_include() -> Path | None:
    """The CUDA toolkit's include directory (headers only are needed: nothing is linked against CUDA)."""
    nvcc = shutil.which("nvcc")
    for root in ([Path(nvcc).resolve().parents[1]] if nvcc else []) + sorted(Path("/usr/local").glob("cuda*")):
        if (root / "include" / "cuda_runtime.h").exists():
            return root / "include"
    return None


def _matching(text: str, i: int, open_: str, close: str) -> int:
    """Index just past the bracket that closes text[i] (== open_)."""
    depth = 0
    for j in range(i, len(text)):
        depth += {open_: 1, close: -1}.get(text[j], 0)
        if depth == 0:
            return j + 1
    raise ValueError(f"unbalanced {open_} at {i}")


def _split_top(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for j, c in enumerate(text):
        depth += 1 if c in "([{<" else -1 if c in ")]}>" else 0
        if c == "," and depth == 0:
            parts.append(text[start:j].strip())
            start = j + 1
    return parts + [text[start:].strip()]


def rewrite(source: str) -> str:
    """``k<<<g, b[, smem[, stream]]>>>(args);`` -> ``::qlora_emu::launch(g, b, smem, stream, [&] { k(args); });``
    and ``extern __shared__ T name[];`` -> ``T* name = ::qlora_emu::dynamic_smem<T>();``."""
    source = re.sub(r"extern\s+__shared__\s+(\w+)\s+(\w+)\s*\[\s*\]\s*;",
                    r"\1* \2 = ::qlora_emu::dynamic_smem<\1>();", source)
    out, pos = [], 0
    while (at := source.find("<<<", pos)) >= 0:
        # the kernel: an identifier, maybe with template arguments, right before <<<
        k = at
        if source[k - 1] == ">":
            depth = 0
            while True:
                k -= 1
                depth += {">": 1, "<": -1}.get(source[k], 0)
                if depth == 0:
                    break
        while k > 0 and (source[k - 1].isalnum() or source[k - 1] in "_:"):
            k -= 1
        kernel = source[k:at]
        cfg_end = source.index(">>>", at)
        config = _split_top(source[at + 3 : cfg_end])
        args_open = source.index("(", cfg_end)
        args_end = _matching(source, args_open, "(", ")")
        if len(config) < 2 or len(config) > 4 or not kernel.strip():
            raise ValueError(f"cannot rewrite the launch at {at}: {source[k:args_end]}")
        config += ["0", "nullptr"][len(config) - 2 :]
        out.append(source[pos:k])
        out.append(f"::qlora_emu::launch(dim3({config[0]}), dim3({config[1]}), {config[2]}, {config[3]}, "
                   f"[&] {{ {kernel}{source[args_open:args_end]}; }})")
        pos = args_end
    return "".join(out) + source[pos:]


def build(out_dir: Path) -> ctypes.CDLL:
    """Compile the emulated kernels into ``out_dir`` (reused while the sources are unchanged) and load them."""
    include = cuda_include()
    if include is None or shutil.which("g++") is None:
        raise FileNotFoundError("the emulated CUDA kernels need g++ and the CUDA headers (cuda_runtime.h)")
    inputs = [CSRC / s for s in SOURCES] + [HERE / "simt.h", HERE / "abi.cpp", Path(__file__)]
    key = hashlib.sha256(b"".join(p.read_bytes() for p in inputs)).hexdigest()[:16]
    lib = out_dir / f"cuda_emu_{key}.so"
    if not lib.exists():
        work = out_dir / f"build_{key}_{os.getpid()}"   # per process: two test runs may build at once
        work.mkdir(parents=True, exist_ok=True)
        units = []
        for name in SOURCES:
            unit = work / (name.replace(".cu", "") + "_emu.cpp")
            unit.write_text(f'#line 1 "{CSRC / name}"\n' + rewrite((CSRC / name).read_text()))
            units.append(str(unit))
        tmp = work / lib.name
        cmd = ["g++", "-std=c++17", "-O1", "-g", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math",
               "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function", "-include", str(HERE / "simt.h"),
               f"-I{include}", f"-I{CSRC / 'include'}", *units, str(HERE / "abi.cpp"), "-o", str(tmp)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise RuntimeError(f"building the emulated CUDA kernels failed:\n{' '.join(cmd)}\n{res.stderr[-6000:]}")
        tmp.replace(lib)    # atomic: a concurrent build's rename of the same bytes is harmless
        shutil.rmtree(work, ignore_errors=True)
    dll = ctypes.CDLL(str(lib))
    for fn in ("emu_quantize_4bit", "emu_dequantize_4bit", "emu_quantize_8bit", "emu_dequantize_8bit",
               "emu_quantize_intn", "emu_dequantize_intn", "emu_adamw_fp32", "emu_adamw_8bit",
               "emu_managed_prefetch", "emu_managed_advise_preferred_host", "emu_managed_advise_accessed_by"):
        getattr(dll, fn).restype = ctypes.c_int
    dll.emu_set_max_grid.restype = None
    dll.emu_set_max_grid.argtypes = [ctypes.c_uint]
    return dll


GUARD = 64  # bytes of canary on each side of every output buffer
CANARY = 0xA5


def _guarded(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of ``t`` inside canary bytes, at the same address modulo 64 (so the kernels take the same vector or
    scalar paths): (the whole buffer, the copy)."""
    nbytes = t.numel() * t.element_size()
    buf = torch.full((nbytes + 3 * GUARD,), CANARY, dtype=torch.uint8)
    shift = (t.data_ptr() - buf.data_ptr() - GUARD) % 64
    inner = buf[GUARD + shift : GUARD + shift + nbytes]
    inner.copy_(t.reshape(-1).view(torch.uint8))
    return buf, inner.view(t.dtype)


def _call(fn, what: str, *args, outs: tuple[int, ...] = ()) -> None:
    """``fn(*args)`` with tensors passed as pointers; the tensors at ``outs`` are written through canary-guarded
    copies: a kernel that writes one byte outside them fails here (a GPU would corrupt memory or fault)."""
    args = list(args)
    guarded = {}
    for i in outs:
        guarded[i] = (args[i],) + _guarded(args[i])
        args[i] = guarded[i][2]
    rc = fn(*[ctypes.c_void_p(None if a is None else a.data_ptr()) if a is None or isinstance(a, torch.Tensor)
              else a for a in args])
    if rc != 0:
        raise RuntimeError(f"emulated CUDA {what}: cudaError {rc}")
    for i, (orig, buf, inner) in guarded.items():
        start = inner.data_ptr() - buf.data_ptr()
        outside = torch.cat([buf[:start], buf[start + inner.numel() * inner.element_size():]])
        bad = torch.nonzero(outside != CANARY)
        assert bad.numel() == 0, f"emulated CUDA {what} wrote outside argument {i} ({bad.numel()} bytes)"
        orig.copy_(inner.view(orig.shape))


def _flat(t: torch.Tensor, name: str, dtype: torch.dtype | None = None) -> None:
    assert t.device.type == "cpu", f"{name}: the emulated kernels run on CPU tensors"
    assert t.dim() == 1 and t.is_contiguous(), f"{name} must be 1-D and contiguous (as the CUDA binding checks)"
    assert dtype is None or t.dtype == dtype, f"{name} must be {dtype}, got {t.dtype}"


I64, F32, F64 = ctypes.c_int64, ctypes.c_float, ctypes.c_double


class EmulatedQuant:
    """csrc/quant_cuda.cpp's seven functions over the emulated kernels (same names, arguments, output buffers)."""

    def __init__(self, dll: ctypes.CDLL):
        self.dll = dll

    def quantize_4bit(self, x, bounds, order, blocksize, packed_out, absmax_out):
        for t, name in ((x, "x"), (packed_out, "packed_out"), (absmax_out, "absmax_out")):
            _flat(t, name)
        _call(self.dll.emu_quantize_4bit, "quantize_4bit", x, DTYPE_CODE[x.dtype], I64(x.numel()), bounds, order,
              I64(blocksize), packed_out, absmax_out, outs=(6, 7))

    def _dequantize(self, packed, absmax, qabsmax, absmax2, code8, nested, offset, code, blocksize, out):
        _flat(packed, "packed", torch.uint8)
        _flat(out, "out")
        assert packed.numel() == (out.numel() + 1) // 2 and blocksize > 0 and blocksize % 2 == 0
        _call(self.dll.emu_dequantize_4bit, "dequantize_4bit", packed, absmax, qabsmax, absmax2, code8, I64(nested),
              F32(offset), code, I64(blocksize), out, DTYPE_CODE[out.dtype], I64(out.numel()), outs=(9,))

    def dequantize_4bit(self, packed, absmax, code, blocksize, out):
        _flat(absmax, "absmax", torch.float32)
        self._dequantize(packed, absmax, None, None, None, 1, 0.0, code, blocksize, out)

    def dequantize_4bit_dq(self, packed, qabsmax, absmax2, code8, nested_blocksize, offset, code, blocksize, out):
        _flat(qabsmax, "qabsmax", torch.uint8)
        _flat(absmax2, "absmax2", torch.float32)
        self._dequantize(packed, None, qabsmax, absmax2, code8, nested_blocksize, offset, code, blocksize, out)

    def quantize_8bit_blockwise(self, x, code8, bounds8, blocksize, q_out, absmax_out):
        _flat(x, "x", torch.float32)
        _call(self.dll.emu_quantize_8bit, "quantize_8bit_blockwise", x, I64(x.numel()), bounds8, I64(blocksize),
              q_out, absmax_out, outs=(4, 5))

    def dequantize_8bit_blockwise(self, q, absmax, code8, blocksize, offset, out):
        _flat(out, "out", torch.float32)
        _call(self.dll.emu_dequantize_8bit, "dequantize_8bit_blockwise", q, absmax, code8, I64(blocksize),
              F32(offset), out, I64(out.numel()), outs=(5,))

    def quantize_intn(self, w, bits, group_size, in_features, qweight_out, scales_out, zeros_out):
        _flat(w, "w")
        _call(self.dll.emu_quantize_intn, "quantize_intn", w, DTYPE_CODE[w.dtype], I64(w.numel()), int(bits),
              I64(group_size), qweight_out, scales_out, zeros_out, outs=(5, 6, 7))

    def dequantize_intn(self, qweight, scales, zeros, bits, group_size, in_features, out):
        _flat(out, "out")
        _call(self.dll.emu_dequantize_intn, "dequantize_intn", qweight, scales, zeros, int(bits), I64(group_size),
              out, DTYPE_CODE[out.dtype], I64(out.numel()), outs=(5,))


class EmulatedPagedOptim:
    """csrc/paged_optim_cuda.cpp's fused AdamW steps over the emulated kernels (in place, fp32 CPU tensors)."""

    def __init__(self, dll: ctypes.CDLL):
        self.dll = dll

    def adamw_step(self, param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step):
        for t, name in ((param, "param"), (grad, "grad"), (exp_avg, "exp_avg"), (exp_avg_sq, "exp_avg_sq")):
            _flat(t, name, torch.float32)
        _call(self.dll.emu_adamw_fp32, "adamw_step", param, grad, exp_avg, exp_avg_sq, I64(param.numel()), F64(lr),
              F64(beta1), F64(beta2), F64(eps), F64(weight_decay), I64(step), outs=(0, 2, 3))

    def adamw8bit_step(self, param, grad, qm, am, qv, av, code_m, bounds_m, code_v, bounds_v, blocksize, lr, beta1,
                       beta2, eps, weight_decay, step):
        for t, name in ((param, "param"), (grad, "grad"), (am, "exp_avg_absmax"), (av, "exp_avg_sq_absmax")):
            _flat(t, name, torch.float32)
        _flat(qm, "exp_avg", torch.uint8)
        _flat(qv, "exp_avg_sq", torch.uint8)
        _call(self.dll.emu_adamw_8bit, "adamw8bit_step", param, grad, qm, am, qv, av, code_m, bounds_m, code_v,
              bounds_v, I64(param.numel()), I64(blocksize), F64(lr), F64(beta1), F64(beta2), F64(eps),
              F64(weight_decay), I64(step), outs=(0, 2, 3, 4, 5))
