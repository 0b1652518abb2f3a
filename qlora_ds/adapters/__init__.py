"""Adapters: PEFT-format save/load (atomic writes), merge and GPTQ export helpers."""
from .atomic import atomic_directory, atomic_write, atomic_write_bytes, atomic_write_text
from .peft_format import base_config_hash, load_adapter, lora_layers, read_adapter, save_adapter

__all__ = ["atomic_directory", "atomic_write", "atomic_write_bytes", "atomic_write_text", "base_config_hash",
           "load_adapter", "lora_layers", "read_adapter", "save_adapter"]
