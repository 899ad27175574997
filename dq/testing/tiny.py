"""Tiny random-weight diffusers pipelines, built offline from configs in about a second.

Each pipeline mirrors the layout of a real model family (block types, text encoders, learned
sigma, guidance embedding) at toy width, so code that walks a real pipeline also walks these.
Tokenizers are built in memory (a byte-level CLIP BPE without merges; a T5 unigram of the stock
prompts' words with single characters as fallback), so nothing is downloaded or written to disk.
Images are 32x32 px by default (16x16 latents: the toy VAE downsamples by 2).

    >>> pipe = tiny_pipeline("sd15", seed=0)
    >>> out = pipe(**prompt_kwargs("sd15", 2), **default_call_kwargs("sd15"),
    ...            generator=torch.Generator().manual_seed(0))
    >>> out.images.shape
    (2, 32, 32, 3)

Call conventions per kind:

- ``"dit"`` is class-conditional: call it as ``pipe(class_labels=[0, 1], ...)`` with ImageNet
  ids below 1000 (its pipeline hard-codes 1000 as the null class), never with ``prompt=``.
  It has no ``height``/``width`` arguments; images are ``sample_size * vae_scale_factor``.
- ``"pixart"`` is ``PixArtAlphaPipeline``, whose default ``use_resolution_binning=True``
  raises for a transformer ``sample_size`` outside (128, 64, 32); the tiny one has
  ``sample_size=16``, so pass ``use_resolution_binning=False`` (``default_call_kwargs`` does).
- ``"flux"`` is guidance-distilled like FLUX.1-dev: ``guidance_scale`` feeds the guidance
  embedding and there is a single (conditional) branch; true CFG needs ``true_cfg_scale > 1``
  and a ``negative_prompt``.
- Every other kind runs classifier-free guidance with ``guidance_scale > 1``: the denoiser sees
  a doubled batch, unconditional half first.

The schedulers step once per inference step (DDIM, Euler, DPM-Solver, flow-match Euler), so the
denoiser is called exactly ``num_inference_steps`` times per generation.
"""

from __future__ import annotations

import logging
import string
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from typing import Any, TypeVar

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from dq.errors import DQError

logger = logging.getLogger(__name__)

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)

# Text lengths: CLIP keeps its real 77 tokens; T5 sequences are cut short for speed.
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 16

# Widths. Every Linear input width of the denoisers is a multiple of 64, so group-wise
# quantization with groups of 64 applies everywhere (as it does on the real models).
# The two CLIPs differ (like CLIP-L and OpenCLIP-G) so a mix-up of their dims fails loudly;
# T5 is at least as wide as both CLIPs together, as SD3 requires (it zero-pads the
# concatenated CLIP embeddings up to the T5 width).
CLIP_L_DIM = 64
CLIP_G_DIM = 128
T5_DIM = 256
HEADS, HEAD_DIM = 2, 32  # transformer denoisers: hidden width 64
LATENT_CHANNELS = 4  # SD1.5, SDXL, PixArt, DiT
FLOW_LATENT_CHANNELS = 16  # SD3, Flux

_PROMPTS = (
    "a photo of a cat",
    "a red car parked on a street at night",
    "an oil painting of a lighthouse",
    "a bowl of fruit on a wooden table",
    "a mountain lake at sunrise, 4k",
    "a robot reading a book",
    "portrait of an old man, studio lighting",
    "a watercolor map of a small island",
)
# ImageNet ids (DiT's own examples): shark, umbrella, golden retriever, ...
_CLASS_LABELS = (2, 879, 207, 360, 387, 974, 88, 979)


# --------------------------------------------------------------------------- helpers


@contextmanager
def _seeded(seed: int, name: str) -> Iterator[None]:
    """Seed torch from (seed, component name) without disturbing the caller's RNG state.

    Seeding per component keeps each component's weights independent of build order.
    """
    with torch.random.fork_rng(devices=[]):
        # A 32-bit value: the CPU generator (mt19937) ignores the upper bits of a seed.
        torch.manual_seed(zlib.crc32(f"{name}:{seed}".encode()))
        yield


def _build(seed: int, name: str, factory: Callable[[], ModuleT]) -> ModuleT:
    """Instantiate a model from config under its own seed, in eval mode (dropout off)."""
    with _seeded(seed, name):
        model = factory()
    return model.eval()


@cache
def _clip_vocab() -> dict[str, int]:
    """Byte-level CLIP vocabulary without merges: every word splits into its bytes."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    # Special tokens last, as in the real CLIP vocabulary (ids 49406, 49407).
    tokens = [*alphabet, *(f"{ch}</w>" for ch in alphabet), "<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}


@cache
def _t5_vocab() -> tuple[tuple[str, float], ...]:
    """T5 unigram pieces: whole words of the stock prompts, with characters as fallback.

    Whole words keep the stock prompts within ``T5_MAX_LENGTH`` tokens, so the pipelines do not
    warn about truncation; ids 0-2 are pad, eos, unk as in real T5.
    """
    words = sorted(
        {word.strip(string.punctuation) for prompt in _PROMPTS for word in prompt.split()}
    )
    chars = string.ascii_letters + string.digits + string.punctuation
    return (
        ("<pad>", 0.0),
        ("</s>", 0.0),
        ("<unk>", 0.0),
        ("\u2581", -2.0),
        *((ch, -3.0) for ch in chars),
        *((f"\u2581{word}", -1.0) for word in words if word),
    )


def _clip_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer(vocab=dict(_clip_vocab()), merges=[], model_max_length=CLIP_MAX_LENGTH)


def _t5_tokenizer() -> T5Tokenizer:
    return T5Tokenizer(vocab=list(_t5_vocab()), extra_ids=0, model_max_length=512)


def _clip_text_encoder(
    seed: int, name: str, hidden_size: int, *, with_projection: bool
) -> CLIPTextModel | CLIPTextModelWithProjection:
    vocab = _clip_vocab()
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        projection_dim=hidden_size,
        num_hidden_layers=2,  # SDXL and SD3 read hidden_states[-2]
        num_attention_heads=hidden_size // 32,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="quick_gelu",
        # eos != 2 makes CLIP pool at the first eos token (not at the argmax id).
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    model_cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return _build(seed, name, lambda: model_cls(config))


def _t5_encoder(seed: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(_t5_vocab()),
        d_model=T5_DIM,
        d_kv=32,
        d_ff=2 * T5_DIM,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as used by PixArt, SD3 and Flux
        pad_token_id=0,
        eos_token_id=1,
    )
    return _build(seed, "t5", lambda: T5EncoderModel(config))


def _vae(seed: int, latent_channels: int = LATENT_CHANNELS, **overrides: Any) -> AutoencoderKL:
    """A two-level AutoencoderKL: vae_scale_factor 2, so 32 px images have 16x16 latents."""
    config: dict[str, Any] = {
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "block_out_channels": (16, 32),
        "layers_per_block": 1,
        "latent_channels": latent_channels,
        "norm_num_groups": 8,
        "sample_size": 32,
        **overrides,
    }
    return _build(seed, "vae", lambda: AutoencoderKL(**config))


def _flow_vae(seed: int, *, scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """The SD3/Flux VAE layout: 16 latent channels, a shift, no quant convs."""
    return _vae(
        seed,
        FLOW_LATENT_CHANNELS,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _clip_l(
    seed: int, *, with_projection: bool = False
) -> CLIPTextModel | CLIPTextModelWithProjection:
    return _clip_text_encoder(seed, "clip_l", CLIP_L_DIM, with_projection=with_projection)


def _clip_g(seed: int) -> CLIPTextModelWithProjection:
    return _clip_text_encoder(seed, "clip_g", CLIP_G_DIM, with_projection=True)


def _sd_scheduler_config() -> dict[str, Any]:
    """The beta schedule shared by SD1.5 and SDXL."""
    return {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
    }


def _unet(seed: int, **config: Any) -> UNet2DConditionModel:
    """A two-level UNet on 16x16 latents (32 px); ``config`` sets the family's layout."""
    return _build(
        seed,
        "unet",
        lambda: UNet2DConditionModel(
            sample_size=16,
            in_channels=LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS,
            block_out_channels=(64, 128),
            layers_per_block=1,
            **config,
        ),
    )


def _transformer_dims() -> dict[str, int]:
    return {"num_layers": 2, "num_attention_heads": HEADS, "attention_head_dim": HEAD_DIM}


# --------------------------------------------------------------------------- builders


def _build_sd15(seed: int) -> dict[str, Any]:
    unet = _unet(
        seed,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=HEADS,  # SD1.5 config quirk: this is the number of heads
        cross_attention_dim=CLIP_L_DIM,
    )
    return {
        "unet": unet,
        "vae": _vae(seed, scaling_factor=0.18215),
        "text_encoder": _clip_l(seed),
        "tokenizer": _clip_tokenizer(),
        "scheduler": DDIMScheduler(
            **_sd_scheduler_config(), clip_sample=False, set_alpha_to_one=False
        ),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def _build_sdxl(seed: int) -> dict[str, Any]:
    time_embed_dim = 32
    n_time_ids = 6  # original size, crop top-left, target size
    unet = _unet(
        seed,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),  # heads, as in SD1.5; head dim 32
        use_linear_projection=True,
        cross_attention_dim=CLIP_L_DIM + CLIP_G_DIM,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=n_time_ids * time_embed_dim + CLIP_G_DIM,
    )
    return {
        "unet": unet,
        # force_upcast would make the pipeline cast its VAE to float32 in a bf16 call.
        "vae": _vae(seed, scaling_factor=0.13025, force_upcast=False),
        "text_encoder": _clip_l(seed),
        "text_encoder_2": _clip_g(seed),
        "tokenizer": _clip_tokenizer(),
        "tokenizer_2": _clip_tokenizer(),
        "scheduler": EulerDiscreteScheduler(**_sd_scheduler_config()),
        "add_watermarker": False,
    }


def _build_pixart(seed: int) -> dict[str, Any]:
    transformer = _build(
        seed,
        "transformer",
        lambda: PixArtTransformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=LATENT_CHANNELS,
            out_channels=2 * LATENT_CHANNELS,  # learned sigma
            cross_attention_dim=HEADS * HEAD_DIM,
            caption_channels=T5_DIM,
            **_transformer_dims(),
        ),
    )
    return {
        "transformer": transformer,
        "vae": _vae(seed, scaling_factor=0.18215),
        "text_encoder": _t5_encoder(seed),
        "tokenizer": _t5_tokenizer(),
        "scheduler": DPMSolverMultistepScheduler(),
    }


def _build_sd3(seed: int) -> dict[str, Any]:
    transformer = _build(
        seed,
        "transformer",
        lambda: SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=FLOW_LATENT_CHANNELS,
            out_channels=FLOW_LATENT_CHANNELS,
            joint_attention_dim=T5_DIM,
            caption_projection_dim=HEADS * HEAD_DIM,
            pooled_projection_dim=CLIP_L_DIM + CLIP_G_DIM,
            pos_embed_max_size=32,  # latents up to 64x64 (128 px)
            **_transformer_dims(),
        ),
    )
    return {
        "transformer": transformer,
        "vae": _flow_vae(seed, scaling_factor=1.5305, shift_factor=0.0609),
        "text_encoder": _clip_l(seed, with_projection=True),
        "text_encoder_2": _clip_g(seed),
        "text_encoder_3": _t5_encoder(seed),
        "tokenizer": _clip_tokenizer(),
        "tokenizer_2": _clip_tokenizer(),
        "tokenizer_3": _t5_tokenizer(),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
    }


def _build_flux(seed: int) -> dict[str, Any]:
    transformer = _build(
        seed,
        "transformer",
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * FLOW_LATENT_CHANNELS,  # the pipeline packs 2x2 latent patches
            num_layers=1,
            num_single_layers=2,
            num_attention_heads=HEADS,
            attention_head_dim=HEAD_DIM,
            joint_attention_dim=T5_DIM,
            pooled_projection_dim=CLIP_L_DIM,
            guidance_embeds=True,  # guidance-distilled, like FLUX.1-dev
            axes_dims_rope=(8, 12, 12),  # must sum to attention_head_dim
        ),
    )
    return {
        "transformer": transformer,
        "vae": _flow_vae(seed, scaling_factor=0.3611, shift_factor=0.1159),
        "text_encoder": _clip_l(seed),
        "text_encoder_2": _t5_encoder(seed),
        "tokenizer": _clip_tokenizer(),
        "tokenizer_2": _t5_tokenizer(),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
    }


def _build_dit(seed: int) -> dict[str, Any]:
    transformer = _build(
        seed,
        "transformer",
        lambda: DiTTransformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=LATENT_CHANNELS,
            out_channels=2 * LATENT_CHANNELS,  # learned sigma
            num_embeds_ada_norm=1000,  # DiTPipeline hard-codes class 1000 as the null label
            **_transformer_dims(),
        ),
    )
    return {
        "transformer": transformer,
        "vae": _vae(seed, scaling_factor=0.18215),
        "scheduler": DPMSolverMultistepScheduler(),
        "id2label": {i: f"class {i}" for i in range(1000)},
    }


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class _Kind:
    pipeline_cls: type[DiffusionPipeline]
    build: Callable[[int], dict[str, Any]]
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    prompt_arg: str = "prompt"


_SIZE = {"height": 32, "width": 32}
_T5_CALL = {"max_sequence_length": T5_MAX_LENGTH}

_KINDS: dict[str, _Kind] = {
    "sd15": _Kind(StableDiffusionPipeline, _build_sd15, {**_SIZE, "guidance_scale": 5.0}),
    "sdxl": _Kind(StableDiffusionXLPipeline, _build_sdxl, {**_SIZE, "guidance_scale": 5.0}),
    "pixart": _Kind(
        PixArtAlphaPipeline,
        _build_pixart,
        {
            **_SIZE,
            **_T5_CALL,
            "guidance_scale": 4.5,
            "use_resolution_binning": False,
            "clean_caption": False,  # needs bs4 + ftfy, and only warns without them
        },
    ),
    "sd3": _Kind(
        StableDiffusion3Pipeline, _build_sd3, {**_SIZE, **_T5_CALL, "guidance_scale": 5.0}
    ),
    "flux": _Kind(FluxPipeline, _build_flux, {**_SIZE, **_T5_CALL, "guidance_scale": 3.5}),
    "dit": _Kind(DiTPipeline, _build_dit, {"guidance_scale": 4.0}, prompt_arg="class_labels"),
}
KINDS: tuple[str, ...] = tuple(_KINDS)


def _kind(kind: str) -> _Kind:
    try:
        return _KINDS[kind]
    except KeyError:
        raise DQError(f"unknown tiny pipeline kind {kind!r}; choose one of {KINDS}") from None


# --------------------------------------------------------------------------- public API


def tiny_pipeline(
    kind: str, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> DiffusionPipeline:
    """Build a tiny random-weight pipeline of ``kind`` (one of ``KINDS``) on CPU.

    Same ``seed`` gives identical weights; every model is in eval mode. The progress bar is off.
    See the module docstring for how each kind is called.
    """
    spec = _kind(kind)
    start = time.perf_counter()
    pipe = spec.pipeline_cls(**spec.build(seed))
    if dtype != torch.float32:
        # Built in float32 so every dtype gets the same weights up to rounding. Plain Module.to:
        # diffusers 0.42's ModelMixin.to warns on any dtype cast, even for models with no
        # modules to keep in float32 (none of these has any).
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                torch.nn.Module.to(component, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    logger.debug(
        "built tiny %s pipeline (seed %d) in %.2f s", kind, seed, time.perf_counter() - start
    )
    return pipe


def default_call_kwargs(kind: str) -> dict[str, Any]:
    """Keyword arguments for a fast valid call of a ``kind`` pipeline: 32x32 px, 2 steps,
    ``guidance_scale > 1`` (both CFG branches run, except flux: see the module docstring),
    ``T5_MAX_LENGTH`` T5 tokens, ``output_type="np"``.

    Prompts (or dit's class labels) and the generator are not included: add ``prompt_kwargs``.
    """
    return {**_kind(kind).call_kwargs, "num_inference_steps": 2, "output_type": "np"}


def prompts_for(kind: str, n: int) -> list[str] | list[int]:
    """``n`` valid conditioning inputs: prompt strings, or ImageNet class ids for ``"dit"``."""
    pool = _CLASS_LABELS if _kind(kind).prompt_arg == "class_labels" else _PROMPTS
    return [pool[i % len(pool)] for i in range(n)]


def prompt_kwargs(kind: str, n: int) -> dict[str, Any]:
    """``{"prompt": [...]}``, or ``{"class_labels": [...]}`` for ``"dit"``, with ``n`` entries."""
    return {_kind(kind).prompt_arg: prompts_for(kind, n)}
