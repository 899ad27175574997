"""Routes the denoiser's current timestep to a timestep-group index.

One router per quantized denoiser, registered as its submodule `dq_router` so that
the group boundaries are saved with the weights. A forward pre-hook on the denoiser
reads the `timestep` argument of each call and stores the group index in a tensor
that every quantized layer reads: no call counters, no Python-side state that
torch.compile would have to guard on.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..errors import DQError

ROUTER_NAME = "dq_router"


class TimestepRouter(nn.Module):
    def __init__(self, boundaries: torch.Tensor | None = None, groups: int = 1):
        super().__init__()
        if boundaries is None:
            boundaries = torch.zeros(groups - 1)
        self.register_buffer("boundaries", boundaries.float().reshape(-1))
        self.register_buffer("index", torch.zeros((), dtype=torch.long), persistent=False)

    def _apply(self, fn, recurse: bool = True):
        # The boundaries stay float32 through dtype casts (a bfloat16 boundary near t=999 would
        # be off by up to 4 steps); only their device follows the model.
        boundaries = self.boundaries
        super()._apply(fn, recurse)
        if self.boundaries.dtype != boundaries.dtype:
            self.boundaries = boundaries.to(self.boundaries.device)
        return self

    @property
    def groups(self) -> int:
        return self.boundaries.numel() + 1

    def set_timestep(self, timestep: Any) -> None:
        t = torch.as_tensor(timestep, device=self.boundaries.device).reshape(-1)[:1].float()
        self.index.copy_((t > self.boundaries).sum())

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


def timestep_position(model: nn.Module) -> int | None:
    """Positional index of the `timestep` argument of model.forward (None if absent)."""
    params = list(inspect.signature(model.forward).parameters)
    return params.index("timestep") if "timestep" in params else None


def read_timestep(position: int | None, args: tuple, kwargs: dict) -> Any:
    if "timestep" in kwargs:
        return kwargs["timestep"]
    if position is not None and position < len(args):
        return args[position]
    return None


def attach_router(model: nn.Module, router: TimestepRouter) -> torch.utils.hooks.RemovableHandle:
    """Register `router` on `model` and the pre-hook that feeds it."""
    position = timestep_position(model)
    if position is None and router.groups > 1:
        raise DQError(
            f"{type(model).__name__}.forward has no 'timestep' argument, so per-timestep activation "
            "ranges cannot be looked up; use a recipe with timestep_groups: 1 or dynamic activations"
        )
    model.add_module(ROUTER_NAME, router)
    # The hook holds no state of its own: it finds the router (and the argument position)
    # through the module it is called on, so a deep copy of the model routes its own router.
    model._dq_timestep_position = position
    handle = model.register_forward_pre_hook(route_timestep, with_kwargs=True)
    model._dq_router_handle = handle
    return handle


def route_timestep(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a quantized denoiser: set its router's group from the call's timestep."""
    t = read_timestep(getattr(module, "_dq_timestep_position", None), args, kwargs)
    if t is not None:
        getattr(module, ROUTER_NAME).set_timestep(t)
