"""LPIPS through torchmetrics' ``LearnedPerceptualImagePatchSimilarity``.

LPIPS is defined by its backbone: torchvision's ImageNet AlexNet (default), VGG16 or SqueezeNet
1.1, plus linear heads that torchmetrics ships. The backbone weights are fetched by torchvision
into torch's hub cache on the user's machine, or read from a local file
(``weights=PATH``, the CLI's ``--lpips-weights PATH``). Nothing else is ever substituted.
"""

from __future__ import annotations

import logging
import tempfile
import urllib.error
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch
from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

from dq.safeload import load_weights, resave

from .errors import EvalError, MissingWeightsError
from .metrics import ImageBatch, to_batch

logger = logging.getLogger(__name__)

LPIPS_NETS = ("alex", "vgg", "squeeze")


class LpipsScorer:
    """Per-image LPIPS (lower is more similar) with one loaded backbone."""

    def __init__(
        self, net: str = "alex", weights: str | Path | None = None, *, batch_size: int = 16
    ) -> None:
        self.net = net
        self.batch_size = batch_size
        self._metric = load_lpips(net, weights)
        # per-image values of this process's images; several processes gather them (dq.eval.distributed)
        self._metric.sync_on_compute = False

    def __call__(
        self, images: ImageBatch, reference: ImageBatch, *, reduction: str = "mean"
    ) -> torch.Tensor:
        x, y = to_batch(images), to_batch(reference)
        if x.shape != y.shape:
            raise EvalError(
                f"LPIPS needs images and references of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        self._metric.reset()
        with torch.inference_mode():
            for start in range(0, x.shape[0], self.batch_size):
                self._metric.update(
                    x[start : start + self.batch_size], y[start : start + self.batch_size]
                )
            per_image = self._metric.compute().flatten().float()
        if reduction == "none":
            return per_image
        if reduction == "mean":
            return per_image.mean()
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def lpips(
    images: ImageBatch,
    reference: ImageBatch,
    *,
    net: str = "alex",
    weights: str | Path | None = None,
) -> float:
    """Mean LPIPS of ``images`` against ``reference`` (see ``LpipsScorer``)."""
    return float(LpipsScorer(net, weights)(images, reference))


def backbone_file(net: str) -> str:
    """File name of the torchvision backbone checkpoint LPIPS ``net`` needs."""
    return Path(urlparse(_backbone_weights(net).url).path).name


def load_lpips(
    net: str = "alex", weights: str | Path | None = None
) -> LearnedPerceptualImagePatchSimilarity:
    """torchmetrics' LPIPS with its backbone from the hub cache / a download, or from ``weights``."""
    filename, url = backbone_file(net), _backbone_weights(net).url
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise MissingWeightsError(
                f"--lpips-weights {path}: no such file; give the path of {filename} ({url})"
            )
        state = load_weights(path, "--lpips-weights")  # refuses pickled objects and TorchScript
        with _hub_cache_holding(state, filename):
            try:
                return _build(net)
            except RuntimeError as exc:  # wrong or corrupt state dict
                raise MissingWeightsError(
                    f"--lpips-weights {path} is not torchvision's {net} checkpoint ({filename}): {exc}"
                ) from exc
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if cached.is_file():  # torchvision would unpickle the cached file without restriction
        with _hub_cache_holding(load_weights(cached, "LPIPS backbone in torch's hub cache"), filename):
            return _build(net)
    try:
        return _build(net)  # downloads; torchvision checks the file's hash before loading it
    except (urllib.error.URLError, OSError) as exc:
        raise MissingWeightsError(
            f"LPIPS needs torchvision's ImageNet {net} weights, which could not be fetched ({exc}); "
            f"offline, download {url} elsewhere and pass --lpips-weights PATH"
        ) from exc


def _build(net: str) -> LearnedPerceptualImagePatchSimilarity:
    return LearnedPerceptualImagePatchSimilarity(net_type=net, reduction="none", normalize=True)


def _backbone_weights(net: str):
    from torchvision import models

    enums = {
        "alex": models.AlexNet_Weights,
        "vgg": models.VGG16_Weights,
        "squeeze": models.SqueezeNet1_1_Weights,
    }
    if net not in enums:
        raise EvalError(f"unknown LPIPS network {net!r}; choose one of {LPIPS_NETS}")
    return enums[net].DEFAULT


@contextmanager
def _hub_cache_holding(state: dict, filename: str):
    """Point torch's hub cache at a temporary folder whose only checkpoint holds ``state`` (tensors
    already loaded safely), so torchvision loads them through its own (cache-first) code path.
    torchvision unpickles that file without restriction: it must be dq's copy, never the user's."""
    previous = torch.hub.get_dir()
    with tempfile.TemporaryDirectory(prefix="dq-lpips-") as hub:
        checkpoints = Path(hub) / "checkpoints"
        checkpoints.mkdir()
        resave(state, checkpoints / filename)
        torch.hub.set_dir(hub)
        try:
            yield
        finally:
            torch.hub.set_dir(previous)
