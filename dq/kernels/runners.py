"""How each execution path runs a quantized layer, and the runtime weight copies it keeps.

`dq.kernels.dispatch` chooses a path per layer and row count (`dq.kernels.choice` names
them); the functions here are those paths (`RUN`), each computing the layer's output from
its input:
- "onednn": oneDNN's fused int8 linear on a prepacked weight copy (CPU, static activations);
- "int_mm", "int8_copy": `torch._int_mm` on int8 codes; the latter keeps the packed 4/5/6-bit
  weight unpacked as int8 (one byte per weight) instead of unpacking per call;
- "float_copy": the dequantized weight kept in float, the input still fake-quantized;
- "float_input": that weight on the unquantized input (`float_activations`);
- "int_mm_a8": a weight-only layer as int8 x int8 with dynamic per-token activations (`A8_SPEC`);
- "bf16": a weight-only layer's op in bfloat16;
- "dequant": the simulated function (`QuantModule.simulated`);
and fp8 (`fp8_forward`, CUDA). The `simulated_*` functions are what the paths that change the
numerics compute, in float, for their correctness probe.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from ..quant import primitives as P
from ..quant.spec import QuantSpec
from . import fp8, int8, onednn

if TYPE_CHECKING:
    from ..nn.layers import QuantModule

logger = logging.getLogger("dq.kernels.dispatch")  # one logger for the kernel choice and its fallbacks

# The activations of weight-only layers on path "int_mm_a8": dynamic, per token, asymmetric
# (the format of the w8a8-dynamic preset, its best-quality W8A8).
A8_SPEC = QuantSpec(bits=8, granularity="token", symmetric=False, dynamic=True)


def conv_geometry(layer: QuantModule) -> tuple[tuple[int, int], bool] | None:
    """(kernel size, has padding) of a convolution; None for a linear layer."""
    if getattr(layer, "conv_groups", None) is None:
        return None
    kernel = tuple(layer.weight_shape[2:])
    pads = int8.conv_padding(layer.padding, kernel, layer.dilation)
    return kernel, any(pads)


def fallback(layer: QuantModule, x: torch.Tensor, reason: str, level: int = logging.DEBUG) -> torch.Tensor:
    if not torch.compiler.is_compiling():
        seen = layer.__dict__.setdefault("_dq_fallbacks", set())
        if reason not in seen:
            seen.add(reason)
            logger.log(level, "%s: %s; running the simulated path", getattr(layer, "_dq_name", type(layer).__name__), reason)
    return layer.simulated(x)


def unpacks_per_call(layer: QuantModule) -> bool:
    """Whether `integer_weight` computes a new tensor on every call (packed 4/5/6-bit codes,
    two-level scales, weight zero points) rather than viewing the stored codes."""
    layout = layer.weight_layout
    return layout.packed or layout.two_level or getattr(layer, "wzero", None) is not None


def simulated_a8(layer: QuantModule, x: torch.Tensor) -> torch.Tensor:
    """What path "int_mm_a8" computes, in float: the weight-only layer with its input
    fake-quantized to `A8_SPEC` (dynamic per-token int8)."""
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return layer.float_op(P.fake_quantize(x, A8_SPEC), layer.dequantized_weight(x.dtype), bias)


def _bf16_weight(layer: QuantModule) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight path "bf16" multiplies in bfloat16, and the per-output-channel scale applied to
    the product afterwards (None: none). Where the layout gives exact int8 weights on one scale
    per channel (`integer_matmul_ready`: 8-bit per channel, two-level 4-bit groups), those
    integers, exact in bfloat16 (|w| <= 128), times the scale in float32 after the matmul: no
    float decode per call (a few int8 passes instead of several float32 ones) and no rounding of
    the weight. Elsewhere the dequantized weight rounded to bfloat16."""
    layout = layer.weight_layout
    if layout.integer_matmul_ready:
        weight = layout.integer_weight(layer.qweight, layer.wzero, layer.wmult).reshape(layout.shape)
        return weight.to(torch.bfloat16), layout.channel_scale(layer.wscale)
    return layer.dequantized_weight(torch.bfloat16), None


def _channel_scaled(layer: QuantModule, y: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """`y` (float32) times a per-output-channel scale, in place (last dim of a linear layer's
    output, dim 1 of a convolution's)."""
    if scale is None:
        return y
    return y.mul_(scale if conv_geometry(layer) is None else scale.view(-1, *([1] * (y.dim() - 2))))


def simulated_bf16(layer: QuantModule, x: torch.Tensor) -> torch.Tensor:
    """What path "bf16" computes, in float32: the weight-only layer's op on its input rounded to
    bfloat16 and the weight of `_bf16_weight` (exact integers, or rounded to bfloat16), the
    product rounded to bfloat16, then the channel scale and the bias in the input's dtype."""
    weight, scale = _bf16_weight(layer)
    y = layer.float_op(x.to(torch.bfloat16).to(x.dtype), weight.to(x.dtype), None)
    return _add_bias(layer, _channel_scaled(layer, y.to(torch.bfloat16).to(x.dtype), scale))


def _add_bias(layer: QuantModule, y: torch.Tensor) -> torch.Tensor:
    """`y` plus the layer's bias (per output channel: the last dim of a linear layer's output,
    dim 1 of a convolution's), in place."""
    if layer.bias is None:
        return y
    bias = layer.bias.to(y.dtype)
    return y.add_(bias if conv_geometry(layer) is None else bias.view(-1, *([1] * (y.dim() - 2))))


def _bf16_forward(layer: QuantModule, x: torch.Tensor) -> torch.Tensor:
    """Path "bf16": a weight-only layer's op in bfloat16 (`simulated_bf16`'s function): the
    weight made per call (`_bf16_weight`, no copy kept), float32 accumulation inside the
    matmul, the result back in the input's dtype with the channel scale and bias applied there."""
    weight, scale = _bf16_weight(layer)
    y = layer.float_op(x.to(torch.bfloat16), weight, None)
    return _add_bias(layer, _channel_scaled(layer, y.to(x.dtype), scale))


def float_activations(layer: QuantModule, x: torch.Tensor) -> torch.Tensor:
    """What path "float_input" computes: the layer's quantized weight on its unquantized input."""
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return layer.float_op(x, layer.dequantized_weight(x.dtype), bias)


def integer_weight(layer: QuantModule) -> torch.Tensor:
    """int8 weight [n, k], columns in the order the kernel's rows use."""
    weight = layer.weight_layout.integer_weight(layer.qweight, layer.wzero, layer.wmult)
    return weight if conv_geometry(layer) is None else int8.patch_order(weight, layer.weight_shape)


def _kept_integer_weight(layer: QuantModule) -> torch.Tensor:
    """`integer_weight`, made once and kept (paths "int8_copy", "int_mm_a8"). Inside
    torch.compile a missing copy is computed per call (a graph cannot store it)."""
    copy = layer.__dict__.get("_dq_int8_weight")
    if copy is None:
        copy = integer_weight(layer).contiguous()
        if torch.compiler.is_compiling():
            return copy
        layer.__dict__["_dq_int8_weight"] = copy
    return copy


def prepacked(layer: QuantModule) -> onednn.Prepacked:
    packed = layer.__dict__.get("_dq_prepacked")
    if packed is None:
        packed = onednn.Prepacked(integer_weight(layer), layer.weight_layout.channel_scale(layer.wscale))
        layer.__dict__["_dq_prepacked"] = packed
    return packed


def _float_weight(layer: QuantModule, dtype: torch.dtype) -> torch.Tensor:
    copy = layer.__dict__.get("_dq_float_weight")
    if copy is None or copy.dtype != dtype:
        copy = layer.dequantized_weight(dtype)
        layer.__dict__["_dq_float_weight"] = copy
    return copy


def _float_copy_forward(layer: QuantModule, x: torch.Tensor) -> torch.Tensor:
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return layer.float_op(layer.quantize_input(x), _float_weight(layer, x.dtype), bias)


def folded_weight(layer: QuantModule, dtype: torch.dtype) -> torch.Tensor:
    """The float weight of path "float_input" on the raw input: (W_q + up @ down) M^T, M the input
    transform's matrix (smoothing's 1/s, the rotation), made once in float32 and kept."""
    copy = layer.__dict__.get("_dq_float_folded")
    if copy is not None and copy.dtype == dtype:
        return copy
    weight = layer.dequantized_weight(torch.float32)
    branch = layer.branch
    if branch is not None:
        weight = weight + branch.up.float() @ branch.down.float()
    transform = layer.input_transform
    if transform is not None:
        eye = torch.eye(weight.shape[1], dtype=torch.float32, device=weight.device)
        weight = weight @ transform(eye).t()  # row i of transform(eye): e_i M
    copy = weight.to(dtype).contiguous()
    if not torch.compiler.is_compiling():
        layer.__dict__["_dq_float_folded"] = copy
    return copy


def _float_forward(layer: QuantModule, x: torch.Tensor) -> torch.Tensor:
    """Path "float_input": the kept float weight on the unquantized input (`float_activations`)."""
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return layer.float_op(x, _float_weight(layer, x.dtype), bias)


def _int8_matmul(layer: QuantModule, codes: torch.Tensor, a_scale, a_zero, fused: bool, kept: bool = False) -> torch.Tensor:
    if fused and codes.device.type == "cpu" and a_scale.numel() == 1:
        return prepacked(layer)(codes, a_scale, a_zero, layer.bias)
    weight = _kept_integer_weight(layer) if kept else integer_weight(layer)
    w_sum = None if a_zero is None else _row_sums(layer, weight)
    return int8.int_linear(codes, a_scale, a_zero, weight, layer.weight_layout.channel_scale(layer.wscale), w_sum, layer.bias)


def _row_sums(layer: QuantModule, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Row sums of the integer weight (asymmetric activations: the zero point's term), the
    `wsum` buffer `ready` makes. Missing only inside a torch.compile trace that no compile
    hook prepared (`_compile_started`): computed in the graph then, per call."""
    w_sum = layer._buffers.get("wsum")
    if w_sum is None:
        weight = integer_weight(layer) if weight is None else weight
        w_sum = weight.sum(dim=1, dtype=torch.int32).float()
    return w_sum


def _int8_forward(layer: QuantModule, x: torch.Tensor, fused: bool = False, kept: bool = False) -> torch.Tensor:
    if conv_geometry(layer) is None:
        return _int8_linear(layer, x, fused, kept)
    return _int8_conv(layer, x, fused, kept)


def _a8_forward(layer: QuantModule, x: torch.Tensor) -> torch.Tensor:
    """A weight-only linear layer as int8 x int8, its input quantized per token (`A8_SPEC`)."""
    layout = layer.weight_layout
    k, n = layout.cols, layout.out_features
    reason = int8.int_mm_unsupported(x.numel() // k, k, n, x.device)
    if reason is not None:
        return fallback(layer, x, reason)
    codes, a_scale, a_zero = int8.quantize_dynamic(x.reshape(-1, k).float(), A8_SPEC)
    weight = _kept_integer_weight(layer)
    w_sum = layer.__dict__.get("_dq_int8_wsum")
    if w_sum is None or w_sum.device != weight.device:
        w_sum = weight.sum(dim=1, dtype=torch.int32).float()
        if not torch.compiler.is_compiling():
            layer.__dict__["_dq_int8_wsum"] = w_sum
    y = int8.int_linear(codes, a_scale, a_zero, weight, layout.channel_scale(layer.wscale), w_sum, layer.bias)
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


def _tensor_version(t: torch.Tensor) -> int:
    """`t._version`, or -1 for an inference tensor (made under `torch.inference_mode`: a model
    loaded there, or the row sums made on a first call there), which keeps no version counter;
    such a tensor cannot be changed in place outside inference mode."""
    return -1 if t.is_inference() else t._version


def static_table(layer: QuantModule) -> tuple | None:
    """Per timestep group: the activation (scale, zero) as Python numbers and the epilogue's
    column scale and shift [n] (`int8.dequantize_output`, static case), and the integer
    weight's transpose where it is a view of the stored codes; made once per layer and remade
    when any tensor they come from changed in place or was replaced (tensor versions and
    identities). None while a tensor it needs is missing (the row sums before `ready`)."""
    ascale, azero, bias, wsum, qweight = layer.ascale, layer.azero, layer.bias, layer._buffers.get("wsum"), layer.qweight
    if azero is not None and wsum is None:
        return None
    tensors = (ascale, azero, bias, layer.wscale, wsum, qweight)
    key = tuple(None if t is None else (id(t), _tensor_version(t)) for t in tensors)
    table = layer.__dict__.get("_dq_static")
    if table is not None and table[0] == key:
        return table
    scales = ascale.reshape(-1).float()
    col = scales[:, None] * layer.weight_layout.channel_scale(layer.wscale)[None, :]
    shift = None if bias is None else bias.float().expand_as(col).clone()
    zeros = None
    if azero is not None:
        zeros = azero.reshape(-1).float()
        term = zeros[:, None] * wsum[None, :] * col
        shift = -term if shift is None else shift - term
    weight_t = None if unpacks_per_call(layer) else integer_weight(layer).t()
    table = (key, scales.tolist(), [0] * len(scales) if zeros is None else [int(z) for z in zeros.tolist()],
             tuple(col.contiguous()), None if shift is None else tuple(shift.contiguous()), weight_t)
    layer.__dict__["_dq_static"] = table
    return table


def _static_int8_eager(layer: QuantModule, x: torch.Tensor, kept: bool) -> torch.Tensor | None:
    """The static-activation int8 linear on CPU in eager mode with the fewest passes and the
    least Python: codes from torch's int8 quantizer, `torch._int_mm`, the int32 product cast in
    place and one addcmul with the group's precomputed column scale and shift. None where it
    does not apply (the general path then runs: same codes, same function)."""
    table = static_table(layer)
    if table is None:
        return None
    _, scales, zeros, cols, shifts, weight_t = table
    router = layer._router
    g = 0 if router is None else int(router.index)
    q = int8.qint8_codes(x, scales[g], zeros[g])
    if q is None:
        return None
    if kept:
        weight_t = _kept_integer_weight(layer).t()
    elif weight_t is None:
        weight_t = integer_weight(layer).t()
    acc = torch._int_mm(q.view(-1, x.shape[-1]), weight_t)
    y = int8._float_view(acc)
    y = y.mul_(cols[g]) if shifts is None else torch.addcmul(shifts[g], y, cols[g], out=y)
    return y.view(*x.shape[:-1], y.shape[1])


def _int8_linear(layer: QuantModule, x: torch.Tensor, fused: bool, kept: bool = False) -> torch.Tensor:
    spec, layout = layer.act_spec, layer.weight_layout
    k, n = layout.cols, layout.out_features
    reason = int8.int_mm_unsupported(x.numel() // k, k, n, x.device)
    if reason is not None:
        return fallback(layer, x, reason)
    if (not fused and not spec.dynamic and spec.qmin == -128 and spec.qmax == 127 and x.device.type == "cpu"
            and x.dtype == torch.float32 and x.is_contiguous() and not torch.compiler.is_compiling()):
        y = _static_int8_eager(layer, x, kept)
        if y is not None:
            return y
    if spec.dynamic:
        codes, a_scale, a_zero = int8.quantize_dynamic(x.reshape(-1, k), spec)
    else:
        a_scale, a_zero = layer.static_act_params()
        codes = int8.quantize_static(x, a_scale, a_zero, spec).reshape(-1, k)
    y = _int8_matmul(layer, codes, a_scale, a_zero, fused, kept)
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


RUN = {
    "onednn": lambda layer, x: _int8_forward(layer, x, fused=True),
    "int_mm": _int8_forward,
    "int8_copy": lambda layer, x: _int8_forward(layer, x, kept=True),
    "float_copy": _float_copy_forward,
    "dequant": lambda layer, x: layer.simulated(x),
    "int_mm_a8": _a8_forward,
    "float_input": _float_forward,
    "bf16": _bf16_forward,
}


def _channels_last_input(layer: QuantModule, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """The (padded) input in channels-last memory order; strided for 1x1 convolutions.

    Returns it with (ho, wo), or None for k x k convolutions (im2col knows them).
    """
    kernel = tuple(layer.weight_shape[2:])
    pads = int8.conv_padding(layer.padding, kernel, layer.dilation)
    x = int8.pad_input(x, pads).contiguous(memory_format=torch.channels_last)
    if kernel != (1, 1) or any(pads):
        return x, None
    sh, sw = layer.stride
    if (sh, sw) != (1, 1):
        x = x[:, :, ::sh, ::sw]
    return x, (x.shape[2], x.shape[3])


def _int8_conv(layer: QuantModule, x: torch.Tensor, fused: bool, kept: bool = False) -> torch.Tensor:
    spec, layout = layer.act_spec, layer.weight_layout
    kernel = tuple(layer.weight_shape[2:])
    pads = int8.conv_padding(layer.padding, kernel, layer.dilation)
    b, _, h, w = x.shape
    ho = int8.conv_output_size(h, pads[2] + pads[3], kernel[0], layer.stride[0], layer.dilation[0])
    wo = int8.conv_output_size(w, pads[0] + pads[1], kernel[1], layer.stride[1], layer.dilation[1])
    n = layout.out_features
    reason = int8.int_mm_unsupported(b * ho * wo, layout.cols, n, x.device)
    if reason is not None:
        return fallback(layer, x, reason)
    xs, pointwise = _channels_last_input(layer, x)
    if spec.dynamic:  # pointwise only (choose_kernel)
        codes, a_scale, a_zero = int8.quantize_dynamic(xs.permute(0, 2, 3, 1).reshape(-1, xs.shape[1]), spec)
    else:
        a_scale, a_zero = layer.static_act_params()
        nhwc = int8.quantize_static(xs, a_scale, a_zero, spec).permute(0, 2, 3, 1)
        if pointwise is not None:
            codes = nhwc.reshape(-1, nhwc.shape[3])
        else:
            codes, ho, wo = int8.im2col_int8(nhwc, kernel, layer.stride, layer.dilation)
    y = _int8_matmul(layer, codes, a_scale, a_zero, fused, kept)
    return y.reshape(b, ho, wo, n).permute(0, 3, 1, 2).to(x.dtype)


def fp8_forward(layer: QuantModule, x: torch.Tensor) -> torch.Tensor:
    spec, layout = layer.act_spec, layer.weight_layout
    k, n = layout.cols, layout.out_features
    reason = fp8.shape_unsupported(k, n)
    if reason is not None:
        return fallback(layer, x, reason)
    conv = conv_geometry(layer) is not None
    if conv:  # pointwise only (choose_kernel)
        xs, _ = _channels_last_input(layer, x)
        rows = xs.permute(0, 2, 3, 1).reshape(-1, k)
    else:
        rows = x.reshape(-1, k)
    static = None if spec.dynamic else layer.static_act_params()
    weight = layer.qweight.reshape(n, k)
    y = fp8.fp8_linear(rows, spec, static, weight, layout.channel_scale(layer.wscale), layer.bias)
    if conv:
        return y.reshape(xs.shape[0], xs.shape[2], xs.shape[3], n).permute(0, 3, 1, 2).to(x.dtype)
    return y.reshape(*x.shape[:-1], n).to(x.dtype)
