"""Pure quantizer functions on tensors.

Every function works on a *row view*: a 2-D tensor [rows, cols] in which each row
shares one scale (and zero point). `row_view` builds that view for each
granularity, so the same range-selection and rounding code serves weights and
activations, per tensor, per channel, per group and per token.
"""

from __future__ import annotations

import math

import torch

from ..errors import DQError
from .spec import FP_FORMATS, QuantSpec

_FP4_LEVELS = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_MSE_GRID = 24  # candidate clipping ratios searched by range="mse"
_MSE_LOWEST = 0.3  # smallest clipping ratio tried


def row_view(x: torch.Tensor, granularity: str, group_size: int = 64, *, channel_dim: int = -1) -> torch.Tensor:
    """Reshape `x` so that every row is one quantization group.

    Weights ([out, in, ...]): "channel" gives one row per output channel, "group" one
    row per `group_size` consecutive inputs of an output channel. Activations: "token"
    gives one row per token, the channel axis being `channel_dim`. "tensor": one row.
    """
    if granularity == "tensor":
        return x.reshape(1, -1)
    if granularity == "channel":
        return x.reshape(x.shape[0], -1)
    if granularity == "group":
        w = x.reshape(x.shape[0], -1)
        if w.shape[1] % group_size:
            raise DQError(
                f"group size {group_size} does not divide the {w.shape[1]} inputs per channel; "
                "choose a group_size that divides it or use granularity 'channel'"
            )
        return w.reshape(-1, group_size)
    if granularity == "token":
        return x.movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim])
    raise DQError(f"unknown granularity {granularity!r}")


def _minmax(rows: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    if spec.symmetric:
        amax = rows.abs().amax(dim=1, keepdim=True)
        return -amax, amax
    lo = rows.amin(dim=1, keepdim=True).clamp(max=0)
    hi = rows.amax(dim=1, keepdim=True).clamp(min=0)
    return lo, hi


def _percentile(rows: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    n = rows.shape[1]
    k = max(1, min(n, math.ceil(n * spec.percentile / 100.0)))
    if spec.symmetric:
        amax = rows.abs().kthvalue(k, dim=1, keepdim=True).values
        return -amax, amax
    lo_k = max(1, n - k + 1)
    lo = rows.kthvalue(lo_k, dim=1, keepdim=True).values.clamp(max=0)
    hi = rows.kthvalue(k, dim=1, keepdim=True).values.clamp(min=0)
    return lo, hi


def _mse(rows: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    lo0, hi0 = _minmax(rows, spec)
    best_err = torch.full_like(lo0, float("inf"))
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for ratio in torch.linspace(1.0, _MSE_LOWEST, _MSE_GRID).tolist():
        lo, hi = lo0 * ratio, hi0 * ratio
        err = fake_quantize_rows(rows, lo, hi, spec).sub_(rows).square_().sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    return best_lo, best_hi


def select_range(rows: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipping range (lo, hi), each [rows, 1], chosen by `spec.range`."""
    rows = rows.float()
    if spec.range == "minmax":
        return _minmax(rows, spec)
    if spec.range == "percentile":
        return _percentile(rows, spec)
    return _mse(rows, spec)


def qparams(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point (None when symmetric) for a clipping range."""
    eps = torch.finfo(torch.float32).tiny
    if spec.kind != "int":
        amax = torch.maximum(hi.abs(), lo.abs())
        return (amax / FP_FORMATS[spec.kind][0]).clamp(min=eps), None
    if spec.symmetric:
        amax = torch.maximum(hi.abs(), lo.abs())
        return (amax / spec.qmax).clamp(min=eps), None
    scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp(min=eps)
    zero = (spec.qmin - lo / scale).round().clamp(spec.qmin, spec.qmax)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Integer codes (as float) for integer kinds, grid values for float kinds."""
    if spec.kind != "int":
        return fp_quantize(x / scale, spec.kind)
    # round(x * (1 / scale)) + zero: the order of torch's (fbgemm's) int8 quantizer, which the
    # real kernels use (`dq.kernels.int8`), so that real and simulated codes agree exactly.
    q = (x * torch.reciprocal(scale)).round()
    if zero is not None:
        q = q + zero
    return q.clamp(spec.qmin, spec.qmax)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    if zero is not None:
        codes = codes - zero
    return codes * scale


def fp_quantize(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Round `x` (already divided by its scale) to the nearest value of a float format."""
    fmax = FP_FORMATS[kind][0]
    x = x.clamp(-fmax, fmax)
    if kind == "fp8_e4m3":
        return x.to(torch.float8_e4m3fn).to(x.dtype)
    if kind == "fp8_e5m2":
        return x.to(torch.float8_e5m2).to(x.dtype)
    levels = _FP4_LEVELS.to(device=x.device, dtype=x.dtype)
    mids = (levels[1:] + levels[:-1]) / 2
    mag = levels[torch.bucketize(x.abs(), mids)]
    return torch.sign(x) * mag


def fake_quantize_rows(rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    scale, zero = qparams(lo, hi, spec)
    if spec.kind == "int" and not (torch.is_grad_enabled() and rows.requires_grad):
        # `dequantize(quantize(...))` in the same order, in place in one new tensor: the same
        # values without five temporaries (1.7-6x faster per token at DiT widths on a CPU,
        # where each fresh tensor costs page faults)
        q = torch.mul(rows, torch.reciprocal(scale)).round_()
        if zero is None:
            return q.clamp_(spec.qmin, spec.qmax).mul_(scale)
        return q.add_(zero).clamp_(spec.qmin, spec.qmax).sub_(zero).mul_(scale)
    return dequantize(quantize(rows, scale, zero, spec), scale, zero)


def fake_quantize(
    x: torch.Tensor, spec: QuantSpec, *, channel_dim: int = -1
) -> torch.Tensor:
    """Quantize and dequantize `x` with ranges chosen from `x` itself (weights, dynamic activations)."""
    rows = row_view(x.float(), spec.granularity, spec.group_size, channel_dim=channel_dim)
    lo, hi = select_range(rows, spec)
    out = fake_quantize_rows(rows, lo, hi, spec)
    if spec.granularity == "token":
        moved = x.movedim(channel_dim, -1).shape
        return out.reshape(moved).movedim(-1, channel_dim).to(x.dtype)
    return out.reshape(x.shape).to(x.dtype)


def range_from_histogram(
    hist: torch.Tensor, limit: float, spec: QuantSpec
) -> tuple[float, float]:
    """Static clipping range from a histogram of values over [-limit, limit].

    minmax: the outermost non-empty bins; percentile: the tails holding
    (100 - percentile)% of the mass; mse: the shrink of the minmax range that
    minimizes the expected squared error (clipping error of the bins outside,
    uniform rounding noise step^2/12 inside).
    """
    hist = hist.double().cpu()  # a few thousand bins: the search is host work (a GPU's histogram too)
    nbins = hist.numel()
    total = hist.sum()
    if total <= 0:
        raise DQError("empty histogram: the layer saw no activations during calibration")
    edges = torch.linspace(-limit, limit, nbins + 1, dtype=torch.float64)
    centers = (edges[1:] + edges[:-1]) / 2
    nonzero = torch.nonzero(hist).flatten()
    lo, hi = float(edges[nonzero[0]]), float(edges[nonzero[-1] + 1])
    if spec.range == "percentile":
        tail = total * (1 - spec.percentile / 100.0)
        cdf = hist.cumsum(0)
        lo = float(edges[int(torch.searchsorted(cdf, tail / (1 if not spec.symmetric else 2)))])
        hi = float(edges[int(torch.searchsorted(cdf, total - tail / (1 if not spec.symmetric else 2))) + 1])
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if spec.symmetric:
        hi = max(abs(lo), hi)
        lo = -hi
    if spec.range != "mse":
        return lo, hi
    levels = 2**spec.bits - 1 if spec.kind == "int" else 2 ** (spec.bits + 1)
    best = (math.inf, lo, hi)
    for ratio in torch.linspace(1.0, _MSE_LOWEST, _MSE_GRID * 2).tolist():
        c_lo, c_hi = lo * ratio, hi * ratio
        step = (c_hi - c_lo) / levels
        clipped = (centers - centers.clamp(c_lo, c_hi)).pow(2)
        inside = (centers >= c_lo) & (centers <= c_hi)
        err = float((hist * torch.where(inside, torch.full_like(centers, step**2 / 12), clipped)).sum())
        if err < best[0]:
            best = (err, c_lo, c_hi)
    return best[1], best[2]


def quantize_tensor(
    x: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize a weight-like tensor for storage: (codes, scale, zero).

    Integer codes are int8 (any width <= 8 fits, see `QuantSpec.qmin`); float
    kinds are stored in float8 (fp4 e2m1 values are exact in e4m3). `scale` and
    `zero` have one entry per row of `row_view(x, spec.granularity)`.
    """
    rows = row_view(x.detach().float(), spec.granularity, spec.group_size)
    lo, hi = select_range(rows, spec)
    scale, zero = qparams(lo, hi, spec)
    codes = quantize(rows, scale, zero, spec)
    if spec.kind == "int":
        codes = codes.to(torch.int8)
    else:
        codes = codes.to(torch.float8_e5m2 if spec.kind == "fp8_e5m2" else torch.float8_e4m3fn)
    return codes.reshape(x.shape), scale, zero


def dequantize_tensor(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    rows = row_view(codes.to(torch.float32), spec.granularity, spec.group_size)
    return dequantize(rows, scale, zero).reshape(codes.shape).to(dtype)
