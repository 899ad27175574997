"""A quantized denoiser keeps the float dtype it was loaded (or quantized) in.

Its quantized layers hold storage with fixed dtypes (int8/fp8/packed codes, float32 scales)
next to float parts (bias, kept layers, transforms, low-rank branches). Casting the whole
model afterwards (``model.to(torch.float16)``, ``.half()``, ``pipe.to(torch.bfloat16)``) is
refused with a ``DQError`` that says to choose the dtype at load instead
(``dq.load(..., torch_dtype=...)``), before anything is cast. Device moves work as usual.

diffusers' own quantized models refuse the same casts in ``ModelMixin.to`` (``is_quantized``)
but with a message about ``from_pretrained``, and not for ``.bfloat16()``/``.double()``: dq
binds its own checks as methods of the instance (``install_dtype_guard``). They are bound
methods, so ``copy.deepcopy`` rebinds them to the copy.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch
from torch import nn

from ..errors import DQError

DTYPE_ATTR = "_dq_dtype"
_FIXED = {"half": torch.float16, "float": torch.float32, "bfloat16": torch.bfloat16, "double": torch.float64}


class DtypeCastError(DQError):
    """A dq-quantized model was asked to change its float dtype after loading/quantizing."""


def model_float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's float parameters (float32 when it has none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _refuse(model: nn.Module, target: Any) -> DtypeCastError:
    current = getattr(model, DTYPE_ATTR)
    return DtypeCastError(
        f"{type(model).__name__} is quantized by dq and its float parts are {current}; casting it to {target} "
        "after loading is not supported (the quantized storage has fixed dtypes). Choose the dtype at load: "
        "dq.load(..., torch_dtype=...) (`dq generate/eval --dtype`), or quantize a pipeline loaded in that dtype. "
        "Moving it to another device (.to('cuda'), pipe.to(device)) works."
    )


def _check(model: nn.Module, target: torch.dtype | None) -> None:
    if target is not None and target != getattr(model, DTYPE_ATTR):
        raise _refuse(model, target)


def _diffusers_quantized(model: nn.Module) -> bool:
    """Loaded by diffusers' ``from_pretrained`` (dq.backend): ``ModelMixin`` then refuses every
    dtype argument, even the model's own dtype, which dq lets through as a no-op."""
    return bool(getattr(model, "is_quantized", False))


def _guarded_to(self: nn.Module, *args: Any, **kwargs: Any):
    device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
    _check(self, dtype)
    if dtype is not None and _diffusers_quantized(self):  # the cast is a no-op: only the device moves
        return type(self).to(self, device, non_blocking=non_blocking) if device is not None else self
    return type(self).to(self, *args, **kwargs)


def _guarded_type(self: nn.Module, dst_type: Any):
    if dst_type != getattr(self, DTYPE_ATTR):
        raise _refuse(self, dst_type)
    return self if _diffusers_quantized(self) else type(self).type(self, dst_type)


def _fixed(name: str):
    def guarded(self: nn.Module, *args: Any):
        _check(self, _FIXED[name])
        if _diffusers_quantized(self):
            return self  # the model is already in that dtype
        return getattr(type(self), name)(self, *args)

    guarded.__name__ = name
    return guarded


_guarded_to.__name__, _guarded_type.__name__ = "to", "type"  # a pickled bound method is looked up by name
_GUARDS = {"to": _guarded_to, "type": _guarded_type, **{name: _fixed(name) for name in _FIXED}}


def install_dtype_guard(model: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Refuse later dtype casts of ``model`` (quantized, its float parts in ``dtype``). Its
    quantized layers learn that dtype too (`QuantModule.compute_dtype`: what their ``weight``
    reads as, and what peft gives their LoRA adapters)."""
    from .layers import COMPUTE_DTYPE_ATTR, QuantModule

    dtype = dtype or model_float_dtype(model)
    object.__setattr__(model, DTYPE_ATTR, dtype)
    for module in model.modules():
        if isinstance(module, QuantModule):
            module.__dict__[COMPUTE_DTYPE_ATTR] = dtype
    for name, fn in _GUARDS.items():
        object.__setattr__(model, name, types.MethodType(fn, model))


def remove_dtype_guard(model: nn.Module) -> None:
    """Undo `install_dtype_guard` (the model was dequantized: casts are fine again)."""
    for name in (DTYPE_ATTR, *_GUARDS):
        model.__dict__.pop(name, None)


def check_pipeline_cast(pipe: Any, args: tuple, kwargs: dict) -> None:
    """Refuse (`DtypeCastError`) ``pipe.to(*args, **kwargs)`` when it names a dtype and the pipeline
    holds a dq-quantized model in another one: before any component is cast."""
    dtype = kwargs.get("dtype") or next((a for a in args if isinstance(a, torch.dtype)), None)
    if dtype is None:
        return
    for component in getattr(pipe, "components", {}).values():
        if isinstance(component, nn.Module) and hasattr(component, DTYPE_ATTR):
            _check(component, dtype)


def guard_pipelines() -> None:
    """Make ``DiffusionPipeline.to`` run `check_pipeline_cast` first, for every pipeline however it
    was made (``dq.quantize``, ``dq.load``, diffusers' ``from_pretrained`` of a dq folder); a
    pipeline without a dq-quantized model is unaffected. Done once, when dq is imported."""
    from diffusers import DiffusionPipeline

    original = DiffusionPipeline.to
    if getattr(original, "_dq_guarded", False):
        return

    @functools.wraps(original)
    def to(self, *args: Any, **kwargs: Any):
        check_pipeline_cast(self, args, kwargs)
        return original(self, *args, **kwargs)

    to._dq_guarded = True
    DiffusionPipeline.to = to
