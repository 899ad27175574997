"""PSNR, SSIM and the image-batch conversions of dq.eval.metrics."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from dq.eval.metrics import psnr, ssim, to_batch, to_pil, to_uint8


def _images(n=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(20, 236, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_psnr_of_a_constant_offset_is_closed_form():
    x = _images()
    for offset in (1, 5, 20):
        y = x + offset  # values stay below 256
        expected = 20 * math.log10(255 / offset)
        assert psnr(y, x).item() == pytest.approx(expected, abs=1e-3)
        assert psnr(y, x, reduction="none").shape == (3,)


def test_psnr_float_and_uint8_agree_and_identical_is_inf():
    x = _images()
    y = torch.clamp(
        x.int() + torch.randint(-9, 10, x.shape, generator=torch.Generator().manual_seed(1)), 0, 255
    ).to(torch.uint8)
    assert psnr(y, x).item() == pytest.approx(
        psnr(y.float() / 255, x.float() / 255).item(), abs=1e-4
    )
    assert math.isinf(psnr(x, x).item())


def test_ssim_is_one_for_identical_images_and_falls_with_noise():
    x = _images(size=48).float() / 255
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(x.shape, generator=g)
    values = [ssim((x + s * noise).clamp(0, 1), x).item() for s in (0.01, 0.05, 0.2)]
    assert 1.0 > values[0] > values[1] > values[2] > 0.0
    assert ssim(x, x, reduction="none").shape == (3,)


def test_ssim_of_flat_images_is_the_closed_form_luminance_term():
    x, y = torch.full((1, 3, 24, 24), 0.4), torch.full((1, 3, 24, 24), 0.6)
    c1 = 0.01**2  # the structure term is (0 + C2) / (0 + C2) = 1
    assert ssim(x, y).item() == pytest.approx(
        (2 * 0.4 * 0.6 + c1) / (0.4**2 + 0.6**2 + c1), abs=1e-6
    )


def test_conversions_accept_pil_numpy_and_tensors():
    array = np.random.default_rng(0).integers(0, 256, (2, 16, 20, 3), dtype=np.uint8)
    from_numpy = to_batch(array)
    from_pil = to_batch([Image.fromarray(a) for a in array])
    assert from_numpy.shape == (2, 3, 16, 20)
    assert torch.equal(from_numpy, from_pil)
    assert torch.equal(to_uint8(from_numpy), torch.from_numpy(array).permute(0, 3, 1, 2))
    assert [im.size for im in to_pil(from_numpy)] == [(20, 16), (20, 16)]


def test_mismatched_sizes_say_what_to_fix():
    with pytest.raises(ValueError, match="same shape"):
        psnr(_images(size=32), _images(size=16))
    with pytest.raises(ValueError, match="same shape"):
        ssim(_images(n=2), _images(n=3))
    with pytest.raises(ValueError, match="share a size"):
        to_batch([Image.new("RGB", (8, 8)), Image.new("RGB", (9, 8))])


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="empty"):
        to_batch([])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_batch(torch.full((1, 3, 8, 8), 2.0))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(_images(size=8), _images(size=8))
    with pytest.raises(TypeError):
        to_batch("image.png")
