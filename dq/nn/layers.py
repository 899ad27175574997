"""Quantized Linear and Conv2d.

`QuantModule` holds everything the two share: weight codes with their scales,
the activation quantizer (static ranges per timestep group, or dynamic per
token), and the conversion from a float layer. Each subclass only names its
activation channel axis and its float op.

`QuantLinear` is an ``nn.Linear`` and `QuantConv2d` an ``nn.Conv2d`` to the code around
them (peft's LoRA dispatch, diffusers' LoRA loading, ``isinstance`` checks) without holding
a float weight: ``weight`` is a dequantized copy made on each read (`DequantizedWeight`),
which is not in the state dict and refuses being written back (merging a LoRA into it would
mean requantizing). With grad enabled, the quantized op has a straight-through backward
through the dequantized weight (`StraightThrough`), so adapters before a quantized layer
train; the integer kernels themselves have no backward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DQError
from ..kernels import int8
from ..kernels.dispatch import real_forward, release_runtime
from ..quant import primitives as P
from ..quant.packing import WeightLayout, new_tensor
from ..quant.spec import QuantSpec
from .router import TimestepRouter
from .transforms import InputTransform, LowRankBranch

# Buffers whose dtype is part of the storage format: `Module.to(dtype)` / `.half()` must
# not cast them (fp8 codes would double in size, float32 scales would lose precision).
_STORAGE_BUFFERS = ("qweight", "wscale", "wzero", "wmult", "ascale", "azero", "wsum")
COMPUTE_DTYPE_ATTR = "_dq_compute_dtype"  # the model's float dtype, set with its dtype guard

_WRITE_REFUSED = (
    "the weight of a dq-quantized layer is a dequantized copy of its low-bit codes and cannot be written back "
    "(merging a LoRA, `fuse_lora`, would mean requantizing the sum); keep the LoRA unfused (it runs in high "
    "precision beside the quantized layer), or dequantize the model first (`model.dequantize()` / "
    "`dq.dequantize(pipe)`), or fuse into the full-precision model and quantize after"
)


class DequantizedWeight(torch.Tensor):
    """What reading ``QuantLinear.weight`` gives: a plain float tensor (ops on it return plain
    tensors) that refuses ``.data = ...``, so an in-place merge fails loudly instead of
    silently changing a throwaway copy."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def wrap(tensor: torch.Tensor) -> DequantizedWeight:
        return torch.Tensor._make_subclass(DequantizedWeight, tensor.detach(), False)

    @property
    def data(self) -> torch.Tensor:
        return self.as_subclass(torch.Tensor).detach()

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        raise DQError(_WRITE_REFUSED)


class StraightThrough(torch.autograd.Function):
    """y = the layer's quantized op (integer kernels or simulated); dy/dx through the
    dequantized weight (activation rounding passes the gradient straight through)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantModule) -> torch.Tensor:
        ctx.layer = layer
        ctx.save_for_backward(x)
        return layer.compute(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return ctx.layer.input_grad(x, grad), None


class QuantModule(nn.Module):
    channel_dim: int = -1

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        has_bias: bool,
        weight_spec: QuantSpec | None,
        act_spec: QuantSpec | None,
        groups: int = 1,
        *,
        storage: str | None = "default",
        device: torch.device | str | None = None,
    ):
        # device: where the (zero-filled) tensors are made; "meta" for a shell a state dict fills
        nn.Module.__init__(self)  # not nn.Linear/nn.Conv2d's: no float weight is allocated
        self.weight_spec = weight_spec
        self.act_spec = act_spec
        self.weight_shape = tuple(weight_shape)
        self.weight_layout: WeightLayout | None = None
        if weight_spec is not None:
            # storage: "default" (packed / two-level where possible, dq.quant.packing), a
            # checkpoint's layout tag, or None for checkpoints older than packing.
            if storage == "default":
                self.set_weight_layout(WeightLayout.default(self.weight_shape, weight_spec), device)
            else:
                self.set_weight_layout(WeightLayout.from_tag(self.weight_shape, weight_spec, storage), device)
        else:  # activation-only quantization keeps its float weight (set directly: `weight` is a property)
            self._parameters["weight"] = nn.Parameter(new_tensor(weight_shape, 0, device=device), requires_grad=False)
        self.bias = nn.Parameter(new_tensor(weight_shape[0], 0, device=device), requires_grad=False) if has_bias else None
        if act_spec is not None and not act_spec.dynamic:
            self.register_buffer("ascale", new_tensor(groups, 1, device=device))
            self.register_buffer("azero", None if act_spec.symmetric else new_tensor(groups, 0, device=device))
        self._router: TimestepRouter | None = None
        # Extension points (see forward): an input transform (smoothing / rotation,
        # dq.nn.transforms), a high-precision side branch (low-rank outliers), and the
        # execution mode: "sim" (fake quantization in float) or "real" (dq.kernels).
        self.input_transform: nn.Module | None = None
        self.branch: nn.Module | None = None
        self.execution = "sim"
        self.kernel: str | None = None  # set with the execution mode by dq.kernels.set_execution
        self.strict_execution = False  # "real" asked explicitly: no silent fallback to sim on a device

    # -- construction -------------------------------------------------------------
    @classmethod
    def from_float(
        cls,
        layer: nn.Module,
        weight_spec: QuantSpec | None,
        act_spec: QuantSpec | None,
        act_ranges: list[tuple[float, float]] | None = None,
        router: TimestepRouter | None = None,
        *,
        weight: torch.Tensor | None = None,
        weight_codes: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
        input_transform: nn.Module | None = None,
        branch: nn.Module | None = None,
    ) -> QuantModule:
        """Quantize a float layer.

        weight: the float weight to quantize instead of `layer.weight` (already in the
        input transform's basis, minus the low-rank branch); weight_codes: precomputed
        (codes, scale, zero) as `primitives.quantize_tensor` returns them (GPTQ rounding);
        input_transform / branch: the modules of `dq.nn.transforms` (see `forward`).
        """
        groups = len(act_ranges) if act_ranges else 1
        q = cls.shell_like(layer, weight_spec, act_spec, groups)
        weight = layer.weight.detach().float() if weight is None else weight.detach().float().reshape(layer.weight.shape)
        q.input_transform = input_transform
        q.branch = branch
        if weight_spec is not None:
            if weight_codes is not None:  # rounded elsewhere (GPTQ)
                layout = q.weight_layout
                stored = layout.store_two_level(*weight_codes, weight) if layout.two_level else None
                if stored is None:
                    if layout.two_level:  # free float group scales: no integer kernel for this layer
                        q.set_weight_layout(WeightLayout(q.weight_shape, weight_spec, packed=layout.packed))
                    stored = q.weight_layout.store(*weight_codes)
            else:
                stored = q.weight_layout.encode(weight)
            for name, tensor in stored.items():
                if tensor is not None:
                    getattr(q, name).copy_(tensor.reshape(getattr(q, name).shape))
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

    def set_weight_layout(self, layout: WeightLayout, device: torch.device | str | None = None) -> None:
        """(Re)create the weight storage buffers for `layout`, zero-filled (on `device`)."""
        self.weight_layout = layout
        for name, tensor in layout.empty(device).items():
            self.register_buffer(name, tensor)

    def _apply(self, fn, recurse: bool = True):
        kept = {n: b for n in _STORAGE_BUFFERS if (b := self._buffers.get(n)) is not None}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        release_runtime(self)  # dq.kernels' weight copies and path choices are per device and dtype
        return self

    # -- the float layer's face ----------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The float weight: the activation-only layer's parameter, or a dequantized copy
        (`DequantizedWeight`, in `compute_dtype`) made on each read; not in the state dict."""
        param = self._parameters.get("weight")
        if param is not None:
            return param
        return DequantizedWeight.wrap(self.dequantized_weight(self.compute_dtype))

    @property
    def compute_dtype(self) -> torch.dtype:
        """The float dtype around this layer: its model's (set with the dtype guard), else its
        bias's, else float32. peft gives LoRA adapters this dtype."""
        dtype = self.__dict__.get(COMPUTE_DTYPE_ATTR)
        if dtype is not None:
            return dtype
        return self.bias.dtype if self.bias is not None else torch.float32

    # -- computation --------------------------------------------------------------
    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight (float32 unless `dtype` is given)."""
        if self.weight_spec is None:
            weight = self._parameters["weight"]
            return weight if dtype is None else weight.to(dtype)
        return self.weight_layout.decode(self.qweight, self.wscale, self.wzero, self.wmult, dtype or torch.float32)

    def input_grad(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """d(loss)/dx of the float op with the dequantized weight (the straight-through backward)."""
        w = self.dequantized_weight(grad.dtype)
        with torch.enable_grad():
            leaf = x.detach().to(grad.dtype).requires_grad_()
            (gx,) = torch.autograd.grad(self.float_op(leaf, w, None), leaf, grad)
        return gx.to(x.dtype)

    def static_act_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scale, zero) [1] of the current timestep group (static activations).

        index_select, not indexing: a 0-dim index tensor would become a Python int (a
        graph break and a recompile per group under torch.compile).
        """
        if self._router is None:
            return self.ascale[:1], None if self.azero is None else self.azero[:1]
        idx = self._router.index.reshape(1)
        return self.ascale.index_select(0, idx), None if self.azero is None else self.azero.index_select(0, idx)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.act_spec
        if spec is None:
            return x
        if spec.dynamic:
            return P.fake_quantize(x, spec, channel_dim=self.channel_dim)
        scale, zero = self.static_act_params()
        fast = int8.fake_quantize_static(x, scale, zero, spec)
        if fast is not None:
            return fast
        return P.dequantize(P.quantize(x.float(), scale, zero, spec), scale, zero).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.execution == "real" and not (torch.is_grad_enabled() and x.requires_grad):
            # the transform is applied there (or folded); the low-rank branch is accumulated
            # into the kernel's output
            return real_forward(self, x, self.branch, self.input_transform)
        if self.input_transform is not None:
            x = self.input_transform(x)
        if torch.is_grad_enabled() and x.requires_grad:
            y = StraightThrough.apply(x, self)  # the integer matmul has no backward
        else:
            y = self.compute(x)
        if self.branch is not None:
            y = y + self.branch(x)
        return y

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """The quantized op on the (transformed) input: low-bit kernels or simulated."""
        if self.execution == "real":
            return real_forward(self, x)
        return self.simulated(x)

    def simulated(self, x: torch.Tensor) -> torch.Tensor:
        xq = self.quantize_input(x)
        w = self.dequantized_weight(x.dtype)
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
            "storage": self.weight_layout.tag if self.weight_layout is not None else None,
            "input_transform": self.input_transform.config() if self.input_transform is not None else None,
            "branch": self.branch.config() if self.branch is not None else None,
        }

    def extra_repr(self) -> str:
        w = self.weight_spec
        a = self.act_spec
        ws = "fp" if w is None else f"{w.kind}{w.bits if w.kind == 'int' else ''}/{w.granularity}"
        acts = "fp" if a is None else f"{a.kind}{a.bits if a.kind == 'int' else ''}/{'dynamic' if a.dynamic else 'static'}"
        return f"{self.weight_shape}, w={ws}, a={acts}"


class QuantLinear(QuantModule, nn.Linear):
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

    def input_grad(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return grad.matmul(self.dequantized_weight(grad.dtype)).to(x.dtype)


class QuantConv2d(QuantModule, nn.Conv2d):
    channel_dim = 1
    padding_mode = "zeros"  # the only one supported (shell_like refuses the others)
    transposed = False
    output_padding = (0, 0)

    def __init__(
        self, weight_shape, has_bias, weight_spec, act_spec, groups=1, *, conv: dict[str, Any] | None = None,
        storage: str | None = "default", device: torch.device | str | None = None,
    ):
        super().__init__(weight_shape, has_bias, weight_spec, act_spec, groups, storage=storage, device=device)
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

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight_shape[2:])

    @property
    def groups(self) -> int:  # nn.Conv2d's name for the convolution groups
        return self.conv_groups

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


def shell_from_plan(
    entry: dict[str, Any], weight_shape: tuple[int, ...], has_bias: bool, specs: dict[str, tuple] | None = None,
    device: torch.device | str | None = None,
) -> QuantModule:
    """An empty quantized layer matching a checkpoint's plan entry (weights loaded after), its
    tensors on `device` ("meta": nothing allocated).
    specs: a dict shared across the layers of one plan, so that each distinct weight/activation
    spec pair is parsed once (QuantSpec is immutable), and, on the meta device, each distinct
    (entry, shape) shell is built once and copied for the other layers (`_copy_meta_shell`:
    a model's blocks repeat the same few layers)."""
    if specs is None or device is None or torch.device(device).type != "meta":
        return _build_shell(entry, weight_shape, has_bias, specs, device)
    key = ("shell", repr(entry), tuple(weight_shape), bool(has_bias))
    prototype = specs.get(key)
    if prototype is None:  # kept aside, never handed out: what is copied stays as built
        prototype = specs[key] = _build_shell(entry, weight_shape, has_bias, specs, device)
    return _copy_meta_shell(prototype)


def _copy_meta_shell(module: nn.Module) -> nn.Module:
    """A new module equal to an empty meta-device shell (or side module) just built: its
    attributes (immutable specs, layout, sizes) shared, its containers (tensors, submodules,
    hook dicts) new, each tensor a new meta tensor of the same shape and dtype. What
    ``__init__`` would give, without its ``nn.Module.__setattr__`` calls and spec parsing
    (about a fifth of the time per layer)."""
    new = object.__new__(type(module))
    state = new.__dict__
    for name, value in module.__dict__.items():
        state[name] = value.copy() if isinstance(value, (dict, set)) else value  # hooks dicts: empty, new
    state["_parameters"] = {
        name: None if p is None else nn.Parameter(_meta_like(p), requires_grad=p.requires_grad)
        for name, p in module._parameters.items()
    }
    state["_buffers"] = {name: None if b is None else _meta_like(b) for name, b in module._buffers.items()}
    state["_modules"] = {name: None if m is None else _copy_meta_shell(m) for name, m in module._modules.items()}
    return new


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    # not torch.empty_like: on the meta device it runs torch's Python meta kernel (~100x slower)
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def _build_shell(
    entry: dict[str, Any], weight_shape: tuple[int, ...], has_bias: bool, specs: dict | None,
    device: torch.device | str | None,
) -> QuantModule:
    cls = QUANT_TYPES[entry["type"]]
    key = None if specs is None else repr((entry["weight"], entry["activation"]))
    parsed = None if key is None else specs.get(key)
    if parsed is None:
        parsed = (QuantSpec.from_dict(entry["weight"]), QuantSpec.from_dict(entry["activation"]))
        if specs is not None:
            specs[key] = parsed
    w, a = parsed
    storage = entry.get("storage")  # absent: a checkpoint from before packed storage
    if cls is QuantConv2d:
        shell = QuantConv2d(weight_shape, has_bias, w, a, entry["groups"], conv=entry["conv"], storage=storage, device=device)
    else:
        shell = cls(weight_shape, has_bias, w, a, entry["groups"], storage=storage, device=device)
    # Side modules get their (empty) buffers here, so that the state dict fills them.
    if entry.get("input_transform"):
        shell.input_transform = InputTransform.from_config(entry["input_transform"], device)
    if entry.get("branch"):
        shell.branch = LowRankBranch.from_config(entry["branch"], device)
    return shell
