"""Frechet distance between two image sets, through torchmetrics' ``FrechetInceptionDistance``.

Two feature networks:

- ``"inception"``: the standard FID Inception-v3 (torch-fidelity's port of the TensorFlow
  weights). torchmetrics fetches them into torch's hub cache on the first use; an offline machine
  passes the ``.pth`` file with ``inception_weights`` (``--inception-weights PATH``).
- ``"clip"``: image embeddings of a CLIP model (by default dq's evaluator CLIP), which works
  offline. Distances in this space are not comparable to Inception FIDs.

``FidScorer`` keeps the real-image statistics, so many generated sets are compared against one
reference set without extracting its features again.
"""

from __future__ import annotations

import logging
import tempfile
import urllib.error
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchmetrics.image.fid import FrechetInceptionDistance

from dq.safeload import load_weights, resave

from .clip import ClipImageFeatures, ClipModel
from .errors import EvalError, MissingWeightsError
from .metrics import ImageBatch, to_uint8

logger = logging.getLogger(__name__)

FID_FEATURES = ("inception", "clip")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


class FidScorer:
    """FID of generated sets against one fixed set of real (reference) images."""

    def __init__(
        self,
        real_images: ImageBatch,
        *,
        features: str = "inception",
        inception_weights: str | Path | None = None,
        clip: ClipModel | None = None,
        batch_size: int = 32,
    ) -> None:
        self.features = features
        self.batch_size = batch_size
        self._metric = _make_metric(features, inception_weights, clip)
        real = to_uint8(real_images)
        self.num_real = _total(real.shape[0], "the count of FID's real images")
        if self.num_real < 2:
            raise EvalError(
                f"FID needs at least 2 real images, got {self.num_real}; use more prompts or images"
            )
        self._update(real, real=True)

    def __call__(self, images: ImageBatch) -> float:
        """FID of ``images`` against the real set (lower is better)."""
        fake = to_uint8(images)
        total = _total(fake.shape[0], "the count of FID's generated images")
        if total < 2:
            raise EvalError(
                f"FID needs at least 2 generated images, got {total}; use more prompts"
            )
        self.num_fake = total
        self._metric.reset()  # keeps the real statistics (reset_real_features=False)
        self._update(fake, real=False)
        # several processes: torchmetrics sums the feature sums and covariance sums of every
        # process before the distance (its states reduce by sum), so the FID is that of all images
        return float(self._metric.compute())

    def _update(self, images: torch.Tensor, *, real: bool) -> None:
        with torch.inference_mode():
            for start in range(0, images.shape[0], self.batch_size):
                self._metric.update(images[start : start + self.batch_size], real=real)


def _total(count: int, what: str) -> int:
    """``count`` summed over the processes of a launch (``count`` alone in one process)."""
    from dq.calibrate import distributed

    return sum(distributed.gather_objects(count, what))


def fid(
    real_images: ImageBatch,
    images: ImageBatch,
    *,
    features: str = "inception",
    inception_weights: str | Path | None = None,
    clip: ClipModel | None = None,
) -> float:
    """FID between two image sets (see ``FidScorer``)."""
    return FidScorer(
        real_images, features=features, inception_weights=inception_weights, clip=clip
    )(images)


def load_image_folder(
    folder: str | Path, *, size: tuple[int, int] | None = None, limit: int | None = None,
    shard: bool = False,
) -> list[Image.Image]:
    """RGB images of a folder (sorted by name), centre-cropped to ``size``'s aspect and resized to
    it; shard: only this process's contiguous share (several processes, `dq.calibrate.distributed`)."""
    path = Path(folder)
    if not path.is_dir():
        raise EvalError(f"real-image folder {path} does not exist or is not a folder")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise EvalError(
            f"real-image folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}); point --real-images at a folder of images"
        )
    files = files[:limit]
    if shard:
        from dq.calibrate import distributed

        files = [files[i] for i in distributed.shard(len(files))]
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                images.append(_fit(image.convert("RGB"), size))
        except (UnidentifiedImageError, OSError) as exc:
            raise EvalError(
                f"cannot read image {file}: {exc}; remove it from {path} or fix it"
            ) from exc
    return images


def _fit(image: Image.Image, size: tuple[int, int] | None) -> Image.Image:
    if size is None:
        return image
    height, width = size
    scale = min(image.width / width, image.height / height)
    crop_w, crop_h = round(width * scale), round(height * scale)
    left, top = (image.width - crop_w) // 2, (image.height - crop_h) // 2
    return image.crop((left, top, left + crop_w, top + crop_h)).resize(
        (width, height), Image.Resampling.BICUBIC
    )


def _make_metric(
    features: str, inception_weights: str | Path | None, clip: ClipModel | None
) -> FrechetInceptionDistance:
    if features == "clip":
        if clip is None:
            from .clip import load_clip

            clip = load_clip()
        return FrechetInceptionDistance(feature=ClipImageFeatures(clip), reset_real_features=False)
    if features != "inception":
        raise EvalError(f"unknown FID feature network {features!r}; choose one of {FID_FEATURES}")
    path = _inception_weights(inception_weights)
    if path is None:
        return FrechetInceptionDistance(feature=2048, reset_real_features=False)
    what = "--inception-weights" if inception_weights is not None else "FID Inception weights in torch's hub cache"
    state = load_weights(path, what)  # refuses pickled objects and TorchScript
    # torch-fidelity unpickles the file it is given without restriction: give it dq's copy
    with tempfile.TemporaryDirectory(prefix="dq-inception-") as folder:
        return FrechetInceptionDistance(
            feature=2048,
            reset_real_features=False,
            feature_extractor_weights_path=str(resave(state, Path(folder) / _INCEPTION_FILE)),
        )


def _inception_weights(path: str | Path | None) -> str | None:
    """The weights file to load, or None to let torch-fidelity fetch them (hub cache first)."""
    _require_torch_fidelity()
    if path is not None:
        if not Path(path).is_file():
            raise MissingWeightsError(
                f"--inception-weights {path}: no such file; give the path of {_INCEPTION_FILE}"
            )
        return str(path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / _INCEPTION_FILE
    if cached.is_file():
        return str(cached)
    from torch_fidelity import feature_extractor_inceptionv3 as fidelity

    try:  # fetch into the hub cache now, so a failure can say what to do instead
        fidelity.load_state_dict_from_url(fidelity.URL_INCEPTION_V3, progress=False, weights_only=True)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        raise MissingWeightsError(
            f"cannot fetch the FID Inception weights ({exc}); offline, download {_INCEPTION_FILE} "
            "elsewhere and pass --inception-weights PATH, or use --fid-features clip (CLIP image "
            "features, computed offline with dq's evaluator CLIP)"
        ) from exc
    return str(cached) if cached.is_file() else None


def _require_torch_fidelity() -> None:
    try:
        import torch_fidelity  # noqa: F401
    except ImportError as exc:
        raise MissingWeightsError(
            "Inception FID needs torch-fidelity (`pip install torch-fidelity`), or use --fid-features clip"
        ) from exc
