"""Recorded denoiser calls and their replay (from the changed block onward); see `dq.mixed`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..recipe import Recipe


@dataclass
class Calls:
    """Recorded denoiser calls and the full-precision outputs."""

    calls: list[tuple[tuple, dict]]
    reference: list[torch.Tensor]


def _call(model: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    out = model(*args, **{**kwargs, "return_dict": False})
    return out[0] if isinstance(out, tuple) else out


def _replay(model: nn.Module, calls: Sequence[tuple[tuple, dict]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [_call(model, args, kwargs) for args, kwargs in calls]


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value) if type(value) in (tuple, list) else value
    if type(value) is dict:
        return {k: _clone(v) for k, v in value.items()}
    return value


def replay_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The denoiser's replay units, in module order: every element of a top-level ModuleList /
    Sequential (the transformer or UNet blocks), and every other top-level child."""
    units = []
    for name, child in model.named_children():
        if isinstance(child, (nn.ModuleList, nn.Sequential)):
            units += [(f"{name}.{i}", m) for i, m in child.named_children()]
        else:
            units.append((name, child))
    return units


class Replayer:
    """Replays recorded denoiser calls on `model` as it is at construction (the base), caching
    every replay unit's output per call; `replay_from(layer)` then replays with that layer
    changed (swapped in by the caller) re-running only the units from the first one holding the
    layer onward: every unit that ran before it in a call returns its cached base output (it
    cannot depend on the layer). Outputs equal a full replay (tests/test_mixed.py checks it)."""

    def __init__(self, model: nn.Module, calls: Sequence[tuple[tuple, dict]]):
        self.model, self.calls = model, list(calls)
        self.units = replay_units(model)
        self.order: list[list[str]] = []
        self.cache: list[list[Any]] = []
        current: dict[str, list] = {}

        def hook(name):
            def record_output(_m, _args, out):
                current["order"].append(name)
                current["out"].append(_clone(out))
            return record_output

        handles = [m.register_forward_hook(hook(n)) for n, m in self.units]
        try:
            self.outputs = []
            with torch.no_grad():
                for args, kwargs in self.calls:
                    current["order"], current["out"] = [], []
                    self.outputs.append(_call(model, args, kwargs))
                    self.order.append(current["order"])
                    self.cache.append(current["out"])
        finally:
            for h in handles:
                h.remove()

    def unit_of(self, layer: str) -> str | None:
        for name, _ in self.units:
            if layer == name or layer.startswith(name + "."):
                return name
        return None

    def replay_from(self, layer: str) -> list[torch.Tensor]:
        unit = self.unit_of(layer)
        pending: dict[str, list] = {}

        def short_circuit(name, module):
            original = module.forward

            def forward(*args, **kwargs):
                queue = pending.get(name)
                return _clone(queue.pop(0)) if queue else original(*args, **kwargs)
            return forward

        saved = {name: m.__dict__.get("forward") for name, m in self.units}
        for name, m in self.units:
            m.forward = short_circuit(name, m)
        outs = []
        try:
            with torch.no_grad():
                for i, (args, kwargs) in enumerate(self.calls):
                    order = self.order[i]
                    k = order.index(unit) if unit in order else len(order)
                    pending.clear()
                    for name, out in zip(order[:k], self.cache[i][:k]):
                        pending.setdefault(name, []).append(out)
                    outs.append(_call(self.model, args, kwargs))
        finally:
            for name, m in self.units:
                if saved[name] is None:
                    m.__dict__.pop("forward", None)
                else:
                    m.forward = saved[name]
        return outs


def relative_error(reference: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> float:
    """sum ||y_q - y||^2 / sum ||y||^2 (10^(-SQNR/10))."""
    num = sum(float((o.double() - r.double()).pow(2).sum()) for r, o in zip(reference, outputs))
    den = sum(float(r.double().pow(2).sum()) for r in reference)
    return num / max(den, 1e-30)


def record(pipe, model: nn.Module, prompts: Sequence[Any], recipe: Recipe, steps: int, call_kwargs: dict[str, Any],
           moments: Sequence[tuple[str, nn.Module]] = ()):
    """Run the pipeline once, recording the denoiser calls (and, for `moments` layers, their
    inputs' statistics with H = sum x x^T for the estimate). Returns (Calls, StatsStore | None)."""
    import copy

    from ..calibrate.hooks import Calibrator, CalibTarget
    from ..calibrate.run import run_pipeline
    from ..nn.transforms import conv_config

    calls: list[tuple[tuple, dict]] = []
    reference: list[torch.Tensor] = []

    def hook(_m, args, kwargs):
        calls.append((copy.deepcopy(args), copy.deepcopy(kwargs)))

    def keep_output(_m, _args, out):  # the full-precision output: no replay needed
        out = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
        reference.append(out.detach().clone())

    targets = []
    for name, module in moments:
        conv = isinstance(module, nn.Conv2d)
        unfold = conv_config(module) if conv else None
        if conv and (module.groups != 1 or isinstance(unfold["padding"], str)):
            continue
        targets.append(CalibTarget(name, module, 1 if conv else -1, histogram=False, second_moment=True, unfold=unfold))
    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    out_handle = model.register_forward_hook(keep_output)
    try:
        with Calibrator(pipe, model, targets, None) as calibrator:
            run_pipeline(pipe, prompts, num_inference_steps=steps, batch_size=recipe.calib_batch_size,
                         seed=recipe.calib_seed, call_kwargs=call_kwargs, desc="recording for sensitivity",
                         on_batch=lambda n: setattr(calibrator, "prompt_batch", n))
    finally:
        handle.remove()
        out_handle.remove()
    return Calls(calls, reference), (calibrator.store if targets else None)
