"""app.py: the side-by-side comparison behind the Gradio page, on the embedded default pipeline."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

import dq
from dq.errors import DQError

REPO = Path(__file__).resolve().parents[1]


def _app():
    sys.path.insert(0, str(REPO))
    return importlib.import_module("app")


@pytest.fixture(scope="module")
def sides():
    return _app().load_sides(None, recipe="w8a8", num_prompts=2, steps=2)


def test_compare_draws_both_from_the_same_seed_and_scores_the_difference(sides) -> None:
    result = sides.compare("a red circle above a blue square", seed=3)
    full, quantized = np.asarray(result.full), np.asarray(result.quantized)
    assert full.shape == quantized.shape == (256, 256, 3)
    assert not np.array_equal(full, quantized)  # really the quantized model
    again = sides.compare("a red circle above a blue square", seed=3)
    assert np.array_equal(np.asarray(again.full), full)
    other = sides.compare("a red circle above a blue square", seed=4)
    assert not np.array_equal(np.asarray(other.full), full)
    # w8a8 stays much closer to full precision than another seed's image does (default model,
    # 2 steps, 2026-11-23: 21.7 dB against 15.8 dB)
    from dq.eval.metrics import psnr

    unrelated = float(psnr([other.full], [result.full]))
    assert result.psnr_db > unrelated + 3 and 0.5 < result.ssim <= 1.0, (result.report, unrelated)
    assert sides.quantized.weight_bytes < sides.full.weight_bytes
    assert "PSNR" in result.report and "dq w8a8" in result.report
    assert sides.quantized.name == "dq w8a8"


def test_compare_rejects_an_empty_prompt_and_bad_steps(sides) -> None:
    with pytest.raises(ValueError, match="prompt is empty"):
        sides.compare("   ")
    with pytest.raises(ValueError, match="steps must be at least 1"):
        sides.compare("a red circle", steps=-2)


def test_a_saved_dq_folder_is_compared_as_is(sides, tmp_path) -> None:
    app = _app()
    folder = dq.save(sides.quantized.pipe, tmp_path / "q")
    loaded = app.load_sides(None, quantized=str(folder), steps=2)
    assert loaded.quantized.name.startswith("dq w8a8")
    a = sides.compare("a green triangle", seed=1)
    b = loaded.compare("a green triangle", seed=1)
    assert np.array_equal(np.asarray(a.quantized), np.asarray(b.quantized))
    assert loaded.quantized.weight_bytes == sides.quantized.weight_bytes

    with pytest.raises(DQError, match="already quantized"):
        app.load_sides(str(folder))
    with pytest.raises(DQError, match="not a folder written by"):
        app.load_sides(None, quantized=str(tmp_path))
    from dq.testing.tiny import default_call_kwargs, tiny_pipeline

    tiny = tiny_pipeline("pixart")
    dq.quantize(
        tiny,
        "w8a8-rtn",
        calib_prompts=["a cat"],
        **default_call_kwargs("pixart"),
    )
    with pytest.raises(DQError, match="made from another model"):
        app.load_sides(None, quantized=str(dq.save(tiny, tmp_path / "tiny")))
    with pytest.raises(DQError, match="num-prompts must be at least 1"):
        app.load_sides(None, num_prompts=0)


def test_the_gradio_page_builds(sides) -> None:
    gr = pytest.importorskip("gradio")
    demo = _app().build_demo(sides)
    assert isinstance(demo, gr.Blocks)


def test_main_explains_a_bad_folder(tmp_path, capsys) -> None:
    pytest.importorskip("gradio")
    with pytest.raises(SystemExit, match="not a folder written by"):
        _app().main(["--quantized", str(tmp_path)])
