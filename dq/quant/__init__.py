"""Quantizer math: specifications and pure tensor functions (no modules, no hooks)."""

from .primitives import (
    dequantize,
    fake_quantize,
    fp_quantize,
    quantize,
    select_range,
)
from .spec import FP_FORMATS, QuantSpec

__all__ = [
    "FP_FORMATS",
    "QuantSpec",
    "dequantize",
    "fake_quantize",
    "fp_quantize",
    "quantize",
    "select_range",
]
