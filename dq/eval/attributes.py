"""Attribute accuracy: does each image show the colours, shapes and relation its prompt asked for?

Each prompt of the default pipeline's grammar is parsed into a scene; for every attribute slot
(``colour0``, ``shape0``, ``relation``, ``colour1``, ``shape1``) the evaluator CLIP classifies the
image zero-shot among the captions that differ from the prompt only in that slot. An image is
correct when every slot is. Captions that draw the same picture (``a red circle above a red
circle`` and ``... below ...``) count as the same answer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from .clip import ClipModel
from .errors import EvalError
from .metrics import ImageBatch, to_pil

logger = logging.getLogger(__name__)

_KEY_SIZE = 32  # canonical renders this small are enough to tell two layouts apart


@dataclass
class AttributeResult:
    """Attribute accuracy over the prompts that the grammar parses."""

    accuracy: float
    per_slot: dict[str, float]
    num_images: int
    num_skipped: int  # prompts outside the grammar, not scored
    correct: list[bool] = field(repr=False)  # one per scored image, in order
    predictions: list[dict[str, str]] = field(
        repr=False
    )  # predicted caption per slot, per scored image
    slot_hits: dict[str, list[bool]] = field(default_factory=dict, repr=False)  # per slot, per image

    def to_dict(self) -> dict[str, object]:
        return {
            "accuracy": self.accuracy,
            "per_slot": dict(self.per_slot),
            "num_images": self.num_images,
            "num_skipped": self.num_skipped,
        }


def attribute_accuracy(
    images: ImageBatch, prompts: Sequence[str], clip: ClipModel
) -> AttributeResult | None:
    """Score ``images`` (one per prompt); ``None`` when no prompt is in the grammar."""
    shapes = _shapes()
    pil_images = to_pil(images)
    if len(pil_images) != len(prompts):
        raise EvalError(
            f"attribute accuracy got {len(pil_images)} images but {len(prompts)} prompts; pass one prompt per image"
        )
    scenes, keep = [], []
    for i, prompt in enumerate(prompts):
        try:
            scenes.append(shapes.parse_caption(prompt))
            keep.append(i)
        except ValueError:
            continue
    skipped = len(prompts) - len(keep)
    if skipped:
        logger.info(
            "attribute accuracy: %d of %d prompts are outside the grammar and not scored",
            skipped,
            len(prompts),
        )
    if not keep:
        return None
    image_emb = clip.embed_images([pil_images[i] for i in keep])
    correct, predictions = [], []
    slot_hits: dict[str, list[bool]] = {}
    for emb, scene in zip(image_emb, scenes):
        all_right, predicted = True, {}
        for slot, variants in shapes.attribute_variants(scene).items():
            captions = [v.caption() for v in variants]
            best = variants[int(torch.argmax(clip.embed_texts(captions) @ emb))]
            right = _layout_key(best) == _layout_key(scene)
            slot_hits.setdefault(slot, []).append(right)
            predicted[slot] = best.caption()
            all_right &= right
        correct.append(all_right)
        predictions.append(predicted)
    return AttributeResult(
        accuracy=float(np.mean(correct)),
        per_slot={slot: float(np.mean(hits)) for slot, hits in slot_hits.items()},
        num_images=len(keep),
        num_skipped=skipped,
        correct=correct,
        predictions=predictions,
        slot_hits=slot_hits,
    )


def in_grammar(prompt: str) -> bool:
    """Whether attribute accuracy can score ``prompt``."""
    try:
        _shapes().parse_caption(prompt)
    except ValueError:
        return False
    return True


@lru_cache(maxsize=4096)
def _layout_key(scene) -> bytes:
    # Two captions are the same answer when they draw the same canonical (unjittered) picture.
    return _shapes().render(scene, size=_KEY_SIZE).tobytes()


def _shapes():
    try:
        from dq_pipelines.default import shapes
    except ImportError as exc:  # pragma: no cover - only without the dq_pipelines package
        raise EvalError(
            "attribute accuracy needs the dq_pipelines package (install dq with its pipelines)"
        ) from exc
    return shapes
