"""Shared fixtures of the reliability suite: tiny models and a planted malicious pickle."""
from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn as nn

from qlora_ds.nn import QALoRAConfig, QALoRALinear, QLoRAConfig, QLoRALinear

CFG = QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32)


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    kwargs = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(LlamaConfig(**{**kwargs, **overrides})).eval()


def inject(model: nn.Module, config=CFG) -> nn.Module:
    """A local stand-in for qlora_ds.inject: swap every targeted nn.Linear in place."""
    cls = QALoRALinear if isinstance(config, QALoRAConfig) else QLoRALinear
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and config.matches(path):
            parent, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(parent), leaf, cls.from_linear(module, config))
    return model


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], v) for k, v in before.items())


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker file proves the pickle ran code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def evil(tmp_path):
    """(write(path, fmt) -> None, marker path). fmt 'torch' = torch.save zip, 'pickle' = a raw pickle."""
    marker = tmp_path / "PWNED"

    def write(path, fmt: str = "torch") -> None:
        obj = {"state": {"lora_A.weight": torch.zeros(2)}, "payload": Payload(str(marker))}
        if fmt == "torch":
            torch.save(obj, str(path))
        else:
            with open(path, "wb") as f:
                pickle.dump(obj, f)

    return write, marker
