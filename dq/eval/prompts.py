"""The default evaluation prompts: distinct captions of the default pipeline's grammar."""

from __future__ import annotations

import numpy as np

from .errors import EvalError

EVAL_SEED = 20261122  # apart from the seeds the pipeline and the evaluator CLIP were trained with


def grammar_prompts(n: int, *, seed: int = EVAL_SEED) -> list[str]:
    """``n`` distinct captions drawn like the pipeline's training captions, in a fixed order."""
    from dq_pipelines.default import shapes

    total = len(shapes.all_captions())
    if not 1 <= n <= total:
        raise EvalError(
            f"the grammar has {total} distinct captions; ask for 1 to {total} prompts, not {n}"
        )
    rng = np.random.default_rng(seed)
    prompts: dict[str, None] = {}
    while len(prompts) < n:
        prompts.setdefault(shapes.sample_scene(rng).caption())
    return list(prompts)
