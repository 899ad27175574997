"""No code from pickles: every weight file a user names is loaded with weights_only=True (or as
safetensors); a file that needs more is refused with a clear error and nothing from it runs."""

import json
import shutil

import pytest
import torch

from dq.cli import main
from dq.errors import DQError
from dq.eval import lpips as lpips_module
from dq.eval.clip import evaluator_config_path, evaluator_weights_path, load_clip
from dq.eval.evaluate import Scorer
from dq.eval.fid import FidScorer
from dq.eval.lpips import backbone_file, load_lpips
from dq.safeload import UnsafeWeightsError, load_weights


class _WritesMarker:
    """Unpickling this calls open(marker, 'w'): a crafted checkpoint running code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def evil(tmp_path):
    """(path of a crafted .pth, marker path that loading it would create)."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"features.0.weight": torch.zeros(1), "payload": _WritesMarker(marker)}, path)
    assert not marker.exists()
    return path, marker


@pytest.fixture
def torchscript(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    return path


@pytest.fixture
def offline(monkeypatch, tmp_path):
    def fail(*args, **kwargs):
        raise AssertionError("no download in this test")

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", fail)


def test_load_weights_refuses_pickled_objects_and_torchscript(evil, torchscript, tmp_path):
    path, marker = evil
    with pytest.raises(UnsafeWeightsError, match="pickled Python objects") as err:
        load_weights(path, "--x")
    assert "--x" in str(err.value) and str(path) in str(err.value)
    with pytest.raises(UnsafeWeightsError, match="TorchScript"):
        load_weights(torchscript, "--x")
    assert not marker.exists()
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(2)}, plain)
    assert torch.equal(load_weights(plain, "--x")["w"], torch.ones(2))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DQError, match="not a readable"):
        load_weights(tmp_path / "junk.pt", "--x")


def test_lpips_weights_file_is_never_unpickled(evil, offline):
    path, marker = evil
    with pytest.raises(UnsafeWeightsError, match="--lpips-weights"):
        load_lpips("alex", path)
    with pytest.raises(UnsafeWeightsError):
        lpips_module.LpipsScorer("alex", path)
    assert not marker.exists()


def test_lpips_hub_cache_file_is_never_unpickled(evil, offline, tmp_path):
    path, marker = evil
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy(path, checkpoints / backbone_file("alex"))
    with pytest.raises(UnsafeWeightsError, match="hub cache"):
        load_lpips("alex")
    assert not marker.exists()


def test_inception_weights_file_is_never_unpickled(evil, offline):
    pytest.importorskip("torch_fidelity")
    path, marker = evil
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(UnsafeWeightsError, match="--inception-weights"):
        FidScorer(images, features="inception", inception_weights=path)
    assert not marker.exists()


def test_clip_pretrained_file_is_never_unpickled(evil, torchscript):
    path, marker = evil
    config = str(evaluator_config_path())
    with pytest.raises(UnsafeWeightsError, match="--clip-pretrained"):
        load_clip(config, str(path))
    with pytest.raises(UnsafeWeightsError, match="TorchScript"):
        load_clip(config, str(torchscript))
    assert not marker.exists()


def test_clip_pretrained_plain_checkpoint_still_loads(tmp_path):
    """A plain .pt state dict works (loaded safely, handed to open_clip as dq's copy)."""
    from safetensors.torch import load_file

    plain = tmp_path / "clip.pt"
    torch.save({"state_dict": load_file(evaluator_weights_path())}, plain)
    clip = load_clip(str(evaluator_config_path()), str(plain))
    reference = load_clip()
    texts = ["a red circle"]
    assert torch.allclose(clip.embed_texts(texts), reference.embed_texts(texts), atol=1e-6)


def test_clip_local_dir_checkpoint_is_never_unpickled(evil, tmp_path):
    path, marker = evil
    folder = tmp_path / "clipdir"
    folder.mkdir()
    config = json.loads(evaluator_config_path().read_text())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    shutil.copy(path, folder / "open_clip_pytorch_model.bin")
    with pytest.raises(UnsafeWeightsError, match="local-dir"):
        load_clip(f"local-dir:{folder}")
    assert not marker.exists()


@pytest.mark.parametrize(
    "option", ["--lpips-weights", "--inception-weights", "--clip-pretrained", "--clip-model"]
)
def test_scorer_and_cli_refuse_before_generating(option, evil, tmp_path, capsys):
    path, marker = evil
    if option == "--clip-model":
        folder = tmp_path / "clipdir"
        folder.mkdir()
        shutil.copy(path, folder / "open_clip_pytorch_model.bin")
        value = f"local-dir:{folder}"
        extra = []
    else:
        value = str(path)
        extra = ["--clip-model", str(evaluator_config_path())] if option == "--clip-pretrained" else []
    kwargs = {
        "--lpips-weights": {"lpips_weights": value},
        "--inception-weights": {"inception_weights": value},
        "--clip-pretrained": {"clip_model": str(evaluator_config_path()), "clip_pretrained": value},
        "--clip-model": {"clip_model": value},
    }[option]
    with pytest.raises(UnsafeWeightsError):
        Scorer(**kwargs)
    # the model argument points nowhere: the refusal must come before any pipeline is opened
    argv = ["eval", str(tmp_path / "no-model"), "--num-prompts", "1", option, value, *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "refused" in err or "TorchScript" in err or "pickled" in err
    assert "Traceback" not in err
    assert not marker.exists()


def test_pipeline_folders_with_pickled_weights_are_never_unpickled(evil, tmp_path, capsys):
    """MODEL and --reference folders: diffusers/transformers load .bin weights with
    weights_only=True; a crafted one is an error (exit 2), never executed."""
    from dq.testing.tiny import tiny_pipeline

    path, marker = evil
    folder = tmp_path / "pipe"
    tiny_pipeline("sd15").save_pretrained(folder, safe_serialization=False)
    weights = folder / "unet" / "diffusion_pytorch_model.bin"
    assert weights.is_file()
    shutil.copy(path, weights)
    assert main(["eval", str(folder), "--num-prompts", "1", "--metrics", "clip"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert main(["eval", "--reference", str(folder), "--num-prompts", "1", "--metrics", "psnr"]) == 2
    assert not marker.exists()
