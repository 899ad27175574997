"""Modules that run beside a quantized layer: its input transform and its low-rank branch.

`InputTransform` (smoothing, then a randomized Hadamard rotation, on the input-channel
axis) is a `QuantModule.input_transform`; `LowRankBranch` (x -> (x L2^T) L1^T, the
16/32-bit part of an SVDQuant split) is a `QuantModule.branch`. Both keep their
tensors as buffers, so they save and load with the layer's state dict, and describe
their shape in `config()` so that a checkpoint's plan can rebuild them empty.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.hadamard import rotate
from ..quant.packing import new_tensor
from ..quant.transform import ChannelTransform


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


class InputTransform(nn.Module):
    """x -> (x * inv_scale) R along `channel_dim` (smoothing, then rotation; either optional).

    For real int8 kernels the per-channel multiply fuses into the activation
    quantizer's scale multiply; the rotation is an O(C log b) fast Walsh-Hadamard transform.
    """

    def __init__(
        self, channels: int, channel_dim: int = -1, *, smooth: bool = False, rotate_block: int = 0,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.channels = int(channels)
        self.channel_dim = int(channel_dim)
        self.rotate_block = int(rotate_block)
        self.register_buffer("inv_scale", new_tensor(channels, 1, device=device) if smooth else None)
        self.register_buffer("signs", new_tensor(channels, 1, device=device) if rotate_block else None)

    @classmethod
    def from_transform(cls, transform: ChannelTransform, channels: int, channel_dim: int) -> InputTransform:
        module = cls(channels, channel_dim, smooth=transform.scale is not None, rotate_block=transform.block if transform.signs is not None else 0)
        if transform.scale is not None:
            module.inv_scale.copy_(1.0 / transform.scale.float())
        if transform.signs is not None:
            module.signs.copy_(transform.signs.float())
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.signs is None and self.inv_scale is not None and x.dtype == torch.float32
                and self.channel_dim in (-1, x.dim() - 1)):
            return x * self.inv_scale  # smoothing alone on the last axis: one op (the common case)
        dtype = x.dtype
        x = x.to(_compute_dtype(x))
        dim = self.channel_dim
        if self.inv_scale is not None:
            shape = [1] * x.dim()
            shape[dim] = -1
            x = x * self.inv_scale.to(x.dtype).reshape(shape)
        if self.signs is not None:
            x = rotate(x, self.signs, self.rotate_block, dim=dim)
        return x.to(dtype)

    def config(self) -> dict[str, Any]:
        return {
            "channels": self.channels,
            "channel_dim": self.channel_dim,
            "smooth": self.inv_scale is not None,
            "rotate_block": self.rotate_block,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], device: torch.device | str | None = None) -> InputTransform:
        return cls(config["channels"], config["channel_dim"], smooth=config["smooth"], rotate_block=config["rotate_block"],
                   device=device)

    def extra_repr(self) -> str:
        parts = (["smooth"] if self.inv_scale is not None else []) + (
            [f"hadamard(block={self.rotate_block})"] if self.signs is not None else []
        )
        return f"{self.channels}, " + "+".join(parts)


def add_low_rank(y: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """y + (x down^T) up^T, for a contiguous `y` of x's dtype: accumulated into `y` in place (one
    `addmm_`; the low-rank branch and the LoRAs merged with it, `dq.nn.lora`)."""
    hidden = F.linear(x.reshape(-1, down.shape[1]), down)
    y.view(-1, up.shape[0]).addmm_(hidden, up.t())
    return y


class LowRankBranch(nn.Module):
    """The float low-rank part of a weight: x -> (x down^T) up^T, for Linear or Conv2d.

    For a convolution, `down` is a conv with `rank` output channels and the layer's kernel,
    stride, padding and dilation, and `up` a 1x1 conv: together W_lr = up @ down on the
    weight's matrix view [out, C*kh*kw].
    """

    def __init__(
        self, in_features: int, out_features: int, rank: int, conv: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.rank = int(rank)
        self.in_features = int(in_features)  # C*kh*kw for a conv
        self.out_features = int(out_features)
        self.conv = None if conv is None else dict(conv)
        self.register_buffer("down", new_tensor((rank, in_features), 0, device=device))
        self.register_buffer("up", new_tensor((out_features, rank), 0, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.down.to(x.dtype), self.up.to(x.dtype)
        if self.conv is None:
            return F.linear(F.linear(x, down), up)
        c = self.conv
        kernel = tuple(c["kernel_size"])
        hidden = F.conv2d(
            x, down.reshape(self.rank, -1, *kernel), None, tuple(c["stride"]),
            c["padding"] if isinstance(c["padding"], str) else tuple(c["padding"]), tuple(c["dilation"]),
        )
        return F.conv2d(hidden, up[:, :, None, None])

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y + self(x), the up-projection accumulated into `y` in place where it can be (a
        linear branch and a contiguous `y` of the input's dtype, as the real kernels return):
        one `addmm_` instead of a float matmul, a temporary and an addition pass."""
        if self.conv is not None or not y.is_contiguous() or y.dtype != x.dtype or torch.is_grad_enabled() and y.requires_grad:
            return y + self(x)
        return add_low_rank(y, x, self.down.to(x.dtype), self.up.to(x.dtype))

    def config(self) -> dict[str, Any]:
        return {"rank": self.rank, "in_features": self.in_features, "out_features": self.out_features, "conv": self.conv}

    @classmethod
    def from_config(cls, config: dict[str, Any], device: torch.device | str | None = None) -> LowRankBranch:
        return cls(config["in_features"], config["out_features"], config["rank"], config.get("conv"), device=device)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, {self.in_features}->{self.out_features}" + (", conv" if self.conv else "")


def conv_config(layer: nn.Conv2d) -> dict[str, Any]:
    """The geometry a conv branch needs (JSON-able)."""
    padding = layer.padding if isinstance(layer.padding, str) else list(layer.padding)
    return {
        "kernel_size": list(layer.kernel_size),
        "stride": list(layer.stride),
        "padding": padding,
        "dilation": list(layer.dilation),
    }
