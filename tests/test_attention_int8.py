"""Real int8 attention (dq.nn.attention.int8_attention): its float reference, float SDPA, the
diffusers processor, torch.compile, the recipe option."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from dq.errors import DQError
from dq.kernels import set_execution
from dq.nn.attention import (
    QuantAttnProcessor,
    int8_attention,
    int8_attention_reference,
    quantize_attention,
)
from dq.recipe import AttentionConfig, Recipe


def sqnr(x, ref):
    return float(10 * torch.log10(ref.pow(2).sum() / (x - ref).pow(2).sum()))


def rel(a, b):
    return float((a - b).norm() / b.norm())


def qkv(b=2, h=3, n=40, m=56, d=24, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g)
    k = torch.randn(b, h, m, d, generator=g) + offset * torch.randn(1, 1, 1, d, generator=g)
    v = torch.randn(b, h, m, d, generator=g)
    return q, k, v


@pytest.mark.parametrize("n", [40, 200])  # one and several query blocks
def test_int8_attention_matches_its_reference_and_float(n):
    q, k, v = qkv(n=n)
    out = int8_attention(q, k, v)
    assert rel(out, int8_attention_reference(q, k, v)) < 1e-3
    assert sqnr(out, F.scaled_dot_product_attention(q, k, v)) > 30


def test_smoothing_k_keeps_a_shared_key_offset_harmless():
    q, k, v = qkv(offset=30.0)
    ref = F.scaled_dot_product_attention(q, k, v)
    assert sqnr(int8_attention(q, k, v), ref) > 30
    # without smoothing, the offset would take the int8 range: int8 K codes of the raw keys
    scale = k.abs().amax(-1, keepdim=True) / 127
    raw = F.scaled_dot_product_attention(q, (k / scale).round() * scale, v)
    assert sqnr(raw, ref) < sqnr(int8_attention(q, k, v), ref)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_masks(kind):
    q, k, v = qkv()
    keep = torch.rand(2, 1, 1, 56, generator=torch.Generator().manual_seed(1)) > 0.3
    mask = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, -1e4)
    out = int8_attention(q, k, v, mask)
    assert rel(out, int8_attention_reference(q, k, v, mask)) < 1e-3
    assert sqnr(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask)) > 28


def test_bad_shapes_are_clear_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="batch, heads, tokens, head_dim"):
        int8_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="do not fit together"):
        int8_attention(q, k[..., :8], v)


def attention_module(cross=False):
    torch.manual_seed(0)
    return Attention(query_dim=64, heads=4, dim_head=16, cross_attention_dim=32 if cross else None).eval()


@pytest.mark.parametrize("cross", [False, True])
def test_processor_on_a_diffusers_attention_module(cross):
    attn = attention_module(cross)
    x = torch.randn(2, 48, 64)
    context = torch.randn(2, 24, 32) if cross else None
    with torch.no_grad():
        ref = attn(x, encoder_hidden_states=context)
        attn.set_processor(QuantAttnProcessor(int8=True, original=attn.processor))
        real = attn(x, encoder_hidden_states=context)
        attn.processor.execution = "sim"
        sim = attn(x, encoder_hidden_states=context)
    assert isinstance(attn.processor.original, AttnProcessor2_0)
    assert rel(real, sim) < 1e-3
    assert sqnr(real, ref) > 30


def test_set_execution_switches_the_processor_and_compile_works():
    attn = attention_module()
    quantize_attention(attn, AttentionConfig(int8=True))
    assert attn.processor.int8 and attn.processor.execution == "real"
    set_execution(attn, "sim")
    assert attn.processor.execution == "sim"
    set_execution(attn, "auto")
    assert attn.processor.execution == "real"
    x = torch.randn(2, 40, 64)
    with torch.no_grad():
        eager = attn(x)
        compiled = torch.compile(attn, fullgraph=True)(x)
    assert rel(compiled, eager) < 1e-3


def test_recipe_option():
    assert Recipe.from_dict({"base": "w8a8", "attention": {"int8": True}}).attention.int8 is True
    with pytest.raises(DQError, match="qkv"):
        AttentionConfig(int8=True, qkv={"bits": 8, "granularity": "token"})
    with pytest.raises(DQError, match="attention.int8"):
        AttentionConfig(int8="yes")
    with pytest.raises(ValueError, match="execution"):
        QuantAttnProcessor(int8=True, execution="fast")
