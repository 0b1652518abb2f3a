"""Adapters: PEFT-format save/load, merge and GPTQ export helpers (atomic writes live in ``qlora_ds.atomic``)."""
from .peft_format import base_config_hash, load_adapter, lora_layers, read_adapter, save_adapter

__all__ = ["base_config_hash", "load_adapter", "lora_layers", "read_adapter", "save_adapter"]
