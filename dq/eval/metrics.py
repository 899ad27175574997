"""Full-reference image metrics (PSNR, SSIM) and the image-batch conversions every metric shares.

Batches are NCHW tensors, either uint8 in [0, 255] or floating point in [0, 1]. ``to_batch``
turns PIL images, HWC numpy arrays and lists of them into that form.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ImageLike = Image.Image | np.ndarray | torch.Tensor
ImageBatch = torch.Tensor | np.ndarray | Sequence[ImageLike]


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
            raise ValueError(
                f"expected a numpy image array shaped (N, H, W, 3) or (H, W, 3), got {images.shape}"
            )
        return _to_unit_float(torch.from_numpy(np.array(array)).permute(0, 3, 1, 2))
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise TypeError(
            f"expected a tensor, a numpy array or a list of images, got {type(images).__name__}"
        )
    if len(images) == 0:
        raise ValueError("got an empty list of images; pass at least one image")
    items = [_single_to_chw(image) for image in images]
    sizes = {tuple(item.shape) for item in items}
    if len(sizes) > 1:
        raise ValueError(
            f"images in one batch must share a size, got {sorted(sizes)}; resize them first"
        )
    return torch.stack(items)


def to_uint8(images: ImageBatch) -> torch.Tensor:
    """Like ``to_batch`` but returns uint8 in [0, 255] (what FID feature extractors take)."""
    return (to_batch(images) * 255).round().to(torch.uint8)


def to_pil(images: ImageBatch) -> list[Image.Image]:
    """Convert a batch to a list of RGB PIL images (a list of PIL images is returned as is)."""
    if (
        isinstance(images, (list, tuple))
        and images
        and all(isinstance(im, Image.Image) for im in images)
    ):
        return [im if im.mode == "RGB" else im.convert("RGB") for im in images]
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


def ssim(
    images: ImageBatch, reference: ImageBatch, *, reduction: str = "mean", chunk: int = 16
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) as its reference implementation computes it:
    an 11x11 Gaussian window (sigma 1.5), K1=0.01, K2=0.03, data range 1, the SSIM map over
    the valid region (no padding), averaged over pixels and channels per image."""
    x, y = _pair(images, reference)
    if min(x.shape[-2:]) < _SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs images of at least {_SSIM_WINDOW}x{_SSIM_WINDOW} pixels (its window), "
            f"got {tuple(x.shape[-2:])}"
        )
    per_image = torch.cat(
        [_ssim(x[i : i + chunk], y[i : i + chunk]) for i in range(0, len(x), chunk)]
    )
    return _reduce(per_image, reduction)


_SSIM_WINDOW, _SSIM_SIGMA, _SSIM_C1, _SSIM_C2 = 11, 1.5, 0.01**2, 0.03**2


def _ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, y = x.float(), y.float()
    offsets = torch.arange(_SSIM_WINDOW, dtype=torch.float32) - _SSIM_WINDOW // 2
    gauss = torch.exp(-(offsets**2) / (2 * _SSIM_SIGMA**2))
    gauss = gauss / gauss.sum()
    channels = x.shape[1]
    rows = gauss.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    cols = gauss.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)

    def blur(z: torch.Tensor) -> torch.Tensor:  # separable Gaussian filter, 'valid' region
        return F.conv2d(F.conv2d(z, rows, groups=channels), cols, groups=channels)

    # Second moments of mean-centred images: same values, far less float32 cancellation.
    mean_x, mean_y = x.mean(dim=(2, 3), keepdim=True), y.mean(dim=(2, 3), keepdim=True)
    x, y = x - mean_x, y - mean_y
    mu_xc, mu_yc = blur(x), blur(y)
    var_x = blur(x * x) - mu_xc**2
    var_y = blur(y * y) - mu_yc**2
    cov = blur(x * y) - mu_xc * mu_yc
    mu_x, mu_y = mu_xc + mean_x, mu_yc + mean_y
    luminance = (2 * mu_x * mu_y + _SSIM_C1) / (mu_x**2 + mu_y**2 + _SSIM_C1)
    structure = (2 * cov + _SSIM_C2) / (var_x + var_y + _SSIM_C2)
    return (luminance * structure).flatten(1).mean(dim=1)


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
