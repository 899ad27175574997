"""Train dq's evaluator CLIP on procedural scenes (seeded; about 10-15 minutes on 1 CPU core).

    python -m dq_pipelines.default.evaluator.train_clip [--steps N] [--seed S] [--out DIR]

The model is the open_clip architecture in ``dq-evaluator-clip.json``; it sees scenes rendered
at the pipeline's output size and resized by open_clip's own preprocessing, distorted the way a
small diffusion model distorts them (blur, noise, colour casts, shifts). Besides the usual
contrastive loss, every image is also classified among captions that differ from its own in one
attribute slot (hard negatives), which is what attribute accuracy asks of it. At the end the
weights are saved (fp16 safetensors; embedding rows of tokens the grammar never uses are zeroed,
which keeps the file small once compressed), reloaded through ``dq.eval.clip.load_clip`` and
validated on freshly rendered scenes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from tqdm import tqdm

from dq.eval.attributes import attribute_accuracy
from dq.eval.clip import EVALUATOR_NAME, ClipModel, load_clip
from dq_pipelines.default import shapes

logger = logging.getLogger("train_clip")

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    started = time.time()

    open_clip.add_model_config(HERE / f"{EVALUATOR_NAME}.json")
    model, _, preprocess = open_clip.create_model_and_transforms(EVALUATOR_NAME)
    tokenizer = open_clip.get_tokenizer(EVALUATOR_NAME)
    resize = _resize_transform(preprocess)
    mean = torch.tensor(model.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)

    grammar = _Grammar.build(tokenizer)
    heads = _LayoutHeads(model.text_projection.shape[1])
    images, labels = _render_dataset(args.num_images, rng, resize)
    logger.info("rendered %d training images in %.0f s", len(images), time.time() - started)

    model.train()
    named = [*model.named_parameters(), *heads.named_parameters()]
    decay = [p for n, p in named if p.ndim >= 2 and "token_embedding" not in n]
    no_decay = [p for n, p in named if p.ndim < 2 or "token_embedding" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, args.steps, warmup=50)
    )
    progress = tqdm(range(args.steps), desc="evaluator CLIP", unit="step")
    for step in progress:
        pairs = rng.integers(len(images) // 2, size=args.batch_size // 2)
        batch = torch.from_numpy(np.stack([2 * pairs, 2 * pairs + 1], axis=1).reshape(-1))
        pixels = (_augment(images[batch].float() / 255, rng) - mean) / std
        loss = _loss(model, heads, pixels, [labels[i] for i in batch.tolist()], grammar, rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        progress.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % args.log_every == 0:
            logger.info("step %d/%d loss %.4f", step + 1, args.steps, loss.item())
    train_seconds = time.time() - started

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _save(model, grammar.tokens, out)
    summary = {
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "num_images": args.num_images,
        "threads": args.threads,
        "train_seconds": round(train_seconds, 1),
        "validation": _validate(out, args.seed + 1, args.num_val),
    }
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("summary: %s", json.dumps(summary))


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--num-images", type=int, default=12000, help="distinct rendered training images"
    )
    parser.add_argument(
        "--num-val", type=int, default=400, help="fresh scenes for the final validation"
    )
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared)")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--out", default=str(HERE), help="where the weights and summary go")
    return parser.parse_args(argv)


@dataclass
class _Grammar:
    """Every caption of the grammar with its tokens, the id of the picture it draws (captions with
    the same layout id are interchangeable answers) and its layout targets for the auxiliary
    heads: per canvas position (centre, top, bottom, left, right), the colour and the shape
    there (or none), read off the renderer's own object boxes."""

    captions: list[str]
    index: dict[str, int]
    tokens: torch.Tensor
    layout_ids: torch.Tensor
    colour_targets: torch.Tensor  # (captions, positions)
    shape_targets: torch.Tensor

    @classmethod
    def build(cls, tokenizer) -> _Grammar:
        captions = shapes.all_captions()
        layouts: dict[bytes, int] = {}
        ids, colours, kinds = [], [], []
        colour_names, shape_names = list(shapes.COLOURS), list(shapes.SHAPES)
        for caption in captions:
            scene = shapes.parse_caption(caption)
            key = shapes.render(scene, size=32).tobytes()
            ids.append(layouts.setdefault(key, len(layouts)))
            colour_row = [len(colour_names)] * _POSITIONS
            shape_row = [len(shape_names)] * _POSITIONS
            for obj, box in zip(scene.objects, shapes.object_boxes(scene)):
                position = _position(box)
                colour_row[position] = colour_names.index(obj.colour)
                shape_row[position] = shape_names.index(obj.shape)
            colours.append(colour_row)
            kinds.append(shape_row)
        return cls(
            captions,
            {c: i for i, c in enumerate(captions)},
            tokenizer(captions),
            torch.tensor(ids),
            torch.tensor(colours),
            torch.tensor(kinds),
        )


_POSITIONS = 5  # centre, top, bottom, left, right


def _position(box: tuple[float, float, float]) -> int:
    cx, cy, _ = box
    dx, dy = cx / shapes.IMAGE_SIZE - 0.5, cy / shapes.IMAGE_SIZE - 0.5
    if max(abs(dx), abs(dy)) < 0.1:
        return 0
    if abs(dy) > abs(dx):
        return 1 if dy < 0 else 2
    return 3 if dx < 0 else 4


class _LayoutHeads(torch.nn.Module):
    """Training-only linear probes that read the layout off both towers' embeddings. They give
    each tower a direct signal to bind colour and shape to position, which the contrastive loss
    alone teaches very slowly; they are not saved."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.colours, self.shapes = len(shapes.COLOURS) + 1, len(shapes.SHAPES) + 1
        self.image = torch.nn.Linear(dim, _POSITIONS * (self.colours + self.shapes))
        self.text = torch.nn.Linear(dim, _POSITIONS * (self.colours + self.shapes))

    def loss(
        self, head: torch.nn.Linear, emb: torch.Tensor, colours: torch.Tensor, kinds: torch.Tensor
    ):
        logits = head(emb * 8).view(-1, _POSITIONS, self.colours + self.shapes)
        colour_loss = F.cross_entropy(logits[..., : self.colours].flatten(0, 1), colours.flatten())
        shape_loss = F.cross_entropy(logits[..., self.colours :].flatten(0, 1), kinds.flatten())
        return colour_loss + shape_loss


def _resize_transform(preprocess):
    """open_clip's own resize and crop (everything before ToTensor/Normalize)."""
    steps = []
    for transform in preprocess.transforms:
        if type(transform).__name__ in (
            "MaybeToTensor",
            "ToTensor",
            "Normalize",
            "MaybeConvertMode",
        ):
            continue
        steps.append(transform)

    def apply(image: Image.Image) -> Image.Image:
        for transform in steps:
            image = transform(image)
        return image

    return apply


def _render_dataset(n: int, rng: np.random.Generator, resize) -> tuple[torch.Tensor, list]:
    """``n`` images in pairs: a random scene, then a scene that differs from it in one slot (the
    relation when it has one, half of the time), so every batch holds hard negative images."""
    images = torch.empty((n // 2 * 2, 3, 64, 64), dtype=torch.uint8)
    scenes = []
    for i in tqdm(range(n // 2), desc="rendering pairs", unit="pair"):
        scene = shapes.sample_scene(rng)
        slots = shapes.attribute_variants(scene)
        slot = (
            "relation"
            if "relation" in slots and rng.random() < 0.5
            else list(slots)[rng.integers(len(slots))]
        )
        others = [v for v in slots[slot] if v != scene]
        for k, member in enumerate((scene, others[rng.integers(len(others))])):
            pixels = np.array(resize(Image.fromarray(shapes.render(member, rng=rng))))
            images[2 * i + k] = torch.from_numpy(pixels).permute(2, 0, 1)
            scenes.append(member)
    return images, scenes


def _augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Distort a float [0, 1] batch the way generated images differ from renders."""
    n, _, h, _ = x.shape
    scale = h / 64  # strengths are set for 64 px images

    def coin(p: float) -> torch.Tensor:
        return torch.from_numpy(rng.random(n) < p).view(n, 1, 1, 1)

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return torch.from_numpy(rng.uniform(low, high, size=(n, *shape))).float()

    # Small shifts and zooms beyond the renderer's own jitter.
    theta = torch.zeros(n, 2, 3)
    zoom = uniform(0.9, 1.1)
    theta[:, 0, 0] = theta[:, 1, 1] = zoom
    theta[:, :, 2] = uniform(-0.08, 0.08, 2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = torch.where(
        coin(0.5), F.grid_sample(x, grid, padding_mode="border", align_corners=False), x
    )
    # Colour: per-channel gain, brightness, desaturation, a smooth low-frequency cast.
    gain = uniform(0.88, 1.12, 3, 1, 1) * uniform(0.9, 1.08, 1, 1, 1) + uniform(
        -0.05, 0.05, 1, 1, 1
    )
    x = torch.where(coin(0.7), x * gain, x)
    grey = x.mean(dim=1, keepdim=True)
    x = torch.where(coin(0.3), torch.lerp(x, grey, uniform(0.0, 0.3, 1, 1, 1)), x)
    cast = F.interpolate(torch.randn(n, 3, 4, 4), size=x.shape[-2:], mode="bilinear") * uniform(
        0, 0.05, 1, 1, 1
    )
    x = torch.where(coin(0.5), x + cast, x)
    # Blur and pixel noise.
    x = torch.where(coin(0.6), _gaussian_blur(x, uniform(0.2, 1.2) * scale), x)
    x = torch.where(coin(0.6), x + torch.randn_like(x) * uniform(0, 0.06, 1, 1, 1), x)
    return x.clamp(0, 1)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image with its own sigma (separable depthwise convolution)."""
    n, c, h, w = x.shape
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)
    flat = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="replicate")
    flat = F.conv2d(flat, kernel.view(n * c, 1, 1, -1), groups=n * c)
    flat = F.conv2d(flat, kernel.view(n * c, 1, -1, 1), groups=n * c)
    return flat.view(n, c, h, w)


def _loss(model, heads, pixels, scenes, grammar: _Grammar, rng) -> torch.Tensor:
    """Contrastive loss over a pool of captions (the batch's own, plus for each image those that
    differ from its caption in one slot), plus the attribute task itself: each image classified
    among its relation variants and among one other slot's variants. Every caption that draws
    the image's picture counts as a positive."""
    caption_index, layout_ids = grammar.index, grammar.layout_ids
    own = [caption_index[s.caption()] for s in scenes]
    pool = set(own)
    slot_sets = []  # (image index, caption indices of one slot's variants)
    for i, scene in enumerate(scenes):
        slots = shapes.attribute_variants(scene)
        others = [v for slot, v in slots.items() if slot != "relation"]
        # The relation is the hardest slot (colour and shape bound to position): always train it.
        for variants in (others[rng.integers(len(others))], slots.get("relation")):
            if variants:
                ids = [caption_index[v.caption()] for v in variants]
                pool.update(ids)
                slot_sets.append((i, ids))
    text_ids = torch.tensor(sorted(pool))
    column = {int(t): k for k, t in enumerate(text_ids)}
    image_emb = model.encode_image(pixels, normalize=True)
    text_emb = model.encode_text(grammar.tokens[text_ids], normalize=True)
    logits = model.logit_scale.exp() * image_emb @ text_emb.T
    positive = layout_ids[torch.tensor(own)].view(-1, 1) == layout_ids[text_ids].view(1, -1)
    image_to_text = _multi_positive_nll(logits, positive)
    has_image = positive.any(dim=0)
    text_to_image = _multi_positive_nll(logits.T[has_image], positive.T[has_image])
    rows = torch.tensor([i for i, _ in slot_sets])
    candidates = torch.zeros(len(slot_sets), len(text_ids), dtype=torch.bool)
    for r, (_, ids) in enumerate(slot_sets):
        candidates[r, [column[t] for t in ids]] = True
    slot_logits = logits[rows].masked_fill(~candidates, float("-inf"))
    attribute_task = _multi_positive_nll(slot_logits, positive[rows] & candidates)
    own_ids = torch.tensor(own)
    layout = heads.loss(
        heads.image, image_emb, grammar.colour_targets[own_ids], grammar.shape_targets[own_ids]
    )
    layout = layout + heads.loss(
        heads.text, text_emb, grammar.colour_targets[text_ids], grammar.shape_targets[text_ids]
    )
    return (image_to_text + text_to_image) / 2 + attribute_task + layout / 2


def _multi_positive_nll(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    return (
        logits.logsumexp(dim=1) - logits.masked_fill(~positive, float("-inf")).logsumexp(dim=1)
    ).mean()


def _lr_factor(step: int, total: int, *, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _save(model, tokens: torch.Tensor, out: Path) -> None:
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    used = torch.zeros(state["token_embedding.weight"].shape[0], dtype=torch.bool)
    used[tokens.unique()] = True
    state["token_embedding.weight"][~used] = 0  # never trained; zeros compress to nothing
    path = out / f"{EVALUATOR_NAME}.safetensors"
    save_file(state, str(path))
    path.chmod(0o644)  # safetensors writes owner-only files; the weights ship in the package
    logger.info("saved %s", out / f"{EVALUATOR_NAME}.safetensors")


def _validate(out: Path, seed: int, n: int) -> dict[str, object]:
    """Attribute accuracy of the saved weights on fresh renders, clean and distorted."""
    clip = load_clip(None) if out == HERE else _load_from(out)
    rng = np.random.default_rng(seed)
    scenes = [shapes.sample_scene(rng) for _ in range(n)]
    clean = np.stack([shapes.render(s, rng=rng) for s in scenes])
    batch = torch.from_numpy(clean).permute(0, 3, 1, 2).float() / 255
    distorted = (_augment(batch, rng) * 255).round().to(torch.uint8)
    prompts = [s.caption() for s in scenes]
    result = {}
    for name, images in (
        ("clean", torch.from_numpy(clean).permute(0, 3, 1, 2)),
        ("distorted", distorted),
    ):
        scored = attribute_accuracy(images, prompts, clip)
        result[name] = scored.to_dict()
        logger.info(
            "validation (%s, %d fresh scenes): accuracy %.4f per slot %s",
            name,
            n,
            scored.accuracy,
            scored.per_slot,
        )
    return result


def _load_from(out: Path) -> ClipModel:
    return load_clip(
        str(HERE / f"{EVALUATOR_NAME}.json"), str(out / f"{EVALUATOR_NAME}.safetensors")
    )


if __name__ == "__main__":
    main()
