"""Loading user-named weight files without running code from them.

A ``.pt``/``.pth``/``.bin`` file is a pickle: unpickled without restriction, it can run any
command. Every weight file a user names (``--lpips-weights``, ``--inception-weights``,
``--clip-pretrained``, a ``local-dir:`` CLIP folder) goes through ``load_weights`` first:
safetensors, or ``torch.load(weights_only=True)``, which admits only tensors and plain
containers. A file that needs more (pickled Python objects, a TorchScript archive) is refused
with an ``UnsafeWeightsError``. Libraries that only take a path get ``resave``'s copy: a file
written here from the already-loaded tensors, so whatever they unpickle is dq's own output.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import DQError

SAFETENSORS_SUFFIX = ".safetensors"


class UnsafeWeightsError(DQError):
    """A weight file holds more than tensors (pickled objects or TorchScript code)."""


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def load_weights(path: str | Path, what: str) -> Any:
    """The tensors of a weight file (safetensors, or a torch.save'd state dict), loaded without
    running any code from it. ``what`` names the file's source in messages (``--lpips-weights``).

    Raises ``UnsafeWeightsError`` for a file that holds pickled objects or TorchScript, and a
    plain ``DQError`` for a file that is not a weight file at all.
    """
    path = Path(path)
    if not path.is_file():
        raise DQError(f"{what} {path}: no such file")
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as exc:
            raise DQError(f"{what} {path} is not a readable safetensors file: {exc}") from exc
    if _is_torchscript(path):
        raise UnsafeWeightsError(
            f"{what} {path} is a TorchScript archive, which holds code; dq loads only plain weights. "
            "Convert it where you trust it: torch.save(torch.jit.load(FILE).state_dict(), OUT), "
            "or save it as .safetensors"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):  # a damaged or foreign file (refused all the same)
            raise DQError(f"{what} {path} is not a readable PyTorch weight file: {_first_line(exc)}") from exc
        raise UnsafeWeightsError(
            f"{what} {path} holds pickled Python objects besides tensors, which could run code when loaded; "
            "dq loads only plain weight files (refused, nothing was executed). Convert it where you trust "
            "it: save its state_dict alone with torch.save, or as .safetensors"
        ) from exc
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise DQError(f"{what} {path} is not a readable PyTorch weight file: {exc}") from exc


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if "Unsupported" in line or "error" in line.lower()]
    return lines[0] if lines else str(exc).splitlines()[0]


def resave(state: Any, path: str | Path) -> Path:
    """Write tensors loaded by ``load_weights`` where a library that only takes a path reads them."""
    path = Path(path)
    torch.save(state, path)
    return path
