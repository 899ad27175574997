"""Outlier handling for each planned layer: which recipe components apply to it, which
calibration statistics they need, and what the quantized layer is then built from.

Per layer, in this order (math in `dq.quant.smooth`, `hadamard`, `lowrank`, `gptq`):

1. smoothing scales s from timestep-aggregated channel ranges (alpha fixed, or searched
   on an analytic output-error estimate from H = sum x x^T);
2. a randomized Hadamard rotation R of the input channels;
3. the input transform x -> (x / s) R and the weight W' = (W * s) R (exactly invariant);
4. the low-rank split W' = L1 L2 + R_w (L1 L2 stays in float as the layer's branch);
5. GPTQ rounding of R_w under H' = T^T H T (or round-to-nearest in `QuantModule`).

A component that cannot apply to a layer is skipped with one log line saying why.

The input transform stays in the quantized layer (`QuantModule.input_transform`) rather than
being folded into the producing layer (`arch.fuse_pairs`): each consumer gets its own
searched scales (to_q, to_k and to_v would need one shared set), and in the supported DiTs a
non-affine LayerNorm plus per-sample adaLN modulation sits between producer and consumer.
For real int8 kernels the per-channel multiply fuses into the activation quantizer's scale.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .calibrate.hooks import CalibTarget
from .calibrate.stats import StatsStore
from .calibrate.timesteps import TimestepGroups
from .errors import DQError
from .nn.transforms import InputTransform, LowRankBranch, conv_config
from .quant import primitives as P
from .quant.gptq import gptq_quantize
from .quant.hadamard import block_size_for, random_signs
from .quant.logquant import fake_log_quantize
from .quant.lowrank import check_rank, lowrank_split, svd_factors
from .quant.packing import WeightLayout
from .quant.smooth import (
    InputStats,
    aggregate_ranges,
    alpha_grid,
    output_error,
    search_alpha,
    smoothing_scales,
    weight_ranges,
)
from .quant.spec import QuantSpec
from .quant.transform import ChannelTransform
from .recipe import GPTQConfig, LowRankConfig, Recipe, RotateConfig, SmoothConfig

if TYPE_CHECKING:
    from .engine import LayerChoice

logger = logging.getLogger(__name__)


@dataclass
class LayerWork:
    """The components that apply to one planned layer (a `dq.engine.LayerChoice`)."""

    name: str
    module: nn.Module
    weight_spec: QuantSpec | None
    act_spec: QuantSpec | None
    channel_dim: int
    channels: int  # input channels
    kernel: int = 1  # kh * kw for a conv
    unfold: dict[str, Any] | None = None  # conv geometry for im2col second moments
    smooth: SmoothConfig | None = None
    rotate: RotateConfig | None = None
    rotate_block: int = 0
    lowrank: LowRankConfig | None = None
    gptq: GPTQConfig | None = None

    @property
    def has_transform(self) -> bool:
        return self.smooth is not None or self.rotate is not None

    @property
    def needs_channel_stats(self) -> bool:
        return self.smooth is not None

    @property
    def needs_moment(self) -> bool:
        return self.gptq is not None or (self.smooth is not None and self.smooth.alpha == "search")

    @property
    def static_act(self) -> bool:
        return self.act_spec is not None and not self.act_spec.dynamic


@dataclass
class PreparedLayer:
    """What `QuantModule.from_float` builds one layer from."""

    weight: torch.Tensor | None = None  # float weight to quantize (transformed, minus branch)
    weight_codes: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
    input_transform: InputTransform | None = None
    branch: LowRankBranch | None = None
    notes: dict[str, Any] = field(default_factory=dict)


def _skip(name: str, component: str, why: str) -> None:
    logger.info("%s: %s skipped: %s", name, component, why)


def plan_components(plan: Sequence[LayerChoice], recipe: Recipe) -> dict[str, LayerWork]:
    """One `LayerWork` per planned layer (see `dq.engine.plan_layers`)."""
    works: dict[str, LayerWork] = {}
    wanted = recipe.components()
    wanted.pop("attention", None)
    for choice in plan:
        module = choice.module
        conv = isinstance(module, nn.Conv2d)
        work = LayerWork(
            choice.name, module, choice.weight, choice.activation, choice.channel_dim,
            channels=module.in_channels if conv else module.in_features,
            kernel=module.weight[0, 0].numel() if conv else 1,
        )
        works[choice.name] = work
        selected = {key: cfg for key, cfg in wanted.items() if cfg.applies_to(choice.name)}
        if not selected:
            continue
        if conv and module.groups != 1:
            _skip(choice.name, "+".join(selected), f"grouped convolution (groups={module.groups})")
            continue
        if conv:
            geometry = conv_config(module)
            if isinstance(geometry["padding"], str):
                geometry = None
            work.unfold = geometry
        for key, cfg in selected.items():
            why = _why_not(work, key, cfg)
            if why:
                _skip(choice.name, key, why)
                continue
            setattr(work, key, cfg)
            if key == "rotate":
                work.rotate_block = block_size_for(work.channels, cfg.block_size)
    return works


def _why_not(work: LayerWork, key: str, cfg: Any) -> str | None:
    """Why component `key` cannot apply to the layer (None: it can). Raises on a bad rank."""
    weight_needed = key in ("lowrank", "gptq")
    if weight_needed and work.weight_spec is None:
        return "the layer's weights are not quantized"
    if key in ("gptq", "smooth") and isinstance(work.module, nn.Conv2d) and work.unfold is None:
        if key == "gptq" or cfg.alpha == "search":
            return "string padding: the conv's input patches (for H) cannot be formed"
    if key == "gptq" and work.weight_spec.log:
        return "GPTQ rounds to a uniform grid; the weight quantizer is log-domain"
    if key == "rotate":
        if cfg.block_size is not None and work.channels % cfg.block_size:
            return f"block size {cfg.block_size} does not divide the {work.channels} input channels"
        if cfg.block_size is None and block_size_for(work.channels) < 2:
            return f"{work.channels} input channels have no power-of-two factor to rotate in blocks of"
    if key == "lowrank":
        out, fan_in = work.module.weight.shape[0], work.channels * work.kernel
        check_rank(cfg.rank, (out, fan_in), work.name)
    return None


def calibration_targets(works: dict[str, LayerWork], *, first_pass: bool, prepared: dict[str, PreparedLayer] | None = None) -> list[CalibTarget]:
    """Hook targets for the statistics pass (first_pass: raw inputs, channel statistics and H
    where components need them, histograms for static layers without a transform) or for the
    range pass (histograms of the transformed inputs of static layers)."""
    targets = []
    for work in works.values():
        if first_pass:
            wanted_hist = work.static_act and not work.has_transform
            if not (work.needs_channel_stats or work.needs_moment or wanted_hist):
                continue
            targets.append(CalibTarget(
                work.name, work.module, work.channel_dim, histogram=wanted_hist,
                second_moment=work.needs_moment, unfold=work.unfold,
            ))
        elif work.static_act:
            transform = prepared[work.name].input_transform if prepared else None
            targets.append(CalibTarget(work.name, work.module, work.channel_dim, transform=transform))
    return targets


def weight_quantizer(spec: QuantSpec) -> Callable[[torch.Tensor], torch.Tensor]:
    """Round-to-nearest fake quantizer of a weight matrix view [out, C*k]."""
    if spec.log:
        return lambda w: fake_log_quantize(w, spec)
    return lambda w: P.fake_quantize(w, spec)


def _per_timestep(store: StatsStore, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per timestep (branches merged): channel absmax [T, C], mean square [T, C], counts [T]."""
    absmax, mean_sq, counts = [], [], []
    for t in store.timesteps():
        stats = store.select(name, [t])
        if stats is None:
            continue
        absmax.append(stats.absmax)
        mean_sq.append(stats.mean_sq)
        counts.append(stats.count)
    if not absmax:
        raise DQError(f"layer {name!r} saw no activations during calibration; is it used by the pipeline?")
    # the counts on the statistics' device (a GPU's, when calibrating there)
    return torch.stack(absmax), torch.stack(mean_sq), torch.tensor(counts, device=absmax[0].device)


def _input_stats(work: LayerWork, store: StatsStore, groups: TimestepGroups) -> InputStats:
    moment = store.moment(work.name)
    lo, hi, mean_sq, counts = [], [], [], []
    for members in groups.members:
        stats = store.select(work.name, members)
        if stats is not None:
            lo.append(stats.min)
            hi.append(stats.max)
            mean_sq.append(stats.mean_sq)
            counts.append(stats.count)
    return InputStats(
        h=moment.sum.to(work.module.weight.device, torch.float32), count=moment.count,
        lo=torch.stack(lo), hi=torch.stack(hi), mean_sq=torch.stack(mean_sq),
        group_counts=torch.tensor(counts, device=mean_sq[0].device), kernel=work.kernel,
    )


def prepare_layer(work: LayerWork, store: StatsStore | None, groups: TimestepGroups) -> PreparedLayer:
    """Transforms, low-rank branch and weight rounding of one layer."""
    prepared = PreparedLayer()
    if not (work.has_transform or work.lowrank or work.gptq):
        return prepared
    module = work.module
    w2 = module.weight.detach().float().reshape(module.weight.shape[0], -1)
    quant = weight_quantizer(work.weight_spec) if work.weight_spec is not None else None
    signs = None
    if work.rotate is not None:
        signs = random_signs(work.channels, work.rotate.seed ^ zlib.crc32(work.name.encode()))
        prepared.notes["rotate_block"] = work.rotate_block

    scale = None
    if work.smooth is not None:
        absmax, mean_sq, counts = _per_timestep(store, work.name)
        act_range = aggregate_ranges(absmax, mean_sq, counts, work.smooth.aggregate)
        w_range = weight_ranges(w2, work.kernel)
        alpha = work.smooth.alpha
        if alpha == "search":
            stats = _input_stats(work, store, groups)
            rank = work.lowrank.rank if work.lowrank is not None else None

            def error_of(a: float | None) -> float:
                s = None if a is None else smoothing_scales(act_range, w_range, a)
                transform = ChannelTransform(s, signs, work.rotate_block)
                lowrank = (lambda w: _product(svd_factors(w, rank))) if rank else None
                return output_error(w2, stats, transform, quant, work.act_spec, lowrank)

            alpha, errors = search_alpha(alpha_grid(work.smooth.grid), error_of)
            prepared.notes["smooth_errors"] = errors
        prepared.notes["alpha"] = alpha
        if alpha is not None:
            scale = smoothing_scales(act_range, w_range, alpha)

    transform = ChannelTransform(scale, signs, work.rotate_block)
    weight = transform.weight(w2, work.kernel)
    moment = store.moment(work.name) if store is not None else None
    h = transform.moment(moment.sum.to(w2.device), work.kernel) if moment is not None else None
    if work.lowrank is not None:
        up, down, weight = lowrank_split(weight, work.lowrank.rank, quant, work.lowrank.iters, h)
        geometry = conv_config(module) if isinstance(module, nn.Conv2d) else None
        branch = LowRankBranch(w2.shape[1], w2.shape[0], work.lowrank.rank, geometry)
        branch.down.copy_(down)
        branch.up.copy_(up)
        prepared.branch = branch.to(module.weight.device)
    if work.gptq is not None:
        # Group scales on the layout's two-level form (a per-channel base times small
        # integers) when it has one, so GPTQ-rounded layers keep the integer kernel.
        layout = WeightLayout.default(tuple(module.weight.shape), work.weight_spec)
        group_params = None
        if layout.two_level:
            base = layout.two_level_base(weight)

            def group_params(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
                scale, zero, _ = layout.two_level_params(rows, base)
                return scale, zero

        codes, s, z = gptq_quantize(
            weight, h, work.weight_spec, damp=work.gptq.damp, block_size=work.gptq.block_size,
            act_order=work.gptq.act_order, group_params=group_params,
        )
        prepared.weight_codes = (codes.reshape(module.weight.shape), s, z)
    if not transform.is_identity:
        prepared.input_transform = InputTransform.from_transform(transform, work.channels, work.channel_dim).to(module.weight.device)
    prepared.weight = weight.reshape(module.weight.shape).to(module.weight.device)
    return prepared


def _product(factors: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    up, down = factors
    return up @ down


def summarize(prepared: dict[str, PreparedLayer]) -> str:
    """One line about what the components did (chosen alphas, branches, rotations)."""
    alphas = [p.notes["alpha"] for p in prepared.values() if "alpha" in p.notes]
    parts = []
    if alphas:
        chosen = sorted(a for a in alphas if a is not None)
        median = f"{chosen[len(chosen) // 2]:.2f}" if chosen else "-"
        parts.append(f"smoothing on {len(chosen)}/{len(alphas)} layers (median alpha {median})")
    rotated = sum(p.input_transform is not None and p.input_transform.signs is not None for p in prepared.values())
    if rotated:
        parts.append(f"{rotated} layers rotated")
    branches = sum(p.branch is not None for p in prepared.values())
    if branches:
        parts.append(f"{branches} low-rank branches")
    gptq = sum(p.weight_codes is not None for p in prepared.values())
    if gptq:
        parts.append(f"{gptq} layers GPTQ-rounded")
    return "; ".join(parts)
