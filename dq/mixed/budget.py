"""Scope, storage and budgets of a mixed-precision allocation, and its exact solution
(`scipy.optimize.milp`); see `dq.mixed`."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from torch import nn

from ..arch import arch_for, default_dynamic_inputs, default_weight_only, quantizable_layers
from ..errors import DQError
from ..quant.packing import weight_nbytes
from ..quant.spec import QuantSpec
from ..recipe import Recipe

if TYPE_CHECKING:
    from .sensitivity import Sensitivity

FLOAT = "float"


# -- formats and scope ------------------------------------------------------------------------
def weight_formats(recipe: Recipe) -> dict[str, QuantSpec]:
    """Every weight format an allocation may name; the recipe's own weight spec stands for its
    format (a w4a8 recipe's int4 is its 4-bit spec: group size, range search); "int4g32" is that
    4-bit spec in groups of 32 (`format_of` tells the two apart by group size)."""
    table = {
        "int4": QuantSpec(bits=4, granularity="group", group_size=64, range="mse"),
        "int4g32": QuantSpec(bits=4, granularity="group", group_size=32, range="mse"),
        "int5": QuantSpec(bits=5, granularity="channel", range="mse"),
        "int6": QuantSpec(bits=6, granularity="channel", range="mse"),
        "int8": QuantSpec(bits=8, granularity="channel"),
        "fp8": QuantSpec(kind="fp8_e4m3", granularity="channel"),
    }
    own = recipe.weight
    if own is not None:
        if own.kind == "int" and f"int{own.bits}" in table:
            table[f"int{own.bits}"] = own
            if own.bits == 4 and own.granularity == "group":
                table["int4g32"] = replace(own, group_size=32)
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


def activation_rule(model: nn.Module, recipe: Recipe) -> Callable[[str, bool, QuantSpec | None], QuantSpec | None]:
    """`rule(name, weight_only, weight_spec)`: the activation format of a layer the allocation
    decides, as `dq.engine.plan_layers` gives it under a uniform recipe of that layer's weight
    format: None for weight-only layers, else the recipe's activation format, with per-token
    dynamic ranges for the architecture's `dynamic_inputs` layers (and its `dynamic_inputs_w8`
    layers when the layer's weights have 8 bits or more)."""
    from ..engine import dynamic_per_token

    act = recipe.activation
    dynamic: dict[bool, set[str]] = {False: set(), True: set()}
    if recipe.keep_defaults and act is not None and not act.dynamic:
        spec = arch_for(model)
        dynamic = {False: default_dynamic_inputs(model, spec, None), True: default_dynamic_inputs(model, spec, 8)}

    def rule(name: str, weight_only: bool, weight: QuantSpec | None) -> QuantSpec | None:
        if weight_only or act is None:
            return None
        wide = weight is not None and weight.bits >= 8
        return dynamic_per_token(act) if name in dynamic[wide] else act

    return rule


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
    from ..engine import LayerChoice, _fits

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
    activation = activation_rule(model, recipe)
    by_name = {c.name: c for c in plan}
    new = []
    for name, module in layers.items():
        fmt = recipe.allocation.get(name)
        if name in free and fmt is not None:
            if fmt != FLOAT:
                weight = _fits(formats[fmt], module, name, "weight")
                new.append(LayerChoice(name, module, weight, activation(name, free[name], weight)))
        elif name in by_name:
            new.append(by_name[name])
    return new


# -- storage ----------------------------------------------------------------------------------
def float_bytes(module: nn.Module) -> int:
    return module.weight.numel() * module.weight.element_size()


def layer_bytes(module: nn.Module) -> int:
    """Stored bytes of a layer's weight: every persistent tensor but the bias (a float layer:
    its weight)."""
    from ..nn.layers import QuantModule

    if not isinstance(module, QuantModule):
        return float_bytes(module)
    bias = module.bias.numel() * module.bias.element_size() if getattr(module, "bias", None) is not None else 0
    return weight_nbytes(module) - bias


def weight_count(module: nn.Module) -> int:
    from ..nn.layers import QuantModule

    if isinstance(module, QuantModule):
        return math.prod(module.weight_shape)
    return module.weight.numel()


# -- the integer program ----------------------------------------------------------------------
def solve_allocation(damage: Sequence[Sequence[float]], cost: Sequence[Sequence[float]], capacity: float,
                     around: Sequence[int] | None = None, max_changes: int | None = None) -> list[int]:
    """The option index per item minimizing sum damage[i][j] subject to sum cost[i][j] <= capacity
    (a multiple-choice knapsack), solved exactly as an integer program by HiGHS
    (`scipy.optimize.milp`, relative gap 0); an option of infinite damage is never chosen. With
    `around` (an option index per item) and `max_changes`: at most that many items choose another
    option than `around` (a trust region). Raises DQError when no choice fits."""
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
    allowed = np.isfinite(d).astype(np.float64)  # an infinite damage: an option never chosen
    d[~np.isfinite(d)] = 0.0
    scale = float(np.abs(d).max()) or 1.0
    c = np.array([v for row in cost for v in row], dtype=np.float64)
    choose = np.zeros((len(sizes), n))
    start = 0
    for i, s in enumerate(sizes):
        choose[i, start : start + s] = 1
        start += s
    constraints = [LinearConstraint(choose, 1, 1), LinearConstraint(c[None, :], -np.inf, capacity)]
    if max_changes is not None:
        if around is None or len(around) != len(sizes):
            raise DQError("max_changes needs `around`: one option index per item")
        kept = np.zeros(n)
        kept[np.cumsum([0, *sizes[:-1]]) + np.asarray(around)] = 1
        constraints.append(LinearConstraint(kept[None, :], len(sizes) - max_changes, np.inf))
    result = milp(
        d / scale,
        constraints=constraints,
        integrality=np.ones(n), bounds=Bounds(0, allowed), options={"mip_rel_gap": 0.0},
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
    from ..quant.packing import WeightLayout

    def approx(module, fmt):
        spec = formats[fmt]
        from ..engine import _fits

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
