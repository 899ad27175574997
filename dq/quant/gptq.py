"""GPTQ: error-compensating weight rounding from the input second moment, as pure functions.

Columns of W [out, n] are rounded one at a time; the rounding error of column j is
spread over the columns not yet rounded, weighted by the inverse of H = sum x x^T, so
that the layer's output error tr(dW H dW^T) (not the weight error) is what rounding
minimises. The inverse is taken through an upper Cholesky factor of H^-1 after adding
`damp` x mean(diag H) to the diagonal; columns are processed in blocks with lazy
updates. Group quantization computes each group's scale when the group is reached
(from the already error-updated weights), or, with `act_order` (columns in order of
decreasing H diagonal), from the original weights before any update ("static groups"),
because then a group's columns are no longer visited together.

Scales and codes follow `primitives.row_view` / `quantize_tensor` exactly, so the
result stores like any other quantized weight.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ..errors import DQError
from . import primitives as P
from .spec import QuantSpec

logger = logging.getLogger(__name__)


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp mean(diag H) I)^-1, raising damping if needed."""
    n = h.shape[0]
    mean_diag = float(h.diagonal().mean())
    eye = torch.eye(n, dtype=h.dtype, device=h.device)
    for attempt in range(6):
        lam = damp * (10**attempt) * max(mean_diag, 1e-12)
        chol, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            if attempt:
                logger.info("GPTQ: H was not positive definite; used damping %.3g", lam)
            return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    raise DQError("GPTQ: the input second moment is not positive definite even after damping")


def _params(rows: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    lo, hi = P.select_range(rows, spec)
    return P.qparams(lo, hi, spec)


def storage_codes(codes: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Codes in the dtype `primitives.quantize_tensor` stores them in."""
    if spec.kind == "int":
        return codes.to(torch.int8)
    return codes.to(torch.float8_e5m2 if spec.kind == "fp8_e5m2" else torch.float8_e4m3fn)


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    spec: QuantSpec,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    group_params: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize w [out, n] given H [n, n]; returns (codes, scale, zero) like `quantize_tensor`.

    group_params: for group granularity, (scale, zero) [out, 1] of a group's columns
    [out, group_size] in place of the spec's range search, e.g. scales on a per-channel
    base times small integers (`WeightLayout.two_level_params`), so that the integer
    kernels can take the result."""
    if spec.log:
        raise DQError("GPTQ rounds to a uniform grid; it does not apply to log-domain weights")
    out, n = w.shape
    if h.shape != (n, n):
        raise DQError(f"GPTQ: H is {tuple(h.shape)} but the weight has {n} inputs")
    group = spec.granularity == "group"
    g = spec.group_size if group else n
    if group and n % g:
        raise DQError(f"GPTQ: group size {g} does not divide the {n} inputs per channel")
    block = max(block_size // g, 1) * g if group else block_size

    weight = w.detach().float().clone()
    h = h.detach().to(weight.device, torch.float64).clone()
    dead = h.diagonal() <= 0
    h[dead, dead] = 1.0
    device = weight.device
    perm = torch.argsort(h.diagonal(), descending=True).to(device) if act_order else torch.arange(n, device=device)
    static_groups = group and act_order

    if group_params is not None and not group:
        raise DQError("GPTQ: group_params needs group granularity")
    params = group_params or (lambda rows: _params(rows, spec))
    n_groups = n // g if group else 1
    scale = torch.empty(out, n_groups, device=device)
    zero = None if spec.symmetric or spec.kind != "int" else torch.empty(out, n_groups, device=device)
    if spec.granularity == "tensor":
        s, z = _params(weight.reshape(1, -1), spec)
        scale, zero = s.expand(out, 1).clone(), (None if z is None else z.expand(out, 1).clone())
    elif not group or static_groups:
        for gi in range(n_groups):
            s, z = params(weight[:, gi * g : (gi + 1) * g])
            scale[:, gi : gi + 1] = s
            if zero is not None:
                zero[:, gi : gi + 1] = z

    weight = weight[:, perm]
    u = _inverse_cholesky(h[perm][:, perm], damp).float()
    codes = torch.zeros_like(weight)
    columns = perm.tolist()
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1 = weight[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            col = columns[j]
            gi = col // g if group else 0
            if group and not static_groups and col % g == 0:
                s, z = params(w1[:, i : i + g])
                scale[:, gi : gi + 1] = s
                if zero is not None:
                    zero[:, gi : gi + 1] = z
            sc = scale[:, gi : gi + 1]
            zr = None if zero is None else zero[:, gi : gi + 1]
            c = P.quantize(w1[:, i : i + 1], sc, zr, spec)
            codes[:, j : j + 1] = c
            e = (w1[:, i] - P.dequantize(c, sc, zr)[:, 0]) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i : i + 1, i:]
            err1[:, i] = e
        weight[:, i2:] -= err1 @ u[i1:i2, i2:]

    unperm = torch.empty_like(codes)
    unperm[:, perm] = codes
    rows_scale = scale.reshape(-1, 1) if group else scale[:, :1].contiguous()
    rows_zero = None if zero is None else (zero.reshape(-1, 1) if group else zero[:, :1].contiguous())
    if spec.granularity == "tensor":
        rows_scale = rows_scale[:1]
        rows_zero = None if rows_zero is None else rows_zero[:1]
    return storage_codes(unperm, spec), rows_scale, rows_zero
