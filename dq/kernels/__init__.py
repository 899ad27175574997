"""Real low-bit execution of dq's quantized layers (int8 / fp8 matmuls, packed 4-bit weights)."""

from __future__ import annotations

from torch import nn

from ..errors import DQError

EXECUTION_MODES = ("auto", "real", "sim")


def set_execution(model: nn.Module, mode: str) -> nn.Module:
    """Switch every quantized layer of `model` to `mode` ("sim" only, for now)."""
    from ..nn.layers import QuantModule

    if mode not in EXECUTION_MODES:
        raise DQError(f"unknown execution mode {mode!r}; choose one of {list(EXECUTION_MODES)}")
    for module in model.modules():
        if isinstance(module, QuantModule):
            module.execution = "sim"
    return model
