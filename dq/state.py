"""What a quantized denoiser carries beside its layers, behind one object.

`dq.state(model)` returns a `QuantState` view: the recipe it was quantized with, the
full-precision source it was made from (`dq.provenance`), the timestep router its static
layers read, and the per-layer plan (each quantized layer's formats and storage). `dq.quantize`,
the model-level API (`dq.prepare` / `dq.convert`), `dq.load`, the diffusers backend and the
app all write it with `mark_quantized` and read it with `state`; nothing else reads the
attributes behind it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .nn.layers import QuantModule
from .nn.router import ROUTER_NAME, TimestepRouter
from .provenance import SOURCE_ATTR
from .recipe import Recipe

RECIPE_ATTR = "_dq_recipe"


@dataclass(frozen=True)
class QuantState:
    """A quantized model's recipe, source record, router and per-layer plan."""

    recipe: Recipe | None
    source: dict[str, Any] | None
    router: TimestepRouter | None
    plan: dict[str, dict[str, Any]]  # layer name -> QuantModule.plan_entry()

    @property
    def timestep_groups(self) -> int:
        return self.router.groups if self.router is not None else 1

    def layers(self) -> list[str]:
        return list(self.plan)


def quantized_layers(model: nn.Module) -> dict[str, QuantModule]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantModule)}


def state(model: nn.Module) -> QuantState | None:
    """The `QuantState` of a dq-quantized denoiser, or None for a model dq has not quantized."""
    layers = quantized_layers(model)
    router = getattr(model, ROUTER_NAME, None)
    if not layers and router is None:
        return None
    return QuantState(
        recipe=getattr(model, RECIPE_ATTR, None),
        source=getattr(model, SOURCE_ATTR, None),
        router=router,
        plan={name: m.plan_entry() for name, m in layers.items()},
    )


def mark_quantized(model: nn.Module, recipe: Recipe | None, source: dict[str, Any] | None) -> None:
    """Record the recipe and source of a model whose layers were just quantized or loaded."""
    setattr(model, RECIPE_ATTR, recipe)
    setattr(model, SOURCE_ATTR, source)
