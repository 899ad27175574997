"""Mixed precision, `mixed.select: sampled` (dq.mixed.sampled): candidate plans scored closed loop
by sampling the pipeline with each installed, the closest to full precision chosen."""

import math

import pytest
import torch
from test_mixed import KIND, STEPS, budget_recipe, call_kwargs

import dq
from dq.engine import find_denoiser
from dq.errors import DQError
from dq.mixed import (
    Budget,
    LayerOption,
    LayerSensitivity,
    Sensitivity,
    allocate,
    candidate_plans,
    measure_sensitivity,
    plan_cost,
    sample_plans,
    trust_region_plan,
)
from dq.mixed.sampled import _final_latents
from dq.nn import QuantModule
from dq.recipe import Recipe
from dq.testing.tiny import prompts_for, tiny_pipeline


def recipe(**mixed):
    return budget_recipe({"measure": "in-context", **mixed}, budget=6.0)  # sampled selection chooses among its plans


def toy(damages, costs):
    layers = [LayerSensitivity(n, 8, [LayerOption("float", 32, damage=0.0), LayerOption("int4", c[0], damage=d[0]),
                                      LayerOption("int8", c[1], damage=d[1])])
              for n, d, c in zip("abcd", damages, costs)]
    return Sensitivity(layers, 0, 0, 0, 0, "measure", method="in-context", low="int4")


def test_candidates_are_unique_and_within_the_budget():
    sens = toy([(3, 1), (3, 2), (3, 0.5), (3, 2.5)], [(4, 8)] * 4)
    budget = Budget("bits", 6.0)  # 24 bytes for 32 weights: two layers at int8
    sens.centre = {n: "int4" for n in "abcd"}
    solved = allocate(sens, budget)
    over = {n: "int8" for n in "abcd"}
    sens.tried = [(dict(sens.centre), 1.0), (over, 0.1), (dict(solved), 0.5)]
    found = candidate_plans(sens, budget)
    assert found["solved"] == solved
    plans = list(found.values())
    assert len(plans) == len({tuple(sorted(p.items())) for p in plans})  # each once
    assert over not in plans  # over the budget
    assert sens.centre in plans
    assert all(plan_cost(sens, budget, p) <= budget.capacity(sens) for p in plans)
    # K = 2 changes at most two layers from the centre, and is the best such plan
    k2 = trust_region_plan(sens, budget, 2)
    assert sum(k2[n] != sens.centre[n] for n in k2) <= 2


def test_select_option_validated():
    with pytest.raises(DQError, match="mixed.select"):
        recipe(select="best")
    with pytest.raises(DQError, match="select_prompts"):
        recipe(select="sampled", select_prompts=0)
    assert recipe(select="sampled").mixed.select == "sampled"
    assert Recipe.from_dict(recipe(select="sampled", select_prompts=3).to_dict()).mixed.select_prompts == 3


def test_sample_plans_scores_closed_loop_and_leaves_the_model_float():
    """All-float scores infinite dB (the float pipeline's own latents), int8 everywhere closer than
    int4 everywhere; afterwards the denoiser holds its float layers and samples as before."""
    pipe = tiny_pipeline(KIND)
    _, model = find_denoiser(pipe)
    r = recipe()
    prompts = prompts_for(KIND, 2)
    before = _final_latents(pipe, prompts, 5, STEPS, call_kwargs())
    sens = measure_sensitivity(pipe, model, r, prompts, STEPS, call_kwargs(), keep_built=True)
    names = [s.name for s in sens.layers]
    plans = {"float": {n: "float" for n in names}, "int8": {n: "int8" for n in names}, "int4": {n: "int4" for n in names}}
    scores = sample_plans(pipe, model, sens, r, plans, prompts, STEPS, call_kwargs())
    assert math.isinf(scores["float"]) or scores["float"] > 100  # the override layers stay quantized
    assert scores["int8"] > scores["int4"] > 0
    assert not any(isinstance(m, QuantModule) for m in model.modules())
    assert torch.equal(_final_latents(pipe, prompts, 5, STEPS, call_kwargs()), before)


def test_quantize_with_sampled_selection_installs_the_best_sampled_candidate():
    pipe = tiny_pipeline(KIND)
    dq.quantize(pipe, recipe(select="sampled", select_prompts=2, rounds=2), calib_prompts=prompts_for(KIND, 2),
                num_inference_steps=STEPS, **call_kwargs())
    _, model = find_denoiser(pipe)
    plan = model._dq_mixed
    record = plan.selection
    assert record is not None and len(record["candidates"]) >= 2
    best = max(record["candidates"], key=lambda c: c["sampled_db"])
    assert record["chosen"] == best["plan"]
    assert model._dq_recipe.allocation == best["allocation"] == plan.allocation
    assert plan.average_bits() <= 6.0
    assert "sampled on 2 prompts" in plan.summary()
    assert not plan.sensitivity.built  # the built copies were let go
