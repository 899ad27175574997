"""Choosing among whole plans by sampling: `MixedConfig.select: "sampled"`.

The proxy that `select_plan` compares (the denoiser's relative output error on a few recorded
calls of the float model's trajectory) is open loop: every call starts from the float model's
input, so an error that a plan's own trajectory would carry along, or damp, is not seen. On the
embedded pipeline it ranked whole plans no better than chance against the images (Spearman -0.15
over 9 candidates at 5 bits, `benchmarks/mixed_select.py`) and a plan fitted harder to it lost
3.2 dB (run M in BENCHMARKS.md).

"sampled" scores a small set of candidate plans closed loop instead: each plan installed in the
denoiser (from the layers the sensitivity pass built: no calibration), the pipeline samples
`select_prompts` calibration prompts with fixed seeds, and the plan's score is the relative
squared error of its final latents against the float pipeline's latents of the same seeds
(reported in dB, higher is better). The candidates are the plans the rounds measured whole (each
round's centre, the last solved plan) and trust-region re-solves around the last centre that
change at most K = 2, 4, 8 or 16 layers (`trust_region_plan`), all within the budget (a memory
budget: using at least 99 % of the solved plan's bytes). It costs one pipeline run of
`select_prompts` prompts per candidate (about 9 candidates), and uses no evaluation prompt.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import DQError
from ..recipe import Recipe
from .budget import FLOAT, Budget, allocate, solve_allocation
from .sensitivity import Sensitivity, _Execution, _Routed, built_layers, within_budget

logger = logging.getLogger(__name__)

TRUST_K = (2, 4, 8, 16)
SELECT_SEED = 20_000  # seeds of the selection samples: apart from calibration's and evaluation's


def trust_region_plan(sens: Sensitivity, budget: Budget, k: int) -> dict[str, str]:
    """The plan minimizing the summed damage under `budget` with at most `k` layers changed from
    `sens.centre` (the plan the damages were measured around)."""
    if sens.centre is None:
        raise DQError("trust_region_plan needs an in-context sensitivity measured around a centre")
    around = [[o.format for o in s.options].index(sens.centre[s.name]) for s in sens.layers]
    picks = solve_allocation([[o.damage for o in s.options] for s in sens.layers], budget.costs(sens),
                             budget.capacity(sens), around=around, max_changes=k)
    return {s.name: s.options[j].format for s, j in zip(sens.layers, picks)}


def candidate_plans(sens: Sensitivity, budget: Budget) -> dict[str, dict[str, str]]:
    """{label: plan}: the solved plan, the trust-region re-solves (`TRUST_K`), and the plans the
    rounds measured whole (`Sensitivity.tried`), each once, each within `budget`."""
    solved = allocate(sens, budget)
    competes = within_budget(sens, budget, solved)
    found: dict[str, dict[str, str]] = {"solved": solved}
    if sens.centre is not None:
        for k in TRUST_K:
            try:
                found[f"K={k}"] = trust_region_plan(sens, budget, k)
            except DQError:  # no plan within k changes meets the budget
                continue
    for i, (plan, _error) in enumerate(sens.tried):
        found[f"centre {i}"] = plan
    out: dict[str, dict[str, str]] = {}
    for label, plan in found.items():
        if plan not in out.values() and competes(plan):
            out[label] = plan
    return out


def _final_latents(pipe, prompts: Sequence[Any], seed: int, steps: int, call_kwargs: dict[str, Any]) -> torch.Tensor:
    """The pipeline's final latents (its denoised output before decoding where it allows that),
    prompt i seeded `seed` + i."""
    from ..calibrate.run import _fast_output, prompt_generators, prompt_kwargs

    device = getattr(pipe, "_execution_device", None) or torch.device("cpu")
    generators = prompt_generators(device, seed, range(len(prompts)))
    old_bar = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    pipe.set_progress_bar_config(disable=True)
    try:
        with torch.inference_mode():
            out = pipe(**prompt_kwargs(pipe, list(prompts)), num_inference_steps=steps, generator=generators,
                       **{**_fast_output(pipe), **call_kwargs})
    finally:
        pipe.set_progress_bar_config(**old_bar)
    images = out[0] if isinstance(out, tuple) else getattr(out, "images", out)
    if not isinstance(images, torch.Tensor):
        images = torch.as_tensor(images)
    return images.detach().float().cpu()


def _db(reference: torch.Tensor, x: torch.Tensor) -> float:
    """10 log10(||ref||^2 / ||x - ref||^2): the closeness of `x` to the float output, in dB."""
    err = float((x - reference).pow(2).sum())
    return math.inf if err == 0 else 10 * math.log10(float(reference.pow(2).sum()) / err)


def sample_plans(pipe, model: nn.Module, sens: Sensitivity, recipe: Recipe, plans: dict[str, dict[str, str]],
                 prompts: Sequence[Any], steps: int, call_kwargs: dict[str, Any]) -> dict[str, float]:
    """{label: dB}: each plan installed in `model` (from the layers `measure_sensitivity(...,
    keep_built=True)` built), the pipeline run on `prompts` (seeds `SELECT_SEED` + i), its final
    latents compared with the float model's. The model is left as it was."""
    from ..engine import swap_modules
    from ..nn.layers import QuantModule

    if sens.router is None or not sens.built:
        raise DQError("sampled plan selection needs measure_sensitivity(..., keep_built=True)")
    reference = _final_latents(pipe, prompts, SELECT_SEED, steps, call_kwargs)  # the model is still float here
    names = {n for plan in plans.values() for n in plan} | set(sens.fixed_layers)
    originals = {n: model.get_submodule(n) for n in names}
    every_built = built_layers(sens)
    own = [(m, getattr(m, "_router", None)) for m in every_built]
    for m in every_built:
        m.bind_router(sens.router)  # same boundaries in every format (checked when built)
    scores: dict[str, float] = {}
    try:
        with _Execution(every_built, recipe.execution, bool(recipe.weight_only_int8_activations)), _Routed(model, sens.router):
            swap_modules(model, dict(sens.fixed_layers))
            for label, plan in plans.items():
                swap_modules(model, {n: originals[n] if f == FLOAT else sens.built[f][n] for n, f in plan.items()})
                scores[label] = _db(reference, _final_latents(pipe, prompts, SELECT_SEED, steps, call_kwargs))
    finally:
        swap_modules(model, originals)
        for m, r in own:
            if isinstance(m, QuantModule):
                m.bind_router(r)
    return scores


def select_sampled(pipe, model: nn.Module, sens: Sensitivity, recipe: Recipe, budget: Budget,
                   prompts: Sequence[Any], steps: int, call_kwargs: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """(plan, record): the candidate (`candidate_plans`) whose sampled latents are closest to
    full precision; the record holds every candidate's score and proxy error for the report."""
    plans = candidate_plans(sens, budget)
    scores = sample_plans(pipe, model, sens, recipe, plans, prompts, steps, call_kwargs)
    proxy = {label: next((e for p, e in sens.tried if p == plan), None) for label, plan in plans.items()}
    best = max(scores, key=lambda label: scores[label])
    logger.info("mixed precision: sampled %d candidate plans on %d prompts x %d steps; %s",
                len(plans), len(prompts), steps,
                ", ".join(f"{k} {v:.2f} dB{' (chosen)' if k == best else ''}" for k, v in scores.items()))
    record = {"chosen": best, "prompts": len(prompts), "steps": steps,
              "candidates": [{"plan": k, "sampled_db": scores[k], "proxy_error": proxy[k], "allocation": dict(plans[k])}
                             for k in plans]}
    return dict(plans[best]), record
