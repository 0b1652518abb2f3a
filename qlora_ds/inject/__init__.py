"""Injection: architecture policies, in-place replacement, streaming quantized loading, ZeRO helpers."""
from .loading import from_pretrained, save_quantized, zero_stage
from .policies import GENERIC, POLICIES, Policy, policy_for
from .replace import inject, lora_parameters, select
from .zero import load_adapter, quantized_bytes_on_this_rank, save_adapter

__all__ = ["GENERIC", "POLICIES", "Policy", "from_pretrained", "inject", "load_adapter", "lora_parameters",
           "policy_for", "quantized_bytes_on_this_rank", "save_adapter", "save_quantized", "select", "zero_stage"]
