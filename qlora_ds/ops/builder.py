"""DeepSpeed ``OpBuilder`` subclasses for the compiled qlora-ds ops, and a cached loader.

One small builder per (op, device). Sources are absolute paths into the repository's ``csrc/`` (DeepSpeed
resolves relative paths under ``deepspeed/ops``). ``load_op`` tries a prebuilt module first (built by
``QLORA_DS_BUILD_OPS=1 pip install -e .``), then DeepSpeed's JIT build (cached under
``TORCH_EXTENSIONS_DIR``), and raises :class:`OpBuildError` saying why and how to fix it.

Kernels must be bit-exact with ``qlora_ds.ops.reference``: no fast-math, no FMA contraction.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import re
import shutil
import threading
import warnings
from pathlib import Path

from deepspeed.ops.op_builder.builder import CUDAOpBuilder
from deepspeed.ops.op_builder.cpu.builder import CPUOpBuilder

from ..errors import OpBuildError, QLoRADSError  # qlora_ds.ops catches OpBuildError to fall back

CSRC = Path(__file__).resolve().parents[2] / "csrc"
# one JIT build directory per op and checkout: the build flags hold this checkout's absolute paths, so two checkouts
# sharing TORCH_EXTENSIONS_DIR under one name rebuilt each other's ops (~100 s each time); a source or flag change
# within a checkout still rebuilds (torch compares them), so no build is ever stale
CHECKOUT = hashlib.sha1(str(CSRC).encode()).hexdigest()[:8]
_EXACT_CXX = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-fast-math"]
_EXACT_NVCC = ["--fmad=false", "-ftz=false", "-prec-div=true", "-prec-sqrt=true"]
_MIN_CUDA_MAJOR = 7
# Prebuilding with no GPU visible and no TORCH_CUDA_ARCH_LIST: DeepSpeed would fall back to 6.0;6.1;7.0 (plus
# 8.0;8.6;9.0 only for CUDA 11/12), which nvcc 13 rejects. Ours (default_cuda_archs): V100 (7.0, CUDA < 13) or T4
# (7.5) to Hopper, with PTX of the newest so that later GPUs JIT it.
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;9.0+PTX"
ARCH_LIST_ENV = "TORCH_CUDA_ARCH_LIST"
# torch's named archs (a table local to torch.utils.cpp_extension._get_cuda_arch_flags), looked up case-insensitively
_NAMED_ARCHS = {"kepler+tesla": "3.7", "kepler": "3.5+PTX", "maxwell+tegra": "5.3", "maxwell": "5.0;5.2+PTX",
                "pascal": "6.0;6.1+PTX", "volta+tegra": "7.2", "volta": "7.0+PTX", "turing": "7.5+PTX",
                "ampere+tegra": "8.7", "ampere": "8.0;8.6+PTX", "ada": "8.9+PTX", "hopper": "9.0+PTX",
                "blackwell+tegra": "11.0", "blackwell": "10.0;10.3;12.0;12.1+PTX"}
_ARCH = re.compile(r"(\d+)\.(\d+)[af]?(\+PTX)?", re.IGNORECASE)


def min_cuda_arch(cuda_major: int) -> tuple[int, int]:
    """Oldest compute capability we compile for with a CUDA ``cuda_major`` toolkit: nvcc 13 dropped everything
    below Turing (7.5); older toolkits still reach Volta (7.0), the oldest our kernels support."""
    return (7, 5) if cuda_major >= 13 else (_MIN_CUDA_MAJOR, 0)


def default_cuda_archs(cuda_major: int) -> str:
    """TORCH_CUDA_ARCH_LIST of a prebuild that sets none: from the oldest capability this toolkit builds."""
    return DEFAULT_CUDA_ARCHS if min_cuda_arch(cuda_major) >= (7, 5) else "7.0;" + DEFAULT_CUDA_ARCHS


def normalize_arch_list(value: str, source: str = ARCH_LIST_ENV) -> str | None:
    """A CUDA arch list as torch reads it (``;`` or spaces between entries; ``X.Y``, ``X.Ya``/``X.Yf``, ``+PTX``,
    named archs such as ``Hopper``, ``native``) rewritten as DeepSpeed's parser reads it: ``X.Y[+PTX]`` joined by
    ``;``. The arch-specific suffix is dropped: our kernels use no arch-specific instructions, and sm_90 code runs on
    every 9.0 GPU where sm_90a code would too. None for a blank list (unset); anything else is an OpBuildError
    naming ``source``."""
    out = []
    for token in value.replace(" ", ";").split(";"):
        token = token.strip()
        if not token:
            continue
        if token.lower() == "native":               # torch: the visible GPUs' capabilities
            import torch

            out += ["%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
            continue
        for entry in _NAMED_ARCHS.get(token.lower(), token).split(";"):
            m = _ARCH.fullmatch(entry)
            if m is None:
                raise OpBuildError(f"{source}={value!r}: cannot read {token!r} as a CUDA compute capability; give "
                                   f"entries like \"8.0;8.6;9.0+PTX\" (X.Y, optionally +PTX; 9.0a, 10.0a and names "
                                   f"such as Hopper are read too), or unset it to build for the visible GPUs")
            out.append(f"{int(m[1])}.{int(m[2])}{'+PTX' if m[3] else ''}")
    if not out and value.replace(";", "").strip():   # "native" with no GPU visible
        raise OpBuildError(f"{source}={value!r} names no compute capability (no GPU is visible for 'native'); set "
                           f"it to your GPUs' capabilities, e.g. {source}=\"{DEFAULT_CUDA_ARCHS}\"")
    return ";".join(out) or None


def _src(*names: str) -> list[str]:
    return [str(CSRC / n) for n in names]


class _OurSources:
    """Name, absolute source paths and includes shared by our CPU and CUDA builders (DeepSpeed resolves
    relative sources under deepspeed/ops, so third-party builders must give absolute ones)."""

    BUILD_VAR = ""
    NAME = ""
    MODULE = ""
    SOURCES: tuple[str, ...] = ()

    def __init__(self):
        super().__init__(name=f"{self.NAME}_{CHECKOUT}")

    def absolute_name(self):
        return f"qlora_ds.ops.{self.MODULE}"

    def sources(self):
        return _src(*self.SOURCES)

    def include_paths(self):
        return [str(CSRC / "include")]


class _CPUBuilder(_OurSources, CPUOpBuilder):
    # True: build for the architecture's baseline, not -march=native, so that a prebuilt op runs on any CPU of
    # that architecture; such an op picks its SIMD path at run time (csrc/include/quant_cpu_isa.h).
    PORTABLE = False

    def cxx_args(self):
        if self.PORTABLE:  # CPUOpBuilder's args less the host-specific ones, without its two py-cpuinfo probes
            args = ["-O3", "-Wno-reorder", "-fopenmp"]  # (subprocesses of ~1-2 s each, run on every JIT load)
        else:
            args = [a for a in super().cxx_args() if "fast-math" not in a and a != "-g"]
        return args + [a for a in _EXACT_CXX if a not in args]

    def extra_ldflags(self):
        return ["-fopenmp"]

    def builder(self):
        ext = super().builder()  # CPUOpBuilder.builder drops extra_ldflags: add them back
        ext.extra_link_args = list(ext.extra_link_args or []) + self.extra_ldflags()
        return ext

    def is_compatible(self, verbose=False):
        cxx = os.environ.get("CXX", "c++")
        if shutil.which(cxx) is None:
            self.error_log = f"no C++ compiler found ({cxx!r} is not on PATH)"
            return False
        return super().is_compatible(verbose)


class _CUDABuilder(_OurSources, CUDAOpBuilder):
    def cxx_args(self):
        return super().cxx_args() + ["-ffp-contract=off"]

    def cuda_major(self) -> int:
        """Major version of the nvcc that will compile (13, the strictest, when none can be run)."""
        from deepspeed.ops.op_builder.builder import installed_cuda_version

        try:
            return installed_cuda_version()[0]
        except Exception:  # noqa: BLE001 - no CUDA_HOME / no nvcc: the build fails later with its own message
            return 13

    def compute_capability_args(self, cross_compile_archs=None):
        # Every arch list torch accepts ("9.0a", "Hopper", "native") rewritten first: DeepSpeed's parser reads only
        # X.Y[+PTX], and its ValueError would silently leave the CUDA tensors on the reference backend (JIT).
        if self.jit_mode and getattr(self, "_jit_arch_list", None):      # captured by DeepSpeed's jit_load
            self._jit_arch_list = normalize_arch_list(self._jit_arch_list)
        if ARCH_LIST_ENV in os.environ:      # DeepSpeed rewrites it too; jit_load restores it after the build
            arch_list = normalize_arch_list(os.environ[ARCH_LIST_ENV])
            if arch_list is None:
                del os.environ[ARCH_LIST_ENV]    # blank: unset (DeepSpeed's prebuild would parse '' and fail)
            else:
                os.environ[ARCH_LIST_ENV] = arch_list
        if cross_compile_archs:
            cross_compile_archs = normalize_arch_list(cross_compile_archs, "cross_compile_archs")
        # Non-JIT builds (setup.py) with neither TORCH_CUDA_ARCH_LIST nor an explicit list: our default, not
        # DeepSpeed's. JIT builds probe the visible GPUs as DeepSpeed does; filter_ccs applies to both.
        if not self.jit_mode and cross_compile_archs is None and not os.environ.get(ARCH_LIST_ENV):
            cross_compile_archs = default_cuda_archs(self.cuda_major())
        return super().compute_capability_args(cross_compile_archs)

    def filter_ccs(self, ccs):
        """Drop the capabilities this toolkit cannot compile (< 7.5 with nvcc 13), with one warning; none left
        is an error that says what to set."""
        cuda = self.cuda_major()
        lo = min_cuda_arch(cuda)
        keep, dropped = [], []
        for cc in ccs:
            major, minor = cc.strip().split(".")
            (keep if (int(major), int(minor.split("+")[0])) >= lo else dropped).append([major, minor])
        if dropped:
            self.warning(f"{self.name}: not compiling for compute capabilities "
                         f"{', '.join('.'.join(c) for c in dropped)} (CUDA {cuda} builds >= {lo[0]}.{lo[1]})")
        if not keep:
            raise OpBuildError(f"{self.name}: none of the compute capabilities {';'.join(ccs)} is >= {lo[0]}.{lo[1]}, "
                               f"the oldest CUDA {cuda} can build; set TORCH_CUDA_ARCH_LIST to your GPUs' "
                               f"capabilities, e.g. TORCH_CUDA_ARCH_LIST=\"{default_cuda_archs(cuda)}\"")
        return keep

    def nvcc_args(self):
        args = [a for a in super().nvcc_args() if a not in ("--use_fast_math", "-use_fast_math")]
        return args + _EXACT_NVCC if not self.build_for_cpu else args

    def is_compatible(self, verbose=False):
        import torch
        from torch.utils.cpp_extension import CUDA_HOME

        if torch.version.cuda is None:
            self.error_log = f"torch {torch.__version__} is a build without CUDA"
            return False
        if CUDA_HOME is None or shutil.which(str(Path(CUDA_HOME) / "bin" / "nvcc")) is None:
            self.error_log = "nvcc not found (set CUDA_HOME to the CUDA toolkit)"
            return False
        major = self.cuda_capability_major()  # None unless a CUDA context already exists: never creates one
        if major is not None and major < _MIN_CUDA_MAJOR:
            self.error_log = f"GPU compute capability {major}.x < {_MIN_CUDA_MAJOR}.0"
            return False
        return super().is_compatible(verbose)


class QuantCPUBuilder(_CPUBuilder):
    BUILD_VAR = "QLORA_DS_BUILD_QUANT"
    NAME = "qlora_ds_quant_cpu"
    MODULE = "quant_cpu"
    SOURCES = ("quant_cpu.cpp", "quant_cpu_amx.cpp", "quant_cpu_gemv.cpp", "quant_cpu_gemv_intn.cpp",
               "lora_dropout_cpu.cpp")
    PORTABLE = True


class QuantCUDABuilder(_CUDABuilder):
    BUILD_VAR = "QLORA_DS_BUILD_QUANT"
    NAME = "qlora_ds_quant_cuda"
    MODULE = "quant_cuda"
    SOURCES = ("quant_cuda_impl.cu", "quant_cuda.cpp")


class PagedOptimCPUBuilder(_CPUBuilder):
    BUILD_VAR = "QLORA_DS_BUILD_PAGED_OPTIM"
    NAME = "qlora_ds_paged_optim_cpu"
    MODULE = "paged_optim_cpu"
    SOURCES = ("paged_optim_cpu.cpp",)
    PORTABLE = True

    def cxx_args(self):  # sqrt without errno: the AdamW loop vectorizes (results unchanged: sqrt of v >= 0)
        return super().cxx_args() + ["-fno-math-errno"]


class PagedOptimCUDABuilder(_CUDABuilder):
    BUILD_VAR = "QLORA_DS_BUILD_PAGED_OPTIM"
    NAME = "qlora_ds_paged_optim_cuda"
    MODULE = "paged_optim_cuda"
    SOURCES = ("paged_optim_impl.cu", "paged_optim_cuda.cpp")


BUILDERS = {
    ("quant", "cpu"): QuantCPUBuilder,
    ("quant", "cuda"): QuantCUDABuilder,
    ("paged_optim", "cpu"): PagedOptimCPUBuilder,
    ("paged_optim", "cuda"): PagedOptimCUDABuilder,
}

_cache: dict = {}
_lock = threading.Lock()

_FIX = ("Fix: install a C++ compiler (g++ with OpenMP) and ninja; for CUDA set CUDA_HOME to a toolkit that matches "
        "torch.version.cuda; or prebuild with `QLORA_DS_BUILD_OPS=1 pip install -e .`. "
        "The pure-torch reference backend works without any of this.")


def _why(builder, exc: BaseException) -> str:
    text = str(exc)
    if builder.error_log and builder.error_log not in text:
        text = f"{builder.error_log}; {text}"
    if len(text) > 3000:
        text = "...\n" + text[-3000:]
    return text


CPU_ISA_ENV = "QLORA_DS_CPU_ISA"


def _apply_cpu_isa(module) -> None:
    """``QLORA_DS_CPU_ISA=auto|avx512|avx2|scalar`` picks the CPU kernels' SIMD path (default: the widest the CPU
    has); a path the CPU lacks is an error, not a silent fallback."""
    want = os.environ.get(CPU_ISA_ENV, "auto").strip().lower() or "auto"
    try:
        module.set_cpu_isa(want)
    except RuntimeError:
        raise QLoRADSError(f"{CPU_ISA_ENV}={want!r}: this CPU supports auto, "
                           f"{', '.join(module.supported_cpu_isas())}; unset it or pick one of those") from None


@contextlib.contextmanager
def _one_builder(name: str):
    """Hold an OS lock on the op's build directory around a JIT load, and clear a stale torch build lock under it.

    torch's JIT build takes the directory's ``lock`` file (O_EXCL) for every load, even one with nothing to build,
    and waits for it without end. A build killed midway (a timed-out job, Ctrl-C on one rank) leaves that file
    behind and every later run hangs without a word. An ``flock`` dies with its process: whoever holds it is the
    only one of our loaders inside torch's lock, so a ``lock`` file found while holding it is stale."""
    try:
        import fcntl
        from torch.utils.cpp_extension import _get_build_directory
        root = _get_build_directory(name, verbose=False)
    except (ImportError, OSError):      # no fcntl (not POSIX) or no such helper in this torch: torch's lock alone
        yield
        return
    with open(os.path.join(root, "qlora_ds.flock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)                 # released when the file closes or the process dies
        stale = os.path.join(root, "lock")
        if os.path.exists(stale):
            warnings.warn(f"qlora_ds: removing {stale}, left by a build of {name} that was interrupted; building "
                          f"it again", RuntimeWarning, stacklevel=4)
            with contextlib.suppress(FileNotFoundError):
                os.remove(stale)
        yield


def _no_device_code(module) -> str:
    """Why the current GPU cannot run ``module``'s kernels ("" if it can; a module without the check: "")."""
    check = getattr(module, "kernel_image_error", None)
    return check() if check is not None else ""


@contextlib.contextmanager
def _env_without(name: str):
    saved = os.environ.pop(name, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[name] = saved


def _build(builder, for_this_gpu: bool = False):
    """JIT-build ``builder``'s op; ``for_this_gpu``: for the capability of the GPU found, whatever
    TORCH_CUDA_ARCH_LIST says (that list already gave a module this GPU cannot run)."""
    missing = [s for s in builder.sources() if not Path(s).is_file()]
    if missing:
        raise OpBuildError(f"cannot build {builder.NAME}: sources missing: {missing}. {_FIX}")
    if not builder.is_compatible(verbose=False):
        raise OpBuildError(f"cannot build {builder.NAME}: incompatible: {builder.error_log}. {_FIX}")
    try:
        with _one_builder(builder.name), (_env_without("TORCH_CUDA_ARCH_LIST") if for_this_gpu
                                          else contextlib.nullcontext()):
            return builder.load(verbose=False)
    except Exception as exc:  # compile/link errors, missing ninja, ...
        raise OpBuildError(f"building {builder.NAME} failed: {_why(builder, exc)}\n{_FIX}") from exc


def load_op(op: str, device_type: str):
    """The compiled module of ``op`` ("quant" | "paged_optim") for ``device_type`` ("cpu" | "cuda"), cached: the one
    setup.py prebuilt, else a JIT build. A prebuilt CUDA module without code for this GPU (its arch list missed it)
    is built again for the GPU, with a warning, rather than failing at its first kernel launch."""
    key = (op, device_type)
    if key not in BUILDERS:
        raise ValueError(f"unknown op/device {key}; known: {sorted(BUILDERS)}")
    with _lock:
        if key in _cache:
            return _cache[key]
        builder = BUILDERS[key]()
        try:  # a module prebuilt by setup.py
            module = importlib.import_module(builder.absolute_name())
        except ImportError:
            module = None
        rebuild = module is not None and device_type == "cuda" and bool(why := _no_device_code(module))
        if rebuild:
            warnings.warn(f"qlora_ds: the prebuilt {builder.NAME} cannot run on this GPU ({why}): it was built for "
                          f"other compute capabilities; building it for this GPU now. Prebuild with "
                          f"TORCH_CUDA_ARCH_LIST naming this GPU's capability to skip this", RuntimeWarning,
                          stacklevel=3)
            module = None
        if module is None:
            module = _build(builder, for_this_gpu=rebuild)
            if device_type == "cuda" and (why := _no_device_code(module)):
                raise OpBuildError(f"{builder.NAME} was built but this GPU cannot run it ({why}); check that "
                                   f"TORCH_CUDA_ARCH_LIST (if set) includes this GPU's compute capability. {_FIX}")
        if device_type == "cpu":
            _apply_cpu_isa(module)
        _cache[key] = module
        return module


def builders_for_setup() -> list:
    """Builders whose ``.builder()`` extensions setup.py adds when ``QLORA_DS_BUILD_OPS=1``.

    CPU builders always; CUDA ones only when torch has CUDA and nvcc is found. Builders whose sources are not
    in the tree (yet) are skipped.
    """
    out = []
    for (_, device), cls in BUILDERS.items():
        b = cls()
        if not all(Path(s).is_file() for s in b.sources()):
            continue
        if device == "cuda" and not b.is_compatible(verbose=False):
            continue
        if os.environ.get(b.BUILD_VAR, "1") == "0":
            continue
        out.append(b)
    return out
