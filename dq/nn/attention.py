"""Quantized attention through diffusers' attention-processor extension point.

`QuantAttnProcessor` is a drop-in replacement for `AttnProcessor2_0` (the processor of
the `Attention` modules in SD1.5/SDXL UNets, PixArt and DiT): the same projections,
masks and reshapes, but the attention core is computed explicitly so that the
post-softmax probabilities can be quantized (log2 levels by default: they are
long-tailed, see `dq.quant.logquant`) and Q, K, V fake-quantized per token and head.
Queries are processed in chunks to bound the memory of the explicit score matrix.

`quantize_attention(model, config)` installs it on the matching modules (keeping the
processor it replaces); `dequantize_attention(model)` puts the originals back.
Processors of other kinds (SD3's joint attention, Flux) are left alone, with one log
line per kind.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Any

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import nn

from ..quant import primitives as P
from ..quant.logquant import log2_quantize_probs, uniform_quantize_probs
from ..quant.spec import QuantSpec

logger = logging.getLogger(__name__)

SUPPORTED_PROCESSORS = (AttnProcessor2_0, AttnProcessor)
QUERY_CHUNK = 1024


def quantize_probs(p: torch.Tensor, method: str, bits: int) -> torch.Tensor:
    if method == "log2":
        return log2_quantize_probs(p, bits)
    if method == "uniform":
        return uniform_quantize_probs(p, bits)
    return p


def quantized_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    probs: str = "log2",
    probs_bits: int = 8,
    qkv: QuantSpec | None = None,
    chunk: int = QUERY_CHUNK,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v on [batch, heads, tokens, head_dim] tensors, with
    quantized probabilities (and q, k, v when `qkv` is given)."""
    if qkv is not None:
        q, k, v = (P.fake_quantize(t, qkv) for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1])
    kt = k.transpose(-1, -2)
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=v.dtype, device=v.device)
    for start in range(0, q.shape[-2], chunk):
        stop = min(start + chunk, q.shape[-2])
        scores = (q[..., start:stop, :] @ kt).float() * scale
        if mask is not None:
            m = mask[..., start:stop, :] if mask.shape[-2] > 1 else mask
            scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
        p = quantize_probs(torch.softmax(scores, dim=-1), probs, probs_bits)
        out[..., start:stop, :] = (p.to(v.dtype) @ v)
    return out


class QuantAttnProcessor(AttnProcessor2_0):
    """AttnProcessor2_0 with a quantized attention core; `original` is the processor it replaced."""

    def __init__(self, probs: str = "log2", probs_bits: int = 8, qkv: QuantSpec | None = None, original: Any = None):
        super().__init__()
        self.probs = probs
        self.probs_bits = probs_bits
        self.qkv = qkv
        self.original = original

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, context_len, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = quantized_attention(
            query, key, value, attention_mask, probs=self.probs, probs_bits=self.probs_bits, qkv=self.qkv
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that hold a diffusers attention processor (Attention, FluxAttention, ...)."""
    return [
        (name, m) for name, m in model.named_modules()
        if hasattr(m, "processor") and callable(getattr(m, "set_processor", None))
    ]


def quantize_attention(model: nn.Module, config) -> int:
    """Install `QuantAttnProcessor` on the attention modules `config` (an AttentionConfig)
    selects; returns how many. Unsupported processor kinds are skipped, one log line each."""
    installed, skipped = 0, Counter()
    for name, module in _attention_modules(model):
        if not config.applies_to(name):
            continue
        processor = module.processor
        if isinstance(processor, QuantAttnProcessor):
            processor = processor.original
        if not isinstance(module, Attention) or type(processor) not in SUPPORTED_PROCESSORS:
            skipped[f"{type(module).__name__} with {type(processor).__name__}"] += 1
            continue
        module.set_processor(QuantAttnProcessor(config.probs, config.probs_bits, config.qkv, original=processor))
        installed += 1
    for kind, count in skipped.items():
        logger.info(
            "attention quantization skipped %d %s module(s): only Attention modules with "
            "AttnProcessor2_0/AttnProcessor are supported", count, kind,
        )
    return installed


def dequantize_attention(model: nn.Module) -> int:
    """Put back the processors `quantize_attention` replaced; returns how many."""
    restored = 0
    for _, module in _attention_modules(model):
        processor = module.processor
        if isinstance(processor, QuantAttnProcessor):
            module.set_processor(processor.original if processor.original is not None else AttnProcessor2_0())
            restored += 1
    return restored
