"""Architecture knowledge, as data, in one place.

For each denoiser class: which Linear/Conv2d layers stay in full precision by
default, and which producer -> consumer pairs later stages (smoothing, rotation)
may fuse. Any other model falls back to `GENERIC`.

Why these layers are kept (measured: BENCHMARKS.md, "Layer sensitivity"): the timestep and
conditioning embedders and the adaptive-norm modulation linears process one
vector per sample, so quantizing them saves almost no compute while their error
shifts every token of every block; the patch embedding and the final projection
touch the latent directly, where the error is not averaged away.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

QUANTIZABLE = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class ArchSpec:
    name: str
    keep: tuple[str, ...] = ()  # regexes (re.search) of module names kept in full precision
    # regexes of layers whose weights are quantized but whose activations stay in float by
    # default: the text-embedding projections, whose T5 inputs carry large outlier channels
    # (weight-only saves their memory without touching those activations)
    weight_only: tuple[str, ...] = ()
    # regexes of layers whose input a static per-tensor range fits badly: under a recipe with
    # static activations they get dynamic per-token ranges of the same bits by default. The
    # cross-attention output projection of PixArt blocks: its input is a text-dependent mix of
    # the caption's values, whose per-token scale varies from prompt to prompt (measured:
    # BENCHMARKS.md, "Static W8A8 against torchao").
    dynamic_inputs: tuple[str, ...] = ()
    # the same, only under 8-bit (or wider) weights: PixArt's self-attention q/k/v (their shared
    # input, the modulated norm) and the MLP's output projection (the GELU's output). With
    # 8-bit weights per-token ranges there gave +1.9 dB PSNR on 256 prompts; with 4-bit weights,
    # whose own error dominates, they measured 0.45 dB worse than static (w4a8, 64 prompts).
    dynamic_inputs_w8: tuple[str, ...] = ()
    # (producer regex, consumer regexes): consumers read the producer's output, so a
    # per-channel scale can be folded into the producer (smoothing, rotation).
    fuse_pairs: tuple[tuple[str, tuple[str, ...]], ...] = ()
    keep_first_last: bool = False  # generic rule: keep the first and last layer in module order
    notes: str = ""
    extra: dict[str, str] = field(default_factory=dict)


_ATTN_QKV = (r"\.to_q$", r"\.to_k$", r"\.to_v$")

ARCHS: dict[str, ArchSpec] = {
    "UNet2DConditionModel": ArchSpec(
        name="unet",
        keep=(
            r"^conv_in$", r"^conv_out$", r"^time_embedding\.", r"^add_embedding\.",
            r"^class_embedding\.", r"^encoder_hid_proj", r"\.time_emb_proj$",
        ),
        fuse_pairs=((r"\.attn1$", _ATTN_QKV),),
    ),
    "PixArtTransformer2DModel": ArchSpec(
        name="pixart",
        keep=(r"^pos_embed\.", r"^adaln_single\.", r"^proj_out$"),
        weight_only=(r"^caption_projection\.",),
        dynamic_inputs=(r"\.attn2\.to_out\.0$",),
        dynamic_inputs_w8=(r"\.attn1\.to_[qkv]$", r"\.ff\.net\.2$"),
        fuse_pairs=((r"\.norm1$", (r"\.attn1\.to_q$", r"\.attn1\.to_k$", r"\.attn1\.to_v$")),),
    ),
    "SD3Transformer2DModel": ArchSpec(
        name="sd3",
        keep=(
            r"^pos_embed\.", r"^time_text_embed\.", r"^norm_out\.",
            r"^proj_out$", r"\.norm1\.linear$", r"\.norm1_context\.linear$",
        ),
        weight_only=(r"^context_embedder$",),
        fuse_pairs=((r"\.norm1$", _ATTN_QKV), (r"\.norm1_context$", (r"\.add_[qkv]_proj$",))),
    ),
    "FluxTransformer2DModel": ArchSpec(
        name="flux",
        keep=(
            r"^x_embedder$", r"^time_text_embed\.", r"^norm_out\.",
            r"^proj_out$", r"\.norm1\.linear$", r"\.norm1_context\.linear$", r"\.norm\.linear$",
        ),
        weight_only=(r"^context_embedder$",),
        fuse_pairs=((r"\.norm1$", _ATTN_QKV), (r"\.norm1_context$", (r"\.add_[qkv]_proj$",))),
    ),
    "DiTTransformer2DModel": ArchSpec(
        name="dit",
        keep=(r"^pos_embed\.", r"\.norm1\.emb\.", r"\.norm1\.linear$", r"^proj_out_1$", r"^proj_out_2$"),
        fuse_pairs=((r"\.norm1$", _ATTN_QKV),),
    ),
}

GENERIC = ArchSpec(
    name="generic",
    keep=(r"(^|\.)(time|timestep|temb|t_embedder|time_embed)[^.]*(\.|$)",),
    keep_first_last=True,
    notes="unknown architecture: all Linear/Conv2d layers but the first, the last and time embedders",
)


def arch_for(model: nn.Module) -> ArchSpec:
    return ARCHS.get(type(model).__name__, GENERIC)


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Linear / Conv2d in module order (dq's own quantized layers excluded)."""
    return [(n, m) for n, m in model.named_modules() if type(m) in QUANTIZABLE]


def _matching(layers: list[tuple[str, nn.Module]], regexes: tuple[str, ...]) -> set[str]:
    patterns = [re.compile(p) for p in regexes]
    return {n for n, _ in layers if any(p.search(n) for p in patterns)}


def default_weight_only(model: nn.Module, spec: ArchSpec | None = None) -> set[str]:
    """Names of the layers the architecture quantizes weight-only by default."""
    spec = spec or arch_for(model)
    return _matching(quantizable_layers(model), spec.weight_only)


def default_dynamic_inputs(model: nn.Module, spec: ArchSpec | None = None, weight_bits: int | None = None) -> set[str]:
    """Names of the layers whose static activation ranges become dynamic per-token by default
    (under weights of `weight_bits`: the `dynamic_inputs_w8` layers from 8 bits up)."""
    spec = spec or arch_for(model)
    patterns = spec.dynamic_inputs + (spec.dynamic_inputs_w8 if weight_bits is not None and weight_bits >= 8 else ())
    return _matching(quantizable_layers(model), patterns)


def default_keep(model: nn.Module, spec: ArchSpec | None = None) -> set[str]:
    """Names of the layers the architecture keeps in full precision."""
    spec = spec or arch_for(model)
    layers = quantizable_layers(model)
    kept = _matching(layers, spec.keep)
    if spec.keep_first_last and layers:
        kept |= {layers[0][0], layers[-1][0]}
    return kept
