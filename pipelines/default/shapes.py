"""Procedural scenes of coloured shapes: grammar, captions and rendering.

A caption is either one object, ``"a red circle"``, or two objects joined by a
relation, ``"a red circle above a blue square"``. Every relation puts the two
objects in fixed halves of the canvas (top/bottom or left/right), so a caption
determines the layout up to a small jitter; that keeps the mapping from text to
image learnable by a very small model.

Pure python + numpy + PIL (no torch), so evaluators can import it cheaply.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 256
BACKGROUND: tuple[int, int, int] = (245, 245, 245)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 195, 0),
    "purple": (130, 40, 170),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# "A above B" puts A in the top half and B in the bottom half, and so on.
RELATIONS: tuple[str, ...] = ("above", "below", "to the left of", "to the right of")

# Object centre for (relation, object index), as fractions of the canvas size.
_TWO_OBJECT_CENTRES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "above": ((0.5, 0.25), (0.5, 0.75)),
    "below": ((0.5, 0.75), (0.5, 0.25)),
    "to the left of": ((0.25, 0.5), (0.75, 0.5)),
    "to the right of": ((0.75, 0.5), (0.25, 0.5)),
}
_SINGLE_RADIUS = 0.22  # half of the object's extent, as a fraction of the canvas
_PAIR_RADIUS = 0.17
_SIZE_JITTER = 0.12  # relative radius jitter
_POSITION_JITTER = 0.04  # centre jitter, as a fraction of the canvas
_SUPERSAMPLE = 2


@dataclass(frozen=True)
class Obj:
    """One object: a coloured shape."""

    colour: str
    shape: str

    def __post_init__(self) -> None:
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {sorted(COLOURS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {list(SHAPES)}")

    def phrase(self) -> str:
        return f"a {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """One or two objects; two objects need a relation, one object must have none."""

    objects: tuple[Obj, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        if len(self.objects) == 1 and self.relation is not None:
            raise ValueError("a single-object scene has no relation")
        if len(self.objects) == 2 and self.relation not in RELATIONS:
            raise ValueError(
                f"two objects need a relation in {list(RELATIONS)}, got {self.relation!r}"
            )
        if len(self.objects) not in (1, 2):
            raise ValueError(f"a scene has 1 or 2 objects, got {len(self.objects)}")

    def caption(self) -> str:
        if self.relation is None:
            return self.objects[0].phrase()
        return f"{self.objects[0].phrase()} {self.relation} {self.objects[1].phrase()}"


def vocabulary() -> list[str]:
    """Every word the grammar can produce, in a fixed order (for the tokenizer)."""
    words = ["a", *COLOURS, *SHAPES]
    for relation in RELATIONS:
        words.extend(w for w in relation.split() if w not in words)
    return words


def sample_scene(
    rng: np.random.Generator, *, max_objects: int = 2, two_object_prob: float = 0.5
) -> Scene:
    """Draw a scene uniformly over colours, shapes and relations."""
    if max_objects not in (1, 2):
        raise ValueError(f"max_objects must be 1 or 2, got {max_objects}")
    colours, shapes = list(COLOURS), list(SHAPES)

    def sample_obj() -> Obj:
        return Obj(colours[rng.integers(len(colours))], shapes[rng.integers(len(shapes))])

    if max_objects == 1 or rng.random() >= two_object_prob:
        return Scene((sample_obj(),))
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    return Scene((sample_obj(), sample_obj()), relation)


def all_scenes(max_objects: int = 2) -> Iterator[Scene]:
    """Enumerate the grammar: single objects first, then every two-object scene."""
    objs = [Obj(c, s) for c in COLOURS for s in SHAPES]
    yield from (Scene((o,)) for o in objs)
    if max_objects >= 2:
        for a, relation, b in itertools.product(objs, RELATIONS, objs):
            yield Scene((a, b), relation)


def all_captions(max_objects: int = 2) -> list[str]:
    """Every caption of the grammar (18 single-object + 1296 two-object captions)."""
    return [scene.caption() for scene in all_scenes(max_objects)]


_OBJ_PATTERN = rf"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
_CAPTION_RE = re.compile(rf"^{_OBJ_PATTERN}(?: ({'|'.join(RELATIONS)}) {_OBJ_PATTERN})?$")


def parse_caption(text: str) -> Scene:
    """Parse a caption of the grammar back into a scene (case and spacing are forgiven)."""
    normal = " ".join(text.lower().strip().rstrip(".").split())
    match = _CAPTION_RE.match(normal)
    if match is None:
        raise ValueError(
            f"caption {text!r} is outside the grammar: expected 'a <colour> <shape>' optionally "
            f"followed by '<relation> a <colour> <shape>', with colours {list(COLOURS)}, "
            f"shapes {list(SHAPES)} and relations {list(RELATIONS)}"
        )
    colour0, shape0, relation, colour1, shape1 = match.groups()
    if relation is None:
        return Scene((Obj(colour0, shape0),))
    return Scene((Obj(colour0, shape0), Obj(colour1, shape1)), relation)


def attribute_variants(scene: Scene) -> dict[str, list[Scene]]:
    """For each slot ("colour0", "shape0", "relation", "colour1", "shape1"), every scene that
    differs from ``scene`` only in that slot, the original included, in grammar order."""
    variants: dict[str, list[Scene]] = {}
    for i, obj in enumerate(scene.objects):
        variants[f"colour{i}"] = [_with_object(scene, i, replace(obj, colour=c)) for c in COLOURS]
        variants[f"shape{i}"] = [_with_object(scene, i, replace(obj, shape=s)) for s in SHAPES]
    if scene.relation is not None:
        variants["relation"] = [replace(scene, relation=r) for r in RELATIONS]
    order = ["colour0", "shape0", "relation", "colour1", "shape1"]
    return {slot: variants[slot] for slot in order if slot in variants}


def _with_object(scene: Scene, index: int, obj: Obj) -> Scene:
    objects = list(scene.objects)
    objects[index] = obj
    return replace(scene, objects=tuple(objects))


def object_boxes(
    scene: Scene, *, size: int = IMAGE_SIZE, rng: np.random.Generator | None = None
) -> list[tuple[float, float, float]]:
    """(centre x, centre y, radius) in pixels for each object; jittered when ``rng`` is given."""
    if scene.relation is None:
        centres, radius = [(0.5, 0.5)], _SINGLE_RADIUS
    else:
        centres, radius = list(_TWO_OBJECT_CENTRES[scene.relation]), _PAIR_RADIUS
    boxes = []
    for cx, cy in centres:
        r = radius
        if rng is not None:
            cx, cy = (
                cx + rng.uniform(-1, 1) * _POSITION_JITTER,
                cy + rng.uniform(-1, 1) * _POSITION_JITTER,
            )
            r = radius * (1 + rng.uniform(-1, 1) * _SIZE_JITTER)
        boxes.append((cx * size, cy * size, r * size))
    return boxes


def render(
    scene: Scene, *, size: int = IMAGE_SIZE, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Draw ``scene`` as a uint8 (size, size, 3) array; without ``rng`` the layout is canonical."""
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj, (cx, cy, r) in zip(scene.objects, object_boxes(scene, size=big, rng=rng), strict=True):
        _draw_shape(draw, obj, cx, cy, r)
    return np.asarray(image.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


def _draw_shape(draw: ImageDraw.ImageDraw, obj: Obj, cx: float, cy: float, r: float) -> None:
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "square":
        s = r * 0.88  # same visual area as the circle, roughly
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    else:  # triangle, pointing up, centred on its bounding box
        draw.polygon(
            [(cx, cy - r), (cx + r * 1.1, cy + r * 0.85), (cx - r * 1.1, cy + r * 0.85)], fill=fill
        )
