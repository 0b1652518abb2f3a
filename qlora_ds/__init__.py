"""qlora-ds: QLoRA / QA-LoRA finetuning through frozen 4-bit weights, as a DeepSpeed plugin."""
__version__ = "0.1.0"

from .errors import OpBuildError, QLoRADSError
from .quant import QuantizedTensor, bits_per_param, dequantize, quantize

__all__ = ["OpBuildError", "QLoRADSError", "QuantizedTensor", "bits_per_param", "dequantize", "quantize",
           "__version__"]
