"""Randomized Hadamard rotations, as pure tensor functions.

A rotation R = diag(signs) · blockdiag(H_b, ..., H_b) / sqrt(b) is orthogonal, so a
linear layer is exactly invariant when its input and weight rotate together:
(x R)(W R)^T = x W^T. Rotating spreads a few large activation (or weight) channels
over all channels of their block, which shrinks the range a per-tensor or per-token
quantizer has to cover. H_b is Sylvester's Hadamard matrix, built for powers of two
only; a width that is not a power of two is rotated in blocks of the largest power
of two that divides it (block-Hadamard), each block independently.

The transform is a fast Walsh-Hadamard transform in Kronecker form (H_ab = H_a (x) H_b):
radix-128 stages, each one dense product, instead of one O(n b) matrix product.
"""

from __future__ import annotations

import functools
import math

import torch

from ..errors import DQError


def is_power_of_two(n: int) -> bool:
    return isinstance(n, int) and n >= 1 and n & (n - 1) == 0


def hadamard_matrix(n: int, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sylvester's Hadamard matrix of size `n` (entries +-1, H H^T = n I)."""
    if not is_power_of_two(n):
        raise DQError(
            f"cannot build a Hadamard matrix of size {n}: dq builds Sylvester matrices, whose "
            "size is a power of two; rotate in blocks (block_size) of a power of two dividing the width"
        )
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


_RADIX = 128  # largest Hadamard factor applied as one dense matrix product


@functools.lru_cache(maxsize=32)
def _cached_hadamard(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return hadamard_matrix(n, dtype=dtype).to(device)


def fwht(x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform of each `block` consecutive entries of the last dim.

    block None: the whole last dim (a power of two). Equals `x @ blockdiag(H_block)`.
    Sylvester's matrix factors as H_(ab) = H_a (x) H_b, so a block is transformed as a
    [a, b] tile with a dense product per factor of at most `_RADIX` (a radix-128 fast
    transform: O(n (a + b)) multiply-adds per row, each stage one BLAS call).
    """
    n = x.shape[-1]
    block = n if block is None else block
    if not is_power_of_two(block):
        hadamard_matrix(block)  # raises the explanatory error
    if n % block:
        raise DQError(f"Hadamard block size {block} does not divide the width {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, block)
    factors = []
    rest = block
    while rest > 1:
        factors.append(min(rest, _RADIX))
        rest //= factors[-1]
    # y viewed as [rows, f_0, f_1, ...]: apply H_f along each factor axis in turn.
    shape = (y.shape[0], *factors)
    y = y.reshape(shape)
    for axis, f in enumerate(factors, start=1):
        h = _cached_hadamard(f, y.dtype, y.device)
        y = torch.matmul(y.movedim(axis, -1), h).movedim(-1, axis)
    return y.reshape(*lead, n)


def largest_power_of_two_divisor(n: int) -> int:
    return n & -n if n > 0 else 1


def block_size_for(width: int, requested: int | None = None, max_block: int | None = None) -> int:
    """The Hadamard block size for a width: `requested`, or the largest power of two that
    divides it (capped at `max_block`). Raises DQError when `requested` cannot be used."""
    if requested is not None:
        if not is_power_of_two(requested) or requested < 2:
            raise DQError(
                f"cannot build a Hadamard matrix of size {requested}: the block size must be a "
                "power of two >= 2 (dq builds Sylvester matrices)"
            )
        if width % requested:
            raise DQError(f"Hadamard block size {requested} does not divide the width {width}")
        return requested
    block = largest_power_of_two_divisor(width)
    if max_block is not None:
        block = min(block, max_block)
    return block


def random_signs(n: int, seed: int) -> torch.Tensor:
    """n random +-1 entries from a private generator (reproducible, leaves global RNG alone)."""
    gen = torch.Generator().manual_seed(int(seed) & 0xFFFF_FFFF)
    return torch.randint(0, 2, (n,), generator=gen).float().mul_(2).sub_(1)


def rotate(x: torch.Tensor, signs: torch.Tensor, block: int, dim: int = -1) -> torch.Tensor:
    """x R along `dim`, with R = diag(signs) blockdiag(H_block) / sqrt(block) (orthogonal)."""
    moved = dim not in (-1, x.dim() - 1)
    if moved:
        x = x.movedim(dim, -1)
    y = fwht(x * signs.to(x.dtype), block) * (1.0 / math.sqrt(block))
    return y.movedim(-1, dim) if moved else y


def unrotate(x: torch.Tensor, signs: torch.Tensor, block: int, dim: int = -1) -> torch.Tensor:
    """x R^T along `dim` (the inverse of `rotate`)."""
    moved = dim not in (-1, x.dim() - 1)
    if moved:
        x = x.movedim(dim, -1)
    y = fwht(x, block) * (1.0 / math.sqrt(block)) * signs.to(x.dtype)
    return y.movedim(-1, dim) if moved else y


def rotated_diagonal(a: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """diag(R^T A R) for a symmetric A [n, n], from A's diagonal blocks only (R is block-diagonal)."""
    n = a.shape[0]
    blocks = a.reshape(n // block, block, n // block, block).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    s = signs.to(a.dtype).reshape(n // block, block)
    blocks = blocks * s[:, :, None] * s[:, None, :]  # S A_jj S
    right = fwht(blocks, block)  # (S A S) H per block
    # diag(H^T M)_j = sum_a H_aj M_aj: one transform instead of two
    h = _cached_hadamard(block, a.dtype, a.device)
    return (right * h).sum(dim=1).reshape(n) / block


def rotation_matrix(signs: torch.Tensor, block: int) -> torch.Tensor:
    """The dense R (for tests and small analyses): rotate(I) row by row."""
    return rotate(torch.eye(signs.numel(), dtype=torch.float64), signs.double(), block)
