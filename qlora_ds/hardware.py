"""Which device and which compute dtype a run uses: one place decides, logs its choice once, and says why.

``auto`` compute dtype = bf16 where the device computes it natively (CUDA capability ≥ 8.0; CPUs with
AVX512-BF16 or AMX), fp16 on older CUDA GPUs (T4, V100: no bf16 at all), fp32 on CPUs without native bf16
(torch emulates bf16 matmuls there: a QLoRALinear fwd+bwd measured ~15× slower than fp32 under AVX2 emulation on a
Xeon; ~30× is reported on AVX2-only EPYCs). An explicit
``bf16`` where ``auto`` would not pick it is kept, with a warning. Storage stays 4-bit and LoRA masters fp32
whatever is chosen here. All detection goes through :func:`device_facts`, the single entry point tests mock.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os

import torch

from .errors import QLoRADSError

log = logging.getLogger(__name__)

DTYPE_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)
# one QLoRALinear 576→1536, 256 tokens, fwd+bwd, 1 thread, a Xeon held to AVX2: bf16 189.6 ms vs fp32 13.0 ms;
# AVX2-only AMD EPYCs are reported at ~30x
CPU_BF16_EMULATION_SLOWDOWN = "15-30x"


@dataclasses.dataclass(frozen=True)
class DeviceFacts:
    """What the dtype decision needs to know about one device."""

    kind: str                                   # "cuda" | "cpu"
    name: str                                   # e.g. "NVIDIA H200" or "AMD EPYC 7B13"
    cuda_capability: tuple[int, int] | None = None
    cpu_isa: str | None = None                  # "amx" | "avx512_bf16" | "avx512" | "avx2" | "other"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=None)
def cpu_isa() -> str:
    """The widest SIMD the CPU offers that matters here: 'amx', 'avx512_bf16', 'avx512', 'avx2' or 'other'."""
    flags = _cpu_flags()
    cap = torch.backends.cpu.get_cpu_capability()       # honours ATEN_CPU_CAPABILITY (a restricted torch)
    if not flags:                                       # non-Linux: torch's own probe
        return {"AVX512": "avx512", "AVX2": "avx2"}.get(cap, "other")
    if cap in ("AVX2", "DEFAULT"):                      # torch told to run as an AVX2 / plain x86-64 CPU: so do we
        return "avx2" if cap == "AVX2" and {"avx2", "fma"} <= flags else "other"
    if {"amx_bf16", "amx_tile"} <= flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    if "avx512f" in flags and "avx512bw" in flags:
        return "avx512"
    if "avx2" in flags and "fma" in flags:
        return "avx2"
    return "other"


@functools.lru_cache(maxsize=None)
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def device_facts(device: torch.device) -> DeviceFacts:
    """The single detection entry point (tests monkeypatch this)."""
    device = torch.device(device)
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return DeviceFacts("cuda", torch.cuda.get_device_name(idx),
                           cuda_capability=torch.cuda.get_device_capability(idx))
    return DeviceFacts("cpu", cpu_name(), cpu_isa=cpu_isa())


def resolve_device(spec: str | None = "auto") -> torch.device:
    """``auto``/None: this rank's local GPU (``LOCAL_RANK``) when CUDA is available, else the CPU."""
    if spec in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise QLoRADSError(f"--device {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QLoRADSError(f"--device {spec} asked for CUDA, but torch sees no GPU (torch {torch.__version__}); "
                           f"use --device cpu or install a CUDA build of torch")
    if device.type not in ("cpu", "cuda"):
        raise QLoRADSError(f"--device {spec!r}: only cpu and cuda are supported")
    return device


def auto_dtype(facts: DeviceFacts) -> tuple[torch.dtype, str]:
    """(dtype, reason) for ``auto`` on a device described by ``facts``."""
    if facts.kind == "cuda":
        major, minor = facts.cuda_capability or (0, 0)
        if major >= 8:
            return torch.bfloat16, f"{facts.name} (sm_{major}{minor}) computes bf16 natively"
        return torch.float16, f"{facts.name} (sm_{major}{minor}) has no bf16: fp16 with dynamic loss scaling"
    if facts.cpu_isa in ("amx", "avx512_bf16"):
        return torch.bfloat16, f"CPU {facts.name} has {facts.cpu_isa.upper()}: native bf16 matmuls"
    return torch.float32, (f"CPU {facts.name} ({(facts.cpu_isa or 'other').upper()}) has no native bf16 "
                           f"(torch would emulate it, {CPU_BF16_EMULATION_SLOWDOWN} slower): fp32 compute")


_logged: set = set()


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device | str = "cpu") -> torch.dtype:
    """``auto|bf16|fp16|fp32`` (or a torch dtype) → the compute dtype; the choice is logged once per process."""
    if isinstance(spec, torch.dtype):
        if spec not in DTYPE_NAMES.values():
            raise QLoRADSError(f"compute dtype {spec} is not supported; use bf16, fp16 or fp32")
        return spec
    spec = "auto" if spec is None else str(spec).lower()
    if spec in DTYPE_NAMES:
        dtype, reason = DTYPE_NAMES[spec], "asked for"
    elif spec == "auto":
        dtype, reason = auto_dtype(device_facts(torch.device(device)))
    else:
        raise QLoRADSError(f"dtype {spec!r} is unknown; use one of {', '.join(DTYPE_CHOICES)}")
    key = (str(device), spec, dtype)
    if key not in _logged:
        _logged.add(key)
        log.info("compute dtype %s on %s (%s: %s)", dtype_name(dtype), device, spec, reason)
        if spec == "bf16":
            _warn_if_emulated_bf16(device)
    return dtype


def _warn_if_emulated_bf16(device: torch.device | str) -> None:
    """An explicit bf16 on a device that has no native bf16 runs, but far slower: say so, and what to use."""
    try:
        facts = device_facts(torch.device(device))
    except (RuntimeError, AssertionError):      # a CUDA device torch cannot see: whoever uses it reports that
        return
    auto, _ = auto_dtype(facts)
    if auto == torch.bfloat16:
        return
    if facts.kind == "cuda":
        major, minor = facts.cuda_capability or (0, 0)
        why = (f"{facts.name} (sm_{major}{minor}) has no native bf16 (that needs sm_80 or newer): bf16 runs "
               f"emulated, far slower")
    else:
        why = (f"CPU {facts.name} ({(facts.cpu_isa or 'other').upper()}) has no AVX512-BF16/AMX: torch emulates "
               f"every bf16 matmul, {CPU_BF16_EMULATION_SLOWDOWN} slower than fp32")
    log.warning("--dtype bf16 on %s: %s. --dtype auto (%s here) is much faster; if a ds_config says bf16, set its "
                "\"enabled\" to \"auto\" instead of asking for bf16", device, why, dtype_name(auto))


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPE_NAMES.items()}[dtype]


def fold_bfloat16(ds_config: dict) -> dict:
    """DeepSpeed reads ``"bf16"``, else its old name ``"bfloat16"``: move the latter to the former (in place), so
    that it is checked and its options kept; both, disagreeing, is a QLoRADSError."""
    if "bfloat16" in ds_config:
        if "bf16" in ds_config and ds_config["bf16"] != ds_config["bfloat16"]:
            raise QLoRADSError(f"ds_config has both \"bf16\" ({ds_config['bf16']!r}) and its old name \"bfloat16\" "
                               f"({ds_config['bfloat16']!r}), and they disagree; keep only \"bf16\"")
        ds_config["bf16"] = ds_config.pop("bfloat16")
    return ds_config


def fold_ds_precision(ds_config: dict, dtype: torch.dtype, asked: str = "auto") -> dict:
    """Make a DeepSpeed config's ``bf16``/``fp16`` sections say ``dtype`` (in place; returned too): an absent
    section or ``"enabled": "auto"`` is filled in, an explicit value that disagrees is a QLoRADSError naming both.
    An old-style ``"bfloat16"`` section is read as ``"bf16"`` (:func:`fold_bfloat16`). fp16 keeps DeepSpeed's
    default dynamic loss scaling (``loss_scale`` 0) unless the section sets a static one."""
    fold_bfloat16(ds_config)
    bad = []
    for key, want in (("bf16", dtype == torch.bfloat16), ("fp16", dtype == torch.float16)):
        section = ds_config.get(key, {})
        if not isinstance(section, dict):
            raise QLoRADSError(f"ds_config {key}={section!r} must be an object, e.g. {{\"enabled\": \"auto\"}}")
        enabled = section.get("enabled", "auto")
        if isinstance(enabled, str) and enabled.lower() in ("true", "false"):   # DeepSpeed reads these as booleans
            enabled = enabled.lower() == "true"
        if enabled != "auto" and not isinstance(enabled, bool):
            raise QLoRADSError(f"ds_config {key}.enabled={enabled!r} must be true, false or \"auto\"")
        if enabled != "auto" and enabled != want:
            bad.append(f"{key}.enabled={str(enabled).lower()}")
        ds_config[key] = {**section, "enabled": want}
    if bad:
        if asked == "auto" and "bf16.enabled=true" in bad:     # not "ask for bf16": it would be emulated here
            other = (f"; auto picked {dtype_name(dtype)} because this device has no native bf16 (--dtype bf16 would "
                     f"run emulated, much slower)")
        else:
            other = " or ask for the dtype it was written for"
        raise QLoRADSError(f"ds_config {' and '.join(bad)} conflicts with the compute dtype {dtype_name(dtype)} "
                           f"(dtype {asked}); set \"enabled\": \"auto\" in the ds_config (it then follows the dtype)"
                           f"{other}")
    return ds_config


def ds_compute_dtype(ds_config: dict) -> torch.dtype:
    """The compute dtype a ds_config's (explicit) bf16/fp16 sections describe: bf16, fp16, else fp32."""
    if (ds_config.get("bf16", ds_config.get("bfloat16")) or {}).get("enabled") is True:
        return torch.bfloat16
    return torch.float16 if (ds_config.get("fp16") or {}).get("enabled") is True else torch.float32
