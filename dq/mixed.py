"""Mixed precision: each layer's weight format (or float) under a bit or memory budget.

A recipe with `budget` (average weight bits) or `memory` (bytes of the denoiser) is resolved
by `resolve_budget` into `recipe.allocation` ({layer: "int4" | "int8" | "fp8" | "float"}),
which `apply_allocation` turns into the layer plan. The steps:

1. Scope: every Linear/Conv2d the recipe could quantize, the layers the architecture keeps in
   float by default included (they are candidates). Layers the recipe's own `keep` or
   `overrides` match are fixed: the recipe always wins.
2. Each candidate format is built for every layer, exactly as `dq.quantize` builds it (the
   recipe's smoothing / GPTQ / low-rank; one calibration per format), which gives each
   layer's real storage per format (packed codes, scales, zero points, low-rank branch,
   smoothing scales, activation ranges: every persistent tensor of the layer except its bias,
   which is the same in every format).
3. Sensitivity of (layer, format), measured on recorded calibration calls as the relative
   squared error of the denoiser output against the float model's, sum ||y_q - y||^2 /
   sum ||y||^2 (`relative_error`):
   - "in-context" (`MixedConfig.measure`, the default; leave-one-in): every layer in scope at
     the smallest format (the centre), the override layers in theirs; for each layer and each
     other option (higher formats, float) the error with that layer ALONE moved to it. A
     layer's value is measured amid every other layer's error, which a single layer
     quantized in a float model does not see (on the embedded pipeline, single-layer damages
     did not add up to the joint damage). With a budget and `rounds` > 1, the plan solved from
     these numbers becomes the centre and every layer's other options are measured again
     around it (raising or lowering one layer), `rounds` times at most.
   - "alone": the error with ONLY that layer quantized, every other layer in float.
   Each replay re-runs only from the changed layer's block (`Replayer`: top-level blocks
   that ran before it return their outputs cached from the centre's replay).
   Or "estimate": the analytic error from the layer inputs' second moment H
   (E||dW x||^2 = tr(dW H dW^T) / N plus the activation rounding noise, see
   `dq.quant.smooth.output_error`, relative to the layer's output energy tr(W H W^T) / N).
   "auto" estimates, measures a sample of layers, and measures everything when the Spearman
   rank correlation of the two on the sample (`estimate_pairs`) is below 0.8.
4. Allocation: minimize the summed damage subject to the budget, an integer program
   (`scipy.optimize.milp`, zero optimality gap; `solve_allocation`). Damages are assumed
   additive over layers (as in MixDQ): single-layer damages from zero, in-context ones as
   reductions from the centre's error (the plan's `predicted_damage`).

Average weight bits (what `budget` bounds and the report prints): 8 x the storage bytes of
every layer in scope, divided by the number of weights of those layers; a layer left in float
counts its float bytes (32 bits per fp32 weight). Layers kept by the recipe's `keep` are left
out of the average (counted in a memory budget). The activation format is FIXED to the recipe's
(weight-only layers stay weight-only): a weight-bits budget cannot drift a layer to a slower
activation format; only float, which costs its full float bits, is slower.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arch import arch_for, default_weight_only, quantizable_layers
from .errors import DQError
from .quant.packing import weight_nbytes
from .quant.spec import QuantSpec
from .recipe import Recipe

logger = logging.getLogger(__name__)

FLOAT = "float"
RANK_THRESHOLD = 0.8  # below this Spearman correlation, "auto" measures instead of estimating


# -- formats and scope ------------------------------------------------------------------------
def weight_formats(recipe: Recipe) -> dict[str, QuantSpec]:
    """Every weight format an allocation may name; the recipe's own weight spec stands for its
    format (a w4a8 recipe's int4 is its 4-bit spec: group size, range search)."""
    table = {
        "int4": QuantSpec(bits=4, granularity="group", group_size=64, range="mse"),
        "int8": QuantSpec(bits=8, granularity="channel"),
        "fp8": QuantSpec(kind="fp8_e4m3", granularity="channel"),
    }
    own = recipe.weight
    if own is not None:
        if own.kind == "int" and own.bits == 4:
            table["int4"] = own
        elif own.kind == "int" and own.bits == 8:
            table["int8"] = own
        elif own.kind == "fp8_e4m3":
            table["fp8"] = own
    return table


@dataclass
class Scope:
    """The layers an allocation covers. free: (name, module, weight_only) decided by the solver;
    fixed: names set by the recipe's overrides (in the average); kept: the recipe's `keep`."""

    free: list[tuple[str, nn.Module, bool]]
    fixed: list[str]
    kept: list[str]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def allocation_scope(model: nn.Module, recipe: Recipe) -> Scope:
    weight_only = default_weight_only(model, arch_for(model)) if recipe.keep_defaults else set()
    free, fixed, kept = [], [], []
    for name, module in quantizable_layers(model):
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            continue
        if _matches(name, recipe.keep):
            kept.append(name)
        elif _matches(name, [o.pattern for o in recipe.overrides]):
            fixed.append(name)
        else:
            free.append((name, module, name in weight_only))
    return Scope(free, fixed, kept)


def apply_allocation(model: nn.Module, plan: list, recipe: Recipe) -> list:
    """The layer plan with `recipe.allocation` applied (the plan as is without one): allocated
    layers get their format (with the recipe's activation format) or leave the plan for float;
    the recipe's keep/overrides win over the allocation."""
    from .engine import LayerChoice, _fits

    if recipe.allocation is None:
        if recipe.budget is not None or recipe.memory is not None:
            raise DQError(
                "a recipe with a budget or memory budget is solved from calibration statistics: quantize it with "
                "dq.quantize / `dq quantize` (quantization at load cannot), or give its solved `allocation`"
            )
        return plan
    layers = dict(quantizable_layers(model))
    unknown = [n for n in recipe.allocation if n not in layers]
    if unknown:
        raise DQError(
            f"recipe allocation names layers {type(model).__name__} does not have: {unknown[:5]}; the allocation was "
            "solved for another model: drop `allocation` to solve it again for this one"
        )
    scope = allocation_scope(model, recipe)
    free = {name: weight_only for name, _, weight_only in scope.free}
    formats = weight_formats(recipe)
    by_name = {c.name: c for c in plan}
    new = []
    for name, module in layers.items():
        fmt = recipe.allocation.get(name)
        if name in free and fmt is not None:
            if fmt != FLOAT:
                act = None if free[name] else recipe.activation
                new.append(LayerChoice(name, module, _fits(formats[fmt], module, name, "weight"), act))
        elif name in by_name:
            new.append(by_name[name])
    return new


# -- storage ----------------------------------------------------------------------------------
def float_bytes(module: nn.Module) -> int:
    return module.weight.numel() * module.weight.element_size()


def layer_bytes(module: nn.Module) -> int:
    """Stored bytes of a layer's weight: every persistent tensor but the bias (a float layer:
    its weight)."""
    from .nn.layers import QuantModule

    if not isinstance(module, QuantModule):
        return float_bytes(module)
    bias = module.bias.numel() * module.bias.element_size() if getattr(module, "bias", None) is not None else 0
    return weight_nbytes(module) - bias


def weight_count(module: nn.Module) -> int:
    from .nn.layers import QuantModule

    if isinstance(module, QuantModule):
        return math.prod(module.weight_shape)
    return module.weight.numel()


# -- the integer program ----------------------------------------------------------------------
def solve_allocation(damage: Sequence[Sequence[float]], cost: Sequence[Sequence[float]], capacity: float) -> list[int]:
    """The option index per item minimizing sum damage[i][j] subject to sum cost[i][j] <= capacity
    (a multiple-choice knapsack), solved exactly as an integer program by HiGHS
    (`scipy.optimize.milp`, relative gap 0). Raises DQError when no choice fits."""
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
    except ImportError as exc:  # pragma: no cover - scipy ships with the mixed extra
        raise DQError("mixed precision needs scipy: pip install 'dq[mixed]'") from exc
    import numpy as np

    sizes = [len(d) for d in damage]
    if any(s == 0 for s in sizes) or [len(c) for c in cost] != sizes:
        raise DQError("every item needs at least one option, with one cost per damage")
    if sum(min(c) for c in cost) > capacity:
        raise DQError("the budget cannot be met: even the smallest option of every layer exceeds it")
    n = sum(sizes)
    d = np.array([v for row in damage for v in row], dtype=np.float64)
    scale = float(np.abs(d).max()) or 1.0
    c = np.array([v for row in cost for v in row], dtype=np.float64)
    choose = np.zeros((len(sizes), n))
    start = 0
    for i, s in enumerate(sizes):
        choose[i, start : start + s] = 1
        start += s
    result = milp(
        d / scale,
        constraints=[LinearConstraint(choose, 1, 1), LinearConstraint(c[None, :], -np.inf, capacity)],
        integrality=np.ones(n), bounds=Bounds(0, 1), options={"mip_rel_gap": 0.0},
    )
    if result.x is None:
        raise DQError(f"the allocation's integer program found no solution ({result.message})")
    x = np.round(result.x)
    picks, start = [], 0
    for s in sizes:
        picks.append(int(np.argmax(x[start : start + s])))
        start += s
    if sum(cost[i][j] for i, j in enumerate(picks)) > capacity:
        raise DQError("the allocation's integer program returned a plan over the budget")
    return picks


# -- sensitivity ------------------------------------------------------------------------------
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

    from .calibrate.hooks import Calibrator, CalibTarget
    from .calibrate.run import run_pipeline
    from .nn.transforms import conv_config

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


def estimate_damage(name: str, module: nn.Module, store, spec: QuantSpec | None, act: QuantSpec | None, groups: int = 1) -> float | None:
    """Analytic relative output error of one layer under round-to-nearest `spec` weights and `act`
    activations: (tr(dW H dW^T) + activation noise) / tr(W H W^T) (None without statistics)."""
    from .calibrate.timesteps import TimestepGroups
    from .outliers import weight_quantizer
    from .quant.smooth import InputStats, output_error
    from .quant.transform import ChannelTransform

    moment = store.moment(name) if store is not None else None
    if moment is None:
        return None
    w2 = module.weight.detach().float().reshape(module.weight.shape[0], -1)
    kernel = module.weight[0, 0].numel() if isinstance(module, nn.Conv2d) else 1
    tgroups = TimestepGroups.from_timesteps(store.timesteps(), groups)
    lo, hi, mean_sq, counts = [], [], [], []
    for members in tgroups.members:
        stats = store.select(name, members)
        lo.append(stats.min)
        hi.append(stats.max)
        mean_sq.append(stats.mean_sq)
        counts.append(stats.count)
    stats = InputStats(h=moment.sum.float(), count=moment.count, lo=torch.stack(lo), hi=torch.stack(hi),
                       mean_sq=torch.stack(mean_sq), group_counts=torch.tensor(counts), kernel=kernel)
    error = output_error(w2, stats, ChannelTransform(None, None, 0), weight_quantizer(spec) if spec else None, act)
    energy = float(((w2 @ stats.h) * w2).double().sum())
    return error / max(energy, 1e-30)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(v):
        t = torch.tensor(v, dtype=torch.float64)
        order = t.argsort()
        r = torch.empty_like(t)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in t.unique():  # ties share their mean rank
            same = t == value
            r[same] = r[same].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den else 0.0


@dataclass
class LayerOption:
    """One candidate format of one layer: stored bytes, measured and estimated relative error,
    and the damage the allocation minimizes (one of the two, per `Sensitivity.mode`)."""

    format: str
    bytes: int
    measured: float | None = None
    estimated: float | None = None
    damage: float = 0.0


@dataclass
class LayerSensitivity:
    name: str
    weights: int  # number of weights
    options: list[LayerOption]


@dataclass
class Sensitivity:
    """Per layer and format: real storage and damage. `mode`: what the damages are
    ("measure" / "estimate"); `rank_correlation`: Spearman of estimate vs measurement on the
    sample that was measured (None when nothing was compared)."""

    layers: list[LayerSensitivity]
    fixed_bytes: int  # override layers' storage (in the average)
    fixed_weights: int
    kept_bytes: int  # the recipe's keep (memory only)
    other_bytes: int  # everything else in the denoiser (biases, norms, embeddings, ...)
    mode: str
    rank_correlation: float | None = None
    sample: list[str] = field(default_factory=list)
    # how measurements were taken ("in-context" / "alone", MixedConfig.measure), the lowest
    # format (the in-context base) and the base's damage (every layer in the lowest format)
    method: str = "alone"
    low: str | None = None
    baseline: float | None = None
    # seconds per phase, wall and process CPU time: calibration (the per-format builds),
    # record, measure (see measure_sensitivity)
    seconds: dict[str, float] = field(default_factory=dict)
    # in context: the plan the final measurement was taken around ({layer: format}; every layer
    # at `low` after one round) and, after more rounds, the first round's measurements
    centre: dict[str, str] | None = None
    round_one: dict[str, dict[str, float | None]] | None = None
    # with keep_built: every format's built layers ({format: {layer: module}}), the override
    # layers', and the timestep router they were calibrated with (see `install_allocation`)
    built: dict[str, dict[str, nn.Module]] = field(default_factory=dict, repr=False)
    fixed_layers: dict[str, nn.Module] = field(default_factory=dict, repr=False)
    router: nn.Module | None = field(default=None, repr=False)


def _build_format(pipe, model, plan, recipe, calib_prompts, steps, call_kwargs):
    """Build (without installing) the quantized layers of `plan` as dq.quantize would."""
    from .engine import build_layers, run_passes
    from .model import Calibration
    from .nn.router import TimestepRouter

    cal = run_passes(pipe, Calibration(model, recipe, pipe=pipe, plan=plan), calib_prompts, steps, call_kwargs)
    router = TimestepRouter(cal.groups.tensor())
    with torch.no_grad():
        return build_layers(plan, cal.store, cal.groups, router, cal.prepared), router


def _measure_alone(model, sens, names, built_all, routers, calls) -> None:
    """measured = the damage with ONLY the layer in the format, every other layer in float."""
    from .engine import swap_modules

    replayer = Replayer(model, calls.calls)  # the float model: its units' outputs are reused
    for fmt, built in built_all.items():
        with _Routed(model, routers[fmt]):
            for name in names:
                original = model.get_submodule(name)
                swap_modules(model, {name: built[name]})
                try:
                    option = next(o for o in sens[name].options if o.format == fmt)
                    option.measured = relative_error(calls.reference, replayer.replay_from(name))
                finally:
                    swap_modules(model, {name: original})


def _measure_in_context(model, sens, names, centre, built_all, routers, fixed_layers, calls) -> float:
    """Leave-one-in around `centre` ({free layer: format}, e.g. every layer at the lowest format):
    with every free layer in its centre format and the recipe's override layers in theirs, for
    each layer of `names` and each of its other options, measured = the damage with that layer
    alone moved to the option (the centre option's measured = the centre's damage, returned)."""
    from .engine import swap_modules
    from .nn.layers import QuantModule

    router = next(iter(routers.values()))
    originals = {n: model.get_submodule(n) for n in [*centre, *fixed_layers]}

    def module(name, fmt):
        return originals[name] if fmt == FLOAT else built_all[fmt][name]

    own = {}  # every built layer's own router, restored after
    for fmt, built in built_all.items():
        for layer in built.values():
            own[id(layer)] = (layer, routers[fmt])
            layer.bind_router(router)  # same boundaries (checked): one router routes them all
    for layer in fixed_layers.values():
        own[id(layer)] = (layer, getattr(layer, "_router", None))
        layer.bind_router(router)
    try:
        with _Routed(model, router):
            swap_modules(model, {n: module(n, f) for n, f in centre.items()})
            swap_modules(model, dict(fixed_layers))
            replayer = Replayer(model, calls.calls)
            base = relative_error(calls.reference, replayer.outputs)
            for name in names:
                for option in sens[name].options:
                    if option.format == centre[name]:
                        option.measured = base
                        continue
                    swap_modules(model, {name: module(name, option.format)})
                    try:
                        option.measured = relative_error(calls.reference, replayer.replay_from(name))
                    finally:
                        swap_modules(model, {name: module(name, centre[name])})
    finally:
        swap_modules(model, originals)
        for layer, r in own.values():
            if isinstance(layer, QuantModule):
                layer.bind_router(r)
    return base


class _Routed:
    """Temporarily attach a timestep router to the denoiser."""

    def __init__(self, model: nn.Module, router):
        self.model, self.router = model, router

    def __enter__(self):
        from .nn.router import attach_router

        self.handle = attach_router(self.model, self.router)
        return self

    def __exit__(self, *exc):
        from .nn.router import ROUTER_NAME

        self.handle.remove()
        del self.model._modules[ROUTER_NAME]
        for attr in ("_dq_timestep_position", "_dq_router_handle"):
            self.model.__dict__.pop(attr, None)


def estimate_pairs(sens: Sensitivity, names: Sequence[str] | None = None) -> list[tuple[float, float]]:
    """(estimate, measurement) pairs that rank the same thing, over the (layer, format) options of
    `names` (every measured layer by default). Measured alone: the damage of each quantized
    format. Measured in context: the damage REDUCTION of raising the layer from the lowest
    format (or the layer's format in the plan measured around, `Sensitivity.centre`) to each other
    option (float's estimate 0), estimated as the single-layer estimate's reduction."""
    wanted = set(names) if names is not None else None
    pairs = []
    for s in sens.layers:
        if wanted is not None and s.name not in wanted:
            continue
        opts = {o.format: o for o in s.options}
        if sens.method == "in-context":
            centre = (sens.centre or {}).get(s.name, sens.low)
            at = opts[centre]
            at_est = 0.0 if centre == FLOAT else at.estimated
            if at.measured is None or at_est is None:
                continue
            for o in s.options:
                if o.format != centre and o.measured is not None:
                    est = 0.0 if o.format == FLOAT else o.estimated
                    if est is not None:
                        pairs.append((at_est - est, at.measured - o.measured))
        else:
            pairs += [(o.estimated, o.measured) for o in s.options
                      if o.format != FLOAT and o.estimated is not None and o.measured is not None]
    return pairs


def measure_sensitivity(
    pipe, model: nn.Module, recipe: Recipe, calib_prompts, steps: int, call_kwargs: dict[str, Any],
    mode: str | None = None, keep_built: bool = False,
) -> Sensitivity:
    """Storage and damage of every (layer in scope, candidate format); see the module docstring.
    keep_built: keep the built layers (memory: one quantized copy of the model per format) for
    `install_allocation`."""
    import time

    from .engine import LayerChoice, _fits, plan_layers
    from .prompts import resolve_prompts

    cfg = recipe.mixed
    mode = mode or cfg.sensitivity
    method = cfg.measure
    scope = allocation_scope(model, recipe)
    if not scope.free:
        raise DQError("no layer is left for the allocation to decide: the recipe's keep/overrides fix every layer")
    formats = weight_formats(recipe)
    base_plan = {c.name: c for c in plan_layers(model, recipe)}
    fixed_plan = [base_plan[n] for n in scope.fixed if n in base_plan]
    prompts = resolve_prompts(pipe, calib_prompts, recipe)[: cfg.num_prompts]
    seconds: dict[str, float] = {}

    def clock(phase, since):
        seconds[f"{phase}_wall"] = seconds.get(f"{phase}_wall", 0.0) + time.perf_counter() - since[0]
        seconds[f"{phase}_cpu"] = seconds.get(f"{phase}_cpu", 0.0) + time.process_time() - since[1]

    def now():
        return time.perf_counter(), time.process_time()

    t = now()
    calls, store = record(pipe, model, prompts, recipe, cfg.steps or steps, call_kwargs,
                          moments=[(n, m) for n, m, _ in scope.free] if mode != "measure" else ())
    clock("record", t)
    sens = {name: LayerSensitivity(name, module.weight.numel(), [LayerOption(FLOAT, float_bytes(module))])
            for name, module, _ in scope.free}
    built_all: dict[str, dict[str, nn.Module]] = {}
    routers = {}
    fixed_bytes = 0
    fixed_layers: dict[str, nn.Module] = {}
    for i, fmt in enumerate(cfg.weights):
        plan = [LayerChoice(n, m, _fits(formats[fmt], m, n, "weight"), None if wo else recipe.activation)
                for n, m, wo in scope.free]
        if i == 0:
            plan += fixed_plan  # their exact storage (built once)
        logger.info("mixed precision: building every layer in %s (%d/%d)", fmt, i + 1, len(cfg.weights))
        t = now()
        built, routers[fmt] = _build_format(pipe, model, plan, recipe, calib_prompts, steps, call_kwargs)
        clock("calibration", t)
        if i == 0:
            fixed_layers = {c.name: built.pop(c.name) for c in fixed_plan}
            fixed_bytes = sum(layer_bytes(m) for m in fixed_layers.values())
        elif not torch.equal(routers[fmt].boundaries, routers[cfg.weights[0]].boundaries):
            raise DQError("the formats' calibrations saw different timesteps; calibrate with the same prompts and steps")
        built_all[fmt] = built
        for name, module, wo in scope.free:
            est = estimate_damage(name, module, store, plan[[c.name for c in plan].index(name)].weight,
                                  None if wo else recipe.activation, recipe.timestep_groups) if store else None
            sens[name].options.append(LayerOption(fmt, layer_bytes(built[name]), estimated=est))

    names = [n for n, _, _ in scope.free]
    # the in-context base: the format with the least storage over the layers in scope
    low = min(cfg.weights, key=lambda f: sum(layer_bytes(m) for m in built_all[f].values()))
    layers = dict(quantizable_layers(model))
    kept_bytes = sum(float_bytes(layers[n]) for n in scope.kept)
    free_float = sum(float_bytes(layers[n]) for n in names)
    fixed_float = sum(float_bytes(layers[n]) for n in scope.fixed)
    other = weight_nbytes(model) - free_float - fixed_float - kept_bytes
    fixed_weights = sum(layers[n].weight.numel() for n in scope.fixed)
    fixed_bytes += sum(float_bytes(layers[n]) for n in scope.fixed if n not in base_plan)  # overridden to float
    sensitivity = Sensitivity(list(sens.values()), fixed_bytes, fixed_weights, kept_bytes, other, mode,
                              method=method, low=low, seconds=seconds)
    centre = {n: low for n in names}

    def measure(which):
        t = now()
        if method == "in-context":
            sensitivity.baseline = _measure_in_context(model, sens, which, centre, built_all, routers, fixed_layers, calls)
            sensitivity.centre = dict(centre)
        else:
            _measure_alone(model, sens, which, built_all, routers, calls)
        clock("measure", t)

    def set_damages(mode):
        for s in sens.values():  # one kind of number per allocation
            for o in s.options:
                if mode == "measure":
                    o.damage = o.measured if (method == "in-context" or o.format != FLOAT) else 0.0
                else:
                    o.damage = 0.0 if o.format == FLOAT else o.estimated

    sample, rho = [], None
    if mode != "measure" and store is None:
        mode = "measure"
    if mode == "auto":
        step = max(1, len(names) // cfg.sample)
        sample = names[::step][: cfg.sample]
        measure(sample)
        pairs = estimate_pairs(sensitivity, sample)
        rho = spearman([p[0] for p in pairs], [p[1] for p in pairs])
        logger.info("mixed precision: estimate vs measurement (%s) on %d layers: Spearman %.3f", method, len(sample), rho)
        mode = "estimate" if rho >= RANK_THRESHOLD else "measure"
        rest = [n for n in names if n not in sample]
        if mode == "measure" and rest:
            logger.info("mixed precision: rank correlation below %.1f; measuring every layer", RANK_THRESHOLD)
            measure(rest)
    elif mode == "measure":
        measure(names)
    sensitivity.mode = mode
    set_damages(mode)
    budget = budget_of(recipe)
    if mode == "measure" and method == "in-context" and budget is not None:
        # re-centre: measure again around the plan the last measurement solves for the budget
        for _ in range(cfg.rounds - 1):
            t = now()
            plan = allocate(sensitivity, budget)
            clock("allocate", t)
            if plan == centre:
                break
            logger.info("mixed precision: measuring again around the %g-budget plan (%d layers raised)",
                        budget.value, sum(f != low for f in plan.values()))
            if sensitivity.round_one is None:
                sensitivity.round_one = {s.name: {o.format: o.measured for o in s.options} for s in sensitivity.layers}
            centre = plan
            measure(names)
            set_damages(mode)
    if mode != "measure" or method != "in-context":
        sensitivity.baseline = None  # damages are single-layer: additive from zero
    sensitivity.rank_correlation, sensitivity.sample = rho, sample
    if keep_built:
        sensitivity.built, sensitivity.fixed_layers, sensitivity.router = built_all, fixed_layers, routers[cfg.weights[0]]
    return sensitivity


def install_allocation(pipe, sens: Sensitivity, recipe: Recipe) -> None:
    """Quantize a fresh full-precision copy of the pipeline to `recipe.allocation` from the layers
    `measure_sensitivity(..., keep_built=True)` built, with no calibration: the same layers
    `dq.quantize(pipe, recipe)` builds (tests/test_mixed.py checks it), for comparing many budgets
    cheaply (benchmarks/mixed.py). The execution mode and recipe are set; nothing else."""
    import copy

    from .engine import find_denoiser, swap_modules
    from .kernels import set_execution
    from .nn.router import attach_router

    if sens.router is None:
        raise DQError("install_allocation needs measure_sensitivity(..., keep_built=True)")
    _, model = find_denoiser(pipe)
    router = copy.deepcopy(sens.router)
    layers = {n: sens.built[f][n] for n, f in recipe.allocation.items() if f != FLOAT}
    layers.update(sens.fixed_layers)
    replacements = {}
    for name, layer in layers.items():
        replacements[name] = copy.deepcopy(layer)
        replacements[name].bind_router(router)
    attach_router(model, router)
    swap_modules(model, replacements)
    set_execution(model, recipe.execution)
    model._dq_recipe = recipe


# -- budgets ----------------------------------------------------------------------------------
@dataclass
class Budget:
    kind: str  # "bits" or "memory"
    value: float

    def capacity(self, sens: Sensitivity) -> float:
        """Bound on the summed cost of the free layers (bits: 8 x bytes; memory: bytes)."""
        if self.kind == "bits":
            weights = sum(s.weights for s in sens.layers) + sens.fixed_weights
            return math.floor(self.value * weights) - 8 * sens.fixed_bytes
        return self.value - sens.fixed_bytes - sens.kept_bytes - sens.other_bytes

    def costs(self, sens: Sensitivity) -> list[list[float]]:
        factor = 8 if self.kind == "bits" else 1
        return [[factor * o.bytes for o in s.options] for s in sens.layers]


def achievable(sens: Sensitivity, kind: str) -> tuple[float, float]:
    """(smallest, largest) budget in `kind` units: every free layer at its smallest option, or in float."""
    weights = sum(s.weights for s in sens.layers) + sens.fixed_weights
    lo = sum(min(o.bytes for o in s.options) for s in sens.layers) + sens.fixed_bytes
    hi = sum(next(o.bytes for o in s.options if o.format == FLOAT) for s in sens.layers) + sens.fixed_bytes
    if kind == "bits":
        return 8 * lo / weights, 8 * hi / weights
    extra = sens.kept_bytes + sens.other_bytes
    return lo + extra, hi + extra


def _size(n: float) -> str:
    return f"{n / 2**20:.3f} MiB ({int(n)} bytes)"


def check_budget(budget: Budget, lo: float, hi: float, *, approximate: bool = False) -> None:
    """DQError naming the achievable range when `budget` is outside it."""
    about = "about " if approximate else ""
    if budget.kind == "bits":
        if budget.value < lo:
            raise DQError(
                f"budget {budget.value:g} average weight bits is below the smallest plan ({about}{lo:.3f} bits: every layer "
                f"in its smallest format, scales included); the achievable range is {about}{lo:.3f} to {hi:.3f} bits: "
                f"raise the budget to at least {lo:.3f}, or add a smaller format to mixed.weights"
            )
        if budget.value >= hi:
            raise DQError(
                f"budget {budget.value:g} average weight bits is at or above float ({hi:.3f} bits: every layer in float); "
                f"the achievable range is {about}{lo:.3f} to {hi:.3f} bits: lower the budget, or drop it to quantize without one"
            )
    else:
        if budget.value < lo:
            raise DQError(
                f"memory budget {_size(budget.value)} cannot be met: the smallest plan takes {about}{_size(lo)} "
                f"(every layer in its smallest format, plus the parts that are never quantized); the achievable range "
                f"is {about}{_size(lo)} to {_size(hi)}: raise the memory budget, or use a recipe with smaller formats"
            )
        if budget.value >= hi:
            raise DQError(
                f"memory budget {_size(budget.value)} already holds the full-precision denoiser ({_size(hi)}); nothing "
                f"needs quantizing: lower it to between {about}{_size(lo)} and {_size(hi)}, or drop it"
            )


def budget_of(recipe: Recipe) -> Budget | None:
    if recipe.budget is not None:
        return Budget("bits", recipe.budget)
    if recipe.memory is not None:
        return Budget("memory", float(recipe.memory))
    return None


def allocate(sens: Sensitivity, budget: Budget) -> dict[str, str]:
    lo, hi = achievable(sens, budget.kind)
    check_budget(budget, lo, hi)
    picks = solve_allocation([[o.damage for o in s.options] for s in sens.layers], budget.costs(sens), budget.capacity(sens))
    return {s.name: s.options[j].format for s, j in zip(sens.layers, picks)}


def precheck(model: nn.Module, recipe: Recipe, budget: Budget) -> None:
    """Refuse a budget far outside the achievable range before any calibration, from the layers'
    code and scale sizes alone (the exact check follows once the layers are built)."""
    formats = weight_formats(recipe)
    scope = allocation_scope(model, recipe)
    from .quant.packing import WeightLayout

    def approx(module, fmt):
        spec = formats[fmt]
        from .engine import _fits

        spec = _fits(spec, module, "", "weight")
        tensors = WeightLayout.default(tuple(module.weight.shape), spec).empty()
        return sum(t.numel() * t.element_size() for t in tensors.values() if t is not None)

    layers = dict(quantizable_layers(model))
    weights = sum(m.weight.numel() for _, m, _ in scope.free) + sum(layers[n].weight.numel() for n in scope.fixed)
    lo = sum(min(approx(m, f) for f in recipe.mixed.weights) for _, m, _ in scope.free)
    hi = sum(float_bytes(m) for _, m, _ in scope.free)
    fixed = sum(float_bytes(layers[n]) for n in scope.fixed)  # upper bound for the fixed layers
    if budget.kind == "bits":
        # fixed layers at their float size only widen the range: refuse only what is surely outside
        check_budget(budget, 8 * lo / weights, 8 * (hi + fixed) / weights, approximate=True)
    else:
        rest = weight_nbytes(model) - hi
        check_budget(budget, lo + rest - fixed, hi + rest, approximate=True)


# -- the report -------------------------------------------------------------------------------
@dataclass
class LayerReport:
    """One layer of a mixed-precision plan, for printing, plotting or an app."""

    name: str
    format: str
    weights: int
    bytes: int
    bits: float  # stored bits per weight of the chosen format (scales included)
    damage: float | None  # relative denoiser-output error of the chosen option (see Sensitivity.method)
    sqnr_db: float | None  # -10 log10(damage)
    damages: dict[str, float | None]  # per candidate format

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MixedPlan:
    """A solved allocation with its sensitivity (kept on the model as `_dq_mixed`)."""

    allocation: dict[str, str]
    sensitivity: Sensitivity
    budget: Budget

    def rows(self) -> list[LayerReport]:
        out = []
        for s in self.sensitivity.layers:
            fmt = self.allocation[s.name]
            option = next(o for o in s.options if o.format == fmt)
            damage = option.damage
            best = {o.format: o.damage for o in s.options}
            out.append(LayerReport(
                s.name, fmt, s.weights, option.bytes, 8 * option.bytes / s.weights, damage,
                -10 * math.log10(damage) if damage else None, best,
            ))
        return out

    def average_bits(self) -> float:
        rows = self.rows()
        weights = sum(r.weights for r in rows) + self.sensitivity.fixed_weights
        return 8 * (sum(r.bytes for r in rows) + self.sensitivity.fixed_bytes) / weights

    def total_bytes(self) -> int:
        s = self.sensitivity
        return sum(r.bytes for r in self.rows()) + s.fixed_bytes + s.kept_bytes + s.other_bytes

    def predicted_damage(self) -> float:
        """Single-layer damages: their sum. In context: the base's damage less each layer's
        reduction from it (both assume the layers' effects add up)."""
        base = self.sensitivity.baseline
        if base is None:
            return sum(r.damage or 0.0 for r in self.rows())
        return base - sum(base - (r.damage or 0.0) for r in self.rows())

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for r in self.rows():
            counts[r.format] = counts.get(r.format, 0) + 1
        what = f"{self.budget.value:g} bits" if self.budget.kind == "bits" else _size(self.budget.value)
        rho = self.sensitivity.rank_correlation
        check = f", estimate vs measured Spearman {rho:.2f}" if rho is not None else ""
        return (
            f"mixed precision under {what}: average {self.average_bits():.3f} weight bits, denoiser "
            f"{_size(self.total_bytes())}; layers {', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}; "
            f"sensitivity {self.sensitivity.mode}d{check}; predicted relative error {self.predicted_damage():.3g}"
        )

    def table(self) -> str:
        """A readable per-layer report."""
        formats = [o.format for o in self.sensitivity.layers[0].options]
        # in context, float is measured like any option (the whole model's error with the layer in float)
        shown = [f for f in formats if f != FLOAT or self.sensitivity.baseline is not None]
        head = f"{'layer':48s} {'format':>6s} {'weights':>8s} {'bits':>6s} " + " ".join(f"{'dB ' + f:>9s}" for f in shown)
        lines = [self.summary(), head]
        for r in self.rows():
            dbs = " ".join(
                f"{(-10 * math.log10(v) if v else float('inf')):9.1f}" for f, v in r.damages.items() if f in shown
            )
            lines.append(f"{r.name:48s} {r.format:>6s} {r.weights:8d} {r.bits:6.2f} {dbs}")
        return "\n".join(lines)


def layer_report(model_or_pipe) -> list[dict[str, Any]]:
    """Per layer of a quantized denoiser (or pipeline): name, format, weights, stored bytes, bits per
    weight, and, when its mixed-precision plan was solved in this process, the damage per
    candidate format. For an app to draw; works on any dq model (formats from the layers)."""
    from .engine import find_denoiser
    from .nn.layers import QuantModule

    model = model_or_pipe if isinstance(model_or_pipe, nn.Module) else find_denoiser(model_or_pipe)[1]
    plan: MixedPlan | None = getattr(model, "_dq_mixed", None)
    known = {r.name: r for r in plan.rows()} if plan is not None else {}
    float_layers = dict(quantizable_layers(model))
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, QuantModule) and name not in float_layers:
            continue
        fmt = format_of(module)
        nbytes, weights = layer_bytes(module), weight_count(module)
        r = known.get(name)
        rows.append({
            "name": name, "format": fmt, "weights": weights, "bytes": nbytes, "bits": 8 * nbytes / weights,
            "damage": r.damage if r else None, "sqnr_db": r.sqnr_db if r else None, "damages": r.damages if r else None,
        })
    return rows


def format_of(module: nn.Module) -> str:
    from .nn.layers import QuantModule

    if not isinstance(module, QuantModule) or module.weight_spec is None:
        return FLOAT
    w = module.weight_spec
    return f"int{w.bits}" if w.kind == "int" else ("fp8" if w.kind.startswith("fp8") else w.kind)


def plot_allocation(rows: Sequence[dict[str, Any] | LayerReport], path: str | Path) -> Path:
    """PNG: stored bits per layer beside the layer's sensitivity (denoiser SQNR, dB, of each
    candidate format with only that layer quantized)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise DQError("plotting needs matplotlib: pip install 'dq[mixed]'") from exc
    rows = [r.to_dict() if isinstance(r, LayerReport) else r for r in rows]
    names = [r["name"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, max(4, 0.18 * len(rows))), sharey=True)
    y = list(range(len(rows)))
    colors = {"int4": "tab:red", "int8": "tab:blue", "fp8": "tab:purple", FLOAT: "tab:gray"}
    ax1.barh(y, [r["bits"] for r in rows], color=[colors.get(r["format"], "k") for r in rows])
    ax1.set_yticks(y, names, fontsize=6)
    ax1.invert_yaxis()
    ax1.set_xlabel("stored bits per weight (scales included)")
    ax1.set_title("allocation")
    for fmt in sorted({f for r in rows if r.get("damages") for f in r["damages"] if f != FLOAT}):
        values = [(-10 * math.log10(r["damages"][fmt]) if r.get("damages") and r["damages"].get(fmt) else float("nan")) for r in rows]
        ax2.plot(values, y, "o", ms=3, label=fmt, color=colors.get(fmt))
    ax2.set_xlabel("denoiser SQNR, dB, this layer at this format (in context: the rest at the centre plan)")
    ax2.set_title("sensitivity")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- the entry point used by dq.quantize --------------------------------------------------------
def resolve_budget(pipe, model: nn.Module, recipe: Recipe, calib_prompts, steps: int, call_kwargs: dict[str, Any]) -> Recipe:
    """The recipe with its budget solved into `allocation` (the recipe as is without a budget, or
    with an allocation already: it is followed, not re-solved). Keeps the `MixedPlan` on the model
    (`model._dq_mixed`) for `layer_report`, and logs the per-layer report."""
    budget = budget_of(recipe)
    if budget is None or recipe.allocation is not None:
        return recipe
    precheck(model, recipe, budget)
    sens = measure_sensitivity(pipe, model, recipe, calib_prompts, steps, call_kwargs)
    allocation = allocate(sens, budget)
    plan = MixedPlan(allocation, sens, budget)
    model._dq_mixed = plan
    logger.info("%s", plan.table())
    return Recipe.from_dict({**recipe.to_dict(), "allocation": allocation})
