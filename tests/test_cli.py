import pytest
from PIL import Image

from dq.cli import main
from dq.testing.tiny import tiny_pipeline


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd15")
    tiny_pipeline("sd15").save_pretrained(path)
    return path


def test_quantize_then_generate(sd15_dir, tmp_path, capsys):
    out = tmp_path / "q"
    prompts = tmp_path / "p.txt"
    prompts.write_text("# calibration\na cat\n\na dog on a sofa\n")
    assert main(["quantize", str(sd15_dir), "--recipe", "w8a8", "--out", str(out), "--calib-prompts", str(prompts), "--steps", "2"]) == 0
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").exists()
    png = tmp_path / "img.png"
    assert main(["generate", str(out), "--prompt", "a cat", "--seed", "3", "--steps", "2", "--out", str(png)]) == 0
    assert Image.open(png).size == (32, 32)
    # refuses to overwrite what the user has
    assert main(["quantize", str(sd15_dir), "--out", str(out), "--calib-prompts", str(prompts), "--steps", "2"]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["quantize", "{model}", "--recipe", "w5a5", "--out", "{tmp}/o"], "presets"),
        (["quantize", "{model}", "--out", "{tmp}/o", "--calib-prompts", "{tmp}/empty.txt"], "no prompts"),
        (["quantize", "{model}", "--out", "{tmp}/o", "--calib-prompts", "{tmp}/missing.txt"], "no prompt file"),
        (["generate", "{tmp}/nothing-here", "--prompt", "x", "--out", "{tmp}/x.png"], "cannot load pipeline"),
        (["generate", "{model}", "--prompt", "x", "--out", "{tmp}/x.gif"], ".png"),
        (["generate", "{model}", "--prompt", "x", "--out", "{tmp}/x.png", "--text-encoders", "w8a8"], "weight-only"),
        (["generate", "{model}", "--prompt", "x", "--out", "{tmp}/x.png", "--text-encoders", "w3a3"], "presets"),
    ],
)
def test_bad_input_exits_2_with_message(argv, message, sd15_dir, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    argv = [a.format(model=sd15_dir, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert not (tmp_path / "o").exists()


def test_recipes_command(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "w8a8" in out and "w4a4-rtn" in out


def test_generate_quantizes_the_text_encoders_when_asked(sd15_dir, tmp_path, monkeypatch):
    """`--text-encoders w8a16`: the loaded pipeline's text encoders are quantized weight-only
    before it generates (dq generate and dq eval share the option)."""
    import dq.text_encoders as te
    from dq.nn import QuantModule

    seen = []
    real = te.quantize_text_encoders
    monkeypatch.setattr(te, "quantize_text_encoders", lambda pipe, recipe: (seen.append(pipe), real(pipe, recipe))[1])
    png = tmp_path / "img.png"
    assert main(["generate", str(sd15_dir), "--prompt", "a cat", "--steps", "2", "--out", str(png), "--text-encoders", "w8a16"]) == 0
    assert png.exists() and len(seen) == 1
    assert any(isinstance(m, QuantModule) for m in seen[0].text_encoder.modules())
