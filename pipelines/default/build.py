"""Construct the (untrained) components of the default pipeline from a config.

The pipeline is diffusers' ``PixArtAlphaPipeline``: a word-level tokenizer over the shapes
grammar, a tiny ``T5EncoderModel`` (randomly initialised here; ``text_pretrain.py`` trains it
before the transformer and the pipeline keeps it frozen), a small ``AutoencoderKL``
(4 levels: 256 px images <-> 32x32 latents) and a small ``PixArtTransformer2DModel``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    PixArtTransformer2DModel,
)
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

from . import shapes

logger = logging.getLogger(__name__)

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
# PixArtAlphaPipeline only accepts transformer sample sizes 32/64/128 (its resolution bins);
# 32 latents x a 4-level VAE (factor 8) gives the pipeline's default 256x256 output.
SAMPLE_SIZE = 32
MAX_SEQUENCE_LENGTH = 120  # PixArtAlphaPipeline's default max_sequence_length


@dataclass(frozen=True)
class TextEncoderConfig:
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    d_ff: int = 256
    # With T5's own init the relative position bias is ~0.1, attention is nearly uniform and
    # the outputs are close to a *bag* of words ("a red circle above a blue square" and "a blue
    # circle above a red square" give almost the same set of vectors). The training script
    # pretrains the encoder on the layout (text_pretrain.py), which re-draws this bias itself;
    # a larger std here only changes the random init. None keeps T5's init.
    position_bias_std: float | None = None


@dataclass(frozen=True)
class VaeConfig:
    block_out_channels: tuple[int, ...] = (16, 32, 64, 64)
    latent_channels: int = 4
    norm_num_groups: int = 8
    layers_per_block: int = 1


@dataclass(frozen=True)
class TransformerConfig:
    num_layers: int = 6
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    patch_size: int = 2


@dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"


@dataclass(frozen=True)
class PipelineConfig:
    """Architecture of the default pipeline; ``seed`` fixes the random init of every part."""

    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_tokenizer(model_max_length: int = MAX_SEQUENCE_LENGTH) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over the grammar's words that appends ``</s>``."""
    vocab = {word: i for i, word in enumerate([PAD, EOS, UNK, *shapes.vocabulary()])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=model_max_length,
        padding_side="right",
    )


def build_text_encoder(config: TextEncoderConfig, vocab_size: int) -> T5EncoderModel:
    """A random, frozen T5 encoder in eval mode (dropout is 0 in its config as well)."""
    t5_config = T5Config(
        vocab_size=vocab_size,
        d_model=config.d_model,
        d_kv=config.d_model // config.num_heads,
        d_ff=config.d_ff,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    encoder = T5EncoderModel(t5_config).eval()
    for module in encoder.modules():
        if config.position_bias_std is not None and getattr(
            module, "has_relative_attention_bias", False
        ):
            torch.nn.init.normal_(
                module.relative_attention_bias.weight, std=config.position_bias_std
            )
    encoder.requires_grad_(False)
    return encoder


def build_vae(config: VaeConfig) -> AutoencoderKL:
    levels = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        sample_size=shapes.IMAGE_SIZE,
        mid_block_add_attention=False,
        scaling_factor=1.0,  # set from the latent statistics after VAE training
    )


def build_transformer(
    config: TransformerConfig, latent_channels: int, caption_channels: int
) -> PixArtTransformer2DModel:
    return PixArtTransformer2DModel(
        num_attention_heads=config.num_attention_heads,
        attention_head_dim=config.attention_head_dim,
        in_channels=latent_channels,
        out_channels=latent_channels,  # epsilon only, no learned sigma
        num_layers=config.num_layers,
        cross_attention_dim=config.num_attention_heads * config.attention_head_dim,
        sample_size=SAMPLE_SIZE,
        patch_size=config.patch_size,
        caption_channels=caption_channels,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    )


def build_scheduler(config: SchedulerConfig) -> DPMSolverMultistepScheduler:
    """The sampling scheduler shipped with the pipeline (epsilon prediction)."""
    return DPMSolverMultistepScheduler(prediction_type="epsilon", **asdict(config))


def training_scheduler(sampling_scheduler: DPMSolverMultistepScheduler) -> DDPMScheduler:
    """The noising process used in training: the same betas as the sampler."""
    return DDPMScheduler.from_config(sampling_scheduler.config)


def build_components(config: PipelineConfig | None = None) -> dict[str, Any]:
    """Untrained pipeline components, keyed as ``PixArtAlphaPipeline`` expects them."""
    config = config or PipelineConfig()
    torch.manual_seed(config.seed)
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(config.text_encoder, vocab_size=len(tokenizer))
    vae = build_vae(config.vae)
    transformer = build_transformer(
        config.transformer, config.vae.latent_channels, caption_channels=config.text_encoder.d_model
    )
    components = {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "vae": vae,
        "transformer": transformer,
        "scheduler": build_scheduler(config.scheduler),
    }
    for name in ("text_encoder", "vae", "transformer"):
        n_params = sum(p.numel() for p in components[name].parameters())
        logger.info("%s: %.2fM parameters", name, n_params / 1e6)
    return components
