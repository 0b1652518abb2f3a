"""What ran where: GPU, driver, CUDA, Python packages, commit — printed and written as one JSON file.

    python scripts/gpu/env.py OUT.json
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys

PACKAGES = ("torch", "transformers", "peft", "accelerate", "deepspeed", "bitsandbytes", "triton", "safetensors",
            "pydantic", "numpy")


def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def facts() -> dict:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from bench.common import git_commit
    from qlora_ds.hardware import cpu_isa, cpu_name

    out = {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_name(),
           "cpu_isa": cpu_isa(), "cpu_count": os.cpu_count(), "commit": git_commit(),
           "versions": {p: _version(p) for p in PACKAGES}, "torch_cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "nvcc": _run(["nvcc", "--version"]),
           "nvidia_smi": _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,"
                                             "power.limit", "--format=csv,noheader"])}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, capability=list(torch.cuda.get_device_capability(0)), gpu_memory_gib=round(
            p.total_memory / (1 << 30), 1), multiprocessors=p.multi_processor_count,
            cudnn=torch.backends.cudnn.version())
        smi = (out["nvidia_smi"] or "").split(",")
        out["driver"] = smi[1].strip() if len(smi) > 1 else None
    if out["nvcc"]:
        out["nvcc"] = out["nvcc"].splitlines()[-1]
    out["build"] = build_env()
    return out


def build_env() -> dict:
    """What a failed CUDA build is read against: the toolkit found (by torch, which compiles), the nvcc on PATH and
    the variables the builders read."""
    from torch.utils.cpp_extension import CUDA_HOME

    return {"CUDA_HOME": os.environ.get("CUDA_HOME"), "torch_cuda_home": CUDA_HOME, "nvcc_path": shutil.which("nvcc"),
            **{k: os.environ.get(k) for k in ("TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "TORCH_EXTENSIONS_DIR", "CXX")}}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = json.dumps(facts(), indent=2)
    print(text)
    if argv:
        with open(argv[0], "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
