"""Back to full precision: `dq.dequantize(pipe_or_model)` and diffusers' ``model.dequantize()``
(`DQQuantizer._dequantize`) replace every quantized layer by a plain Linear/Conv2d holding its
effective float weight, and remove everything quantizing installed."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .backend import _MODEL_METHODS, DQQuantizer
from .errors import DQError
from .nn.dtype_guard import DTYPE_ATTR, model_float_dtype, remove_dtype_guard
from .nn.layers import QuantConv2d, QuantModule
from .nn.router import ROUTER_NAME

logger = logging.getLogger(__name__)


def _effective_weight(layer: QuantModule) -> torch.Tensor:
    """The float32 weight that computes what the layer computes without activation rounding:
    dequantized codes plus the low-rank branch, with the input transform folded in."""
    weight = layer.dequantized_weight(torch.float32).float()
    if layer.branch is not None:
        weight = weight + (layer.branch.up.float() @ layer.branch.down.float()).reshape(weight.shape)
    if layer.input_transform is not None:
        channels = weight.shape[1] * (layer.conv_groups if isinstance(layer, QuantConv2d) else 1)
        eye = torch.eye(channels, device=weight.device)
        if isinstance(layer, QuantConv2d):
            if layer.conv_groups != 1:
                raise DQError(f"{layer}: dequantizing a grouped convolution with an input transform is not supported")
            mix = layer.input_transform.float()(eye.reshape(channels, channels, 1, 1)).reshape(channels, channels)
            weight = torch.einsum("oc...,dc->od...", weight, mix)
        else:
            mix = layer.input_transform.float()(eye)  # row i: the transform of input channel i
            weight = weight @ mix.T
    return weight


def _plain_layer(layer: QuantModule, dtype: torch.dtype) -> nn.Module:
    weight = _effective_weight(layer)
    device = weight.device
    has_bias = layer.bias is not None
    if isinstance(layer, QuantConv2d):
        plain = nn.Conv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride, padding=layer.padding,
            dilation=layer.dilation, groups=layer.conv_groups, bias=has_bias, device=device, dtype=dtype,
        )
    else:
        plain = nn.Linear(layer.in_features, layer.out_features, bias=has_bias, device=device, dtype=dtype)
    with torch.no_grad():
        plain.weight.copy_(weight)
        if has_bias:
            plain.bias.copy_(layer.bias)
    return plain.train(layer.training)


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized layer of `model` by a plain Linear/Conv2d with its effective float
    weight (in the model's float dtype) and remove what quantizing installed: the timestep
    router, quantized attention, the attention cores and tanh GELUs of real execution
    (`dq.nn.bf16_attention`, `dq.nn.gelu`), the dtype guard, the bound methods and the
    quantization_config.
    The result runs, casts and saves as a full-precision model (the rounding error stays)."""
    from .engine import swap_modules
    from .nn.attention import dequantize_attention
    from .nn.bf16_attention import set_attention_bf16
    from .nn.gelu import set_gelu

    dtype = model.__dict__.get(DTYPE_ATTR) or model_float_dtype(model)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantModule)}
    with torch.no_grad():
        swap_modules(model, {name: _plain_layer(m, dtype) for name, m in layers.items()})
    dequantize_attention(model)
    set_attention_bf16(model, False)  # the execution's measured replacements too: plain float32 again
    set_gelu(model, False)
    handle = model.__dict__.pop("_dq_router_handle", None)
    if handle is not None:
        handle.remove()
    if ROUTER_NAME in model._modules:
        del model._modules[ROUTER_NAME]
    for attr in ("_dq_timestep_position", "_dq_recipe", "_dq_source"):
        model.__dict__.pop(attr, None)
    remove_dtype_guard(model)
    for name in _MODEL_METHODS:
        model.__dict__.pop(name, None)
    internal = getattr(model, "_internal_dict", None)
    if internal is not None and ("quantization_config" in internal or "_pre_quantization_dtype" in internal):
        from diffusers.configuration_utils import FrozenDict

        model._internal_dict = FrozenDict(
            {k: v for k, v in internal.items() if k not in ("quantization_config", "_pre_quantization_dtype")}
        )
    logger.info("dequantized %d layers of %s", len(layers), type(model).__name__)
    return model


def dequantize(target: Any) -> Any:
    """Give a dq-quantized pipeline (its denoiser, and text encoders dq quantized) or model back
    plain float layers, in place; returns `target`. ``model.dequantize()`` does the same for a
    model (diffusers' and transformers' API)."""
    from .engine import find_denoiser, is_quantized
    from .text_encoders import dequantize_encoder, is_quantized_encoder, text_encoders

    model = target if isinstance(target, nn.Module) else find_denoiser(target)[1]
    encoders = {} if isinstance(target, nn.Module) else {
        n: m for n, m in text_encoders(target).items() if is_quantized_encoder(m)}
    quantized = is_quantized(model)
    if not quantized and not encoders:
        what = "" if isinstance(target, nn.Module) else " (nor are the pipeline's text encoders)"
        raise DQError(f"{type(model).__name__} is not quantized by dq{what}; nothing to dequantize")
    if quantized and isinstance(getattr(model, "hf_quantizer", None), DQQuantizer):
        model.dequantize()  # diffusers' ModelMixin.dequantize: our _dequantize, then drops hf_quantizer
    elif quantized:
        dequantize_model(model)
    for encoder in encoders.values():
        if getattr(encoder, "hf_quantizer", None) is not None:
            encoder.dequantize()  # transformers' PreTrainedModel.dequantize: drops the config too
        else:
            dequantize_encoder(encoder)
    return target
