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

import warnings

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


# torch's per-tensor int8 quantizer (`torch.quantize_per_tensor`, fbgemm's vectorized loop):
# one pass over the input instead of five (mul, round, add, clamp, cast) and their
# temporaries, 4-6x faster on a Xeon at 512 x 1152. It computes nearbyint(x * (1 / scale)) +
# zero clamped to [-128, 127], as dq's reference (`primitives.quantize`) does for an integer
# zero point and the full int8 range (8-bit asymmetric; the symmetric range stops at -127).
# Deprecated upstream: it is used while it exists and works (None: not tried yet; False:
# unavailable or it failed once, so the portable passes run).
_QPT: bool | None = None


def _quantize_qint8(x: torch.Tensor, scale: float, zero: int) -> torch.Tensor | None:
    """`torch.quantize_per_tensor(x, scale, zero, qint8)`, or None once it is known missing or
    failing (then `_QPT` is False and every caller runs the portable passes)."""
    global _QPT
    if _QPT is False:
        return None
    try:
        if _QPT:
            q = torch.quantize_per_tensor(x, scale, zero, torch.qint8)
        else:  # the first call: torch warns "deprecated" once per process
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q = torch.quantize_per_tensor(x, scale, zero, torch.qint8)
    except (AttributeError, RuntimeError, NotImplementedError, TypeError):
        _QPT = False
        return None
    _QPT = True
    return q


def _int8_view(q: torch.Tensor) -> torch.Tensor:
    """A qint8 tensor's bytes as a plain int8 tensor (same storage and strides, no copy)."""
    return torch.empty(0, dtype=torch.int8, device=q.device).set_(q.untyped_storage(), q.storage_offset(), q.shape, q.stride())


def _qint8(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor | None:
    """`x` as a qint8 tensor, or None where the quantizer does not apply: eager CPU float32,
    one scale, the full int8 range, and no autograd (inside torch.compile the portable
    passes fuse into one loop anyway)."""
    if (_QPT is False or spec.kind != "int" or spec.qmin != -128 or spec.qmax != 127 or scale.numel() != 1
            or x.dtype != torch.float32 or x.device.type != "cpu" or torch.compiler.is_compiling()
            or torch.is_grad_enabled() and x.requires_grad):
        return None
    return _quantize_qint8(x, float(scale), 0 if zero is None else int(zero))


def qint8_codes(x: torch.Tensor, scale: float, zero: int) -> torch.Tensor | None:
    """int8 codes of a contiguous CPU float32 `x` for the full int8 range, from Python numbers
    (the hot path of `dq.kernels.dispatch`; the caller checked the rest of `_qint8`'s
    conditions), or None when torch's quantizer is unavailable."""
    q = _quantize_qint8(x, scale, zero)
    return None if q is None else _int8_view(q)


def _fast_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor | None:
    """int8 codes of `x` (a view of the qint8 tensor's bytes, in the input's strides: rows,
    or a channels-last conv input), or None (see `_qint8`)."""
    if not (x.is_contiguous() or x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return None
    q = _qint8(x, scale, zero, spec)
    return None if q is None else _int8_view(q)


def fake_quantize_static(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor | None:
    """`x` quantized with one (scale, zero) and dequantized (`primitives.quantize` then
    `dequantize`: the same values) in two vectorized passes, or None (see `_qint8`): the
    caller runs the portable passes. For the "float_copy" path and simulated layers: at
    widths where the matmul is small (128), five portable passes and their temporaries cost
    more than the matmul."""
    q = _qint8(x, scale, zero, spec)
    return None if q is None else q.dequantize()


def quantize_static(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """int8 codes of `x` with one (scale, zero); the same rounding as `primitives.quantize`."""
    codes = _fast_codes(x, scale, zero, spec)
    if codes is not None:
        return codes
    # A new float32 tensor (scale is float32 with one dim), then in place; the order of
    # `primitives.quantize`.
    q = torch.mul(x, torch.reciprocal(scale)).round_()
    if zero is not None:
        q.add_(zero)
    if (spec.qmin == -128 and spec.qmax == 127 and q.dtype == torch.float32 and q.device.type == "cpu"
            and not torch.compiler.is_compiling()):
        # per-row scales (dynamic per token): the codes are integers already; torch's quantizer
        # with scale 1 clamps and casts them in one pass instead of two
        codes = qint8_codes(q, 1.0, 0)
        if codes is not None:
            return codes
    return q.clamp_(spec.qmin, spec.qmax).to(torch.int8)


def quantize_dynamic(
    rows: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(int8 codes, scale, zero) of rows [m, k]: per row ("token") or one for all ("tensor")."""
    ranged = rows if spec.granularity == "token" else rows.reshape(1, -1)
    lo, hi = P.select_range(ranged, spec)
    scale, zero = P.qparams(lo, hi, spec)
    return quantize_static(rows, scale, zero, spec), scale, zero


def _float_view(acc: torch.Tensor) -> torch.Tensor:
    """The int32 product converted to float32 in place, in its own memory (int32 and float32
    are the same size: each element is read and then written at the same address); the int32
    product is gone afterwards. Eager only: a compiled graph fuses the cast into the next pass."""
    y = acc.view(torch.float32)
    return y.copy_(acc)


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
        shift = None if bias is None else bias.float()
        if a_zero is not None:
            term = a_zero.reshape(1) * w_sum * col
            shift = -term if shift is None else shift - term
        if torch.compiler.is_compiling():  # one fused loop in the graph
            y = acc.float() * col
            return y if shift is None else y + shift
        # Cast in place into the product's own memory (`_float_view`), then one same-dtype
        # addcmul into it: no new [m, n] tensor (on CPU a fresh one costs page faults) and no
        # mixed-dtype broadcasting loop (int32 x float32 ops run 2-6x slower than the cast plus
        # a float op; measured at 1024 x 128 and 1024 x 512 on a Xeon).
        y = _float_view(acc)
        return y.mul_(col) if shift is None else torch.addcmul(shift, y, col, out=y)
    # Per-row activation scales (dynamic): y = (acc * s_w) * s_a, then the zero-point term and
    # the bias as one rank-1/rank-2 update (addmm_): 3 passes over [m, n] instead of 6 (the
    # int32 x float32 product promotes in its one pass); 5x faster at 512 x 1152 on a Xeon.
    if torch.compiler.is_compiling():
        # one fused loop in the graph: there an addmm_ is an extern call plus a copy back into y
        # (measured at 512 x 1152 on an AMD EPYC: 0.09 ms fused against 0.24 ms)
        y = acc.float() * w_scale * a_scale
        if a_zero is not None:
            y = y - (a_zero * a_scale) * (w_sum * w_scale)
        return y if bias is None else y + bias.float()
    y = _float_view(acc).mul_(w_scale).mul_(a_scale)
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
