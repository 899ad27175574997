"""Which kernel runs each quantized layer, and the real forward pass.

`choose_kernel` looks at a layer's formats once (when the execution mode is set);
`real_forward` checks what only the call can tell (the device, the number of rows)
and falls back to the simulated path, which computes the same function in float,
with a debug log line, where the kernel cannot take the call.

Kernels:
- "int8": integer activations x integer weights, `torch._int_mm` (CPU and CUDA);
  W8A8, W4A8 (4-bit codes unpacked per call), W4A4 (4-bit codes in int8).
- "fp8": float8 x float8, `torch._scaled_mm` (CUDA, compute capability >= 8.9).
- "dequant": weight-only quantization: the stored (packed) weight is dequantized
  per call into the input's dtype and the float op runs; what it saves is memory.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import DQError
from . import fp8, int8, onednn

if TYPE_CHECKING:
    from ..nn.layers import QuantModule

logger = logging.getLogger(__name__)

EXECUTION_MODES = ("auto", "real", "sim")


# -- choosing -----------------------------------------------------------------------
def _conv_geometry(layer: QuantModule) -> tuple[tuple[int, int], bool] | None:
    """(kernel size, has padding) of a convolution; None for a linear layer."""
    if getattr(layer, "conv_groups", None) is None:
        return None
    kernel = tuple(layer.weight_shape[2:])
    pads = int8.conv_padding(layer.padding, kernel, layer.dilation)
    return kernel, any(pads)


def choose_kernel(layer: QuantModule) -> tuple[str | None, str]:
    """(kernel, why not) for a layer's formats; kernel None: only the simulated path."""
    w, a, layout = layer.weight_spec, layer.act_spec, layer.weight_layout
    if w is None:
        return None, "activation-only quantization (float weights) has no low-bit kernel"
    if a is None:
        return "dequant", ""
    conv = _conv_geometry(layer)
    if conv is not None and layer.conv_groups > 1:
        return None, "grouped convolutions have no low-bit kernel"
    pointwise = conv is None or (conv[0] == (1, 1) and not conv[1])
    if w.kind == "int" and a.kind == "int":
        if not layout.integer_matmul_ready:
            if w.log:
                return None, "log-domain weights have no integer kernel"
            if w.granularity == "group":
                return None, "group-wise weights without two-level scales (over 6 bits, or GPTQ codes) have no integer kernel"
            return None, f"asymmetric {w.bits}-bit weights do not fit int8 once their zero point is folded in"
        if a.dynamic and not pointwise:
            return None, "dynamic activations of a k x k or padded convolution have no integer kernel"
        return "int8", ""
    if w.kind.startswith("fp8") and a.kind.startswith("fp8"):
        if w.granularity == "group":
            return None, "group-wise fp8 weights have no fp8 kernel"
        if w.kind == a.kind == "fp8_e5m2":
            return None, "fp8 matmuls take at most one e5m2 operand"
        if not pointwise:
            return None, "k x k convolutions have no fp8 kernel"
        return "fp8", ""
    return None, f"{w.kind} weights with {a.kind} activations have no kernel"


# -- running ------------------------------------------------------------------------
def _fallback(layer: QuantModule, x: torch.Tensor, reason: str, level: int = logging.DEBUG) -> torch.Tensor:
    if not torch.compiler.is_compiling():
        seen = layer.__dict__.setdefault("_dq_fallbacks", set())
        if reason not in seen:
            seen.add(reason)
            logger.log(level, "%s: %s; running the simulated path", getattr(layer, "_dq_name", type(layer).__name__), reason)
    return layer.simulated(x)


def real_forward(layer: QuantModule, x: torch.Tensor) -> torch.Tensor:
    """The layer's quantized op (`QuantModule.compute`) through its kernel."""
    if layer.kernel == "int8":
        if _conv_geometry(layer) is None:
            return _int8_linear(layer, x)
        return _int8_conv(layer, x)
    if layer.kernel == "fp8":
        reason = fp8.device_unsupported(x.device)
        if reason is not None:
            if layer.strict_execution:
                raise DQError(f"fp8 execution: {reason}; {fp8.FP8_ALTERNATIVES}")
            return _fallback(layer, x, reason, logging.INFO)
        return _fp8_forward(layer, x)
    return layer.simulated(x)


def _integer_weight(layer: QuantModule) -> torch.Tensor:
    """int8 weight [n, k], columns in the order the kernel's rows use."""
    weight = layer.weight_layout.integer_weight(layer.qweight, layer.wzero, layer.wmult)
    return weight if _conv_geometry(layer) is None else int8.patch_order(weight, layer.weight_shape)


def _int8_matmul(layer: QuantModule, codes: torch.Tensor, a_scale, a_zero) -> torch.Tensor:
    prepacked = getattr(layer, "_dq_prepacked", None)
    if prepacked is not None and codes.device.type == "cpu" and a_scale.numel() == 1:
        return prepacked(codes, a_scale, a_zero, layer.bias)
    return int8.int_linear(
        codes, a_scale, a_zero, _integer_weight(layer), layer.weight_layout.channel_scale(layer.wscale),
        getattr(layer, "wsum", None), layer.bias,
    )


def _int8_linear(layer: QuantModule, x: torch.Tensor) -> torch.Tensor:
    spec, layout = layer.act_spec, layer.weight_layout
    k, n = layout.cols, layout.out_features
    reason = int8.int_mm_unsupported(x.numel() // k, k, n, x.device)
    if reason is not None:
        return _fallback(layer, x, reason)
    if spec.dynamic:
        codes, a_scale, a_zero = int8.quantize_dynamic(x.reshape(-1, k), spec)
    else:
        a_scale, a_zero = layer.static_act_params()
        codes = int8.quantize_static(x, a_scale, a_zero, spec).reshape(-1, k)
    y = _int8_matmul(layer, codes, a_scale, a_zero)
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


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


def _int8_conv(layer: QuantModule, x: torch.Tensor) -> torch.Tensor:
    spec, layout = layer.act_spec, layer.weight_layout
    kernel = tuple(layer.weight_shape[2:])
    pads = int8.conv_padding(layer.padding, kernel, layer.dilation)
    b, _, h, w = x.shape
    ho = int8.conv_output_size(h, pads[2] + pads[3], kernel[0], layer.stride[0], layer.dilation[0])
    wo = int8.conv_output_size(w, pads[0] + pads[1], kernel[1], layer.stride[1], layer.dilation[1])
    n = layout.out_features
    reason = int8.int_mm_unsupported(b * ho * wo, layout.cols, n, x.device)
    if reason is not None:
        return _fallback(layer, x, reason)
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
    y = _int8_matmul(layer, codes, a_scale, a_zero)
    return y.reshape(b, ho, wo, n).permute(0, 3, 1, 2).to(x.dtype)


def _fp8_forward(layer: QuantModule, x: torch.Tensor) -> torch.Tensor:
    spec, layout = layer.act_spec, layer.weight_layout
    k, n = layout.cols, layout.out_features
    reason = fp8.shape_unsupported(k, n)
    if reason is not None:
        return _fallback(layer, x, reason)
    conv = _conv_geometry(layer) is not None
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


# -- setting the mode -----------------------------------------------------------------
def _prepare(layer: QuantModule, cpu_prepack: bool) -> None:
    """Runtime tensors a kernel needs (not saved): weight row sums, oneDNN's weight copy."""
    layer._buffers.pop("wsum", None)
    layer._non_persistent_buffers_set.discard("wsum")
    layer.__dict__.pop("_dq_prepacked", None)
    if layer.kernel != "int8" or layer.qweight.is_meta:
        return
    layout = layer.weight_layout
    weight = _integer_weight(layer)
    if not layer.act_spec.symmetric:
        layer.register_buffer("wsum", weight.sum(dim=1, dtype=torch.int32).float(), persistent=False)
    # Packed 4-bit weights stay packed (unpacked per call): a prepacked copy would undo the saving.
    if cpu_prepack and not layout.packed and layer.qweight.device.type == "cpu" and onednn.available():
        layer._dq_prepacked = onednn.Prepacked(weight, layout.channel_scale(layer.wscale))


def check_execution(layers: dict[str, QuantModule], mode: str) -> dict[str, tuple[str | None, str]]:
    """The kernel of each layer under `mode` (see `set_execution`); raises DQError, changing
    nothing, where the mode cannot be honoured. Call it before swapping layers into a model."""
    if mode not in EXECUTION_MODES:
        raise DQError(f"unknown execution mode {mode!r}; choose one of {list(EXECUTION_MODES)}")
    choices = {name: choose_kernel(m) for name, m in layers.items()}
    if mode == "real":
        missing = {name: why for name, (kernel, why) in choices.items() if kernel is None}
        if missing:
            examples = "; ".join(f"{name}: {why}" for name, why in list(missing.items())[:3])
            raise DQError(
                f"execution 'real': {len(missing)} layer(s) have no low-bit kernel ({examples}); use execution "
                "'auto' to run those simulated, or a recipe whose formats have kernels (w8a8, w4a8, w4a16, fp8)"
            )
        if any(kernel == "fp8" for kernel, _ in choices.values()) and not fp8.any_device():
            raise DQError(f"execution 'real' with fp8 layers needs a CUDA GPU of compute capability >= 8.9, and "
                          f"this machine has none; {fp8.FP8_ALTERNATIVES}")
    return choices


def set_execution(model: nn.Module, mode: str, *, cpu_prepack: bool = True) -> nn.Module:
    """Run every quantized layer of `model` through low-bit kernels or simulated.

    mode "real": every layer must have a kernel (else DQError, nothing changed);
    "auto": real where a layer has one, simulated otherwise, one log line per reason;
    "sim": fake quantization in float everywhere (research). Shapes a kernel cannot
    take at call time (see `real_forward`) run simulated in every mode.
    cpu_prepack: int8 layers on CPU (8-bit weights) keep a oneDNN-layout copy of
    their weight for the fused kernel (`dq.kernels.onednn`): faster, one more byte
    per weight in memory; False keeps one copy and uses `torch._int_mm`.
    Runtime tensors derived from the weights are made here: call it again after
    changing a layer's stored weights in place.
    """
    from ..nn.layers import QuantModule

    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantModule)}
    choices = check_execution(layers, mode)
    why_sim: dict[str, list[str]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    for name, m in layers.items():
        kernel, why = choices[name]
        object.__setattr__(m, "_dq_name", name or type(m).__name__)
        m.__dict__.pop("_dq_fallbacks", None)
        if mode == "sim" or kernel is None:
            m.execution, m.kernel, m.strict_execution = "sim", None, False
            if mode != "sim":
                why_sim[why].append(name)
        else:
            m.execution, m.kernel, m.strict_execution = "real", kernel, mode == "real"
        _prepare(m, cpu_prepack)
        counts[m.kernel or "sim"] += 1
    for why, names in why_sim.items():
        logger.info("execution %s: %d layer(s) run simulated: %s (e.g. %s)", mode, len(names), why, names[0])
    if counts.get("fp8") and not fp8.any_device():
        logger.info(
            "execution %s: %d fp8 layer(s) run simulated until they are on a CUDA GPU of compute capability >= 8.9",
            mode, counts["fp8"],
        )
    logger.info("execution %s: %s", mode, ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    return model
