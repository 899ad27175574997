"""Full-reference image metrics (PSNR, SSIM) and the image-batch conversions every metric shares.

Batches are NCHW tensors, either uint8 in [0, 255] or floating point in [0, 1]. ``to_batch``
turns PIL images, HWC numpy arrays and lists of them into that form.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import numpy as np
import torch
from PIL import Image
from torchmetrics.functional.image import structural_similarity_index_measure

ImageLike = Union[Image.Image, np.ndarray, torch.Tensor]
ImageBatch = Union[torch.Tensor, np.ndarray, Sequence[ImageLike]]


def to_batch(images: ImageBatch) -> torch.Tensor:
    """Stack images into a float32 NCHW batch in [0, 1].

    Accepts a tensor (NCHW or CHW, uint8 or float in [0, 1]), a numpy array (NHWC or HWC,
    uint8 or float in [0, 1]), or a sequence of PIL images / HWC arrays / CHW tensors.
    """
    if isinstance(images, torch.Tensor):
        batch = images.unsqueeze(0) if images.ndim == 3 else images
        if batch.ndim != 4 or batch.shape[1] not in (1, 3):
            raise ValueError(
                f"expected an image tensor shaped (N, 3, H, W) or (3, H, W), got {tuple(images.shape)}; "
                "convert HWC arrays with to_batch(numpy_array) instead"
            )
        return _to_unit_float(batch)
    if isinstance(images, np.ndarray):
        array = images[None] if images.ndim == 3 else images
        if array.ndim != 4 or array.shape[-1] not in (1, 3):
            raise ValueError(f"expected a numpy image array shaped (N, H, W, 3) or (H, W, 3), got {images.shape}")
        return _to_unit_float(torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2))
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise TypeError(f"expected a tensor, a numpy array or a list of images, got {type(images).__name__}")
    if len(images) == 0:
        raise ValueError("got an empty list of images; pass at least one image")
    items = [_single_to_chw(image) for image in images]
    sizes = {tuple(item.shape) for item in items}
    if len(sizes) > 1:
        raise ValueError(f"images in one batch must share a size, got {sorted(sizes)}; resize them first")
    return torch.stack(items)


def to_uint8(images: ImageBatch) -> torch.Tensor:
    """Like ``to_batch`` but returns uint8 in [0, 255] (what FID feature extractors take)."""
    return (to_batch(images) * 255).round().to(torch.uint8)


def to_pil(images: ImageBatch) -> list[Image.Image]:
    """Convert a batch to a list of RGB PIL images."""
    batch = to_uint8(images)
    if batch.shape[1] == 1:
        batch = batch.expand(-1, 3, -1, -1)
    return [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in batch]


def psnr(images: ImageBatch, reference: ImageBatch, *, reduction: str = "mean") -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of each image against its reference (data range 1).

    Identical images give ``inf``. ``reduction`` is ``"mean"`` (a scalar, the mean of the
    per-image values, with ``inf`` kept if all are identical) or ``"none"`` (one value per image).
    """
    x, y = _pair(images, reference)
    mse = ((x - y) ** 2).flatten(1).mean(dim=1)
    per_image = 10 * torch.log10(1.0 / mse)
    return _reduce(per_image, reduction)


def ssim(images: ImageBatch, reference: ImageBatch, *, reduction: str = "mean") -> torch.Tensor:
    """Structural similarity with the standard 11x11 Gaussian window (sigma 1.5, K1=0.01, K2=0.03)."""
    x, y = _pair(images, reference)
    if min(x.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels (its window), got {tuple(x.shape[-2:])}")
    per_image = structural_similarity_index_measure(
        x, y, gaussian_kernel=True, sigma=1.5, kernel_size=11, data_range=1.0, k1=0.01, k2=0.03, reduction="none"
    )
    return _reduce(per_image, reduction)


def _pair(images: ImageBatch, reference: ImageBatch) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = to_batch(images), to_batch(reference)
    if x.shape != y.shape:
        raise ValueError(
            f"images and reference must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}; "
            "generate both at the same resolution and with the same number of images"
        )
    if x.shape[0] == 0:
        raise ValueError("got an empty batch; pass at least one image")
    return x.double(), y.double()


def _reduce(per_image: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_image.float()
    if reduction == "mean":
        return per_image.mean().float()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _to_unit_float(batch: torch.Tensor) -> torch.Tensor:
    if batch.shape[0] == 0:
        raise ValueError("got an empty batch; pass at least one image")
    if batch.dtype == torch.uint8:
        return batch.float() / 255
    if not batch.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {batch.dtype}")
    low, high = float(batch.min()), float(batch.max())
    if low < -1e-4 or high > 1 + 1e-4:
        raise ValueError(
            f"floating-point images must lie in [0, 1], got values in [{low:.3g}, {high:.3g}]; "
            "rescale (x + 1) / 2 for [-1, 1] images or pass uint8"
        )
    return batch.float().clamp(0, 1)


def _single_to_chw(image: ImageLike) -> torch.Tensor:
    if isinstance(image, Image.Image):
        return to_batch(np.asarray(image.convert("RGB")))[0]
    if isinstance(image, np.ndarray):
        if image.ndim != 3:
            raise ValueError(f"expected an HWC image array, got shape {image.shape}")
        return to_batch(image)[0]
    if isinstance(image, torch.Tensor):
        if image.ndim != 3:
            raise ValueError(f"expected a CHW image tensor, got shape {tuple(image.shape)}")
        return to_batch(image)[0]
    raise TypeError(f"expected a PIL image, a numpy array or a tensor, got {type(image).__name__}")
