"""Weight-only quantization of the text encoders (T5, CLIP): memory saved, embeddings kept,
never saved quantized."""

from __future__ import annotations

import pytest
import torch

import dq
from dq.errors import DQError
from dq.nn.layers import QuantModule
from dq.testing.tiny import default_call_kwargs, prompt_kwargs, tiny_pipeline
from dq.text_encoders import module_bytes


def _embeds(pipe):
    with torch.no_grad():
        return pipe.encode_prompt("a red cube on a blue table", device="cpu", num_images_per_prompt=1,
                                  do_classifier_free_guidance=False)[0]


@pytest.mark.parametrize(("kind", "recipe", "shrink"), [("pixart", "w8a16", 1.5), ("sd15", "w8a16", 1.5), ("pixart", "w4a16", 1.8)])
def test_text_encoders_shrink_and_keep_their_embeddings(kind, recipe, shrink):
    pipe = tiny_pipeline(kind)
    before = _embeds(pipe)
    linear_bytes = sum(m.weight.numel() * 4 for m in pipe.text_encoder.modules() if isinstance(m, torch.nn.Linear))
    sizes = dq.quantize_text_encoders(pipe, recipe)
    b, a = sizes["text_encoder"]
    assert b == module_bytes(tiny_pipeline(kind).text_encoder) and a == module_bytes(pipe.text_encoder)
    # the Linear weights shrink by the format's factor; embeddings and norms stay float
    assert b - a > linear_bytes * (1 - 1 / shrink) * 0.9
    assert any(isinstance(m, QuantModule) for m in pipe.text_encoder.modules())
    after = _embeds(pipe)
    cos = torch.nn.functional.cosine_similarity(before.flatten(), after.flatten(), dim=0)
    assert cos > (0.999 if recipe == "w8a16" else 0.98), cos
    out = pipe(**prompt_kwargs(kind, 1), **default_call_kwargs(kind), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(torch.as_tensor(out.images)).all()


def test_quantized_text_encoders_are_never_saved(tmp_path):
    pipe = tiny_pipeline("pixart")
    dq.quantize(pipe, "w4a16")
    dq.save(pipe, tmp_path / "ok")
    dq.quantize_text_encoders(pipe, "w8a16")
    with pytest.raises(DQError, match="cannot be saved quantized|read the saved codes as float weights"):
        dq.save(pipe, tmp_path / "bad")
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
    with pytest.raises(DQError, match="cannot be saved quantized"):
        pipe.save_pretrained(tmp_path / "bad2")
    loaded = dq.load(tmp_path / "ok", text_encoders="w8a16")
    assert any(isinstance(m, QuantModule) for m in loaded.text_encoder.modules())
    assert torch.allclose(_embeds(loaded), _embeds(pipe))


def test_bad_text_encoder_requests():
    pipe = tiny_pipeline("pixart")
    with pytest.raises(DQError, match="weight-only"):
        dq.quantize_text_encoders(pipe, "w8a8")
    with pytest.raises(DQError, match="no text encoder"):
        dq.quantize_text_encoders(pipe, "w8a16", names=["text_encoder_3"])
    dq.quantize_text_encoders(pipe, "w8a16")
    with pytest.raises(DQError, match="already quantized"):
        dq.quantize_text_encoders(pipe, "w4a16")


def test_dequantize_gives_the_text_encoders_back_too(tmp_path):
    """dq.dequantize(pipe) turns the text encoders dq quantized into plain Linear layers too (with
    or without a quantized denoiser), after which the pipeline saves."""
    pipe = tiny_pipeline("pixart")
    dq.quantize_text_encoders(pipe, "w8a16")
    quantized = _embeds(pipe)
    dq.dequantize(pipe)  # the denoiser is float: only the text encoder to undo
    assert not any(isinstance(m, QuantModule) for m in pipe.text_encoder.modules())
    # the dequantized weights compute what the quantized layers computed
    assert torch.allclose(_embeds(pipe), quantized, rtol=1e-4, atol=1e-5)
    pipe.save_pretrained(tmp_path / "float")  # refused while the encoder was quantized
    with pytest.raises(DQError, match="not quantized by dq"):
        dq.dequantize(pipe)
