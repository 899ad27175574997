"""`quantize`: calibrate a pipeline's denoiser and swap its layers for quantized ones."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .arch import arch_for, default_keep, default_weight_only, quantizable_layers
from .calibrate.hooks import Calibrator, CalibTarget
from .calibrate.run import run_pipeline
from .calibrate.stats import StatsStore
from .calibrate.timesteps import TimestepGroups
from .errors import DQError
from .kernels import check_execution, set_execution
from .nn.attention import quantize_attention
from .nn.dtype_guard import install_dtype_guard, install_pipeline_guard
from .nn.layers import QuantConv2d, QuantLinear, QuantModule
from .nn.router import ROUTER_NAME, TimestepRouter, attach_router
from .outliers import (
    LayerWork,
    PreparedLayer,
    calibration_targets,
    plan_components,
    prepare_layer,
    summarize,
)
from .prompts import resolve_prompts
from .provenance import describe_source
from .quant.primitives import range_from_histogram
from .quant.spec import QuantSpec
from .recipe import Recipe

logger = logging.getLogger(__name__)

DENOISER_NAMES = ("transformer", "unet")


def find_denoiser(pipe) -> tuple[str, nn.Module]:
    """(attribute name, module) of the pipeline's UNet or transformer."""
    for name in DENOISER_NAMES:
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            return name, module
    raise DQError(
        f"{type(pipe).__name__} has no `transformer` or `unet` component to quantize; dq quantizes "
        "diffusers pipelines with a UNet or a DiT denoiser"
    )


def is_quantized(model: nn.Module) -> bool:
    return hasattr(model, ROUTER_NAME) or any(isinstance(m, QuantModule) for m in model.modules())


@dataclass
class LayerChoice:
    name: str
    module: nn.Module
    weight: QuantSpec | None
    activation: QuantSpec | None

    @property
    def channel_dim(self) -> int:
        return 1 if isinstance(self.module, nn.Conv2d) else -1


def _fits(spec: QuantSpec | None, module: nn.Module, name: str, what: str) -> QuantSpec | None:
    """Adapt a spec that cannot apply to this layer, with one log line saying why."""
    if spec is None or spec.granularity != "group" or what != "weight":
        return spec
    fan_in = module.weight[0].numel()
    if fan_in % spec.group_size == 0:
        return spec
    logger.info("%s: %d inputs not divisible by group size %d; using per-channel weight scales", name, fan_in, spec.group_size)
    return spec.replace(granularity="channel")


def plan_layers(model: nn.Module, recipe: Recipe) -> list[LayerChoice]:
    """Which layers get which quantizers, per the architecture rules and the recipe."""
    keep, weight_only = set(), set()
    if recipe.keep_defaults:
        spec = arch_for(model)
        keep, weight_only = default_keep(model, spec), default_weight_only(model, spec)
    keep_patterns = [re.compile(p) for p in recipe.keep]
    layers = list(quantizable_layers(model))
    # a pattern that matches nothing is a warning, not an error: recipes are shared between models
    for where, pattern in [("keep", p) for p in recipe.keep] + [("overrides", o.pattern) for o in recipe.overrides]:
        if not any(re.search(pattern, name) for name, _ in layers):
            example = f" (layer names look like {layers[0][0]!r})" if layers else ""
            logger.warning("recipe %s pattern %r matches no layer of %s%s; it has no effect: fix or remove it",
                           where, pattern, type(model).__name__, example)
    plan = []
    for name, module in layers:
        if name in keep or any(p.search(name) for p in keep_patterns):
            continue
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            logger.info("%s: padding_mode=%r is not supported; kept in full precision", name, module.padding_mode)
            continue
        weight, act, kept = recipe.weight, recipe.activation, False
        if name in weight_only:
            act = None  # an override below may still give it an activation format
        for override in recipe.overrides:
            if re.search(override.pattern, name):
                kept = override.keep
                weight = override.weight if override.weight is not None else weight
                act = override.activation if override.activation is not None else act
        if kept or (weight is None and act is None):
            continue
        plan.append(LayerChoice(name, module, _fits(weight, module, name, "weight"), act))
    return plan


def plan_model(model: nn.Module, recipe: Recipe, keep_rules: str = "the recipe's keep/overrides") -> tuple[list[LayerChoice], dict[str, LayerWork]]:
    """The layer plan and each layer's outlier-handling work; refuses a model that is already
    quantized or that has nothing left to quantize (`keep_rules` names what to check then)."""
    if is_quantized(model):
        raise DQError(f"{type(model).__name__} is already quantized; load the full-precision model again")
    plan = plan_layers(model, recipe)
    if not plan:
        raise DQError(
            f"{type(model).__name__} has no quantizable Linear/Conv2d layer left after the keep rules; "
            f"check {keep_rules} or set keep_defaults: false"
        )
    return plan, plan_components(plan, recipe)


def calibrate(
    pipe,
    model: nn.Module,
    plan: Sequence[LayerChoice],
    prompts: Sequence[Any],
    *,
    recipe: Recipe,
    num_inference_steps: int,
    call_kwargs: dict[str, Any],
    targets: Sequence[CalibTarget] | None = None,
) -> StatsStore:
    """Run the pipeline with hooks on the planned layers (or on explicit `targets`: which
    statistics of which layers, see `CalibTarget`); return their statistics."""
    if targets is None:
        targets = [CalibTarget(c.name, c.module, c.channel_dim) for c in plan if c.activation is not None and not c.activation.dynamic]
    with Calibrator(pipe, model, targets, recipe.histogram_bins) as calibrator:
        run_pipeline(
            pipe, prompts, num_inference_steps=num_inference_steps, batch_size=recipe.calib_batch_size,
            seed=recipe.calib_seed, call_kwargs=call_kwargs,
            on_batch=lambda n: setattr(calibrator, "prompt_batch", n),
        )
    store = calibrator.store
    logger.info(
        "calibrated %d layers over %d timesteps (branches: %s); statistics: %.1f MB",
        len(store.layers()), len(store.timesteps()), ", ".join(store.branches()), store.nbytes() / 2**20,
    )
    return store


def activation_ranges(store: StatsStore, layer: str, groups: TimestepGroups, spec: QuantSpec) -> list[tuple[float, float]]:
    """One static (lo, hi) per timestep group, from the merged histograms of the group's steps."""
    ranges = []
    for members in groups.members:
        stats = store.select(layer, members)
        if stats is None or stats.hist is None:
            raise DQError(f"layer {layer!r} saw no activations during calibration; is it used by the pipeline?")
        ranges.append(range_from_histogram(stats.hist, 2.0**stats.hist_exp, spec))
    return ranges


def calibrate_and_prepare(
    pipe,
    model: nn.Module,
    plan: Sequence[LayerChoice],
    works: dict[str, LayerWork],
    recipe: Recipe,
    calib_prompts: Sequence[Any] | str | None,
    num_inference_steps: int,
    call_kwargs: dict[str, Any],
) -> tuple[StatsStore | None, TimestepGroups, dict[str, PreparedLayer]]:
    """Collect what the layers need and prepare their outlier handling, in at most two passes.

    Pass 1 runs when a component needs statistics of the raw inputs (smoothing: channel
    ranges; the alpha search and GPTQ: H = sum x x^T); it also takes the histograms of static
    layers whose input stays untransformed. The layers are then prepared (`prepare_layer`).
    Pass 2 takes the histograms of static layers that are still missing them, of their
    *transformed* inputs (what the layer will quantize). Returns the statistics for the
    activation ranges, the timestep groups and the prepared layers.
    """
    run = dict(recipe=recipe, num_inference_steps=num_inference_steps, call_kwargs=call_kwargs)
    prompts = None
    store, groups = None, TimestepGroups([], [[]])
    first = calibration_targets(works, first_pass=True)
    if any(w.needs_channel_stats or w.needs_moment for w in works.values()):
        prompts = resolve_prompts(pipe, calib_prompts, recipe)
        store = calibrate(pipe, model, plan, prompts, targets=first, **run)
        groups = TimestepGroups.from_timesteps(store.timesteps(), recipe.timestep_groups)
    with torch.no_grad():
        prepared = {name: prepare_layer(work, store, groups) for name, work in works.items()}
    done = set()
    if store is not None:
        store.moments.clear()  # H is only needed to prepare the layers
        done = {t.name for t in first if t.histogram}
        store.entries = {k: v for k, v in store.entries.items() if k[0] in done}
    second = [t for t in calibration_targets(works, first_pass=False, prepared=prepared) if t.name not in done]
    if second:
        prompts = prompts or resolve_prompts(pipe, calib_prompts, recipe)
        ranged = calibrate(pipe, model, plan, prompts, targets=second, **run)
        store = ranged if store is None else store.merge_(ranged)
        groups = TimestepGroups.from_timesteps(store.timesteps(), recipe.timestep_groups)
    if not any(w.static_act for w in works.values()):
        groups = TimestepGroups([], [[]])  # no static ranges to look up by timestep
    return store, groups, prepared


def build_layers(
    plan: Sequence[LayerChoice], store: StatsStore | None, groups: TimestepGroups, router: TimestepRouter,
    prepared: dict[str, PreparedLayer] | None = None,
) -> dict[str, QuantModule]:
    new = {}
    for choice in plan:
        ranges = None
        if choice.activation is not None and not choice.activation.dynamic:
            ranges = activation_ranges(store, choice.name, groups, choice.activation)
        cls = QuantConv2d if isinstance(choice.module, nn.Conv2d) else QuantLinear
        prep = (prepared or {}).get(choice.name) or PreparedLayer()
        new[choice.name] = cls.from_float(
            choice.module, choice.weight, choice.activation, ranges, router,
            weight=prep.weight, weight_codes=prep.weight_codes, input_transform=prep.input_transform, branch=prep.branch,
        )
    return new


def swap_modules(model: nn.Module, replacements: dict[str, nn.Module]) -> None:
    for name, module in replacements.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module)


def apply_quantization(
    model: nn.Module,
    plan: Sequence[LayerChoice],
    store: StatsStore | None,
    groups: TimestepGroups,
    prepared: dict[str, PreparedLayer],
    recipe: Recipe,
    source: dict[str, Any] | None,
) -> dict[str, QuantModule]:
    """Build the planned quantized layers and swap them into `model` with their router, the
    recipe's attention quantization, execution mode and dtype guard. Shared by `quantize` and
    quantization at `from_pretrained` (`dq.backend`). Nothing changes if a check refuses."""
    from .backend import attach_quantizer

    router = TimestepRouter(groups.tensor()).to(next(model.parameters()).device)
    with torch.no_grad():
        replacements = build_layers(plan, store, groups, router, prepared)
    check_execution(replacements, recipe.execution)  # refuses (DQError) before anything changes
    attach_router(model, router)  # may refuse (no timestep argument): before any swap
    swap_modules(model, replacements)
    if recipe.attention is not None:
        quantize_attention(model, recipe.attention)
    model._dq_recipe = recipe  # set_execution reads weight_only_int8_activations from it
    set_execution(model, recipe.execution)
    model._dq_source = source
    install_dtype_guard(model)  # its float dtype is the one it was quantized in
    attach_quantizer(model)  # `save_pretrained` writes the quantization_config (dq.backend)
    return replacements


def quantize(
    pipe,
    recipe: str | Recipe | dict[str, Any] = "w8a8",
    *,
    calib_prompts: Sequence[Any] | str | None = None,
    num_inference_steps: int | None = None,
    **call_kwargs: Any,
):
    """Quantize the pipeline's denoiser in place and return the same pipeline.

    recipe: a preset name (`dq.recipes()`), a `Recipe`, a mapping or a YAML/JSON path.
    calib_prompts: prompts (or class labels) to calibrate on, or the name/path of a
        prompt file; default: the recipe's prompt set (per-model defaults apply).
    num_inference_steps: sampler steps per calibration prompt (default: the recipe's).
    call_kwargs: passed to every calibration call of the pipeline (guidance_scale,
        height, width, ...).

    The recipe's outlier-handling components (smoothing, rotation, low-rank branch, GPTQ,
    attention; see `dq.outliers`) are prepared per layer from the calibration statistics
    (`calibrate_and_prepare`: one or two passes over the calibration prompts).

    The pipeline is only modified once calibration has succeeded: any failure leaves
    it as it was.
    """
    recipe = Recipe.from_any(recipe)
    if num_inference_steps is not None and (
        isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1
    ):
        raise DQError(
            f"num_inference_steps must be a positive integer, got {num_inference_steps!r}; "
            f"pass None for the recipe's calib_steps ({recipe.calib_steps})"
        )
    _, model = find_denoiser(pipe)
    plan, works = plan_model(model, recipe)
    source = describe_source(model)  # hash of the float weights, before any layer is swapped
    store, groups, prepared = calibrate_and_prepare(
        pipe, model, plan, works, recipe, calib_prompts,
        recipe.calib_steps if num_inference_steps is None else num_inference_steps, call_kwargs
    )
    apply_quantization(model, plan, store, groups, prepared, recipe, source)
    install_pipeline_guard(pipe)
    summary = summarize(prepared)
    if summary:
        logger.info("outlier handling: %s", summary)
    logger.info("quantized %d layers of %s with recipe %s (%d timestep groups)", len(plan), type(model).__name__, recipe.name, len(groups))
    return pipe
