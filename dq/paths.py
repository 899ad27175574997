"""Where dq's shipped data lives, in a source checkout and in an installed wheel.

`calib/` and `pipelines/` sit at the top of the repository; the distribution
installs them as the data packages `dq_calib` and `dq_pipelines`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent


def _package_dir(package: str, repo_dir: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return _REPO / repo_dir


def calib_dir() -> Path:
    return _package_dir("dq_calib", "calib")


def pipelines_dir() -> Path:
    return _package_dir("dq_pipelines", "pipelines")


def default_model_dir() -> Path:
    """The embedded default pipeline (diffusers folder)."""
    return pipelines_dir() / "default" / "model"
