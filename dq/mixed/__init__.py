"""Mixed precision: each layer's weight format (or float) under a bit or memory budget.

A recipe with `budget` (average weight bits) or `memory` (bytes of the denoiser) is resolved
by `resolve_budget` into `recipe.allocation` ({layer: "int4" | "int5" | "int6" | "int8" | "fp8" | "float"}),
which `apply_allocation` turns into the layer plan. The steps:

1. Scope: every Linear/Conv2d the recipe could quantize, the layers the architecture keeps in
   float by default included (they are candidates). Layers the recipe's own `keep` or
   `overrides` match are fixed: the recipe always wins.
2. Each candidate format is built for every layer, exactly as `dq.quantize` builds it (the
   recipe's smoothing / GPTQ / low-rank; the raw-input statistics pass over the calibration
   prompts runs once for all formats, `dq.model.shared_first_pass`, and the range pass of each
   format's transformed inputs once per format), which gives each
   layer's real storage per format (packed codes, scales, zero points, low-rank branch,
   smoothing scales, activation ranges: every persistent tensor of the layer except its bias,
   which is the same in every format).
3. Sensitivity of (layer, format):
   - "trajectory" (`MixedConfig.measure`, the default; `dq.mixed.trajectory`): the relative
     squared error of the pipeline's final latents, sampled closed loop (the calibration steps,
     the pipeline's guidance, `trajectory_prompts` calibration prompts) with ONLY that layer in
     the lowest format, against the float model's; every other format of the layer scaled
     from it by the ratio of the layer's own output errors on recorded calls. The recorded
     calls below see each step's error once, on the float model's inputs; the images see it
     carried through the sampler and amplified by classifier-free guidance, and errors that
     repeat at every step (the text path: cross-attention keys and values, the caption
     projection) add up coherently. One sampling run per layer.
   Or measured on recorded calibration calls as the relative squared error of the denoiser
   output against the float model's, sum ||y_q - y||^2 / sum ||y||^2 (`relative_error`):
   - "in-context" (leave-one-in): every layer in scope at
     the smallest format (the centre), the override layers in theirs; for each layer and each
     other option (higher formats, float) the error with that layer ALONE moved to it. A
     layer's value is measured amid every other layer's error, which a single layer
     quantized in a float model does not see. With a budget and `rounds` > 1, the plan solved from
     these numbers becomes the centre and every layer's other options are measured again
     around it (raising or lowering one layer), `rounds` times at most.
   - "alone": the error with ONLY that layer quantized, every other layer in float.
   Each replay re-runs only from the changed layer's block (`Replayer`: top-level blocks
   that ran before it return their outputs cached from the centre's replay), and the
   replays sharing that block run as one batch (`Replayer.replay_variants`: each variant's
   layer on its own rows; checked once against a one-by-one replay). The built layers run in
   the recipe's execution mode while measured (real kernels where they exist: the numerics
   the quantized model runs, and faster), and under a budget an option no plan can hold
   (raising the layer to it costs more than the whole budget's slack over the smallest plan)
   is not measured (infinite damage: never chosen; `infeasible`).
   Or "estimate": the analytic error from the layer inputs' second moment H
   (E||dW x||^2 = tr(dW H dW^T) / N plus the activation rounding noise, see
   `dq.quant.smooth.output_error`, relative to the layer's output energy tr(W H W^T) / N).
   "auto" estimates, measures a sample of layers, and measures everything when the Spearman
   rank correlation of the two on the sample (`estimate_pairs`) is below 0.8.
4. Allocation: minimize the summed damage subject to the budget, an integer program
   (`scipy.optimize.milp`, zero optimality gap; `solve_allocation`). Damages are assumed
   additive over layers (as in MixDQ): single-layer damages from zero, in-context ones as
   reductions from the centre's error (the plan's `predicted_damage`).
5. Selection (in context, with a budget): every whole plan whose error was measured is kept
   with it (`Sensitivity.tried`: each round's centre, and the plan the last round solves,
   measured with one more replay); the allocation is the solved plan unless one of those plans
   under the same budget measured a lower error, then that one (`select_plan`). A solved plan
   that changes many layers at once can do worse than the sum of its single-layer moves.

Average weight bits (what `budget` bounds and the report prints): 8 x the storage bytes of
every layer in scope, divided by the number of weights of those layers; a layer left in float
counts its float bytes (32 bits per fp32 weight). Layers kept by the recipe's `keep` are left
out of the average (counted in a memory budget). The activation format is FIXED to the recipe's
(weight-only layers stay weight-only), as a uniform recipe of the layer's weight format gives it:
the architecture's per-token `dynamic_inputs` layers included (`activation_rule`). So a
weight-bits budget cannot drift a layer to a slower activation format; only float, which costs
its full float bits, is slower.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from ..recipe import Recipe
from .budget import (
    FLOAT,
    Budget,
    Scope,
    achievable,
    activation_rule,
    allocate,
    allocation_scope,
    apply_allocation,
    budget_of,
    check_budget,
    float_bytes,
    layer_bytes,
    precheck,
    solve_allocation,
    weight_count,
    weight_formats,
)
from .replay import (
    Calls,
    NotBatchable,
    Replayer,
    _call,
    _clone,
    _replay,
    batch_size,
    record,
    relative_error,
    replay_units,
)
from .report import LayerReport, MixedPlan, format_of, layer_report, plot_allocation
from .sampled import candidate_plans, sample_plans, select_sampled, trust_region_plan
from .sensitivity import (
    RANK_THRESHOLD,
    LayerOption,
    LayerSensitivity,
    Sensitivity,
    estimate_damage,
    estimate_pairs,
    infeasible,
    install_allocation,
    measure_around,
    measure_plan,
    measure_sensitivity,
    plan_cost,
    select_plan,
    spearman,
)

__all__ = [
    "FLOAT", "RANK_THRESHOLD", "Budget", "Calls", "NotBatchable", "batch_size", "LayerOption", "LayerReport", "LayerSensitivity", "MixedPlan",
    "Replayer", "Scope", "Sensitivity", "achievable", "activation_rule", "allocate", "allocation_scope", "apply_allocation",
    "budget_of", "check_budget", "estimate_damage", "estimate_pairs", "float_bytes", "format_of",
    "infeasible", "install_allocation", "layer_bytes", "measure_around", "layer_report", "measure_plan", "measure_sensitivity", "plan_cost", "select_plan", "plot_allocation", "precheck",
    "record", "relative_error", "replay_units", "resolve_budget", "solve_allocation", "spearman", "weight_count",
    "weight_formats", "_call", "_clone", "_replay", "candidate_plans", "sample_plans", "select_sampled", "trust_region_plan",
]

logger = logging.getLogger(__name__)


# -- the entry point used by dq.quantize --------------------------------------------------------
def resolve_budget(pipe, model: nn.Module, recipe: Recipe, calib_prompts, steps: int, call_kwargs: dict[str, Any]) -> Recipe:
    """The recipe with its budget solved into `allocation` (the recipe as is without a budget, or
    with an allocation already: it is followed, not re-solved). Keeps the `MixedPlan` on the model
    (`model._dq_mixed`) for `layer_report`, and logs the per-layer report."""
    budget = budget_of(recipe)
    if budget is None or recipe.allocation is not None:
        return recipe
    precheck(model, recipe, budget)
    # looked up in this package's namespace (tests patch dq.mixed.measure_sensitivity)
    sampled = recipe.mixed.select == "sampled"  # the recipe allows it only with an in-context measurement
    sens = measure_sensitivity(pipe, model, recipe, calib_prompts, steps, call_kwargs, **({"keep_built": True} if sampled else {}))
    record = None
    if sampled and sens.mode == "measure":
        from ..prompts import resolve_prompts

        prompts = resolve_prompts(pipe, calib_prompts, recipe)[: recipe.mixed.select_prompts]
        allocation, record = select_sampled(pipe, model, sens, recipe, budget, prompts, steps, call_kwargs)
    else:
        allocation = select_plan(sens, budget)
    if sampled:
        sens.built, sens.fixed_layers, sens.calls = {}, {}, None  # the built copies are not needed any more
    plan = MixedPlan(allocation, sens, budget, selection=record)
    model._dq_mixed = plan
    logger.info("%s", plan.table())
    return Recipe.from_dict({**recipe.to_dict(), "allocation": allocation})
