"""Weight-only quantization of a pipeline's text encoders (CLIP, T5).

Most of the memory of PixArt, SD3 and FLUX pipelines is the T5 encoder (4.8 B parameters in
T5-XXL against 0.6 B for PixArt-Sigma's transformer). It runs once per prompt, not once per
step, so its speed matters little and its weights matter most: dq quantizes its Linear layers
weight-only (activations stay in float, so no calibration is needed), with the same layers and
kernels as the denoiser's weight-only layers.

At load: ``dq.load(dir, text_encoders="w8a16")``, or diffusers' ``PipelineQuantizationConfig(
quant_backend="dq", ...)`` through dq's transformers backend (`dq.text_backend`).

Saving: transformers loads a text-encoder folder by itself, and dq quantizes text encoders at
load but does not load them quantized, so a folder written with quantized encoders would be read
back as float weights full of codes, without an error. `dq.save` therefore refuses a pipeline
whose text encoders are quantized; quantize them again at load instead (weight-only, a few
seconds, no calibration).
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from .errors import DQError
from .kernels import set_execution
from .nn.layers import QuantLinear, QuantModule
from .recipe import Recipe

logger = logging.getLogger(__name__)

TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3")
MARK = "_dq_text_encoder_recipe"


def text_encoders(pipe) -> dict[str, nn.Module]:
    return {name: m for name in TEXT_ENCODER_NAMES if isinstance(m := getattr(pipe, name, None), nn.Module)}


def module_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer (each stored tensor counted once)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def is_quantized_encoder(module: nn.Module) -> bool:
    return getattr(module, MARK, None) is not None


def quantize_text_encoders(pipe, recipe: str | Recipe | dict = "w8a16", *, names: list[str] | None = None) -> dict[str, tuple[int, int]]:
    """Quantize the Linear layers of the pipeline's text encoders weight-only, in place.

    recipe: a weight-only recipe (its `weight` format is used; e.g. "w8a16", "w4a16").
    names: which components (default: every text encoder the pipeline has).
    Returns {component: (bytes before, bytes after)}.
    """
    recipe = Recipe.from_any(recipe)
    check_weight_only(recipe)
    found = text_encoders(pipe)
    if names is not None:
        unknown = [n for n in names if n not in found]
        if unknown:
            raise DQError(f"{type(pipe).__name__} has no text encoder {unknown}; it has {sorted(found) or 'none'}")
        found = {n: found[n] for n in names}
    if not found:
        raise DQError(f"{type(pipe).__name__} has no text encoder to quantize")
    done = {n: getattr(m, MARK) for n, m in found.items() if is_quantized_encoder(m)}
    if done:  # before any is changed
        raise DQError(f"already quantized: {done}; load the pipeline again to change them")
    sizes = {}
    for name, encoder in found.items():
        sizes[name] = quantize_encoder(encoder, recipe, name)
    return sizes


def check_weight_only(recipe: Recipe) -> None:
    if recipe.weight is None or recipe.activation is not None:
        raise DQError(
            f"text encoders are quantized weight-only; recipe {recipe.name!r} "
            f"{'has no weight format' if recipe.weight is None else 'quantizes activations'}: use 'w8a16' or 'w4a16'"
        )


def quantize_encoder(encoder: nn.Module, recipe: Recipe, name: str) -> tuple[int, int]:
    """Quantize one text encoder's Linear layers weight-only, in place; (bytes before, after)."""
    from .engine import swap_modules

    check_weight_only(recipe)
    if is_quantized_encoder(encoder):
        raise DQError(f"{name} is already quantized (recipe {getattr(encoder, MARK)}); load the pipeline again to change it")
    spec = recipe.weight
    before = module_bytes(encoder)
    keep = [re.compile(p) for p in recipe.keep]  # the recipe's keep (DQConfig's modules_to_not_convert)
    layers = [(n, m) for n, m in encoder.named_modules() if type(m) is nn.Linear and not any(p.search(n) for p in keep)]
    replacements = {}
    with torch.no_grad():
        for layer_name, layer in layers:
            w_spec = spec
            if spec.granularity == "group" and layer.in_features % spec.group_size:
                w_spec = spec.replace(granularity="channel")
            replacements[layer_name] = QuantLinear.from_float(layer, w_spec, None, None, None)
    swap_modules(encoder, replacements)
    set_execution(encoder, recipe.execution)
    setattr(encoder, MARK, recipe.name)
    encoder.save_pretrained = _refuse_save(name)  # pipe.save_pretrained calls it: refused too
    after = module_bytes(encoder)
    logger.info("%s: %d Linear layers quantized weight-only (%s; %d kept by the recipe's keep): %.1f -> %.1f MB",
                name, len(replacements), recipe.name,
                sum(1 for n, m in encoder.named_modules() if type(m) is nn.Linear), before / 2**20, after / 2**20)
    return before, after


def dequantize_encoder(encoder: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Give a text encoder quantized by `quantize_encoder` back plain Linear layers holding the
    dequantized weights (in `dtype`, default the encoder's float dtype), in place; it saves as a
    float model again (the rounding error stays)."""
    from .dequant import _plain_layer
    from .engine import swap_modules

    if dtype is None:
        dtype = next((p.dtype for p in encoder.parameters() if p.is_floating_point()), torch.float32)
    layers = {n: m for n, m in encoder.named_modules() if isinstance(m, QuantModule)}
    with torch.no_grad():
        swap_modules(encoder, {n: _plain_layer(m, dtype) for n, m in layers.items()})
    encoder.__dict__.pop(MARK, None)
    encoder.__dict__.pop("save_pretrained", None)  # `_refuse_save`
    return encoder


def _refuse_save(name: str):
    def save_pretrained(*_args, **_kwargs):
        raise DQError(
            f"{name} is quantized by dq and cannot be saved quantized: transformers, which loads text encoders, "
            "would read the codes back as float weights (dq quantizes text encoders at load, it does not load them "
            "quantized). Save the pipeline before quantizing its text encoders, and quantize them again at load: "
            "dq.load(dir, text_encoders='w8a16'), or from_pretrained(dir, quantization_config=PipelineQuantizationConfig("
            "quant_backend='dq', quant_kwargs={'recipe': 'w8a16'}, components_to_quantize=[...]))"
        )
    return save_pretrained


def check_savable(pipe) -> None:
    """Refuse (DQError) to save a pipeline whose text encoders dq quantized (see the module doc)."""
    quantized = [n for n, m in text_encoders(pipe).items() if is_quantized_encoder(m) or any(isinstance(x, QuantModule) for x in m.modules())]
    if quantized:
        raise DQError(
            f"{', '.join(quantized)} are quantized by dq, and transformers, which loads text encoders, would read "
            "the saved codes as float weights without an error (dq quantizes text encoders at load, it does not load "
            "them quantized). Save the pipeline before quantizing its text encoders, and quantize them again after "
            "loading: dq.load(dir, text_encoders='w8a16')"
        )
