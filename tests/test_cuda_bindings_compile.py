"""The torch bindings of the CUDA ops (csrc/*_cuda.cpp) parse against this torch's headers and the CUDA toolkit's,
without a CUDA build of torch: a compile error there would otherwise first show on a (rarely lent) GPU machine.

The CPU wheel ships c10/cuda/*.h but not the CMake-generated c10/cuda/impl/cuda_cmake_macros.h; an empty stand-in
is enough for -fsyntax-only (it only defines export macros of the CUDA build).
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from qlora_ds.ops.builder import CSRC

CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")

def _cuda_include() -> str | None:
    """The toolkit's include folder (the one holding cuda_runtime_api.h): CUDA_HOME, nvcc's toolkit, /usr/local/cuda*."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(str(Path(nvcc).resolve().parent.parent))
    roots += sorted(glob.glob("/usr/local/cuda*"))
    for root in filter(None, roots):
        if (Path(root) / "include" / "cuda_runtime_api.h").is_file():
            return str(Path(root) / "include")
    return None


CUDA_INCLUDE = _cuda_include()
TORCH_INCLUDE = Path(torch.__file__).parent / "include"


@pytest.mark.skipif(CXX is None or CUDA_INCLUDE is None or not (TORCH_INCLUDE / "c10" / "cuda").is_dir(),
                    reason="needs a C++ compiler, the CUDA toolkit headers and torch's c10/cuda headers")
@pytest.mark.parametrize("source", sorted(p.name for p in Path(CSRC).glob("*_cuda.cpp")))
def test_cuda_bindings_parse(tmp_path, source):
    stub = tmp_path / "inc" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = [CXX, "-std=c++17", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=qlora_ds_check",
           "-DTORCH_API_INCLUDE_EXTENSION_H", "-I", str(tmp_path / "inc"), "-I", str(Path(CSRC) / "include"),
           "-I", str(TORCH_INCLUDE), "-I", str(TORCH_INCLUDE / "torch" / "csrc" / "api" / "include"),
           "-I", sysconfig.get_paths()["include"], "-I", CUDA_INCLUDE, str(Path(CSRC) / source)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
