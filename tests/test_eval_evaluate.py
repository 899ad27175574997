"""generate_images / Scorer / evaluate / EvalResult and the ``dq eval`` CLI, on a tiny pipeline."""

import argparse
import importlib
import json
import math

import pytest
import torch

import dq.io
from dq.errors import DQError
from dq.eval import EvalError, MissingWeightsError, Scorer, evaluate, generate_images, parse_metrics
from dq.eval.cli import add_eval_parser, run_eval
from dq.testing.tiny import default_call_kwargs, tiny_pipeline

PROMPTS = ["a red circle", "a blue square above a green triangle", "a photo of a cat"]
CALL = {**default_call_kwargs("sd15"), "num_inference_steps": 2}


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd15", seed=0)


@pytest.fixture(scope="module")
def images(pipe):
    return generate_images(pipe, PROMPTS, batch_size=2, progress=False, **CALL)


def test_batching_does_not_change_the_images(pipe, images):
    one_by_one = generate_images(pipe, PROMPTS, batch_size=1, progress=False, **CALL)
    assert len(images) == 3 and images[0].size == (32, 32)
    for a, b in zip(images, one_by_one):
        diff = (torch.tensor(list(a.getdata())) - torch.tensor(list(b.getdata()))).abs().max()
        assert diff <= 2  # same seeds; only float summation order may differ
    other_seeds = generate_images(pipe, PROMPTS, seeds=[7, 8, 9], progress=False, **CALL)
    assert list(other_seeds[0].getdata()) != list(images[0].getdata())


def test_score_against_itself_and_a_perturbed_copy(images):
    scorer = Scorer("psnr,ssim,clip,attr")
    same = scorer.score(images, PROMPTS, reference_images=images)
    assert math.isinf(same.metrics["psnr"]) and same.metrics["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert 0.0 <= same.metrics["clip"] <= 100.0
    assert same.attribute_slots is not None and "relation" in same.attribute_slots
    assert any("outside the grammar" in note for note in same.notes)
    noisy = [im.point(lambda v: min(255, v + 8)) for im in images]
    worse = scorer.score(noisy, PROMPTS, reference_images=images)
    assert 20 < worse.metrics["psnr"] < 40 and worse.metrics["ssim"] < 1.0

    data = same.to_dict(per_image=True)
    json.dumps(data, allow_nan=False)  # JSON-able: infinite PSNR becomes null
    assert data["metrics"]["psnr"] is None and len(data["per_image"]["ssim"]) == 3
    table = worse.to_table()
    assert "| PSNR vs reference (dB) |" in table and "| attribute accuracy |" in table


def test_automatic_metrics_skip_what_the_inputs_do_not_allow(images):
    result = Scorer().score(images, PROMPTS)  # no reference: only clip and attr
    assert set(result.metrics) == {"clip", "attr"}


def test_explicit_metrics_must_be_computable(images, monkeypatch, tmp_path):
    with pytest.raises(EvalError, match="needs reference images"):
        Scorer("psnr").score(images, PROMPTS)
    with pytest.raises(EvalError, match="unknown metric.*bogus"):
        parse_metrics("psnr,bogus")
    with pytest.raises(EvalError, match="3 prompts"):
        Scorer("clip").score(images[:2], PROMPTS)

    def no_weights(*args, **kwargs):
        raise MissingWeightsError("no LPIPS weights (test); pass --lpips-weights PATH")

    monkeypatch.setattr(importlib.import_module("dq.eval.evaluate"), "LpipsScorer", no_weights)
    with pytest.raises(MissingWeightsError, match="--lpips-weights"):
        Scorer("lpips").score(images, PROMPTS, reference_images=images)
    auto = Scorer().score(images, PROMPTS, reference_images=images)  # not requested: null + note
    assert auto.metrics["lpips"] is None and any("--lpips-weights" in n for n in auto.notes)
    assert auto.metrics["psnr"] is not None


def test_evaluate_generates_the_reference_with_the_same_seeds(pipe):
    result = evaluate(
        pipe, PROMPTS[:2], reference=pipe, metrics="psnr,ssim", call_kwargs=CALL, batch_size=2
    )
    assert math.isinf(result.metrics["psnr"])
    assert len(result.images) == len(result.reference_images) == 2
    assert result.settings["num_prompts"] == 2


def _run_cli(argv):
    parser = argparse.ArgumentParser(prog="dq")
    add_eval_parser(parser.add_subparsers(dest="command"))
    return run_eval(parser.parse_args(["eval", *argv]))


def test_cli_writes_json_and_prints_a_table(monkeypatch, tmp_path, capsys, pipe):
    opened = []

    def open_pipeline(model, **kwargs):
        opened.append(model)
        return pipe

    monkeypatch.setattr(dq.io, "open_pipeline", open_pipeline)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na red circle\n\na blue square\n")
    out = tmp_path / "res" / "eval.json"
    code = _run_cli(
        [
            "some/model",
            "--reference",
            "ref",
            "--prompts",
            str(prompts),
            "--metrics",
            "psnr,ssim",
            "--steps",
            "2",
            "--json",
            str(out),
        ]
    )
    assert code == 0 and opened == ["some/model", "ref"]
    data = json.loads(out.read_text())
    assert set(data["metrics"]) == {"psnr", "ssim"} and data["settings"]["num_prompts"] == 2
    assert "| SSIM vs reference |" in capsys.readouterr().out


def test_cli_rejects_bad_input(monkeypatch, tmp_path):
    monkeypatch.setattr(
        dq.io, "open_pipeline", lambda *a, **k: pytest.fail("must fail before loading")
    )
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        _run_cli(["--prompts", str(empty)])
    with pytest.raises(ValueError, match="unknown metric"):
        _run_cli(["--metrics", "fid,sharpness"])
    with pytest.raises(ValueError, match="--lpips-weights"):
        _run_cli(["--lpips-weights", str(tmp_path / "missing.pth"), "--num-prompts", "2"])
    with pytest.raises(ValueError, match="--real-images"):
        _run_cli(["--real-images", str(tmp_path / "nope"), "--num-prompts", "2"])


def test_grammar_prompts_are_distinct_parseable_and_seeded():
    from dq.eval.attributes import in_grammar
    from dq.prompts import grammar_prompts

    prompts = grammar_prompts(50)
    assert len(set(prompts)) == 50 and all(in_grammar(p) for p in prompts)
    assert grammar_prompts(50) == prompts and grammar_prompts(50, seed=1) != prompts
    with pytest.raises(DQError, match="distinct captions"):
        grammar_prompts(100_000)
