"""The feed-forward's tanh GELU in the cheaper of two float32 forms: chosen by measurement.

diffusers' DiT feed-forwards (PixArt, SD3, FLUX: `FeedForward(activation_fn="gelu-approximate")`,
whose first module is `diffusers.models.activations.GELU`) apply `F.gelu(x, approximate="tanh")`
to the first projection's output, four times the model width wide. On a 2-core AMD EPYC (Zen 4)
torch's CPU kernel for it takes 4.4 ms at 2 x 256 x 4608 (the erf GELU: 1.5 ms), about 4 % of a
W8A8 step of the PixArt-Sigma-shaped slice once the matmuls run in int8. The same function,
written through tanh(u) = 2 sigmoid(2u) - 1 as

    gelu(x) = x * sigmoid(2u),   u = sqrt(2 / pi) * (x + 0.044715 x^3),

in six vectorized passes over one temporary (path "gelu_sigmoid"), takes 2.0-2.8 ms there; its
largest difference from torch's kernel on N(0, 2^2) inputs is 4.8e-7 (float32 rounding). Path
"gelu" is torch's kernel.
Inputs of fewer than `MIN_ELEMENTS` elements always run torch's kernel: there the difference is
microseconds, and a choice per shape class would only make small models' numerics depend on the
batch (float32 rounding apart, the two forms are the same function, but not bit for bit).

`set_gelu(model, True)` gives every such `GELU` module with approximate="tanh" a `MeasuredGELU`
as its `gelu` method (an instance attribute: the module's forward, its projection and its state
dict are untouched; `set_gelu(model, False)` removes it). On the first eager call per shape class
(element count bucketed to a power of two, dtype, device) on a CPU float32 input of at least
`MIN_ELEMENTS` elements without autograd,
"gelu_sigmoid" is checked against torch's kernel (relative error at most `TOLERANCE`), both are
timed interleaved, and the faster is kept for that class in this machine's kernel choice cache
(`dq.kernels.choice`; a tie within 3 % goes to "gelu"). Everywhere else (another dtype or device,
autograd, inside torch.compile, whose generated code fuses torch's GELU with its neighbours)
torch's kernel runs. `dq.kernels.set_execution` installs it in "real" and "auto" execution.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import choice

TOLERANCE = 1e-5
MIN_ELEMENTS = 1 << 18  # 1 MiB of float32 (2 x 256 x 512); PixArt-Sigma's feed-forward at 64 tokens is 2.25x that
_TWO_C = 2 * math.sqrt(2 / math.pi)
_TWO_C_CUBIC = _TWO_C * 0.044715


def gelu_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """tanh-approximated GELU as x * sigmoid(2u) (see the module); a new tensor, `x` unchanged."""
    t = x * x
    t.mul_(_TWO_C_CUBIC).add_(_TWO_C).mul_(x).sigmoid_()
    return t.mul_(x)


def _torch_gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


RUN = {"gelu": _torch_gelu, "gelu_sigmoid": gelu_sigmoid}


def shape_key(x: torch.Tensor) -> str:
    return f"gelu|tanh|n{choice.bucket(x.numel())}|{x.dtype}|{x.device.type}"


def measure(x: torch.Tensor) -> choice.Measurement:
    """Check "gelu_sigmoid" against torch's kernel on a few rows of `x`, then time both on `x`
    (`choice.measure`: a form that raises or is wrong is dropped with its reason)."""
    rows = x.reshape(-1, x.shape[-1])
    return choice.measure(RUN, _torch_gelu, rows, rows[: choice.SCREEN_ROWS], tolerance=TOLERANCE,
                          against="torch's tanh GELU")


class MeasuredGELU:
    """A `GELU` module's `gelu` method: the tanh GELU by the form measured faster (see the module)."""

    def __init__(self, known: dict[str, str] | None = None):
        self.approximate = "tanh"
        self.paths: dict[str, str] = dict(known or {})  # shape class -> path

    def path_for(self, x: torch.Tensor) -> str:
        if (x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() < MIN_ELEMENTS
                or torch.compiler.is_compiling() or x.requires_grad and torch.is_grad_enabled()):
            return "gelu"
        key = shape_key(x)
        path = self.paths.get(key)
        if path is not None:
            return path
        found = choice.cached(key, lambda: measure(x))
        path = self.paths[key] = found.choice if found.choice in RUN else "gelu"
        return path

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return RUN[self.path_for(x)](x)


def set_gelu(model: nn.Module, on: bool) -> int:
    """Give the tanh-approximated diffusers `GELU` modules of `model` a `MeasuredGELU` (on), or
    remove it (off); returns how many now have one."""
    from diffusers.models.activations import GELU

    installed = 0
    known = None
    for module in model.modules():
        if not isinstance(module, GELU):
            continue
        current = module.__dict__.get("gelu")
        if not on or module.approximate != "tanh":
            if isinstance(current, MeasuredGELU):
                del module.__dict__["gelu"]
            continue
        if not isinstance(current, MeasuredGELU):
            if known is None:  # the cache's GELU choices, read once per model
                known = choice.cached_choices("gelu|", RUN)
            module.__dict__["gelu"] = MeasuredGELU(known)
        installed += 1
    return installed
