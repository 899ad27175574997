"""Find, on a machine without a GPU, the code that would fail on one by mixing devices.

On a GPU, a model's weights and activations live on the GPU, while a tensor made by a factory
(`torch.tensor(list)`, `torch.arange(n)`, `torch.linspace(...)`) without `device=` lands on the
CPU. An operation that takes both raises "Expected all tensors to be on the same device". On a
CPU-only machine everything is on the CPU and nothing fails, so such bugs pass every test there
(two of them stopped dq's calibration on an H200, 2026-12-04).

`HostTensorAudit` is a `TorchFunctionMode` that marks the tensors that would be on the CPU
there: the outputs of factories called without `device=`, `.cpu()`, and whatever is computed
from those alone (a factory given `device=` or a `.to(device)` counts as the model's device: on
a CPU-only machine `x.device` is the CPU too). It records every call that mixes a marked tensor
of one or more dimensions (a 0-dim CPU tensor may join GPU operations) with an unmarked one (the
model's tensors, which would be on the GPU). Copies and moves between the two (`copy_`, `to`,
item assignment) and indexing a tensor with a marked index are allowed, as on a GPU. Tensors
made before the audit starts count as the model's.
"""

from __future__ import annotations

import linecache
import os
import sys
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep

try:  # the factory functions torch.set_default_device redirects
    from torch.utils._device import _device_constructors

    _FACTORIES = frozenset(_device_constructors())
except (ImportError, AttributeError):  # pragma: no cover - older or newer torch
    _FACTORIES = frozenset({
        torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
        torch.linspace, torch.logspace, torch.eye, torch.rand, torch.randn, torch.randint, torch.randperm,
    })

# moves and copies between devices, legal on a GPU
_MOVES = frozenset({torch.Tensor.to, torch.Tensor.copy_, torch.Tensor.__setitem__, torch.Tensor.cpu,
                    torch.Tensor.cuda, torch.Tensor.type_as, torch.Tensor.new_tensor})


def _tensors(obj: object) -> list[torch.Tensor]:
    """The tensors in a call's arguments or result (nested lists, tuples and dicts)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item)]
    return []


@dataclass(frozen=True)
class Mix:
    """One call that would mix the CPU and the GPU: the function, where it was called from, and
    where its CPU tensors were made."""

    func: str
    where: str
    made: tuple[str, ...]


class HostTensorAudit(TorchFunctionMode):
    """Context manager; `mixes` lists the calls that would fail on a GPU (see the module doc).
    `only`: record only calls made from files whose path contains this string (e.g. "/dq/")."""

    def __init__(self, only: str | None = None) -> None:
        super().__init__()
        self.only = only
        self.host = WeakIdKeyDictionary()
        self.mixes: list[Mix] = []

    def _mark(self, out: object, made: str | None) -> None:
        for t in _tensors(out):
            self.host[t] = made or "?"

    def _is_host(self, t: torch.Tensor) -> bool:
        return t in self.host

    def _caller(self, anywhere: bool = False) -> str | None:
        """The innermost calling frame outside this file and torch's own Python code (`only`
        applies unless `anywhere`), as "file:line (source)"."""
        frame = sys._getframe(1)
        while frame is not None and (frame.f_code.co_filename == __file__ or _TORCH_DIR in frame.f_code.co_filename):
            frame = frame.f_back
        if frame is None:
            return None
        name = frame.f_code.co_filename
        if not anywhere and self.only is not None and self.only not in name:
            return None
        return f"{name}:{frame.f_lineno} ({linecache.getline(name, frame.f_lineno).strip()})"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = _tensors((args, kwargs))
        if func in _FACTORIES:
            out = func(*args, **kwargs)
            # with `device=` given, the code chose a device (here the CPU, on a GPU machine the
            # model's: `device=x.device`); without it, the CPU on every machine
            if kwargs.get("device") is None and not any(out is t for t in tensors):
                if not tensors or all(self._is_host(t) for t in tensors):
                    self._mark(out, self._caller(anywhere=True))
            return out
        host = [t for t in tensors if self._is_host(t)]
        model = [t for t in tensors if not self._is_host(t)]
        indexing = func is torch.Tensor.__getitem__ and tensors and not self._is_host(tensors[0])
        if func not in _MOVES and not indexing and model and any(t.dim() > 0 for t in host):
            where = self._caller()
            if where is not None:
                made = tuple(sorted({self.host[t] for t in host if t.dim() > 0}))
                self.mixes.append(Mix(getattr(func, "__qualname__", str(func)), where, made))
        out = func(*args, **kwargs)
        if func is torch.Tensor.cpu:
            if out is args[0]:  # already on the CPU here; a new tensor on a GPU machine, so that
                out = out.view_as(out)  # marking it leaves the model's tensor unmarked
            self._mark(out, self._caller(anywhere=True))
        elif func is torch.Tensor.to:
            if not self._moves(args, kwargs):
                if host and not model:
                    self._mark(out, self.host[host[0]])  # a dtype change keeps the device
            elif out in self.host:  # `.to(device)` returned the tensor itself (the CPU already):
                del self.host[out]  # on a GPU machine a copy there (`nn.Module.to` keeps the object)
        elif host and not model and func not in _MOVES:
            self._mark(out, self.host[host[0]])
        return out

    @staticmethod
    def _moves(args: tuple, kwargs: dict) -> bool:
        """Whether a `.to(...)` names a device or another tensor (here the CPU; on a GPU machine
        the code's `x.device` is the model's: counted as a move there)."""
        return kwargs.get("device") is not None or any(isinstance(a, (str, torch.device, torch.Tensor)) for a in args[1:])
