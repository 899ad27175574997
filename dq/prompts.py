"""Prompt sets: plain text files, one prompt per line, '#' comments ignored; and captions drawn
from the embedded default pipeline's grammar (`grammar_prompts`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import DQError
from .paths import calib_dir


def prompt_sets() -> list[str]:
    return sorted(p.stem for p in calib_dir().glob("*.txt"))


def load_prompts(name_or_path: str | Path) -> list[str]:
    """Prompts from a shipped set name (see `prompt_sets()`) or a text file path."""
    path = Path(name_or_path)
    if not path.exists():
        candidate = calib_dir() / f"{name_or_path}.txt"
        if not candidate.exists():
            raise DQError(f"no prompt file {str(name_or_path)!r}; give a path or one of the shipped sets {prompt_sets()}")
        path = candidate
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DQError(f"cannot read prompt file {path}: {exc}") from exc
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise DQError(f"prompt file {path} has no prompts; write one prompt per line")
    return prompts


def resolve_prompts(pipe, calib_prompts: Sequence[Any] | str | Path | None, recipe) -> list[Any]:
    """The calibration prompts: explicit ones, a named set, or the pipeline family's default."""
    if calib_prompts is None:
        from .families import family_defaults

        name = recipe.calib_prompts
        if name == "default":
            name = family_defaults(pipe).get("calib_prompts", "default")
        prompts = family_defaults(pipe).get("calib_labels") if name == "labels" else None
        prompts = prompts or load_prompts(name)
        return prompts[: recipe.calib_num_prompts]
    if isinstance(calib_prompts, (str, Path)):
        return load_prompts(calib_prompts)
    prompts = list(calib_prompts)
    if not prompts:
        raise DQError("the calibration prompt list is empty; pass at least one prompt")
    return prompts


EVAL_SEED = 20261122  # apart from the seeds the pipeline and the evaluator CLIP were trained with


def grammar_prompts(n: int, *, seed: int = EVAL_SEED) -> list[str]:
    """``n`` distinct captions drawn like the embedded default pipeline's training captions, in a
    fixed order: prompts beyond the shipped sets (calib/build_shapes_sets.py draws those)."""
    from dq_pipelines.default import shapes

    total = len(shapes.all_captions())
    if not 1 <= n <= total:
        raise DQError(f"the grammar has {total} distinct captions; ask for 1 to {total} prompts, not {n}")
    import numpy as np

    rng = np.random.default_rng(seed)
    prompts: dict[str, None] = {}
    while len(prompts) < n:
        prompts.setdefault(shapes.sample_scene(rng).caption())
    return list(prompts)
