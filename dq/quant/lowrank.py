"""Low-rank outlier branch (SVDQuant), as pure tensor functions.

W = L1 L2 + R: the rank-r part L1 L2 (the largest singular directions, where smoothed
outliers concentrate) stays in 16/32-bit and runs beside the quantized layer; only the
residual R is quantized. The split is refined iteratively: after quantizing R, the
rank-r part is re-fitted to W - Q(R), so it also absorbs what rounding R loses; the
iterate with the smallest error (H-weighted when the input second moment is known)
is kept.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import DQError


def check_rank(rank: int, shape: tuple[int, int], name: str = "layer") -> None:
    if not isinstance(rank, int) or rank < 1:
        raise DQError(f"low-rank branch rank must be a positive integer, got {rank!r}")
    limit = min(shape)
    if rank > limit:
        raise DQError(
            f"{name}: a rank of {rank} is larger than the layer allows (its weight is "
            f"{shape[0]}x{shape[1]}, so at most rank {limit}); lower lowrank.rank or exclude the layer"
        )


def svd_factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, r], down [r, in]) with up @ down the best rank-r approximation of w."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(w.dtype), (root[:, None] * vh[:rank]).to(w.dtype)


def _error(e: torch.Tensor, h: torch.Tensor | None) -> float:
    if h is None:
        return float(e.double().pow(2).sum())
    e = e.double()
    return float(((e @ h.double()) * e).sum())


def lowrank_split(
    w: torch.Tensor,
    rank: int,
    quantize: Callable[[torch.Tensor], torch.Tensor],
    iters: int = 1,
    h: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split w [out, in] into (up, down, residual) with w = up @ down + residual.

    quantize: fake-quantizer of the residual (the layer's weight quantizer); iters: number
    of refits of the low-rank part to w - Q(residual) (0: plain truncated SVD); h: optional
    input second moment weighting the error tr(E H E^T) used to pick the best iterate.
    """
    check_rank(rank, tuple(w.shape))
    w = w.float()
    up, down = svd_factors(w, rank)
    best = None
    for step in range(iters + 1):
        residual = w - up @ down
        q = quantize(residual)
        err = _error(residual - q, h)
        if best is None or err < best[0]:
            best = (err, up, down, residual)
        if step < iters:
            up, down = svd_factors(w - q, rank)
    _, up, down, residual = best
    return up, down, residual
