"""Mixed precision: how sensitivity is measured (recorded calls, replays from a block, batched
variants, rounds around a plan) and how whole plans are selected."""

import json
import math

import pytest
import torch
from mixed_common import KIND, STEPS, budget_recipe, call_kwargs

from dq.engine import find_denoiser
from dq.errors import DQError
from dq.mixed import (
    Budget,
    allocate,
    measure_sensitivity,
    plan_cost,
    select_plan,
    solve_allocation,
)
from dq.recipe import Recipe
from dq.testing.tiny import prompts_for, tiny_pipeline


# -- how sensitivity is measured -----------------------------------------------------------------
def _recorded_calls(pipe, recipe):
    """The calls measure_sensitivity records (same prompts, steps and seed)."""
    from dq.mixed import record

    _, model = find_denoiser(pipe)
    return record(pipe, model, prompts_for(KIND, 2)[: recipe.mixed.num_prompts], recipe, recipe.mixed.steps,
                  call_kwargs())[0]


def _damage_of(sens, recipe, allocation, calls):
    """The relative denoiser-output error of a fresh model installed with `allocation` (in the
    recipe's execution, as the sensitivity pass runs the built layers), by a full replay of
    every call (no caching)."""
    from dq.mixed import _replay, install_allocation, relative_error

    pipe = tiny_pipeline(KIND)
    install_allocation(pipe, sens, Recipe.from_dict({**recipe.to_dict(), "allocation": allocation}))
    return relative_error(calls.reference, _replay(find_denoiser(pipe)[1], calls.calls))


# Measured options come from batched replays (many variants in one batch): float rounding of
# another batch size can move an activation across a rounding boundary, so they match a direct
# one-by-one replay to this relative tolerance (the unbatched base: to 1e-6).
BATCHED_REL = 3e-3


def test_replay_from_a_block_equals_a_full_replay():
    from dq.mixed import Replayer, _replay, replay_units

    pipe = tiny_pipeline(KIND)
    _, model = find_denoiser(pipe)
    calls = _recorded_calls(pipe, budget_recipe())
    replayer = Replayer(model, calls.calls)
    for ref, out in zip(calls.reference, replayer.outputs):
        assert torch.equal(ref, out)
    units = [n for n, _ in replay_units(model)]
    assert sum(n.startswith("transformer_blocks.") for n in units) >= 2
    layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    mid = next(n for n in layers if n.startswith("transformer_blocks.1."))
    for name in (layers[0], mid, layers[-1]):
        layer = model.get_submodule(name)
        with torch.no_grad():
            saved = layer.weight.clone()
            layer.weight.mul_(1.5)  # the changed layer
        try:
            full = _replay(model, calls.calls)
            partial = replayer.replay_from(name)
        finally:
            with torch.no_grad():
                layer.weight.copy_(saved)
        assert any(not torch.equal(f, r) for f, r in zip(full, calls.reference)), name
        for f, p in zip(full, partial):
            assert torch.equal(f, p), name
    # nothing left patched: a plain replay is the reference again
    for ref, out in zip(calls.reference, _replay(model, calls.calls)):
        assert torch.equal(ref, out)


def test_in_context_sensitivity_equals_direct_leave_one_in():
    """measured (in context) of (layer, format) = the error of the model with every layer in scope
    at int4 and that layer alone at the format; the int4 option = the all-int4 base."""
    recipe = budget_recipe(budget=6.0, mixed={"num_prompts": 2, "steps": STEPS, "sensitivity": "measure", "rounds": 1,
                                               "measure": "in-context"})
    pipe = tiny_pipeline(KIND)
    _, model = find_denoiser(pipe)
    sens = measure_sensitivity(pipe, model, recipe, prompts_for(KIND, 2), STEPS, call_kwargs(), keep_built=True)
    assert sens.method == "in-context" and sens.low == "int4" and sens.baseline is not None
    calls = _recorded_calls(tiny_pipeline(KIND), recipe)
    base = {s.name: "int4" for s in sens.layers}
    assert sens.baseline == pytest.approx(_damage_of(sens, recipe, base, calls), rel=1e-6)
    by = {s.name: {o.format: o for o in s.options} for s in sens.layers}
    names = [s.name for s in sens.layers]
    for name in (names[0], names[len(names) // 2], names[-1]):
        assert by[name]["int4"].measured == sens.baseline
        for fmt in ("int8", "float"):
            direct = _damage_of(sens, recipe, {**base, name: fmt}, calls)
            assert by[name][fmt].measured == pytest.approx(direct, rel=BATCHED_REL), (name, fmt)
            assert by[name][fmt].damage == by[name][fmt].measured
    # the in-context numbers are not the single-layer ones: the base error is in every option
    assert min(o.measured for s in sens.layers for o in s.options if o.measured is not None) > 0
    # the plan's prediction: base less each raised layer's reduction
    from dq.mixed import MixedPlan

    allocation = allocate(sens, Budget("bits", 6.0))
    plan = MixedPlan(allocation, sens, Budget("bits", 6.0))
    raised = [n for n, f in allocation.items() if f != "int4"]
    assert raised
    expected = sens.baseline - sum(sens.baseline - by[n][allocation[n]].measured for n in raised)
    assert plan.predicted_damage() == pytest.approx(expected, rel=1e-9)
    assert "dB float" in plan.table().splitlines()[1]  # in context, float is a measured option too


def test_alone_sensitivity_equals_direct_single_layer():
    recipe = budget_recipe(budget=6.0, mixed={"num_prompts": 2, "steps": STEPS, "sensitivity": "measure",
                                               "measure": "alone"})
    pipe = tiny_pipeline(KIND)
    _, model = find_denoiser(pipe)
    sens = measure_sensitivity(pipe, model, recipe, prompts_for(KIND, 2), STEPS, call_kwargs(), keep_built=True)
    assert sens.method == "alone" and sens.baseline is None
    calls = _recorded_calls(tiny_pipeline(KIND), recipe)
    floats = {s.name: "float" for s in sens.layers}
    for s in sens.layers[:: max(1, len(sens.layers) // 3)]:
        for o in s.options:
            if o.format == "float":
                assert o.damage == 0.0
                continue
            direct = _damage_of(sens, recipe, {**floats, s.name: o.format}, calls)
            assert o.measured == pytest.approx(direct, rel=BATCHED_REL), (s.name, o.format)


def test_sensitivity_times_each_phase():
    recipe = budget_recipe(budget=6.0)
    pipe = tiny_pipeline(KIND)
    _, model = find_denoiser(pipe)
    sens = measure_sensitivity(pipe, model, recipe, prompts_for(KIND, 2), STEPS, call_kwargs())
    for phase in ("calibration", "record", "measure"):
        assert sens.seconds[f"{phase}_wall"] > 0 and sens.seconds[f"{phase}_cpu"] > 0
    # two formats (int4, int8), both static activations behind smoothing: one shared statistics
    # pass, then a range pass each
    assert sens.calibration_passes == 3


def test_default_candidate_formats_include_5_and_6_bits():
    # measured on the embedded pipeline (BENCHMARKS.md, mixed precision): +1.8 dB at uniform
    # w4a8's size over int4 / int8 only
    assert Recipe.from_dict({"base": "w4a8", "budget": 5}).mixed.weights == ["int4", "int5", "int6", "int8"]


def test_mixed_measure_option_validated():
    with pytest.raises(DQError, match="mixed.measure"):
        Recipe.from_dict({"budget": 5, "mixed": {"measure": "jointly"}})
    assert Recipe.from_dict({"budget": 5, "mixed": {"measure": "alone"}}).mixed.measure == "alone"


def test_second_round_measures_around_the_first_plan():
    """rounds 2: the measurement is taken again around the plan the first one solves; each option
    equals the direct error of that plan with the one layer moved."""
    recipe = budget_recipe(budget=6.0, mixed={"num_prompts": 2, "steps": STEPS, "sensitivity": "measure", "rounds": 2,
                                               "measure": "in-context"})
    pipe = tiny_pipeline(KIND)
    _, model = find_denoiser(pipe)
    sens = measure_sensitivity(pipe, model, recipe, prompts_for(KIND, 2), STEPS, call_kwargs(), keep_built=True)
    assert sens.round_one is not None and sens.centre is not None
    first = {s.name: {f: v for f, v in opts.items()} for s, opts in ((s, sens.round_one[s.name]) for s in sens.layers)}
    import copy

    one = copy.deepcopy(sens)  # the first round's numbers: the centre is their plan
    for s in one.layers:
        for o in s.options:
            o.damage = first[s.name][o.format] if first[s.name][o.format] is not None else math.inf
    one.baseline, one.centre = first[sens.layers[0].name]["int4"], None
    assert allocate(one, Budget("bits", 6.0)) == sens.centre
    assert any(f != "int4" for f in sens.centre.values())
    calls = _recorded_calls(tiny_pipeline(KIND), recipe)
    assert sens.baseline == pytest.approx(_damage_of(sens, recipe, sens.centre, calls), rel=1e-6)
    raised = next(n for n, f in sens.centre.items() if f != "int4")
    lowered = next(n for n, f in sens.centre.items() if f == "int4")
    by = {s.name: {o.format: o for o in s.options} for s in sens.layers}
    for name, fmt in ((raised, "int4"), (lowered, "int8"), (lowered, "float")):
        direct = _damage_of(sens, recipe, {**sens.centre, name: fmt}, calls)
        assert by[name][fmt].measured == pytest.approx(direct, rel=BATCHED_REL), (name, fmt)
    assert by[raised][sens.centre[raised]].measured == sens.baseline
    # every whole plan measured is remembered with its error: both centres, and the plan the last
    # round solves (one more replay), which `select_plan` compares with them
    tried = {json.dumps(p, sort_keys=True): e for p, e in sens.tried}
    lowest = {s.name: "int4" for s in sens.layers}
    assert tried[json.dumps(lowest, sort_keys=True)] == pytest.approx(first[sens.layers[0].name]["int4"])
    assert tried[json.dumps(sens.centre, sort_keys=True)] == sens.baseline
    final = allocate(sens, Budget("bits", 6.0))
    assert tried[json.dumps(final, sort_keys=True)] == pytest.approx(_damage_of(sens, recipe, final, calls), rel=1e-6)
    chosen = select_plan(sens, Budget("bits", 6.0))
    assert tried[json.dumps(chosen, sort_keys=True)] == min(e for p, e in sens.tried)


def _toy_sensitivity(damages, costs):
    """A Sensitivity over layers a, b, c of 8 weights: damages/bytes per layer (int4, int8), float
    32 bytes with no damage."""
    from dq.mixed import LayerOption, LayerSensitivity, Sensitivity

    layers = [LayerSensitivity(n, 8, [LayerOption("float", 32, damage=0.0), LayerOption("int4", c[0], damage=d[0]),
                                      LayerOption("int8", c[1], damage=d[1])])
              for n, d, c in zip("abc", damages, costs)]
    return Sensitivity(layers, 0, 0, 0, 0, "measure", method="in-context", low="int4")


def test_select_plan_prefers_a_measured_plan_with_a_lower_error():
    """The integer program's plan is kept unless a plan measured whole under the same budget has
    a lower measured error; plans over the budget, or unmeasured solutions, never replace it."""
    sens = _toy_sensitivity([(3, 1), (3, 2), (3, 0.5)], [(4, 8), (4, 8), (4, 8)])
    budget = Budget("bits", 7.0)  # 7 x 24 weights = 21 bytes: two of the three layers at int8, no float
    solved = allocate(sens, budget)
    assert solved == {"a": "int8", "b": "int4", "c": "int8"}
    assert select_plan(sens, budget) == solved  # nothing measured: the solution
    other = {"a": "int4", "b": "int8", "c": "int8"}
    sens.tried = [(other, 0.1)]
    assert select_plan(sens, budget) == solved  # the solution itself unmeasured: not compared
    sens.tried.append((solved, 0.2))
    assert select_plan(sens, budget) == other  # measured lower
    sens.tried[0] = (other, 0.3)
    assert select_plan(sens, budget) == solved  # measured higher
    over = {"a": "int8", "b": "int8", "c": "int8"}
    sens.tried.append((over, 0.0))
    assert plan_cost(sens, budget, over) > budget.capacity(sens)
    assert select_plan(sens, budget) == solved  # the lowest error, but over the budget
    # a memory budget (21 bytes): a measured plan using less than 99 % of the solved plan's bytes
    # does not replace it; one using as much does
    memory = Budget("memory", 21.0)
    assert allocate(sens, memory) == solved
    low = {"a": "int4", "b": "int4", "c": "int8"}
    sens.tried = [(solved, 0.2), (low, 0.1)]
    assert select_plan(sens, memory) == solved
    sens.tried.append((other, 0.05))
    assert select_plan(sens, memory) == other


def test_milp_never_chooses_an_infinite_damage():
    # the cheap option of item 0 is unmeasured (infinite): the solver pays for the other one
    picks = solve_allocation([[math.inf, 1.0], [0.0, 5.0]], [[1, 2], [1, 2]], 3)
    assert picks == [1, 0]
    with pytest.raises(DQError):
        solve_allocation([[math.inf, math.inf], [0.0, 5.0]], [[1, 2], [1, 2]], 4)


def test_batched_variants_equal_one_by_one_replays():
    """replay_variants runs variants sharing their first changed block as one batch: the same
    outputs as replaying each alone (to float rounding of another batch size), and the model is
    left as it was."""
    import copy

    from dq.mixed import Replayer, _replay

    pipe = tiny_pipeline(KIND)
    _, model = find_denoiser(pipe)
    calls = _recorded_calls(pipe, budget_recipe())
    layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    variants = []
    for name in (layers[0], layers[1], *[n for n in layers if n.startswith("transformer_blocks.1.")][:3], layers[-1]):
        changed = copy.deepcopy(model.get_submodule(name))
        with torch.no_grad():
            changed.weight.mul_(1.3)
        variants.append({name: changed})
    replayer = Replayer(model, calls.calls)
    batched = replayer.replay_variants(variants)
    assert replayer.batched is True  # the check against a one-by-one replay passed
    for variant, outs in zip(variants, batched):
        one = replayer.replay_one(variant)
        assert any(not torch.equal(o, r) for o, r in zip(one, calls.reference))
        for a, b in zip(one, outs):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    for ref, out in zip(calls.reference, _replay(model, calls.calls)):
        assert torch.equal(ref, out)


def test_options_no_plan_can_hold_are_not_measured():
    """Under a budget near the smallest plan, raising a large layer to float cannot fit: that
    option is left unmeasured (None), has infinite damage and is never chosen; the built layers
    are simulated again after measuring."""
    from dq.mixed import achievable

    probe = budget_recipe(mixed={"num_prompts": 1, "steps": 2, "sensitivity": "measure", "rounds": 1,
                                 "measure": "in-context"})  # no budget
    pipe = tiny_pipeline(KIND)
    _, model = find_denoiser(pipe)
    sens = measure_sensitivity(pipe, model, probe, prompts_for(KIND, 2), STEPS, call_kwargs(), keep_built=True)
    assert all(o.measured is not None for s in sens.layers for o in s.options)
    lo, _ = achievable(sens, "bits")
    tight = budget_recipe(budget=lo + 0.05, mixed={"num_prompts": 1, "steps": 2, "sensitivity": "measure", "rounds": 1,
                                                   "measure": "in-context"})
    pipe = tiny_pipeline(KIND)
    _, model = find_denoiser(pipe)
    sens = measure_sensitivity(pipe, model, tight, prompts_for(KIND, 2), STEPS, call_kwargs(), keep_built=True)
    skipped = [(s.name, o.format) for s in sens.layers for o in s.options if o.measured is None]
    assert skipped and all(f != "int4" for _, f in skipped)
    by = {s.name: {o.format: o for o in s.options} for s in sens.layers}
    assert all(by[n][f].damage == math.inf for n, f in skipped)
    allocation = allocate(sens, Budget("bits", lo + 0.05))
    assert all(allocation[n] != f for n, f in skipped)
    assert all(m.execution == "sim" for built in sens.built.values() for m in built.values())


