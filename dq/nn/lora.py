"""LoRA adapters beside quantized layers: what a LoRA targets, and how much it clips.

`QuantLinear` is an ``nn.Linear`` to peft, so diffusers' ``load_lora_weights`` wraps it in
peft's own LoRA layer: the adapter runs in high precision beside the quantized op (never
merged into the low-bit codes). A static-range recipe (w8a8, w4a8) calibrated its activation
ranges without the adapter, and a LoRA that shifts the activations of the layers after it
pushes some of them out of those ranges, where they clip. `measure_clipping` counts that.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..quant.spec import FP_FORMATS
from .layers import QuantModule

# how peft / diffusers name the two halves of a LoRA in a state dict
LORA_KEY_PARTS = (".lora_A.", ".lora_B.", ".lora_down.", ".lora_up.", ".lora_magnitude_vector", ".lora.down.", ".lora.up.")


def lora_target_names(state_dict: dict[str, Any], prefix: str | None) -> set[str]:
    """The module names a LoRA state dict targets, its keys filtered by `prefix` as diffusers'
    ``load_lora_adapter`` does (``"transformer"``, ``"unet"``; None: every key)."""
    names = set()
    for key in state_dict:
        if prefix is not None:
            if not key.startswith(prefix + "."):
                continue
            key = key[len(prefix) + 1:]
        for part in LORA_KEY_PARTS:
            if part in key:
                names.add(key.split(part)[0])
                break
    return names


def has_static_ranges(model: nn.Module) -> bool:
    return any(isinstance(m, QuantModule) and m.act_spec is not None and not m.act_spec.dynamic for m in model.modules())


@dataclass
class ClippingStats:
    """Inputs of static-range quantized layers that fell outside their calibrated range."""

    clipped: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        """Clipped elements over all elements the static-range layers quantized."""
        total = sum(self.total.values())
        return sum(self.clipped.values()) / total if total else 0.0

    def worst(self, n: int = 5) -> list[tuple[str, float]]:
        rates = {k: self.clipped[k] / self.total[k] for k in self.total if self.total[k]}
        return sorted(rates.items(), key=lambda kv: -kv[1])[:n]


def _outside(layer: QuantModule, x: torch.Tensor) -> int:
    """How many elements of `x` (the layer's transformed input) its static quantizer clips."""
    spec = layer.act_spec
    scale, zero = layer.static_act_params()
    q = x.detach().float() / scale
    if spec.kind != "int":
        return int((q.abs() > FP_FORMATS[spec.kind][0]).sum())
    if zero is not None:
        q = q + zero
    return int(((q < spec.qmin - 0.5) | (q > spec.qmax + 0.5)).sum())


@contextmanager
def measure_clipping(model: nn.Module) -> Iterator[ClippingStats]:
    """Within the block, count the inputs of `model`'s static-range quantized layers that fall
    outside their calibrated range (of the timestep group in use); hooks removed on exit.

        with measure_clipping(pipe.transformer) as stats:
            pipe(prompt, ...)
        stats.fraction
    """
    stats = ClippingStats()
    handles = []

    def hook(layer: QuantModule, args: tuple) -> None:
        x = args[0]
        with torch.no_grad():
            if layer.input_transform is not None:
                x = layer.input_transform(x)
            name = layer.__dict__.get("_dq_name", type(layer).__name__)
            stats.clipped[name] = stats.clipped.get(name, 0) + _outside(layer, x)
            stats.total[name] = stats.total.get(name, 0) + x.numel()

    for module in model.modules():
        if isinstance(module, QuantModule) and module.act_spec is not None and not module.act_spec.dynamic:
            handles.append(module.register_forward_pre_hook(hook))
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()
