"""Metrics whose networks need downloaded weights (LPIPS, Inception FID): offline errors, local
weight files, and real-image folders."""

import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from dq.eval import lpips as lpips_module
from dq.eval.errors import EvalError, MissingWeightsError
from dq.eval.fid import FidScorer, load_image_folder
from dq.eval.lpips import LpipsScorer, backbone_file, load_lpips


def _offline(*args, **kwargs):
    raise urllib.error.URLError("no network (test)")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty torch hub cache, and every download fails as it does without a network."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _offline)


def test_lpips_offline_error_names_the_path_option(offline):
    with pytest.raises(MissingWeightsError, match="--lpips-weights PATH"):
        load_lpips("alex")


def test_lpips_missing_or_wrong_weight_file(tmp_path, offline):
    with pytest.raises(MissingWeightsError, match="no such file"):
        load_lpips("alex", tmp_path / "nothing.pth")
    bogus = tmp_path / "bogus.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, bogus)
    with pytest.raises(MissingWeightsError, match="not torchvision's alex checkpoint"):
        load_lpips("alex", bogus)


def test_lpips_reads_a_local_backbone_file(tmp_path, offline):
    import torchvision

    torch.manual_seed(0)
    path = tmp_path / backbone_file("alex")
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    scorer = LpipsScorer("alex", path)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    y = (x + 0.2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert scorer(x, x, reduction="none").abs().max() < 1e-6
    assert scorer(y, x) > 0
    with pytest.raises(EvalError, match="same shape"):
        scorer(x, y[:1])
    assert torch.hub.get_dir() == str(tmp_path / "hub")  # restored after loading
    assert lpips_module.LPIPS_NETS == ("alex", "vgg", "squeeze")


def test_inception_fid_offline_error_names_both_ways_out(offline):
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(MissingWeightsError, match="--inception-weights PATH") as err:
        FidScorer(images, features="inception")
    assert "--fid-features clip" in str(err.value)
    with pytest.raises(MissingWeightsError, match="no such file"):
        FidScorer(images, features="inception", inception_weights="/nonexistent/inception.pth")
    with pytest.raises(EvalError, match="unknown FID feature"):
        FidScorer(images, features="dino")


def test_real_image_folder(tmp_path):
    with pytest.raises(EvalError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(EvalError, match="holds no images"):
        load_image_folder(tmp_path)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)).save(tmp_path / "b.jpg")
    images = load_image_folder(tmp_path, size=(32, 32))
    assert [im.size for im in images] == [(32, 32), (32, 32)]
    (tmp_path / "c.png").write_bytes(b"not an image")
    with pytest.raises(EvalError, match="cannot read image"):
        load_image_folder(tmp_path)
