"""Quantized LoRA layers: QLoRALinear (NF4/FP4 base), QALoRALinear (INT-N group base), their configs."""
from .config import QALoRAConfig, QLoRAConfig
from .qalora_linear import QALoRALinear
from .qlora_linear import QLoRALinear

__all__ = ["QALoRAConfig", "QALoRALinear", "QLoRAConfig", "QLoRALinear"]
