"""Recorded denoiser calls and their replay (from the changed block onward); see `dq.mixed`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..recipe import Recipe

logger = logging.getLogger(__name__)


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


def batch_size(args: tuple, kwargs: dict) -> int | None:
    """The batch of a recorded call: the first dimension of its first tensor argument."""
    for value in [*args, *kwargs.values()]:
        if isinstance(value, torch.Tensor) and value.dim():
            return value.shape[0]
    return None


def _repeat(value, batch: int, times: int):
    """`value` with every tensor whose first dimension is `batch` repeated `times` along it
    (variant v holds rows v * batch ... (v + 1) * batch); everything else as is."""
    if isinstance(value, torch.Tensor):
        if value.dim() and value.shape[0] == batch:
            return value.repeat(times, *([1] * (value.dim() - 1)))
        return value
    if type(value) in (tuple, list):
        return type(value)(_repeat(v, batch, times) for v in value)
    if type(value) is dict:
        return {k: _repeat(v, batch, times) for k, v in value.items()}
    return value


class NotBatchable(Exception):
    """A batched replay met an input it cannot split by variant (replayed one by one instead)."""


class _Switch(nn.Module):
    """Stands in for one layer in a batched replay of `count` variants: the current layer on
    the whole batch, and for each variant that changes it, the variant's layer on that
    variant's rows (the first dimension, split into `count` equal blocks)."""

    def __init__(self, current: nn.Module, alternatives: dict[int, nn.Module], count: int):
        super().__init__()
        self.current = current
        object.__setattr__(self, "alternatives", alternatives)  # not submodules: not moved, not listed
        self.count = count

    def forward(self, x, *args, **kwargs):
        n, rest = divmod(x.shape[0], self.count)
        if rest or not n:
            raise NotBatchable(f"input of {x.shape[0]} rows for {self.count} variants")
        y = self.current(x, *args, **kwargs)
        if y.shape[0] != x.shape[0]:
            raise NotBatchable("output rows differ from input rows")
        for v, alt in self.alternatives.items():
            y[v * n : (v + 1) * n] = alt(x[v * n : (v + 1) * n], *args, **kwargs)
        return y

    def __getattr__(self, name):  # the float layer's face for code that inspects it (weight, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["current"], name)


class Replayer:
    """Replays recorded denoiser calls on `model` as it is at construction (the base), caching
    every replay unit's output per call; `replay_from(layer)` then replays with that layer
    changed (swapped in by the caller) re-running only the units from the first one holding the
    layer onward: every unit that ran before it in a call returns its cached base output (it
    cannot depend on the layer). Outputs equal a full replay (tests/test_mixed.py checks it).

    `replay_variants` replays many variants of the base ({layer: module} each), several at once:
    the variants whose first changed unit is the same run as one batch (the call's batch
    repeated per variant, each changed layer applied to its own variant's rows), which shares
    the per-call overhead and the unchanged prefix. The first batch is checked against a
    one-by-one replay; where batching does not apply (an input that is not batch-first, a
    check that fails), variants are replayed one by one."""

    def __init__(self, model: nn.Module, calls: Sequence[tuple[tuple, dict]]):
        self.model, self.calls = model, list(calls)
        self.units = replay_units(model)
        self.order: list[list[str]] = []
        self.cache: list[list[Any]] = []
        self.batched: bool | None = None  # None: not checked yet
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

    def _first(self, layers: Sequence[str], call: int) -> int:
        """Index in call `call`'s unit order of the first unit holding one of `layers`."""
        order = self.order[call]
        units = {self.unit_of(n) for n in layers}
        return next((k for k, u in enumerate(order) if u in units), len(order))

    def replay_from(self, layer: str | Sequence[str]) -> list[torch.Tensor]:
        layers = [layer] if isinstance(layer, str) else list(layer)
        return [outs[0] for outs in self._run(layers, 1)]

    def _run(self, layers: Sequence[str], times: int) -> list[list[torch.Tensor]]:
        """Per call, the outputs of `times` variants (the call's inputs repeated `times` along the
        batch), re-running from the first unit holding one of `layers`."""
        pending: dict[str, list] = {}

        def short_circuit(name, module):
            original = module.forward

            def forward(*args, **kwargs):
                queue = pending.get(name)
                return queue.pop(0) if queue else original(*args, **kwargs)
            return forward

        saved = {name: m.__dict__.get("forward") for name, m in self.units}
        for name, m in self.units:
            m.forward = short_circuit(name, m)
        outs = []
        try:
            with torch.no_grad():
                for i, (args, kwargs) in enumerate(self.calls):
                    order = self.order[i]
                    k = self._first(layers, i)
                    batch = batch_size(args, kwargs)
                    if times > 1 and batch is None:
                        raise NotBatchable("a call without a batched tensor argument")
                    pending.clear()
                    for name, out in zip(order[:k], self.cache[i][:k]):
                        pending.setdefault(name, []).append(_clone(out) if times == 1 else _repeat(out, batch, times))
                    if times > 1:
                        args, kwargs = _repeat(args, batch, times), _repeat(kwargs, batch, times)
                    out = _call(self.model, args, kwargs)
                    if times == 1:
                        outs.append([out])
                    else:
                        if out.shape[0] != batch * times:
                            raise NotBatchable("the output's batch is not the variants' batches")
                        outs.append([out[v * batch : (v + 1) * batch] for v in range(times)])
        finally:
            for name, m in self.units:
                if saved[name] is None:
                    m.__dict__.pop("forward", None)
                else:
                    m.forward = saved[name]
        return outs

    def _swap(self, layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
        """Swap `layers` into the model; returns what they replaced."""
        before = {}
        for name, module in layers.items():
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            before[name] = getattr(parent, child)
            setattr(parent, child, module)
        return before

    def replay_one(self, variant: dict[str, nn.Module]) -> list[torch.Tensor]:
        """The outputs with `variant`'s layers swapped in (restored after)."""
        before = self._swap(variant)
        try:
            return self.replay_from(list(variant))
        finally:
            self._swap(before)

    def replay_batch(self, variants: Sequence[dict[str, nn.Module]]) -> list[list[torch.Tensor]]:
        """Per variant, its outputs, from one batched replay of all of them (`_Switch`)."""
        layers = sorted({n for v in variants for n in v})
        current = {n: self.model.get_submodule(n) for n in layers}
        switches = {n: _Switch(current[n], {i: v[n] for i, v in enumerate(variants) if n in v}, len(variants))
                    for n in layers}
        before = self._swap(switches)
        try:
            per_call = self._run(layers, len(variants))
        finally:
            self._swap(before)
        return [[outs[v] for outs in per_call] for v in range(len(variants))]

    def replay_variants(self, variants: Sequence[dict[str, nn.Module]], max_batch: int = 16) -> list[list[torch.Tensor]]:
        """Per variant ({layer: module}, swapped in for its replay only), its outputs per call;
        batched by first changed unit (`max_batch` variants at most per batch)."""
        results: list[list[torch.Tensor] | None] = [None] * len(variants)
        groups: dict[int, list[int]] = {}
        for i, v in enumerate(variants):
            groups.setdefault(self._first(list(v), 0), []).append(i)
        chunks = []
        for _, members in sorted(groups.items()):
            if self.batched is None and not chunks and len(members) > 2:
                chunks.append(members[:2])  # the check: a batch of two (little lost if it fails)
                members = members[2:]
            chunks += [members[s : s + max_batch] for s in range(0, len(members), max_batch)]
        for chunk in chunks:
            outs = None
            if self.batched is not False and len(chunk) > 1:
                try:
                    outs = self.replay_batch([variants[i] for i in chunk])
                except NotBatchable as exc:
                    logger.info("mixed precision: replaying one by one (%s)", exc)
                    self.batched = False
                if outs is not None and self.batched is None:  # the first batch: checked against one by one
                    one = self.replay_one(variants[chunk[0]])
                    self.batched = _close(one, outs[0])
                    if not self.batched:
                        logger.info("mixed precision: a batched replay differs from a one-by-one replay (float "
                                    "rounding of another batch size moved a quantized value); replaying one by one")
                        results[chunk[0]], outs = one, None
            if outs is not None:
                for i, o in zip(chunk, outs):
                    results[i] = o
                continue
            for i in chunk:
                if results[i] is None:
                    results[i] = self.replay_one(variants[i])
        return results


def _close(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], tol: float = 1e-4) -> bool:
    """Every pair within `tol` of the reference's norm (float rounding of another batch size)."""
    return all(x.shape == y.shape and float((x - y).norm()) <= tol * max(float(x.norm()), 1e-30) for x, y in zip(a, b))


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
