"""Integer execution: int8 activation codes x int8 weights through `torch._int_mm`.

For a layer with weight W ~= s_w[n] * Wi[n, k] (`WeightLayout.integer_weight`: exact
int8, two-level group scales and weight zero points already folded in) and input
x ~= s_a * (q - z_a):

    y = s_a * s_w[n] * (q @ Wi^T - z_a * sum_k Wi[n, k]) + bias

The product runs in int32; the rest is one fused multiply-add per output element:
static activations (per timestep group) give a per-column scale and shift, so the
epilogue is a single `addcmul`; dynamic per-token activations add a per-row factor.
`wsum` (the weight row sums) is made once per layer, on its first call (`dq.kernels.dispatch.ready`).

Convolutions become matmuls on channels-last codes: 1x1 directly, k x k through an int8
im2col (the float input is zero-padded before quantization, so padding codes are the
zero point and contribute nothing). Their output is an NCHW tensor in channels-last
memory order (no copy back).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import primitives as P
from ..quant.spec import QuantSpec

# torch._int_mm on CUDA: more than 16 rows, K and N multiples of 8.
CUDA_MIN_ROWS = 16
CUDA_MULTIPLE = 8


def int_mm_unsupported(m: int, k: int, n: int, device: torch.device) -> str | None:
    """Why torch._int_mm cannot take [m, k] x [k, n] on `device` (None if it can)."""
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"no int8 matmul on {device.type}"
    if m <= CUDA_MIN_ROWS:
        return f"{m} rows (CUDA int8 matmul needs more than {CUDA_MIN_ROWS})"
    if k % CUDA_MULTIPLE or n % CUDA_MULTIPLE:
        return f"inner/output size {k}/{n} not multiples of {CUDA_MULTIPLE}"
    return None


def quantize_static(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """int8 codes of `x` with one (scale, zero); the same rounding as `primitives.quantize`."""
    # A new float32 tensor (scale is float32 with one dim), then in place. (addcdiv would
    # be one pass, but its broadcasting kernel is 2-4x slower than div + add_ on CPU.)
    q = torch.div(x, scale)
    if zero is not None:
        q.add_(zero)
    return q.round_().clamp_(spec.qmin, spec.qmax).to(torch.int8)


def quantize_dynamic(
    rows: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(int8 codes, scale, zero) of rows [m, k]: per row ("token") or one for all ("tensor")."""
    ranged = rows if spec.granularity == "token" else rows.reshape(1, -1)
    lo, hi = P.select_range(ranged, spec)
    scale, zero = P.qparams(lo, hi, spec)
    return quantize_static(rows, scale, zero, spec), scale, zero


def dequantize_output(
    acc: torch.Tensor,
    a_scale: torch.Tensor,
    a_zero: torch.Tensor | None,
    w_scale: torch.Tensor,
    w_sum: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """float32 [m, n] from the int32 product; see the module docstring."""
    if a_scale.numel() == 1:
        col = a_scale.reshape(1) * w_scale
        shift = torch.zeros_like(col) if bias is None else bias.float()
        if a_zero is not None:
            shift = shift - a_zero.reshape(1) * w_sum * col
        return torch.addcmul(shift, acc, col)
    # Per-row activation scales (dynamic): y = (acc * s_w) * s_a, then the zero-point term and
    # the bias as one rank-1/rank-2 update (addmm_): 3 passes over [m, n] instead of 6 (the
    # int32 x float32 product promotes in its one pass); 5x faster at 512 x 1152 on a Xeon.
    y = torch.mul(acc, w_scale).mul_(a_scale)
    rows, cols = [], []
    if a_zero is not None:
        rows.append(-(a_zero * a_scale))
        cols.append(w_sum * w_scale)
    if bias is not None:
        rows.append(torch.ones_like(a_scale))
        cols.append(bias.float())
    return y.addmm_(torch.cat(rows, dim=1), torch.stack(cols)) if rows else y


def int_linear(
    codes: torch.Tensor,
    a_scale: torch.Tensor,
    a_zero: torch.Tensor | None,
    weight: torch.Tensor,
    w_scale: torch.Tensor,
    w_sum: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """codes [m, k] int8 x weight [n, k] int8 -> float32 [m, n]."""
    acc = torch._int_mm(codes, weight.t())
    return dequantize_output(acc, a_scale, a_zero, w_scale, w_sum, bias)


# -- convolution geometry ------------------------------------------------------------
def conv_padding(padding: tuple[int, ...] | str, kernel: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding of a conv's `padding` argument."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        pads = []
        for k, d in zip(reversed(kernel), reversed(dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    ph, pw = padding
    return (pw, pw, ph, ph)


def im2col_int8(
    codes: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
) -> tuple[torch.Tensor, int, int]:
    """Patch rows [b * ho * wo, kh * kw * c] of channels-last int8 codes [b, h, w, c] (padded).

    Columns run over (kh, kw, c), channels fastest: `patch_order` puts the weight in the
    same order. (F.unfold has no int8 kernel on CPU, and gathering patches from an NCHW
    tensor is a slow strided copy; from NHWC each patch row is kh * kw runs of c bytes.)
    """
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    b, c = codes.shape[0], codes.shape[3]
    patches = codes.unfold(1, dh * (kh - 1) + 1, sh).unfold(2, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
    ho, wo = patches.shape[1], patches.shape[2]  # patches: b ho wo c kh kw
    return patches.permute(0, 1, 2, 4, 5, 3).reshape(b * ho * wo, kh * kw * c), ho, wo


def patch_order(weight: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A conv weight [n, c * kh * kw] (F.unfold order) in `im2col_int8` column order."""
    n, c, kh, kw = shape
    if kh == kw == 1:
        return weight
    return weight.reshape(n, c, kh, kw).permute(0, 2, 3, 1).reshape(n, kh * kw * c)


def conv_output_size(size: int, pad: int, kernel: int, stride: int, dilation: int) -> int:
    return (size + pad - dilation * (kernel - 1) - 1) // stride + 1


def pad_input(x: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    return F.pad(x, pads) if any(pads) else x
