"""Quantized modules that replace a denoiser's Linear and Conv2d layers."""

from .layers import QuantConv2d, QuantLinear, QuantModule
from .router import TimestepRouter

__all__ = ["QuantConv2d", "QuantLinear", "QuantModule", "TimestepRouter"]
