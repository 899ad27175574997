"""Which full-precision model a quantized one was made from.

``dq.open_pipeline`` names the source on the denoiser (a hub id, a path, or "embedded
default"); ``dq.quantize`` records it with a SHA-256 of the denoiser's float weights before
swapping any layer; ``dq.save`` writes both into the checkpoint's ``quantization_config``
(``"source": {"model", "weights_sha256", "weights_dtype"}``). ``open_reference`` opens that
model again (``dq eval DQ_DIR`` without ``--reference``) and ``check_reference`` refuses a
reference whose weights differ ("made from another model"), as app.py does.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import DQError

logger = logging.getLogger(__name__)

SOURCE_NAME_ATTR = "_dq_source_name"  # set on the denoiser by open_pipeline
SOURCE_ATTR = "_dq_source"  # {"model", "weights_sha256", "weights_dtype"} on a quantized denoiser
EMBEDDED_DEFAULT = "embedded default"


def weights_sha256(model: nn.Module, dtype: torch.dtype | None = None) -> str:
    """SHA-256 of a (full-precision) model's state dict: names, shapes and values, the floating
    ones cast to ``dtype`` (default: as they are)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensor = tensor.contiguous().cpu()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\n".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the buffer, not a copy
    return digest.hexdigest()


def describe_source(model: nn.Module) -> dict[str, Any]:
    """The source record of a full-precision denoiser about to be quantized."""
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    dtype = floats[0] if floats else torch.float32
    return {
        "model": getattr(model, SOURCE_NAME_ATTR, None),
        "weights_sha256": weights_sha256(model, dtype),
        "weights_dtype": str(dtype).removeprefix("torch."),
    }


def source_of(model: nn.Module) -> dict[str, Any] | None:
    return getattr(model, SOURCE_ATTR, None)


def made_from(quantized: nn.Module, reference: nn.Module) -> bool | None:
    """Whether ``reference`` (a full-precision denoiser) has the float weights ``quantized`` was
    made from; None when the quantized model records no hash (saved by an older dq)."""
    source = source_of(quantized)
    if not source or not source.get("weights_sha256"):
        return None
    dtype = getattr(torch, source.get("weights_dtype") or "float32", None)
    if source_of(reference) is not None or not isinstance(dtype, torch.dtype):
        return False  # a quantized model is no full-precision reference
    return weights_sha256(reference, dtype) == source["weights_sha256"]


def check_reference(quantized: nn.Module, reference: nn.Module, *, what: str = "the reference") -> None:
    """Refuse ``reference`` (a full-precision denoiser) unless its weights are those the
    quantized denoiser was made from. Folders saved before dq recorded sources pass unchecked."""
    same = made_from(quantized, reference)
    if same is None:
        logger.info("the quantized model records no source weights hash; %s is not checked", what)
        return
    if source_of(reference) is not None:
        raise DQError(f"{what} is itself quantized; give the full-precision model it was made from")
    if not same:
        raise DQError(
            f"the quantized model was made from another model than {what} (its float weights differ from "
            f"those of {source_of(quantized).get('model') or 'the source'}, which it was quantized from); "
            "give that model as the reference"
        )


def open_reference(quantized_pipe, reference: str | Path | None, *, device=None, opener=None):
    """The full-precision pipeline a quantized pipeline is compared with: ``reference`` when
    given (checked against the recorded source weights), else the recorded source.
    opener(name_or_none) opens a pipeline (default: ``dq.io.open_pipeline`` on ``device``)."""
    from .engine import find_denoiser, is_quantized
    from .io import open_pipeline

    if opener is None:
        def opener(name):
            return open_pipeline(name, device=device)

    _, qmodel = find_denoiser(quantized_pipe)
    source = source_of(qmodel)
    if reference is None:
        name = (source or {}).get("model")
        if not name:
            raise DQError(
                "this quantized folder does not record the model it was made from (saved by an older dq); "
                "pass the full-precision model with --reference MODEL"
            )
        try:
            pipe = opener(None if name == EMBEDDED_DEFAULT else name)
        except DQError as exc:
            raise DQError(
                f"the quantized folder was made from {name}, which cannot be opened here ({exc}); "
                "pass the full-precision model with --reference MODEL"
            ) from exc
        what = f"{name} (its recorded source)"
    else:
        pipe = opener(reference)
        what = f"--reference {reference}"
    if source is not None or is_quantized(qmodel):  # a full-precision model has nothing to check
        check_reference(qmodel, find_denoiser(pipe)[1], what=what)
    return pipe
