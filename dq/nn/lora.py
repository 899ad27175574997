"""LoRA adapters beside quantized layers: what a LoRA targets, and how much it clips.

`QuantLinear` is an ``nn.Linear`` to peft, so diffusers' ``load_lora_weights`` wraps it in
peft's own LoRA layer: the adapter runs in high precision beside the quantized op (never
merged into the low-bit codes). Beside a layer with a low-rank branch (w4a4's rank-32 SVDQuant
branch), `load_lora_adapter` / `load_lora_weights` give the peft layer `BranchMergedLora`: the branch
and the LoRAs run as one concatenated down/up matmul pair (`merge_with_branches`). A static-range recipe (w8a8, w4a8) calibrated its activation
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
from .transforms import add_low_rank

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


# -- a LoRA merged with a layer's low-rank branch ------------------------------------------------
def mergeable(layer: nn.Module) -> bool:
    """Whether a LoRA beside quantized `layer` can join its low-rank branch exactly: a linear
    branch, and no input transform or a smoothing only (diagonal: the LoRA's down-projection is
    carried into the transformed basis by dividing its columns by the smoothing factors). A
    Hadamard rotation would need a dense fold: such layers keep the LoRA separate."""
    if not isinstance(layer, QuantModule) or layer.branch is None or getattr(layer.branch, "conv", True) is not None:
        return False
    transform = layer.input_transform
    return transform is None or (getattr(transform, "signs", 0) is None and transform.channel_dim in (-1, 1))


class _Combined:
    """The branch and the LoRAs as one low-rank pair: x -> (x down^T) up^T, `add_to` in place."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor):
        self.down, self.up = down, up

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(torch.nn.functional.linear(x, self.down), self.up)

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not y.is_contiguous() or y.dtype != x.dtype:
            return y + self(x)
        return add_low_rank(y, x, self.down, self.up)


class BranchMergedLora:
    """Mixed into peft's LoRA Linear around a quantized layer with a low-rank branch (`mergeable`):
    inference runs the branch and every active LoRA as one concatenated down/up matmul pair,
    accumulated into the quantized kernel's output in place, instead of the branch plus a
    separate pair, a scaling pass and an addition per LoRA. The same function (up to float
    rounding); whatever this path does not cover (training, dropout in train mode, DoRA and other
    variants, per-sample adapters, a merged or disabled adapter) runs peft's own forward."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        combined = None if args or kwargs else self._dq_combined(x)
        if combined is None:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        if base.input_transform is not None:
            x = base.input_transform(x)
        if base.execution == "real":
            from ..kernels.dispatch import real_forward

            return real_forward(base, x, combined)
        return combined.add_to(base.compute(x), x)

    def _dq_combined(self, x: torch.Tensor) -> _Combined | None:
        if self.disable_adapters or self.merged or torch.is_grad_enabled():
            return None
        base = self.base_layer
        dtype = x.dtype
        downs, ups = [base.branch.down.to(dtype)], [base.branch.up.to(dtype)]
        inv = None if base.input_transform is None else base.input_transform.inv_scale
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            if name in self.lora_variant or (self.training and not isinstance(self.lora_dropout[name], nn.Identity)):
                return None
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            if inv is not None:  # A x = (A / inv) (x * inv): the LoRA read in the transformed basis
                a = a.float() / inv.float()
            downs.append(a.to(dtype))
            ups.append((b.float() * self.scaling[name]).to(dtype))
        if len(downs) == 1:
            return None
        return _Combined(torch.cat(downs), torch.cat(ups, dim=1))


_MERGED_CLASSES: dict[type, type] = {}


def merge_with_branches(model: nn.Module) -> int:
    """Give every peft LoRA Linear of `model` around a `mergeable` quantized layer the merged
    inference path (`BranchMergedLora`); returns how many. Idempotent; peft's unload puts the
    quantized layer back as it was."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in model.modules():
        cls = type(module)
        if not isinstance(module, LoraLinear) or not mergeable(module.base_layer):
            continue
        if not issubclass(cls, BranchMergedLora):
            merged = _MERGED_CLASSES.get(cls)
            if merged is None:
                merged = _MERGED_CLASSES[cls] = type(f"BranchMerged{cls.__name__}", (BranchMergedLora, cls), {})
            module.__class__ = merged
        count += 1
    return count
