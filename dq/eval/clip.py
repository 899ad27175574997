"""CLIP models through open_clip, the CLIP score, and CLIP image features for FID.

The CLIP score is what open_clip's models give: ``100 * max(cos(image_emb, text_emb), 0)``,
with the model's own preprocessing and tokenizer. Any open_clip model name with a pretrained
tag (downloaded by open_clip on the user's machine) or a local checkpoint works; the offline
default is dq's small evaluator CLIP, trained on the default pipeline's procedural scenes and
shipped in ``pipelines/default/evaluator/``.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from dq.paths import pipelines_dir
from dq.safeload import load_weights, resave

from .errors import EvalError, MissingWeightsError
from .metrics import ImageBatch, to_pil

logger = logging.getLogger(__name__)

EVALUATOR_NAME = "dq-evaluator-clip"


def evaluator_dir() -> Path:
    """Folder of the evaluator CLIP: its open_clip config (json) and weights (safetensors)."""
    return pipelines_dir() / "default" / "evaluator"


def evaluator_config_path() -> Path:
    return evaluator_dir() / f"{EVALUATOR_NAME}.json"


def evaluator_weights_path() -> Path:
    return evaluator_dir() / f"{EVALUATOR_NAME}.safetensors"


@dataclass
class ClipModel:
    """An open_clip model with its preprocessing and tokenizer; embeddings are L2-normalised."""

    model: nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    name: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _text_cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @torch.inference_mode()
    def embed_images(self, images: ImageBatch, *, batch_size: int = 64) -> torch.Tensor:
        """(N, D) unit-norm image embeddings, each image preprocessed exactly as open_clip does."""
        pil_images = to_pil(images)
        chunks = []
        for start in range(0, len(pil_images), batch_size):
            pixels = torch.stack(
                [self.preprocess(im) for im in pil_images[start : start + batch_size]]
            )
            chunks.append(
                self.model.encode_image(pixels.to(self.device), normalize=True).float().cpu()
            )
        return torch.cat(chunks)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) unit-norm text embeddings; repeated texts are encoded once per model."""
        missing = sorted({t for t in texts if t not in self._text_cache})
        if missing:
            tokens = self.tokenizer(missing).to(self.device)
            embeddings = self.model.encode_text(tokens, normalize=True).float().cpu()
            self._text_cache.update(zip(missing, embeddings))
        return torch.stack([self._text_cache[t] for t in texts])


def load_clip(
    model_name: str | None = None, pretrained: str | None = None, *, device: str = "cpu"
) -> ClipModel:
    """Load a CLIP model for scoring.

    ``model_name=None`` is dq's offline evaluator CLIP. Otherwise ``model_name`` is an open_clip
    model name (``ViT-B-32``), a ``local-dir:/folder`` holding ``open_clip_config.json`` and
    weights, or the path of an open_clip model config json; ``pretrained`` is an open_clip
    tag (``laion2b_s34b_b79k``, fetched by open_clip) or a local checkpoint file.
    """
    import open_clip

    if model_name is None:
        if pretrained is not None:
            raise EvalError(
                "--clip-pretrained needs --clip-model: name the architecture the checkpoint is for"
            )
        model_name, pretrained = _register_evaluator(open_clip)
    elif model_name.endswith(".json"):
        config = Path(model_name)
        if not config.is_file():
            raise EvalError(
                f"CLIP model config {config} does not exist; give an open_clip model name or a config json"
            )
        open_clip.add_model_config(config)
        model_name = config.stem
    if pretrained is not None and Path(pretrained).suffix in (
        ".safetensors",
        ".pt",
        ".pth",
        ".bin",
    ):
        if not Path(pretrained).is_file():
            raise MissingWeightsError(
                f"CLIP checkpoint {pretrained} does not exist; check the --clip-pretrained path"
            )
    if model_name.startswith("local-dir:"):
        check_clip_folder(model_name.removeprefix("local-dir:"))
    with tempfile.TemporaryDirectory(prefix="dq-clip-") as folder:
        if pretrained is not None and Path(pretrained).is_file() and not pretrained.endswith(".safetensors"):
            # open_clip may hand a .pt to torch.jit.load or an unrestricted torch.load: load the
            # tensors safely here (refusing pickled objects and TorchScript) and give it dq's copy
            state = load_weights(pretrained, "--clip-pretrained")
            copy = str(resave(state, Path(folder) / "open_clip_checkpoint.pt"))
        else:
            copy = pretrained
        model, preprocess = _create(open_clip, model_name, pretrained, device, copy)
    return ClipModel(
        model, preprocess, open_clip.get_tokenizer(model_name), model_name, torch.device(device)
    )


def check_clip_folder(folder: str | Path) -> None:
    """Refuse a ``local-dir:`` CLIP folder whose pickle checkpoints hold more than tensors
    (open_clip would load them itself)."""
    for path in sorted(Path(folder).glob("*")):
        if path.suffix in (".bin", ".pth", ".pt") and path.is_file():
            load_weights(path, "--clip-model local-dir: checkpoint")


def _create(open_clip, model_name: str, pretrained: str | None, device: str, copy: str | None):
    """open_clip's model and preprocessing; ``copy`` is the file it reads (``pretrained`` is
    what the user named, for messages)."""
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=copy, device=device
        )
    except RuntimeError as exc:
        if pretrained is not None and "download" in str(exc).lower():
            raise MissingWeightsError(
                f"could not fetch CLIP weights {model_name}/{pretrained} ({exc}); on an offline machine pass "
                "--clip-pretrained PATH to a local checkpoint, or omit --clip-model to use dq's offline "
                "evaluator CLIP"
            ) from exc
        raise EvalError(
            f"cannot load CLIP model {model_name!r} (pretrained={pretrained!r}): {exc}"
        ) from exc
    if pretrained is None and not model_name.startswith(("local-dir:", "hf-hub:")):
        logger.warning(
            "CLIP model %s has no pretrained weights: its scores are meaningless", model_name
        )
    model.eval()
    return model, preprocess


def clip_score(
    images: ImageBatch, prompts: Sequence[str], clip: ClipModel, *, reduction: str = "mean"
) -> torch.Tensor:
    """``100 * max(cos(image, prompt), 0)`` per image/prompt pair, in [0, 100]."""
    if len(prompts) == 0:
        raise EvalError("clip_score got no prompts; pass one prompt per image")
    image_emb = clip.embed_images(images)
    if image_emb.shape[0] != len(prompts):
        raise EvalError(
            f"clip_score got {image_emb.shape[0]} images but {len(prompts)} prompts; pass one prompt per image"
        )
    text_emb = clip.embed_texts(list(prompts))
    per_image = 100 * (image_emb * text_emb).sum(dim=1).clamp(min=0)
    if reduction == "none":
        return per_image
    if reduction == "mean":
        return per_image.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


class ClipImageFeatures(nn.Module):
    """CLIP image embeddings as the ``feature`` network of torchmetrics' FID (uint8 NCHW in)."""

    def __init__(self, clip: ClipModel) -> None:
        super().__init__()
        self.clip = clip
        self.num_features = int(clip.embed_texts(["a"]).shape[1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.embed_images(images)


def _register_evaluator(open_clip) -> tuple[str, str]:
    config, weights = evaluator_config_path(), evaluator_weights_path()
    if not config.is_file() or not weights.is_file():
        raise MissingWeightsError(
            f"dq's evaluator CLIP is missing ({config.name} and {weights.name} expected in {config.parent}); "
            "train it with `python -m dq_pipelines.default.evaluator.train_clip`, or pass --clip-model NAME "
            "--clip-pretrained TAG_OR_FILE"
        )
    if EVALUATOR_NAME not in open_clip.list_models():
        open_clip.add_model_config(config)
    return EVALUATOR_NAME, str(weights)
