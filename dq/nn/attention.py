"""Quantized attention through diffusers' attention-processor extension point.

`QuantAttnProcessor` is a drop-in replacement for `AttnProcessor2_0` (the processor of
the `Attention` modules in SD1.5/SDXL UNets, PixArt and DiT): the same projections,
masks and reshapes, but the attention core is computed explicitly so that the
post-softmax probabilities can be quantized (log2 levels by default: they are
long-tailed, see `dq.quant.logquant`) and Q, K, V fake-quantized per token and head.
Queries are processed in chunks to bound the memory of the explicit score matrix.

With `int8=True` (recipe `attention: {int8: true}`) the core runs for real as two int8
matmuls per head (`int8_attention`, SageAttention's recipe for Q K^T, and P V in int8 too):

- K is smoothed: its mean over tokens is subtracted per channel. Every score of a query row
  then drops by the same q . mean(K), which softmax does not see; what it removes is the
  channel offset K shares across tokens, which would otherwise take most of the int8 range.
- Q is int8 per block of `Q_BLOCK` query tokens and K per token (symmetric, per batch and
  head): S = (Qc Kc^T) * sq sk / sqrt(d), the product exact in int32.
- P = softmax(S) (float) as 8-bit codes of P / max(P) = exp(S - rowmax): u = round(255 P /
  max P), stored as u - 128 in int8; V is int8 per channel (its scale must be constant along
  the tokens P V sums over). P V = (max P / 255) sv ((u - 128) Vc + 128 sum_tokens Vc).
`int8_attention_reference` computes the same rounded quantities in float (the simulated
path, and what the tests compare against).

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
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import nn

from ..kernels import int8
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


Q_BLOCK = 128  # query tokens that share one int8 scale (SageAttention's per-block Q scale)


def _int8_scale(amax: torch.Tensor) -> torch.Tensor:
    return amax.clamp(min=torch.finfo(torch.float32).tiny) / 127


def _int8_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int):
    """Q, K (smoothed), V as int8 codes with their scales: Q per block of `block` query
    tokens [b, h, n, 1], K per token [b, h, 1, m], V per channel over tokens [b, h, 1, dv]."""
    q, k, v = q.float(), k.float(), v.float()
    k = k - k.mean(dim=-2, keepdim=True)
    b, h, n, d = q.shape
    blocks = -(-n // block)
    padded = torch.nn.functional.pad(q, (0, 0, 0, blocks * block - n)) if n % block else q
    q_amax = padded.abs().reshape(b, h, blocks, block * d).amax(dim=-1)
    sq = _int8_scale(q_amax).repeat_interleave(block, dim=-1)[..., :n, None]
    sk = _int8_scale(k.abs().amax(dim=-1))[..., None, :]
    sv = _int8_scale(v.abs().amax(dim=-2, keepdim=True))
    qc = torch.div(q, sq).round_().to(torch.int8)
    kc = torch.div(k, sk.transpose(-1, -2)).round_().to(torch.int8)
    vc = torch.div(v, sv).round_().to(torch.int8)
    return qc, sq, kc, sk, vc, sv


def _masked(scores: torch.Tensor, mask: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
    if mask is None:
        return scores
    m = mask[..., start:stop, :] if mask.shape[-2] > 1 else mask
    return scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"int8 attention takes [batch, heads, tokens, head_dim] tensors, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2] or q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} do not fit together")


def _int8_attention_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why `int8_attention` cannot run these shapes here (None if it can)."""
    n, d, m, dv = q.shape[-2], q.shape[-1], k.shape[-2], v.shape[-1]
    last = n % Q_BLOCK or Q_BLOCK
    return (int8.int_mm_unsupported(min(n, last), d, m, q.device)
            or int8.int_mm_unsupported(min(n, last), m, dv, q.device))


def int8_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *, block: int = Q_BLOCK
) -> torch.Tensor:
    """What `int8_attention` computes, in float (the same codes, float matmuls)."""
    _check_qkv(q, k, v)
    qc, sq, kc, sk, vc, sv = _int8_operands(q, k, v, block)
    scores = (qc.float() @ kc.float().transpose(-1, -2)) * (sq * sk / math.sqrt(q.shape[-1]))
    p = torch.softmax(_masked(scores, mask, 0, q.shape[-2]), dim=-1)
    p_max = p.amax(dim=-1, keepdim=True)
    u = (p * (255 / p_max)).round()
    return ((u @ vc.float()) * sv * (p_max / 255)).to(v.dtype)


# Score entries computed per step: eagerly small enough for the elementwise passes to stay in
# cache (2^16 was fastest of 2^14..2^20 at 256 tokens on a 2-core Xeon, 2026-12-01); compiled,
# Inductor fuses those passes and one step covers all heads (fewer traced ops).
SCORE_ELEMENTS = 1 << 16
SCORE_ELEMENTS_COMPILED = 1 << 25


def _int8_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 [s, n, k] x int8 [s, k, m] -> int32 [s, n, m]: one `torch._int_mm` per slice."""
    out = torch.empty(a.shape[0], a.shape[1], b.shape[2], dtype=torch.int32, device=a.device)
    for i in range(a.shape[0]):
        torch._int_mm(a[i], b[i], out=out[i])
    return out


# torch.compile calls it as one opaque kernel (its loop would otherwise unroll in the graph).
int8_bmm = torch.library.custom_op("dq::int8_bmm", _int8_bmm, mutates_args=())


@int8_bmm.register_fake
def _(a, b):
    return a.new_empty((a.shape[0], a.shape[1], b.shape[2]), dtype=torch.int32)


def int8_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *, block: int = Q_BLOCK
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with Q K^T and P V as int8 matmuls (`torch._int_mm`
    per batch x head, `int8_bmm`; softmax and the quantization of P batched over heads);
    [batch, heads, tokens, head_dim] tensors, see the module docstring. Returns v's dtype.
    CPU, or CUDA where `torch._int_mm` takes the shapes (more than 16 query rows, head_dim
    and key tokens multiples of 8)."""
    _check_qkv(q, k, v)
    b, h, n, d = q.shape
    m, dv = k.shape[-2], v.shape[-1]
    qc, sq, kc, sk, vc, sv = _int8_operands(q, k, v, block)
    qc, kc, vc = qc.reshape(b * h, n, d), kc.reshape(b * h, m, d), vc.reshape(b * h, m, dv)
    kt = kc.transpose(-1, -2).contiguous()  # _int_mm is faster on a contiguous right operand
    sq, sk = sq.reshape(b * h, n, 1), sk.reshape(b * h, 1, m) / math.sqrt(d)
    vsum = vc.sum(dim=-2, keepdim=True, dtype=torch.int32) * 128  # [bh, 1, dv]
    sv = sv.reshape(b * h, 1, dv)
    if mask is not None:
        mask = mask.expand(b, h, *mask.shape[2:]).reshape(b * h, *mask.shape[2:])
    compiling = torch.compiler.is_compiling()
    bmm = int8_bmm if compiling else _int8_bmm
    budget = SCORE_ELEMENTS_COMPILED if compiling else SCORE_ELEMENTS
    rows = max(1, min(n, budget // m))  # query rows per step, `heads` heads at once
    heads = max(1, budget // (rows * m))
    out = []
    for h0 in range(0, b * h, heads):
        h1 = min(h0 + heads, b * h)
        parts = []
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            acc = bmm(qc[h0:h1, r0:r1], kt[h0:h1])
            scores = acc * sk[h0:h1] * sq[h0:h1, r0:r1]
            if mask is not None:
                scores = _masked(scores, mask[h0:h1], r0, r1)
            p = torch.softmax(scores, dim=-1)
            p_max = p.amax(dim=-1, keepdim=True)  # = exp(0) / sum(exp(s - max))
            codes = (p * (255 / p_max)).round().sub(128).to(torch.int8)
            pv = bmm(codes, vc[h0:h1]) + vsum[h0:h1]
            parts.append(pv * sv[h0:h1] * (p_max / 255))
        out.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
    result = torch.cat(out, dim=0) if len(out) > 1 else out[0]
    return result.reshape(b, h, n, dv).to(v.dtype)


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


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The float attention core as `AttnProcessor2_0` calls it."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)


class CoreAttnProcessor(AttnProcessor2_0):
    """AttnProcessor2_0 with its attention core (`core`, on [batch, heads, tokens, head_dim]
    tensors) replaceable: the same projections, masks and reshapes. `original` is the processor
    it replaced."""

    original: Any = None

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return sdpa(q, k, v, mask)

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
        hidden_states = self.core(query, key, value, attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class QuantAttnProcessor(CoreAttnProcessor):
    """AttnProcessor2_0 with a quantized attention core; `original` is the processor it replaced."""

    def __init__(
        self, probs: str = "log2", probs_bits: int = 8, qkv: QuantSpec | None = None, original: Any = None,
        int8: bool = False, execution: str = "real",
    ):
        super().__init__()
        if execution not in ("real", "sim"):
            raise ValueError(f"attention execution must be 'real' or 'sim', got {execution!r}")
        self.probs = probs
        self.probs_bits = probs_bits
        self.qkv = qkv
        self.original = original
        self.int8 = bool(int8)
        # int8 only: "real" runs the int8 matmuls, "sim" their float reference (`int8_attention_reference`)
        self.execution = execution

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The attention core on [batch, heads, tokens, head_dim] tensors."""
        if not self.int8:
            return quantized_attention(q, k, v, mask, probs=self.probs, probs_bits=self.probs_bits, qkv=self.qkv)
        if self.execution == "sim" or _int8_attention_unsupported(q, k, v):
            return int8_attention_reference(q, k, v, mask)
        return int8_attention(q, k, v, mask)


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
        if isinstance(processor, CoreAttnProcessor):  # a quantized or bfloat16 core: replace what it replaced
            processor = processor.original
        if not isinstance(module, Attention) or type(processor) not in SUPPORTED_PROCESSORS:
            skipped[f"{type(module).__name__} with {type(processor).__name__}"] += 1
            continue
        module.set_processor(QuantAttnProcessor(
            config.probs, config.probs_bits, config.qkv, original=processor, int8=getattr(config, "int8", False),
        ))
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
