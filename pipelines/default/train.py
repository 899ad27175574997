"""Train the embedded default pipeline on procedural shapes.

Three stages, all seeded:
1. optionally (``--text-steps``; the shipped model used 600) the T5 text encoder,
   pretrained on the captions alone so that every token's output carries the scene's layout
   (which colour and shape goes where; ``text_pretrain.py``), then frozen;
2. the VAE, on freshly rendered scenes (random crops, so the 2-core CPU can afford it);
3. the PixArt transformer, on latents of a fixed rendered dataset that is encoded once and
   cached, with caption dropout (to the empty prompt) for classifier-free guidance.

``--vae-from`` reuses a trained VAE; ``--init-from`` starts the transformer and the text encoder
from an existing pipeline (fine-tuning).

The whole pipeline is saved with ``save_pretrained`` (safetensors) at every transformer
checkpoint, so an interrupted run still leaves a loadable model behind.

    python -m pipelines.default.train                   # about an hour on a 2-core CPU
    python -m pipelines.default.train --device cuda ... # one 256 px stage on a GPU

README.md has the two-stage CPU commands (``--image-size 128`` then ``--init-from``) that
trained the shipped model.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, PixArtAlphaPipeline, PixArtTransformer2DModel
from diffusers.training_utils import EMAModel
from PIL import Image
from tqdm.auto import tqdm
from transformers import T5EncoderModel

from . import shapes
from .build import PipelineConfig, TransformerConfig, build_components, training_scheduler
from .text_pretrain import pretrain_text_encoder

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path(__file__).resolve().parent / "model"
PREVIEW_PROMPTS = (
    "a red circle",
    "a blue square",
    "a green triangle",
    "a red circle above a blue square",
    "a yellow triangle below a purple circle",
    "a black square to the left of a green circle",
    "a blue triangle to the right of a red square",
    "a purple circle to the left of a yellow square",
)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    device: str = "cpu"
    out: Path = DEFAULT_OUT
    cache_dir: Path = Path("/tmp/dq_default_cache")
    # VAE stage
    vae_steps: int = 600
    vae_batch: int = 8
    vae_crop: int = 128
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-5
    # latent dataset
    num_images: int = 4000
    workers: int = 2
    two_object_prob: float = 0.75
    # training image size: below the pipeline's 256 px the transformer trains on smaller latents
    # (128 px: 16x16 latents, 64 tokens, about 4x cheaper per sample), a first stage before a
    # fine-tune at 256 px (--init-from); PixArt's position embedding spans the same canvas at
    # every size
    image_size: int = shapes.IMAGE_SIZE
    # transformer stage
    dit_steps: int = 700
    dit_batch: int = 32
    dit_lr: float = 1e-3
    warmup_steps: int = 50
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    save_every: int = 100
    patch_size: int = 2
    # text encoder: 0 keeps the random init frozen; > 0 trains it with the transformer at this
    # learning rate (then it is frozen in the saved pipeline). See README.md for why.
    text_lr: float = 0.0
    # text encoder pretraining (text_pretrain.py): steps of the layout objective before the
    # transformer stage (0 keeps the random init, as in the previous model; the shipped model
    # used 600, see README.md), its learning rate and the weight of the term that keeps the
    # outputs near the random init's
    text_steps: int = 0
    text_pretrain_lr: float = 3e-3
    text_anchor: float = 0.1
    # reuse a trained VAE (a diffusers AutoencoderKL folder) instead of the VAE stage
    vae_from: str = ""
    # fine-tune: start the transformer and the text encoder from this pipeline folder
    init_from: str = ""
    # reuse an earlier run's encoded dataset (its cache folder's latents.pt; needs --vae-from)
    latents_from: str = ""
    # timesteps drawn as T * u ** (1 / p), u uniform: 1 is uniform, 2 draws high noise levels
    # (where layout and colours are decided) more often
    timestep_power: float = 1.0
    preview: bool = True  # a row of samples at every checkpoint (slow on a CPU)


# ---------------------------------------------------------------------------- data


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def render_chunk(
    seed: int, chunk: int, n: int, two_object_prob: float, size: int = shapes.IMAGE_SIZE
) -> tuple[np.ndarray, list[str]]:
    """Render ``n`` scenes from a generator keyed by (seed, chunk), so the result does not
    depend on how chunks are spread over worker processes."""
    rng = np.random.default_rng([seed, chunk])
    scenes = [shapes.sample_scene(rng, two_object_prob=two_object_prob) for _ in range(n)]
    images = np.stack([shapes.render(scene, size=size, rng=rng) for scene in scenes])
    return images, [scene.caption() for scene in scenes]


def render_dataset(
    n: int, seed: int, two_object_prob: float, workers: int, size: int = shapes.IMAGE_SIZE
) -> tuple[np.ndarray, list[str]]:
    """``n`` rendered scenes (uint8 NHWC, ``size`` px) and their captions."""
    chunk = 256
    counts = [min(chunk, n - start) for start in range(0, n, chunk)]
    args = [(seed, i, count, two_object_prob, size) for i, count in enumerate(counts)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(
                tqdm(
                    pool.map(render_chunk, *zip(*args, strict=True)), total=len(args), desc="render"
                )
            )
    else:
        parts = [render_chunk(*a) for a in tqdm(args, desc="render")]
    return np.concatenate([p[0] for p in parts]), [c for p in parts for c in p[1]]


def random_crops(images: torch.Tensor, crop: int, generator: torch.Generator) -> torch.Tensor:
    size = images.shape[-1]
    if crop >= size:
        return images
    offsets = torch.randint(0, size - crop + 1, (images.shape[0], 2), generator=generator).tolist()
    return torch.stack(
        [img[:, y : y + crop, x : x + crop] for img, (y, x) in zip(images, offsets, strict=True)]
    )


# ---------------------------------------------------------------------------- VAE stage


def train_vae(vae: AutoencoderKL, images: np.ndarray, cfg: TrainConfig) -> AutoencoderKL:
    """L1 reconstruction + a small KL term, on random crops of the rendered scenes."""
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    vae.to(cfg.device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(cfg.vae_steps, 50))
    progress = tqdm(range(cfg.vae_steps), desc="vae", mininterval=10)
    for step in progress:
        idx = torch.randint(0, len(images), (cfg.vae_batch,), generator=generator).numpy()
        x = random_crops(to_tensor(images[idx]), cfg.vae_crop, generator).to(cfg.device)
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=None)
        recon = vae.decode(z).sample
        rec_loss = F.l1_loss(recon, x)
        kl_loss = posterior.kl().mean() / x[0].numel()
        loss = rec_loss + cfg.vae_kl_weight * kl_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 25 == 0 or step == cfg.vae_steps - 1:
            progress.set_postfix(l1=f"{rec_loss.item():.4f}", kl=f"{kl_loss.item():.1f}")
            logger.info("vae step %d l1 %.4f kl %.2f", step, rec_loss.item(), kl_loss.item())
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, images: np.ndarray, device: str) -> torch.Tensor:
    """Latents (posterior mode) of every image, computed once."""
    chunk = 32
    latents = [
        vae.encode(to_tensor(images[start : start + chunk]).to(device)).latent_dist.mode().cpu()
        for start in tqdm(range(0, len(images), chunk), desc="encode", mininterval=10)
    ]
    return torch.cat(latents)


def set_latent_scale(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Record 1/std of the latents as the VAE's scaling factor; return the scaled latents."""
    scale = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scale)
    logger.info(
        "latent mean %.3f std %.3f -> scaling_factor %.4f", latents.mean(), latents.std(), scale
    )
    return latents * scale


# ---------------------------------------------------------------------------- text


@torch.no_grad()
def caption_table(
    pipe: PixArtAlphaPipeline, captions: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 embeddings and masks for ``captions``, padded to the longest one.

    Padding to the longest caption instead of the pipeline's 120 tokens gives the same
    embeddings for the real tokens: padded positions are masked in T5 and in the transformer.
    """
    tokens = pipe.tokenizer(
        captions, padding="longest", add_special_tokens=True, return_tensors="pt"
    )
    embeds = pipe.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
    return embeds, tokens.attention_mask


# ---------------------------------------------------------------------------- transformer stage


def cosine_with_warmup(total: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def batches(n: int, batch: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - batch + 1, batch):
            yield perm[start : start + batch]


class CaptionEncoder:
    """Caption embeddings for training: a fixed table (frozen encoder) or, with a trained
    encoder, the encoder run on each batch's tokens (padded to the longest caption)."""

    def __init__(self, pipe: PixArtAlphaPipeline, vocab: list[str], trained: bool, device: str):
        self.trained = trained
        self.encoder = pipe.text_encoder
        if trained:
            tokens = pipe.tokenizer(
                vocab, padding="longest", add_special_tokens=True, return_tensors="pt"
            )
            self.ids, self.masks = tokens.input_ids.to(device), tokens.attention_mask.to(device)
            self.encoder.to(device).train().requires_grad_(True)
        else:
            embeds, masks = caption_table(pipe, vocab)
            self.embeds, self.masks = embeds.to(device), masks.to(device)

    def __call__(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.trained:
            return self.embeds[ids], self.masks[ids]
        masks = self.masks[ids]
        return self.encoder(self.ids[ids], attention_mask=masks)[0], masks


def train_transformer(
    pipe: PixArtAlphaPipeline, latents: torch.Tensor, captions: list[str], cfg: TrainConfig
) -> None:
    device = cfg.device
    transformer: PixArtTransformer2DModel = pipe.transformer.to(device).train()
    noise_scheduler = training_scheduler(pipe.scheduler)
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)

    vocab = sorted(set(captions))
    text = CaptionEncoder(pipe, [*vocab, ""], trained=cfg.text_lr > 0, device=device)
    empty = len(vocab)
    caption_ids = torch.tensor([vocab.index(c) for c in captions])

    groups = [{"params": list(transformer.parameters()), "lr": cfg.dit_lr}]
    if text.trained:
        groups.append({"params": list(pipe.text_encoder.parameters()), "lr": cfg.text_lr})
    trained = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(cfg.dit_steps, cfg.warmup_steps)
    )
    ema = EMAModel(trained, decay=cfg.ema_decay, use_ema_warmup=True, power=3 / 4)
    generator = torch.Generator().manual_seed(cfg.seed + 3)
    sampler = batches(len(latents), cfg.dit_batch, generator)
    no_conditions = {"resolution": None, "aspect_ratio": None}

    progress = tqdm(range(cfg.dit_steps), desc="transformer", mininterval=10)
    running = None
    for step in progress:
        idx = next(sampler)
        x0 = latents[idx].to(device)
        ids = caption_ids[idx].clone()
        ids[torch.rand(len(ids), generator=generator) < cfg.caption_dropout] = empty
        ids = ids.to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        num_t = noise_scheduler.config.num_train_timesteps
        u = torch.rand(len(idx), generator=generator) ** (1.0 / cfg.timestep_power)
        t = (u * num_t).long().clamp_(max=num_t - 1).to(device)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        embeds, masks = text(ids)
        pred = transformer(
            xt,
            encoder_hidden_states=embeds,
            encoder_attention_mask=masks,
            timestep=t,
            added_cond_kwargs=no_conditions,
        ).sample
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        schedule.step()
        ema.step(trained)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 25 == 0:
            progress.set_postfix(loss=f"{running:.4f}")
            logger.info(
                "transformer step %d loss %.4f (avg %.4f) lr %.2e",
                step,
                loss.item(),
                running,
                schedule.get_last_lr()[0],
            )
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.dit_steps:
            save_with_ema(pipe, ema, trained, cfg, tag=f"step{step + 1}")


def save_with_ema(
    pipe: PixArtAlphaPipeline,
    ema: EMAModel,
    params: list[torch.nn.Parameter],
    cfg: TrainConfig,
    tag: str,
) -> None:
    """Save the pipeline with the EMA weights (transformer, and text encoder when trained),
    both in eval mode; the training weights are restored afterwards."""
    ema.store(params)
    ema.copy_to(params)
    pipe.transformer.eval()
    pipe.text_encoder.eval()
    try:
        pipe.to("cpu")
        pipe.save_pretrained(cfg.out, safe_serialization=True)
        logger.info("saved pipeline (%s) to %s", tag, cfg.out)
        if cfg.preview:
            preview = cfg.cache_dir / f"preview_{tag}.png"
            save_preview(pipe, preview, seed=cfg.seed, size=cfg.image_size)
            logger.info("preview grid written to %s", preview)
    finally:
        pipe.to(cfg.device)
        ema.restore(params)
        pipe.transformer.train()
        if cfg.text_lr > 0:
            pipe.text_encoder.train()


@torch.no_grad()
def save_preview(
    pipe: PixArtAlphaPipeline,
    path: Path,
    *,
    seed: int = 0,
    prompts: tuple[str, ...] = PREVIEW_PROMPTS,
    size: int = shapes.IMAGE_SIZE,
) -> None:
    """One row of samples (default pipeline arguments, ``size`` px) for ``prompts``, saved as a
    PNG."""
    images = pipe(
        list(prompts),
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        height=size,
        width=size,
        use_resolution_binning=size == shapes.IMAGE_SIZE,
    ).images
    row = (np.concatenate(list(images), axis=1) * 255).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(row).save(path)


# ---------------------------------------------------------------------------- entry point


def train(cfg: TrainConfig, pipeline_config: PipelineConfig | None = None) -> PixArtAlphaPipeline:
    torch.manual_seed(cfg.seed)
    pipeline_config = pipeline_config or PipelineConfig(
        transformer=TransformerConfig(patch_size=cfg.patch_size), seed=cfg.seed
    )
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    pipe = PixArtAlphaPipeline(**build_components(pipeline_config))
    pipe.set_progress_bar_config(disable=True)

    # both checked before the (long) rendering, not after it
    if cfg.vae_from and not (Path(cfg.vae_from) / "config.json").is_file():
        raise SystemExit(
            f"--vae-from {cfg.vae_from}: not a diffusers AutoencoderKL folder (no config.json); "
            "pass e.g. pipelines/default/model/vae, or leave it out to train the VAE"
        )
    if cfg.image_size % 16 or not 64 <= cfg.image_size <= shapes.IMAGE_SIZE:
        raise SystemExit(
            f"--image-size {cfg.image_size}: must be a multiple of 16 from 64 to "
            f"{shapes.IMAGE_SIZE} (the VAE's factor 8 times the patch size 2); use 128 for a "
            "cheaper first stage"
        )
    if cfg.image_size != shapes.IMAGE_SIZE and not cfg.vae_from:
        raise SystemExit(
            f"--image-size {cfg.image_size} needs --vae-from (a VAE trained at the pipeline's "
            f"{shapes.IMAGE_SIZE} px, e.g. pipelines/default/model/vae)"
        )
    if cfg.timestep_power <= 0:
        raise SystemExit(
            f"--timestep-power {cfg.timestep_power}: must be positive (1 draws timesteps "
            "uniformly, 2 favours high noise)"
        )
    if cfg.latents_from and not (Path(cfg.latents_from).is_file() and cfg.vae_from):
        raise SystemExit(
            f"--latents-from {cfg.latents_from}: needs an existing latents.pt (written to an earlier "
            "run's --cache-dir) and --vae-from that run's VAE (e.g. its --out folder's vae)"
        )
    if cfg.init_from:
        missing = [
            part
            for part in ("transformer", "text_encoder")
            if not (Path(cfg.init_from) / part / "config.json").is_file()
        ]
        if missing:
            raise SystemExit(
                f"--init-from {cfg.init_from}: not a pipeline folder ({', '.join(missing)} has no "
                "config.json); pass e.g. pipelines/default/model, or leave it out to train from scratch"
            )
        pipe.register_modules(
            transformer=PixArtTransformer2DModel.from_pretrained(
                Path(cfg.init_from) / "transformer"
            ),
            text_encoder=T5EncoderModel.from_pretrained(Path(cfg.init_from) / "text_encoder")
            .eval()
            .requires_grad_(False),
        )
        logger.info("transformer and text encoder initialised from %s", cfg.init_from)
    start = time.monotonic()
    if cfg.text_steps > 0:
        pretrain_text_encoder(
            pipe.text_encoder,
            pipe.tokenizer,
            steps=cfg.text_steps,
            lr=cfg.text_pretrain_lr,
            anchor_weight=cfg.text_anchor,
            seed=cfg.seed,
            device=cfg.device,
        )
        pipe.text_encoder.to("cpu")
        logger.info("text encoder stage done in %.1f min", (time.monotonic() - start) / 60)
    if cfg.vae_from:
        pipe.register_modules(vae=AutoencoderKL.from_pretrained(cfg.vae_from))
        logger.info("VAE loaded from %s (VAE stage skipped)", cfg.vae_from)
    if cfg.latents_from:
        # scaled latents and captions of an earlier run; its VAE (with the scaling factor the
        # latents were scaled by) is the one from --vae-from
        try:
            cached = torch.load(cfg.latents_from)
            latents, captions = cached["latents"], cached["captions"]
        except Exception as error:  # a truncated or foreign file
            raise SystemExit(
                f"--latents-from {cfg.latents_from}: not a latents.pt written by this script "
                f"({error}); leave it out to render and encode the dataset again"
            ) from error
        logger.info("%d latents loaded from %s", len(latents), cfg.latents_from)
    else:
        latents, captions = make_latents(pipe, cfg, start)
    train_transformer(pipe, latents, captions, cfg)
    logger.info("done in %.1f min; pipeline saved to %s", (time.monotonic() - start) / 60, cfg.out)
    return pipe


def make_latents(
    pipe: PixArtAlphaPipeline, cfg: TrainConfig, start: float
) -> tuple[torch.Tensor, list[str]]:
    """Render the dataset, train the VAE (unless --vae-from loaded one), encode every image
    once; the scaled latents and captions are also saved to the cache folder for
    ``--latents-from``."""
    images, captions = render_dataset(
        cfg.num_images, cfg.seed, cfg.two_object_prob, cfg.workers, cfg.image_size
    )
    if cfg.vae_from:
        pipe.vae.to(cfg.device).register_to_config(scaling_factor=1.0)  # re-measured below
    else:
        train_vae(pipe.vae, images, cfg)
        pipe.vae.save_pretrained(cfg.cache_dir / "vae")
        logger.info("VAE stage done in %.1f min", (time.monotonic() - start) / 60)

    latents = encode_dataset(pipe.vae, images, cfg.device)
    del images
    latents = set_latent_scale(pipe.vae, latents)
    pipe.vae.to("cpu")
    torch.save({"latents": latents, "captions": captions}, cfg.cache_dir / "latents.pt")
    logger.info(
        "encoded %d images in %.1f min total", len(latents), (time.monotonic() - start) / 60
    )
    return latents, captions


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name, value in vars(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
            continue
        kind = Path if isinstance(value, Path) else type(value)
        parser.add_argument(flag, type=kind, default=value, help=f"(default: {value})")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    args = vars(parser.parse_args(argv))
    torch.set_num_threads(args.pop("threads"))
    return replace(defaults, **args)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    cfg = parse_args(argv)
    if cfg.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    logger.info("training config: %s", cfg)
    train(cfg)


if __name__ == "__main__":
    main()
