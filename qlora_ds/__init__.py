"""qlora-ds: QLoRA / QA-LoRA finetuning through frozen 4-bit weights, as a DeepSpeed plugin."""
__version__ = "0.1.0"

from .errors import NonFiniteError, OpBuildError, QLoRADSError
from .quant import QuantizedTensor, bits_per_param, dequantize, quantize

_LAZY = ("from_pretrained", "save_quantized", "save_adapter")
_LAZY_CONFIGS = ("QLoRAConfig", "QALoRAConfig")   # ``from qlora_ds import QLoRAConfig`` (as peft's LoraConfig)


def __getattr__(name):  # lazy: importing qlora_ds must not import transformers/deepspeed (nor the layers)
    if name in _LAZY:
        from . import inject
        return getattr(inject, name)
    if name in _LAZY_CONFIGS:
        from .nn import config
        return getattr(config, name)
    raise AttributeError(f"module 'qlora_ds' has no attribute {name!r}")


__all__ = ["from_pretrained", "save_quantized", "save_adapter", "QLoRAConfig", "QALoRAConfig", "NonFiniteError",
           "OpBuildError", "QLoRADSError", "QuantizedTensor", "bits_per_param", "dequantize", "quantize", "__version__"]
