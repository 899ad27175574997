"""FP8 execution: float8 activations x float8 weights through `torch._scaled_mm` (CUDA, sm89+).

The activation scale (static per timestep group, or per token) and the weight's
per-channel scale are applied around the matmul: the activation scale inside
`_scaled_mm` when there is a single one, the rest in one fused epilogue.
CPU builds of torch have a `_scaled_mm` too, but it is a slow reference
implementation, so fp8 counts as supported on CUDA devices of compute capability
8.9 (Ada) or newer only.
"""

from __future__ import annotations

import torch

from ..quant import primitives as P
from ..quant.spec import FP_FORMATS, QuantSpec

MIN_CAPABILITY = (8, 9)
# torch._scaled_mm: the inner and output sizes must be multiples of 16.
MULTIPLE = 16

FP8_ALTERNATIVES = (
    "run it with execution: sim (fp8 simulated in float, any device), or use an int8 recipe "
    "such as w8a8 or w4a8 (integer kernels on CPU and on any CUDA GPU)"
)


@torch.compiler.assume_constant_result
def _capability_ok(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= MIN_CAPABILITY


def device_unsupported(device: torch.device) -> str | None:
    """Why `device` cannot run fp8 matmuls (None if it can)."""
    if device.type != "cuda":
        return f"{device.type} has no fp8 matmul (needs a CUDA GPU of compute capability >= 8.9)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if not _capability_ok(index):
        major, minor = torch.cuda.get_device_capability(index)
        return f"CUDA device {index} has compute capability {major}.{minor} < 8.9 (no fp8 tensor cores)"
    return None


def any_device() -> bool:
    """Whether this process sees a CUDA device that runs fp8 matmuls."""
    if not torch.cuda.is_available():
        return False
    return any(torch.cuda.get_device_capability(i) >= MIN_CAPABILITY for i in range(torch.cuda.device_count()))


def shape_unsupported(k: int, n: int) -> str | None:
    if k % MULTIPLE or n % MULTIPLE:
        return f"inner/output size {k}/{n} not multiples of {MULTIPLE} (fp8 matmul)"
    return None


def float8_dtype(spec: QuantSpec) -> torch.dtype:
    return torch.float8_e5m2 if spec.kind == "fp8_e5m2" else torch.float8_e4m3fn


def fp8_linear(
    rows: torch.Tensor,
    spec: QuantSpec,
    static: tuple[torch.Tensor, torch.Tensor | None] | None,
    weight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """rows [m, k] float x weight [n, k] float8 -> [m, n] in rows' dtype (float32 for others)."""
    fmax = FP_FORMATS[spec.kind][0]
    if static is not None:
        a_scale = static[0]
    else:
        ranged = rows if spec.granularity == "token" else rows.reshape(1, -1)
        lo, hi = P.select_range(ranged, spec)
        a_scale, _ = P.qparams(lo, hi, spec)
    codes = torch.div(rows, a_scale).clamp_(-fmax, fmax).to(float8_dtype(spec))
    out_dtype = rows.dtype if rows.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    one = torch.ones((), device=rows.device)
    per_tensor = a_scale.numel() == 1
    acc = torch._scaled_mm(
        codes, weight.t(), scale_a=a_scale.reshape(()) if per_tensor else one, scale_b=one, out_dtype=out_dtype
    )
    y = acc.float() * w_scale if per_tensor else acc.float() * a_scale * w_scale
    return (y if bias is None else y + bias.float()).to(out_dtype)
