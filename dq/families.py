"""Per-pipeline-family defaults, read from pipelines/families.json."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from .paths import default_model_dir, pipelines_dir


@lru_cache(maxsize=1)
def _table() -> dict[str, dict[str, Any]]:
    return json.loads((pipelines_dir() / "families.json").read_text())


def is_embedded_default(pipe) -> bool:
    name = getattr(pipe, "name_or_path", None) or ""
    try:
        return bool(name) and Path(name).resolve() == default_model_dir().resolve()
    except OSError:
        return False


def family_defaults(pipe) -> dict[str, Any]:
    key = "embedded-default" if is_embedded_default(pipe) else type(pipe).__name__
    out = dict(_table().get(key, {}))
    if out.get("calib_prompts") == "labels":
        model = getattr(pipe, "transformer", None)
        classes = getattr(getattr(model, "config", None), "num_embeds_ada_norm", None) or 1000
        out["calib_labels"] = list(range(classes))
    return out
