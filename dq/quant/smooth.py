"""SmoothQuant-style smoothing for diffusion models, as pure tensor functions.

Per input channel c, s_c = a_c^alpha / w_c^(1 - alpha) moves activation range into the
weight (x / s, W * s; see `transform.ChannelTransform`), where a_c is the channel's
activation range and w_c its weight range. Diffusion activations change with the
timestep, so a_c aggregates per-timestep statistics (`aggregate_ranges`):

- "max":  the largest range over all steps (SmoothQuant, ViDiT-Q's static variant);
- "mean": the mean over steps of each step's range (DiTAS-style temporal aggregation);
- "salience": a mean weighted by each step's peak range, so steps with the strongest
  outliers dominate (after PTQ4DiT's salience balancing);
- "rms":  the root mean square over all tokens of all steps (a second-moment view).

The migration strength alpha is chosen per layer by minimising an analytic estimate of
the layer's output error on the calibration data (`output_error`), computed from
bounded, mergeable statistics only: the input second moment H = sum x x^T and
per-channel ranges, never raw activations:

    E ||x W^T - Q(x') Q(W')^T||^2  ~  tr(dW H' dW^T)  +  N sum_c v_c ||Q(W')[:, c]||^2

the weight-rounding term exact under H' = T^T H T, the activation term modelling
rounding noise as independent per input column c with variance v_c (the step predicted
from the transformed statistics, see `activation_noise`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import DQError
from .spec import FP_FORMATS, QuantSpec
from .transform import ChannelTransform

AGGREGATIONS = ("max", "mean", "salience", "rms")
_EPS = 1e-8


def aggregate_ranges(
    absmax: torch.Tensor, mean_sq: torch.Tensor | None = None, counts: torch.Tensor | None = None,
    method: str = "max",
) -> torch.Tensor:
    """One activation range per channel from per-timestep statistics.

    absmax, mean_sq: [T, C] per-timestep channel absmax and mean square; counts: [T] tokens.
    """
    if method not in AGGREGATIONS:
        raise DQError(f"unknown smoothing aggregation {method!r}; choose one of {list(AGGREGATIONS)}")
    absmax = absmax.float()
    if method == "max":
        return absmax.amax(0)
    if method == "mean":
        return absmax.mean(0)
    if method == "salience":
        weight = absmax.amax(1)
        weight = weight / weight.sum().clamp(min=_EPS)
        return (weight[:, None] * absmax).sum(0)
    if mean_sq is None or counts is None:
        raise DQError("the 'rms' smoothing aggregation needs per-channel mean squares and token counts")
    counts = counts.float().reshape(-1, 1)
    return ((mean_sq.float() * counts).sum(0) / counts.sum().clamp(min=1)).sqrt()


def weight_ranges(w2: torch.Tensor, kernel: int = 1) -> torch.Tensor:
    """Per input channel absmax of a weight's matrix view [out, C*kernel]."""
    return w2.abs().reshape(w2.shape[0], -1, kernel).amax(dim=(0, 2))


def smoothing_scales(act: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = act^alpha / weight^(1-alpha), normalised to geometric mean 1.

    Channels with no activation or no weight get s = 1 (nothing to balance)."""
    if not 0.0 <= alpha <= 1.0:
        raise DQError(f"smoothing alpha must be in [0, 1], got {alpha}")
    act, weight = act.double(), weight.double()
    live = (act > _EPS) & (weight > _EPS)
    s = torch.ones_like(act)
    if live.any():
        s_live = act[live].pow(alpha) / weight[live].pow(1.0 - alpha)
        s_live = s_live / s_live.log().mean().exp()
        s[live] = s_live.clamp(1e-6, 1e6)
    return s.float()


@dataclass
class InputStats:
    """What the error model knows about a layer's input (before any transform).

    h: sum x x^T over all calibration tokens [C*k, C*k]; count: number of tokens in h.
    lo / hi / mean_sq: per timestep group, per channel min / max / mean square [G, C];
    group_counts: tokens [G].
    """

    h: torch.Tensor
    count: int
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None
    mean_sq: torch.Tensor | None = None
    group_counts: torch.Tensor | None = None
    kernel: int = 1


def _levels(spec: QuantSpec) -> float:
    return float(2**spec.bits - 1)


def activation_noise(spec: QuantSpec, stats: InputStats, transform: ChannelTransform, m2_cols: torch.Tensor) -> torch.Tensor:
    """Rounding-noise variance of each (transformed) input column [C*k] under `spec`.

    m2_cols: E[x'^2] of each transformed input column (diag(H') / N).
    Uniform rounding with step D adds noise of variance D^2 / 12, but never more than the
    value itself (values under half a step round to zero): v_c = min(D^2 / 12, E[x_c'^2]).
    The step follows from a predicted range: without rotation, a static per-tensor range is
    exactly the transformed per-channel min/max (per timestep group); a per-token range is
    modelled as max(max_c E[x_c^2], 2 ln(C) mean_c E[x_c^2]) (one dominant channel, or the
    maximum of C comparable ones). A rotation mixes channels into near-Gaussian ones, whose
    static range follows the Gaussian tail sqrt(2 ln n) sigma.
    """
    m2 = m2_cols.reshape(-1, stats.kernel).mean(1)  # per channel
    channels = m2.numel()
    if spec.kind != "int":
        mantissa = FP_FORMATS[spec.kind][2]
        return m2_cols * 4.0 ** (-mantissa) / 12.0
    rotated = transform.signs is not None
    inv = None if transform.scale is None else 1.0 / transform.scale.to(m2)
    levels = _levels(spec)
    if not spec.dynamic:
        if not rotated and stats.lo is not None:
            lo, hi = stats.lo.to(m2), stats.hi.to(m2)
            if inv is not None:
                lo, hi = lo * inv, hi * inv
            lo_g, hi_g = lo.amin(1).clamp(max=0), hi.amax(1).clamp(min=0)
            span = 2 * torch.maximum(lo_g.abs(), hi_g) if spec.symmetric else hi_g - lo_g
            counts = stats.group_counts.to(m2)
            step_sq = ((span / levels) ** 2 * counts).sum() / counts.sum().clamp(min=1)
        else:
            n = max(stats.count, 2) * channels
            amax = math.sqrt(2 * math.log(n)) * m2.max().sqrt()
            step_sq = (2 * amax / levels) ** 2
    else:
        peak_sq = torch.maximum(m2.max(), 2 * math.log(max(channels, 2)) * m2.mean())
        ratio = 1.0
        if not rotated and not spec.symmetric and stats.lo is not None:
            lo, hi = stats.lo.to(m2).amin(0), stats.hi.to(m2).amax(0)
            if inv is not None:
                lo, hi = lo * inv, hi * inv
            peak = torch.maximum(lo.abs(), hi.abs()).max().clamp(min=_EPS)
            ratio = float((hi.max().clamp(min=0) - lo.min().clamp(max=0)) / (2 * peak))
        step_sq = (2 * ratio) ** 2 * peak_sq / levels**2
    return torch.minimum(step_sq / 12, m2_cols)


def output_error(
    w2: torch.Tensor,
    stats: InputStats,
    transform: ChannelTransform,
    weight_quant: Callable[[torch.Tensor], torch.Tensor] | None,
    act_spec: QuantSpec | None,
    lowrank: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Estimated sum over calibration tokens of the squared output error of one layer.

    w2: float weight matrix view [out, C*k]; weight_quant: fake-quantizer of a weight
    matrix view (None: weights stay in float); lowrank: maps W' to the part kept in a
    float side branch (its residual is quantized).

    The weight term is evaluated in the original basis, tr(E H E^T) with E = dW' R^T D^-1
    (the error mapped back through the transform), so H is never transformed per candidate.
    """
    k = stats.kernel
    h = stats.h.float()
    w_t = transform.weight(w2.float(), k)
    residual = w_t - lowrank(w_t) if lowrank is not None else w_t
    q = weight_quant(residual) if weight_quant is not None else residual
    e = transform.unrotate_flat(residual - q, k)
    inv = transform.inverse_scale_columns(k, e)
    if inv is not None:
        e = e * inv
    error = float((e @ h).mul_(e).sum(dtype=torch.float64))
    if act_spec is not None:
        m2_cols = transform.moment_diagonal(h, k).clamp(min=0) / max(stats.count, 1)
        noise = activation_noise(act_spec, stats, transform, m2_cols)
        error += stats.count * float((noise * q.pow(2).sum(0)).double().sum())
    return error


def alpha_grid(points: int) -> list[float]:
    """points + 1 evenly spaced alphas in [0, 1]."""
    return [i / points for i in range(points + 1)]


def search_alpha(
    alphas: Sequence[float], error_of: Callable[[float | None], float], *, refine: bool = True
) -> tuple[float | None, dict[str, float]]:
    """The alpha (or None: no smoothing) with the smallest `error_of`, and every error tried.

    refine: after the grid, also try the two midpoints next to the best grid alpha (half
    the grid step, for about 2 extra evaluations instead of a grid twice as fine)."""
    errors: dict[str, float] = {"none": error_of(None)}
    best, best_err = None, errors["none"]

    def consider(alpha: float) -> None:
        nonlocal best, best_err
        key = f"{alpha:.4g}"
        if key in errors:
            return
        errors[key] = err = error_of(alpha)
        if err < best_err:
            best, best_err = alpha, err

    for alpha in alphas:
        consider(alpha)
    if refine and best is not None and len(alphas) > 1:
        step = min(abs(b - a) for a, b in zip(alphas[:-1], alphas[1:]))
        for alpha in (best - step / 2, best + step / 2):
            if 0.0 <= alpha <= 1.0:
                consider(alpha)
    return best, errors
