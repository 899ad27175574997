"""Log2-domain quantizers, as pure tensor functions.

Uniform levels waste codes on long-tailed data: softmax probabilities are mostly tiny
with a few near 1, and some weights have heavy tails. A log2 quantizer keeps levels
2^0, 2^-1, ..., 2^-(L-1) (times a scale) plus an exact zero, so relative precision is
the same at every magnitude. Rounding is to the nearest level in the *linear* domain
(a value between 2^-(k+1) and 2^-k rounds up from 0.75 * 2^-k), which minimises the
squared error where rounding the exponent would not.

Codes are small signed integers, stored like uniform ones (int8): for weights the code
c means sign(c) * scale * 2^(|c| - qmax) and 0 means zero; for probabilities (which are
non-negative) the code k in [0, 2^bits - 2] means 2^-k and 2^bits - 1 means zero.
"""

from __future__ import annotations

import torch

from ..errors import DQError
from . import primitives as P
from .spec import QuantSpec


def _nearest_exponent(r: torch.Tensor) -> torch.Tensor:
    """Exponent e (<= 0) of the power of two nearest to r in the linear domain, for r in (0, 1]."""
    tiny = torch.finfo(torch.float32).tiny
    return (torch.floor(torch.log2((r * (2.0 / 3.0)).clamp(min=tiny))) + 1).clamp(max=0)


def log2_levels(bits: int) -> int:
    """Number of non-zero levels of a `bits`-bit unsigned log2 quantizer."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise DQError(f"log2 quantizer bits must be an integer from 2 to 8, got {bits!r}")
    return 2**bits - 1


def log2_quantize_probs(p: torch.Tensor, bits: int) -> torch.Tensor:
    """Fake-quantize probabilities in [0, 1] to {0} U {2^-k : k = 0 .. 2^bits - 2}."""
    n = log2_levels(bits)
    smallest = -(n - 1)  # exponent of the smallest non-zero level
    pf = p.float()
    e = _nearest_exponent(pf).clamp(min=smallest)
    q = torch.exp2(e)
    q = torch.where(pf < 2.0**smallest / 2, torch.zeros_like(q), q)
    return q.to(p.dtype)


def uniform_quantize_probs(p: torch.Tensor, bits: int) -> torch.Tensor:
    """The uniform counterpart on [0, 1] (2^bits levels, step 1 / (2^bits - 1)), for comparison."""
    n = log2_levels(bits)
    return (p.float() * n).round().clamp(0, n).div(n).to(p.dtype)


def log_quantize(w: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Signed log2 codes (as float) of rows `w` [rows, cols] with per-row `scale` (their absmax)."""
    qmax = spec.qmax
    r = w.abs() / scale
    e = _nearest_exponent(r).clamp(min=1 - qmax)
    mag = e + qmax  # 1 .. qmax
    mag = torch.where(r < 2.0 ** (1 - qmax) / 2, torch.zeros_like(mag), mag)
    return torch.sign(w) * mag


def log_dequantize(codes: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    mag = codes.abs()
    value = torch.exp2(mag - spec.qmax) * scale
    return torch.where(mag == 0, torch.zeros_like(value), torch.sign(codes) * value)


def log_quantize_tensor(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, None]:
    """(int8 codes, per-row scale, None) of a weight under a `spec.log` quantizer."""
    if not spec.log or spec.kind != "int":
        raise DQError("log_quantize_tensor needs an integer spec with log: true")
    rows = P.row_view(w.detach().float(), spec.granularity, spec.group_size)
    scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    codes = log_quantize(rows, scale, spec)
    return codes.to(torch.int8).reshape(w.shape), scale, None


def log_dequantize_tensor(codes: torch.Tensor, scale: torch.Tensor, spec: QuantSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    rows = P.row_view(codes.float(), spec.granularity, spec.group_size)
    return log_dequantize(rows, scale, spec).reshape(codes.shape).to(dtype)


def fake_log_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    codes, scale, _ = log_quantize_tensor(w, spec)
    return log_dequantize_tensor(codes, scale, spec, w.dtype)
