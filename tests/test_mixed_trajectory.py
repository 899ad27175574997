"""Mixed precision: sensitivity measured on the sampling trajectory (`mixed.measure: trajectory`,
the default): each layer alone in the lowest format, closed loop on the final latents; the other
formats scaled by the layer's own output error on the recorded calls."""

import pytest
import torch
from mixed_common import KIND, STEPS, budget_recipe, call_kwargs

from dq.engine import find_denoiser
from dq.errors import DQError
from dq.mixed import Budget, allocate, install_allocation, measure_sensitivity, record
from dq.mixed.sampled import _final_latents
from dq.mixed.trajectory import scale_by_format
from dq.recipe import Recipe
from dq.testing.tiny import prompts_for, tiny_pipeline


def _recipe(**mixed):
    # literal numerics: no timing-dependent float-input path, so a direct run reproduces them
    return budget_recipe(budget=6.0, mixed={"trajectory_prompts": 1, **mixed}, float_activations_where_faster=False)


def _installed(sens, recipe, allocation):
    pipe = tiny_pipeline(KIND)
    install_allocation(pipe, sens, Recipe.from_dict({**recipe.to_dict(), "allocation": allocation}))
    return pipe


def _closed_loop(pipe, recipe):
    prompts = prompts_for(KIND, 2)[: recipe.mixed.trajectory_prompts]
    return _final_latents(pipe, prompts, recipe.calib_seed, STEPS, call_kwargs())


def _output_error(sens, recipe, name, fmt, calls):
    """sum ||Q(x) - W x||^2 over the recorded calls, the layer alone quantized (so its inputs
    are the float model's), W x from the float layer on the same inputs."""
    pipe = _installed(sens, recipe, {**{s.name: "float" for s in sens.layers}, name: fmt})
    model = find_denoiser(pipe)[1]
    float_layer = find_denoiser(tiny_pipeline(KIND))[1].get_submodule(name)
    total = []

    def hook(_m, args, out):
        total.append(float((out.double() - float_layer(*args).double()).pow(2).sum()))

    handle = model.get_submodule(name).register_forward_hook(hook)
    with torch.no_grad():
        for args, kwargs in calls.calls:
            model(*args, **kwargs)
    handle.remove()
    return sum(total)


def test_trajectory_sensitivity_equals_direct_closed_loop_runs():
    recipe = _recipe()
    assert recipe.mixed.measure == "trajectory"
    pipe = tiny_pipeline(KIND)
    _, model = find_denoiser(pipe)
    sens = measure_sensitivity(pipe, model, recipe, prompts_for(KIND, 2), STEPS, call_kwargs(), keep_built=True)
    assert sens.method == "trajectory" and sens.low == "int4" and sens.baseline is None
    reference = _closed_loop(tiny_pipeline(KIND), recipe)
    fresh = tiny_pipeline(KIND)
    calls = record(fresh, find_denoiser(fresh)[1], prompts_for(KIND, 2)[: recipe.mixed.num_prompts], recipe,
                   recipe.mixed.steps, call_kwargs())[0]
    assert calls.calls
    floats = {s.name: "float" for s in sens.layers}
    names = [s.name for s in sens.layers]
    for name in (names[0], names[len(names) // 2], names[-1]):
        by = {o.format: o for s in sens.layers if s.name == name for o in s.options}
        # the lowest format: the closed-loop error of the final latents, that layer alone quantized
        latents = _closed_loop(_installed(sens, recipe, {**floats, name: "int4"}), recipe)
        direct = float((latents.double() - reference.double()).pow(2).sum() / reference.double().pow(2).sum())
        assert direct > 0
        assert by["int4"].measured == pytest.approx(direct, rel=1e-4), name
        # int8: scaled by the layer's own output-error ratio on the recorded calls
        ratio = _output_error(sens, recipe, name, "int8", calls) / _output_error(sens, recipe, name, "int4", calls)
        assert 0 < ratio < 1  # 8-bit weights: a smaller output error than 4-bit
        assert by["int8"].measured == pytest.approx(by["int4"].measured * ratio, rel=1e-4), name
        assert by["float"].damage == 0.0
    # the damages drive the allocation like any other: a plan within the budget
    allocation = allocate(sens, Budget("bits", 6.0))
    assert set(allocation) == set(names) and set(allocation.values()) <= {"int4", "int8", "float"}


def test_trajectory_leaves_the_model_and_the_built_layers_as_they_were():
    recipe = _recipe()
    pipe = tiny_pipeline(KIND)
    _, model = find_denoiser(pipe)
    before = {n: type(m) for n, m in model.named_modules()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    sens = measure_sensitivity(pipe, model, recipe, prompts_for(KIND, 2), STEPS, call_kwargs(), keep_built=True)
    assert {n: type(m) for n, m in model.named_modules()} == before  # every swapped layer put back, no router left
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())
    # each built layer routed by its own format's router again (what install_allocation copies)
    routers = {id(m._router) for built in sens.built.values() for m in built.values()}
    assert len(routers) == len(sens.built)


def test_scale_by_format():
    closed = {"a": 2.0, "b": 3.0}
    outputs = {"a": {"int4": 4.0, "int8": 1.0}, "b": {"int4": 0.0, "int8": 0.0}}
    # b: exact on the recorded calls, not closed loop: no ratio to take, the closed-loop value
    assert scale_by_format(closed, outputs, "int4") == {"a": {"int4": 2.0, "int8": 0.5}, "b": {"int4": 3.0, "int8": 3.0}}


def test_trajectory_is_the_default_and_its_prompts_are_validated():
    assert Recipe.from_dict({"budget": 5}).mixed.measure == "trajectory"
    assert Recipe.from_dict({"budget": 5}).mixed.trajectory_prompts == 2
    with pytest.raises(DQError, match="mixed.trajectory_prompts"):
        Recipe.from_dict({"budget": 5, "mixed": {"trajectory_prompts": 0}})
    with pytest.raises(DQError, match="mixed.measure"):
        Recipe.from_dict({"budget": 5, "mixed": {"measure": "closed"}})
    # sampled selection chooses among the in-context rounds' plans: asked for with another
    # measurement, a clear error instead of silently choosing nothing
    with pytest.raises(DQError, match="mixed.measure: in-context"):
        Recipe.from_dict({"budget": 5, "mixed": {"select": "sampled"}})
    assert Recipe.from_dict({"budget": 5, "mixed": {"select": "sampled", "measure": "in-context"}}).mixed.select == "sampled"
