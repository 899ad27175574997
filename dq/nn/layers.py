"""Quantized Linear and Conv2d.

`QuantModule` holds everything the two share: weight codes with their scales,
the activation quantizer (static ranges per timestep group, or dynamic per
token), and the conversion from a float layer. Each subclass only names its
activation channel axis and its float op.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import primitives as P
from ..quant.spec import QuantSpec
from .router import TimestepRouter


def _weight_dtype(spec: QuantSpec) -> torch.dtype:
    if spec.kind == "int":
        return torch.int8
    return torch.float8_e5m2 if spec.kind == "fp8_e5m2" else torch.float8_e4m3fn


class QuantModule(nn.Module):
    channel_dim: int = -1

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        has_bias: bool,
        weight_spec: QuantSpec | None,
        act_spec: QuantSpec | None,
        groups: int = 1,
    ):
        super().__init__()
        self.weight_spec = weight_spec
        self.act_spec = act_spec
        self.weight_shape = tuple(weight_shape)
        if weight_spec is not None:
            rows = P.row_view(torch.empty(weight_shape, device="meta"), weight_spec.granularity, weight_spec.group_size).shape[0]
            self.register_buffer("qweight", torch.zeros(weight_shape, dtype=_weight_dtype(weight_spec)))
            self.register_buffer("wscale", torch.ones(rows, 1))
            self.register_buffer("wzero", None if weight_spec.symmetric else torch.zeros(rows, 1))
        else:
            self.weight = nn.Parameter(torch.zeros(weight_shape), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(weight_shape[0]), requires_grad=False) if has_bias else None
        if act_spec is not None and not act_spec.dynamic:
            self.register_buffer("ascale", torch.ones(groups))
            self.register_buffer("azero", None if act_spec.symmetric else torch.zeros(groups))
        self._router: TimestepRouter | None = None
        # Extension points (see forward): an input transform (smoothing / rotation,
        # dq.nn.transforms), a high-precision side branch (low-rank outliers), and the
        # execution mode: "sim" (fake quantization in float) or "real" (dq.kernels).
        self.input_transform: nn.Module | None = None
        self.branch: nn.Module | None = None
        self.execution = "sim"

    # -- construction -------------------------------------------------------------
    @classmethod
    def from_float(
        cls,
        layer: nn.Module,
        weight_spec: QuantSpec | None,
        act_spec: QuantSpec | None,
        act_ranges: list[tuple[float, float]] | None = None,
        router: TimestepRouter | None = None,
    ) -> QuantModule:
        groups = len(act_ranges) if act_ranges else 1
        q = cls.shell_like(layer, weight_spec, act_spec, groups)
        weight = layer.weight.detach().float()
        if weight_spec is not None:
            codes, scale, zero = P.quantize_tensor(weight, weight_spec)
            q.qweight.copy_(codes)
            q.wscale.copy_(scale)
            if zero is not None:
                q.wzero.copy_(zero)
        else:
            q.weight.data.copy_(weight)
        if layer.bias is not None:
            q.bias.data.copy_(layer.bias.detach().float())
        if act_ranges:
            q.set_act_ranges(act_ranges)
        q.bind_router(router)
        return q.to(layer.weight.device)

    @classmethod
    def shell_like(cls, layer: nn.Module, weight_spec, act_spec, groups: int) -> QuantModule:
        raise NotImplementedError

    def set_act_ranges(self, ranges: list[tuple[float, float]]) -> None:
        lo = torch.tensor([r[0] for r in ranges]).reshape(-1, 1)
        hi = torch.tensor([r[1] for r in ranges]).reshape(-1, 1)
        scale, zero = P.qparams(lo, hi, self.act_spec)
        self.ascale.copy_(scale.flatten())
        if zero is not None:
            self.azero.copy_(zero.flatten())

    def bind_router(self, router: TimestepRouter | None) -> None:
        # A plain attribute, not a submodule: the router belongs to the denoiser.
        object.__setattr__(self, "_router", router)

    # -- computation --------------------------------------------------------------
    def dequantized_weight(self) -> torch.Tensor:
        if self.weight_spec is None:
            return self.weight
        return P.dequantize_tensor(self.qweight, self.wscale, self.wzero, self.weight_spec)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.act_spec
        if spec is None:
            return x
        if spec.dynamic:
            return P.fake_quantize(x, spec, channel_dim=self.channel_dim)
        idx = self._router.index if self._router is not None else 0
        scale = self.ascale[idx]
        zero = self.azero[idx] if self.azero is not None else None
        return P.dequantize(P.quantize(x.float(), scale, zero, spec), scale, zero).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)
        y = self.compute(x)
        if self.branch is not None:
            y = y + self.branch(x)
        return y

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """The quantized op on the (transformed) input."""
        return self.simulated(x)

    def simulated(self, x: torch.Tensor) -> torch.Tensor:
        xq = self.quantize_input(x)
        w = self.dequantized_weight().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return self.float_op(xq, w, bias)

    def float_op(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    # -- description --------------------------------------------------------------
    def plan_entry(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild this layer's shell."""
        return {
            "type": type(self).__name__,
            "weight": self.weight_spec.to_dict() if self.weight_spec else None,
            "activation": self.act_spec.to_dict() if self.act_spec else None,
            "groups": int(self.ascale.numel()) if getattr(self, "ascale", None) is not None else 1,
        }

    def extra_repr(self) -> str:
        w = self.weight_spec
        a = self.act_spec
        ws = "fp" if w is None else f"{w.kind}{w.bits if w.kind == 'int' else ''}/{w.granularity}"
        acts = "fp" if a is None else f"{a.kind}{a.bits if a.kind == 'int' else ''}/{'dynamic' if a.dynamic else 'static'}"
        return f"{self.weight_shape}, w={ws}, a={acts}"


class QuantLinear(QuantModule):
    channel_dim = -1

    @classmethod
    def shell_like(cls, layer: nn.Linear, weight_spec, act_spec, groups: int) -> QuantLinear:
        return cls(tuple(layer.weight.shape), layer.bias is not None, weight_spec, act_spec, groups)

    @property
    def in_features(self) -> int:
        return self.weight_shape[1]

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    def float_op(self, x, w, bias):
        return F.linear(x, w, bias)


class QuantConv2d(QuantModule):
    channel_dim = 1

    def __init__(self, weight_shape, has_bias, weight_spec, act_spec, groups=1, *, conv: dict[str, Any] | None = None):
        super().__init__(weight_shape, has_bias, weight_spec, act_spec, groups)
        conv = conv or {}
        self.stride = tuple(conv.get("stride", (1, 1)))
        self.padding = conv.get("padding", (0, 0))
        self.padding = self.padding if isinstance(self.padding, str) else tuple(self.padding)
        self.dilation = tuple(conv.get("dilation", (1, 1)))
        self.conv_groups = int(conv.get("groups", 1))

    @classmethod
    def shell_like(cls, layer: nn.Conv2d, weight_spec, act_spec, groups: int) -> QuantConv2d:
        if layer.padding_mode != "zeros":
            raise NotImplementedError("padding_mode other than 'zeros'")
        conv = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation, "groups": layer.groups}
        return cls(tuple(layer.weight.shape), layer.bias is not None, weight_spec, act_spec, groups, conv=conv)

    @property
    def in_channels(self) -> int:
        return self.weight_shape[1] * self.conv_groups

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]

    def float_op(self, x, w, bias):
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.conv_groups)

    def plan_entry(self) -> dict[str, Any]:
        entry = super().plan_entry()
        entry["conv"] = {
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.conv_groups,
        }
        return entry


QUANT_TYPES = {"QuantLinear": QuantLinear, "QuantConv2d": QuantConv2d}


def shell_from_plan(entry: dict[str, Any], weight_shape: tuple[int, ...], has_bias: bool) -> QuantModule:
    """An empty quantized layer matching a checkpoint's plan entry (weights loaded after)."""
    cls = QUANT_TYPES[entry["type"]]
    w = QuantSpec.from_dict(entry["weight"])
    a = QuantSpec.from_dict(entry["activation"])
    if cls is QuantConv2d:
        return QuantConv2d(weight_shape, has_bias, w, a, entry["groups"], conv=entry["conv"])
    return cls(weight_shape, has_bias, w, a, entry["groups"])
