"""Per-layer, per-format sensitivity: measured (on the sampling trajectory, in context or alone) or estimated;
see `dq.mixed`."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..arch import quantizable_layers
from ..errors import DQError
from ..quant.packing import weight_nbytes
from ..quant.spec import QuantSpec
from ..recipe import Recipe
from .budget import (
    FLOAT,
    Budget,
    activation_rule,
    allocate,
    allocation_scope,
    budget_of,
    float_bytes,
    layer_bytes,
    weight_formats,
)
from .replay import Replayer, record, relative_error
from .trajectory import measure_trajectory

logger = logging.getLogger(__name__)

RANK_THRESHOLD = 0.8  # below this Spearman correlation, "auto" measures instead of estimating


def estimate_damage(name: str, module: nn.Module, store, spec: QuantSpec | None, act: QuantSpec | None, groups: int = 1) -> float | None:
    """Analytic relative output error of one layer under round-to-nearest `spec` weights and `act`
    activations: (tr(dW H dW^T) + activation noise) / tr(W H W^T) (None without statistics)."""
    from ..calibrate.timesteps import TimestepGroups
    from ..outliers import weight_quantizer
    from ..quant.smooth import InputStats, output_error
    from ..quant.transform import ChannelTransform

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
    # pipeline passes over the calibration prompts the builds ran (one statistics pass shared by
    # every format and a range pass per format, or both passes per format)
    calibration_passes: int = 0
    # in context: the plan the final measurement was taken around ({layer: format}; every layer
    # at `low` after one round) and, after more rounds, the first round's measurements
    centre: dict[str, str] | None = None
    round_one: dict[str, dict[str, float | None]] | None = None
    # with keep_built: every format's built layers ({format: {layer: module}}), the override
    # layers', and the timestep router they were calibrated with (see `install_allocation`)
    built: dict[str, dict[str, nn.Module]] = field(default_factory=dict, repr=False)
    fixed_layers: dict[str, nn.Module] = field(default_factory=dict, repr=False)
    router: nn.Module | None = field(default=None, repr=False)
    calls: Any = field(default=None, repr=False)  # with keep_built: the recorded calls (`measure_around`)
    # in context: every whole plan whose error was measured ({layer: format}, relative error on
    # the recorded calls): the centres of the rounds and the plan the last round solves
    # (`select_plan` picks among them)
    tried: list[tuple[dict[str, str], float]] = field(default_factory=list, repr=False)


def _build_formats(pipe, model, plans: dict[str, list], recipe, calib_prompts, steps, call_kwargs):
    """Build (without installing) the quantized layers of each format's plan as dq.quantize would:
    ({format: (layers, router)}, pipeline passes run). Pass 1 of the calibration (raw-input
    statistics) runs once for every format where it can (`dq.model.shared_first_pass`); pass 2
    (each format's transformed inputs) runs per format."""
    from ..engine import build_layers, calibrate
    from ..model import Calibration, shared_first_pass
    from ..nn.router import TimestepRouter
    from ..prompts import resolve_prompts

    passes, prompts = 0, None

    def collect(targets):
        nonlocal passes, prompts
        passes += 1
        prompts = prompts or resolve_prompts(pipe, calib_prompts, recipe)  # only if a pass is needed
        return calibrate(pipe, model, [], prompts, recipe=recipe, num_inference_steps=steps,
                         call_kwargs=call_kwargs, targets=targets)

    cals = {fmt: Calibration(model, recipe, pipe=pipe, plan=plan) for fmt, plan in plans.items()}
    union = shared_first_pass(list(cals.values()))
    shared = None
    if union is not None:
        shared = collect(union)
        logger.info("mixed precision: one statistics pass serves all %d formats", len(cals))
    out = {}
    for i, fmt in enumerate(list(cals)):
        cal = cals.pop(fmt)  # its prepared layers go once its layers are built
        logger.info("mixed precision: building every layer in %s (%d/%d)", fmt, i + 1, len(plans))
        if shared is not None and cal.stage == "pass1":
            cal.feed(shared.view(), reduce=False)
        while not cal.ready:
            cal.feed(collect(cal.targets))
        router = TimestepRouter(cal.groups.tensor()).to(next(model.parameters()).device)  # beside the model's
        with torch.no_grad():
            out[fmt] = build_layers(cal.plan, cal.store, cal.groups, router, cal.prepared), router
    return out, passes


def _measure_alone(model, sens, names, built_all, routers, calls) -> None:
    """measured = the damage with ONLY the layer in the format, every other layer in float."""
    replayer = Replayer(model, calls.calls)  # the float model: its units' outputs are reused
    for fmt, built in built_all.items():
        with _Routed(model, routers[fmt]):
            options = [next(o for o in sens[name].options if o.format == fmt) for name in names]
            outs = replayer.replay_variants([{name: built[name]} for name in names])
            for option, out in zip(options, outs):
                option.measured = relative_error(calls.reference, out)


class _Execution:
    """Run the built layers in `mode` (the recipe's execution: the numerics the quantized model
    will run, and the faster ones where kernels exist) while measuring; simulated after, as
    built, with their runtime copies released."""

    def __init__(self, layers: Sequence[nn.Module], mode: str, weight_only_int8: bool):
        self.layers, self.mode, self.weight_only_int8 = list(layers), mode, weight_only_int8

    def _set(self, mode: str) -> None:
        from ..kernels import set_execution
        from ..kernels.dispatch import release_runtime

        holder = nn.ModuleDict({str(i): m for i, m in enumerate(self.layers)})
        set_execution(holder, mode, weight_only_int8=self.weight_only_int8)
        if mode == "sim":
            for m in self.layers:
                release_runtime(m)

    def __enter__(self):
        if self.mode != "sim":
            self._set("auto" if self.mode == "real" else self.mode)
        return self

    def __exit__(self, *exc):
        if self.mode != "sim":
            self._set("sim")


def _measure_in_context(model, sens, names, centre, built_all, routers, fixed_layers, calls, skip=None) -> float:
    """Leave-one-in around `centre` ({free layer: format}, e.g. every layer at the lowest format):
    with every free layer in its centre format and the recipe's override layers in theirs, for
    each layer of `names` and each of its other options, measured = the damage with that layer
    alone moved to the option (the centre option's measured = the centre's damage, returned).
    skip(name, option): True for an option not to measure (its measured is None)."""
    from ..engine import swap_modules
    from ..nn.layers import QuantModule

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
            moves = []
            for name in names:
                for option in sens[name].options:
                    if option.format == centre[name]:
                        option.measured = base
                    elif skip is not None and skip(name, option):
                        option.measured = None  # cannot be in any plan under the budget: not measured
                    else:
                        moves.append((option, {name: module(name, option.format)}))
            outs = replayer.replay_variants([v for _, v in moves])
            for (option, _), out in zip(moves, outs):
                option.measured = relative_error(calls.reference, out)
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
        from ..nn.router import attach_router

        self.handle = attach_router(self.model, self.router)
        return self

    def __exit__(self, *exc):
        from ..nn.router import ROUTER_NAME

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

    from ..engine import LayerChoice, _fits, plan_layers
    from ..prompts import resolve_prompts

    cfg = recipe.mixed
    mode = mode or cfg.sensitivity
    method = cfg.measure
    scope = allocation_scope(model, recipe)
    if not scope.free:
        raise DQError("no layer is left for the allocation to decide: the recipe's keep/overrides fix every layer")
    formats = weight_formats(recipe)
    activation = activation_rule(model, recipe)
    base_plan = {c.name: c for c in plan_layers(model, recipe)}
    fixed_plan = [base_plan[n] for n in scope.fixed if n in base_plan]
    every_prompt = resolve_prompts(pipe, calib_prompts, recipe)
    prompts = every_prompt[: cfg.num_prompts]
    trajectory_prompts = every_prompt[: cfg.trajectory_prompts]
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
    plans = {}
    for i, fmt in enumerate(cfg.weights):
        plans[fmt] = [LayerChoice(n, m, w, activation(n, wo, w))
                      for n, m, wo in scope.free for w in [_fits(formats[fmt], m, n, "weight")]]
        if i == 0:
            plans[fmt] += fixed_plan  # their exact storage (built once)
    t = now()
    builds, passes = _build_formats(pipe, model, plans, recipe, calib_prompts, steps, call_kwargs)
    clock("calibration", t)
    for i, fmt in enumerate(cfg.weights):
        built, routers[fmt] = builds[fmt]
        if i == 0:
            fixed_layers = {c.name: built.pop(c.name) for c in fixed_plan}
            fixed_bytes = sum(layer_bytes(m) for m in fixed_layers.values())
        elif not torch.equal(routers[fmt].boundaries, routers[cfg.weights[0]].boundaries):
            raise DQError("the formats' calibrations saw different timesteps; calibrate with the same prompts and steps")
        built_all[fmt] = built
        chosen = {c.name: c for c in plans[fmt]}
        for name, module, _ in scope.free:
            choice = chosen[name]
            est = estimate_damage(name, module, store, choice.weight, choice.activation, recipe.timestep_groups) if store else None
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
                              method=method, low=low, seconds=seconds, calibration_passes=passes)
    centre = {n: low for n in names}

    every_built = [m for built in built_all.values() for m in built.values()] + list(fixed_layers.values())
    budget = budget_of(recipe)
    skip = infeasible(sensitivity, budget) if budget is not None else None

    def measure(which):
        t = now()
        with _Execution(every_built, recipe.execution, bool(recipe.weight_only_int8_activations)):
            if method == "in-context":
                sensitivity.baseline = _measure_in_context(model, sens, which, centre, built_all, routers, fixed_layers,
                                                           calls, skip)
                sensitivity.centre = dict(centre)
                _remember(sensitivity, centre, sensitivity.baseline)
            elif method == "trajectory":
                measure_trajectory(pipe, model, sens, which, built_all, routers[cfg.weights[0]], calls, low,
                                   trajectory_prompts, steps, recipe.calib_seed, call_kwargs)
            else:
                _measure_alone(model, sens, which, built_all, routers, calls)
        clock("measure", t)

    def set_damages(mode):
        for s in sens.values():  # one kind of number per allocation
            for o in s.options:
                if mode == "measure":
                    o.damage = _damage(o, method)
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
        # the plan the last measurement solves, measured whole (one replay), so that
        # `select_plan` can compare it with the centres measured before it
        t = now()
        final = allocate(sensitivity, budget)
        if _known_error(sensitivity, final) is None:
            with _Execution(every_built, recipe.execution, bool(recipe.weight_only_int8_activations)):
                error = _measure_in_context(model, sens, [], final, built_all, routers, fixed_layers, calls)
            _remember(sensitivity, final, error)
        clock("measure", t)
    if mode != "measure" or method != "in-context":
        sensitivity.baseline = None  # damages are single-layer: additive from zero
    sensitivity.rank_correlation, sensitivity.sample = rho, sample
    if keep_built:
        sensitivity.built, sensitivity.fixed_layers, sensitivity.router = built_all, fixed_layers, routers[cfg.weights[0]]
        sensitivity.calls = calls
    return sensitivity


def _remember(sens: Sensitivity, plan: dict[str, str], error: float) -> None:
    if _known_error(sens, plan) is None:
        sens.tried.append((dict(plan), float(error)))


def _known_error(sens: Sensitivity, plan: dict[str, str]) -> float | None:
    return next((e for p, e in sens.tried if p == plan), None)


def plan_cost(sens: Sensitivity, budget: Budget, plan: dict[str, str]) -> float:
    """The plan's summed cost in `budget`'s units (what `Budget.capacity` bounds)."""
    costs = budget.costs(sens)
    return sum(c for s, row in zip(sens.layers, costs) for o, c in zip(s.options, row) if o.format == plan[s.name])


def within_budget(sens: Sensitivity, budget: Budget, solved: dict[str, str]):
    """competes(plan): whether a whole plan may replace the `solved` one under `budget`: a plan for
    every layer in scope, at most the budget (up to float rounding) and, under a memory budget, at
    least 99 % of the solved plan's bytes (a memory budget is to be used where the choices allow)."""
    names = {s.name for s in sens.layers}
    capacity = budget.capacity(sens)
    floor = 0.99 * plan_cost(sens, budget, solved) if budget.kind == "memory" else -math.inf

    def competes(plan: dict[str, str]) -> bool:
        return set(plan) == names and floor <= plan_cost(sens, budget, plan) <= capacity * (1 + 1e-9)
    return competes


def built_layers(sens: Sensitivity) -> list[nn.Module]:
    """Every layer `measure_sensitivity(..., keep_built=True)` built and kept, the override layers'
    included."""
    return [m for built in sens.built.values() for m in built.values()] + list(sens.fixed_layers.values())


def select_plan(sens: Sensitivity, budget: Budget) -> dict[str, str]:
    """The allocation for `budget`: the plan the integer program solves on the damages
    (`allocate`), unless a plan measured whole under the same budget (`Sensitivity.tried`: the
    rounds' centres, the last solved plan) has a lower measured error; then that one. The
    additive model sums single-layer moves around a centre, and a plan that changes many layers
    at once can do worse than its sum predicts: the measured whole-plan error decides among the
    plans that have one. Under a memory budget only plans using at least 99 % of the solved
    plan's bytes compete (the budget is to be used). Without measured plans (estimated or
    alone): the solved plan."""
    solved = allocate(sens, budget)
    competes = within_budget(sens, budget, solved)
    measured = [(e, p) for p, e in sens.tried if competes(p)]
    own = _known_error(sens, solved)
    if own is None or not measured:
        return solved
    error, best = min(measured, key=lambda ep: ep[0])
    if error < own:
        logger.info("mixed precision: a plan measured earlier has a lower whole-model error than the last solved plan "
                    "(%.4g against %.4g): keeping it", error, own)
        return dict(best)
    return solved


def measure_plan(model: nn.Module, sens: Sensitivity, recipe: Recipe, plan: dict[str, str]) -> float:
    """The whole-model relative error of `plan` on the recorded calls (one replay), remembered in
    `sens.tried` for `select_plan`; needs `measure_sensitivity(..., keep_built=True)`."""
    known = _known_error(sens, plan)
    if known is not None:
        return known
    if sens.router is None or sens.calls is None:
        raise DQError("measure_plan needs an in-context measure_sensitivity(..., keep_built=True)")
    error = _measure_kept(model, sens, {s.name: s for s in sens.layers}, [], plan, recipe)
    _remember(sens, plan, error)
    return error


def _measure_kept(model, sens: Sensitivity, by, names, centre, recipe: Recipe, skip=None) -> float:
    """`_measure_in_context` on the layers `measure_sensitivity(..., keep_built=True)` kept, run in
    the recipe's execution: the centre's whole-model error (and `names`' options into `by`)."""
    routers = {f: sens.router for f in sens.built}
    with _Execution(built_layers(sens), recipe.execution, bool(recipe.weight_only_int8_activations)):
        return _measure_in_context(model, by, names, centre, sens.built, routers, sens.fixed_layers, sens.calls, skip)


def _damage(option: LayerOption, method: str) -> float:
    """A measured option's damage for the allocation: in context its measured error (an option
    left unmeasured as infeasible: infinite, never chosen), alone its error (float: none)."""
    if method != "in-context" and option.format == FLOAT:
        return 0.0
    return option.measured if option.measured is not None else math.inf


def infeasible(sens: Sensitivity, budget: Budget):
    """skip(name, option) for the in-context measurement: True for an option no plan under
    `budget` can hold (raising the layer to it costs more than every other layer at its
    smallest option leaves). Such options are not measured: the allocation cannot change."""
    costs = budget.costs(sens)
    slack = budget.capacity(sens) - sum(min(c) for c in costs)
    extra = {s.name: {o.format: c - min(row) for o, c in zip(s.options, row)} for s, row in zip(sens.layers, costs)}

    def skip(name: str, option: LayerOption) -> bool:
        return extra[name][option.format] > slack
    return skip


def measure_around(model: nn.Module, sens: Sensitivity, recipe: Recipe, budget: Budget) -> Sensitivity:
    """A copy of an in-context `sens` (from `measure_sensitivity(..., keep_built=True)`) measured
    again around the plan its numbers solve for `budget` (every layer's other options, options
    infeasible under `budget` left unmeasured): one more round, for one budget, without
    calibrating again (benchmarks/mixed.py: one centre per budget of a sweep)."""
    import copy
    import time

    if sens.router is None or sens.calls is None or sens.method != "in-context":
        raise DQError("measure_around needs an in-context measure_sensitivity(..., keep_built=True)")
    t, c = time.perf_counter(), time.process_time()
    centre = allocate(sens, budget)
    new = copy.copy(sens)
    new.layers = [LayerSensitivity(s.name, s.weights, [LayerOption(o.format, o.bytes, estimated=o.estimated) for o in s.options])
                  for s in sens.layers]
    new.seconds = {}
    by = {s.name: s for s in new.layers}
    new.baseline = _measure_kept(model, sens, by, list(by), centre, recipe, infeasible(new, budget))
    new.centre = centre
    new.tried = list(sens.tried)
    _remember(new, centre, new.baseline)
    new.round_one = sens.round_one or {s.name: {o.format: o.measured for o in s.options} for s in sens.layers}
    for s in new.layers:
        for o in s.options:
            o.damage = _damage(o, "in-context")
    new.seconds = {"measure_wall": time.perf_counter() - t, "measure_cpu": time.process_time() - c}
    return new


def install_allocation(pipe, sens: Sensitivity, recipe: Recipe) -> None:
    """Quantize a fresh full-precision copy of the pipeline to `recipe.allocation` from the layers
    `measure_sensitivity(..., keep_built=True)` built, with no calibration: the same layers
    `dq.quantize(pipe, recipe)` builds (tests/test_mixed.py checks it), for comparing many budgets
    cheaply (benchmarks/mixed.py). The execution mode and recipe are set; nothing else."""
    import copy

    from ..engine import find_denoiser, swap_modules
    from ..kernels import set_execution
    from ..nn.router import attach_router

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
