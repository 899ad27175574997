"""`quantize`: calibrate a pipeline's denoiser and swap its layers for quantized ones."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .arch import (
    arch_for,
    default_dynamic_inputs,
    default_keep,
    default_weight_only,
    quantizable_layers,
)
from .calibrate import distributed
from .calibrate.hooks import Calibrator, CalibTarget
from .calibrate.run import run_pipeline
from .calibrate.stats import StatsStore
from .calibrate.timesteps import TimestepGroups
from .errors import DQError
from .kernels import check_execution, set_execution
from .mixed import apply_allocation, resolve_budget
from .nn.attention import quantize_attention
from .nn.dtype_guard import install_dtype_guard
from .nn.layers import QuantConv2d, QuantLinear, QuantModule
from .nn.router import ROUTER_NAME, TimestepRouter, attach_router
from .outliers import (
    LayerWork,
    PreparedLayer,
    plan_components,
)
from .prompts import resolve_prompts
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


def dynamic_per_token(spec: QuantSpec) -> QuantSpec:
    """The same activation format with a dynamic per-token range (the architecture's
    `dynamic_inputs` layers, under a recipe with static ranges)."""
    return spec.replace(granularity="token", dynamic=True, range="minmax")


def plan_layers(model: nn.Module, recipe: Recipe) -> list[LayerChoice]:
    """Which layers get which quantizers, per the architecture rules and the recipe."""
    keep, weight_only, dynamic_inputs = set(), set(), set()
    if recipe.keep_defaults:
        spec = arch_for(model)
        keep, weight_only = default_keep(model, spec), default_weight_only(model, spec)
        dynamic_inputs = default_dynamic_inputs(model, spec, recipe.weight.bits if recipe.weight is not None else None)
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
        elif name in dynamic_inputs and act is not None and not act.dynamic:
            act = dynamic_per_token(act)
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
    plan = apply_allocation(model, plan_layers(model, recipe), recipe)  # mixed precision (dq.mixed)
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
    distributed.check_agreement(distributed.calibration_facts(model, recipe, prompts, num_inference_steps, call_kwargs, targets))
    with Calibrator(pipe, model, targets, recipe.histogram_bins) as calibrator:
        run_pipeline(
            pipe, prompts, num_inference_steps=num_inference_steps, batch_size=recipe.calib_batch_size,
            seed=recipe.calib_seed, call_kwargs=call_kwargs,
            on_batch=lambda n: setattr(calibrator, "prompt_batch", n),
        )
    return calibrator.store  # merged across processes by the Calibration it feeds (dq.model)


def activation_ranges(store: StatsStore, layer: str, groups: TimestepGroups, spec: QuantSpec) -> list[tuple[float, float]]:
    """One static (lo, hi) per timestep group, from the merged histograms of the group's steps."""
    ranges = []
    for members in groups.members:
        stats = store.select(layer, members)
        if stats is None or stats.hist is None:
            raise DQError(f"layer {layer!r} saw no activations during calibration; is it used by the pipeline?")
        ranges.append(range_from_histogram(stats.hist, 2.0**stats.hist_exp, spec))
    return ranges


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
    from .state import mark_quantized

    router = TimestepRouter(groups.tensor()).to(next(model.parameters()).device)
    with torch.no_grad():
        replacements = build_layers(plan, store, groups, router, prepared)
    check_execution(replacements, recipe.execution)  # refuses (DQError) before anything changes
    attach_router(model, router)  # may refuse (no timestep argument): before any swap
    swap_modules(model, replacements)
    if recipe.attention is not None:
        quantize_attention(model, recipe.attention)
    mark_quantized(model, recipe, source)  # set_execution reads weight_only_int8_activations from it
    set_execution(model, recipe.execution)
    install_dtype_guard(model)  # its float dtype is the one it was quantized in
    attach_quantizer(model)  # `save_pretrained` writes the quantization_config (dq.backend)
    reapply_group_offloading(model)
    return replacements


def group_offloaded(model: nn.Module) -> bool:
    """Whether diffusers' group offloading (`enable_group_offload`) is on for `model`."""
    try:
        from diffusers.hooks.group_offloading import _is_group_offload_enabled
    except ImportError:
        return False
    return bool(_is_group_offload_enabled(model))


def reapply_group_offloading(model: nn.Module) -> None:
    """Group offloading keeps references to the layers it moves (leaf level: a hook on each
    layer; with streams: its tensors): after the swap it must be laid again over the quantized
    layers, as diffusers does after fusing QKV or loading LoRA."""
    if not group_offloaded(model):
        return
    from diffusers.hooks.group_offloading import _maybe_remove_and_reapply_group_offloading

    _maybe_remove_and_reapply_group_offloading(model)
    logger.info("group offloading re-applied over the quantized layers")


def check_offload(model: nn.Module) -> None:
    """Refuse, before anything changes, a denoiser whose weights are not in memory: accelerate's
    sequential CPU offload or a disk offload keep them on the meta device and load them per
    forward, so there is nothing to quantize. (Model CPU offload moves the whole model and
    group offloading is laid again over the quantized layers: both work.)"""
    meta = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise DQError(
            f"{type(model).__name__}'s weights are offloaded to the meta device ({len(meta)} tensors, e.g. "
            f"{meta[0]!r}: accelerate's sequential CPU offload or a disk offload), so there is nothing to "
            "quantize: call dq.quantize before pipe.enable_sequential_cpu_offload() (or after "
            "pipe.remove_all_hooks()); enable_model_cpu_offload() and enable_group_offload() work as they are"
        )


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

    This is the model-level API (`dq.prepare` -> run -> `dq.convert`, `dq.model`) with the
    pipeline's own sampler as the loop: the recipe's outlier-handling components (smoothing,
    rotation, low-rank branch, GPTQ, attention; see `dq.outliers`) are prepared per layer from
    the calibration statistics, in at most two passes over the calibration prompts.

    The pipeline is only modified once calibration has succeeded: any failure leaves
    it as it was.
    """
    from .model import apply_calibration

    apply_calibration(calibrate_pipeline(pipe, recipe, calib_prompts=calib_prompts,
                                         num_inference_steps=num_inference_steps, **call_kwargs))
    return pipe


def calibrate_pipeline(
    pipe,
    recipe: str | Recipe | dict[str, Any] = "w8a8",
    *,
    calib_prompts: Sequence[Any] | str | None = None,
    num_inference_steps: int | None = None,
    keep_stats: bool = False,
    **call_kwargs: Any,
):
    """Calibrate the pipeline's denoiser with its own sampler, without quantizing it: the
    complete `dq.model.Calibration` (its plan, statistics and prepared layers), which
    `apply_calibration` turns into the quantized model and `save_stats` writes to a file
    (``dq calibrate``). Same arguments as `quantize`."""
    from .model import Calibration

    recipe = Recipe.from_any(recipe)
    if num_inference_steps is not None and (
        isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1
    ):
        raise DQError(
            f"num_inference_steps must be a positive integer, got {num_inference_steps!r}; "
            f"pass None for the recipe's calib_steps ({recipe.calib_steps})"
        )
    _, model = find_denoiser(pipe)
    check_offload(model)
    steps = recipe.calib_steps if num_inference_steps is None else num_inference_steps
    recipe = resolve_budget(pipe, model, recipe, calib_prompts, steps, call_kwargs)  # a budget -> recipe.allocation
    return run_passes(pipe, Calibration(model, recipe, pipe=pipe, keep_stats=keep_stats), calib_prompts, steps, call_kwargs)


def run_passes(pipe, cal, calib_prompts, steps: int, call_kwargs: dict[str, Any]):
    """Feed a `dq.model.Calibration` every pass it still needs by running the pipeline's own
    sampler over the calibration prompts (resolved once, only if a pass is needed); returns it."""
    prompts = None
    while not cal.ready:
        prompts = prompts or resolve_prompts(pipe, calib_prompts, cal.recipe)
        cal.feed(calibrate(pipe, cal.model, cal.plan, prompts, targets=cal.targets, recipe=cal.recipe,
                           num_inference_steps=steps, call_kwargs=call_kwargs))
    return cal
