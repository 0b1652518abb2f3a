"""Quantization formats: NF4/FP4 blockwise with double quantization (bitsandbytes-compatible) and
group-wise INT-N (QA-LoRA). Formats know no layers."""
from ..codebooks import QUANT_TYPES, code4, dynamic_code
from .nf4 import QuantizedTensor, bits_per_param, dequantize, quantize

__all__ = ["QUANT_TYPES", "QuantizedTensor", "bits_per_param", "code4", "dequantize", "dynamic_code", "quantize"]
